"""Training and evaluation data: file formats, validation, prompts, tokenisation, batching.

Three formats are read, each validated line by line before anything expensive happens, so
that a malformed file stops with a :class:`DataError` naming the file, the line and the field:

``instruction``
    Alpaca-style JSON (an array of objects) or JSONL, one object per record with the string
    fields ``instruction`` (required), ``input`` (optional) and ``output`` (required).
    The loss covers the response only: prompt tokens are labelled ``-100``.
``translation``
    Two line-aligned plain-text files, ``source_file`` and ``target_file`` (one sentence per
    line, UTF-8), with optional language names ``source_lang``/``target_lang``.
``summarization``
    JSONL (or a JSON array) of objects with the string fields ``document`` and ``summary``,
    and optionally ``annotations``: a list of further reference summaries (e.g. AESLC's
    development split), used by multi-reference ROUGE (:attr:`Example.references`).

Every record becomes an :class:`Example` ``(source, target)``. Long sources can be cut to
their first ``max_source_length`` tokens (:func:`truncate_source`: the document, the source
sentence or the instruction's input, before the prompt template), in training and evaluation
alike. The model sees it as

* seq2seq (encoder-decoder): encoder ``input_ids`` = the source text (for instructions the
  plain prompt), ``labels`` = the target tokens followed by EOS;
* decoder-only: ``input_ids`` = prompt tokens + target tokens + EOS, ``labels`` = ``-100``
  on the prompt, the target tokens + EOS after it. The prompt is the tokenizer's chat
  template applied to one user message when the tokenizer has one, else a plain template
  (:data:`INSTRUCTION_TEMPLATE`, :data:`TRANSLATION_TEMPLATE`, :data:`SUMMARIZATION_TEMPLATE`).

Example::

    >>> examples = load_examples("train.jsonl")                     # task detected from the fields
    >>> ds = tokenize_examples(examples, tokenizer, seq2seq=False, max_length=512)
    >>> batch = DataCollator(tokenizer.pad_token_id)([ds[0], ds[1]])
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "IGNORE_INDEX",
    "INSTRUCTION_TEMPLATE",
    "INSTRUCTION_TEMPLATE_NO_INPUT",
    "SUMMARIZATION_TEMPLATE",
    "TASKS",
    "TRANSLATION_TEMPLATE",
    "DataCollator",
    "DataError",
    "Example",
    "build_prompt",
    "detect_task",
    "encode_prompt",
    "load_examples",
    "read_instruction_file",
    "read_parallel_files",
    "read_summarization_file",
    "split_validation",
    "tokenize_example",
    "tokenize_examples",
    "truncate_source",
]

#: the data formats (``task`` values)
TASKS = ("instruction", "translation", "summarization")

#: label value of positions that take no part in the loss
IGNORE_INDEX = -100

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

_REQUIRED = {"instruction": ("instruction", "output"), "summarization": ("document", "summary")}
_OPTIONAL = {"instruction": ("input",), "summarization": ()}


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file, line and field."""


@dataclass(frozen=True)
class Example:
    """One training/evaluation record.

    Attributes:
        source: what the model conditions on, before any prompt template: the instruction
            (and its input, separated by a blank line), the source sentence, or the document.
        target: the reference text: the response, the target sentence or the summary.
        task: one of :data:`TASKS`.
        fields: the record's original fields (``instruction``/``input``/``output``,
            ``source``/``target``/``source_lang``/``target_lang``, ``document``/``summary``).
        location: where it came from, e.g. ``"train.jsonl line 7"``.
        references: (property) the target followed by any further references.
    """

    source: str
    target: str
    task: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    location: str = ""

    @property
    def references(self) -> tuple[str, ...]:
        """Every reference text: the target, then the record's ``annotations``, in file order.

        Only summarization records may have ``annotations``.
        """
        return (self.target, *self.fields.get("annotations", ()))


# ------------------------------------------------------------------------------------ reading


def _name(path: str | os.PathLike) -> str:
    return os.fspath(path)


def _check_file(path: str | os.PathLike | None, what: str) -> str:
    if path is None or os.fspath(path) == "":
        raise DataError(f"{what}: no file given")
    p = os.fspath(path)
    if not os.path.exists(p):
        raise DataError(f"{what} {p!r} does not exist")
    if not os.path.isfile(p):
        raise DataError(f"{what} {p!r} is not a file")
    return p


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` (1-based, newline stripped), decoding UTF-8 line by line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path} line {lineno}: not valid UTF-8 ({exc.reason})") from None
            if lineno == 1 and text.startswith("\ufeff"):
                text = text[1:]
            yield lineno, text.rstrip("\r\n")


def _json_records(path: str) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, value)`` for each record of a JSONL file or a JSON array file."""
    first = ""
    for _, text in _lines(path):
        if text.strip():
            first = text.lstrip()
            break
    if first.startswith("["):
        yield from _json_array_records(path)
        return
    pending_blank: int | None = None
    for lineno, text in _lines(path):
        if not text.strip():
            if pending_blank is None:
                pending_blank = lineno
            continue
        if pending_blank is not None:
            raise DataError(f"{path} line {pending_blank}: empty line (JSONL needs one JSON object per line)")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        yield lineno, value


def _json_array_records(path: str) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not valid UTF-8 ({exc.reason})") from None
    decoder = json.JSONDecoder()

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def skip_ws(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    pos = skip_ws(0) + 1  # past '['
    expect_value = True
    first = True
    while True:
        pos = skip_ws(pos)
        if pos >= len(text):
            raise DataError(f"{path} line {line_of(pos)}: not valid JSON (the array is not closed with ']')")
        if text[pos] == "]" and (first or not expect_value):
            end = skip_ws(pos + 1)
            if end != len(text):
                raise DataError(f"{path} line {line_of(end)}: not valid JSON (extra data after the array)")
            return
        if not expect_value:
            if text[pos] != ",":
                raise DataError(f"{path} line {line_of(pos)}: not valid JSON (expected ',' or ']')")
            pos += 1
            expect_value = True
            continue
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        yield line_of(pos), value
        pos = end
        expect_value = False
        first = False


def _record_fields(path: str, lineno: int, value: Any, task: str) -> dict[str, Any]:
    where = f"{path} line {lineno}"
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object with fields {', '.join(map(repr, _REQUIRED[task]))}, "
                        f"got {type(value).__name__}")
    out: dict[str, Any] = {}
    for key in _REQUIRED[task]:
        if key not in value:
            raise DataError(f"{where}: field {key!r} is missing")
        v = value[key]
        if not isinstance(v, str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
        if not v.strip():
            raise DataError(f"{where}: field {key!r} is empty")
        out[key] = v
    for key in _OPTIONAL[task]:
        v = value.get(key, "")
        if v is None:
            v = ""
        if not isinstance(v, str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
        out[key] = v
    if task == "summarization" and value.get("annotations") is not None:
        refs = value["annotations"]
        if not isinstance(refs, list):
            raise DataError(f"{where}: field 'annotations' must be a list of strings, got {type(refs).__name__}")
        for i, r in enumerate(refs, 1):
            if not isinstance(r, str):
                raise DataError(f"{where}: field 'annotations' item {i} must be a string, got {type(r).__name__}")
            if not r.strip():
                raise DataError(f"{where}: field 'annotations' item {i} is empty")
        out["annotations"] = tuple(refs)
    return out


def detect_task(path: str | os.PathLike) -> str:
    """The task of a JSON/JSONL file from its first record's fields.

    ``instruction`` (has ``instruction``/``output``) or ``summarization`` (``document``/``summary``).
    """
    p = _check_file(path, "data file")
    for lineno, value in _json_records(p):
        if isinstance(value, dict):
            keys = set(value)
            if keys & {"instruction", "output"}:
                return "instruction"
            if keys & {"document", "summary"}:
                return "summarization"
        raise DataError(
            f"{p} line {lineno}: cannot tell the data format from this record; expected an object with "
            "fields 'instruction'/'input'/'output' (instruction) or 'document'/'summary' (summarization); "
            "for translation pass --source-file and --target-file"
        )
    raise DataError(f"{p} contains no records")


def _read_json_task(path: str | os.PathLike, task: str) -> list[Example]:
    p = _check_file(path, f"{task} file")
    examples: list[Example] = []
    for lineno, value in _json_records(p):
        f = _record_fields(p, lineno, value, task)
        if task == "instruction":
            source = f["instruction"] if not f["input"].strip() else f"{f['instruction']}\n\n{f['input']}"
            examples.append(Example(source, f["output"], task, f, f"{p} line {lineno}"))
        else:
            examples.append(Example(f["document"], f["summary"], task, f, f"{p} line {lineno}"))
    if not examples:
        raise DataError(f"{p} contains no records")
    return examples


def read_instruction_file(path: str | os.PathLike) -> list[Example]:
    """Read an Alpaca JSON/JSONL file (``instruction``, optional ``input``, ``output``)."""
    return _read_json_task(path, "instruction")


def read_summarization_file(path: str | os.PathLike) -> list[Example]:
    """Read a JSON/JSONL file of ``document``/``summary`` records."""
    return _read_json_task(path, "summarization")


def read_parallel_files(source_file: str | os.PathLike, target_file: str | os.PathLike,
                        source_lang: str | None = None, target_lang: str | None = None) -> list[Example]:
    """Read line-aligned source/target text files (one sentence per line, no empty lines)."""
    src = _check_file(source_file, "source file")
    tgt = _check_file(target_file, "target file")
    src_lines = [(n, t) for n, t in _lines(src)]
    tgt_lines = [(n, t) for n, t in _lines(tgt)]
    if len(src_lines) != len(tgt_lines):
        raise DataError(f"source and target files have different numbers of lines ({len(src_lines)} vs "
                        f"{len(tgt_lines)}): {src}, {tgt}")
    if not src_lines:
        raise DataError(f"{src} contains no lines")
    examples = []
    for (n, s), (_, t) in zip(src_lines, tgt_lines):
        for path, text in ((src, s), (tgt, t)):
            if not text.strip():
                raise DataError(f"{path} line {n}: empty line (every line must hold one sentence)")
        fields = {"source": s, "target": t, "source_lang": source_lang or "", "target_lang": target_lang or ""}
        examples.append(Example(s, t, "translation", fields, f"{src} line {n}"))
    return examples


def load_examples(data_file: str | os.PathLike | None = None, *, task: str | None = None,
                  source_file: str | os.PathLike | None = None, target_file: str | os.PathLike | None = None,
                  source_lang: str | None = None, target_lang: str | None = None) -> list[Example]:
    """Read and validate one data set in any format.

    Args:
        data_file: a JSON/JSONL file (instruction or summarization).
        task: ``"instruction"``, ``"translation"`` or ``"summarization"``; detected when ``None``
            (translation when ``source_file``/``target_file`` are given).
        source_file: the source sentences, one per line (translation).
        target_file: the target sentences, line-aligned with ``source_file``.
        source_lang: the source language name used by the decoder-only prompt.
        target_lang: the target language name used by the decoder-only prompt.

    Returns:
        The examples in file order. Raises :class:`DataError` for a malformed or missing file.
    """
    if task is not None and task not in TASKS:
        raise DataError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    parallel = source_file is not None or target_file is not None
    if parallel:
        if data_file is not None:
            raise DataError("give either a data file (JSON/JSONL) or --source-file/--target-file, not both")
        if source_file is None or target_file is None:
            raise DataError("translation data needs both --source-file and --target-file")
        if task not in (None, "translation"):
            raise DataError(f"--source-file/--target-file hold translation data, but task is {task!r}")
        return read_parallel_files(source_file, target_file, source_lang, target_lang)
    if data_file is None:
        raise DataError("no data given: pass a JSON/JSONL file or --source-file/--target-file")
    if task == "translation":
        raise DataError("translation data is read from --source-file/--target-file")
    task = task or detect_task(data_file)
    return _read_json_task(data_file, task)


def split_validation(examples: Sequence[Example], fraction: float, seed: int = 0
                     ) -> tuple[list[Example], list[Example]]:
    """Split off a random ``fraction`` of ``examples`` as a validation set; returns ``(train, validation)``.

    At least one example and at most all but one; deterministic for a given ``seed``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction!r}")
    if len(examples) < 2:
        raise DataError(f"cannot split a validation set off {len(examples)} example(s)")
    n_val = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [e for i, e in enumerate(examples) if i not in val_idx]
    val = [e for i, e in enumerate(examples) if i in val_idx]
    return train, val


# ------------------------------------------------------------------------------------ prompts


def _has_chat_template(tokenizer: Any) -> bool:
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
        return TRANSLATION_TEMPLATE.format(source_lang=f.get("source_lang") or "source",
                                           target_lang=f.get("target_lang") or "target", source=example.source)
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
    if _has_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": _user_message(example)}],
                                             tokenize=False, add_generation_prompt=True)
    return _plain_prompt(example)


def _ids(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
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
    ids = _ids(tokenizer, text, False)
    if len(ids) <= max_tokens:
        return None
    n = max_tokens
    offsets = None
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                            verbose=False)["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        offsets = None  # a slow (Python) tokenizer: cut by decoding instead
    while True:
        cut = text[: offsets[n - 1][1]] if offsets is not None else \
            tokenizer.decode(ids[:n], skip_special_tokens=True)
        cut = cut.rstrip()
        excess = len(_ids(tokenizer, cut, False)) - max_tokens
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


def _prompt_ids(example: Example, tokenizer: Any, seq2seq: bool) -> list[int]:
    text = build_prompt(example, tokenizer, seq2seq=seq2seq)
    eos = tokenizer.eos_token_id
    if seq2seq:
        ids = _ids(tokenizer, text, True)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return ids
    if _has_chat_template(tokenizer):
        return _ids(tokenizer, text, False)
    ids = _ids(tokenizer, text, True)
    if eos is not None and ids and ids[-1] == eos and eos != tokenizer.bos_token_id:
        ids.pop()  # tokenizers that append EOS to every text (T5-like) must not end the prompt
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


def _target_ids(example: Example, tokenizer: Any) -> list[int]:
    ids = _ids(tokenizer, example.target, False)
    eos = tokenizer.eos_token_id
    if eos is not None:
        ids.append(eos)
    return ids


def encode_prompt(example: Example, tokenizer: Any, *, seq2seq: bool = False,
                  max_length: int | None = None, max_source_length: int | None = None) -> list[int]:
    """Token ids of the prompt for generation, exactly as training tokenises it.

    For seq2seq the encoder input (ending with EOS), for decoder-only the prompt the target
    follows. ``max_source_length`` first cuts the source text (:func:`truncate_source`); with
    ``max_length`` the encoder input is then cut to its first ``max_length`` tokens and a
    decoder-only prompt to its last ``max_length`` tokens."""
    ids = _prompt_ids(truncate_source(example, tokenizer, max_source_length), tokenizer, seq2seq)
    if max_length is not None and len(ids) > max_length:
        ids = ids[:max_length] if seq2seq else ids[-max_length:]
    return ids


def tokenize_example(example: Example, tokenizer: Any, *, seq2seq: bool, max_length: int,
                     max_source_length: int | None = None) -> dict[str, list[int]]:
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
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    prompt = _prompt_ids(truncate_source(example, tokenizer, max_source_length), tokenizer, seq2seq)
    target = _target_ids(example, tokenizer)
    if seq2seq:
        input_ids = prompt[:max_length]
        labels = target[:max_length]
        return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}
    keep_target = min(len(target), max(1, max_length // 2))
    if len(prompt) + len(target) > max_length and len(prompt) > max_length - keep_target:
        prompt = prompt[: max_length - keep_target]
    input_ids = (prompt + target)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + target)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def tokenize_examples(examples: Sequence[Example], tokenizer: Any, *, seq2seq: bool, max_length: int,
                      max_source_length: int | None = None) -> Any:
    """Tokenise ``examples`` (see :func:`tokenize_example`) into a ``datasets.Dataset``.

    Its columns are ``input_ids``, ``attention_mask`` and ``labels``.
    """
    import datasets

    rows = [tokenize_example(e, tokenizer, seq2seq=seq2seq, max_length=max_length,
                             max_source_length=max_source_length) for e in examples]
    return datasets.Dataset.from_list(rows)


@dataclass
class DataCollator:
    """Pad a list of tokenised examples into a batch (right padding).

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0 and ``labels``
    with ``-100``; for seq2seq examples the labels are padded to their own length. Returns
    ``torch.long`` tensors of shape ``(batch, time)``.
    """

    pad_token_id: int
    label_pad_token_id: int = IGNORE_INDEX
    pad_to_multiple_of: int | None = None

    def _pad(self, rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, r in enumerate(rows):
            if len(r):
                out[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        return out

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad a batch of tokenised examples into ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
        if not features:
            raise ValueError("cannot collate an empty batch")
        batch = {"input_ids": self._pad([f["input_ids"] for f in features], self.pad_token_id)}
        if "attention_mask" in features[0]:
            batch["attention_mask"] = self._pad([f["attention_mask"] for f in features], 0)
        else:
            batch["attention_mask"] = self._pad([[1] * len(f["input_ids"]) for f in features], 0)
        if "labels" in features[0]:
            batch["labels"] = self._pad([f["labels"] for f in features], self.label_pad_token_id)
        return batch
