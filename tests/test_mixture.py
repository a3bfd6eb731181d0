"""Mixtures of scoring rules: spec parsing and errors, the definition of their smoothing, and
value and gradient against the weighted sum of the component losses on every path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import properlm
from properlm import Mixture, fused_linear_scoring_rule_loss, get_rule, scoring_rule_loss
from properlm.evaluation.decoding import ScoringRuleObjective, all_token_scores
from properlm.evaluation.metrics import token_level_outputs
from properlm.integrations.schedule import RuleSchedule
from reference import MIXTURES, mixture_components, naive_loss, rel_err

REDUCTIONS = ["mean", "sum", "none"]


def _data(seed: int, n: int = 12, V: int = 17, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, V, generator=g) * 3).to(dtype)
    target = torch.randint(V, (n,), generator=g)
    target[::5] = -100
    logits[1, 3] = -float("inf")  # a masked vocabulary entry
    target[1] = 0
    return logits, target


# ---------------------------------------------------------------------- the spec


def test_spec_round_trip_and_attributes():
    r = get_rule("0.5*logarithmic+0.5*spherical")
    assert isinstance(r, Mixture) and r.spec == "0.5*logarithmic+0.5*spherical"
    assert get_rule(r.spec) == r and get_rule(r) is r
    assert r.s_max == 0.5 and r.masked_log_weight == 0.5 and r.uses_logit_sum
    assert r.scales() == (1.0, 2.0)
    m = get_rule("logarithmic+0.1*power:3")
    assert m.spec == "logarithmic+0.1*power:3" and m.components[0] == (1.0, get_rule("logarithmic"))
    assert m.scales(0.1) == (1.0, 2.0, 3.0)  # power:3 smoothed needs L_1, L_2, L_3
    assert get_rule("2*LOG").s_max == 0.0 and not get_rule("2*log").masked_log_smoothing
    assert get_rule("1e-3*brier+1e+0*cross-entropy").spec == "0.001*brier+logarithmic"
    # nested mixtures flatten, object form equals the spec
    nested = Mixture([(2.0, "0.5*brier+0.5*spherical"), (1.0, properlm.Logarithmic())])
    assert nested.spec == "brier+spherical+logarithmic"
    assert Mixture([(0.5, "logarithmic"), (0.5, "spherical")]) == r


@pytest.mark.parametrize(
    "spec, message",
    [
        ("0.5*", "missing rule after '\\*'"),
        ("-1*brier", "weight must be a positive finite number, got '-1'"),
        ("0*log", "weight must be a positive finite number, got '0'"),
        ("brier+", "term 2 is empty"),
        ("+brier", "term 1 is empty"),
        ("*brier", "missing weight before"),
        ("x*brier", "weight must be a number, got 'x'"),
        ("0.5*brier*2", "one '\\*' per term"),
        ("inf*brier", "positive finite"),
        ("0.5*nope+0.5*brier", "term 1 .*unknown scoring rule 'nope'"),
        ("0.5*power:1", "term 1 .*alpha > 1"),
    ],
)
def test_malformed_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        get_rule(spec)


def test_object_form_errors():
    with pytest.raises(ValueError, match="non-empty sequence"):
        Mixture([])
    with pytest.raises(ValueError, match="component 1: the weight must be a positive"):
        Mixture([(-0.5, "brier")])
    with pytest.raises(ValueError, match="component 2: expected a \\(weight, rule\\) pair"):
        Mixture([(0.5, "brier"), "spherical"])


# ---------------------------------------------------------------------- definition of smoothing


@pytest.mark.parametrize("spec", MIXTURES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_equals_weighted_sum_of_component_losses(spec, smoothing, reduction):
    """The definition: loss and gradient of ``sum_i w_i R_i`` = ``sum_i w_i`` (loss and gradient
    of ``R_i``), smoothing included (each component smoothed as alone, so the masked-log term
    enters with the total weight of the bounded components), against the float64 formulas too."""
    logits, target = _data(hash(spec) % 1000 + int(10 * smoothing))
    x = logits.clone().requires_grad_(True)
    up = torch.randn(target.shape, dtype=torch.float64) if reduction == "none" else torch.tensor(1.3)
    loss = scoring_rule_loss(x, target, spec, smoothing=smoothing, reduction=reduction, num_items_in_batch=None)
    (gx,) = torch.autograd.grad((loss * up).sum(), x)
    ref_loss, ref_grad = 0.0, 0.0
    for w, comp in mixture_components(spec):
        xc = logits.clone().requires_grad_(True)
        lc = scoring_rule_loss(xc, target, comp, smoothing=smoothing, reduction=reduction)
        (gc,) = torch.autograd.grad((lc * up).sum(), xc)
        ref_loss, ref_grad = ref_loss + w * lc.detach(), ref_grad + w * gc
    assert rel_err(loss, ref_loss) < 1e-12 and rel_err(gx, ref_grad) < 1e-12
    finite = logits.clone()
    finite[1, 3] = -30.0  # the naive formulas take log 0 at a -inf logit
    naive = naive_loss(finite, target, spec, smoothing, reduction=reduction)
    assert rel_err(scoring_rule_loss(finite, target, spec, smoothing=smoothing, reduction=reduction), naive) < 1e-10


@pytest.mark.parametrize("spec", ["0.5*logarithmic+0.5*spherical", "0.3*brier+0.7*pseudo-spherical:1.5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_is_finite_and_close(spec, dtype):
    logits, target = _data(7, n=32, V=300, dtype=torch.float32)
    logits[1, 3] = -20.0  # finite: the naive reference takes log p
    x = logits.to(dtype).requires_grad_(True)
    loss = scoring_rule_loss(x, target, spec, smoothing=0.1)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert rel_err(loss, naive_loss(x.detach().double(), target, spec, 0.1)) < 1e-5


@pytest.mark.parametrize("spec", ["0.5*logarithmic+0.5*spherical", "logarithmic+0.1*power:3", "2*brier"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_chunked_equals_unfused(spec, smoothing, reduction):
    g = torch.Generator().manual_seed(3)
    N, H, V = 19, 8, 23
    h = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(V, (N,), generator=g)
    y[::4] = -100
    up = torch.randn(N, dtype=torch.float64) if reduction == "none" else torch.tensor(0.7, dtype=torch.float64)
    fused = fused_linear_scoring_rule_loss(
        h, w, y, rule=spec, smoothing=smoothing, reduction=reduction, chunk_size=5, impl="torch"
    )
    gf = torch.autograd.grad((fused * up).sum(), (h, w))
    ref = naive_loss(h @ w.T, y, spec, smoothing, reduction=reduction)
    gr = torch.autograd.grad((ref * up).sum(), (h, w))
    assert rel_err(fused, ref) < 1e-10
    for a, b in zip(gf, gr):
        assert rel_err(a, b) < 1e-10


# ---------------------------------------------------------------------- propriety


def _expected_score(p: torch.Tensor, q: torch.Tensor, rule: str, smoothing: float = 0.0) -> float:
    V = p.shape[-1]
    logits = torch.log(p).expand(V, V).contiguous()
    loss = scoring_rule_loss(logits, torch.arange(V), rule, smoothing=smoothing, reduction="none")
    return float((q * (get_rule(rule).s_max - loss)).sum())


@settings(max_examples=60, deadline=None)
@given(
    V=st.integers(2, 6),
    w=st.lists(st.floats(0.05, 3.0), min_size=2, max_size=2),
    comps=st.sampled_from(
        [
            ("logarithmic", "spherical"),
            ("brier", "pseudo-spherical:3"),
            ("power:1.5", "spherical"),
            ("logarithmic", "power:3"),
        ]
    ),
    data=st.data(),
)
def test_mixture_is_strictly_proper(V, w, comps, data):
    spec = f"{w[0]!r}*{comps[0]}+{w[1]!r}*{comps[1]}"

    def dist():
        x = torch.tensor(data.draw(st.lists(st.floats(0.02, 1.0), min_size=V, max_size=V)), dtype=torch.float64)
        return x / x.sum()

    q, p = dist(), dist()
    if (p - q).abs().max() < 0.02:
        p = (p + torch.nn.functional.one_hot(torch.tensor(0), V)) / 2
    assert _expected_score(p, q, spec) < _expected_score(q, q, spec)


@settings(max_examples=30, deadline=None)
@given(
    V=st.integers(3, 8),
    y=st.integers(0, 7),
    eps=st.sampled_from([0.05, 0.1, 0.3]),
    spec=st.sampled_from(MIXTURES),
    noise=st.lists(st.floats(-1.0, 1.0), min_size=8, max_size=8),
    size=st.sampled_from([0.02, 0.1, 0.5]),
)
def test_smoothed_mixture_optimum_is_smoothed_one_hot(V, y, eps, spec, noise, size):
    """With smoothing the expected score of a one-hot target is maximised exactly at
    ``(1 - eps) onehot + eps / V``, as for each component."""
    y = y % V
    onehot = torch.nn.functional.one_hot(torch.tensor(y), V).double()
    q_eps = (1 - eps) * onehot + eps / V
    d = torch.tensor(noise[:V], dtype=torch.float64)
    d = d - d.mean() if d.abs().max() >= 1e-3 else torch.linspace(-1, 1, V, dtype=torch.float64)
    p = (1 - size) * q_eps + size * torch.softmax(d * 3, 0)
    assert _expected_score(p, onehot, spec, eps) < _expected_score(q_eps, onehot, spec, eps)


# ---------------------------------------------------------------------- evaluation, decoding, schedules


def test_evaluation_and_decoding_scores_are_weighted_sums():
    logits, target = _data(11, dtype=torch.float32)
    spec = "0.25*logarithmic+0.75*brier"
    out = token_level_outputs(logits, target, [spec, "logarithmic", "brier"])
    torch.testing.assert_close(out[f"score:{spec}"], 0.25 * out["score:logarithmic"] + 0.75 * out["score:brier"])
    scores = torch.randn(3, 11)
    expected_all = 0.25 * all_token_scores(scores, "logarithmic") + 0.75 * all_token_scores(scores, "brier")
    torch.testing.assert_close(all_token_scores(scores, spec), expected_all)
    obj = ScoringRuleObjective(spec, subtract_max=True)
    expected = 0.25 * all_token_scores(scores, "logarithmic") + 0.75 * (all_token_scores(scores, "brier") - 1)
    torch.testing.assert_close(obj(torch.zeros(3, 1, dtype=torch.long), scores), expected)


def test_schedule_with_a_mixture_stage():
    s = RuleSchedule.parse("logarithmic:10000,0.5*logarithmic+0.5*spherical:2500")
    assert s.total_steps == 12500 and s.rule_at(10000).spec == "0.5*logarithmic+0.5*spherical"
    s = RuleSchedule.parse("logarithmic:10,logarithmic+0.1*power:3:5")
    assert s.rule_at(12) == get_rule("logarithmic+0.1*power:3")
    assert s.spec == "logarithmic:10,logarithmic+0.1*power:3:5"
    with pytest.raises(ValueError, match="schedule stage 2 .*term 2 is empty"):
        RuleSchedule.parse("logarithmic:10,brier+:5")
