"""What the integration reads off a Hugging Face model, and how its labels pair with its predictions.

Its config (the text config of a multimodal model), whether it is an encoder-decoder, the ``transformers`` model
inside a PEFT wrapper, its output embedding; ``_align`` pairs predictions with labels as described in
:mod:`properlm.integrations.transformers` (shifted by one for causal LMs, as given for encoder-decoder models or a
pre-shifted ``shift_labels``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


def _align(x: Tensor, labels: Tensor, shift: bool, shift_labels: Tensor | None) -> tuple[Tensor, Tensor]:
    """Pair predictions ``x (..., T, D)`` with their targets (see :mod:`properlm.integrations.transformers`)."""
    if shift_labels is not None:
        return x, shift_labels.to(x.device)
    labels = labels.to(x.device)
    if shift:
        return x[..., :-1, :], labels[..., 1:]
    return x, labels


def _check_aligned(x: Tensor, target: Tensor, what: str) -> None:
    if tuple(x.shape[:-1]) != tuple(target.shape):
        raise ValueError(
            f"labels of shape {tuple(target.shape)} (after alignment) do not match the {what} of shape "
            f"{tuple(x.shape)}: pass labels with the same (batch, time) shape as the inputs "
            "(and do not combine labels with logits_to_keep)"
        )


def _config_of(model: nn.Module) -> Any:
    return getattr(model, "config", None)


def _is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(_config_of(model), "is_encoder_decoder", False))


def _text_config(model: nn.Module) -> Any:
    config = _config_of(model)
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    getter = getattr(model, "get_base_model", None)
    if callable(getter):
        try:
            return getter()
        except Exception:
            return model
    return model


def _output_head(model: nn.Module) -> nn.Module:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        raise ValueError(
            f"apply_scoring_rule needs a model with an output embedding: {type(model).__name__}."
            "get_output_embeddings() returned nothing (is it a causal-LM or seq2seq-LM model class?)"
        )
    return head
