r"""Improper SFT objectives, kept as baselines: DFT and ``1 - p``. They are **not** scoring rules.

Both are functions of the target's log-probability alone. For logits ``z`` of one position
(length ``V``) and target ``y``, with ``log p_y = z_y - logsumexp(z)`` and ``p_y = exp(log p_y)``:

* ``"dft"``: ``L = -log p_y * stopgrad(p_y)``, Dynamic Fine-Tuning (Wu et al. 2025, "On the
  Generalization of SFT: A Reinforcement Learning Perspective with Reward Rectification",
  arXiv 2508.05629); TRL's ``SFTTrainer(loss_type="dft")``.
* ``"one-minus-p"``: ``L = 1 - p_y`` (Li et al. 2025, "Beyond Log Likelihood: Probability-Based
  Objectives for Supervised Fine-Tuning across the Model Capability Continuum", arXiv 2510.00526;
  the paper writes ``-p``: the constant 1 makes the loss non-negative and changes no gradient).

``dft_loss`` reduces as TRL 1.16 does: the sum over label tokens divided by
``num_items_in_batch`` when given, else by the number of label tokens.

**The gradient identity.** ``stopgrad(p_y)`` is a constant of the gradient, so
``grad L_dft = -p_y * grad log p_y = -grad p_y = grad (1 - p_y)``: the two objectives have the
same gradient with respect to the logits (``-p_y (onehot(y) - softmax(z))``), and so train
identically under any optimizer; they differ only in the loss value that is reported. The
implementation keeps the identity exact in floating point (both backward passes multiply by the
same ``exp(log p_y)``): ``tests/test_improper.py`` checks it in float64 and with two
``properlm train`` runs that end with the same weights.

**Why improper.** A loss is proper when its expected value under the data distribution ``q``,
``E_q L(p) = sum_k q_k L(p, k)``, is minimised at ``p = q``. For ``1 - p`` the expectation is
``1 - sum_k q_k p_k``, linear in ``p``: over the simplex it is minimised at the one-hot on
``argmax_k q_k`` (the mode), not at ``q``, and its expected gradient at ``p = q`` is not zero.
DFT has the same gradient, so gradient training drives it to the same one-hot; its loss value,
whose expectation ``-sum_k q_k p_k log p_k`` is 0 at every one-hot and positive elsewhere, is
minimised there too (at the one-hot on ``argmax q``, among others), not at ``q``. A model trained
with either is pushed to put all its probability on the most likely token, so its probabilities
are not calibrated; they are baselines to compare the proper rules (:mod:`properlm.rules`) against.
They are therefore not in the rule registry: ``get_rule("dft")`` raises, and neither has score
smoothing or schedules.

Shapes and dtypes, as :func:`properlm.scoring_rule_loss`: ``logits`` ``(N, V)`` or ``(B, T, V)``
(any ``(..., V)``), any floating dtype, computed in float32 (float64 for float64 input) in log
space by the logarithmic loss of :mod:`properlm.loss` (``log p_y = z_y - logsumexp(z)``, in
blocks of rows: no float32 copy of the whole logits is held); ``target`` ``(...)`` integer ids in
``[0, V)`` or ``ignore_index``. Ignored positions contribute neither loss nor gradient.

Training: ``properlm train --improper-loss dft`` (or ``one-minus-p``; YAML key ``improper_loss``)
and, for your own loop, :func:`properlm.integrations.transformers.apply_improper_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .loss import scoring_rule_loss
from .options import check_num_items, check_reduction, reduce_loss

__all__ = [
    "IMPROPER_OBJECTIVES",
    "DFTLoss",
    "ImproperObjective",
    "OneMinusPLoss",
    "dft_loss",
    "get_improper_objective",
    "one_minus_p_loss",
]


def _dft_token_loss(log_p: Tensor) -> Tensor:
    """``-log p * stopgrad(p)``."""
    return -log_p * log_p.exp().detach()


def _one_minus_p_token_loss(log_p: Tensor) -> Tensor:
    """``1 - exp(log p)``.

    Its backward multiplies by the same ``exp(log p)`` as DFT's, so the two gradients agree to the last
    bit (``-expm1`` would round differently).
    """
    return 1.0 - log_p.exp()


@dataclass(frozen=True)
class ImproperObjective:
    """One improper objective: a per-token loss of the target's log-probability.

    Attributes:
        name: the name of :data:`IMPROPER_OBJECTIVES` (and of ``properlm train --improper-loss``).
        formula: the per-token loss, for messages and records.
        reference: where it comes from.
        token_loss: ``log p_y -> L`` elementwise, differentiable (any shape).
    """

    name: str
    formula: str
    reference: str
    token_loss: Callable[[Tensor], Tensor]

    def token_losses(self, log_p: Tensor, valid: Tensor) -> Tensor:
        """Per-token losses from per-token target log-probabilities ``log_p`` (any shape).

        0 where ``valid`` is False.
        """
        return torch.where(valid, self.token_loss(log_p), 0.0)

    def __call__(
        self,
        logits: Tensor,
        target: Tensor,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        num_items_in_batch: int | Tensor | None = None,
    ) -> Tensor:
        """The loss of ``logits`` ``(..., V)`` against ``target`` ``(...)``; see :func:`dft_loss`."""
        return _improper_loss(self, logits, target, ignore_index, reduction, num_items_in_batch)


#: the improper objectives by name (``properlm train --improper-loss NAME``); not scoring rules
IMPROPER_OBJECTIVES: dict[str, ImproperObjective] = {
    "dft": ImproperObjective(
        "dft",
        "-log p_y * stopgrad(p_y)",
        "Wu et al. 2025, arXiv 2508.05629 (TRL SFTTrainer loss_type='dft')",
        _dft_token_loss,
    ),
    "one-minus-p": ImproperObjective(
        "one-minus-p", "1 - p_y", "Li et al. 2025, arXiv 2510.00526", _one_minus_p_token_loss
    ),
}


def get_improper_objective(objective: str | ImproperObjective) -> ImproperObjective:
    """The :class:`ImproperObjective` named ``objective`` (one of :data:`IMPROPER_OBJECTIVES`).

    An :class:`ImproperObjective` is returned as is. ``ValueError`` lists the allowed names.
    """
    if isinstance(objective, ImproperObjective):
        return objective
    if isinstance(objective, str) and objective in IMPROPER_OBJECTIVES:
        return IMPROPER_OBJECTIVES[objective]
    allowed = ", ".join(map(repr, IMPROPER_OBJECTIVES))
    raise ValueError(f"unknown improper objective {objective!r}; allowed: {allowed}")


def _improper_loss(
    objective: ImproperObjective,
    logits: Tensor,
    target: Tensor,
    ignore_index: int,
    reduction: str,
    num_items_in_batch: int | Tensor | None,
) -> Tensor:
    check_reduction(reduction)
    check_num_items(reduction, num_items_in_batch)
    # -log p_y per token (0 at ignored positions), float32 from any dtype, with its blockwise
    # gradient; scoring_rule_loss checks the dtypes, shapes and target ids first
    nll = scoring_rule_loss(logits, target, "logarithmic", 0.0, ignore_index, "none")
    valid = (target != ignore_index).to(nll.device)
    per_token = objective.token_losses(-nll, valid)
    return reduce_loss(per_token, valid, reduction, num_items_in_batch)


def dft_loss(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    r"""Dynamic Fine-Tuning loss ``-log p_y * stopgrad(p_y)`` (Wu et al. 2025): **improper**.

    The loss of TRL's ``SFTTrainer(loss_type="dft")``. Its gradient equals that of
    :func:`one_minus_p_loss` (``-grad p_y``); see :mod:`properlm.improper` for why neither is proper.

    Args:
        logits: ``(..., V)`` unnormalised scores, e.g. ``(N, V)`` or ``(B, T, V)``; any floating dtype,
            computed in float32 (float64 for float64 input).
        target: ``(...)`` integer token ids in ``[0, V)`` or ``ignore_index``.
        ignore_index: target value whose positions contribute neither loss nor gradient.
        reduction: ``"mean"`` (the sum over non-ignored tokens divided by ``num_items_in_batch`` when
            given, else by their count, 1 if none), ``"sum"`` or ``"none"`` (shape of ``target``,
            0 at ignored positions).
        num_items_in_batch: the number of target tokens of the whole (accumulated) batch, as
            ``transformers.Trainer`` passes it; only used with ``reduction="mean"``.

    Returns:
        A scalar, or a tensor of ``target``'s shape for ``"none"``, in float32 (float64 for float64 logits).

    Example::

        >>> logits = torch.randn(2, 5, 100, requires_grad=True)
        >>> loss = properlm.dft_loss(logits, torch.randint(100, (2, 5)))
        >>> loss.backward()
    """
    return _improper_loss(IMPROPER_OBJECTIVES["dft"], logits, target, ignore_index, reduction, num_items_in_batch)


def one_minus_p_loss(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    r"""The loss ``1 - p_y`` (Li et al. 2025, "Beyond Log Likelihood"): **improper**.

    Its expected loss ``1 - sum_k q_k p_k`` is minimised at the one-hot on ``argmax q``. Same gradient
    as :func:`dft_loss`. Arguments, shapes, dtypes and reductions as :func:`dft_loss`; computed as
    ``1 - exp(log p_y)``.
    """
    return _improper_loss(
        IMPROPER_OBJECTIVES["one-minus-p"], logits, target, ignore_index, reduction, num_items_in_batch
    )


class _ImproperLoss(nn.Module):
    objective: ImproperObjective

    def __init__(self, ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__()
        self.ignore_index = int(ignore_index)
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, target: Tensor, num_items_in_batch: int | Tensor | None = None) -> Tensor:
        return _improper_loss(self.objective, logits, target, self.ignore_index, self.reduction, num_items_in_batch)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"


class DFTLoss(_ImproperLoss):
    """Module form of :func:`dft_loss` (improper).

    Example::

        >>> criterion = properlm.DFTLoss()
        >>> loss = criterion(logits.view(-1, V), labels.view(-1))
    """

    objective = IMPROPER_OBJECTIVES["dft"]


class OneMinusPLoss(_ImproperLoss):
    """Module form of :func:`one_minus_p_loss` (improper)."""

    objective = IMPROPER_OBJECTIVES["one-minus-p"]
