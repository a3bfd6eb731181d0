"""What ``properlm compare`` reads from run directories: :class:`RunRecord` rows and the ``metrics.jsonl`` logs.

A run directory may hold

* ``results.json`` written by ``properlm train`` (its config, rule stages, final training
  loss and validation figures) and ``metrics.jsonl`` (one record per log step/evaluation);
* ``results.json`` written by ``properlm evaluate`` (``"kind": "properlm-evaluate"``);
* sub-directories holding evaluate results (``runs/sph/eval/results.json``): each gives
  one row, labelled ``RUN_DIR/SUBDIR``, with the run's training figures.

A run's log is read with :func:`read_run_log`: the last record per step and kind (:func:`latest_records`), since a
run resumed from a checkpoint logs the steps after it again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from .comparison import ComparisonError, read_json_object
from .settings import RESULTS_KIND

__all__ = ["RunRecord", "latest_records", "load_runs", "read_metrics_log", "read_run_log"]


@dataclass
class RunRecord:
    """What one row of the comparison is built from.

    ``label`` names the run (the ``NAME`` of ``NAME=DIR``, with ``#i`` for the i-th seed of a group, or the
    directory given), ``split`` what the row's figures were measured on: ``"validation"`` (the training run's
    own validation set) or the evaluation's folder name (``"test"``, ``"eval_dev"``, ...). ``log`` holds the
    records of the run's ``metrics.jsonl`` as :func:`read_run_log` gives them, ``log_path`` that file (``None``
    when the run has no log).
    """

    label: str
    directory: str
    train: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    log_path: str | None = None
    split: str | None = None

    @classmethod
    def from_log(cls, label: str, directory: str) -> RunRecord:
        """A record named ``label`` of run ``directory``'s training log alone.

        Its ``log`` is :func:`read_run_log` of ``DIRECTORY/metrics.jsonl`` (empty when there is none): what the
        training curves of :mod:`~properlm.evaluation.curves` need.
        """
        log_path = os.path.join(directory, "metrics.jsonl")
        log = read_run_log(log_path)
        return cls(label=label, directory=directory, log=log, log_path=log_path if log else None)


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


#: the kinds of log record :func:`latest_records` tells apart, in the order it puts them within a step
_KINDS = ("eval", "loss", "other")


def _kind(record: dict[str, Any]) -> str:
    return "eval" if "eval_loss" in record else "loss" if "loss" in record else "other"


def latest_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last record per step and kind of a training log, by step.

    A kind is an evaluation (a record with ``eval_loss``), a training-loss record (``loss``) or any other (the
    final ``train_runtime`` record, ...). A run resumed from a checkpoint logs again the steps after that
    checkpoint, and the final evaluation repeats the last scheduled one: the later record of a step and kind
    replaces the earlier. The result is sorted by step and, within a step, evaluation, training loss, other;
    records without a numeric ``step`` follow, in their order.
    """
    last: dict[tuple[float, str], dict[str, Any]] = {}
    unstepped = []
    for rec in records:
        step = rec.get("step")
        if isinstance(step, (int, float)) and not isinstance(step, bool):
            last[(step, _kind(rec))] = rec
        else:
            unstepped.append(rec)
    return [last[k] for k in sorted(last, key=lambda sk: (sk[0], _KINDS.index(sk[1])))] + unstepped


def read_run_log(path: str) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` that count: the last per step and kind, by step.

    :func:`latest_records` of :func:`read_metrics_log`; an empty list when ``path`` does not exist.
    """
    return latest_records(read_metrics_log(path)) if os.path.isfile(path) else []


def _is_eval(results: dict[str, Any]) -> bool:
    return results.get("kind") == RESULTS_KIND


def _split_name(directory: str) -> str:
    return os.path.basename(os.path.normpath(directory)) or "evaluation"


def load_runs(paths: list[str], labels: list[str] | None = None) -> list[RunRecord]:
    """Read every run directory (or a ``results.json`` path) into :class:`RunRecord` rows.

    A training run gives a ``"validation"`` row when its ``results.json`` holds validation figures, and one row
    per evaluation sub-directory, labelled with the sub-directory's name; an evaluation directory gives one row.
    ``labels`` (one per path; default: the paths) name the rows. A row's ``log`` is :func:`read_run_log` of its
    directory's ``metrics.jsonl`` (the last record per step and kind, by step).
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
        log = read_run_log(log_path)
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
