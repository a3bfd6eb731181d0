"""What ``--resume`` continues: the options of the run a checkpoint belongs to, and what changed since.

Every ``checkpoint-N`` holds :data:`RUN_CONFIG`, the run's :class:`~properlm.training.config.TrainConfig`
as JSON (:func:`write_run_config`). ``properlm train --resume`` compares the options it is given with
those of the newest checkpoint (:func:`resume_differences`) and warns, naming each option that changed,
before training. The question is whether the new command, run without interruption, would have
taken the steps the checkpoint holds; a change that only shapes the steps still to come is not a
difference:

* the objective (``--rule``, ``--schedule``, ``--improper-loss``) is compared over the steps already
  taken, so the switch protocol (a log checkpoint resumed with ``--schedule logarithmic:T1,brier:T2``)
  is a continuation;
* the run's length (``--max-steps``, ``--num-train-epochs``, a schedule's total) is compared only for
  the learning-rate schedules that depend on it (``linear``, ``cosine``): extending a ``constant`` or
  ``inverse_sqrt`` run leaves its past learning rates as they were;
* options that never change the parameters (logging, saving, evaluation, the output location) are not
  compared; every other option is.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from .checkpoints import checkpoint_step, find_checkpoints
from .config import TrainConfig, config_fields

__all__ = [
    "RUN_CONFIG",
    "options_to_resume",
    "read_run_config",
    "resume_differences",
    "saved_options",
    "write_run_config",
]

#: file in every ``checkpoint-N``: the run's options (``dataclasses.asdict(TrainConfig)``)
RUN_CONFIG = "properlm_config.json"

#: options that leave the trained parameters unchanged, so a resumed run may change them freely
_NOT_COMPARED = frozenset(
    {
        "output_dir",
        "overwrite_output_dir",
        "resume",
        "logging_steps",
        "tensorboard",
        "progress_bar",
        "dataloader_num_workers",
        "eval_steps",
        "save_steps",
        "save_total_limit",
        "average_last",
        "per_device_eval_batch_size",
        "validation_file",
        "validation_source_file",
        "validation_target_file",
    }
)
#: options holding file or directory paths (compared as absolute paths)
_PATHS = frozenset({"model", "train_file", "source_file", "target_file"})


def write_run_config(directory: str, cfg: TrainConfig) -> None:
    """Write :data:`RUN_CONFIG` (``cfg`` as JSON, paths made absolute) into ``directory`` if it exists."""
    if os.path.isdir(directory):
        with open(os.path.join(directory, RUN_CONFIG), "w", encoding="utf-8") as f:
            json.dump(_canonical(dataclasses.asdict(cfg)), f, indent=2, default=str)


def read_run_config(checkpoint: str) -> dict[str, Any] | None:
    """The options saved in ``checkpoint`` (``None``: a checkpoint saved before they were, or unreadable)."""
    try:
        with open(os.path.join(checkpoint, RUN_CONFIG), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def saved_options(output_dir: str) -> tuple[str, dict[str, Any]] | None:
    """``(path, options)``: the options saved with the newest checkpoint of ``output_dir``, for ``--resume``.

    ``path`` is the :data:`RUN_CONFIG` file read; ``options`` leaves out where the run is and how it starts
    (``output_dir``, ``resume``, ``overwrite_output_dir``) and names this version does not know. ``None``
    when there is no checkpoint, or its options were not saved.
    """
    checkpoints = find_checkpoints(output_dir)
    saved = read_run_config(checkpoints[-1]) if checkpoints else None
    if saved is None:
        return None
    known = {f.name for f in config_fields()} - {"output_dir", "resume", "overwrite_output_dir"}
    return os.path.join(checkpoints[-1], RUN_CONFIG), {k: v for k, v in saved.items() if k in known}


#: an option given to ``--resume`` -> the saved options it replaces (they are alternatives to it)
_REPLACES: dict[str, frozenset[str]] = {
    "schedule": frozenset({"rule", "improper_loss", "max_steps", "num_train_epochs"}),
    "rule": frozenset({"schedule", "improper_loss"}),
    "improper_loss": frozenset({"rule", "schedule"}),
    "max_steps": frozenset({"num_train_epochs"}),
    "num_train_epochs": frozenset({"max_steps"}),
    "model": frozenset({"init", "gguf_file"}),
    "gguf_file": frozenset({"init", "model"}),
    "init": frozenset({"model", "gguf_file"}),
    "validation_file": frozenset({"validation_source_file", "validation_target_file", "validation_fraction"}),
    "validation_source_file": frozenset({"validation_file", "validation_fraction"}),
    "validation_target_file": frozenset({"validation_file", "validation_fraction"}),
    "validation_fraction": frozenset({"validation_file", "validation_source_file", "validation_target_file"}),
    "bf16": frozenset({"fp16"}),
    "fp16": frozenset({"bf16"}),
}


#: the options that give the training data: a ``--resume`` command without any of them takes the saved ones
_DATA_OPTIONS = ("train_file", "source_file", "target_file")


def options_to_resume(given: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """``(path, options)``: the options of a ``--resume`` run given without its data, the saved ones under them.

    ``given`` maps option names to the values given (flags, YAML file). With ``resume`` among them but none
    of the data options (``train_file``, ``source_file``, ``target_file``), such as ``--resume --output-dir
    DIR``, the options saved with the newest checkpoint of their ``output_dir`` (:func:`saved_options`) are
    the base and ``given`` overrides them; a given option also drops the saved ones that are its
    alternatives (``--schedule`` the saved ``--rule`` and ``--max-steps``). A command that gives the data is
    taken as it is, as before (without the data it could not run), so no command that ran before trains
    differently. ``path`` is the file the saved options came from; ``(None, given)`` when none were taken.
    """
    values = dict(given)
    if not values.get("resume") or any(values.get(name) is not None for name in _DATA_OPTIONS):
        return None, values
    found = saved_options(str(values.get("output_dir") or TrainConfig.output_dir))
    if found is None:
        return None, values
    path, saved = found
    dropped = set(values).union(*(_REPLACES.get(name, frozenset()) for name in values))
    taken = {k: v for k, v in saved.items() if k not in dropped}
    return (path if taken else None), {**taken, **values}


def resume_differences(cfg: TrainConfig, checkpoint: str) -> list[str]:
    """``["--flag NEW (the run had OLD)", ...]``: how ``cfg`` changes the steps ``checkpoint`` holds.

    The options in which ``cfg`` differs from the checkpoint's run, where the difference changes the
    steps already taken (see the module docstring). Empty when nothing of the kind changed, or when
    the checkpoint holds no :data:`RUN_CONFIG`.
    """
    saved = read_run_config(checkpoint)
    if saved is None:
        return []
    now = _canonical(dataclasses.asdict(cfg))
    steps = checkpoint_step(checkpoint)
    objective_changed = _objective(saved, steps) != _objective(now, steps)
    length_matters = (
        saved.get("lr_scheduler") not in _LENGTH_FREE_SCHEDULERS
        or now.get("lr_scheduler") not in _LENGTH_FREE_SCHEDULERS
    )
    length_changed = length_matters and _length(saved) != _length(now)
    out = []
    for name, value in now.items():
        if name in _NOT_COMPARED or name not in saved:
            continue
        if (name in _OBJECTIVE or name in _LENGTH) and not (
            (name in _OBJECTIVE and objective_changed) or (name in _LENGTH and length_changed)
        ):
            continue
        old = saved[name]
        if _normal(old) != _normal(value):
            out.append(f"--{name.replace('_', '-')} {_show(value)} (the run had {_show(old)})")
    return out


#: options that choose the objective of each step
_OBJECTIVE = frozenset({"rule", "schedule", "improper_loss"})
#: options that set the run's length
_LENGTH = frozenset({"max_steps", "num_train_epochs", "schedule"})
#: learning-rate schedules whose value at a step does not depend on the run's length
_LENGTH_FREE_SCHEDULERS = frozenset({"constant", "inverse_sqrt"})


def _stages(config: dict[str, Any]) -> list[tuple[str, int | None]]:
    """``[(objective, steps), ...]``: the schedule's stages, or one open-ended stage of the rule."""
    if config.get("improper_loss"):
        return [(f"improper:{config['improper_loss']}", None)]
    try:
        if config.get("schedule"):
            from ..integrations.schedule import RuleSchedule

            return [(rule.spec, int(n)) for rule, n in RuleSchedule.parse(config["schedule"]).stages]
        from ..rules import get_rule

        return [(get_rule(config.get("rule") or "logarithmic").spec, None)]
    except ValueError:  # a spec this version cannot read: compare it as text
        return [(str(config.get("schedule") or config.get("rule")), None)]


def _objective(config: dict[str, Any], steps: int) -> list[tuple[str, int]]:
    """``[(objective, last step), ...]`` over steps ``0 .. steps - 1``, merged where consecutive stages agree."""
    out: list[tuple[str, int]] = []
    start = 0
    for name, n in _stages(config):
        end = steps if n is None else min(steps, start + n)
        if end > start:
            if out and out[-1][0] == name:
                out[-1] = (name, end)
            else:
                out.append((name, end))
        start = end
        if start >= steps:
            break
    return out


def _length(config: dict[str, Any]) -> tuple[Any, Any]:
    """``(steps, epochs)`` that fix the run's length: a schedule's total, else ``--max-steps``, else epochs."""
    stages = _stages(config)
    if config.get("schedule") and all(n is not None for _, n in stages):
        return sum(n for _, n in stages if n is not None), None
    if config.get("max_steps") is not None:
        return config["max_steps"], None
    return None, config.get("num_train_epochs")


def _canonical(config: dict[str, Any]) -> dict[str, Any]:
    """Paths absolute, so a run resumed from another working directory compares equal."""
    out = dict(config)
    for name in _PATHS:
        value = out.get(name)
        if isinstance(value, str) and os.path.exists(value):
            out[name] = os.path.abspath(value)
    return out


def _normal(value: Any) -> Any:
    """JSON round trip: tuples become lists, so a saved value and a live one compare alike."""
    return json.loads(json.dumps(value, default=str))


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)
