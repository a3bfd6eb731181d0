"""``properlm compare RUN_DIR...``: one markdown table across runs, and their training curves.

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
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from ..evaluation import RESULTS_KIND, format_value
from ..evaluation.comparison import ComparisonError, read_json_object

__all__ = [
    "COLUMNS",
    "SCORE_PREFIX",
    "CompareError",
    "RunRecord",
    "baseline_comparison",
    "comparison_rows",
    "comparison_table",
    "load_runs",
    "parse_run_groups",
    "plot_curves",
    "read_metrics_log",
    "register",
    "run",
    "run_figures",
]


class CompareError(ValueError):
    """A run directory is missing or holds nothing readable."""


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


def _read_json(path: str) -> dict[str, Any]:
    try:
        return read_json_object(path)
    except ComparisonError as exc:
        raise CompareError(str(exc)) from None


def read_metrics_log(path: str) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (blank lines skipped).

    Raises :class:`CompareError` naming the line of a malformed record.
    """
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CompareError(f"{path} line {lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise CompareError(f"{path} line {lineno}: expected a JSON object")
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
        raise CompareError("give at least one run directory")
    labels = list(paths) if labels is None else labels
    rows: list[RunRecord] = []
    for p, label in zip(paths, labels):
        if os.path.isfile(p):
            res = _read_json(p)
            d = os.path.dirname(p) or "."
            if _is_eval(res):
                rows.append(RunRecord(label=label, directory=d, evaluation=res, split=_split_name(d)))
            else:
                rows.append(RunRecord(label=label, directory=d, train=res, split="validation"))
            continue
        if not os.path.isdir(p):
            raise CompareError(f"run directory {p!r} does not exist")
        top = os.path.join(p, "results.json")
        log_path = os.path.join(p, "metrics.jsonl")
        train = evaluation = None
        if os.path.isfile(top):
            res = _read_json(top)
            if _is_eval(res):
                evaluation = res
            else:
                train = res
        log = read_metrics_log(log_path) if os.path.isfile(log_path) else []
        subs = []
        for name in sorted(os.listdir(p)):
            sub = os.path.join(p, name, "results.json")
            if os.path.isfile(sub):
                res = _read_json(sub)
                if _is_eval(res):
                    subs.append((name, res))
        if train is None and evaluation is None and not log and not subs:
            raise CompareError(f"{p!r} holds no results.json, metrics.jsonl or evaluation sub-directory")
        base: dict[str, Any] = dict(label=label, directory=p, train=train, log=log, log_path=log_path if log else None)
        if evaluation is not None:
            rows.append(RunRecord(evaluation=evaluation, split=_split_name(p), **base))
        elif (train is not None and isinstance(train.get("eval"), dict)) or not subs:
            rows.append(RunRecord(split="validation" if train is not None or log else None, **base))
        for name, res in subs:
            rows.append(RunRecord(evaluation=res, split=name, **base))
    return rows


#: the table's columns in order, with each one's format (a person reads these; every figure is in the JSON)
COLUMNS: tuple[tuple[str, str], ...] = (
    ("run", "s"),
    ("split", "s"),
    ("train rule", "s"),
    ("steps", "d"),
    ("train loss", ".4f"),
    ("examples", "d"),
    ("decoding", "s"),
    ("BLEU", ".2f"),
    ("chrF", ".2f"),
    ("R-1", ".2f"),
    ("R-2", ".2f"),
    ("R-L", ".2f"),
    ("log score", ".4f"),
    ("ppl", ",.2f"),
    ("acc %", ".2f"),
    ("ECE %", ".2f"),
)
#: columns of the other rules' mean token scores, after the fixed ones
SCORE_PREFIX = "S "


def _num(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _pct(v: Any) -> Any:
    return 100 * v if isinstance(v, float) else v


def _train_columns(train: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    stages = train.get("rule_stages")
    if stages:
        out["train rule"] = ",".join(f"{r}:{n}" for r, n in stages) if len(stages) > 1 else str(stages[0][0])
    elif isinstance(train.get("config"), dict) and "rule" in train["config"]:
        out["train rule"] = train["config"]["rule"]
    if "global_step" in train:
        out["steps"] = train["global_step"]
    t = train.get("train")
    if isinstance(t, dict) and "train_loss" in t:
        out["train loss"] = t["train_loss"]
    return out


def _validation_columns(train: dict[str, Any]) -> dict[str, Any]:
    """The training run's validation figures under the evaluation's column names.

    ``eval_score_brier`` becomes ``S brier``; ``eval_loss`` (the loss of the run's last rule) stays in the JSON.
    """
    out: dict[str, Any] = {}
    ev = train.get("eval_averaged") if isinstance(train.get("eval_averaged"), dict) else train.get("eval")
    if not isinstance(ev, dict):
        return out
    for k, v in ev.items():
        if not k.startswith("eval_score_") or not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        rule = k[len("eval_score_") :]
        if rule == "logarithmic":
            out["log score"] = v
            out["ppl"] = math.exp(-v) if -v < 700 else math.inf
        else:
            out[SCORE_PREFIX + rule] = v
    if isinstance(ev.get("eval_tokens"), (int, float)):
        out["tokens"] = ev["eval_tokens"]
    return out


def _eval_columns(ev: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tf = ev.get("teacher_forced", {})
    st = ev.get("settings", {})
    out["examples"] = ev.get("num_examples")
    if tf:
        out["ppl"] = _num(tf.get("perplexity"))
        out["acc %"] = _pct(_num(tf.get("token_accuracy")))
        out["ECE %"] = _pct(_num(tf.get("ece")))
        for spec, v in tf.get("mean_scores", {}).items():
            if spec == "logarithmic":
                out["log score"] = _num(v)
            else:
                out[SCORE_PREFIX + spec] = _num(v)
    gen = ev.get("generation")
    if gen:
        beams = st.get("num_beams", 1)
        out["decoding"] = "greedy" if beams == 1 else f"beam {beams}, {gen.get('objective', 'logarithmic')}"
        for key, label in (("bleu", "BLEU"), ("chrf", "chrF"), ("rouge1", "R-1"), ("rouge2", "R-2"), ("rougeL", "R-L")):
            if key in gen:
                out[label] = gen[key]
    return out


def comparison_rows(runs: list[RunRecord]) -> tuple[list[str], list[dict[str, Any]]]:
    """``(columns, rows)`` of the comparison table.

    The columns are those of :data:`COLUMNS` that some row fills, then the other rules' scores; a row per run
    holds its figures under those names.
    """
    rows = []
    for r in runs:
        row: dict[str, Any] = {"run": r.label, "split": r.split}
        if r.train:
            row.update(_train_columns(r.train))
        elif r.log:
            last = {k: v for rec in r.log for k, v in rec.items()}
            if "rule" in last:
                row["train rule"] = last["rule"]
            if "step" in last:
                row["steps"] = last["step"]
        if r.evaluation:
            row.update(_eval_columns(r.evaluation))
        elif r.train and r.split == "validation":
            row.update(_validation_columns(r.train))
        rows.append({k: v for k, v in row.items() if v is not None})
    fixed = [c for c, _ in COLUMNS if c == "run" or any(c in row for row in rows)]
    scores = sorted({k for row in rows for k in row if k.startswith(SCORE_PREFIX)})
    return fixed + scores, rows


def _cell(column: str, v: Any) -> str:
    spec = dict(COLUMNS).get(column, ".4f")
    if isinstance(v, float) and spec == "d":
        spec = ".4g"
    if isinstance(v, int) and not isinstance(v, bool) and spec not in ("d", "s"):
        v = float(v)
    return format_value(v, spec if spec not in ("d", "s") else ".4g")


def comparison_table(runs: list[RunRecord]) -> str:
    """A markdown table, a row per run and split, the key figures in fixed units ("-" where absent).

    BLEU, chrF and ROUGE in points with 2 decimals, ECE and accuracy in percent, token scores with 4 decimals.
    """
    columns, rows = comparison_rows(runs)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(c, row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def run_figures(runs: list[RunRecord]) -> list[dict[str, Any]]:
    """Every figure of every run, for ``--output-json``.

    Each entry: the table's row, the directory, and the raw ``results.json`` of its training run and evaluation.
    """
    _, rows = comparison_rows(runs)
    return [
        {**row, "directory": r.directory, "train_results": r.train, "evaluation_results": r.evaluation}
        for r, row in zip(runs, rows)
    ]


def _panels(logged: list[RunRecord]) -> list[tuple[str, str | None]]:
    """The quantities to plot, ``(key, rule)``.

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


def plot_curves(runs: list[RunRecord], path: str, max_panels: int = 9) -> str | None:
    """Plot the training curves of every run that has a ``metrics.jsonl``.

    Returns the PNG path written (``.png`` added when ``path`` has no extension), or ``None`` when no run has
    a log. One panel per quantity against the step: each rule's training loss (and validation loss) on a panel of its
    own (the loss of a schedule's stages on their rules' panels), and each validation score, which every run
    shares; rule switches of a schedule are marked by dotted lines. Lines are named by the runs' labels."""
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
    panels = _panels(logged)[:max_panels] or [("loss", None)]
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
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def parse_run_groups(items: list[str]) -> list[tuple[str, list[str]]]:
    """``[(name, paths)]`` of the ``RUN_DIR`` arguments.

    An existing path is a group of its own, named by it; otherwise ``NAME=PATH[,PATH...]`` names the
    runs of one configuration, one per seed. Raises :class:`CompareError` for an empty name or path,
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
                raise CompareError(
                    f"{item!r}: expected RUN_DIR or NAME=RUN_DIR[,RUN_DIR...] "
                    "(a name, then comma-separated run directories)"
                )
        if any(name == g for g, _ in groups):
            raise CompareError(f"{name!r} is given twice")
        groups.append((name, paths))
    return groups


def baseline_comparison(groups: list[tuple[str, list[str]]], baseline: str, n_samples: int) -> tuple[str, dict]:
    """``(markdown, result)`` of every group against the group named ``baseline``.

    See :func:`properlm.evaluation.comparison.compare_to_baseline`.
    """
    from ..evaluation.comparison import compare_to_baseline, comparison_markdown, load_evaluated_run

    names = [g for g, _ in groups]
    if baseline not in names:
        raise CompareError(f"--baseline {baseline!r} is none of the runs given; choose one of {', '.join(names)}")
    if len(groups) < 2:
        raise CompareError("--baseline needs at least one other run to compare with it")
    try:
        loaded = {name: [load_evaluated_run(p) for p in paths] for name, paths in groups}
        result = compare_to_baseline(
            loaded[baseline], {k: v for k, v in loaded.items() if k != baseline}, n_samples=n_samples
        )
    except ComparisonError as exc:
        raise CompareError(str(exc)) from None
    return comparison_markdown(result, baseline), result


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
        "training curves of the runs' metrics.jsonl logs, one panel per quantity. With "
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
        "its own panel; the validation scores every run shares); .png is added to a name without "
        "an extension (default: comparison.png)",
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
    except CompareError as exc:
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
        written = plot_curves(runs, args.plot)
        if written:
            print(f"\ntraining curves: {written}")
        else:
            print("\nno metrics.jsonl in these runs: no training curves plotted", file=sys.stderr)
    if args.output_json:
        print(f"every figure: {args.output_json}")
    return 0
