"""What the integration reads off a Hugging Face model.

Its config (the text config of a multimodal model), whether it is an encoder-decoder, the ``transformers`` model
inside a PEFT wrapper, and its output embedding.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["config_of", "is_encoder_decoder", "output_head", "text_config_of", "unwrap_peft"]


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
