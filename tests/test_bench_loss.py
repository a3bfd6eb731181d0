"""benchmarks/bench_loss.py end to end at a tiny shape (each variant in its own process), and the
CUDA-only tile sweep's refusal on a machine without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

#: every test here runs a whole command, study, process group or build: `make check` leaves them out
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True, env=env, timeout=900
    )


def test_bench_loss_prints_a_row_per_variant():
    proc = _run(
        "bench_loss.py",
        "--n",
        "64",
        "--h",
        "16",
        "--v",
        "100",
        "--repeats",
        "1",
        "--rules",
        "brier,spherical",
        "--variants",
        "naive,unfused,fused-torch",
        "--smoothing",
        "0.1",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    variants = [(r.split("|")[1].strip(), r.split("|")[2].strip()) for r in rows]
    assert ("logarithmic", "cross_entropy (materialised)") in variants
    for rule in ("brier", "spherical"):
        for v in ("naive", "unfused", "fused-torch"):
            assert (rule, v) in variants
    assert not any("failed" in r for r in rows if "linear_cross_entropy" not in r)
    # the GPU-only baselines are wired in and say why they do not run on a CPU
    liger = next(r for r in rows if "Liger fused linear CE" in r)
    cce = next(r for r in rows if "Cut Cross-Entropy" in r)
    assert "skipped: liger_flce needs a CUDA GPU" in liger and "skipped: cce needs a CUDA GPU" in cce


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_tile_sweep_needs_a_gpu():
    proc = _run("bench_triton_tiles.py", "--n", "8")
    assert proc.returncode != 0 and "needs a CUDA GPU" in proc.stderr


def test_bench_bf16_cpu_times_every_mode_and_refuses_unknown_ones(monkeypatch, capsys):
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = importlib.import_module("bench_bf16_cpu")
    argv = ["--shape", "tiny", "--layers", "1", "--rounds", "1", "--new-tokens", "2"]
    bench.main([*argv, "--modes", "fp32,bf16,bf16-onednn"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["fp32", "bf16", "bf16-onednn"]
    fp32 = rows[1].split("|")
    assert fp32[3].strip() == "1.00" and fp32[5].strip() == "1.00" and float(fp32[6]) == 0.0
    # bfloat16 rounding moves the loss a little, never far
    assert all(float(r.split("|")[6]) < 1e-2 for r in rows[2:])
    assert "bf16 products:" in out and torch.backends.cpu.get_cpu_capability() in out
    with pytest.raises(SystemExit) as exc:
        bench.main([*argv, "--modes", "bf16,fp16"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--modes: fp16" in err and "allowed: fp32, bf16, bf16-onednn" in err
