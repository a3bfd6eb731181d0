"""scoring_rule_loss against the naive float64 reference, identities, reductions, robustness."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import properlm
from properlm import ScoringRuleLoss, scoring_rule_loss
from reference import RULES, naive_loss, rel_err


def _data(shape=(3, 5), V=37, seed=0, scale=3.0, ignore_frac=0.2, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(V, shape, generator=g)
    target[torch.rand(shape, generator=g) < ignore_frac] = -100
    return logits, target


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_naive_float64_reference(rule, smoothing, reduction):
    for seed, shape, V in [(0, (4, 6), 37), (1, (11,), 5), (2, (2, 3, 4), 101)]:
        logits, target = _data(shape, V, seed)
        x = logits.clone().requires_grad_(True)
        ours = scoring_rule_loss(x, target, rule, smoothing=smoothing, reduction=reduction)
        x64 = logits.double().requires_grad_(True)
        ref = naive_loss(x64, target, rule, smoothing, reduction=reduction)
        assert ours.dtype == torch.float32
        assert ours.shape == ref.shape
        assert rel_err(ours, ref) < 1e-5, (rule, seed)
        w = torch.randn(ref.shape, dtype=torch.float64) if reduction == "none" else torch.ones((), dtype=torch.float64)
        (g,) = torch.autograd.grad((ours * w.float()).sum(), x)
        (g_ref,) = torch.autograd.grad((ref * w).sum(), x64)
        assert rel_err(g, g_ref) < 1e-5, (rule, seed)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_float64_input_is_computed_in_float64(rule, smoothing):
    logits, target = _data((5, 4), 23, seed=3, dtype=torch.float64)
    x = logits.clone().requires_grad_(True)
    ours = scoring_rule_loss(x, target, rule, smoothing=smoothing, reduction="none")
    assert ours.dtype == torch.float64
    x64 = logits.clone().requires_grad_(True)
    ref = naive_loss(x64, target, rule, smoothing, reduction="none")
    assert rel_err(ours, ref) < 1e-12
    w = torch.randn(ref.shape, dtype=torch.float64)
    (g,) = torch.autograd.grad((ours * w).sum(), x)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x64)
    assert rel_err(g, g_ref) < 1e-12


@pytest.mark.parametrize("rule", ["brier", "spherical", "power:3", "pseudo-spherical:3"])
def test_gradcheck(rule):
    logits, target = _data((3, 4), 9, seed=4, dtype=torch.float64)
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: scoring_rule_loss(t, target, rule, smoothing=0.1, reduction="none"), (x,))


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
def test_logarithmic_is_cross_entropy(smoothing):
    logits, target = _data((6, 7), 50, seed=5)
    x = logits.clone().requires_grad_(True)
    ours = scoring_rule_loss(x, target, "logarithmic", smoothing=smoothing)
    x2 = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(x2.view(-1, 50), target.view(-1), label_smoothing=smoothing)
    assert abs(ours.item() - ref.item()) < 1e-6
    (g,) = torch.autograd.grad(ours, x)
    (g2,) = torch.autograd.grad(ref, x2)
    assert (g - g2).abs().max() < 1e-6
    for red in ("sum", "none"):
        a = scoring_rule_loss(logits, target, "log", smoothing=smoothing, reduction=red)
        b = F.cross_entropy(logits.view(-1, 50), target.view(-1), label_smoothing=smoothing, reduction=red)
        assert torch.allclose(a.view(-1), b.view(-1), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize(("a", "b"), [("pseudo-spherical:2", "spherical"), ("power:2", "brier")])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_identities(a, b, smoothing):
    logits, target = _data((4, 5), 30, seed=6)
    la = scoring_rule_loss(logits, target, a, smoothing=smoothing, reduction="none")
    lb = scoring_rule_loss(logits, target, b, smoothing=smoothing, reduction="none")
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rule", RULES)
def test_loss_nonnegative_and_zero_for_one_hot(rule):
    logits, target = _data((8,), 20, seed=7, ignore_frac=0.0)
    loss = scoring_rule_loss(logits, target, rule, reduction="none")
    assert (loss >= 0).all()
    one_hot = torch.full((8, 20), -1e4)
    one_hot[torch.arange(8), target] = 1e4
    assert scoring_rule_loss(one_hot, target, rule, reduction="none").abs().max() == 0


def test_num_items_in_batch_and_mean():
    logits, target = _data((4, 6), 13, seed=8)
    total = scoring_rule_loss(logits, target, "brier", reduction="sum")
    mean = scoring_rule_loss(logits, target, "brier")
    n = (target != -100).sum()
    torch.testing.assert_close(mean, total / n)
    torch.testing.assert_close(scoring_rule_loss(logits, target, "brier", num_items_in_batch=50), total / 50)
    torch.testing.assert_close(
        scoring_rule_loss(logits, target, "brier", num_items_in_batch=torch.tensor(50)), total / 50
    )
    with pytest.raises(ValueError, match="num_items_in_batch"):
        scoring_rule_loss(logits, target, "brier", num_items_in_batch=0)


def test_custom_ignore_index():
    logits, target = _data((10,), 8, seed=9, ignore_frac=0.0)
    target[:3] = 7
    a = scoring_rule_loss(logits, target, "spherical", ignore_index=7, reduction="none")
    assert (a[:3] == 0).all() and (a[3:] > 0).all()


def test_module_matches_function_and_repr():
    logits, target = _data((4, 6), 13, seed=10)
    crit = ScoringRuleLoss("power:3", smoothing=0.1, reduction="sum")
    torch.testing.assert_close(crit(logits, target), scoring_rule_loss(logits, target, "power:3", 0.1, reduction="sum"))
    assert "power:3" in repr(crit) and "smoothing=0.1" in repr(crit)
    assert isinstance(crit, torch.nn.Module)


def test_token_and_sequence_scores():
    logits, target = _data((3, 7), 15, seed=11)
    for rule in RULES:
        ts = properlm.token_scores(logits, target, rule)
        assert ts.shape == target.shape
        assert (ts[target == -100] == 0).all()
        r = properlm.get_rule(rule)
        ref = r.s_max - naive_loss(logits, target, rule, reduction="none")
        torch.testing.assert_close(ts.double(), torch.where(target != -100, ref, 0.0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(properlm.sequence_scores(logits, target, rule), ts.sum(-1))
    x = logits.clone().requires_grad_(True)
    properlm.sequence_scores(x, target, "spherical").sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ------------------------------------------------------------------ robustness


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", RULES)
def test_low_precision_inputs(dtype, rule):
    logits, target = _data((6, 5), 64, seed=12, dtype=dtype)
    x = logits.clone().requires_grad_(True)
    loss = scoring_rule_loss(x, target, rule, smoothing=0.1)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype
    ref = naive_loss(logits.double(), target, rule, 0.1)  # same rounded inputs, float64 maths
    assert rel_err(loss, ref) < 1e-5
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_huge_logits_and_underflow(rule, smoothing):
    V = 50
    g = torch.Generator().manual_seed(13)
    logits = (torch.rand(8, V, generator=g) * 2 - 1) * 1e4  # +-1e4: almost every p_j underflows to 0
    target = torch.randint(V, (8,), generator=g)
    target[0] = logits[0].argmax()
    x = logits.clone().requires_grad_(True)
    loss = scoring_rule_loss(x, target, rule, smoothing=smoothing, reduction="none")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    ref = naive_loss(logits.double(), target, rule, smoothing, reduction="none")
    if not torch.isfinite(ref).all():  # the naive way breaks here (log 0): compare in log space
        ref = naive_loss(logits.double(), target, rule, 0.0, reduction="none")
        assert smoothing > 0 or "log" in rule  # the log score (alone or in a mixture)
    else:
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)


def test_paper_reference_nan_case_is_finite():
    """The paper's code computes log(probs) * mask, which breaks where probs underflows to 0."""
    logits = torch.tensor([[200.0, 0.0, -200.0, 5.0]])
    target = torch.tensor([0])
    x0 = logits.clone().requires_grad_(True)
    probs = torch.softmax(x0, -1)
    paper_term = (torch.log(probs) * (probs < 0.1 / 4)).sum()
    paper_term.backward()
    assert (probs == 0).any() and not torch.isfinite(paper_term) and torch.isnan(x0.grad).any()
    for rule in ("brier", "spherical"):
        x = logits.clone().requires_grad_(True)
        loss = scoring_rule_loss(x, target, rule, smoothing=0.1)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        # masked-log term: (eps/V) * sum over masked j of (z_j - L1); finite, large and negative
        expected_masked = 0.1 / 4 * ((0.0 - 200.0) + (-200.0 - 200.0) + (5.0 - 200.0))
        unsmoothed_mean = properlm.get_rule(rule).mean_score(
            {1.0: torch.tensor([200.0]), 2.0: torch.tensor([400.0])}, None, torch.tensor(4.0)
        )
        expected = 1 - (0.9 * 1.0 + 0.1 * unsmoothed_mean + expected_masked)
        torch.testing.assert_close(loss, expected.squeeze(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_neg_inf_masked_vocabulary(rule, smoothing):
    """-inf logits have p = 0 and take no part; V is the number of finite logits."""
    logits, target = _data((5,), 12, seed=14, ignore_frac=0.0)
    masked = logits.clone()
    masked[:, 8:] = -float("inf")
    target = target % 8
    x = masked.clone().requires_grad_(True)
    loss = scoring_rule_loss(x, target, rule, smoothing=smoothing, reduction="none")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    assert (x.grad[:, 8:] == 0).all()
    ref = scoring_rule_loss(logits[:, :8], target, rule, smoothing=smoothing, reduction="none")
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(reduction):
    logits = torch.randn(3, 4, 10, requires_grad=True)
    target = torch.full((3, 4), -100)
    loss = scoring_rule_loss(logits, target, "spherical", smoothing=0.1, reduction=reduction)
    assert torch.isfinite(loss).all() and (loss == 0).all()
    loss.sum().backward()
    assert (logits.grad == 0).all()


def test_empty_batch():
    loss = scoring_rule_loss(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long), "brier")
    assert loss.item() == 0


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rule": "nope"}, r"unknown scoring rule 'nope'.*brier.*logarithmic.*spherical"),
        ({"rule": "power:1"}, r"alpha > 1"),
        ({"rule": "pseudo-spherical:0.5"}, r"alpha > 1"),
        ({"rule": "power:abc"}, r"not a number"),
        ({"smoothing": 1.0}, r"smoothing must be in \[0, 1\)"),
        ({"smoothing": -0.1}, r"smoothing must be in \[0, 1\)"),
        ({"reduction": "avg"}, r"reduction must be one of 'mean', 'sum', 'none'"),
    ],
)
def test_bad_arguments(kwargs, match):
    logits, target = _data((2, 3), 7)
    args = {"rule": "brier", **kwargs}
    with pytest.raises(ValueError, match=match):
        scoring_rule_loss(logits, target, **args)


def test_bad_tensors():
    logits, target = _data((2, 3), 7, ignore_frac=0.0)
    with pytest.raises(ValueError, match=r"outside \[0, 7\).*first: 7"):
        scoring_rule_loss(logits, torch.where(target == target[0, 0], 7, target), "brier")
    with pytest.raises(ValueError, match=r"outside \[0, 7\)"):
        scoring_rule_loss(logits, torch.full((2, 3), -1), "brier")
    with pytest.raises(ValueError, match=r"shape mismatch.*\(2, 3, 7\).*\(2, 3\).*\(3, 2\)"):
        scoring_rule_loss(logits, target.T, "brier")
    with pytest.raises(ValueError, match="floating-point.*torch.int64"):
        scoring_rule_loss(logits.long(), target, "brier")
    with pytest.raises(ValueError, match="integer token ids"):
        scoring_rule_loss(logits, target.float(), "brier")
    with pytest.raises(ValueError, match="smoothing"):
        ScoringRuleLoss("brier", smoothing=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("ignore_frac", [0.0, 0.3])
@pytest.mark.parametrize("rule", ["logarithmic", "brier", "pseudo-spherical:1.5"])
def test_many_row_blocks_match_one_block(monkeypatch, dtype, ignore_frac, rule):
    """Blocks of 3 rows (gathered, upcast or in place) give what one block gives."""
    import properlm.options as loss_mod

    logits, target = _data((4, 5), 17, seed=15, ignore_frac=ignore_frac, dtype=dtype)
    w = torch.randn(4, 5, dtype=torch.float64)

    def run():
        x = logits.clone().requires_grad_(True)
        out = scoring_rule_loss(x, target, rule, smoothing=0.1, reduction="none")
        (out.double() * w).sum().backward()
        return out.detach(), x.grad

    one = run()
    monkeypatch.setattr(loss_mod, "BLOCK_ELEMENTS", 3 * 17)
    many = run()
    torch.testing.assert_close(many[0], one[0], rtol=0, atol=0)
    torch.testing.assert_close(many[1], one[1], rtol=1e-6, atol=1e-7)
    assert (many[1][target == -100] == 0).all()
    ref = naive_loss(logits.double(), target, rule, 0.1, reduction="none")
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5}[dtype]
    assert rel_err(many[0], ref) < tol


def test_the_default_rule_is_logarithmic_everywhere():
    """Without ``rule=`` every entry point is the logarithmic score (cross-entropy), as ``properlm train``'s
    default: one default for the API and the CLI."""
    import inspect

    import torch.nn.functional as F

    import properlm
    from properlm.training import TrainConfig

    z, y = torch.randn(6, 11, dtype=torch.float64), torch.randint(11, (6,))
    assert torch.allclose(properlm.scoring_rule_loss(z, y), F.cross_entropy(z, y))
    assert torch.allclose(properlm.ScoringRuleLoss()(z, y), F.cross_entropy(z, y))
    h, w = torch.randn(6, 4, dtype=torch.float64), torch.randn(11, 4, dtype=torch.float64)
    assert torch.allclose(properlm.fused_linear_scoring_rule_loss(h, w, y), F.cross_entropy(h @ w.T, y))
    for fn in (
        properlm.scoring_rule_loss,
        properlm.ScoringRuleLoss,
        properlm.fused_linear_scoring_rule_loss,
        properlm.LinearScoringRuleLoss,
        properlm.apply_scoring_rule,
    ):
        assert inspect.signature(fn).parameters["rule"].default == "logarithmic", fn
    assert TrainConfig().rule == "logarithmic"
