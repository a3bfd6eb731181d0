"""Output heads of today's models: final-logit soft-capping ``c tanh(z / c)`` (Gemma 2/3) and logit
scaling ``s z`` (Cohere; Granite divides) as keywords of every loss, and ``apply_scoring_rule`` fusing
such heads.

Every path must equal the loss of the explicitly transformed logits ``z'' = c tanh(s z / c)`` (float64
autograd through ``torch.tanh``): the unfused loss, the fused chunked loss, the Triton kernels (under the
interpreter, in a child process, as ``tests/test_fused_triton.py`` does), the vocabulary-parallel losses
(gloo, 2 processes) and the traceable form used under ``torch.compile``. ``-inf`` logits (masked
vocabulary) must stay ``-inf``: ``tanh(-inf) = -1`` would give them probability and a place in ``V``.

Run as a script (``python tests/test_softcap.py triton``) this file is the Triton worker.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

RULES = ["logarithmic", "brier", "spherical", "power:3", "pseudo-spherical:1.5"]
#: (softcap, logit_scale): scale only (Cohere), cap only (Gemma), both (scale then cap)
HEADS = [(None, 2.5), (3.0, None), (2.0, 0.7)]
N, H, V = 13, 12, 40
TOL32 = 1e-5  # float32 against float64
TOL64 = 1e-10  # float64 against float64


def explicit_head(z: torch.Tensor, softcap: float | None, logit_scale: float | None) -> torch.Tensor:
    """The transform written out with differentiable torch ops (the reference)."""
    out = z if logit_scale is None else z * logit_scale
    if softcap is not None:
        out = torch.where(torch.isneginf(z), z, softcap * torch.tanh(out / softcap))
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def logits_case(
    seed: int, n: int = N, v: int = V, scale: float = 3.0, masked: bool = False, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    y = torch.randint(v - 3, (n,), generator=g)
    y[::4] = -100
    if masked:
        z[::2, v - 3 :] = -math.inf  # masked vocabulary in every other row
    return z.to(dtype), y


def loss_and_grad(fn, z: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = z.clone().requires_grad_(True)
    loss = fn(leaf)
    (grad,) = torch.autograd.grad((loss * up.to(loss.dtype)).sum(), leaf)
    return loss.detach(), grad


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize("name", ["softcap", "logit_scale"])
@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan, "big", True])
def test_bad_transform_arguments_raise(name, bad):
    from properlm import LinearScoringRuleLoss, ScoringRuleLoss, fused_linear_scoring_rule_loss, scoring_rule_loss

    z, y = logits_case(0)
    w = torch.randn(V, H, dtype=torch.float64)
    h = torch.randn(N, H, dtype=torch.float64)
    for call in (
        lambda: scoring_rule_loss(z, y, "brier", **{name: bad}),
        lambda: fused_linear_scoring_rule_loss(h, w, y, "brier", **{name: bad}),
        lambda: ScoringRuleLoss("brier", **{name: bad}),
        lambda: LinearScoringRuleLoss("brier", **{name: bad}),
    ):
        with pytest.raises(ValueError, match=f"{name} must be None or a finite number > 0"):
            call()


def test_module_forms_carry_the_transform():
    from properlm import LinearScoringRuleLoss, ScoringRuleLoss, fused_linear_scoring_rule_loss, scoring_rule_loss

    z, y = logits_case(1)
    crit = ScoringRuleLoss("spherical", 0.1, softcap=2, logit_scale=0.5)
    assert "softcap=2.0, logit_scale=0.5" in repr(crit)
    assert "softcap" not in repr(ScoringRuleLoss("spherical"))
    torch.testing.assert_close(crit(z, y), scoring_rule_loss(z, y, "spherical", 0.1, softcap=2.0, logit_scale=0.5))
    h, w = torch.randn(N, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64)
    lin = LinearScoringRuleLoss("brier", softcap=4.0)
    assert "softcap=4.0" in repr(lin)
    torch.testing.assert_close(lin(h, w, y), fused_linear_scoring_rule_loss(h, w, y, "brier", softcap=4.0))


# ---------------------------------------------------------------------- unfused


@pytest.mark.parametrize("rule", RULES)
def test_unfused_equals_loss_of_transformed_logits(rule, monkeypatch):
    """float64: to 1e-10 of the float64 reference; float32 and bfloat16 inputs (upcast copies of
    each block) to float32 rounding; several row blocks (small BLOCK_ELEMENTS), ignored rows."""
    import properlm.options as pl_loss
    from properlm import scoring_rule_loss
    from reference import naive_loss

    monkeypatch.setattr(pl_loss, "BLOCK_ELEMENTS", 3 * V)  # blocks of 3 rows
    for i, (cap, scale) in enumerate(HEADS):
        for eps in (0.0, 0.1):
            z, y = logits_case(10 + i)
            up = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
            ref = loss_and_grad(
                lambda t, y=y, c=cap, s=scale, e=eps: naive_loss(explicit_head(t, c, s), y, rule, e, reduction="none"),
                z,
                up,
            )

            def got(t, y=y, cap=cap, scale=scale, eps=eps):
                return scoring_rule_loss(t, y, rule, eps, reduction="none", softcap=cap, logit_scale=scale)

            for dtype, tol in ((torch.float64, TOL64), (torch.float32, TOL32)):
                loss, grad = loss_and_grad(got, z.to(dtype), up)
                assert rel_err(loss, ref[0]) <= tol and rel_err(grad, ref[1]) <= tol, (dtype, cap, scale, eps)
            # bfloat16 logits: the same as the float32 loss of the same (rounded) logits
            zb = z.to(torch.bfloat16)
            lb, gb = loss_and_grad(got, zb, up)
            l32, g32 = loss_and_grad(got, zb.float(), up)
            assert gb.dtype == torch.bfloat16
            assert rel_err(lb, l32) <= TOL32 and rel_err(gb, g32) <= 1e-2  # gradient stored in bfloat16


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_unfused_reductions_and_num_items(reduction):
    from properlm import scoring_rule_loss

    z, y = logits_case(3)
    kw = {"rule": "brier", "smoothing": 0.1, "reduction": reduction}
    if reduction == "mean":
        kw["num_items_in_batch"] = 17
    up = torch.ones(()) if reduction != "none" else torch.randn(N, dtype=torch.float64)
    ref = loss_and_grad(lambda t: scoring_rule_loss(explicit_head(t, 2.0, 1.5), y, **kw), z, up)
    got = loss_and_grad(lambda t: scoring_rule_loss(t, y, softcap=2.0, logit_scale=1.5, **kw), z, up)
    assert rel_err(got[0], ref[0]) <= TOL64 and rel_err(got[1], ref[1]) <= TOL64


def test_saturated_logits_stay_finite_and_exact():
    """Logits far beyond the cap (|z| ~ 1e3, c = 5): tanh saturates, the chain factor underflows to 0;
    value and gradient still equal the float64 reference, nothing is NaN."""
    from properlm import fused_linear_scoring_rule_loss, scoring_rule_loss

    z, y = logits_case(4, scale=400.0)
    up = torch.randn(N, dtype=torch.float64)
    for rule in RULES:
        ref = loss_and_grad(
            lambda t, r=rule: scoring_rule_loss(explicit_head(t, 5.0, None), y, r, 0.1, reduction="none"), z, up
        )
        got = loss_and_grad(
            lambda t, r=rule: scoring_rule_loss(t.float(), y, r, 0.1, reduction="none", softcap=5.0), z, up
        )
        assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
        assert rel_err(got[0], ref[0]) <= TOL32 and rel_err(got[1], ref[1]) <= TOL32, rule
    # the same through the fused loss (an identity weight makes the logits z itself)
    h, w = z.float(), torch.eye(V)
    loss = fused_linear_scoring_rule_loss(h, w, y, "spherical", smoothing=0.1, softcap=5.0, reduction="none")
    ref = scoring_rule_loss(explicit_head(z, 5.0, None), y, "spherical", 0.1, reduction="none")
    assert rel_err(loss, ref) <= TOL32


@pytest.mark.parametrize("rule", ["logarithmic", "brier", "power:3"])
def test_masked_vocabulary_stays_masked(rule):
    """Rows with -inf logits: the loss equals that of the finite columns alone (so V counts only the
    finite logits, and the masked entries take no part in the smoothing terms), the gradient there is
    exactly 0, and everything is finite -- for the unfused and the fused loss."""
    from properlm import fused_linear_scoring_rule_loss, scoring_rule_loss

    z, y = logits_case(5, masked=True)
    y[::2] = y[::2].clamp(max=V - 4)
    up = torch.randn(N, dtype=torch.float64)
    for cap, scale in HEADS:
        kw = {"rule": rule, "smoothing": 0.1, "reduction": "none", "softcap": cap, "logit_scale": scale}
        loss, grad = loss_and_grad(lambda t, kw=kw: scoring_rule_loss(t, y, **kw), z, up)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        assert (grad[::2, V - 3 :] == 0).all()
        masked_rows = torch.arange(N) % 2 == 0
        sub = scoring_rule_loss(z[masked_rows, : V - 3], y[masked_rows], **kw)
        assert rel_err(loss[masked_rows], sub) <= TOL64
        ref = loss_and_grad(
            lambda t, c=cap, s=scale: scoring_rule_loss(explicit_head(t, c, s), y, rule, 0.1, reduction="none"), z, up
        )
        assert rel_err(loss, ref[0]) <= TOL64 and rel_err(grad, ref[1].nan_to_num(0.0)) <= TOL64
        # fused: the -inf comes from the bias
        g = torch.Generator().manual_seed(6)
        h = torch.randn(N, H, generator=g, dtype=torch.float64)
        w = torch.randn(V, H, generator=g, dtype=torch.float64)
        b = torch.randn(V, generator=g, dtype=torch.float64)
        b[V - 3 :] = -math.inf
        fused = fused_linear_scoring_rule_loss(h, w, y, bias=b, chunk_size=4, **kw)
        assert torch.isfinite(fused).all()
        assert rel_err(fused, scoring_rule_loss(F.linear(h, w[: V - 3], b[: V - 3]), y, **kw)) <= TOL64


# ---------------------------------------------------------------------- fused chunked


def fused_case(seed: int, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 7, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * (2.0 / H**0.5)
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(V, (2, 7), generator=g)
    y[0, -2:] = -100
    return h, w, b, y


def run_linear(fn, h, w, b, y, dtype, up):
    leaves = [t.to(dtype).clone().requires_grad_(True) for t in (h, w) + ((b,) if b is not None else ())]
    loss = fn(leaves[0], leaves[1], leaves[2] if b is not None else None, y)
    grads = torch.autograd.grad((loss * up.to(loss.dtype)).sum(), leaves)
    return [loss.detach(), *grads]


@pytest.mark.slow
@pytest.mark.parametrize("rule", RULES)
def test_fused_chunked_equals_unfused_transformed(rule, monkeypatch):
    """Several chunks (5 rows) of several row blocks each (SUB_ELEMENTS = 2 rows); with reduction
    ``none`` the backward recomputes each chunk's logits (no cache), with ``mean`` the gradient is
    formed in the forward from the cached transformed logits."""
    from properlm import fused_linear_scoring_rule_loss, scoring_rule_loss
    from properlm.fused.chunked import TorchChunkBackend

    monkeypatch.setattr(TorchChunkBackend, "SUB_ELEMENTS", 2 * V)
    for i, (cap, scale) in enumerate(HEADS):
        for eps, reduction in ((0.0, "mean"), (0.1, "none"), (0.1, "sum")):
            h, w, b, y = fused_case(20 + i, bias=i != 0)
            up = torch.randn(2, 7, dtype=torch.float64) if reduction == "none" else torch.tensor(1.7)
            kw = {"rule": rule, "smoothing": eps, "reduction": reduction}

            def ref_fn(hh, ww, bb, yy, kw=kw, cap=cap, scale=scale):
                return scoring_rule_loss(explicit_head(F.linear(hh, ww, bb), cap, scale), yy, **kw)

            def got_fn(hh, ww, bb, yy, kw=kw, cap=cap, scale=scale):
                return fused_linear_scoring_rule_loss(
                    hh, ww, yy, bias=bb, chunk_size=5, impl="torch", softcap=cap, logit_scale=scale, **kw
                )

            ref = run_linear(ref_fn, h, w, b, y, torch.float64, up)
            for dtype, tol in ((torch.float64, TOL64), (torch.float32, TOL32)):
                got = run_linear(got_fn, h, w, b, y, dtype, up)
                errs = [rel_err(a, r) for a, r in zip(got, ref)]
                assert max(errs) <= tol, (dtype, cap, scale, eps, reduction, errs)


def test_traceable_form_agrees_with_eager():
    """The traceable per-token loss that ``torch.compile`` routes to (properlm.compiled) takes the same
    keywords and gives the same value and gradient as the eager paths (without compiling here)."""
    from properlm import get_rule, scoring_rule_loss
    from properlm.compiled import fused_token_losses, token_losses
    from properlm.options import LossOptions

    z, y = logits_case(7, masked=True)
    y[::2] = y[::2].clamp(max=V - 4)
    up = torch.randn(N, dtype=torch.float64)
    spec = get_rule("brier")
    eager = loss_and_grad(
        lambda t: scoring_rule_loss(t, y, spec, 0.1, reduction="none", softcap=2.0, logit_scale=1.5), z, up
    )
    traced = loss_and_grad(lambda t: token_losses(t, y, LossOptions(spec, 0.1, softcap=2.0, logit_scale=1.5)), z, up)
    assert rel_err(traced[0], eager[0]) <= TOL64 and rel_err(traced[1].nan_to_num(0.0), eager[1]) <= TOL64
    h, w, b, yy = fused_case(8)
    fused = fused_token_losses(
        h.reshape(-1, H), w, b, yy.reshape(-1), LossOptions(spec, 0.1, softcap=2.0, logit_scale=1.5), 4
    )
    ref = scoring_rule_loss(F.linear(h, w, b), yy, spec, 0.1, reduction="none", softcap=2.0, logit_scale=1.5)
    assert rel_err(fused, ref.reshape(-1)) <= TOL64


# ---------------------------------------------------------------------- Triton (interpreter)


def _triton_worker() -> dict[str, float]:
    """Every Triton comparison (float32 kernels against the float64 reference); run under
    ``TRITON_INTERPRET=1``, with the smallest tiles so that every kernel loops over several tiles."""
    from properlm import fused_linear_scoring_rule_loss, scoring_rule_loss
    from properlm.fused import triton_kernels

    triton_kernels.BLOCK_N = triton_kernels.BLOCK_V = triton_kernels.BLOCK_H = 16
    out: dict[str, float] = {}
    n, hs, vs = 21, 20, 40
    cases = [
        ("logarithmic", 0.1, None, 2.5),
        ("brier", 0.1, 3.0, None),
        ("spherical", 0.0, 2.0, 0.7),
        ("power:3", 0.1, 2.0, 0.7),
        ("pseudo-spherical:1.5", 0.1, 4.0, None),
    ]
    for i, (rule, eps, cap, scale) in enumerate(cases):
        for masked in (False, True):
            g = torch.Generator().manual_seed(100 + i)
            h = torch.randn(n, hs, generator=g, dtype=torch.float64)
            w = torch.randn(vs, hs, generator=g, dtype=torch.float64) * (3.0 / hs**0.5)
            b = torch.randn(vs, generator=g, dtype=torch.float64)
            if masked:
                b[vs - 3 :] = -math.inf
            y = torch.randint(vs - 3, (n,), generator=g)
            y[::5] = -100
            up = torch.randn(n, dtype=torch.float64, generator=g)
            kw = {"rule": rule, "smoothing": eps, "reduction": "none", "softcap": cap, "logit_scale": scale}

            def ref_fn(hh, ww, bb, yy, kw=kw):
                return scoring_rule_loss(F.linear(hh, ww, bb), yy, **kw)

            def got_fn(hh, ww, bb, yy, kw=kw):
                return fused_linear_scoring_rule_loss(hh, ww, yy, bias=bb, impl="triton", chunk_size=8, **kw)

            ref = run_linear(ref_fn, h, w, b, y, torch.float64, up)
            got = run_linear(got_fn, h, w, b, y, torch.float32, up)
            key = f"{rule}|softcap={cap}|logit_scale={scale}|masked={masked}"
            for name, a, r in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, ref):
                if name == "grad_bias":  # the bias of a -inf logit: compare the finite part
                    a, r = a[: vs - 3], r[: vs - 3]
                out[f"{key}|{name}"] = rel_err(a, r) if torch.isfinite(a).all() else math.inf
    return out


@pytest.mark.slow
def test_triton_kernels_apply_the_transform():
    pytest.importorskip("triton", reason="triton is an optional dependency (pip install properlm[triton])")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TRITON_INTERPRET="1",
        PYTHONPATH=src
        + os.pathsep
        + str(Path(__file__).resolve().parent)
        + os.pathsep
        + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "triton"], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    errs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(errs) == 5 * 2 * 4
    bad = {k: v for k, v in errs.items() if not v <= TOL32}
    assert not bad, bad


@pytest.mark.slow
def test_triton_tanh_matches_torch():
    """The kernels' float32 tanh (built from exp: the interpreter has no libdevice) to a few ulps."""
    pytest.importorskip("triton")
    code = (
        "import torch, triton, triton.language as tl\n"
        "from properlm.fused.triton_kernels import tanh_from_exp\n"
        "@triton.jit\n"
        "def k(x_ptr, y_ptr, N: tl.constexpr):\n"
        "    o = tl.arange(0, N)\n"
        "    tl.store(y_ptr + o, tanh_from_exp(tl.load(x_ptr + o)))\n"
        "x = torch.cat([torch.linspace(-12, 12, 2037), torch.tensor([-float('inf'), float('inf'), 0.0, 1e-30,"
        " -1e-8, 0.29999, 0.30001, -0.3, 5e-4, 20.0, -100.0])]).float()\n"
        "y = torch.empty_like(x)\n"
        "k[(1,)](x, y, N=x.numel())\n"
        "ref = torch.tanh(x.double())\n"
        "nz = ref != 0\n"
        "print(float(((y.double() - ref).abs()[nz] / ref.abs()[nz]).max()), bool((y[ref == 0] == 0).all()))\n"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TRITON_INTERPRET="1",
        PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    worst, zeros = proc.stdout.split()
    assert float(worst) <= 4 * 2.0**-24 and zeros == "True"


# ---------------------------------------------------------------------- vocabulary parallel


def _dist_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from properlm import scoring_rule_loss
    from properlm.distributed import fused_linear_vocab_parallel_scoring_rule_loss, vocab_parallel_scoring_rule_loss

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    sizes = (17, 23)  # uneven shards
    start = sum(sizes[:rank])
    sl = slice(start, start + sizes[rank])
    failures: list[str] = []
    try:
        for i, (rule, eps, cap, scale) in enumerate(
            [("brier", 0.1, 2.0, 1.5), ("logarithmic", 0.1, 3.0, None), ("spherical", 0.0, None, 2.5)]
        ):
            z, y = logits_case(30 + i, masked=True)  # the -inf columns lie in the second shard
            y[::2] = y[::2].clamp(max=V - 4)
            up = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
            kw = {"rule": rule, "smoothing": eps, "reduction": "none", "softcap": cap, "logit_scale": scale}
            ref_loss, ref_grad = loss_and_grad(lambda t, y=y, kw=kw: scoring_rule_loss(t, y, **kw), z, up)
            for dtype, tol in ((torch.float64, TOL64), (torch.float32, TOL32)):
                loss, grad = loss_and_grad(
                    lambda t, y=y, kw=kw: vocab_parallel_scoring_rule_loss(t, y, **kw), z[:, sl].to(dtype), up
                )
                errs = (rel_err(loss, ref_loss), rel_err(grad, ref_grad[:, sl]))
                if not max(errs) <= tol:
                    failures.append(f"unfused {rule} {dtype} {errs}")
            # fused: replicated hidden, each rank its rows of the weight
            h, w, b, yy = fused_case(40 + i)
            b[V - 3 :] = -math.inf
            yy = yy.clamp(max=V - 4)
            # (seeded: the same on every rank; the global generators of the ranks differ)
            up2 = torch.randn(2, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(60 + i))
            fkw = dict(kw)
            ref = run_linear(
                lambda hh, ww, bb, t, fkw=fkw: scoring_rule_loss(F.linear(hh, ww, bb), t, **fkw),
                h,
                w,
                b,
                yy,
                torch.float64,
                up2,
            )
            got = run_linear(
                lambda hh, ww, bb, t, fkw=fkw: fused_linear_vocab_parallel_scoring_rule_loss(
                    hh, ww, t, bias=bb, chunk_size=5, **fkw
                ),
                h,
                w[sl],
                b[sl],
                yy,
                torch.float64,
                up2,
            )
            refs = [ref[0], ref[1], ref[2][sl], ref[3][sl]]
            errs = [rel_err(a.nan_to_num(0.0), r.nan_to_num(0.0)) for a, r in zip(got, refs)]
            if not max(errs) <= TOL64:
                failures.append(f"fused {rule} {errs}")
        # the ranks must agree on the transform
        try:
            z, y = logits_case(50)
            vocab_parallel_scoring_rule_loss(z[:, sl], y, "brier", softcap=2.0 if rank == 0 else 3.0)
            failures.append("no error for different softcaps")
        except ValueError as exc:
            if "softcap" not in str(exc):
                failures.append(f"unclear error: {exc}")
        dist.barrier()
    except Exception:
        failures.append(f"rank {rank}: " + traceback.format_exc())
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(failures))
        dist.destroy_process_group()


@pytest.mark.slow
def test_vocab_parallel_transform(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    failures = [f for r in range(2) for f in json.loads((tmp_path / f"rank{r}.json").read_text())]
    assert not failures, failures


# ---------------------------------------------------------------------- apply_scoring_rule

HF_V = 256


def tiny_hf(kind: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = {
        "vocab_size": HF_V,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
    }
    if kind == "gemma2":
        model = transformers.Gemma2ForCausalLM(
            transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=2.0)
        )
    elif kind == "gemma3":
        model = transformers.Gemma3ForCausalLM(
            transformers.Gemma3TextConfig(**common, head_dim=8, final_logit_softcapping=2.0)
        )
    elif kind == "cohere":
        model = transformers.CohereForCausalLM(
            transformers.CohereConfig(**common, logit_scale=4.0, eos_token_id=2, bos_token_id=1)
        )
    elif kind == "granite":  # Granite divides the logits by logits_scaling
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(**common, logits_scaling=0.25))
    elif kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:  # pragma: no cover
        raise ValueError(kind)
    with torch.no_grad():  # logits of a few units, so that the cap and the scale change the loss clearly
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


def hf_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, HF_V, (2, 9), generator=g)
    labels = ids.clone()
    labels[0, -2:] = -100
    return ids, labels


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


EXPECTED_HEAD = {"gemma2": (2.0, None), "gemma3": (2.0, None), "cohere": (None, 4.0), "granite": (None, 4.0)}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "cohere", "granite"])
def test_apply_scoring_rule_fuses_transformed_heads(kind):
    """Patched (fused) loss = the model's own logits scored with scoring_rule_loss (and = the model's
    own cross-entropy for logarithmic); the gradients of every parameter equal; no warning; the fused
    path really ran (empty logits); and the transform matters (without it the loss differs)."""
    from properlm.integrations.transformers import apply_scoring_rule

    model = tiny_hf(kind)
    ids, labels = hf_batch()
    for rule, eps in (("logarithmic", 0.0), ("brier", 0.1)):
        model.zero_grad()
        own = model(input_ids=ids, labels=labels)
        ref = scoring_rule_loss_of(own.logits, labels, rule, eps)
        if rule == "logarithmic":
            torch.testing.assert_close(ref, own.loss, rtol=1e-5, atol=1e-6)
        ref.backward()
        ref_grads = grads_of(model)
        model.zero_grad()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            handle = apply_scoring_rule(model, rule, eps)
            out = model(input_ids=ids, labels=labels)
            out.loss.backward()
        assert not [w for w in caught if "properlm" in w.filename or "fused" in str(w.message)], [
            str(w.message) for w in caught
        ]
        assert handle.fused and (handle.softcap, handle.logit_scale) == EXPECTED_HEAD[kind]
        assert out.logits.shape[1] == 0  # fused: no logits were formed
        torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
        got = grads_of(model)
        assert got.keys() == ref_grads.keys()
        for name in got:
            torch.testing.assert_close(got[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
        # the transform is not a no-op on this model
        handle._state.softcap = handle._state.logit_scale = None
        with torch.no_grad():
            plain = model(input_ids=ids, labels=labels).loss
        assert abs(float(plain) - float(ref.detach())) > 1e-2 * float(ref.detach())
        handle.remove()


def scoring_rule_loss_of(logits, labels, rule, eps):
    from properlm import scoring_rule_loss

    return scoring_rule_loss(logits[:, :-1], labels[:, 1:], rule, eps)


def test_config_attributes_the_model_does_not_read_are_ignored():
    """Llama's code never reads final_logit_softcapping: put into its config, it changes nothing in
    the model, so the fused loss must not apply it either."""
    from properlm.integrations.transformers import apply_scoring_rule

    model = tiny_hf("llama")
    model.config.final_logit_softcapping = 0.5
    model.config.logit_scale = 4.0
    ids, labels = hf_batch()
    with torch.no_grad():
        ref = scoring_rule_loss_of(model(input_ids=ids).logits, labels, "spherical", 0.1)
        with apply_scoring_rule(model, "spherical", 0.1) as handle:
            assert handle.fused and handle.softcap is None and handle.logit_scale is None
            torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, ref, rtol=1e-5, atol=1e-6)


def test_unexpressible_head_setting_is_refused():
    from properlm.integrations.transformers import apply_scoring_rule, is_scoring_rule_applied

    model = tiny_hf("gemma2")
    model.config.final_logit_softcapping = -1.0
    with pytest.raises(ValueError, match="final_logit_softcapping=-1.0.*fused=False"):
        apply_scoring_rule(model, "brier")
    assert not is_scoring_rule_applied(model)
    assert not apply_scoring_rule(model, "brier", fused=False).fused


def test_trl_metrics_see_the_transformed_logits():
    """TRL's entropy / top-1 fields are computed from the model's logits: with the head transform."""
    from properlm.integrations.transformers.trl_metrics import trl_output_fields

    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 5, H, generator=g)
    w = torch.randn(V, H, generator=g)
    y = torch.randint(V, (2, 5), generator=g)
    valid = torch.ones_like(y, dtype=torch.bool)
    m = trl_output_fields(x, y, valid, torch.zeros(2, 5), w, None, 0.5, 2.0)
    logp = torch.log_softmax(explicit_head(F.linear(x, w), 0.5, 2.0), -1)
    torch.testing.assert_close(m["entropy"], -(logp.exp() * logp).sum(-1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if sys.argv[1:] == ["triton"]:
        print(json.dumps(_triton_worker()))
