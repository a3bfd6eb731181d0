"""What a model directory records, read without loading anything.

Its config, its position limit, the base of a LoRA adapter, and the data settings ``properlm train`` trained it with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from .gguf import BASE_RECORD

__all__ = [
    "POSITION_LIMIT_KEYS",
    "TRAINING_RECORD",
    "adapter_base",
    "model_config_dict",
    "model_max_positions",
    "read_training_record",
]

#: file that ``properlm train`` writes into every model directory it saves (``final/``,
#: ``averaged/``, ``checkpoint-N/``): the data settings the model was trained with, e.g.
#: ``{"max_length": 256, "max_source_length": 192, "task": "summarization"}``
TRAINING_RECORD = "properlm_training.json"
#: config fields that bound the positions a model takes (learned or sinusoidal position tables), in order
POSITION_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")


def _read_json_file(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def model_config_dict(model: str | None, gguf_file: str | None = None) -> dict[str, Any] | None:
    """The ``config.json`` of a local model directory as a dict, read without loading anything.

    For a LoRA adapter directory: its base model's; ``None`` for a hub id, a GGUF file, or a
    directory without one."""
    if model is None or gguf_file is not None or not os.path.isdir(model):
        return None
    config = _read_json_file(os.path.join(model, "config.json"))
    if config is None:
        base = adapter_base(model)
        if base is not None and os.path.isdir(base[0]):
            config = _read_json_file(os.path.join(base[0], "config.json"))
    return config


def adapter_base(directory: str) -> tuple[str, str | None] | None:
    """``(base, gguf_file)`` of a PEFT adapter directory, read without loading anything.

    ``base`` is ``adapter_config.json``'s ``base_model_name_or_path`` (a path relative to the
    adapter directory when one exists there, else as written: a directory or a hub id), ``gguf_file``
    the GGUF file in it that :data:`BASE_RECORD` names (``None`` without one). ``None`` when
    ``directory`` holds no adapter config or the config names no base."""
    adapter = _read_json_file(os.path.join(directory, "adapter_config.json"))
    base = adapter.get("base_model_name_or_path") if isinstance(adapter, dict) else None
    if not isinstance(base, str) or not base:
        return None
    if not os.path.isabs(base) and os.path.isdir(os.path.join(directory, base)):
        base = os.path.join(directory, base)
    record = _read_json_file(os.path.join(directory, BASE_RECORD))
    gguf_file = record.get("gguf_file") if isinstance(record, dict) else None
    return base, gguf_file if isinstance(gguf_file, str) else None


def model_max_positions(config: Any) -> tuple[int | None, str | None]:
    """``(limit, field)``: the most token positions a model's position table holds.

    Read from the first of :data:`POSITION_LIMIT_KEYS` in ``config`` (a ``PretrainedConfig`` or its dict; a
    composite config's ``text_config`` is looked into), or ``(None, None)`` when it names none
    (e.g. T5's relative positions). For an encoder-decoder the limit holds for the encoder input
    and for the decoder's sequence alike."""
    if config is None:
        return None, None
    get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
    for key in POSITION_LIMIT_KEYS:
        v = get(key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v, key
    text = get("text_config", None)
    if text is not None and text is not config:
        return model_max_positions(text)
    return None, None


def read_training_record(model: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """``(record, path)``: the data settings a model directory was trained with by ``properlm train``.

    Read from :data:`TRAINING_RECORD` in the directory, else (runs made before it existed) the
    ``config`` of ``results.json`` in the run directory that holds it (``RUN/final`` ->
    ``RUN/results.json``) -- or ``(None, None)``. The record has ``max_length`` and
    ``max_source_length`` (``None``: not cut)."""
    if model is None or not os.path.isdir(model):
        return None, None
    path = os.path.join(model, TRAINING_RECORD)
    record = _read_json_file(path)
    if record is not None and isinstance(record.get("max_length"), int):
        return record, path
    parent = os.path.join(os.path.dirname(os.path.abspath(model)), "results.json")
    results = _read_json_file(parent)
    config = results.get("config") if results else None
    if isinstance(config, dict) and isinstance(config.get("max_length"), int) and "global_step" in results:
        return {
            "max_length": config["max_length"],
            "max_source_length": config.get("max_source_length"),
            "task": config.get("task"),
        }, parent
    return None, None
