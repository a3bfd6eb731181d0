"""bfloat16 matrix products computed in float32 (``properlm.evaluation.precision.bf16_matmuls_in_float32``): the
values the bfloat16 instructions give, checked against float64 references of the rounded operands and against
autocast's own bfloat16 path, forward and backward, and the cache of the cast weights."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from properlm.evaluation import precision
from properlm.evaluation.precision import bf16_autocast_matmuls, bf16_matmuls_in_float32, mixed_precision

BF16 = torch.bfloat16


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bfloat16 units in the last place separate two bfloat16 tensors, elementwise (same-sign values)."""
    assert a.dtype == b.dtype == BF16
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


def _assert_rounded_from(out: torch.Tensor, exact: torch.Tensor, *, min_equal: float = 0.98) -> None:
    """``out`` (bfloat16) is the float64 ``exact`` rounded to bfloat16, up to one unit where the float32 sums land
    next to a rounding boundary."""
    assert out.dtype == BF16
    ref = exact.to(BF16)
    ulps = _ulps_apart(out, ref)
    assert ulps.max().item() <= 1, f"max {ulps.max().item()} bfloat16 units apart"
    assert (ulps == 0).float().mean().item() >= min_equal
    assert torch.isfinite(out.float()).all()


def _bf16(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float32).to(BF16)


CASES = {
    "mm": lambda: (torch.mm, (_bf16(33, 70), _bf16(70, 21))),
    "addmm": lambda: (torch.addmm, (_bf16(21), _bf16(33, 70), _bf16(70, 21))),
    "bmm": lambda: (torch.bmm, (_bf16(3, 17, 40), _bf16(3, 40, 9))),
    "baddbmm": lambda: (torch.baddbmm, (_bf16(3, 17, 9), _bf16(3, 17, 40), _bf16(3, 40, 9))),
    "addbmm": lambda: (torch.addbmm, (_bf16(17, 9), _bf16(3, 17, 40), _bf16(3, 40, 9))),
    "mv": lambda: (torch.mv, (_bf16(33, 70), _bf16(70))),
    "addmv": lambda: (torch.addmv, (_bf16(33), _bf16(33, 70), _bf16(70))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_product_is_the_float64_product_of_the_bfloat16_operands_rounded_once(name):
    torch.manual_seed(0)
    fn, args = CASES[name]()
    with bf16_matmuls_in_float32():
        out = fn(*args)
    exact = fn(*(a.double() for a in args))
    _assert_rounded_from(out, exact)


def test_the_products_match_autocasts_bfloat16_path_and_other_dtypes_are_untouched():
    torch.manual_seed(1)
    a, b = torch.randn(40, 96), torch.randn(96, 24)
    with torch.autocast("cpu", dtype=BF16):
        native = a @ b
        with bf16_matmuls_in_float32():
            ours = a @ b
    assert ours.dtype == native.dtype == BF16
    assert _ulps_apart(ours, native).max().item() <= 1
    with bf16_matmuls_in_float32():  # float32 operands: the float32 product, bit for bit
        assert torch.equal(a @ b, torch.mm(a, b))
        assert torch.equal((a.double() @ b.double()), torch.mm(a.double(), b.double()))


def test_linear_forward_and_backward_under_autocast_against_float64():
    """y = bf16(x W^T + b) and the gradients of L = sum(y^2 / 2): dL/dx = bf16(y W), dL/dW = bf16(y^T x), each from
    float64 products of the bfloat16 operands, rounded once."""
    torch.manual_seed(2)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(5, 7, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=BF16), bf16_matmuls_in_float32():
        y = lin(x)
        (y.float().square() / 2).sum().backward()
    xr, wr, br = (t.detach().to(BF16).double() for t in (x, lin.weight, lin.bias))
    _assert_rounded_from(y.detach(), xr @ wr.T + br)
    g = y.detach().double()
    grad_x = (g @ wr).to(BF16).float()  # autocast's cast back to the parameter's / input's float32
    grad_w = (g.reshape(-1, 48).T @ xr.reshape(-1, 64)).to(BF16).float()
    assert x.grad.dtype == lin.weight.grad.dtype == torch.float32
    assert _ulps_apart(x.grad.to(BF16), grad_x.to(BF16)).max().item() <= 1
    assert _ulps_apart(lin.weight.grad.to(BF16), grad_w.to(BF16)).max().item() <= 1


def test_attention_outputs_keep_their_dtypes_and_the_exact_values():
    """The CPU flash-attention kernel runs in float32 on the bfloat16 inputs: its output is bfloat16 (rounded once
    from the exact attention of the rounded inputs), its log-sum-exp float32, its gradients bfloat16."""
    torch.manual_seed(3)
    q, k, v = (_bf16(2, 3, 11, 16).requires_grad_() for _ in range(3))
    with bf16_matmuls_in_float32():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o.float().sum().backward()
    assert o.dtype == BF16 and q.grad.dtype == k.grad.dtype == v.grad.dtype == BF16
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask = torch.ones(11, 11, dtype=torch.bool).tril()
    w = (qd @ kd.transpose(-1, -2) / 4.0).masked_fill(~mask, float("-inf")).softmax(-1)
    exact = w @ vd
    _assert_rounded_from(o.detach(), exact.detach(), min_equal=0.9)
    exact.sum().backward()
    for ours, ref in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        assert (ours.double() - ref).abs().max().item() <= 2**-7 * ref.abs().max().item()
    lse_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    with bf16_matmuls_in_float32():
        out, lse = lse_op(q.detach(), k.detach(), v.detach(), is_causal=True)
    assert out.dtype == BF16 and lse.dtype == torch.float32


def test_cast_weights_are_copied_once_per_block_and_forgotten_after_it():
    """Decoding: every step multiplies by new transposed views of the same cast weights; the float32 copies are
    made once per block (one per weight), reused, and dropped with autocast's cache when the block ends."""
    torch.manual_seed(4)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    mode = bf16_matmuls_in_float32()
    copies = []
    real = torch.Tensor.float

    def counting_float(t):
        copies.append(tuple(t.shape))
        return real(t)

    x = torch.randn(4, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16), mode:
        torch.Tensor.float = counting_float
        try:
            outs = [net(x) for _ in range(5)]
        finally:
            torch.Tensor.float = real
        assert len(mode.upcasts) == 2
    weights = [c for c in copies if c in ((32, 16), (8, 32))]
    assert sorted(weights) == [(8, 32), (32, 16)], copies
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert len(mode.upcasts) == 0
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16), mode:  # the same context, entered again
        assert torch.equal(net(x), outs[0])


def test_a_cached_weight_changed_in_place_is_copied_again():
    w = _bf16(8, 8)
    x = _bf16(3, 8)
    with bf16_matmuls_in_float32():
        before = x @ w
        w.mul_(2)
        after = x @ w
    assert torch.equal(after, (before.float() * 2).to(BF16))


def test_the_float32_mode_is_used_only_where_the_cpu_lacks_native_bfloat16(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert isinstance(bf16_autocast_matmuls("cpu"), contextlib.nullcontext)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert isinstance(bf16_autocast_matmuls("cpu"), precision._Bf16MatmulsInFloat32)
    assert isinstance(bf16_autocast_matmuls(torch.device("meta")), contextlib.nullcontext)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with mixed_precision(model):
        modes = torch.utils._python_dispatch._get_current_dispatch_mode_stack()
        assert any(isinstance(m, precision._Bf16MatmulsInFloat32) for m in modes)
    assert not torch.utils._python_dispatch._get_current_dispatch_mode_stack()
