"""Fresh tiny models: the named small configs of ``init`` (``tiny-gpt``, ``tiny-seq2seq``)."""

from __future__ import annotations

from typing import Any

from .errors import ModelLoadError

__all__ = ["INIT_CONFIGS", "tiny_config"]

#: names accepted by ``init``
INIT_CONFIGS = ("tiny-gpt", "tiny-seq2seq")


def tiny_config(
    name: str,
    tokenizer: Any,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    ffn_size: int | None = None,
    max_positions: int = 1024,
    dropout: float = 0.1,
) -> Any:
    """A small randomly initialisable config for ``init`` ``name``.

    ``tiny-gpt``: ``LlamaConfig`` (RMSNorm, rotary positions, SwiGLU, tied embeddings).
    ``tiny-seq2seq``: ``MarianConfig`` (a Transformer-base-style encoder-decoder with
    sinusoidal positions, as in the paper's translation models: ``num_layers`` encoder and
    decoder layers, GELU, shared and tied embeddings, decoder start token ``<s>``).
    ``ffn_size`` defaults to ``4 * hidden_size``.
    """
    if name not in INIT_CONFIGS:
        raise ModelLoadError(f"unknown init config {name!r}; choose one of {', '.join(INIT_CONFIGS)}")
    if hidden_size % num_heads:
        raise ModelLoadError(f"hidden size {hidden_size} is not divisible by the number of heads {num_heads}")
    ffn = ffn_size or 4 * hidden_size
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vocab = len(tokenizer)
    if name == "tiny-gpt":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden_size,
            intermediate_size=ffn,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=max_positions,
            tie_word_embeddings=True,
            attention_dropout=dropout,
            **ids,
        )
    from transformers import MarianConfig

    return MarianConfig(
        vocab_size=vocab,
        d_model=hidden_size,
        encoder_layers=num_layers,
        decoder_layers=num_layers,
        encoder_attention_heads=num_heads,
        decoder_attention_heads=num_heads,
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
        max_position_embeddings=max_positions,
        dropout=dropout,
        attention_dropout=0.0,
        activation_dropout=0.0,
        activation_function="gelu",
        decoder_start_token_id=tokenizer.bos_token_id,
        forced_eos_token_id=None,
        tie_word_embeddings=True,
        share_encoder_decoder_embeddings=True,
        scale_embedding=True,
        **ids,
    )
