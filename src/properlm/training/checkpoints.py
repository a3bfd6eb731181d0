"""The ``checkpoint-N`` directories of a run: finding them (resuming), averaging their parameters, clearing them.

:func:`find_checkpoints` lists the complete checkpoints of an output directory by step; :func:`average_checkpoints`
is the element-wise mean of their saved parameters (``--average-last K``), which ``load_averaged`` loads into the
trained model (full model or PEFT adapter).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

import torch

from ..models import unwrap_model

__all__ = [
    "average_checkpoints",
    "checkpoint_step",
    "find_checkpoints",
    "finished_run",
    "is_run_output",
    "missing_weights",
    "remove_earlier_run",
]

#: what ``properlm train`` writes into its output directory besides ``checkpoint-N``, each with the test that
#: tells it is the earlier run's (an ``--overwrite-output-dir`` run removes only what passes)
RUN_OUTPUTS = ("final", "averaged", "tokenizer", "base", "runs", "metrics.jsonl", "results.json")


_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def find_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """``checkpoint-N`` directories in ``output_dir`` that hold a ``trainer_state.json``, by step."""
    d = os.fspath(output_dir)
    if not os.path.isdir(d):
        return []
    found = []
    for name in os.listdir(d):
        m = _CHECKPOINT_RE.match(name)
        if m and os.path.isfile(os.path.join(d, name, "trainer_state.json")):
            found.append((int(m.group(1)), os.path.join(d, name)))
    return [p for _, p in sorted(found)]


def checkpoint_step(checkpoint: str) -> int:
    """The global step a checkpoint was saved at (its ``trainer_state.json``, else its name)."""
    try:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
            return int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        tail = os.path.basename(os.path.normpath(checkpoint)).rsplit("-", 1)[-1]
        return int(tail) if tail.isdigit() else 0


def missing_weights(model: Any, missing_keys: Sequence[str]) -> list[str]:
    """The keys of ``missing_keys`` (absent from a loaded checkpoint) whose values the checkpoint did lose.

    A checkpoint stores each tied parameter once (``model.shared.weight`` stands for the embeddings and
    ``lm_head.weight`` tied to it) and leaves out what the model rebuilds itself (``_keys_to_ignore_on_save``,
    e.g. sinusoidal positions); loading it reports those as missing, although nothing is lost. The keys
    returned are the others: neither tied to a parameter that was loaded nor left out by design.
    """
    base = unwrap_model(model)
    missing = set(missing_keys)
    tied: dict[int, list[str]] = {}
    for name, param in base.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    loaded_with = {name for names in tied.values() if any(n not in missing for n in names) for name in names}
    by_design = set(getattr(base, "_keys_to_ignore_on_save", None) or ())
    return [k for k in missing_keys if k not in loaded_with and k not in by_design]


def _weights_file(checkpoint: str) -> str:
    for name in ("adapter_model.safetensors", "model.safetensors"):
        path = os.path.join(checkpoint, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{checkpoint} holds no model.safetensors / adapter_model.safetensors "
        "(sharded checkpoints are not supported for averaging)"
    )


def average_checkpoints(checkpoints: Sequence[str]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the parameters saved in ``checkpoints``.

    Accumulated in float64, returned in each tensor's stored dtype. Non-floating tensors are taken from
    the last checkpoint. Keys are as stored (full model or PEFT adapter)."""
    from safetensors.torch import load_file

    if not checkpoints:
        raise ValueError("average_checkpoints needs at least one checkpoint")
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path in checkpoints:
        state = load_file(_weights_file(path))
        if total and set(state) != set(total):
            raise ValueError(f"{path} holds different parameters from {checkpoints[0]}")
        for k, v in state.items():
            dtypes[k] = v.dtype
            if v.is_floating_point():
                total[k] = total.get(k, 0) + v.to(torch.float64)
            else:
                total[k] = v
    n = len(checkpoints)
    return {k: (v / n).to(dtypes[k]) if dtypes[k].is_floating_point else v for k, v in total.items()}


def load_averaged(model: Any, state: dict[str, torch.Tensor], lora: bool) -> None:
    if lora:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        unexpected = getattr(result, "unexpected_keys", [])
    else:
        result = unwrap_model(model).load_state_dict(state, strict=False)
        unexpected = result.unexpected_keys
    if unexpected:
        raise RuntimeError(f"averaged checkpoint has parameters the model lacks: {unexpected[:5]}")


def is_run_output(output_dir: str, name: str) -> bool:
    """Whether ``output_dir/name`` is one of :data:`RUN_OUTPUTS` as ``properlm train`` writes it.

    ``final/`` and ``averaged/`` holding :data:`properlm.models.TRAINING_RECORD`, ``tokenizer/`` holding
    ``tokenizer.json``, ``base/`` holding ``config.json``, ``runs/`` holding only TensorBoard event files,
    ``metrics.jsonl``, and a ``results.json`` with a ``global_step``.
    """
    from ..models import TRAINING_RECORD

    path = os.path.join(output_dir, name)
    inner = {
        "final": TRAINING_RECORD,
        "averaged": TRAINING_RECORD,
        "tokenizer": "tokenizer.json",
        "base": "config.json",
    }
    if name in inner:
        return os.path.isfile(os.path.join(path, inner[name]))
    if name == "runs":
        files = [f for _, _, fs in os.walk(path) for f in fs]
        return bool(files) and all(f.startswith("events.out.tfevents") for f in files)
    if name == "metrics.jsonl":
        return os.path.isfile(path)
    if name == "results.json":
        try:
            with open(path, encoding="utf-8") as f:
                return "global_step" in json.load(f)
        except (OSError, ValueError, TypeError):
            return False
    return False


def finished_run(output_dir: str | os.PathLike) -> list[str]:
    """What of a finished ``properlm train`` run ``output_dir`` holds: ``final``, ``averaged``, ``results.json``."""
    d = os.fspath(output_dir)
    return [name for name in ("final", "averaged", "results.json") if is_run_output(d, name)]


def remove_earlier_run(output_dir: str | os.PathLike) -> list[str]:
    """Remove what an earlier ``properlm train`` left in ``output_dir``; the names removed.

    That is every complete ``checkpoint-N`` (with its ``trainer_state.json``) and those entries of
    :data:`RUN_OUTPUTS` that are recognisably a run's: ``final/`` and ``averaged/`` holding
    :data:`properlm.models.TRAINING_RECORD`, ``tokenizer/`` holding ``tokenizer.json``, ``base/``
    holding ``config.json``, ``runs/`` holding only TensorBoard event files, ``metrics.jsonl``, and a
    ``results.json`` with a ``global_step``. Anything else stays, so an output directory that also
    holds other work loses none of it. ``--overwrite-output-dir`` calls it (without ``--resume``), so
    a new run neither averages an old run's checkpoints nor appends to its logs.
    """
    import shutil

    d = os.fspath(output_dir)
    if not os.path.isdir(d):
        return []
    checkpoints = {os.path.basename(p) for p in find_checkpoints(d)}
    removed = []
    for name in sorted(os.listdir(d)):
        path = os.path.join(d, name)
        if os.path.islink(path) or not (name in checkpoints or is_run_output(d, name)):
            continue
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
        removed.append(name)
    return removed
