"""How labels pair with predictions.

Shifted by one for causal LMs, as given for encoder-decoder models, or a pre-shifted ``shift_labels`` (see
:mod:`properlm.integrations.transformers`).
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["align_labels", "check_aligned"]


def align_labels(x: Tensor, labels: Tensor, shift: bool, shift_labels: Tensor | None) -> tuple[Tensor, Tensor]:
    """Pair predictions ``x (..., T, D)`` with their targets (see :mod:`properlm.integrations.transformers`)."""
    if shift_labels is not None:
        return x, shift_labels.to(x.device)
    labels = labels.to(x.device)
    if shift:
        return x[..., :-1, :], labels[..., 1:]
    return x, labels


def check_aligned(x: Tensor, target: Tensor, what: str) -> None:
    """Raise ``ValueError`` when the aligned ``target`` does not match the (batch, time) shape of ``x``."""
    if tuple(x.shape[:-1]) != tuple(target.shape):
        raise ValueError(
            f"labels of shape {tuple(target.shape)} (after alignment) do not match the {what} of shape "
            f"{tuple(x.shape)}: pass labels with the same (batch, time) shape as the inputs "
            "(and do not combine labels with logits_to_keep)"
        )
