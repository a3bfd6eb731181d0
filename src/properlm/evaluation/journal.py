"""A journal of decoded batches, so that an interrupted decoding resumes where it stopped.

Decoding 3,003 sentences with a 135M-parameter LM takes about half an hour on one CPU core; a kill
used to lose all of it. :class:`DecodeJournal` appends every finished batch of
:func:`~properlm.evaluation.generation.decode_prompts_with_stats` to a JSON-lines file::

    {"kind": "properlm-decode-journal", "version": 1, "fingerprint": "<sha256>"}   # header
    {"start": 0, "indices": [7, 2, ...], "texts": ["...", ...], "cap": 40, "at_cap": [false, ...]}
    ...

The fingerprint is a SHA-256 over everything that decides the hypotheses: the prompts, the source
lengths, the batch size, the decoding settings and a caller's key for the model (its path and the
size and modification time of its weight files, :func:`model_fingerprint`). A journal whose
fingerprint differs is discarded, never mixed in. The batches are those of the uninterrupted run
(the batch composition is a function of the prompts alone) and a resumed run skips the batches the
journal holds, so its hypotheses equal the uninterrupted run's bit for bit. A line cut short by a
kill is ignored (that batch is decoded again).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

from ..models import BASE_RECORD, adapter_base

__all__ = ["JOURNAL_KIND", "DecodeJournal", "journal_key", "journaled_outputs", "model_fingerprint"]

#: ``kind`` of the journal's header line
JOURNAL_KIND = "properlm-decode-journal"
_VERSION = 1


#: the files of a model directory that decide its outputs: weights, configs, tokenizer
_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    BASE_RECORD,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def model_fingerprint(model: str | None, gguf_file: str | None = None) -> dict[str, Any]:
    """What identifies a saved model: its absolute path and ``(name, size, mtime_ns)`` of its files.

    For a directory, its weight files (``*.safetensors``, ``*.bin``, ...), configs and tokenizer
    files (not what an evaluation may write beside them); for a GGUF file, that file (relative to
    ``model`` when given so). A hub id or a missing path gives only the name. For a PEFT adapter
    directory, also its base model's fingerprint under ``"base"`` (the adapter is decoded merged
    into it, so another base decodes other hypotheses).
    """
    paths = []
    if gguf_file is not None:
        paths.append(gguf_file if model is None or os.path.isabs(gguf_file) else os.path.join(model, gguf_file))
    elif model is not None and os.path.isdir(model):
        paths.extend(
            os.path.join(model, n)
            for n in sorted(os.listdir(model))
            if n in _MODEL_FILES or n.endswith(_WEIGHT_SUFFIXES)
        )
    files = []
    for p in paths:
        if os.path.isfile(p):
            st = os.stat(p)
            files.append([os.path.basename(p), st.st_size, st.st_mtime_ns])
    name = os.path.abspath(model) if model is not None and os.path.exists(model) else model
    found: dict[str, Any] = {"model": name, "gguf_file": gguf_file, "files": files}
    base = adapter_base(model) if gguf_file is None and model is not None and os.path.isdir(model) else None
    if base is not None:
        found["base"] = model_fingerprint(*base)
    return found


def journal_key(model: str | None, gguf_file: str | None, dtype: str, module: Any) -> dict[str, Any]:
    """The key of a loaded model's journal.

    :func:`model_fingerprint`, the ``dtype`` option and the device of ``module``'s parameters (another
    dtype or device decodes other hypotheses).
    """
    return {
        "model": model_fingerprint(model, gguf_file),
        "dtype": dtype,
        "device": str(next(module.parameters()).device),
    }


class DecodeJournal:
    """The batches of one decoding written as they finish (see the module docstring).

    Args:
        path: the journal file (created; its directory must exist).
        key: JSON-serialisable identity of the model (e.g. :func:`model_fingerprint`); part of the
            fingerprint.

    :meth:`begin` (called by the decoder with its settings) returns the batches already done;
    :meth:`record` appends one; :meth:`finish` removes the file once every hypothesis is in hand.
    """

    def __init__(self, path: str | os.PathLike, key: Any = None) -> None:
        self.path = os.fspath(path)
        self.key = key
        self.resumed = 0
        self.discarded = False
        self._file: Any = None

    def begin(self, prompts: Sequence[Sequence[int]], settings: dict[str, Any]) -> dict[int, dict[str, Any]]:
        """Open the journal for a decoding of ``prompts`` with ``settings``; ``{batch start: record}`` done before.

        A journal of another decoding (another fingerprint, an unreadable header) is replaced.
        """
        digest = hashlib.sha256()
        digest.update(json.dumps({"key": self.key, "settings": settings}, sort_keys=True, default=str).encode())
        for p in prompts:
            digest.update(b"\x00" + ",".join(str(int(t)) for t in p).encode())
        fingerprint = digest.hexdigest()
        done: dict[int, dict[str, Any]] = {}
        if os.path.isfile(self.path):
            done, matches = _read(self.path, fingerprint)
            self.discarded = not matches
        # written afresh: the header, then the batches kept (a line a kill cut short is dropped here)
        self._file = open(self.path, "w", encoding="utf-8")  # closed in close() / finish()
        self._write({"kind": JOURNAL_KIND, "version": _VERSION, "fingerprint": fingerprint})
        for start in sorted(done):
            self._write(done[start])
        self.resumed = sum(len(r["indices"]) for r in done.values())
        return done

    def record(
        self, start: int, indices: Sequence[int], texts: Sequence[str], cap: int, at_cap: Sequence[bool]
    ) -> None:
        """Append the finished batch that starts at position ``start`` of the decoding order."""
        self._write(
            {
                "start": int(start),
                "indices": [int(i) for i in indices],
                "texts": list(texts),
                "cap": int(cap),
                "at_cap": [bool(a) for a in at_cap],
            }
        )

    def close(self) -> None:
        """Close the file, keeping it (an interrupted decoding resumes from it)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> None:
        """Close and remove the file: the decoding is complete."""
        self.close()
        if os.path.exists(self.path):
            os.remove(self.path)

    def _write(self, obj: dict[str, Any]) -> None:
        self._file.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())


def journaled_outputs(path: str | os.PathLike) -> int:
    """How many decoded outputs the journal at ``path`` holds (0: no journal, or not one)."""
    try:
        with open(path, encoding="utf-8") as f:
            header = json.loads(f.readline())
        fingerprint = header.get("fingerprint") if isinstance(header, dict) else None
        done, _ = _read(os.fspath(path), fingerprint) if isinstance(fingerprint, str) else ({}, False)
    except (OSError, ValueError):
        return 0
    return sum(len(rec["indices"]) for rec in done.values())


def _read(path: str, fingerprint: str) -> tuple[dict[int, dict[str, Any]], bool]:
    """``(batches, fingerprint matches)`` of a journal file; no batches when the fingerprint differs."""
    done: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    try:
        header = json.loads(lines[0])
    except (ValueError, IndexError):
        return {}, False
    if not isinstance(header, dict) or header.get("kind") != JOURNAL_KIND or header.get("fingerprint") != fingerprint:
        return {}, False
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except ValueError:  # the line a kill cut short (or the empty tail)
            continue
        if (
            isinstance(rec, dict)
            and {"start", "indices", "texts", "cap", "at_cap"} <= rec.keys()
            and len(rec["indices"]) == len(rec["texts"]) == len(rec["at_cap"])
        ):
            done[int(rec["start"])] = rec
    return done, True
