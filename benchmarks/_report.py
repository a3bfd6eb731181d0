"""The report builder of every study (``reproduce_mt.py``, ``reproduce_summ.py``, ``reproduce_llm.py``,
``reproduce_instruct.py``): the per-seed markdown tables (:func:`seed_table`), the plateau of the root runs
(:func:`plateau`), the one training-curve plotter (:func:`plot_curves`) and ``WORK/results.md`` /
``results.json`` (:func:`write_report`). The statistics themselves are :mod:`_stats`'s."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from _runner import read_log
from _stats import fmt_mean_std, numeric_values, seed_values

__all__ = ["plateau", "plot_curves", "seed_table", "write_report"]


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


def plot_curves(
    path: str,
    series: Sequence[tuple[str, Sequence[str], dict[str, Any]]],
    mark: int | None,
    title: str,
    *,
    what: str = "validation",
    per_run: bool = False,
) -> str | None:
    """Training curves from the runs' ``metrics.jsonl``: the log, Brier and spherical scores on the
    evaluation set (``what`` names it) and the training loss against the step, a line per ``(label,
    run directories, plot keywords)`` of ``series``, a dotted line at step ``mark`` (the switch; none
    for ``None``).

    By default a row of four panels and, per series, the mean over its runs at each step; with
    ``per_run``, a 2 x 2 grid (the loss first, on a log scale), a line per run (the label on the
    first) with the evaluations marked. Writes ``path`` and returns it, or ``None`` when there is
    nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = [
        ("eval_score_logarithmic", f"{what} log score"),
        ("eval_score_brier", f"{what} Brier score"),
        ("eval_score_spherical", f"{what} spherical score"),
    ]
    panels = [("loss", "training loss"), *scores] if per_run else [*scores, ("loss", "training loss")]
    if per_run:
        fig, grid = plt.subplots(2, 2, figsize=(12, 8))
        axes = list(grid.flat)
    else:
        fig, row = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
        axes = list(row)
    drawn = False
    for label, runs, style in series:
        logs = [read_log(os.path.join(run, "metrics.jsonl")) for run in runs]
        for ax, (key, panel) in zip(axes, panels):
            lines = _run_lines(logs, key) if per_run else _mean_line(logs, key)
            for j, (steps, values) in enumerate(lines):
                extra: dict[str, Any] = (
                    {"alpha": 0.75, "marker": "o" if key != "loss" else None, "markersize": 3} if per_run else {}
                )
                ax.plot(steps, values, label=label if j == 0 else None, **style, **extra)
                drawn = True
            if lines or per_run:
                ax.set_title(panel)
                ax.set_xlabel("step")
    if not drawn:
        plt.close(fig)
        return None
    for ax, (key, _) in zip(axes, panels):
        if mark is not None:
            ax.axvline(mark, color="grey", linewidth=0.8, linestyle=":")
        if per_run:
            ax.grid(alpha=0.3)
            if key == "loss":
                ax.set_yscale("log")
    axes[1 if per_run else 0].legend(fontsize=7 if per_run else 8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mean_line(logs: Sequence[list[dict[str, Any]]], key: str) -> list[tuple[list[int], list[float]]]:
    """The mean of ``key`` over the logs at each step they have it (no line when none has)."""
    by_step: dict[int, list[float]] = {}
    for log in logs:
        for r in log:
            if key in r and r[key] is not None:
                by_step.setdefault(r["step"], []).append(r[key])
    steps = sorted(by_step)
    return [(steps, [sum(by_step[t]) / len(by_step[t]) for t in steps])] if steps else []


def _run_lines(logs: Sequence[list[dict[str, Any]]], key: str) -> list[tuple[list[int], list[float]]]:
    """A line per log that has numeric values of ``key``."""
    out = []
    for log in logs:
        pts = [(r["step"], r[key]) for r in log if isinstance(r.get(key), (int, float))]
        if pts:
            out.append(([p[0] for p in pts], [p[1] for p in pts]))
    return out


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
