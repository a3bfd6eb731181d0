"""``properlm compare RUN_DIR...``: one markdown table across runs, and their training curves.

The command's options and printing; what it reads, tabulates and plots is in :mod:`properlm.evaluation.run_records`,
:mod:`properlm.evaluation.comparison_table` and :mod:`properlm.evaluation.curves`.

A run directory may hold

* ``results.json`` written by ``properlm train`` (its config, rule stages, final training
  loss and validation figures) and ``metrics.jsonl`` (one record per log step/evaluation);
* ``results.json`` written by ``properlm evaluate`` (``"kind": "properlm-evaluate"``);
* sub-directories holding evaluate results (``runs/sph/eval/results.json``): each gives
  one row, labelled ``RUN_DIR/SUBDIR``, with the run's training figures.

With ``--baseline NAME`` the evaluations are also compared with the baseline's, per seed and over
seeds (``NAME=DIR,DIR,...`` groups a configuration's seeds; :mod:`properlm.evaluation.comparison`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..evaluation.comparison import ComparisonError, baseline_comparison
from ..evaluation.comparison_table import comparison_table, run_figures
from ..evaluation.curves import CurveSeries, plot_curves
from ..evaluation.run_records import RunRecord, load_runs

__all__ = ["parse_run_groups", "register", "run"]


def parse_run_groups(items: list[str]) -> list[tuple[str, list[str]]]:
    """``[(name, paths)]`` of the ``RUN_DIR`` arguments.

    An existing path is a group of its own, named by it; otherwise ``NAME=PATH[,PATH...]`` names the
    runs of one configuration, one per seed. Raises :class:`ComparisonError` for an empty name or path,
    or a name given twice.
    """
    groups: list[tuple[str, list[str]]] = []
    for item in items:
        if os.path.exists(item) or "=" not in item:
            name, paths = item, [item]
        else:
            name, _, rest = item.partition("=")
            paths = rest.split(",")
            if not name or not all(paths):
                raise ComparisonError(
                    f"{item!r}: expected RUN_DIR or NAME=RUN_DIR[,RUN_DIR...] "
                    "(a name, then comma-separated run directories)"
                )
        if any(name == g for g, _ in groups):
            raise ComparisonError(f"{name!r} is given twice")
        groups.append((name, paths))
    return groups


def register(subparsers: Any) -> None:
    """Add the ``compare`` command to the ``properlm`` sub-command parsers."""
    parser = subparsers.add_parser(
        "compare",
        help="one table across runs and a PNG of their training curves",
        description="Compare runs: print one markdown table with a row per run and split (named by NAME of "
        "NAME=DIR, or by the directory; split: the training run's validation set or the evaluation folder's "
        "name): training rule, steps, final training loss; BLEU/chrF/ROUGE, log score, perplexity, accuracy, "
        "ECE and each rule's mean token score from `properlm evaluate`'s results.json (also in a sub-directory "
        "of the run) or the training run's validation figures; --output-json keeps every figure. Plot the "
        "training curves of the runs' metrics.jsonl logs, one panel per quantity (the runs of a NAME=DIR,DIR "
        "group as their mean per step). With "
        "--baseline, also whether each run (or group of seeds) beat the baseline: per seed with a paired "
        "bootstrap, over seeds with an interval and a sign test.",
        epilog="examples:\n"
        "  properlm compare runs/log runs/brier runs/sph --plot curves.png --output-md table.md\n"
        "  # did it help? three seeds each, decoded on the same test set, against the log-score runs:\n"
        "  properlm compare log=runs/log1/test,runs/log2/test,runs/log3/test \\\n"
        "      sph=runs/sph1/test,runs/sph2/test,runs/sph3/test --baseline log",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="run directories (or results.json files) of `properlm train` / `properlm evaluate`; "
        "NAME=DIR1,DIR2,... names the runs of one configuration, one per seed (for --baseline)",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="NAME",
        help="also compare every other run (or NAME=... group) with this one on the generation "
        "metrics of `properlm evaluate` (BLEU and chrF, or ROUGE-1/2/L): per seed the difference "
        "with a paired bootstrap p over the test examples; with several seeds (groups paired by "
        "position: the i-th directory of each group trained with the same seed) the mean "
        "difference with its 95%% Student-t interval over seeds, the seeds ahead and the sign test",
    )
    parser.add_argument(
        "--bootstrap-samples",
        type=int,
        default=1000,
        metavar="N",
        help="bootstrap resamples per seed for --baseline (default: 1000)",
    )
    parser.add_argument(
        "--output-json",
        default=None,
        metavar="FILE",
        help="write every figure as JSON: each run's row with the raw results.json of its training "
        'run and evaluation ("runs"), and with --baseline the whole comparison (every per-seed and '
        "over-seed figure)",
    )
    parser.add_argument(
        "--plot",
        default="comparison.png",
        metavar="PNG",
        help="where to write the training-curve plot, one panel per quantity (each rule's loss on "
        "its own panel; the validation scores every run shares), a line per run or NAME=... group (the "
        "mean of its runs at each step); .png is added to a name without an extension (default: comparison.png)",
    )
    parser.add_argument("--no-plot", dest="plot", action="store_const", const=None, help="do not plot")
    parser.add_argument("--output-md", default=None, metavar="FILE", help="also write the table to this file")
    parser.set_defaults(func=run)


def _check_output_file(option: str, path: str | None) -> str | None:
    """An error line when ``path`` (of ``option``) names a directory, else ``None``."""
    if path is not None and os.path.isdir(path):
        return f"{option} {path!r} is a directory; give a file name, e.g. {os.path.join(path, 'comparison')}" + (
            ".json" if option == "--output-json" else ".md" if option == "--output-md" else ".png"
        )
    return None


def _row_labels(groups: list[tuple[str, list[str]]]) -> list[str]:
    """A label per path: the group's name, with ``#i`` for the i-th of several (seeds)."""
    return [name if len(paths) == 1 else f"{name} #{i}" for name, paths in groups for i, _ in enumerate(paths, 1)]


def _curve_series(groups: list[tuple[str, list[str]]], runs: list[RunRecord]) -> list[CurveSeries]:
    """A curve series per group, named by it, of the rows loaded for its paths.

    The rows are told apart by their labels (:func:`_row_labels`); the seeds of a ``NAME=DIR1,DIR2`` group are
    drawn as their mean per step.
    """
    out = []
    for name, paths in groups:
        labels = set(_row_labels([(name, paths)]))
        out.append(CurveSeries(name, [r for r in runs if r.label in labels]))
    return out


def run(args: argparse.Namespace) -> int:
    """Run ``properlm compare`` with parsed arguments; returns the exit code."""

    def error(message: str) -> int:
        print(f"properlm compare: error: {message}", file=sys.stderr)
        return 2

    if args.bootstrap_samples < 1:
        return error(f"--bootstrap-samples must be at least 1, got {args.bootstrap_samples}")
    for option, path in (("--output-json", args.output_json), ("--output-md", args.output_md), ("--plot", args.plot)):
        message = _check_output_file(option, path)
        if message:
            return error(message)
    try:
        groups = parse_run_groups(list(args.runs))
        runs = load_runs([p for _, paths in groups for p in paths], _row_labels(groups))
        against = baseline_comparison(groups, args.baseline, args.bootstrap_samples) if args.baseline else None
    except ComparisonError as exc:
        return error(str(exc))
    table = comparison_table(runs)
    if against is not None:
        table += "\n\n" + against[0]
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        payload = {**(against[1] if against is not None else {}), "runs": run_figures(runs)}
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2, default=str)
    print(table)
    if args.output_md:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_md)), exist_ok=True)  # as --plot does
        with open(args.output_md, "w", encoding="utf-8") as f:
            f.write(table + "\n")
    if args.plot:
        written = plot_curves(_curve_series(groups, runs), args.plot)
        if written:
            print(f"\ntraining curves: {written}")
        else:
            print("\nno training curves plotted: no metrics.jsonl with a loss or score in these runs", file=sys.stderr)
    if args.output_json:
        print(f"every figure: {args.output_json}")
    return 0
