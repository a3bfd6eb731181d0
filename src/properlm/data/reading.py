"""Reading and validating the data files: the three formats, each checked line by line.

Every file is validated before anything expensive happens, so that a malformed one stops with a
:class:`DataError` naming the file, the line and the field:

``instruction``
    Alpaca-style JSON (an array of objects) or JSONL, one object per record with the string
    fields ``instruction`` (required), ``input`` (optional) and ``output`` (required), and
    optionally ``annotations``: a list of further reference outputs (multi-reference ROUGE)
    (:func:`read_instruction_file`).
``translation``
    Two line-aligned plain-text files, ``source_file`` and ``target_file`` (one sentence per
    line, UTF-8, no empty lines), with optional language names ``source_lang``/``target_lang``
    (:func:`read_parallel_files`).
``summarization``
    JSONL (or a JSON array) of objects with the string fields ``document`` and ``summary``,
    and optionally ``annotations``: a list of further reference summaries (e.g. AESLC's
    development split), used by multi-reference ROUGE (:attr:`Example.references`)
    (:func:`read_summarization_file`).

Every record becomes an :class:`Example` ``(source, target)`` with its original fields and its location
(``"train.jsonl line 7"``). :func:`load_examples` reads any format (:func:`detect_task` tells instruction from
summarization by the first record's fields); :func:`split_validation` splits off a seeded random validation set.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "TASKS",
    "DataError",
    "Example",
    "detect_task",
    "load_examples",
    "read_instruction_file",
    "read_parallel_files",
    "read_summarization_file",
    "split_validation",
]

#: the data formats (``task`` values)
TASKS = ("instruction", "translation", "summarization")

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

        Summarization and instruction records may have ``annotations``; translation pairs have one reference.
        """
        return (self.target, *self.fields.get("annotations", ()))


def _name(path: str | os.PathLike) -> str:
    return os.fspath(path)


def _check_file(path: str | os.PathLike | None, what: str) -> str:
    if path is None or os.fspath(path) == "":
        raise DataError(f"{what}: no file given")
    p = os.fspath(path)
    if not os.path.exists(p):
        raise DataError(f"{what} {p!r} does not exist")
    if os.path.isdir(p):
        raise DataError(f"{what} {p!r} is a directory, not a file")
    return p  # a regular file, or a pipe such as the shell's <(command) (/dev/fd/N), read once


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


def _strip_trailing_blank(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """``lines`` without the blank lines at the end of the file, as JSONL files may end.

    A blank line before the last sentence stays (and is an error of the text formats).
    """
    while lines and not lines[-1][1].strip():
        lines.pop()
    return lines


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
        raise DataError(
            f"{where}: expected a JSON object with fields {', '.join(map(repr, _REQUIRED[task]))}, "
            f"got {type(value).__name__}"
        )
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
    if value.get("annotations") is not None:
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
    """Read an Alpaca JSON/JSONL file.

    Fields: ``instruction``, optional ``input``, ``output``, optional ``annotations`` (further reference outputs).
    """
    return _read_json_task(path, "instruction")


def read_summarization_file(path: str | os.PathLike) -> list[Example]:
    """Read a JSON/JSONL file of ``document``/``summary`` records."""
    return _read_json_task(path, "summarization")


def read_parallel_files(
    source_file: str | os.PathLike,
    target_file: str | os.PathLike,
    source_lang: str | None = None,
    target_lang: str | None = None,
) -> list[Example]:
    """Read line-aligned source/target text files (one sentence per line, no empty lines)."""
    src = _check_file(source_file, "source file")
    tgt = _check_file(target_file, "target file")
    src_lines, tgt_lines = _strip_trailing_blank(list(_lines(src))), _strip_trailing_blank(list(_lines(tgt)))
    if len(src_lines) != len(tgt_lines):
        raise DataError(
            f"source and target files have different numbers of lines ({len(src_lines)} vs "
            f"{len(tgt_lines)}): {src}, {tgt}"
        )
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


def load_examples(
    data_file: str | os.PathLike | None = None,
    *,
    task: str | None = None,
    source_file: str | os.PathLike | None = None,
    target_file: str | os.PathLike | None = None,
    source_lang: str | None = None,
    target_lang: str | None = None,
) -> list[Example]:
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


def split_validation(
    examples: Sequence[Example], fraction: float, seed: int = 0
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
