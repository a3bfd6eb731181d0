"""Strict propriety, property-based: E_{y~q} S(p, y) < E_{y~q} S(q, y) for p != q, and with
smoothing the expected smoothed score of a one-hot target is maximised at
q_eps = (1 - eps) onehot + eps / V."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import properlm
from reference import RULES


def _expected_score(p: torch.Tensor, q: torch.Tensor, rule: str, smoothing: float = 0.0) -> float:
    """E_{y~q} S_eps(p, y), computed through the public loss (``S = S_max - loss``)."""
    V = p.shape[-1]
    logits = torch.log(p).expand(V, V).contiguous()
    target = torch.arange(V)
    loss = properlm.scoring_rule_loss(logits, target, rule, smoothing=smoothing, reduction="none")
    return float((q * (properlm.get_rule(rule).s_max - loss)).sum())


def _distribution(draw, V: int, floor: float = 0.02) -> torch.Tensor:
    w = torch.tensor(draw(st.lists(st.floats(floor, 1.0), min_size=V, max_size=V)), dtype=torch.float64)
    return w / w.sum()


@st.composite
def _pair(draw):
    V = draw(st.integers(2, 6))
    q = _distribution(draw, V)
    p = _distribution(draw, V)
    return q, p


@settings(max_examples=60, deadline=None)
@given(pair=_pair(), rule=st.sampled_from(RULES))
def test_strictly_proper(pair, rule):
    q, p = pair
    if (p - q).abs().max() < 0.02:  # strictness margin must beat float32 rounding
        p = (p + torch.nn.functional.one_hot(torch.tensor(0), len(p))) / 2
    honest = _expected_score(q, q, rule)
    other = _expected_score(p, q, rule)
    assert other < honest, (rule, q, p)


@settings(max_examples=40, deadline=None)
@given(
    V=st.integers(3, 8),
    y=st.integers(0, 7),
    eps=st.sampled_from([0.05, 0.1, 0.3]),
    rule=st.sampled_from(RULES),
    noise=st.lists(st.floats(-1.0, 1.0), min_size=8, max_size=8),
    size=st.sampled_from([0.02, 0.1, 0.5]),
)
def test_smoothed_optimum_is_smoothed_one_hot(V, y, eps, rule, noise, size):
    y = y % V
    onehot = torch.nn.functional.one_hot(torch.tensor(y), V).double()
    q_eps = (1 - eps) * onehot + eps / V
    best = _expected_score(q_eps, onehot, rule, eps)
    d = torch.tensor(noise[:V], dtype=torch.float64)
    d = d - d.mean()
    if d.abs().max() < 1e-3:
        d = torch.linspace(-1, 1, V, dtype=torch.float64)
    # move towards another distribution on the simplex (stay strictly positive)
    target = torch.softmax(d * 3, 0)
    p = (1 - size) * q_eps + size * target
    assert _expected_score(p, onehot, rule, eps) < best, (rule, V, y, eps)
