"""What the integration reads off a Hugging Face model, and how its labels pair with its predictions.

Its config (the text config of a multimodal model), whether it is an encoder-decoder, the ``transformers`` model
inside a PEFT wrapper, its output embedding; ``align_labels`` pairs predictions with labels as described in
:mod:`properlm.integrations.transformers` (shifted by one for causal LMs, as given for encoder-decoder models or a
pre-shifted ``shift_labels``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


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


def config_of(model: nn.Module) -> Any:
    """The ``config`` of ``model`` (``None`` without one)."""
    return getattr(model, "config", None)


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model``'s config says it is an encoder-decoder."""
    return bool(getattr(config_of(model), "is_encoder_decoder", False))


def text_config_of(model: nn.Module) -> Any:
    """The text config of ``model`` (``get_text_config()`` of a multimodal config, else the config)."""
    config = config_of(model)
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    getter = getattr(model, "get_base_model", None)
    if callable(getter):
        try:
            return getter()
        except Exception:
            return model
    return model


def output_head(model: nn.Module) -> nn.Module:
    """The output embedding of ``model``; ``ValueError`` when it has none."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        raise ValueError(
            f"apply_scoring_rule needs a model with an output embedding: {type(model).__name__}."
            "get_output_embeddings() returned nothing (is it a causal-LM or seq2seq-LM model class?)"
        )
    return head
