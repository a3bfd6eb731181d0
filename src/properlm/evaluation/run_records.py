"""What ``properlm compare`` reads from run directories: :class:`RunRecord` rows and the ``metrics.jsonl`` logs.

A run directory may hold

* ``results.json`` written by ``properlm train`` (its config, rule stages, final training
  loss and validation figures) and ``metrics.jsonl`` (one record per log step/evaluation);
* ``results.json`` written by ``properlm evaluate`` (``"kind": "properlm-evaluate"``);
* sub-directories holding evaluate results (``runs/sph/eval/results.json``): each gives
  one row, labelled ``RUN_DIR/SUBDIR``, with the run's training figures.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from .comparison import ComparisonError, read_json_object
from .settings import RESULTS_KIND

__all__ = ["RunRecord", "load_runs", "read_metrics_log"]


@dataclass
class RunRecord:
    """What one row of the comparison is built from.

    ``label`` names the run (the ``NAME`` of ``NAME=DIR``, with ``#i`` for the i-th seed of a group, or the
    directory given), ``split`` what the row's figures were measured on: ``"validation"`` (the training run's
    own validation set) or the evaluation's folder name (``"test"``, ``"eval_dev"``, ...).
    """

    label: str
    directory: str
    train: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    log_path: str | None = None
    split: str | None = None


def read_metrics_log(path: str) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (blank lines skipped).

    Raises :class:`ComparisonError` naming the line of a malformed record.
    """
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ComparisonError(f"{path} line {lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise ComparisonError(f"{path} line {lineno}: expected a JSON object")
            records.append(rec)
    return records


def _is_eval(results: dict[str, Any]) -> bool:
    return results.get("kind") == RESULTS_KIND


def _split_name(directory: str) -> str:
    return os.path.basename(os.path.normpath(directory)) or "evaluation"


def load_runs(paths: list[str], labels: list[str] | None = None) -> list[RunRecord]:
    """Read every run directory (or a ``results.json`` path) into :class:`RunRecord` rows.

    A training run gives a ``"validation"`` row when its ``results.json`` holds validation figures, and one row
    per evaluation sub-directory, labelled with the sub-directory's name; an evaluation directory gives one row.
    ``labels`` (one per path; default: the paths) name the rows.
    """
    if not paths:
        raise ComparisonError("give at least one run directory")
    labels = list(paths) if labels is None else labels
    rows: list[RunRecord] = []
    for p, label in zip(paths, labels):
        if os.path.isfile(p):
            res = read_json_object(p)
            d = os.path.dirname(p) or "."
            if _is_eval(res):
                rows.append(RunRecord(label=label, directory=d, evaluation=res, split=_split_name(d)))
            else:
                rows.append(RunRecord(label=label, directory=d, train=res, split="validation"))
            continue
        if not os.path.isdir(p):
            raise ComparisonError(f"run directory {p!r} does not exist")
        top = os.path.join(p, "results.json")
        log_path = os.path.join(p, "metrics.jsonl")
        train = evaluation = None
        if os.path.isfile(top):
            res = read_json_object(top)
            if _is_eval(res):
                evaluation = res
            else:
                train = res
        log = read_metrics_log(log_path) if os.path.isfile(log_path) else []
        subs = []
        for name in sorted(os.listdir(p)):
            sub = os.path.join(p, name, "results.json")
            if os.path.isfile(sub):
                res = read_json_object(sub)
                if _is_eval(res):
                    subs.append((name, res))
        if train is None and evaluation is None and not log and not subs:
            raise ComparisonError(f"{p!r} holds no results.json, metrics.jsonl or evaluation sub-directory")
        base: dict[str, Any] = dict(label=label, directory=p, train=train, log=log, log_path=log_path if log else None)
        if evaluation is not None:
            rows.append(RunRecord(evaluation=evaluation, split=_split_name(p), **base))
        elif (train is not None and isinstance(train.get("eval"), dict)) or not subs:
            rows.append(RunRecord(split="validation" if train is not None or log else None, **base))
        for name, res in subs:
            rows.append(RunRecord(evaluation=res, split=name, **base))
    return rows
