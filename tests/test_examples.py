"""Every script in examples/ runs and prints what it promises (so the examples never rot).

Single-process scripts run in this process (``runpy``, as ``__main__``: the import of torch and
transformers is paid once); the ``torchrun`` ones run as 2 gloo processes."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

#: every test here runs a whole command, study, process group or build: `make check` leaves them out
pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

#: script -> a pattern its output must contain
EXPECTED = {
    "pytorch_training_loop.py": r"step 19  spherical loss [0-9.]+\n.*mean spherical score of the scored tokens: 0\.9",
    "fused_loss_custom_model.py": r"fused and materialised losses agree",
    "hf_trainer.py": r"Brier losses: \[([0-9.]+, ){3}[0-9.]+\]",
    "trl_sft.py": r"spherical losses: \[([0-9.]+, ){3}[0-9.]+\]",
    "lora_peft.py": r"trainable params: .*step 7  spherical loss [0-9.]+",
    "rule_schedule.py": r"switches \(step, rule\): \[\(0, 'logarithmic'\), \(4, 'brier'\)\].*step 6  brier",
    "evaluation_calibration.py": r"fitted on validation: T = 2\.[3-7].*wrote .*reliability\.png",
    # a seq2seq model learns the made-up subjects (ROUGE-1 above 20 with either beam objective)
    "summarisation.py": (
        r"switches \(step, rule\): \[\(0, 'logarithmic'\), \(40, 'spherical'\)\]"
        r".*logarithmic objective: ROUGE-1 ([2-9][0-9]|100)\.[0-9].*multi-reference"
        r".*spherical objective: ROUGE-1 ([2-9][0-9]|100)\.[0-9]"
    ),
    "mixture_rule.py": r"mixture loss ([0-9.]+) = sum of weighted component losses \1",
    "torchrun_data_parallel.py": r"2 processes, replicas identical after training",
    "vocab_parallel.py": r"(?=.*rank 0: ids \[0, 500\), loss)(?=.*rank 1: ids \[500, 1000\), loss)",
}


def _is_torchrun(path: Path) -> bool:
    return "torchrun --nproc_per_node 2 examples/" in path.read_text(encoding="utf-8")


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if not _is_torchrun(EXAMPLES / n)))
def test_example(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", [name, str(tmp_path)])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    out = capsys.readouterr().out
    assert re.search(EXPECTED[name], out, re.S), out[-3000:]


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if _is_torchrun(EXAMPLES / n)))
def test_torchrun_example(name, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(EXAMPLES / name)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(EXPECTED[name], proc.stdout, re.S), proc.stdout[-3000:]
