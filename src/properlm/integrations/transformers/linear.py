"""The scoring-rule loss of an output layer, ``hidden @ weight.T + bias``, without its logits.

:func:`linear_scoring_rule_loss` is the loss the patched models compute from their hidden states
(:func:`properlm.fused.fused_linear_scoring_rule_loss`).
"""

from __future__ import annotations

from torch import Tensor

from ...fused import fused_linear_scoring_rule_loss
from ...rules import RuleLike

__all__ = ["linear_scoring_rule_loss"]


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

    It is :func:`properlm.fused.fused_linear_scoring_rule_loss` with its default chunk size and implementation.
    Shapes: ``hidden (..., H)``, ``weight (V, H)``, ``bias (V,)``, ``target (...)``.
    """
    return fused_linear_scoring_rule_loss(
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
