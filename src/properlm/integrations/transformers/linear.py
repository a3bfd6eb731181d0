"""The scoring-rule loss of an output layer, ``hidden @ weight.T + bias``, without its logits.

:func:`linear_scoring_rule_loss` is :func:`properlm.fused.fused_linear_scoring_rule_loss` when :mod:`properlm.fused`
imports, else the same loss on the logits built with ``F.linear``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from ...loss import scoring_rule_loss
from ...rules import RuleLike

__all__ = ["linear_scoring_rule_loss"]


def _fused_impl() -> Callable[..., Tensor] | None:
    """The fused linear scoring-rule loss, or None if :mod:`properlm.fused` is not importable."""
    try:
        from ...fused import fused_linear_scoring_rule_loss
    except ImportError:
        return None
    return fused_linear_scoring_rule_loss


def linear_scoring_rule_loss(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    rule: RuleLike,
    bias: Tensor | None = None,
    smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    *,
    softcap: float | None = None,
    logit_scale: float | None = None,
    smoothing_variant: str = "paper",
) -> Tensor:
    """Scoring-rule loss of the logits ``hidden @ weight.T + bias`` without materialising them.

    The logits are soft-capped / scaled by ``softcap`` / ``logit_scale`` as in :func:`properlm.scoring_rule_loss`.

    Calls :func:`properlm.fused.fused_linear_scoring_rule_loss`; if that module cannot be
    imported it computes the logits with ``F.linear`` and calls :func:`properlm.scoring_rule_loss`
    (same value and gradients, more memory). Shapes: ``hidden (..., H)``, ``weight (V, H)``,
    ``bias (V,)``, ``target (...)``.
    """
    fused = _fused_impl()
    if fused is not None:
        return fused(
            hidden,
            weight,
            target,
            rule=rule,
            bias=bias,
            smoothing=smoothing,
            ignore_index=ignore_index,
            reduction=reduction,
            num_items_in_batch=num_items_in_batch,
            softcap=softcap,
            logit_scale=logit_scale,
            smoothing_variant=smoothing_variant,
        )
    logits = nn.functional.linear(hidden, weight, bias)
    return scoring_rule_loss(
        logits,
        target,
        rule,
        smoothing,
        ignore_index,
        reduction,
        num_items_in_batch,
        softcap=softcap,
        logit_scale=logit_scale,
        smoothing_variant=smoothing_variant,
    )
