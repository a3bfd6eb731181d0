"""Training curves: one plotter for ``properlm compare --plot`` and ``properlm demo``.

:func:`plot_curves` draws the ``metrics.jsonl`` logs of runs (:class:`~properlm.evaluation.run_records.RunRecord`),
one panel per quantity against the step.
"""

from __future__ import annotations

import math
import os

from .run_records import RunRecord

__all__ = ["curve_panels", "plot_curves"]


def curve_panels(logged: list[RunRecord]) -> list[tuple[str, str | None]]:
    """The quantities :func:`plot_curves` draws, ``(key, rule)``, one panel each, for the runs that have a log.

    A loss is the loss of the rule it was computed with, so each rule's training (and validation) loss is a
    panel of its own; ``eval_score_*`` are common to every run.
    """
    panels: list[tuple[str, str | None]] = []
    for r in logged:
        for rec in r.log:
            for k, v in rec.items():
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    continue
                if k in ("loss", "eval_loss"):
                    key: tuple[str, str | None] = (k, str(rec.get("rule", "?")))
                elif k.startswith("eval_score_"):
                    key = (k, None)
                else:
                    continue
                if key not in panels:
                    panels.append(key)
    panels.sort(key=lambda kr: (kr[0] != "loss", kr[0] != "eval_loss", kr[0], kr[1] or ""))
    return panels


def _panel_title(key: str, rule: str | None) -> str:
    if key == "loss":
        return f"training loss, {rule}"
    if key == "eval_loss":
        return f"validation loss, {rule}"
    return f"validation {key[len('eval_score_') :]} score (higher is better)"


def plot_curves(runs: list[RunRecord], path: str, max_panels: int = 9, title: str | None = None) -> str | None:
    """Plot the training curves of every run that has a ``metrics.jsonl``.

    Returns the PNG path written (``.png`` added when ``path`` has no extension), or ``None`` when no run has
    a log. One panel per quantity against the step: each rule's training loss (and validation loss) on a panel of its
    own (the loss of a schedule's stages on their rules' panels), and each validation score, which every run
    shares; rule switches of a schedule are marked by dotted lines. Lines are named by the runs' labels; ``title``
    (optional) heads the figure."""
    logged = []
    seen: set[str] = set()
    for r in runs:
        if r.log and r.directory not in seen:
            seen.add(r.directory)
            logged.append(r)
    if not logged:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if not os.path.splitext(path)[1]:
        path += ".png"
    names = [r.label for r in logged]
    panels = curve_panels(logged)[:max_panels] or [("loss", None)]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    try:
        for ax, (key, rule) in zip(axes.flat, panels):
            for r, name in zip(logged, names):
                pts = [
                    (rec["step"], rec[key])
                    for rec in r.log
                    if isinstance(rec.get(key), (int, float))
                    and isinstance(rec.get("step"), (int, float))
                    and (rule is None or str(rec.get("rule", "?")) == rule)
                ]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="o" if len(pts) < 20 else None, markersize=3, label=name)
                prev = None
                for rec in r.log:
                    current = rec.get("rule")
                    if prev is not None and current != prev and isinstance(rec.get("step"), (int, float)):
                        ax.axvline(rec["step"], linestyle=":", color="gray", linewidth=1)
                    prev = current
            ax.set_title(_panel_title(key, rule), fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        if title is not None:
            fig.suptitle(title)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path
