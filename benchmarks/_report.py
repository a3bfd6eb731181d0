"""The report builder of every study (``reproduce_mt.py``, ``reproduce_summ.py``, ``reproduce_llm.py``,
``reproduce_instruct.py``): the per-seed markdown tables (:func:`seed_table`), the plateau of the root runs
(:func:`plateau`) and ``WORK/results.md`` / ``results.json`` (:func:`write_report`). The statistics themselves
are :mod:`_stats`'s; the training curves are drawn by the library's plotter,
:func:`properlm.evaluation.curves.plot_curves`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from _runner import read_log
from _stats import fmt_mean_std, numeric_values, seed_values
from properlm.evaluation.curves import CurveSeries, Panel
from properlm.evaluation.run_records import RunRecord

__all__ = ["CURVE_PANELS", "curve_series", "plateau", "seed_table", "write_report"]

#: the panels of every study's training curves (:func:`properlm.evaluation.curves.plot_curves`): the log,
#: Brier and spherical scores on the evaluation set and the training loss, whatever its rule
CURVE_PANELS: list[Panel] = [
    ("eval_score_logarithmic", None),
    ("eval_score_brier", None),
    ("eval_score_spherical", None),
    ("loss", None),
]


def curve_series(label: str, runs: Sequence[str], style: dict[str, Any] | None = None) -> CurveSeries:
    """A series of the training curves named ``label``: the logs of the run directories ``runs`` (the last
    record per step and kind of each ``metrics.jsonl``), drawn with the matplotlib keywords ``style``."""
    return CurveSeries(label, [RunRecord.from_log(label, run) for run in runs], dict(style or {}))


def seed_table(
    per: dict[str, dict[Any, dict[str, Any]]],
    rows: Sequence[str],
    labels: dict[str, str],
    cols: Sequence[tuple[str, str, int, float]],
    count_key: str | None = None,
    *,
    head: str = "protocol",
    single: Sequence[str] = (),
) -> list[str]:
    """Markdown table lines, a row per name of ``rows``: its label, its number of seeds (those with
    ``count_key``, or all of its seeds; ``-`` for a row of ``single``, one model such as the untuned one)
    and per column ``(title, key, digits, scale)`` :func:`fmt_mean_std` of ``key`` over the seeds of
    ``per[row]``; ``head`` titles the first column."""
    lines = [f"| {head} | seeds | " + " | ".join(c[0] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for r in rows:
        seeds = per.get(r, {})
        n = "-" if r in single else len(seeds) if count_key is None else len(seed_values(per, r, count_key))
        cells = [fmt_mean_std(numeric_values(seeds, key), digits, scale) for _, key, digits, scale in cols]
        lines.append(f"| {labels[r]} | {n} | " + " | ".join(cells) + " |")
    return lines


def plateau(
    runs: dict[int, str], t1: int, t2: int, *, what: str, end_note: str = "", best: bool = False
) -> tuple[str, dict[int, dict[str, Any]]]:
    """How much each seed's root run (``runs``: seed -> run directory) still moved its evaluated log
    score (``eval_score_logarithmic``) over the last quarter of stage 1: the score at the last
    evaluation at or before ``0.75 T1``, at T1 and at T = T1 + T2; with ``best``, also the best
    score and its step. Returns text lines (``what`` names the evaluation set, ``end_note`` follows
    the score at T) and ``{seed: values}``."""
    rows: dict[int, dict[str, Any]] = {}
    lines = []
    for s, run in runs.items():
        log = [r for r in read_log(os.path.join(run, "metrics.jsonl")) if "eval_score_logarithmic" in r]
        by_step = {r["step"]: r["eval_score_logarithmic"] for r in log}
        early = max((st for st in by_step if st <= 0.75 * t1), default=None)
        if early is None or t1 not in by_step:
            continue
        rows[s] = {"step_early": early, "early": by_step[early], "t1": by_step[t1], "end": by_step.get(t1 + t2)}
        line = f"- seed {s}: {what} log score {by_step[early]:.4f} at step {early}, {by_step[t1]:.4f} at T1={t1}" + (
            f", {by_step[t1 + t2]:.4f} at T={t1 + t2}{end_note}" if t1 + t2 in by_step else ""
        )
        if best:
            top = max(by_step, key=lambda st: by_step[st])
            rows[s].update({"best_step": top, "best": by_step[top]})
            line += f"; best {by_step[top]:.4f} at step {top}"
        lines.append(line)
    return "\n".join(lines), rows


def write_report(
    work_dir: str,
    md: str,
    summary: dict[str, Any],
    *,
    newline: bool = True,
    default: Callable[[Any], Any] = str,
) -> None:
    """Write ``WORK_DIR/results.md`` (``md``, and a newline with ``newline``) and ``WORK_DIR/results.json``
    (``summary``; ``default`` writes what JSON cannot)."""
    os.makedirs(work_dir, exist_ok=True)
    with open(os.path.join(work_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(md + "\n" if newline else md)
    with open(os.path.join(work_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, default=default)
