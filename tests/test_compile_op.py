"""The fused loss under torch.compile is one ``torch.library`` operator (``properlm::fused_linear_loss``).

It runs the eager chunked computation (values and gradients equal eager's to rounding), forms the gradients in
the forward pass (no matmul at all in the compiled backward graph of a reduced loss: the logits are not
recomputed), and traces without a graph break. Tiny shapes, ``aot_eager`` (dynamo + AOT autograd, what inductor
receives) except for one inductor compile.
"""

from __future__ import annotations

import math

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import properlm
from properlm.fused import loss as fused_loss
from properlm.fused.op import spec_names_rule
from reference import rel_err

TOL = 1e-6
N, H, V = 20, 8, 40

#: (rule, smoothing, variant, reduction, num_items_in_batch, head transform, bias)
CASES = [
    ("logarithmic", 0.0, "paper", "mean", None, {}, True),
    ("logarithmic", 0.1, "paper", "sum", None, {"softcap": 3.0}, False),
    ("brier", 0.1, "paper", "mean", 11, {}, True),
    ("brier", 0.1, "gated", "none", None, {"softcap": 3.0, "logit_scale": 0.7}, False),
    ("spherical", 0.1, "gated", "mean", "tensor", {"logit_scale": 0.7}, True),
    ("spherical", 0.0, "paper", "none", None, {}, True),
    ("0.5*logarithmic+0.5*spherical", 0.1, "paper", "mean", None, {"softcap": 3.0}, True),
    ("0.3*brier+0.7*pseudo-spherical:1.5", 0.1, "none", "sum", None, {}, False),
    ("power:3", 0.1, "paper", "none", None, {}, True),
    ("pseudo-spherical:1.5", 0.05, "gated", "mean", 13, {}, False),
]


def _data(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    h, w, b = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g), torch.randn(V, generator=g)
    y = torch.randint(V, (N,), generator=g)
    y[[1, 9, 17]] = -100
    return h, w, b, y


def _loss(case, h, w, b, y, n_items_tensor):
    rule, eps, variant, red, n_items, head, _ = case
    n_items = n_items_tensor if n_items == "tensor" else n_items
    return properlm.fused_linear_scoring_rule_loss(
        h,
        w,
        y,
        rule,
        bias=b,
        smoothing=eps,
        reduction=red,
        num_items_in_batch=n_items,
        chunk_size=8,
        smoothing_variant=variant,
        **head,
    )


def _run(fn, cases, backend="aot_eager", seed=0):
    """Values and gradients (hidden, weight, bias) of every case, eager and compiled (``fullgraph=True``)."""
    h0, w0, b0, y = _data(seed)
    n_items = torch.tensor(12)
    g = torch.Generator().manual_seed(seed + 1)
    upstream = [torch.rand(N, generator=g) if c[3] == "none" else torch.tensor(1.3) for c in cases]
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)):
        params = []
        for case in cases:
            params += [
                h0.clone().requires_grad_(),
                w0.clone().requires_grad_(),
                b0.clone().requires_grad_() if case[6] else None,
            ]
        outs = f(y, n_items, *params)
        sum((o * u).sum() for o, u in zip(outs, upstream)).backward()
        results.append(([o.detach() for o in outs], [None if p is None else p.grad for p in params]))
    return results


def _all_cases(y, n_items, *params):
    return tuple(_loss(case, *params[3 * i : 3 * i + 3], y, n_items) for i, case in enumerate(CASES))


def _assert_close(a, b, what, tol=TOL):
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.2e}"


@pytest.mark.slow
def test_compiled_op_equals_eager():
    """Every kind of rule (plain, alpha families, mixtures), smoothing and its variants, the head transforms,
    ignored targets, every reduction, num_items_in_batch (int and tensor), with and without bias, in one
    graph: values and gradients equal eager's to 1e-6."""
    (ev, eg), (cv, cg) = _run(_all_cases, CASES)
    for i, case in enumerate(CASES):
        _assert_close(cv[i], ev[i], f"loss {case}")
        for k, name in enumerate(("hidden", "weight", "bias")):
            if eg[3 * i + k] is not None:
                _assert_close(cg[3 * i + k], eg[3 * i + k], f"grad {name} {case}")
        assert torch.all(cg[3 * i][[1, 9, 17]] == 0)  # ignored rows get no gradient


@pytest.mark.slow
def test_compiled_op_inductor_equals_eager():
    """Inductor (code generated around the operator): a reduced and a per-token loss."""
    cases = [CASES[2], CASES[3]]

    def fn(y, n_items, *params):
        return tuple(_loss(c, *params[3 * i : 3 * i + 3], y, n_items) for i, c in enumerate(cases))

    # no cached graphs: the AOT autograd cache keys on the traced graph, which holds the operator only
    with torch._functorch.config.patch(enable_autograd_cache=False), torch._inductor.config.patch(fx_graph_cache=False):
        (ev, eg), (cv, cg) = _run(fn, cases, backend="inductor", seed=2)
    for i in range(len(cases)):
        _assert_close(cv[i], ev[i], f"loss {cases[i]}")
        for k in range(3):
            if eg[3 * i + k] is not None:
                _assert_close(cg[3 * i + k], eg[3 * i + k], f"grad {k} {cases[i]}")


def _op_counts(gm: torch.fx.GraphModule) -> dict[str, int]:
    counts = {"matmul": 0, "fused_linear_loss": 0, "fused_linear_loss_backward": 0, "largest input": 0}
    for node in gm.graph.nodes:
        if node.op == "placeholder" and isinstance(node.meta.get("val"), torch.Tensor):
            counts["largest input"] = max(counts["largest input"], node.meta["val"].numel())
    matmuls = {
        torch.ops.aten.mm.default,
        torch.ops.aten.addmm.default,
        torch.ops.aten.bmm.default,
        torch.ops.aten.matmul.default,
        torch.ops.aten.linear.default,
    }
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in matmuls:
            counts["matmul"] += 1
        elif node.target is torch.ops.properlm.fused_linear_loss.default:
            counts["fused_linear_loss"] += 1
        elif node.target is torch.ops.properlm.fused_linear_loss_backward.default:
            counts["fused_linear_loss_backward"] += 1
    return counts


def _graphs(reduction: str) -> dict[str, dict[str, int]]:
    """The operator counts of the AOT forward and backward graphs of the fused loss (3 chunks)."""
    graphs: dict[str, dict[str, int]] = {}

    def capture(name):
        def compiler(gm, example_inputs):
            graphs[name] = _op_counts(gm)
            return make_boxed_func(gm.forward)

        return compiler

    backend = aot_autograd(fw_compiler=capture("forward"), bw_compiler=capture("backward"))
    h0, w0, b0, y = _data()
    h, w, b = (t.requires_grad_() for t in (h0, w0, b0))
    torch._dynamo.reset()
    f = torch.compile(properlm.fused_linear_scoring_rule_loss, backend=backend, fullgraph=True, dynamic=False)
    loss = f(h, w, y, "brier", bias=b, smoothing=0.1, reduction=reduction, chunk_size=8)
    (loss if reduction != "none" else loss.sum()).backward()
    torch._dynamo.reset()
    return graphs


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_graph_recomputes_no_logits(reduction, monkeypatch):
    """The loss is one operator node in the forward graph and no N x V matmul is traced: for a reduced loss the
    backward graph has no matmul at all (the gradients were formed in the forward pass), for per-token losses it
    is the backward operator (the eager path's own recomputation of the logits, from the kept statistics). The
    checkpointed traceable form, used before the operator existed (and now for rules that their spec cannot name),
    has matmuls in both graphs: the check fails on it."""
    graphs = _graphs(reduction)
    assert graphs["forward"]["largest input"] == V * H  # the weight
    # kept for backward: the gradients (and for "none" the inputs and a few statistics per token), nothing N x V
    assert graphs["backward"]["largest input"] == V * H < N * V
    for g in graphs.values():
        del g["largest input"]
    assert graphs["forward"] == {"matmul": 0, "fused_linear_loss": 1, "fused_linear_loss_backward": 0}
    expected_bw = {"matmul": 0, "fused_linear_loss": 0, "fused_linear_loss_backward": int(reduction == "none")}
    assert graphs["backward"] == expected_bw

    monkeypatch.setattr(fused_loss, "spec_names_rule", lambda rule: False)  # the old, checkpointed form
    old = _graphs(reduction)
    assert old["forward"]["fused_linear_loss"] == 0 and old["forward"]["matmul"] == 3  # one per chunk
    assert old["backward"]["matmul"] >= 3 * 3  # recomputed logits, grad hidden, grad weight per chunk


@pytest.mark.slow
def test_no_graph_break_and_fallback_for_unnamed_rules():
    """``torch._dynamo.explain``: one graph, no break, for the operator and for the checkpointed fallback of a rule
    that its spec does not name (an unregistered subclass), whose values equal eager's as well."""

    class Unregistered(properlm.rules.Brier):  # its spec "brier" names the parent class
        pass

    rule = Unregistered()
    assert not spec_names_rule(rule)
    assert all(spec_names_rule(properlm.get_rule(c[0])) for c in CASES)
    h, w, b, y = _data()

    def fn(h, w, b, y):
        return (
            properlm.fused_linear_scoring_rule_loss(
                h, w, y, "0.5*logarithmic+0.5*spherical", bias=b, smoothing=0.1, chunk_size=8
            ),
            properlm.fused_linear_scoring_rule_loss(h, w, y, rule, smoothing=0.1, chunk_size=8, reduction="none"),
        )

    out = torch._dynamo.explain(fn)(h.requires_grad_(), w, b, y)
    assert (out.graph_count, out.graph_break_count) == (1, 0), out.break_reasons
    eager = fn(h, w, b, y)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(h, w, b, y)
    for a, c in zip(compiled, eager):
        _assert_close(a, c, "fallback", tol=1e-5)


@pytest.mark.slow
def test_compiled_op_checks_targets_and_runs_without_grad():
    """An out-of-range target raises the eager ValueError inside the compiled graph; under ``no_grad`` no
    gradient is formed and the loss is unchanged."""
    h, w, b, y = _data()
    f = torch.compile(properlm.fused_linear_scoring_rule_loss, fullgraph=True, dynamic=False, backend="aot_eager")
    with torch.no_grad():
        assert f(h, w, y, "spherical", bias=b) == properlm.fused_linear_scoring_rule_loss(h, w, y, "spherical", bias=b)
    bad = y.clone()
    bad[4] = V
    with pytest.raises(ValueError, match="outside"):
        f(h, w, bad, "spherical", bias=b)


@pytest.mark.slow
def test_operator_registration_opcheck():
    """``torch.library.opcheck``: schema, fake implementation, autograd registration, AOT dispatch."""
    h, w, b, y = _data()
    args = (
        h.requires_grad_(),
        w.requires_grad_(),
        b,
        y,
        None,
        "brier",
        0.1,
        -100,
        "mean",
        None,
        8,
        "",
        3.0,
        None,
        "paper",
        [True, True, False],
    )
    torch.library.opcheck(torch.ops.properlm.fused_linear_loss.default, args)
    args_none = (
        h,
        w,
        b,
        y,
        None,
        "spherical",
        0.0,
        -100,
        "none",
        None,
        0,
        "",
        None,
        None,
        "paper",
        [True, True, False],
    )
    torch.library.opcheck(torch.ops.properlm.fused_linear_loss.default, args_none)
    assert math.isfinite(float(torch.ops.properlm.fused_linear_loss(*args)[0].detach()))


@pytest.mark.slow
def test_dynamic_shapes_and_bfloat16_equal_eager_exactly():
    """``dynamic=True`` (two numbers of tokens, one graph) and bfloat16 inputs: the operator runs the eager code,
    so values and gradients are bitwise equal to eager mode's."""

    def f(h, w, y, reduction):
        return properlm.fused_linear_scoring_rule_loss(
            h, w, y, "spherical", smoothing=0.1, reduction=reduction, chunk_size=16
        )

    compiled = torch.compile(f, dynamic=True, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16):
        for n, reduction in ((40, "mean"), (56, "none")):
            h0, w0 = torch.randn(n, 16, generator=g).to(dtype), torch.randn(100, 16, generator=g).to(dtype)
            y = torch.randint(100, (n,), generator=g)
            y[3] = -100
            res = []
            for fn in (f, compiled):
                h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
                out = fn(h, w, y, reduction)
                (out.sum() if reduction == "none" else out).backward()
                res.append((out.detach(), h.grad, w.grad))
            for a, b, what in zip(*res, ("loss", "grad hidden", "grad weight")):
                assert a.dtype == b.dtype and torch.equal(a, b), (dtype, n, reduction, what)


def test_every_token_ignored():
    """No scored token: loss 0 and zero gradients, eager and compiled, reduced and per token."""
    h0, w0, b0, y = _data()
    y = torch.full_like(y, -100)

    def f(h, w, b, y):
        return (
            properlm.fused_linear_scoring_rule_loss(h, w, y, "brier", bias=b, smoothing=0.1),
            properlm.fused_linear_scoring_rule_loss(h, w, y, "spherical", bias=b, smoothing=0.1, reduction="none"),
        )

    for fn in (f, torch.compile(f, fullgraph=True, dynamic=False, backend="aot_eager")):
        h, w, b = (t.clone().requires_grad_() for t in (h0, w0, b0))
        mean, per_token = fn(h, w, b, y)
        (mean + per_token.sum()).backward()
        assert mean == 0 and torch.all(per_token == 0)
        assert all(torch.all(t.grad == 0) for t in (h, w, b))
