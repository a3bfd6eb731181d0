"""The fused linear + scoring-rule loss (chunked PyTorch path) against scoring_rule_loss on
materialised logits: values and gradients of hidden, weight and bias."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

import properlm
from properlm import scoring_rule_loss
from properlm.fused import LinearScoringRuleLoss, default_chunk_size, fused_linear_scoring_rule_loss
from properlm.fused.chunked import TorchChunkBackend
from properlm.options import MAX_CHUNK_ROWS, MIN_CHUNK_ROWS
from reference import RULES, naive_loss, rel_err

N, H, V = 29, 12, 41


def _data(n=N, h=H, v=V, seed=0, scale=1.0, ignore_frac=0.2, bias=True, lead=None):
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if lead is None else lead
    hidden = torch.randn(*shape, h, generator=g, dtype=torch.float64) * scale
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * (2.0 / h**0.5)
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    target = torch.randint(v, shape, generator=g)
    target[torch.rand(shape, generator=g) < ignore_frac] = -100
    return hidden, weight, b, target


def _leaves(hidden, weight, bias, dtype):
    out = [t.detach().to(dtype).clone().requires_grad_(True) for t in (hidden, weight)]
    out.append(None if bias is None else bias.detach().to(dtype).clone().requires_grad_(True))
    return out


def _run(fn, hidden, weight, bias, target, dtype, w, **kw):
    """Loss and gradients (hidden, weight[, bias]) of ``sum(w * loss)``."""
    h, W, b = _leaves(hidden, weight, bias, dtype)
    loss = fn(h, W, b, target, **kw)
    wt = w.to(loss.dtype) if loss.dim() else w.sum().to(loss.dtype)
    grads = torch.autograd.grad((loss * wt).sum(), [t for t in (h, W, b) if t is not None])
    return loss.detach(), grads


def _fused(h, W, b, target, **kw):
    return fused_linear_scoring_rule_loss(h, W, target, bias=b, **kw)


def _unfused(h, W, b, target, chunk_size=None, **kw):
    return scoring_rule_loss(F.linear(h, W, b), target, **kw)  # what an nn.Linear lm_head gives


def _upstream(target, reduction, seed=5):
    if reduction == "none":
        return torch.randn(target.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.tensor(1.7, dtype=torch.float64)  # a non-unit scalar grad_output


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_unfused(rule, smoothing, reduction, bias):
    hidden, weight, b, target = _data(seed=zlib.crc32(f"{rule}{smoothing}{reduction}{bias}".encode()) % 1000, bias=bias)
    w = _upstream(target, reduction)
    kw = {"rule": rule, "smoothing": smoothing, "reduction": reduction}
    ref32, ref32_grads = _run(_unfused, hidden, weight, b, target, torch.float32, w, **kw)
    ref64, ref64_grads = _run(_unfused, hidden, weight, b, target, torch.float64, w, **kw)
    for chunk_size in (None, 1, 4, 7, 64):  # 4 and 7 do not divide the 23-odd valid rows
        loss, grads = _run(_fused, hidden, weight, b, target, torch.float32, w, chunk_size=chunk_size, **kw)
        assert loss.dtype == torch.float32 and loss.shape == ref32.shape
        assert rel_err(loss, ref32) <= 1e-5, (chunk_size, "loss vs float32")
        assert rel_err(loss, ref64) <= 1e-5, (chunk_size, "loss vs float64")
        assert len(grads) == len(ref32_grads)
        for name, g, r32, r64 in zip(("hidden", "weight", "bias"), grads, ref32_grads, ref64_grads):
            assert g.dtype == torch.float32 and g.shape == r32.shape
            assert rel_err(g, r32) <= 1e-5, (chunk_size, name, "vs float32")
            assert rel_err(g, r64) <= 1e-5, (chunk_size, name, "vs float64")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_float64_is_exact_and_matches_naive_reference(rule, smoothing):
    hidden, weight, b, target = _data(seed=11)
    w = _upstream(target, "none")
    loss, grads = _run(
        _fused,
        hidden,
        weight,
        b,
        target,
        torch.float64,
        w,
        rule=rule,
        smoothing=smoothing,
        reduction="none",
        chunk_size=5,
    )
    assert loss.dtype == torch.float64

    def naive(h, W, b_, t, **kw):
        return naive_loss(h @ W.T + b_, t, rule, smoothing, reduction="none")

    ref, ref_grads = _run(naive, hidden, weight, b, target, torch.float64, w)
    assert rel_err(loss, ref) < 1e-11
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-10


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_row_blocks_and_masked_vocabulary(rule, reduction, monkeypatch):
    """Elementwise work in blocks of 2 rows (as on the CPU at scale), -inf logits through the bias."""
    monkeypatch.setattr(TorchChunkBackend, "SUB_ELEMENTS", 2 * V)
    hidden, weight, b, target = _data(seed=21)
    b[-4:] = -float("inf")  # vocabulary entries with probability 0
    target = torch.where(target >= V - 4, 0, target)
    w = _upstream(target, reduction)
    kw = {"rule": rule, "smoothing": 0.1, "reduction": reduction}
    loss, grads = _run(_fused, hidden, weight, b, target, torch.float32, w, chunk_size=9, **kw)
    ref, ref_grads = _run(_unfused, hidden, weight, b, target, torch.float64, w, **kw)
    assert rel_err(loss, ref) <= 1e-5
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert bool(torch.isfinite(g).all()), name
        assert rel_err(g, r) <= 1e-5, name
    assert bool((grads[2][-4:] == 0).all())


def test_leading_dimensions_and_reduction_none_shape():
    hidden, weight, b, target = _data(lead=(3, 7))
    out = fused_linear_scoring_rule_loss(
        hidden.float(), weight.float(), target, "brier", bias=b.float(), reduction="none", chunk_size=4
    )
    ref = scoring_rule_loss(hidden.float() @ weight.float().T + b.float(), target, "brier", reduction="none")
    assert out.shape == target.shape == (3, 7)
    assert bool((out[target == -100] == 0).all())
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("num_items", [17, torch.tensor(17)])
def test_num_items_in_batch(num_items):
    hidden, weight, b, target = _data(seed=3)
    w = torch.tensor(1.0, dtype=torch.float64)
    kw = {"rule": "spherical", "smoothing": 0.1, "num_items_in_batch": num_items}
    loss, grads = _run(_fused, hidden, weight, b, target, torch.float32, w, chunk_size=6, **kw)
    ref, ref_grads = _run(_unfused, hidden, weight, b, target, torch.float32, w, **kw)
    assert rel_err(loss, ref) <= 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 1e-5
    total, _ = _run(
        _fused, hidden, weight, b, target, torch.float32, w, rule="spherical", smoothing=0.1, reduction="sum"
    )
    assert rel_err(loss, total / 17) <= 1e-6


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_zero_grads(reduction):
    hidden, weight, b, target = _data(seed=4)
    target = torch.full_like(target, -100)
    h, W, bb = _leaves(hidden, weight, b, torch.float32)
    loss = fused_linear_scoring_rule_loss(h, W, target, "power:3", bias=bb, smoothing=0.1, reduction=reduction)
    assert bool((loss == 0).all())
    loss.sum().backward()
    for t in (h, W, bb):
        assert t.grad is not None and bool((t.grad == 0).all())


def test_only_some_inputs_require_grad():
    hidden, weight, b, target = _data(seed=6)
    h = hidden.float().requires_grad_(True)
    W, bb = weight.float(), b.float()
    loss = fused_linear_scoring_rule_loss(h, W, target, "brier", bias=bb, smoothing=0.1)
    (g,) = torch.autograd.grad(loss, h)
    h2 = hidden.float().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(scoring_rule_loss(h2 @ W.T + bb, target, "brier", smoothing=0.1), h2)
    assert rel_err(g, g_ref) <= 1e-5
    with torch.no_grad():
        value = fused_linear_scoring_rule_loss(hidden.float(), W, target, "brier", bias=bb, smoothing=0.1)
    assert rel_err(value, loss) <= 1e-6


@pytest.mark.parametrize("rule", ["logarithmic", "brier", "spherical", "power:3", "pseudo-spherical:1.5"])
def test_bfloat16_no_worse_than_unfused_bfloat16(rule):
    """Against the float64 result for the same (bfloat16) inputs, the fused bf16 error is at most
    1.25x the unfused bf16 error (norm-wise over 256 per-token losses and every gradient entry,
    so that the comparison measures the method rather than the luck of one rounding)."""

    def rel(a, b):
        a, b = a.double(), b.double()
        return float((a - b).norm() / b.norm())

    hidden, weight, b, target = _data(n=256, h=32, v=97, seed=8, bias=True)
    # the exact (float64) result for the bfloat16 inputs: what both paths try to compute
    hidden, weight, b = (t.to(torch.bfloat16).double() for t in (hidden, weight, b))
    w = _upstream(target, "none")
    kw = {"rule": rule, "smoothing": 0.1, "reduction": "none"}
    ref, ref_grads = _run(_unfused, hidden, weight, b, target, torch.float64, w, **kw)
    un, un_grads = _run(_unfused, hidden, weight, b, target, torch.bfloat16, w, **kw)
    fu, fu_grads = _run(_fused, hidden, weight, b, target, torch.bfloat16, w, chunk_size=10, **kw)
    assert [g.dtype for g in fu_grads] == [torch.bfloat16] * 3
    assert rel(fu, ref) <= 1.25 * rel(un, ref)
    for name, f, u, r in zip(("hidden", "weight", "bias"), fu_grads, un_grads, ref_grads):
        assert rel(f, r) <= 1.25 * rel(u, r), name


@pytest.mark.parametrize("rule", ["brier", "spherical", "logarithmic"])
def test_large_hidden_values(rule):
    hidden, weight, b, target = _data(seed=9, scale=300.0)  # logits of order 1e3
    w = _upstream(target, "none")
    kw = {"rule": rule, "smoothing": 0.1, "reduction": "none"}
    loss, grads = _run(_fused, hidden, weight, b, target, torch.float32, w, chunk_size=8, **kw)
    ref, _ = _run(_unfused, hidden, weight, b, target, torch.float32, w, **kw)
    assert bool(torch.isfinite(loss).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
    assert rel_err(loss, ref) <= 1e-3  # float32 logits of size 1e3 carry absolute errors ~1e-4
    loss64, grads64 = _run(_fused, hidden, weight, b, target, torch.float64, w, chunk_size=8, **kw)
    ref64, ref_grads64 = _run(_unfused, hidden, weight, b, target, torch.float64, w, **kw)
    assert rel_err(loss64, ref64) <= 1e-10
    for g, r in zip(grads64, ref_grads64):
        assert rel_err(g, r) <= 1e-9


def test_module_matches_functional():
    hidden, weight, b, target = _data(seed=12)
    h, W, bb = hidden.float(), weight.float(), b.float()
    crit = LinearScoringRuleLoss("pseudo-spherical:1.5", smoothing=0.1, reduction="sum", chunk_size=3)
    assert "pseudo-spherical:1.5" in repr(crit) and "chunk_size=3" in repr(crit)
    out = crit(h, W, target, bias=bb)
    ref = fused_linear_scoring_rule_loss(h, W, target, "pseudo-spherical:1.5", bias=bb, smoothing=0.1, reduction="sum")
    assert rel_err(out, ref) <= 1e-6
    assert properlm.fused.fused_linear_scoring_rule_loss is fused_linear_scoring_rule_loss


def test_default_chunk_size():
    assert default_chunk_size(4096, 512, 32000) >= 4096 * 512 // 32000
    assert MIN_CHUNK_ROWS <= default_chunk_size(10**6, 4096, 128256) <= MAX_CHUNK_ROWS
    assert default_chunk_size(10**7, 4096, 100) == MAX_CHUNK_ROWS
    assert default_chunk_size(5, 512, 32000) == 5  # never more rows than tokens
    assert default_chunk_size(0, 16, 10) == 1
    # on a GPU: chunks of at least 2^28 logits (few passes over the float32 grad_W accumulator)
    assert default_chunk_size(8192, 4096, 128256, cuda=True) == -(-(1 << 28) // 128256)
    assert default_chunk_size(10**6, 4096, 32000, cuda=True) > MAX_CHUNK_ROWS
    assert default_chunk_size(100, 4096, 128256, cuda=True) == 100


def _bad_calls():
    h = torch.randn(4, 8)
    W = torch.randn(10, 8)
    y = torch.randint(10, (4,))
    yield "weight must be a 2-D", lambda: fused_linear_scoring_rule_loss(h, W[0], y)
    yield "hidden size 8", lambda: fused_linear_scoring_rule_loss(h, torch.randn(10, 9), y)
    yield "dtype mismatch", lambda: fused_linear_scoring_rule_loss(h, W.double(), y)
    yield "bias must be", lambda: fused_linear_scoring_rule_loss(h, W, y, bias=torch.randn(9))
    yield "dtype mismatch: bias", lambda: fused_linear_scoring_rule_loss(h, W, y, bias=torch.randn(10).double())
    yield "shape mismatch", lambda: fused_linear_scoring_rule_loss(h, W, y[:3])
    yield "outside", lambda: fused_linear_scoring_rule_loss(h, W, torch.tensor([0, 1, 10, 2]))
    yield "integer token ids", lambda: fused_linear_scoring_rule_loss(h, W, y.float())
    yield "floating-point", lambda: fused_linear_scoring_rule_loss(h.long(), W.long(), y)
    yield "chunk_size", lambda: fused_linear_scoring_rule_loss(h, W, y, chunk_size=0)
    yield "impl must be", lambda: fused_linear_scoring_rule_loss(h, W, y, impl="cuda")
    yield "smoothing", lambda: fused_linear_scoring_rule_loss(h, W, y, smoothing=1.5)
    yield "reduction", lambda: fused_linear_scoring_rule_loss(h, W, y, reduction="avg")
    yield "num_items_in_batch", lambda: fused_linear_scoring_rule_loss(h, W, y, num_items_in_batch=0)
    yield "unknown scoring rule", lambda: fused_linear_scoring_rule_loss(h, W, y, "hinge")
    yield "hidden must be a tensor", lambda: fused_linear_scoring_rule_loss([1.0], W, y)


@pytest.mark.parametrize("match,call", list(_bad_calls()), ids=[m for m, _ in _bad_calls()])
def test_bad_inputs_raise_value_error(match, call):
    with pytest.raises(ValueError, match=match):
        call()


def test_triton_forced_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    h, W, y = torch.randn(4, 8), torch.randn(10, 8), torch.randint(10, (4,))
    with pytest.raises(ValueError, match="triton"):
        fused_linear_scoring_rule_loss(h, W, y, impl="triton")
    # the automatic choice on CPU is the chunked torch path
    out = fused_linear_scoring_rule_loss(h, W, y)
    assert rel_err(out, scoring_rule_loss(h @ W.T, y)) <= 1e-5
