"""Tokenisation: the token ids and labels of an example, as training and generation see them.

* seq2seq (encoder-decoder): encoder ``input_ids`` = the prompt of
  :func:`~properlm.data.prompts.build_prompt` ending with EOS, ``labels`` = the target tokens followed by EOS;
* decoder-only: ``input_ids`` = prompt tokens + target tokens + EOS, ``labels`` = ``-100``
  (:data:`IGNORE_INDEX`) on the prompt, the target tokens + EOS after it: the loss covers the response only.

:func:`tokenize_example` cuts to ``max_length`` (a decoder-only prompt before the target, so some target tokens
remain); :func:`tokenize_examples` makes a ``datasets.Dataset`` of them; :func:`encode_prompt` is the prompt alone,
for generation, exactly as training tokenises it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .prompts import build_prompt, has_chat_template, text_ids, truncate_source
from .reading import Example

__all__ = ["IGNORE_INDEX", "encode_prompt", "tokenize_example", "tokenize_examples"]

#: label value of positions that take no part in the loss
IGNORE_INDEX = -100


def _prompt_ids(example: Example, tokenizer: Any, seq2seq: bool) -> list[int]:
    text = build_prompt(example, tokenizer, seq2seq=seq2seq)
    eos = tokenizer.eos_token_id
    if seq2seq:
        ids = text_ids(tokenizer, text, True)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return ids
    if has_chat_template(tokenizer):
        return text_ids(tokenizer, text, False)
    ids = text_ids(tokenizer, text, True)
    if eos is not None and ids and ids[-1] == eos and eos != tokenizer.bos_token_id:
        ids.pop()  # tokenizers that append EOS to every text (T5-like) must not end the prompt
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


def _target_ids(example: Example, tokenizer: Any) -> list[int]:
    ids = text_ids(tokenizer, example.target, False)
    eos = tokenizer.eos_token_id
    if eos is not None:
        ids.append(eos)
    return ids


def encode_prompt(
    example: Example,
    tokenizer: Any,
    *,
    seq2seq: bool = False,
    max_length: int | None = None,
    max_source_length: int | None = None,
) -> list[int]:
    """Token ids of the prompt for generation, exactly as training tokenises it.

    For seq2seq the encoder input (ending with EOS), for decoder-only the prompt the target
    follows. ``max_source_length`` first cuts the source text (:func:`truncate_source`); with
    ``max_length`` the encoder input is then cut to its first ``max_length`` tokens and a
    decoder-only prompt to its last ``max_length`` tokens."""
    ids = _prompt_ids(truncate_source(example, tokenizer, max_source_length), tokenizer, seq2seq)
    if max_length is not None and len(ids) > max_length:
        ids = ids[:max_length] if seq2seq else ids[-max_length:]
    return ids


def tokenize_example(
    example: Example, tokenizer: Any, *, seq2seq: bool, max_length: int, max_source_length: int | None = None
) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask`` and ``labels`` of one example.

    With ``max_source_length`` the source text is first cut to that many tokens
    (:func:`truncate_source`); then:

    * seq2seq: ``input_ids`` = encoder input (first ``max_length`` tokens), ``labels`` =
      target + EOS (first ``max_length`` tokens); the model builds the decoder input from them.
    * decoder-only: ``input_ids`` = prompt + target + EOS and ``labels`` = ``-100`` on the
      prompt and the token ids on the target + EOS. When longer than ``max_length`` the
      prompt is cut first (its beginning kept), so that at least ``min(len(target),
      max_length // 2)`` target tokens remain; then the sequence is cut at ``max_length``.
    """
    return _tokenize(example, tokenizer, seq2seq, max_length, max_source_length)[0]


def _tokenize(
    example: Example, tokenizer: Any, seq2seq: bool, max_length: int, max_source_length: int | None
) -> tuple[dict[str, list[int]], bool, bool]:
    """:func:`tokenize_example`'s row, and whether the source and the sequence were cut.

    The second value: ``max_source_length`` cut the source; the third: ``max_length`` cut the sequence.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    source = truncate_source(example, tokenizer, max_source_length)
    prompt = _prompt_ids(source, tokenizer, seq2seq)
    target = _target_ids(example, tokenizer)
    if seq2seq:
        input_ids = prompt[:max_length]
        labels = target[:max_length]
        cut = len(prompt) > max_length or len(target) > max_length
        return (
            {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels},
            source is not example,
            cut,
        )
    cut = len(prompt) + len(target) > max_length
    keep_target = min(len(target), max(1, max_length // 2))
    if cut and len(prompt) > max_length - keep_target:
        prompt = prompt[: max_length - keep_target]
    input_ids = (prompt + target)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + target)[:max_length]
    return (
        {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels},
        source is not example,
        cut,
    )


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    seq2seq: bool,
    max_length: int,
    max_source_length: int | None = None,
    truncation: dict[str, int] | None = None,
) -> Any:
    """Tokenise ``examples`` (see :func:`tokenize_example`) into a ``datasets.Dataset``.

    Its columns are ``input_ids``, ``attention_mask`` and ``labels``. A ``truncation`` dict receives the counts
    ``num_examples``, ``num_sources_cut`` (cut by ``max_source_length``) and ``num_cut_at_max_length``.
    """
    import datasets

    rows, sources_cut, cut = [], 0, 0
    for e in examples:
        row, source_cut, sequence_cut = _tokenize(e, tokenizer, seq2seq, max_length, max_source_length)
        rows.append(row)
        sources_cut += source_cut
        cut += sequence_cut
    if truncation is not None:
        truncation.update(num_examples=len(rows), num_sources_cut=sources_cut, num_cut_at_max_length=cut)
    return datasets.Dataset.from_list(rows)
