"""Smoothing variants of the masked-log term (``smoothing_variant``: ``"paper"``, ``"gated"``, ``"none"``).

Float64 references written from ``p = softmax(z)``, the exact maximiser of the expected smoothed
score, finite values in low precision, every path against the unfused loss, and the collapse of the
paper's formula at V = 49,152 under Adam that ``"gated"`` avoids.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import properlm
from properlm import compiled
from properlm.distributed import fused_linear_vocab_parallel_scoring_rule_loss, vocab_parallel_scoring_rule_loss
from properlm.integrations.transformers import scoring_rule_loss_func
from properlm.options import SMOOTHING_VARIANTS, LossOptions
from reference import naive_scores_all, rel_err

BOUNDED = ["brier", "spherical", "power:3", "pseudo-spherical:1.5"]
VARIANTS = list(SMOOTHING_VARIANTS)


def naive_variant_loss(
    z: torch.Tensor, y: torch.Tensor, rule: str, eps: float, variant: str, weight: float = 1.0
) -> torch.Tensor:
    """Per-token ``s_max - S_eps`` in float64 from ``p = softmax(z)``; ``M`` and the gate are constants."""
    z = z.double()
    V = z.shape[-1]
    p = torch.softmax(z, -1)
    scores = naive_scores_all(p, rule)
    s = (1 - eps) * scores.gather(-1, y[:, None]).squeeze(-1) + eps * scores.mean(-1)
    mask = (p < eps / V).detach()
    masked = eps / V * torch.where(mask, torch.log_softmax(z, -1), 0.0).sum(-1)
    p_y = p.gather(-1, y[:, None]).squeeze(-1).detach()
    gate = {
        "paper": torch.ones_like(p_y),
        "none": torch.zeros_like(p_y),
        "gated": ((p_y - (1 - eps)) / eps).clamp(0, 1),
    }[variant]
    return 1.0 - (s + weight * gate * masked)


def peaked_logits(n: int, V: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 logits whose target probabilities spread over [0.4, 0.9999] (so the gate takes values
    of 0, 1 and in between), with most other tokens below eps / V."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V, generator=g, dtype=torch.float64) * 1.5
    y = torch.randint(V, (n,), generator=g)
    boost = torch.linspace(1.0, 14.0, n, dtype=torch.float64)
    z[torch.arange(n), y] += boost
    return z, y


# ---------------------------------------------------------------------- references
@pytest.mark.parametrize("rule", BOUNDED)
@pytest.mark.parametrize("variant", VARIANTS)
def test_value_and_gradient_match_float64_reference(rule: str, variant: str) -> None:
    z, y = peaked_logits(24, 60, seed=1)
    gate = ((torch.softmax(z, -1).gather(1, y[:, None]) - 0.9) / 0.1).clamp(0, 1)
    assert (gate == 0).any() and (gate > 0.99).any() and ((gate > 0.1) & (gate < 0.9)).any()  # every regime
    up = torch.randn(24, dtype=torch.float64)
    a = z.clone().requires_grad_(True)
    got = properlm.scoring_rule_loss(a, y, rule, 0.1, reduction="none", smoothing_variant=variant)
    (got * up).sum().backward()
    b = z.clone().requires_grad_(True)
    ref = naive_variant_loss(b, y, rule, 0.1, variant)
    (ref * up).sum().backward()
    assert rel_err(got, ref) < 1e-12
    assert rel_err(a.grad, b.grad) < 1e-10


def test_mixture_weights_the_gated_term_by_its_bounded_components() -> None:
    z, y = peaked_logits(16, 50, seed=2)
    got = properlm.scoring_rule_loss(
        z, y, "0.5*logarithmic+0.5*spherical", 0.1, reduction="none", smoothing_variant="gated"
    )
    log_part = F.cross_entropy(z, y, reduction="none", label_smoothing=0.1)
    sph = naive_variant_loss(z, y, "spherical", 0.1, "gated")
    assert rel_err(got, 0.5 * log_part + 0.5 * sph) < 1e-12


def test_variants_agree_where_they_must() -> None:
    z, y = peaked_logits(16, 50, seed=3)
    # no smoothing, or the logarithmic score: the variant changes nothing
    for rule, eps in (("brier", 0.0), ("logarithmic", 0.1)):
        ref = properlm.scoring_rule_loss(z, y, rule, eps, reduction="none")
        for variant in VARIANTS:
            assert torch.equal(
                properlm.scoring_rule_loss(z, y, rule, eps, reduction="none", smoothing_variant=variant), ref
            )
    # "paper" is the default, unchanged
    assert torch.equal(
        properlm.scoring_rule_loss(z, y, "brier", 0.1),
        properlm.scoring_rule_loss(z, y, "brier", 0.1, smoothing_variant="paper"),
    )


@pytest.mark.parametrize("bad", ["pooled", "Paper", "", None, 1])
def test_bad_variant_is_a_clear_value_error(bad: object) -> None:
    z, y = peaked_logits(4, 10)
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    calls = [
        lambda: properlm.scoring_rule_loss(z, y, "brier", 0.1, smoothing_variant=bad),
        lambda: properlm.ScoringRuleLoss("brier", 0.1, smoothing_variant=bad),
        lambda: properlm.fused_linear_scoring_rule_loss(h, w, y, "brier", smoothing=0.1, smoothing_variant=bad),
        lambda: scoring_rule_loss_func("brier", 0.1, smoothing_variant=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="smoothing_variant must be one of 'paper', 'gated', 'none'"):
            call()


# ---------------------------------------------------------------------- the maximiser
def _expected_score(p: torch.Tensor, q: torch.Tensor, rule: str, eps: float, variant: str) -> torch.Tensor:
    """``E_{Y ~ q} S_eps(p, Y)`` for each row of ``p`` (``(k, V)``), from properlm's loss."""
    k, V = p.shape
    z = torch.log(p).repeat_interleave(V, 0)
    y = torch.arange(V).repeat(k)
    s_max = properlm.get_rule(rule).s_max
    scores = s_max - properlm.scoring_rule_loss(z, y, rule, eps, reduction="none", smoothing_variant=variant)
    return (scores.view(k, V) * q).sum(-1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rule", ["brier", "spherical", "power:3", "0.5*logarithmic+0.5*spherical"])
def test_expected_smoothed_score_is_maximised_exactly_at_the_smoothed_distribution(rule: str, variant: str) -> None:
    """For every q: E_q S_eps(p, Y) < E_q S_eps(q', Y) for every p != q' = (1 - eps) q + eps / V
    (the masked term is <= 0 for any gate in [0, 1] and 0 where no p_j < eps / V, as at q')."""
    g = torch.Generator().manual_seed(4)
    V = 7
    qs = [torch.eye(V, dtype=torch.float64)[2], torch.tensor([0.5, 0.3, 0.2, 0, 0, 0, 0], dtype=torch.float64)]
    qs += [torch.distributions.Dirichlet(torch.full((V,), 0.3, dtype=torch.float64)).sample() for _ in range(2)]
    for eps in (0.05, 0.3):
        for q in qs:
            qs_ = (1 - eps) * q + eps / V
            best = _expected_score(qs_[None], q, rule, eps, variant)
            # random forecasts, the unsmoothed q (tail below eps / V), and small perturbations of q'
            rand = torch.distributions.Dirichlet(torch.full((V,), 0.5, dtype=torch.float64)).sample((64,))
            near = qs_ * torch.exp(1e-3 * torch.randn(32, V, generator=g, dtype=torch.float64))
            cands = torch.cat([rand, (q + 1e-12)[None] / (q + 1e-12).sum(), near / near.sum(-1, keepdim=True)])
            others = _expected_score(cands, q, rule, eps, variant)
            assert (others < best).all(), (eps, q, float((others - best).max()))


# ---------------------------------------------------------------------- low precision
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_finite_in_low_precision(dtype: torch.dtype, variant: str) -> None:
    g = torch.Generator().manual_seed(5)
    z = torch.randn(12, 300, generator=g) * 3
    y = torch.randint(300, (12,), generator=g)
    z[torch.arange(12), y] += torch.linspace(0, 30, 12)  # up to p_y = 1 in float32
    z[0] *= 1e3  # huge logits
    z[1, :40] = -math.inf  # masked vocabulary
    y[1] = 100
    big = 6e4 if dtype == torch.float16 else 1e4
    z[2] = z[2].clamp(-big, big)
    for rule in ("brier", "spherical", "power:3"):
        x = z.to(dtype).requires_grad_(True)
        loss = properlm.scoring_rule_loss(x, y, rule, 0.1, smoothing_variant=variant)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad.float()).all(), (rule, dtype, variant)
        h = torch.randn(12, 16, generator=g).to(dtype).requires_grad_(True)
        w = torch.randn(300, 16, generator=g).to(dtype).requires_grad_(True)
        fl = properlm.fused_linear_scoring_rule_loss(h, w, y, rule, smoothing=0.1, smoothing_variant=variant)
        fl.backward()
        assert torch.isfinite(fl) and torch.isfinite(h.grad.float()).all() and torch.isfinite(w.grad.float()).all()


# ---------------------------------------------------------------------- every path
def _peaked_head(n: int, H: int, V: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden, weight, bias, target)`` in float64 whose logits have peaked targets."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5
    y = torch.randint(V, (n,), generator=g)
    scale = torch.linspace(0.5, 12.0, n, dtype=torch.float64)[:, None]
    h = scale * w[y] / (w[y] ** 2).sum(-1, keepdim=True) + 0.3 * torch.randn(n, H, generator=g, dtype=torch.float64)
    b = 0.1 * torch.randn(V, generator=g, dtype=torch.float64)
    y[::5] = -100
    return h, w, b, y


@pytest.mark.parametrize("variant", ["gated", "none"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_chunked_and_compiled_forms_equal_unfused(variant: str, reduction: str) -> None:
    h, w, b, y = _peaked_head(30, 12, 70, seed=6)
    up = torch.randn(30, dtype=torch.float64) if reduction == "none" else torch.tensor(1.0, dtype=torch.float64)

    def run(fn):
        leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
        loss = fn(*leaves)
        return [loss.detach(), *torch.autograd.grad((loss * up).sum(), leaves)]

    kw = {"smoothing": 0.1, "reduction": reduction, "smoothing_variant": variant}
    ref = run(lambda h_, w_, b_: properlm.scoring_rule_loss(F.linear(h_, w_, b_), y, "spherical", **kw))
    got = run(
        lambda h_, w_, b_: properlm.fused_linear_scoring_rule_loss(
            h_, w_, y, "spherical", bias=b_, chunk_size=7, impl="torch", **kw
        )
    )
    for a, r in zip(got, ref):
        assert rel_err(a, r) < 1e-12
    # the traceable forms used under torch.compile (pure functions of the logits)
    per_token = compiled.token_losses(F.linear(h, w, b), y, LossOptions("spherical", 0.1, smoothing_variant=variant))
    eager = properlm.scoring_rule_loss(
        F.linear(h, w, b), y, "spherical", 0.1, reduction="none", smoothing_variant=variant
    )
    assert rel_err(per_token, eager) < 1e-12
    fused_c = compiled.fused_token_losses(h, w, b, y, LossOptions("spherical", 0.1, smoothing_variant=variant), 8)
    assert rel_err(fused_c, eager) < 1e-12


def test_gated_differs_from_paper_on_every_path() -> None:
    """Guards the threading: a path that dropped the keyword would compute the paper's formula."""
    h, w, b, y = _peaked_head(20, 12, 70, seed=7)
    z = F.linear(h, w, b)
    paper = properlm.scoring_rule_loss(z, y, "brier", 0.1)
    gated = properlm.scoring_rule_loss(z, y, "brier", 0.1, smoothing_variant="gated")
    assert abs(float(paper - gated)) > 1e-3
    mod = properlm.ScoringRuleLoss("brier", 0.1, smoothing_variant="gated")
    assert "smoothing_variant='gated'" in repr(mod) and torch.equal(mod(z, y), gated)
    fmod = properlm.LinearScoringRuleLoss("brier", 0.1, smoothing_variant="gated", impl="torch")
    assert rel_err(fmod(h, w, y, b), gated) < 1e-12


# ---------------------------------------------------------------------- integrations
def test_transformers_integrations_pass_the_variant() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    ).eval()
    model.lm_head.weight.data.mul_(60)  # peaked predictions, so that the gate is open somewhere
    ids = torch.randint(64, (2, 10))
    with torch.no_grad():
        logits = model(ids).logits.double()
    labels = logits.argmax(-1).roll(1, dims=-1)  # the model's own top tokens, shifted in place of the labels
    z, y = logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1)
    ref = {v: properlm.scoring_rule_loss(z, y, "spherical", 0.1, smoothing_variant=v) for v in ("paper", "gated")}
    assert abs(float(ref["paper"] - ref["gated"])) > 1e-4
    func = scoring_rule_loss_func("spherical", 0.1, model=model, smoothing_variant="gated")
    assert func.smoothing_variant == "gated" and "gated" in repr(func)
    assert rel_err(func({"logits": logits}, labels), ref["gated"]) < 1e-10
    func.smoothing_variant = "paper"
    assert rel_err(func({"logits": logits}, labels), ref["paper"]) < 1e-10
    for fused in (True, False):
        handle = properlm.apply_scoring_rule(model, "spherical", 0.1, fused=fused, smoothing_variant="gated")
        assert handle.smoothing_variant == "gated"
        with torch.no_grad():
            out = model(ids, labels=labels).loss
        assert rel_err(out, ref["gated"]) < 1e-5
        handle.smoothing_variant = "paper"
        with torch.no_grad():
            out = model(ids, labels=labels).loss
        assert rel_err(out, ref["paper"]) < 1e-5
        with pytest.raises(ValueError, match="smoothing_variant"):
            handle.smoothing_variant = "pooled"
        handle.remove()


# ---------------------------------------------------------------------- Triton (interpreter) and vocab-parallel
_TRITON_CHILD = r"""
import json, torch, torch.nn.functional as F
from properlm import scoring_rule_loss
from properlm.fused import fused_linear_scoring_rule_loss, triton_kernels
triton_kernels.BLOCK_N = triton_kernels.BLOCK_V = triton_kernels.BLOCK_H = 16
g = torch.Generator().manual_seed(8)
w = torch.randn(40, 16, generator=g) / 4
y = torch.randint(40, (9,), generator=g)
h = torch.linspace(0.5, 12, 9)[:, None] * w[y] / (w[y] ** 2).sum(-1, keepdim=True)
h = h + 0.3 * torch.randn(9, 16, generator=g)
out = {}
for variant in ("gated", "none"):
    res = []
    for impl in ("triton", None):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        if impl:
            loss = fused_linear_scoring_rule_loss(hh, ww, y, "brier", smoothing=0.1, impl=impl,
                                                  smoothing_variant=variant)
        else:
            loss = scoring_rule_loss(F.linear(hh, ww), y, "brier", 0.1, smoothing_variant=variant)
        res.append([loss.detach(), *torch.autograd.grad(loss, [hh, ww])])
    out[variant] = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(*res))
    out[variant + "_loss"] = float(res[1][0])
print(json.dumps(out))
"""


@pytest.mark.slow
def test_triton_kernels_take_the_variant() -> None:
    pytest.importorskip("triton", reason="triton is an optional dependency (pip install properlm[triton])")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TRITON_INTERPRET="1",
        PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run([sys.executable, "-c", _TRITON_CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["gated"] < 1e-5 and out["none"] < 1e-5, out
    assert out["gated_loss"] != out["none_loss"]


def _vp_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=30)
    )
    errors: dict[str, float] = {}
    try:
        h, w, b, y = _peaked_head(14, 10, 33, seed=9)
        a, n = (0, 15) if rank == 0 else (15, 18)
        for variant in ("paper", "gated", "none"):
            kw = {"smoothing": 0.1, "reduction": "sum", "smoothing_variant": variant}
            hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
            ref = properlm.scoring_rule_loss(F.linear(hh, ww, b), y, "spherical", **kw)
            g_ref = torch.autograd.grad(ref, [hh, ww])
            z = F.linear(h, w[a : a + n], b[a : a + n]).requires_grad_(True)
            got = vocab_parallel_scoring_rule_loss(z, y, "spherical", **kw)
            (g_z,) = torch.autograd.grad(got, [z])
            errors[f"{variant}|unfused"] = rel_err(got, ref)
            hh2, wl = h.clone().requires_grad_(True), w[a : a + n].clone().requires_grad_(True)
            got2 = fused_linear_vocab_parallel_scoring_rule_loss(
                hh2, wl, y, "spherical", bias=b[a : a + n], chunk_size=5, **kw
            )
            g_h, g_w = torch.autograd.grad(got2, [hh2, wl])
            errors[f"{variant}|fused"] = max(
                rel_err(got2, ref), rel_err(g_h, g_ref[0]), rel_err(g_w, g_ref[1][a : a + n])
            )
            # the shard gradient of the unfused form: d loss / d z_local = (d loss / d z)[:, shard]
            zf = F.linear(h, w, b).requires_grad_(True)
            (g_full,) = torch.autograd.grad(properlm.scoring_rule_loss(zf, y, "spherical", **kw), [zf])
            errors[f"{variant}|unfused grad"] = rel_err(g_z, g_full[:, a : a + n])
    except Exception as exc:  # reported through the file, never left waiting in a collective
        errors["exception"] = float("nan")
        Path(out_dir, f"err{rank}.txt").write_text(repr(exc))
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(errors))
        dist.destroy_process_group()


@pytest.mark.slow
def test_vocab_parallel_losses_take_the_variant(tmp_path: Path) -> None:
    mp.spawn(_vp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        errors = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "exception" not in errors, (tmp_path / f"err{rank}.txt").read_text()
        assert len(errors) == 9 and max(errors.values()) < 1e-10, errors


# ---------------------------------------------------------------------- the collapse at V = 49,152
def _train_head(variant: str, steps: int = 30, V: int = 49152, n: int = 4, H: int = 8, lr: float = 0.03) -> list[float]:
    """Mean target log-probability after each Adam step on an output layer ``W`` (``V x H``) over fixed,
    anisotropic hidden states, initialised to logits shaped like a trained LM's: head probabilities
    0.70 (the target), 0.12, 0.06, 0.03, 0.02 before normalisation, a tail of log-probabilities
    N(-20, 2.5^2) (eps / V is 2e-6, log -13). About 0.2 nats of logit change per step (as
    ``benchmarks/smoothing_large_vocab.py``, part B, at a higher learning rate)."""
    g = torch.Generator().manual_seed(10)
    z0 = torch.randn(n, V, generator=g, dtype=torch.float64) * 2.5 - 20.0
    head = torch.log(torch.tensor([0.70, 0.12, 0.06, 0.03, 0.02], dtype=torch.float64))
    for i in range(n):
        z0[i, torch.randperm(V, generator=g)[:5]] = head
    y = z0.argmax(-1)
    hidden = 0.8 * torch.randn(H, generator=g) + torch.randn(n, H, generator=g)
    weight = (torch.linalg.pinv(hidden) @ z0.float()).T.contiguous().requires_grad_(True)
    opt = torch.optim.Adam([weight], lr=lr)
    out = []
    for step in range(steps + 1):
        z = hidden @ weight.T
        out.append(float(torch.log_softmax(z.detach().double(), -1).gather(1, y[:, None]).mean()))
        if step == steps:
            break
        opt.zero_grad()
        properlm.fused_linear_scoring_rule_loss(
            hidden, weight, y, "spherical", smoothing=0.1, smoothing_variant=variant
        ).backward()
        opt.step()
    return out


@pytest.mark.slow
def test_paper_formula_collapses_at_large_vocabulary_where_gated_does_not() -> None:
    paper, gated = _train_head("paper"), _train_head("gated")
    start = math.log(0.70 / 0.93)
    assert abs(paper[0] - start) < 0.01 and abs(gated[0] - paper[0]) < 1e-6
    # the paper's masked-log term flattens the distribution: p_y falls from 0.75 to below 0.3 in 30 steps
    assert paper[-1] < math.log(0.3), paper
    # the gated variant moves the target to the smoothed optimum 1 - eps + eps / V and holds it near there
    assert abs(gated[-1] - math.log(0.9)) < 0.1, gated
    assert min(gated[1:]) > start, gated


# ---------------------------------------------------------------------- properlm train
def test_train_warns_once_for_the_paper_formula_at_large_vocabularies() -> None:
    from properlm.training import TrainConfig, smoothing_warning

    msg = smoothing_warning("spherical", 0.1, "paper", 49152)
    assert msg is not None and "--smoothing-variant gated" in msg and "49152" in msg
    for args in (
        ("spherical", 0.1, "gated", 49152),
        ("spherical", 0.0, "paper", 49152),
        ("logarithmic", 0.1, "paper", 152064),
        ("spherical", 0.1, "none", 152064),
    ):
        assert smoothing_warning(*args) is None, args
    assert smoothing_warning("0.5*logarithmic+0.5*brier", 0.1, "paper", 32000) is not None
    assert smoothing_warning("brier", 0.1, "paper", 1000) is None
    assert TrainConfig().smoothing_variant == "paper"


@pytest.mark.slow
def test_train_prints_the_warning_once_and_takes_the_option(tmp_path: Path, monkeypatch, recwarn) -> None:
    """End to end with a tiny model (vocabulary 270; the threshold lowered to 200 for the test): the CLI
    option warns once for ``paper``; the YAML key ``smoothing_variant: gated`` trains without it."""
    import random

    from properlm.cli.main import main

    rng = random.Random(0)
    src = [str(rng.randint(0, 999)) for _ in range(24)]
    (tmp_path / "s.txt").write_text("\n".join(src) + "\n", encoding="utf-8")
    (tmp_path / "t.txt").write_text(
        "\n".join(" ".join("zero one two three four five six seven eight nine".split()[int(c)] for c in s) for s in src)
        + "\n",
        encoding="utf-8",
    )
    from properlm import stats

    monkeypatch.setattr(stats, "PAPER_SMOOTHING_WARN_VOCAB", 200)  # the threshold smoothing_warning applies
    monkeypatch.setattr(stats, "_WARNED_PAPER_SMOOTHING", set())
    common = [
        "--init",
        "tiny-seq2seq",
        "--source-file",
        str(tmp_path / "s.txt"),
        "--target-file",
        str(tmp_path / "t.txt"),
        "--vocab-size",
        "270",
        "--hidden-size",
        "16",
        "--num-layers",
        "1",
        "--num-heads",
        "2",
        "--max-steps",
        "1",
        "--rule",
        "spherical",
        "--smoothing",
        "0.1",
        "--no-tensorboard",
        "--no-progress-bar",
    ]
    assert main(["train", *common, "--output-dir", str(tmp_path / "paper")]) == 0
    ours = [w for w in recwarn.list if "--smoothing-variant gated" in str(w.message)]
    assert len(ours) == 1 and "270 tokens" in str(ours[0].message)
    recwarn.clear()
    (tmp_path / "run.yaml").write_text("smoothing_variant: gated\n", encoding="utf-8")
    assert main(["train", "--config", str(tmp_path / "run.yaml"), *common, "--output-dir", str(tmp_path / "g")]) == 0
    assert not [w for w in recwarn.list if "--smoothing-variant" in str(w.message)]
    results = json.loads((tmp_path / "g" / "results.json").read_text(encoding="utf-8"))
    assert results["config"]["smoothing_variant"] == "gated"
    (tmp_path / "bad.yaml").write_text("smoothing_variant: pooled\n", encoding="utf-8")
    assert main(["train", "--config", str(tmp_path / "bad.yaml"), *common, "--output-dir", str(tmp_path / "b")]) == 2


def test_api_warns_once_about_paper_smoothing_at_a_large_vocabulary(monkeypatch):
    """The functional, Module and fused losses warn once per rule and vocabulary size when a bounded rule takes the
    paper's masked-log smoothing at V >= 16384; gated, none, logarithmic and small vocabularies stay silent; the
    CLI's own warning of it silences the library's."""
    import warnings

    import properlm
    from properlm import stats
    from properlm.training.validation import smoothing_warning

    monkeypatch.setattr(stats, "_WARNED_PAPER_SMOOTHING", set())
    y = torch.tensor([0, 1])
    big = torch.randn(2, stats.PAPER_SMOOTHING_WARN_VOCAB)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        properlm.scoring_rule_loss(big, y, rule="spherical", smoothing=0.1)
        properlm.ScoringRuleLoss("spherical", smoothing=0.1)(big, y)  # the same rule and V: not again
        properlm.scoring_rule_loss(big, y, rule="spherical", smoothing=0.1, smoothing_variant="gated")
        properlm.scoring_rule_loss(big, y, rule="logarithmic", smoothing=0.1)
        properlm.scoring_rule_loss(big[:, :1000], y, rule="brier", smoothing=0.1)
        h, w = torch.randn(2, 8), torch.randn(stats.PAPER_SMOOTHING_WARN_VOCAB, 8)
        properlm.fused_linear_scoring_rule_loss(h, w, y, rule="brier", smoothing=0.1)
    texts = [str(c.message) for c in caught if "masked-log" in str(c.message)]
    assert len(texts) == 2 and "'spherical'" in texts[0] and "'brier'" in texts[1]
    assert "smoothing_variant='gated'" in texts[0] and f"{stats.PAPER_SMOOTHING_WARN_VOCAB} tokens" in texts[0]
    monkeypatch.setattr(stats, "_WARNED_PAPER_SMOOTHING", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert "--smoothing-variant gated" in smoothing_warning("power:3", 0.1, "paper", 50000)
        properlm.scoring_rule_loss(torch.randn(2, 50000), y, rule="power:3", smoothing=0.1)
    assert not [c for c in caught if "masked-log" in str(c.message)]
