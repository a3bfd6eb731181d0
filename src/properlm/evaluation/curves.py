"""Training curves: the one plotter, of ``properlm compare --plot``, ``properlm demo`` and the studies.

:func:`plot_curves` draws the ``metrics.jsonl`` logs of runs (:class:`~properlm.evaluation.run_records.RunRecord`)
against the step, one panel per quantity; ``benchmarks/``' studies draw theirs with it too. A run is a line of its
own, or runs are grouped into a :class:`CurveSeries` (the seeds of one configuration, say): drawn as their mean at
each step, or as a line per run, in the series' style. Which lines, with which points, is decided apart from the
drawing (:func:`curve_plan`, a :class:`CurvePlan` of :class:`CurveLine`), so it can be checked without looking at
pixels.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from .run_records import RunRecord

__all__ = [
    "CurveLine",
    "CurvePlan",
    "CurveSeries",
    "Panel",
    "curve_panels",
    "curve_plan",
    "panel_title",
    "plot_curves",
    "rule_switches",
]

#: a panel: the logged key it draws (``"loss"``, ``"eval_loss"``, ``"eval_score_brier"``, ...) and the rule whose
#: records it takes (``None``: every record, whatever its rule)
Panel = tuple[str, str | None]


@dataclass
class CurveSeries:
    """One entry of the legend: the runs of one configuration (its seeds, say), named ``label``.

    :func:`plot_curves` draws their mean at each step, or with ``per_run`` a line per run; ``style`` holds the
    matplotlib keywords of its lines (``{"color": "C1", "linestyle": "--"}``). Runs without a log are left out,
    and a directory given twice is drawn once.
    """

    label: str
    runs: list[RunRecord]
    style: dict[str, Any] = field(default_factory=dict)


@dataclass
class CurveLine:
    """One line of the plot: ``values[i]`` at ``steps[i]`` (steps increasing) on ``panel``.

    ``label`` is its legend entry (``None`` for the further runs of a series drawn a line per run), ``style``
    its series' matplotlib keywords and ``runs`` how many runs it averages (1 for a run's own line).
    """

    panel: Panel
    label: str | None
    steps: list[float]
    values: list[float]
    style: dict[str, Any]
    runs: int = 1


@dataclass
class CurvePlan:
    """What :func:`plot_curves` draws.

    The ``panels`` in order, their ``lines``, and the steps of the dotted vertical lines drawn on every panel
    (``marks``: the marked step and every rule switch of the runs drawn).
    """

    panels: list[Panel]
    lines: list[CurveLine]
    marks: list[float]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def curve_panels(logged: Sequence[RunRecord]) -> list[Panel]:
    """The quantities :func:`plot_curves` draws by default for runs with a log, ``(key, rule)``, one panel each.

    A loss is the loss of the rule it was computed with, so each rule's training (and validation) loss is a
    panel of its own; ``eval_score_*`` are common to every run.
    """
    panels: list[Panel] = []
    for r in logged:
        for rec in r.log:
            for k, v in rec.items():
                if not _number(v):
                    continue
                if k in ("loss", "eval_loss"):
                    key: Panel = (k, str(rec.get("rule", "?")))
                elif k.startswith("eval_score_"):
                    key = (k, None)
                else:
                    continue
                if key not in panels:
                    panels.append(key)
    panels.sort(key=lambda kr: (kr[0] != "loss", kr[0] != "eval_loss", kr[0], kr[1] or ""))
    return panels


def panel_title(key: str, rule: str | None, what: str = "validation") -> str:
    """The title of panel ``(key, rule)``.

    ``what`` names the evaluation set (``"validation"``, ``"held-out"``, ``"Alpaca dev"``): ``"training loss,
    brier"``, ``"training loss"`` (rule ``None``), ``"held-out logarithmic score (higher is better)"``.
    """
    if key == "loss":
        return "training loss" if rule is None else f"training loss, {rule}"
    if key == "eval_loss":
        return f"{what} loss" if rule is None else f"{what} loss, {rule}"
    if key.startswith("eval_score_"):
        return f"{what} {key[len('eval_score_') :]} score (higher is better)"
    return key if rule is None else f"{key}, {rule}"


def rule_switches(log: Sequence[dict[str, Any]]) -> list[float]:
    """The steps after which a log's rule changes: the last step logged with the previous rule.

    Of the records with a ``rule`` and a numeric ``step``, in log order: the step of each one whose successor has
    another rule. A schedule ``logarithmic:5000,spherical:1250`` logged every 50 steps switches after step 5000.
    """
    out: list[float] = []
    prev: tuple[Any, float] | None = None
    for rec in log:
        rule, step = rec.get("rule"), rec.get("step")
        if rule is None or not isinstance(step, (int, float)) or isinstance(step, bool):
            continue
        if prev is not None and rule != prev[0]:
            out.append(prev[1])
        prev = (rule, step)
    return out


def _series(runs: Sequence[RunRecord | CurveSeries]) -> list[CurveSeries]:
    """The series to draw.

    A bare record is a series of its own (a directory drawn once, even when several records name it); runs
    without a log and series without such runs are left out.
    """
    out = []
    seen: set[str] = set()
    for item in runs:
        if isinstance(item, RunRecord):
            if item.log and item.directory not in seen:
                seen.add(item.directory)
                out.append(CurveSeries(item.label, [item]))
            continue
        logged: list[RunRecord] = []
        dirs: set[str] = set()
        for r in item.runs:
            if r.log and r.directory not in dirs:
                dirs.add(r.directory)
                logged.append(r)
        if logged:
            out.append(CurveSeries(item.label, logged, dict(item.style)))
    return out


def _points(log: Sequence[dict[str, Any]], panel: Panel) -> list[tuple[float, float]]:
    """``(step, value)`` of the records of ``log`` that ``panel`` draws, in log order."""
    key, rule = panel
    return [
        (rec["step"], rec[key])
        for rec in log
        if _number(rec.get(key)) and _number(rec.get("step")) and (rule is None or str(rec.get("rule", "?")) == rule)
    ]


def curve_plan(
    runs: Sequence[RunRecord | CurveSeries],
    *,
    panels: Sequence[Panel] | None = None,
    max_panels: int = 9,
    per_run: bool = False,
    mark: float | None = None,
) -> CurvePlan:
    """The lines :func:`plot_curves` draws for ``runs`` (see there), without drawing them.

    ``panels`` (default: :func:`curve_panels` of the runs drawn, at most ``max_panels``) are ``(key, rule)``:
    the records with a numeric ``key`` and, unless ``rule`` is ``None``, that rule. Per series and panel: without
    ``per_run``, one line through the mean of the values its runs logged at each step, ``(1/n_t) sum_r v_r(t)``
    over the ``n_t`` runs that logged step ``t`` (the steps of all its runs), labelled ``"LABEL (mean of n)"``
    when ``n`` > 1 runs take part; with ``per_run``, a line per run, the first labelled. A panel without values
    has no line. ``marks``: ``mark`` (when given) and the :func:`rule_switches` of every run drawn, sorted, once
    each.
    """
    series = _series(runs)
    chosen = list(panels) if panels is not None else curve_panels([r for s in series for r in s.runs])[:max_panels]
    lines: list[CurveLine] = []
    for s in series:
        for panel in chosen:
            per = [pts for pts in (_points(r.log, panel) for r in s.runs) if pts]
            if per_run:
                for j, pts in enumerate(per):
                    label = s.label if j == 0 else None
                    lines.append(CurveLine(panel, label, [p[0] for p in pts], [p[1] for p in pts], dict(s.style)))
            elif per:
                by_step: dict[float, list[float]] = {}
                for pts in per:
                    for step, value in pts:
                        by_step.setdefault(step, []).append(value)
                steps = sorted(by_step)
                label = s.label if len(per) == 1 else f"{s.label} (mean of {len(per)})"
                means = [sum(by_step[t]) / len(by_step[t]) for t in steps]
                lines.append(CurveLine(panel, label, steps, means, dict(s.style), runs=len(per)))
    marks = {mark} if mark is not None else set()
    for s in series:
        for r in s.runs:
            marks.update(rule_switches(r.log))
    return CurvePlan(chosen, lines, sorted(marks))


def plot_curves(
    runs: Sequence[RunRecord | CurveSeries],
    path: str,
    max_panels: int = 9,
    title: str | None = None,
    *,
    panels: Sequence[Panel] | None = None,
    per_run: bool = False,
    mark: float | None = None,
    what: str = "validation",
    log_scale: Collection[str] = (),
    ncols: int | None = None,
) -> str | None:
    """Plot the training curves of runs from their ``metrics.jsonl`` logs.

    ``runs``: records (each a line of its own, named by its label; a directory is drawn once) or
    :class:`CurveSeries` (the runs of one configuration, drawn in its style as their mean at each step, or with
    ``per_run`` as a line per run). Returns the PNG path written (``.png`` added when ``path`` has no extension),
    or ``None`` when there is no line to draw (no run with a log of the panels' quantities).

    One panel per quantity against the step (:func:`curve_plan`): by default each rule's training (and
    validation) loss on a panel of its own (the loss of a schedule's stages on their rules' panels) and each
    validation score, which every run shares, at most ``max_panels``; ``panels`` chooses them instead, as
    ``(key, rule)`` (``("loss", None)``: the training loss, whatever its rule). ``what`` names the evaluation
    set in the panel titles (:func:`panel_title`); panels whose key is in ``log_scale`` have a logarithmic y
    axis; ``ncols`` panels a row (default: up to 3). Dotted vertical lines mark step ``mark`` (the switch of a
    study, say) and the rule switches of the runs' schedules. ``title`` (optional) heads the figure. A line of
    fewer than 20 points marks them; the further runs of a series drawn per run are not in the legend, which is one
    for the figure (under the panels) when every panel with lines has the same entries, else one per panel.
    """
    plan = curve_plan(runs, panels=panels, max_panels=max_panels, per_run=per_run, mark=mark)
    if not plan.lines:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if not os.path.splitext(path)[1]:
        path += ".png"
    cols = max(1, min(ncols or 3, len(plan.panels)))
    nrows = math.ceil(len(plan.panels) / cols)
    width, height = 5.0 * cols, 3.6 * nrows
    # one legend for the figure when every panel with lines has the same entries (the studies' panels), else one
    # per panel (each rule's loss panel holds other runs)
    entries = [[ln.label for ln in plan.lines if ln.panel == p and ln.label is not None] for p in plan.panels]
    drawn = [e for e in entries if e]
    shared = len(drawn) > 1 and all(e == drawn[0] for e in drawn)
    fig, axes = plt.subplots(nrows, cols, figsize=(width, height), squeeze=False)
    first = next((ax for ax, e in zip(axes.flat, entries) if e), axes.flat[0])
    try:
        for ax, panel in zip(axes.flat, plan.panels):
            lines = [ln for ln in plan.lines if ln.panel == panel]
            for ln in lines:
                extra: dict[str, Any] = {"marker": "o" if len(ln.steps) < 20 else None, "markersize": 3}
                if per_run:
                    extra["alpha"] = 0.75
                ax.plot(ln.steps, ln.values, label=ln.label, **{**extra, **ln.style})
            if not lines:
                ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes, color="gray")
            for step in plan.marks:
                ax.axvline(step, linestyle=":", color="gray", linewidth=1)
            ax.set_title(panel_title(*panel, what=what), fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if lines and panel[0] in log_scale:
                ax.set_yscale("log")
            if not shared and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(plan.panels) :]:
            ax.axis("off")
        if title is not None:
            fig.suptitle(textwrap.fill(title, width=int(11 * width)))
        bottom = 0.0
        if shared:  # one legend under the panels
            handles, labels = first.get_legend_handles_labels()
            ncol = min(len(labels), 2 * cols)
            fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
            bottom = (0.1 + 0.22 * math.ceil(len(labels) / ncol)) / height
        fig.tight_layout(rect=(0, bottom, 1, 1))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path
