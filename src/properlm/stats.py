"""Per-token statistics of the logits, the smoothed score as a function of them, and the logit gradient.

The gradient with respect to the logits is formed from the partial derivatives of the score as a
function of the statistics. This module is the one place where logits are turned into scores. Every path (unfused,
fused chunked, Triton, vocabulary-parallel, evaluation) computes the same
:class:`TokenStats`, evaluates :func:`smoothed_score` on them, and -- for training --
turns the per-token partial derivatives into a logit gradient with :func:`logits_grad`:

    d f / d z_j = f_zy [j = y] + sum_c f_Lc c softmax(c z)_j + f_sumz [j finite]
                  + f_msum [j in M]

because ``d LSE(c z) / d z_j = c softmax(c z)_j``. The masked set
``M = {j : p_j < eps / V}`` is a constant of the gradient, as the paper prescribes.

Numerics: logits are upcast to float32 (float64 stays float64) and shifted by their
maximum ``m`` (see :class:`TokenStats`); with ``e = exp(z - m)``,
``LSE(c (z - m)) = log sum_j e_j^c`` (the largest term is 1, so nothing overflows and
underflowing terms are negligible against it), and ``softmax(c z) = e^c exp(-lse[c])``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from .rules import Logarithmic, ScoringRule

_LOG = Logarithmic()

__all__ = [
    "PAPER_SMOOTHING_WARN_VOCAB",
    "TokenStats",
    "compute_stats",
    "head_transform_",
    "head_transform_factor",
    "logits_grad",
    "loss_and_partials",
    "masked_log_eps",
    "masked_set",
    "masked_threshold",
    "rule_scores",
    "scale_power",
    "smoothed_score",
    "warn_paper_smoothing",
]


@dataclass
class TokenStats:
    """Statistics of ``n`` rows of logits ``z`` (shape ``(n, V)``), each of shape ``(n,)``.

    The logit statistics are those of the *shifted* logits ``z - m`` with ``m = max_j z_j``:
    every rule depends on ``p = softmax(z)`` only, so the scores are unchanged, while the
    differences between large logits (``|z| ~ 1e4``) keep their full precision (``c m``
    would round away ``c * ulp(m)``). Differentiating with ``m`` held constant is exact for
    the same reason (shift invariance cancels the terms through ``m``).

    Attributes:
        z_y: target logit, ``z_y - m``.
        lse: ``{c: LSE(c (z - m))}`` for each scale the rule needs (``LSE(c z) - c m``).
        num_classes: number of finite logits ``V`` (dtype of ``z``).
        max_logit: ``m = max_j z_j`` (used to rebuild ``exp(z - m)`` for the gradient).
        sum_z: ``sum_j (z_j - m)`` over the finite logits, or ``None`` when not needed.
        masked_sum_z: ``sum_{j in M} (z_j - m)``, or ``None`` without a masked-log term.
        masked_count: ``|M|`` (dtype of ``z``), or ``None``.
    """

    z_y: Tensor
    lse: dict[float, Tensor]
    num_classes: Tensor
    max_logit: Tensor
    sum_z: Tensor | None = None
    masked_sum_z: Tensor | None = None
    masked_count: Tensor | None = None

    def index(self, idx: Tensor | slice) -> TokenStats:
        """Rows ``idx`` of every statistic."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                out[f.name] = v[idx]
            elif isinstance(v, dict):
                out[f.name] = {k: t[idx] for k, t in v.items()}
            else:
                out[f.name] = v
        return replace(self, **out)

    @staticmethod
    def cat(parts: list[TokenStats]) -> TokenStats:
        """Row-wise concatenation of the statistics of consecutive row blocks."""
        if len(parts) == 1:
            return parts[0]
        out: dict[str, object] = {}
        for f in fields(TokenStats):
            vals = [getattr(p, f.name) for p in parts]
            if vals[0] is None:
                out[f.name] = None
            elif isinstance(vals[0], dict):
                out[f.name] = {c: torch.cat([v[c] for v in vals]) for c in vals[0]}
            else:
                out[f.name] = torch.cat(vals)
        return TokenStats(**out)  # type: ignore[arg-type]

    def scaled(self, w: Tensor) -> TokenStats:
        """For partial derivatives: every differentiable field multiplied by ``w`` (``(n,)``)."""
        return replace(
            self,
            z_y=self.z_y * w,
            lse={c: v * w for c, v in self.lse.items()},
            sum_z=None if self.sum_z is None else self.sum_z * w,
            masked_sum_z=None if self.masked_sum_z is None else self.masked_sum_z * w,
        )


def scale_power(e: Tensor, c: float, out: Tensor | None = None) -> Tensor:
    """``e ** c`` (``e`` itself for ``c = 1``), written into ``out`` when given and ``c != 1``.

    Half-integer exponents up to 4.5 (``pseudo-spherical:1.5`` needs 1.5 and 0.5) are formed
    as ``sqrt(e) * e * ... * e``: a general ``pow`` costs a ``log`` and an ``exp`` per
    element, about nine times a ``sqrt`` and a product (same value to a few units of rounding).
    """
    if c == 1.0:
        return e
    if c == 2.0:
        return torch.mul(e, e, out=out)
    if 0 < c <= 4.5 and (2 * c).is_integer() and not float(c).is_integer():
        r = torch.sqrt(e, out=out)
        for _ in range(int(c)):
            r.mul_(e)
        return r
    return torch.pow(e, c, out=out)


def head_transform_(z: Tensor, softcap: float | None = None, logit_scale: float | None = None) -> Tensor:
    """The output-head transform of float logits ``z`` (``(n, V)``), **in place**.

    In order:

        z' = s z              (logit scale / multiplier ``s = logit_scale``, Cohere, Granite),
        z'' = c tanh(z' / c)  (final-logit soft-capping ``c = softcap``, Gemma 2/3),

    each step only when its argument is given (both ``None``: ``z`` unchanged). Entries of
    ``-inf`` (masked vocabulary) stay ``-inf``: ``tanh`` alone would make them ``-c``, giving
    them probability and a place in ``V``. Every path applies this to its block, chunk, tile or
    shard of logits where they are formed, so the statistics and the rule see ``z''``. Returns ``z``.
    """
    if softcap is None:
        if logit_scale is not None:
            z.mul_(logit_scale)
        return z
    # the mask only when a -inf is there (a host read; under torch.compile always the mask instead)
    neg: Tensor | None
    if torch.compiler.is_compiling():
        neg = torch.isneginf(z)
    else:
        neg = torch.isneginf(z) if z.numel() and bool(torch.isneginf(z.amin())) else None
    z.mul_((1.0 if logit_scale is None else logit_scale) / softcap).tanh_().mul_(softcap)
    return z if neg is None else z.masked_fill_(neg, -math.inf)


def head_transform_factor(
    zt: Tensor, softcap: float | None = None, logit_scale: float | None = None, *, out: Tensor | None = None
) -> Tensor | float | None:
    """``dz'' / dz`` of :func:`head_transform_`, from the *transformed* logits ``zt = z''``.

    That is:

        s (1 - (z'' / c)^2) = s (1 - tanh(s z / c)^2)    (``0`` where ``z'' = -inf``),

    a tensor of ``zt``'s shape (written into ``out`` when given) with a softcap, the scalar
    ``s`` with a logit scale only, ``None`` for the identity. The logit gradient of the
    transformed loss is the gradient with respect to ``z''`` times this factor, elementwise.
    """
    if softcap is None:
        return logit_scale
    f = torch.div(zt, softcap, out=out).square_()
    # 1 - t^2, clamped: -inf entries give -inf (-> 0), rounding of |t| to 1 + ulp a tiny negative
    f = f.neg_().add_(1.0).clamp_(min=0.0)
    return f if logit_scale is None else f.mul_(logit_scale)


#: from this vocabulary size on, the paper's masked-log smoothing of a bounded rule is warned about: it
#: trained well at V = 6,000 (Multi30k, benchmarks/RESULTS.md) and collapsed SmolLM2 (V = 49,152) within 4
#: steps; in ``benchmarks/smoothing_large_vocab.py`` the damage grows with V (README, "Score smoothing")
PAPER_SMOOTHING_WARN_VOCAB = 16384
_WARNED_PAPER_SMOOTHING: set[tuple[str, int]] = set()


def warn_paper_smoothing(
    rule: Any, smoothing: float, smoothing_variant: str, vocab_size: int, stacklevel: int = 3
) -> bool:
    """Warn once per rule and vocabulary size when the paper's masked-log smoothing meets a large vocabulary.

    The combination: a bounded ``rule`` (``masked_log_smoothing``) smoothed with ``smoothing > 0`` and
    ``smoothing_variant="paper"`` at ``vocab_size >= PAPER_SMOOTHING_WARN_VOCAB``. Returns whether it is that
    combination (warned now or before); silent while ``torch.compile`` traces (no graph break). ``stacklevel``
    is that of ``warnings.warn`` (3: the caller of this function's caller).

    The term pulls the target's probability down by about ``eps`` per token until every tail token reaches
    ``eps / V``; under Adam that flattens a large vocabulary's distribution within a few steps.
    ``smoothing_variant="gated"`` keeps the smoothed optimum without the collapse.
    """
    risky = (
        smoothing > 0
        and smoothing_variant == "paper"
        and bool(getattr(rule, "masked_log_smoothing", False))
        and vocab_size >= PAPER_SMOOTHING_WARN_VOCAB
    )
    if not risky or torch.compiler.is_compiling():
        return risky
    key = (str(getattr(rule, "spec", rule)), int(vocab_size))
    if key not in _WARNED_PAPER_SMOOTHING:
        import warnings

        _WARNED_PAPER_SMOOTHING.add(key)
        warnings.warn(
            f"smoothing={smoothing:g} of the bounded rule {key[0]!r} with the paper's masked-log term "
            f"(smoothing_variant='paper') at a vocabulary of {vocab_size} tokens flattens the predicted "
            "distribution within a few steps under Adam (SmolLM2, V = 49152: decoding degenerates); use "
            "smoothing_variant='gated' (or 'none'). README, 'Score smoothing'.",
            UserWarning,
            stacklevel=stacklevel,
        )
    return risky


def masked_log_eps(rule: ScoringRule, smoothing: float, variant: str = "paper") -> float | None:
    """``eps`` when the smoothed score of ``rule`` has the masked-log term, else ``None``.

    It has the term for a bounded rule, ``smoothing > 0`` and a ``variant`` other than ``"none"``.
    """
    return smoothing if (smoothing > 0 and rule.masked_log_smoothing and variant != "none") else None


def masked_threshold(lse1: Tensor, num_classes: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """Per-token threshold ``t`` of the masked set: ``j in M  <=>  exp(z_j - m) < t``.

    ``t = (eps / V) exp(lse1) (1 - 64 finfo(dtype).eps)`` (see :func:`masked_set`).
    """
    return (eps / num_classes) * torch.exp(lse1) * (1 - 64 * torch.finfo(dtype).eps)


def masked_set(e: Tensor, lse1: Tensor, num_classes: Tensor, eps: float, finite: Tensor | None) -> Tensor:
    """Boolean ``(n, V)`` mask of ``M = {j finite : p_j < eps / V}`` from ``e = exp(z - m)``.

    ``lse1`` is the shifted ``LSE(z - m)``, so ``p_j = e_j exp(-lse1)`` and the test is
    ``e_j < (eps / V) exp(lse1)``. The smoothed optimum puts ``p_j = eps / V`` exactly on
    this boundary, so the threshold is lowered by a few units of rounding
    (``64 * finfo(dtype).eps`` relative) lest rounding alone switch the term on there.
    """
    thresh = masked_threshold(lse1, num_classes, eps, e.dtype)
    mask = e < thresh[:, None]
    if finite is not None:
        mask &= finite
    return mask


def compute_stats(
    z: Tensor,
    target: Tensor,
    rule: ScoringRule,
    smoothing: float = 0.0,
    *,
    out: Tensor | None = None,
    work: Tensor | None = None,
    scales: Sequence[float] | None = None,
    variant: str = "paper",
) -> tuple[TokenStats, Tensor, Tensor | None]:
    """Statistics of float32 (or float64) logits ``z`` (``(n, V)``) for targets ``target`` (``(n,)``).

    Returns ``(stats, e, finite)`` where ``e = exp(z - m)`` (kept so that a caller that
    needs the gradient right away does not recompute it) and ``finite`` is the mask of
    finite logits, or ``None`` when every logit is finite. ``out`` (same shape and dtype as
    ``z``), when given, receives ``z - m`` (and then ``e`` when there is no masked-log term),
    and ``work`` (same shape and dtype) holds the powers ``e^c``, so that a caller looping over
    chunks reuses its buffers instead of allocating per chunk. ``scales`` replaces
    ``rule.scales(smoothing)`` (e.g. the union of the scales of several rules). ``variant`` is the
    smoothing variant (:data:`properlm.options.SMOOTHING_VARIANTS`): ``"none"`` needs no masked-set statistics.
    """
    n, V = z.shape
    m = z.amax(dim=-1)
    finite: Tensor | None = None
    if bool((z.amin(dim=-1) == -math.inf).any()):
        finite = z != -math.inf
        num_classes = finite.sum(-1, dtype=z.dtype)
    else:
        num_classes = torch.full((n,), float(V), dtype=z.dtype, device=z.device)
    d = torch.sub(z, m[:, None], out=out)
    eps = masked_log_eps(rule, smoothing, variant)
    sum_z = None
    if smoothing > 0 and rule.uses_logit_sum:
        sum_z = (d if finite is None else torch.where(finite, d, 0.0)).sum(-1)
    e = torch.exp(d) if eps is not None else d.exp_()
    if scales is None:
        scales = rule.scales(smoothing)
    lse = {float(c): torch.log(scale_power(e, c, out=work).sum(-1)) for c in scales}
    z_y = z.gather(1, target[:, None]).squeeze(1) - m
    stats = TokenStats(z_y=z_y, lse=lse, num_classes=num_classes, max_logit=m, sum_z=sum_z)
    if eps is not None:
        mask = masked_set(e, lse[1.0], num_classes, eps, finite)
        stats.masked_sum_z = torch.where(mask, d, 0.0).sum(-1)
        stats.masked_count = mask.sum(-1, dtype=z.dtype)
    return stats, e, finite


def rule_scores(z: Tensor, target: Tensor, rules: Sequence[ScoringRule]) -> tuple[Tensor, TokenStats]:
    """Unsmoothed scores ``S(p, y)`` of several rules from one pass over float logits ``z`` (``(n, V)``).

    Returns the scores ``(n, len(rules))`` and the statistics, which always include ``lse[1]``
    (so ``log p_y = z_y - lse[1]`` and the top-1 probability is ``exp(-lse[1])``).
    """
    scales = sorted({1.0, *(float(c) for r in rules for c in r.score_scales())})
    stats, _, _ = compute_stats(z, target, rules[0] if rules else _LOG, 0.0, scales=scales)
    if not rules:
        return z.new_zeros(z.shape[0], 0), stats
    return torch.stack([smoothed_score(r, stats, 0.0) for r in rules], dim=-1), stats


def smoothed_score(rule: ScoringRule, stats: TokenStats, smoothing: float = 0.0, variant: str = "paper") -> Tensor:
    """The smoothed score per token, from statistics alone (differentiable in them).

    That is:

        S_eps = (1 - eps) S(p, y) + eps (1/V) sum_k S(p, k)
                [+ g w_M eps (1/V) sum_{j in M} log p_j   for rules with masked_log_smoothing]

    where ``w_M = rule.masked_log_weight`` (1 for a bounded rule; for a mixture the total
    weight of its bounded components), ``sum_{j in M} log p_j = sum_M z - |M| L_1``
    (shift-invariant, like every term), and the gate ``g`` depends on ``variant``:

    * ``"paper"``: ``g = 1`` (the paper's formula);
    * ``"gated"``: ``g = clamp((p_y - (1 - eps)) / eps, 0, 1)`` with ``p_y = exp(z_y - L_1)``, a
      constant of the gradient like ``M``: the term acts only on tokens the model predicts more
      confidently than the smoothed optimum of a one-hot target (``1 - eps + eps / V``), at full
      strength as ``p_y -> 1`` and fading to 0 at ``p_y = 1 - eps``;
    * ``"none"``: no masked-log term (``g = 0``).

    Whatever ``g >= 0``, the masked term is ``<= 0`` and vanishes when ``M`` is empty, so the
    expected smoothed score under ``q`` is maximised exactly (and only) at
    ``q' = (1 - eps) q + eps / V``.
    """
    s = rule.score(stats.z_y, stats.lse)
    if smoothing <= 0:
        return s
    s = (1 - smoothing) * s + smoothing * rule.mean_score(stats.lse, stats.sum_z, stats.num_classes)
    if masked_log_eps(rule, smoothing, variant) is not None:
        assert stats.masked_sum_z is not None and stats.masked_count is not None
        masked = (stats.masked_sum_z - stats.masked_count * stats.lse[1.0]) / stats.num_classes
        weight = rule.masked_log_weight
        if variant == "gated":
            p_y = torch.exp(stats.z_y - stats.lse[1.0]).detach()
            masked = masked * ((p_y - (1 - smoothing)) / smoothing).clamp(0.0, 1.0)
        s = s + (smoothing * masked if weight == 1.0 else (smoothing * weight) * masked)
    return s


_DIFF_FIELDS = ("z_y", "sum_z", "masked_sum_z")


def loss_and_partials(
    rule: ScoringRule, stats: TokenStats, smoothing: float = 0.0, need_grad: bool = True, variant: str = "paper"
) -> tuple[Tensor, TokenStats | None]:
    """Per-token loss ``s_max - S_eps`` and, if ``need_grad``, its partial derivatives.

    The smoothing ``variant`` is as in :func:`smoothed_score`. The partial derivatives with respect to
    each differentiable statistic are returned as a :class:`TokenStats` whose fields hold
    ``d loss / d stat`` (zeros where a statistic is unused).
    """
    if not need_grad:
        with torch.no_grad():
            return rule.s_max - smoothed_score(rule, stats, smoothing, variant), None
    with torch.enable_grad():
        leaves: dict[str, Tensor] = {}
        upd: dict[str, Any] = {}
        for name in _DIFF_FIELDS:
            v = getattr(stats, name)
            if v is not None:
                leaves[name] = upd[name] = v.detach().requires_grad_(True)
        lse_leaves = {c: v.detach().requires_grad_(True) for c, v in stats.lse.items()}
        upd["lse"] = lse_leaves
        s2 = replace(stats, **upd)
        loss = rule.s_max - smoothed_score(rule, s2, smoothing, variant)
        inputs = list(leaves.values()) + list(lse_leaves.values())
        grads = torch.autograd.grad(loss.sum(), inputs, allow_unused=True)
    zero = torch.zeros_like(stats.z_y)
    g = [zero if t is None else t for t in grads]
    k = len(leaves)
    partials = replace(
        stats,
        **{name: g[i] for i, name in enumerate(leaves)},
        lse=dict(zip(lse_leaves, g[k:])),
    )
    return loss.detach(), partials


def logits_grad(
    z: Tensor,
    target: Tensor,
    stats: TokenStats,
    partials: TokenStats,
    smoothing: float,
    rule: ScoringRule,
    e: Tensor | None = None,
    finite: Tensor | None = None,
    *,
    out: Tensor | None = None,
    work: Tensor | None = None,
) -> Tensor:
    """Gradient of ``sum_i loss_i`` with respect to float32 logits ``z`` (``(n, V)``).

    ``partials`` holds ``d loss_i / d stat_i`` (already multiplied by any upstream
    gradient). ``e = exp(z - m)`` and ``finite`` are recomputed when not given. The
    gradient is written into ``out`` (shape and dtype of ``z``; distinct from ``e``, but it
    may be ``z`` itself, which is not read once the gradient is being written) when given,
    and ``work`` (same shape and dtype, distinct from both) holds the terms of further scales,
    so that a caller looping over chunks reuses its buffers.
    """
    if e is None:
        e = torch.sub(z, stats.max_logit[:, None]).exp_()
    if finite is None and bool((stats.num_classes < z.shape[1]).any()):
        finite = z != -math.inf
    grad: Tensor | None = None
    # sum_c f_Lc * c * softmax(c z) with softmax(c z) = e^c * exp(-lse[c])
    for c, f_l in partials.lse.items():
        coef = (f_l * c * torch.exp(-stats.lse[c]))[:, None]
        if grad is None:
            # the first term straight into the output, rounded exactly as scale_power(e, c) * coef
            if c == 1.0:
                grad = torch.mul(e, coef, out=out)
            else:
                grad = scale_power(e, c, out=out).mul_(coef)
        elif work is None:
            grad.add_(scale_power(e, c) * coef)
        else:
            grad.add_(torch.mul(e, coef, out=work) if c == 1.0 else scale_power(e, c, out=work).mul_(coef))
    if grad is None:
        grad = torch.zeros_like(z) if out is None else out.zero_()
    if partials.sum_z is not None:
        if finite is None:
            grad.add_(partials.sum_z[:, None])
        else:
            grad.add_(finite * partials.sum_z[:, None])
    eps = masked_log_eps(rule, smoothing)
    if eps is not None and partials.masked_sum_z is not None:
        mask = masked_set(e, stats.lse[1.0], stats.num_classes, eps, finite)
        grad.add_(mask * partials.masked_sum_z[:, None])
    grad.scatter_add_(1, target[:, None], partials.z_y[:, None])
    return grad
