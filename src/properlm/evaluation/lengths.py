"""Truncation: the lengths an evaluation (or ``properlm generate``) cuts to, and where each came from.

:func:`resolve_lengths`: unless given, ``max_length`` and ``max_source_length``
are those the model was trained with (:func:`properlm.models.read_training_record`), and a
``max_length`` (or, for an encoder-decoder, ``max_new_tokens``) beyond the model's position
table (``config.max_position_embeddings``) is refused before any data is read. The results
state both lengths, where each came from, and how many sources were cut.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .settings import DEFAULT_MAX_LENGTH, EvalError

__all__ = ["LengthLimits", "resolve_lengths"]


@dataclass
class LengthLimits:
    """The truncation an evaluation (or ``properlm generate``) applies, and where it came from.

    Attributes:
        max_length: the most tokens of a tokenised example (seq2seq: of the encoder input and
            of the labels; decoder-only: of prompt + target), as in training.
        max_length_from: ``"--max-length"``, ``"training run (PATH)"``, ``"model limit"`` or ``"default"``.
        max_source_length: the most tokens of the source text (:func:`properlm.data.truncate_source`),
            ``None`` when only ``max_length`` cuts.
        max_source_length_from: where it came from (as above; ``"not set"`` for ``None``).
        model_max_positions: the model's position limit (``None``: unknown or unbounded), and
            ``position_key``, the config field it was read from.
        decode_prompt_length: the most prompt tokens for decoding: ``max_length``, and for a
            decoder-only model with a position limit at most ``limit - max_new_tokens``.
        trained: the training record (``max_length``, ``max_source_length``, ...) or ``None``.
    """

    max_length: int
    max_length_from: str
    max_source_length: int | None
    max_source_length_from: str
    model_max_positions: int | None
    position_key: str | None
    decode_prompt_length: int
    trained: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The limits and their sources as a JSON-ready dict."""
        return dataclasses.asdict(self)


def resolve_lengths(
    max_length: int | None,
    max_source_length: int | None,
    *,
    config: Any = None,
    record: dict[str, Any] | None = None,
    record_path: str | None = None,
    seq2seq: bool | None = None,
    max_new_tokens: int | None = None,
) -> LengthLimits:
    """Choose the truncation from the options, the training record and the model's config.

    An option given (not ``None``) wins; else the training run's value (``record``); else, for
    ``max_length``, the model's position limit when below :data:`DEFAULT_MAX_LENGTH`, else
    :data:`DEFAULT_MAX_LENGTH`. Raises :class:`EvalError` when ``max_length`` exceeds the model's
    position limit (``config.max_position_embeddings`` or ``n_positions``), or when
    ``max_new_tokens`` (given when decoding) does not fit: an encoder-decoder's decoder takes at
    most ``limit`` positions; a decoder-only model's prompts are cut to ``limit - max_new_tokens``.
    """
    from ..models import model_max_positions

    limit, key = model_max_positions(config)
    trained_len = record.get("max_length") if record else None
    trained_src = record.get("max_source_length") if record else None
    where = f"training run ({record_path})" if record_path else "training run"
    if max_length is not None:
        length, length_from = max_length, "--max-length"
        if trained_len is not None and trained_len != max_length:
            length_from += f" (training used {trained_len})"
    elif isinstance(trained_len, int):
        length, length_from = trained_len, where
    elif limit is not None and limit < DEFAULT_MAX_LENGTH:
        length, length_from = limit, f"model limit ({key})"
    else:
        length, length_from = DEFAULT_MAX_LENGTH, "default"
    if length < 2:
        raise EvalError(f"--max-length must be at least 2, got {length}")
    if limit is not None and length > limit:
        hint = f"use --max-length {limit} or less"
        if max_length is not None and isinstance(trained_len, int) and trained_len <= limit:
            hint += f" (leave it out to use the training run's {trained_len})"
        what = f"--max-length {length}" if max_length is not None else f"max_length {length} of the {length_from}"
        raise EvalError(
            f"{what} exceeds the {limit} positions the model takes ({key} in its config): longer "
            f"inputs would index past its position table; {hint}"
        )
    if max_source_length is not None:
        src, src_from = max_source_length, "--max-source-length"
        if trained_src != max_source_length:
            src_from += f" (training used {trained_src if trained_src is not None else 'none'})"
    elif isinstance(trained_src, int):
        src, src_from = trained_src, where
    else:
        src, src_from = None, "not set"
    if src is not None and src < 1:
        raise EvalError(f"--max-source-length must be positive, got {src}")
    prompt_len = length
    if limit is not None and max_new_tokens is not None:
        if seq2seq and max_new_tokens > limit:
            raise EvalError(
                f"--max-new-tokens {max_new_tokens} exceeds the {limit} decoder positions the model "
                f"takes ({key} in its config); use --max-new-tokens {limit} or less"
            )
        if seq2seq is False:
            if max_new_tokens >= limit:
                raise EvalError(
                    f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the {limit} "
                    f"positions the model takes ({key} in its config)"
                )
            prompt_len = min(length, limit - max_new_tokens)
    return LengthLimits(
        max_length=length,
        max_length_from=length_from,
        max_source_length=src,
        max_source_length_from=src_from,
        model_max_positions=limit,
        position_key=key,
        decode_prompt_length=prompt_len,
        trained=dict(record) if record else None,
    )


def config_is_seq2seq(config: Any) -> bool | None:
    """``is_encoder_decoder`` of a config (object or dict); ``None`` for no config."""
    if config is None:
        return None
    if isinstance(config, dict):
        return bool(config.get("is_encoder_decoder"))
    return bool(getattr(config, "is_encoder_decoder", False))
