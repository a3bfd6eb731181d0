"""Prompts: the text a model conditions on, and the cut of long sources.

:func:`build_prompt` gives, for an :class:`~properlm.data.reading.Example`,

* seq2seq (encoder-decoder): the encoder input -- the source text as it is (for instructions the
  plain prompt :data:`INSTRUCTION_TEMPLATE` / :data:`INSTRUCTION_TEMPLATE_NO_INPUT`);
* decoder-only: the tokenizer's chat template applied to one user message (with the generation
  prompt) when the tokenizer has one, else a plain template (:data:`INSTRUCTION_TEMPLATE`,
  :data:`TRANSLATION_TEMPLATE`, :data:`SUMMARIZATION_TEMPLATE`); the target follows it directly.

:func:`truncate_source` cuts a long source to its first ``max_source_length`` tokens (the document, the source
sentence or the instruction's input, before the prompt template), in training and evaluation alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .reading import Example

__all__ = [
    "INSTRUCTION_TEMPLATE",
    "INSTRUCTION_TEMPLATE_NO_INPUT",
    "SUMMARIZATION_TEMPLATE",
    "TRANSLATION_TEMPLATE",
    "build_prompt",
    "truncate_source",
]

#: plain decoder-only prompt for instruction records with a non-empty ``input`` (Alpaca)
INSTRUCTION_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
#: plain decoder-only prompt for instruction records without ``input`` (Alpaca)
INSTRUCTION_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
#: decoder-only prompt for translation (``{source_lang}``/``{target_lang}`` default to "source"/"target")
TRANSLATION_TEMPLATE = "Translate from {source_lang} to {target_lang}:\n{source}\n{target_lang}:\n"
#: decoder-only prompt for summarization
SUMMARIZATION_TEMPLATE = "Summarize the following document.\n\n{document}\n\nSummary:\n"


def has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def _plain_prompt(example: Example) -> str:
    f = example.fields
    if example.task == "instruction":
        instruction = f.get("instruction", example.source)
        inp = f.get("input", "")
        if inp.strip():
            return INSTRUCTION_TEMPLATE.format(instruction=instruction, input=inp)
        return INSTRUCTION_TEMPLATE_NO_INPUT.format(instruction=instruction)
    if example.task == "translation":
        return TRANSLATION_TEMPLATE.format(
            source_lang=f.get("source_lang") or "source",
            target_lang=f.get("target_lang") or "target",
            source=example.source,
        )
    return SUMMARIZATION_TEMPLATE.format(document=example.source)


def _user_message(example: Example) -> str:
    if example.task == "instruction":
        return example.source
    return _plain_prompt(example).rstrip("\n")


def build_prompt(example: Example, tokenizer: Any = None, *, seq2seq: bool = False) -> str:
    """The text a model conditions on for ``example``.

    * ``seq2seq=True``: the encoder input -- the source sentence or document as it is, and
      the plain Alpaca prompt for instructions.
    * decoder-only: the tokenizer's chat template applied to one user message (with the
      generation prompt) when ``tokenizer`` has a chat template, else the plain template of
      the task. The target follows the prompt directly.
    """
    if seq2seq:
        return _plain_prompt(example) if example.task == "instruction" else example.source
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": _user_message(example)}], tokenize=False, add_generation_prompt=True
        )
    return _plain_prompt(example)


def text_ids(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    # verbose=False: no "longer than the specified maximum" warning, the callers cut the ids themselves
    return list(tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])


def _source_field(example: Example) -> str:
    """The field of ``example.fields`` that :func:`truncate_source` cuts."""
    if example.task == "summarization":
        return "document"
    if example.task == "translation":
        return "source"
    return "input" if str(example.fields.get("input", "")).strip() else "instruction"


def _cut_text(tokenizer: Any, text: str, max_tokens: int) -> str | None:
    """``text`` cut after its first ``max_tokens`` tokens, or ``None`` when it has no more than that.

    The text is tokenised alone, without special tokens. The cut text re-tokenises to at most ``max_tokens``
    tokens (a cut inside a word can re-tokenise differently; then the cut moves left)."""
    ids = text_ids(tokenizer, text, False)
    if len(ids) <= max_tokens:
        return None
    n = max_tokens
    offsets = None
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)[
            "offset_mapping"
        ]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        offsets = None  # a slow (Python) tokenizer: cut by decoding instead
    while True:
        cut = text[: offsets[n - 1][1]] if offsets is not None else tokenizer.decode(ids[:n], skip_special_tokens=True)
        cut = cut.rstrip()
        excess = len(text_ids(tokenizer, cut, False)) - max_tokens
        if excess <= 0 or n <= 1:
            return cut
        n = max(1, n - excess)


def truncate_source(example: Example, tokenizer: Any, max_source_length: int | None) -> Example:
    """``example`` with its source text cut to its first ``max_source_length`` tokens.

    The cut applies to the source text itself, before any prompt template or special token: the
    ``document`` of a summarization record, the ``source`` sentence of a translation pair, the
    ``input`` of an instruction record (its ``instruction`` when it has no input). The text is
    tokenised alone (no special tokens) and cut after the character where its ``max_source_length``-th
    token ends, so the template around it (a decoder-only prompt's "Summary:" line, a seq2seq
    encoder's EOS) stays whole. Returns ``example`` itself when nothing is cut (or for ``None``).
    """
    if max_source_length is None:
        return example
    if isinstance(max_source_length, bool) or not isinstance(max_source_length, int) or max_source_length < 1:
        raise ValueError(f"max_source_length must be a positive integer or None, got {max_source_length!r}")
    key = _source_field(example)
    text = example.fields.get(key, example.source) if example.fields else example.source
    cut = _cut_text(tokenizer, text, max_source_length)
    if cut is None:
        return example
    fields = {**example.fields, key: cut}
    if example.task == "instruction":
        instruction, inp = fields.get("instruction", ""), fields.get("input", "")
        source = instruction if not str(inp).strip() else f"{instruction}\n\n{inp}"
    else:
        source = cut
    return dataclasses.replace(example, source=source, fields=fields)
