"""Naive float64 reference implementations written straight from the formulas.

They form ``p = softmax(z)`` and take powers and logs of it: exactly what properlm avoids,
and therefore an independent check of its log-sum-exp formulation.
"""

from __future__ import annotations

import torch
from torch import Tensor

RULES = [
    "logarithmic",
    "brier",
    "spherical",
    "power:3",
    "pseudo-spherical:1.5",
    "power:1.5",
    "pseudo-spherical:4",
    "0.5*logarithmic+0.5*spherical",
    "0.3*brier+0.7*pseudo-spherical:1.5",
]
#: mixtures: the reference is the weighted sum of the components' reference losses
MIXTURES = ["0.5*logarithmic+0.5*spherical", "0.3*brier+0.7*pseudo-spherical:1.5", "logarithmic+0.1*power:3", "2*brier"]


def mixture_components(rule: str) -> list[tuple[float, str]] | None:
    """``[(w, component spec), ...]`` of a mixture spec written ``W*RULE+W*RULE`` (``None`` for a
    plain rule). Written independently of properlm's parser (no exponents with ``+``)."""
    if "+" not in rule and "*" not in rule:
        return None
    out = []
    for term in rule.split("+"):
        w, star, r = term.partition("*")
        out.append((float(w), r) if star else (1.0, term))
    return out


def _parse(rule: str) -> tuple[str, float]:
    name, _, arg = rule.partition(":")
    return name, float(arg) if arg else 2.0


def naive_scores_all(p: Tensor, rule: str) -> Tensor:
    """``S(p, k)`` for every ``k``: ``(..., V) -> (..., V)``, from the probabilities."""
    name, a = _parse(rule)
    if name == "logarithmic":
        return torch.log(p)
    if name == "brier":
        return 2 * p - (p**2).sum(-1, keepdim=True)
    if name == "spherical":
        return p / p.norm(dim=-1, keepdim=True)
    if name == "pseudo-spherical":
        return (p / (p**a).sum(-1, keepdim=True) ** (1 / a)) ** (a - 1)
    if name == "power":
        return a * p ** (a - 1) - (a - 1) * (p**a).sum(-1, keepdim=True)
    raise KeyError(rule)


def rel_err(a: Tensor, b: Tensor) -> float:
    """``max |a - b| / max |b|`` in float64 on the CPU (``a`` and ``b`` on any device)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


S_MAX = {"logarithmic": 0.0}


def naive_loss(
    logits: Tensor,
    target: Tensor,
    rule: str,
    smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: float | None = None,
) -> Tensor:
    """Per-token ``S_max - S_eps`` in float64 from the formulas, then reduced. A mixture's loss
    is the weighted sum of its components' losses."""
    comps = mixture_components(rule)
    if comps is not None:
        per_token = sum(w * naive_loss(logits, target, r, smoothing, ignore_index, "none") for w, r in comps)
        valid = target != ignore_index
        if reduction == "none":
            return per_token
        if reduction == "sum":
            return per_token.sum()
        if num_items_in_batch is not None:
            return per_token.sum() / num_items_in_batch
        return per_token.sum() / valid.sum().clamp(min=1)
    z = logits.double()
    V = z.shape[-1]
    p = torch.softmax(z, -1)
    valid = target != ignore_index
    y = torch.where(valid, target, 0)
    all_scores = naive_scores_all(p, rule)
    s = all_scores.gather(-1, y[..., None]).squeeze(-1)
    if smoothing > 0:
        s = (1 - smoothing) * s + smoothing * all_scores.mean(-1)
        if not rule.startswith("log"):
            mask = (p < smoothing / V).detach()
            s = s + smoothing / V * (torch.where(mask, torch.log_softmax(z, -1), 0.0)).sum(-1)
    s_max = S_MAX.get(_parse(rule)[0], 1.0)
    loss = torch.where(valid, s_max - s, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if num_items_in_batch is not None:
        return loss.sum() / num_items_in_batch
    return loss.sum() / valid.sum().clamp(min=1)
