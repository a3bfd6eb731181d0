"""The Triton kernels of the fused linear + scoring-rule loss, run by the Triton interpreter on
the CPU (``TRITON_INTERPRET=1``).

The interpreter must be switched on before ``triton`` is imported, and it must not leak into
the other tests, so the checks run in a child process: this file is also a script
(``python tests/test_fused_triton.py``) that computes every comparison and prints the
relative errors as JSON; the tests below run it once and assert on the result. Shapes are
small because the interpreter executes each tile with NumPy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

#: the Triton kernels run in the interpreter on CPU (TRITON_INTERPRET=1): `make check` leaves them out
pytestmark = pytest.mark.slow

RULES = ["logarithmic", "brier", "spherical", "power:3", "pseudo-spherical:1.5", "0.5*logarithmic+0.5*spherical"]
N, H, V = 21, 20, 40  # none a multiple of the 16-wide tiles
TOL = 1e-5


# ---------------------------------------------------------------------- the child process
def _worker(device: str = "cpu") -> dict[str, dict[str, float]]:
    """Every comparison; ``device="cpu"`` under the interpreter, ``"cuda"`` with compiled kernels."""
    import torch
    import torch.nn.functional as F

    from properlm import get_rule, scoring_rule_loss
    from properlm.fused import fused_linear_scoring_rule_loss, triton_kernels
    from properlm.fused.chunked import chunk_logits
    from properlm.fused.triton_kernels import TritonChunkBackend
    from properlm.options import LossOptions
    from properlm.stats import compute_stats
    from reference import rel_err

    assert (os.environ.get("TRITON_INTERPRET") == "1") == (device == "cpu")
    dev = torch.device(device)
    # the smallest tiles tl.dot allows, so that every kernel loops over several vocabulary
    # tiles (online max and rescaling), several hidden blocks and several token blocks
    default_blocks = triton_kernels.BLOCK_N, triton_kernels.BLOCK_V, triton_kernels.BLOCK_H
    triton_kernels.BLOCK_N = triton_kernels.BLOCK_V = triton_kernels.BLOCK_H = 16
    out: dict[str, dict[str, float]] = {}

    def data(seed: int, bias: bool, masked_vocab: bool = False):
        g = torch.Generator().manual_seed(seed)
        h = torch.randn(N, H, generator=g, dtype=torch.float64)
        w = torch.randn(V, H, generator=g, dtype=torch.float64) * (2.0 / H**0.5)
        b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
        if masked_vocab:
            b[V - 3 :] = -float("inf")  # vocabulary entries with probability 0
        y = torch.randint(V - 3, (N,), generator=g)
        y[torch.rand(N, generator=g) < 0.25] = -100
        return h, w, b, y

    def run(fn, h, w, b, y, dtype, up, **kw):
        leaves = [t.to(dev, dtype).clone().requires_grad_(True) for t in (h, w) + ((b,) if b is not None else ())]
        loss = fn(leaves[0], leaves[1], leaves[2] if b is not None else None, y.to(dev), **kw)
        wt = up.to(dev, loss.dtype) if loss.dim() else up.to(dev, loss.dtype).sum()
        grads = torch.autograd.grad((loss * wt).sum(), leaves)
        return [t.cpu() for t in (loss.detach(), *grads)]

    def fused(h, w, b, y, **kw):
        return fused_linear_scoring_rule_loss(h, w, y, bias=b, impl="triton", **kw)

    def unfused(h, w, b, y, chunk_size=None, **kw):
        return scoring_rule_loss(F.linear(h, w, b), y, **kw)

    names = ("loss", "grad_hidden", "grad_weight", "grad_bias")
    seed = 0
    for rule in RULES:
        for smoothing in (0.0, 0.1):
            for reduction in ("mean", "sum", "none"):
                for bias in (False, True):
                    seed += 1
                    h, w, b, y = data(seed, bias)
                    up = torch.randn(N, dtype=torch.float64) if reduction == "none" else torch.tensor(1.7)
                    kw = {"rule": rule, "smoothing": smoothing, "reduction": reduction}
                    ref64 = run(unfused, h, w, b, y, torch.float64, up, **kw)
                    ref32 = run(unfused, h, w, b, y, torch.float32, up, **kw)
                    # several chunks (7 rows: not a divisor) with a bias, one chunk of 2 token blocks without
                    got = run(fused, h, w, b, y, torch.float32, up, chunk_size=7 if bias else None, **kw)
                    key = f"{rule}|eps={smoothing}|{reduction}|bias={bias}"
                    out[key] = {}
                    for name, a, r32, r64 in zip(names, got, ref32, ref64):
                        out[key][name + " vs float32"] = rel_err(a, r32)
                        out[key][name + " vs float64"] = rel_err(a, r64)

    # -inf logits (masked vocabulary through the bias) and the default chunk size
    for rule in ("logarithmic", "brier", "power:3"):
        h, w, b, y = data(100, True, masked_vocab=True)
        up = torch.randn(N, dtype=torch.float64)
        kw = {"rule": rule, "smoothing": 0.1, "reduction": "none"}
        ref = run(unfused, h, w, b, y, torch.float64, up, **kw)
        got = run(fused, h, w, b, y, torch.float32, up, **kw)
        key = f"{rule}|masked vocabulary"
        out[key] = {n: rel_err(a, r) for n, a, r in zip(names[:3], got[:3], ref[:3])}
        # the bias of a -inf logit gets no gradient; compare the finite part
        out[key]["grad_bias"] = rel_err(got[3][: V - 3], ref[3][: V - 3])

    # bfloat16 inputs: the error against float64 (norm-wise over 64 per-token losses and every
    # gradient entry) relative to that of the unfused bfloat16 path
    def norm_err(a, b) -> float:
        a, b = a.double(), b.double()
        return float((a - b).norm() / b.norm())

    # on a GPU also a size with full 2-byte tiles and several chunks (float32 accumulation of grad_W)
    bf16_cases = [(64, 32, 97, None)] + ([(3000, 256, 20011, 1000)] if device != "cpu" else [])
    for (nb, hb, vb, chunk), rule in ((c, r) for c in bf16_cases for r in ("brier", "spherical")):
        g = torch.Generator().manual_seed(300)
        h = torch.randn(nb, hb, generator=g, dtype=torch.float64)
        w = torch.randn(vb, hb, generator=g, dtype=torch.float64) * (0.35 * (32 / hb) ** 0.5)  # 0.35 at H=32
        b = torch.randn(vb, generator=g, dtype=torch.float64)
        y = torch.randint(vb, (nb,), generator=g)
        up = torch.randn(nb, dtype=torch.float64)
        kw = {"rule": rule, "smoothing": 0.1, "reduction": "none"}
        # the exact (float64) result for the bfloat16 inputs: what both paths try to compute
        h, w, b = (t.to(torch.bfloat16).double() for t in (h, w, b))
        ref = run(unfused, h, w, b, y, torch.float64, up, **kw)
        un = run(unfused, h, w, b, y, torch.bfloat16, up, **kw)
        got = run(fused, h, w, b, y, torch.bfloat16, up, chunk_size=chunk, **kw)
        assert [t.dtype for t in got[1:]] == [torch.bfloat16] * 3
        out[f"{rule}|bfloat16 error / unfused bfloat16 error N={nb} V={vb}"] = {
            n: norm_err(a, r) / norm_err(u, r) for n, a, u, r in zip(names, got, un, ref)
        }

    # the kernels' statistics against compute_stats on the materialised logits
    for rule in RULES:
        spec = get_rule(rule)
        h, w, b, y = data(200, True)
        y = y.clamp(min=0)
        h32, w32, b32 = (t.to(dev, torch.float32) for t in (h, w, b))
        stats, _ = TritonChunkBackend().stats(h32, w32, b32, y.to(dev), LossOptions(spec, 0.1))
        ref, _, _ = compute_stats(chunk_logits(h, w, b), y, spec, 0.1)
        key = f"{rule}|statistics"
        out[key] = {
            "z_y": rel_err(stats.z_y, ref.z_y),
            "max_logit": rel_err(stats.max_logit, ref.max_logit),
            "num_classes": rel_err(stats.num_classes, ref.num_classes),
        }
        for c in ref.lse:
            out[key][f"lse[{c}]"] = rel_err(stats.lse[c], ref.lse[c])
        for f in ("sum_z", "masked_sum_z", "masked_count"):
            if getattr(ref, f) is not None:
                out[key][f] = rel_err(getattr(stats, f), getattr(ref, f))

    if device != "cpu":
        # compiled kernels at their default tile sizes on a size with many tiles of each kind
        triton_kernels.BLOCK_N, triton_kernels.BLOCK_V, triton_kernels.BLOCK_H = default_blocks
        n, hs, vs = 1500, 200, 10007
        for i, rule in enumerate(RULES):
            g = torch.Generator().manual_seed(400 + i)
            h = torch.randn(n, hs, generator=g, dtype=torch.float64)
            w = torch.randn(vs, hs, generator=g, dtype=torch.float64) * (3.0 / hs**0.5)
            b = torch.randn(vs, generator=g, dtype=torch.float64)
            y = torch.randint(vs, (n,), generator=g)
            y[torch.rand(n, generator=g) < 0.1] = -100
            up = torch.randn(n, dtype=torch.float64)
            kw = {"rule": rule, "smoothing": 0.1, "reduction": "none"}
            ref = run(unfused, h, w, b, y, torch.float64, up, **kw)
            got = run(fused, h, w, b, y, torch.float32, up, **kw)
            un = run(unfused, h, w, b, y, torch.float32, up, **kw)
            key = f"{rule}|default tiles N={n} H={hs} V={vs}"
            out[key] = {nm: rel_err(a, r) for nm, a, r in zip(names, got, ref)}
            out[key + "|unfused float32"] = {nm: rel_err(a, r) for nm, a, r in zip(names, un, ref)}
    return out


# ---------------------------------------------------------------------- the tests
def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(
    scope="module",
    params=[
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not _has_cuda(), reason="compiled kernels need a CUDA GPU")),
    ],
)
def results(request) -> dict[str, dict[str, float]]:
    """The worker's comparisons: under the interpreter on the CPU, and compiled on a GPU when there is one."""
    pytest.importorskip("triton", reason="triton is an optional dependency (pip install properlm[triton])")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    if request.param == "cpu":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), request.param],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["_device"] = request.param
    return out


def test_every_case_ran(results):
    device = results["_device"]
    assert sum("default tiles" in k for k in results) == (2 * len(RULES) if device == "cuda" else 0)
    n_cases = len(RULES) * 2 * 3 * 2
    assert sum("|eps=" in k for k in results) == n_cases
    assert sum("statistics" in k for k in results) == len(RULES)
    assert sum("masked vocabulary" in k for k in results) == 3


@pytest.mark.parametrize("rule", RULES)
def test_value_and_grads_match_unfused(results, rule):
    bad = {
        (key, metric): err
        for key, metrics in results.items()
        if key.startswith(rule + "|") and "bfloat16" not in key and "default tiles" not in key
        for metric, err in metrics.items()
        if not err <= TOL
    }
    assert not bad, bad


def test_compiled_default_tiles_as_accurate_as_unfused_float32(results):
    """Compiled kernels at a realistic size: the error against float64 stays within a small factor
    of what the unfused float32 path itself makes (the bounded rules' per-token losses carry
    rounding of a few 1e-5 in float32 at V = 10^4, whichever path computes them)."""
    cases = {k: v for k, v in results.items() if "default tiles" in k and not k.endswith("unfused float32")}
    assert len(cases) == (len(RULES) if results["_device"] == "cuda" else 0)
    for key, errs in cases.items():
        base = results[key + "|unfused float32"]
        for name, err in errs.items():
            assert err <= max(10 * base[name], 1e-5) and err < 1e-3, (key, name, err, base[name])


def test_bfloat16_no_worse_than_unfused_bfloat16(results):
    cases = {k: v for k, v in results.items() if "bfloat16" in k}
    assert len(cases) == (4 if results["_device"] == "cuda" else 2)
    for key, ratios in cases.items():
        assert all(r <= 1.25 for r in ratios.values()), (key, ratios)


def test_kernel_statistics_match_compute_stats(results):
    for key, metrics in results.items():
        if "statistics" in key:
            assert metrics["num_classes"] == 0.0
            assert all(err <= TOL for err in metrics.values()), (key, metrics)


if __name__ == "__main__":
    print(json.dumps(_worker(sys.argv[1] if len(sys.argv) > 1 else "cpu")))
