"""The Hugging Face model inside DDP and PEFT wrappers, and whether it is an encoder-decoder."""

from __future__ import annotations

from typing import Any

__all__ = ["is_seq2seq", "unwrap_model"]


def is_seq2seq(model_or_config: Any) -> bool:
    """``True`` for an encoder-decoder model (or config), also through PEFT/DDP wrappers."""
    config = getattr(unwrap_model(model_or_config), "config", model_or_config)
    return bool(getattr(config, "is_encoder_decoder", False))


def unwrap_model(model: Any) -> Any:
    """The Hugging Face model inside DDP (``.module``) and PEFT (``get_base_model()``) wrappers."""
    while True:
        if hasattr(model, "module") and not hasattr(model, "config"):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model) and hasattr(model, "peft_config"):
            model = model.get_base_model()
        else:
            return model
