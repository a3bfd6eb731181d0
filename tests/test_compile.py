"""torch.compile: the losses trace without graph breaks (``fullgraph=True``) and the compiled
losses, a compiled tiny Llama and ``properlm train --torch-compile`` equal eager mode.

Compiling is slow on a small CPU, so each inductor compilation here covers many cases at once
(one graph scoring every rule, one every reduction), shapes are tiny and ``dynamic=False``.
Tolerances: float32 values and gradients to a relative error of ``1e-5`` (the traceable path sums
in another order and forms ``exp(c d)`` instead of ``exp(d) ** c``), model losses to ``1e-5``.
"""

from __future__ import annotations

import math

import pytest
import torch

import properlm
from properlm import compiled
from properlm.options import LossOptions, check_head_transform
from reference import RULES, rel_err

TOL = 1e-5
SMOOTHINGS = (0.0, 0.1)


def _inputs(n=12, V=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V, generator=g) * 3
    y = torch.randint(V, (n,), generator=g)
    y[[0, 5]] = -100  # ignored tokens
    z[2, :5] = -math.inf  # masked vocabulary entries (the target is not among them)
    y[2] = 7
    z[0, :] = math.nan  # the row of an ignored token is never read
    return z, y


def _eager_and_compiled(fn, inputs, upstream, backend="inductor"):
    """Values and gradients of ``fn(*inputs)`` (a tuple of tensors) eager and compiled with
    ``fullgraph=True``; ``upstream[i]`` weights output ``i`` in the backward pass."""
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)):
        xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        outs = f(*xs)
        total = sum((o * u).sum() for o, u in zip(outs, upstream))
        grads = torch.autograd.grad(total, [x for x in xs if x.requires_grad])
        results.append(([o.detach() for o in outs], grads))
    return results


def _assert_close(a, b, what):
    assert torch.equal(torch.isnan(a), torch.isnan(b)), what
    err = rel_err(torch.nan_to_num(a), torch.nan_to_num(b))
    assert err <= TOL, f"{what}: relative error {err:.2e}"


# ------------------------------------------------------------------------------ graph breaks


@pytest.mark.slow
def test_no_graph_breaks():
    """One trace of both losses for every rule (smoothing, ignored tokens, -inf logits, the head
    transforms, chunks): a single graph, no break."""
    z, y = _inputs()
    h, w = torch.randn(20, 8, requires_grad=True), torch.randn(40, 8, requires_grad=True)
    yf = torch.randint(40, (20,))
    yf[3] = -100

    def fn(z, y, h, w, yf):
        out = []
        for rule in RULES:
            out.append(properlm.scoring_rule_loss(z, y, rule, 0.1))
            out.append(properlm.fused_linear_scoring_rule_loss(h, w, yf, rule, smoothing=0.1, chunk_size=12))
        out.append(properlm.scoring_rule_loss(z, y, "brier", 0.1, reduction="none", softcap=5.0, logit_scale=0.5))
        out.append(
            properlm.fused_linear_scoring_rule_loss(h, w, yf, "spherical", chunk_size=8, softcap=5.0, reduction="sum")
        )
        return out

    out = torch._dynamo.explain(fn)(z.requires_grad_(), y, h, w, yf)
    assert (out.graph_count, out.graph_break_count) == (1, 0), out.break_reasons


# ------------------------------------------------------------------------------ values and gradients


@pytest.mark.slow
def test_compiled_equals_eager_every_rule():
    """Every rule, with and without smoothing (the masked-log term), ignored tokens and -inf
    logits, in one compiled graph; per-token losses and their logit gradients. The ``aot_eager``
    backend checks the graph that inductor receives (dynamo + AOT autograd) without generating
    kernels (inductor on a graph of every rule takes minutes here); inductor itself runs in the
    tests below (four rules, smoothing, every reduction, the fused loss)."""
    backend, rules = "aot_eager", RULES
    z, y = _inputs()
    cases = [(r, s) for r in rules for s in SMOOTHINGS]

    def fn(y, *zs):
        return tuple(properlm.scoring_rule_loss(zi, y, r, s, reduction="none") for zi, (r, s) in zip(zs, cases))

    upstream = [torch.rand(y.shape, generator=torch.Generator().manual_seed(i)) for i in range(len(cases))]
    (ev, eg), (cv, cg) = _eager_and_compiled(fn, [y] + [z] * len(cases), upstream, backend)
    for i, case in enumerate(cases):
        _assert_close(cv[i], ev[i], f"loss {case}")
        _assert_close(cg[i], eg[i], f"grad {case}")
        assert torch.all(cg[i][[0, 5]] == 0) and torch.all(cg[i][2, :5] == 0)


@pytest.mark.slow
def test_compiled_equals_eager_reductions_and_head():
    """Every reduction, num_items_in_batch (int and tensor), four rules with and without
    smoothing, the output-head transforms, all tokens ignored (``aot_eager``); the traceable form
    in float64."""
    z, y = _inputs()
    rule = "spherical"

    def fn(y, n_items, z1, z2, z3, z4, z5, z6, z7):
        return (
            properlm.scoring_rule_loss(z1, y, rule, 0.1),
            properlm.scoring_rule_loss(z2, y, rule, 0.1, reduction="sum"),
            properlm.scoring_rule_loss(z3, y, "brier", 0.0, num_items_in_batch=7),
            properlm.scoring_rule_loss(z4, y, "power:3", 0.1, num_items_in_batch=n_items),
            properlm.scoring_rule_loss(z5, y, rule, 0.1, reduction="none", softcap=4.0),
            properlm.scoring_rule_loss(z6, y, "logarithmic", 0.1, reduction="none", softcap=4.0, logit_scale=0.5),
            properlm.scoring_rule_loss(z7, torch.full_like(y, -100), rule, 0.1),  # every token ignored
        )

    n_items = torch.tensor(9)
    upstream = [torch.tensor(0.7)] * 4 + [torch.rand(y.shape), torch.rand(y.shape), torch.tensor(1.0)]
    (ev, eg), (cv, cg) = _eager_and_compiled(fn, [y, n_items] + [z] * 7, upstream, "aot_eager")
    for i in range(7):
        _assert_close(cv[i], ev[i], f"output {i}")
        _assert_close(cg[i], eg[i], f"grad {i}")
    assert cv[6] == 0 and torch.all(cg[6] == 0)

    # float64 stays float64 (traceable path, eager), to float64 rounding
    z64 = z.double().requires_grad_()
    a = compiled.token_losses(z64, y, LossOptions("power:1.5", 0.1))
    b = properlm.scoring_rule_loss(z64, y, "power:1.5", 0.1, reduction="none")
    assert a.dtype == torch.float64
    assert rel_err(a, b) < 1e-12
    (ga,) = torch.autograd.grad(a.sum(), z64)
    (gb,) = torch.autograd.grad(b.sum(), z64)
    assert rel_err(ga, gb) < 1e-12


@pytest.mark.slow
def test_inductor_equals_eager_and_bad_target_is_nan():
    """Inductor on the unfused loss (a bounded rule with smoothing: the masked-log term; ignored
    tokens, -inf logits, per-token upstream gradient); an out-of-range target gives NaN there
    (the eager ValueError needs the data on the host)."""
    z, y = _inputs()

    def fn(z, y):
        return (properlm.scoring_rule_loss(z, y, "pseudo-spherical:1.5", 0.1, reduction="none"),)

    (ev, eg), (cv, cg) = _eager_and_compiled(fn, [z, y], [torch.rand(y.shape)])
    _assert_close(cv[0], ev[0], "loss")
    _assert_close(cg[0], eg[0], "grad")
    f = torch.compile(fn, fullgraph=True, dynamic=False)
    bad = y.clone()
    bad[4] = 40
    out = f(z, bad)[0]
    assert math.isnan(out[4]) and torch.isfinite(out[torch.arange(12) != 4]).all()
    with pytest.raises(ValueError, match="outside"):
        fn(z, bad)


@pytest.mark.slow
def test_compiled_fused_equals_eager_every_rule():
    """The chunked fused loss (2 chunks, the last one partial) for every rule with smoothing,
    ignored tokens, a bias, both reductions, num_items_in_batch and (every third rule) the
    output-head transforms; gradients of hidden, weight
    and bias (``aot_eager``, as above; inductor in the next test)."""
    g = torch.Generator().manual_seed(3)
    N, H, V = 20, 8, 40
    h, w, b = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g), torch.randn(V, generator=g)
    y = torch.randint(V, (N,), generator=g)
    y[[1, 9, 17]] = -100
    cases = [(r, "mean" if i % 2 else "none") for i, r in enumerate(RULES)]

    def fn(y, *params):
        outs = []
        for i, (r, red) in enumerate(cases):
            hi, wi, bi = params[3 * i : 3 * i + 3]
            head = {"softcap": 3.0, "logit_scale": 0.7} if i % 3 == 0 else {}
            outs.append(
                properlm.fused_linear_scoring_rule_loss(
                    hi, wi, y, r, bias=bi, smoothing=0.1, reduction=red, num_items_in_batch=11, chunk_size=12, **head
                )
            )
        return tuple(outs)

    upstream = [torch.rand(N, generator=g) if red == "none" else torch.tensor(1.3) for _, red in cases]
    (ev, eg), (cv, cg) = _eager_and_compiled(fn, [y] + [h, w, b] * len(cases), upstream, "aot_eager")
    for i, case in enumerate(cases):
        _assert_close(cv[i], ev[i], f"loss {case}")
        for k, name in enumerate(("hidden", "weight", "bias")):
            _assert_close(cg[3 * i + k], eg[3 * i + k], f"grad {name} {case}")


@pytest.mark.slow
def test_compiled_fused_inductor_equals_eager_and_keeps_no_logits():
    """Inductor, fused loss (2 chunks, smoothing, ignored tokens): values and gradients equal
    eager; memory: nothing of size N x V is saved for backward (the operator of properlm.fused.op
    keeps the gradients it formed in the forward pass)."""
    N, H, V = 64, 8, 512
    g = torch.Generator().manual_seed(4)
    h0, w0 = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    y = torch.randint(V, (N,), generator=g)
    y[[2, 40]] = -100
    results, saved = [], []
    for f in (
        properlm.fused_linear_scoring_rule_loss,
        torch.compile(properlm.fused_linear_scoring_rule_loss, fullgraph=True, dynamic=False),
    ):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        total = [0]

        def pack(t, total=total):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = f(h, w, y, "brier", smoothing=0.1, chunk_size=32)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
        saved.append(total[0])
    for a, b, what in zip(results[1], results[0], ("loss", "grad hidden", "grad weight")):
        _assert_close(a, b, what)
    assert saved[1] < (N * H + V * H + 8 * N) * 4 + 4096 < N * V * 4 / 2


def test_head_transform_arguments_are_checked():
    assert check_head_transform(None, 2) == (None, 2.0)
    for bad in (0, -1.0, math.inf, "x", True):
        with pytest.raises(ValueError, match="softcap must be None or a finite number > 0"):
            check_head_transform(bad, None)
    z = torch.tensor([[-math.inf, 0.0, 100.0]])
    assert torch.equal(compiled.transform_logits(z, 10.0, 2.0), torch.tensor([[-math.inf, 0.0, 10.0]]))


# ------------------------------------------------------------------------------ models and training


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def _train_losses(compile_backend, fused, steps=3):
    model = _tiny_llama()
    properlm.apply_scoring_rule(model, "spherical", smoothing=0.1, fused=fused)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    run = model if compile_backend is None else torch.compile(model, backend=compile_backend)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        ids = torch.randint(300, (2, 16), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100
        loss = run(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(26)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_tiny_llama_trains_under_torch_compile():
    """``torch.compile(model)`` of a Llama patched by apply_scoring_rule: 3 AdamW steps, losses
    equal to eager to 1e-5, no graph break. The ``aot_eager`` backend traces exactly what
    inductor receives (dynamo + AOT autograd) without generating kernels (an inductor compile of
    this model takes about a minute on two cores; ``benchmarks/bench_compile.py`` runs it)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = _train_losses(None, True)
    compiled_losses = _train_losses("aot_eager", True)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert compiled_losses == pytest.approx(eager, rel=TOL)
    assert compiled_losses[-1] != compiled_losses[0]  # the steps changed the model


@pytest.mark.slow
def test_train_cli_torch_compile(tmp_path):
    """``properlm train --torch-compile`` (a 2-step run of a tiny GPT) gives the eager run's losses."""
    from properlm.cli.main import main
    from properlm.training import ConfigError, validate_config
    from test_train_cli import tiny, train_losses

    common = ["--rule", "spherical", "--smoothing", "0.1", "--max-steps", "2"]
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--torch-compile", "--torch-compile-backend", "aot_eager"])):
        cfg = tiny(tmp_path, name=name, init="tiny-gpt")
        args = [
            "train",
            "--init",
            "tiny-gpt",
            "--source-file",
            cfg.source_file,
            "--target-file",
            cfg.target_file,
            "--source-lang",
            "digits",
            "--target-lang",
            "English",
            "--vocab-size",
            "270",
            "--hidden-size",
            "32",
            "--num-layers",
            "1",
            "--num-heads",
            "2",
            "--max-length",
            "32",
            "--per-device-train-batch-size",
            "8",
            "--learning-rate",
            "3e-3",
            "--lr-scheduler",
            "constant",
            "--logging-steps",
            "1",
            "--output-dir",
            cfg.output_dir,
            "--no-progress-bar",
            "--no-tensorboard",
            "--seed",
            "0",
            *common,
            *extra,
        ]
        assert main(args) == 0
        runs[name] = train_losses(cfg.output_dir)
    assert len(runs["compiled"]) == 2
    assert runs["compiled"] == pytest.approx(runs["eager"], rel=TOL)
    with pytest.raises(ConfigError, match="--torch-compile-backend must be one of"):
        validate_config(tiny(tmp_path, name="bad", torch_compile=True, torch_compile_backend="nope"))


def _bench_compile():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_compile.py"
    spec = importlib.util.spec_from_file_location("bench_compile", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.slow
def test_bench_compile_prints_its_table(capsys):
    """benchmarks/bench_compile.py end to end on the tiny shape (aot_eager, one warm-up and one timed step each,
    no memory subprocesses): a row per variant and mode, the HF CE rows at ratio 1.00, the log variants' losses
    equal to HF cross-entropy's."""
    bench = _bench_compile()
    bench.main(["--shapes", "tiny", "--steps", "1", "--warmup", "1", "--backend", "aot_eager", "--no-memory"])
    lines = capsys.readouterr().out.splitlines()
    col = {c.strip(): i for i, c in enumerate(next(x for x in lines if x.startswith("| shape |")).split("|")[1:-1])}
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in lines if line.startswith("| tiny |")]
    variants = bench.available_variants()
    assert [(r[1], r[2]) for r in rows] == [(bench.VARIANTS[v], m) for m in ("eager", "compiled") for v in variants]
    for r in rows:
        if r[1] == bench.VARIANTS["hf-ce"]:
            assert r[col["step / HF CE"]] == "1.00" and r[col["CPU / HF CE"]] == "1.00"
        if r[1] in {bench.VARIANTS[v] for v in bench.LOG_VARIANTS}:
            assert float(r[col["loss rel. diff vs HF CE"]]) <= 1e-5
        else:
            assert r[col["loss rel. diff vs HF CE"]] == "-"
        assert r[col["fullgraph"]] == ("-" if r[2] == "eager" else "yes")


@pytest.mark.slow
def test_bench_compile_peak_memory():
    """The peak memory of one step (VmHWM after minus VmRSS before, here in this process): byte counts, of the
    forward + backward and of the whole step (at least as large: VmHWM only grows)."""
    import argparse

    bench = _bench_compile()
    args = argparse.Namespace(layers=2, warmup=1, smoothing=0.0, fused=True, backend="aot_eager", device="cpu")
    fwd_bwd, step = bench.measure_peak("spherical", "eager", "tiny", args)
    assert isinstance(fwd_bwd, int) and 0 <= fwd_bwd <= step < 2**30
