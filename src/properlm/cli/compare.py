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
]

#: Trainer bookkeeping keys left out of the table
_SKIP_EVAL_KEYS = ("runtime", "samples_per_second", "steps_per_second", "epoch")


class CompareError(ValueError):
    """A run directory is missing or holds nothing readable."""


@dataclass
class RunRecord:
    """What one row of the comparison is built from."""

    label: str
    directory: str
    train: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    log_path: str | None = None


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


def load_runs(paths: list[str]) -> list[RunRecord]:
    """Read every run directory (or a ``results.json`` path) into :class:`RunRecord` rows."""
    if not paths:
        raise CompareError("give at least one run directory")
    rows: list[RunRecord] = []
    for p in paths:
        if os.path.isfile(p):
            res = _read_json(p)
            d = os.path.dirname(p) or "."
            rec = RunRecord(label=p, directory=d)
            if _is_eval(res):
                rec.evaluation = res
            else:
                rec.train = res
            rows.append(rec)
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
        base: dict[str, Any] = dict(directory=p, train=train, log=log, log_path=log_path if log else None)
        if evaluation is not None or not subs:
            rows.append(RunRecord(label=p, evaluation=evaluation, **base))
        for name, res in subs:
            rows.append(RunRecord(label=os.path.join(p, name), evaluation=res, **base))
    return rows


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
    for key in ("eval", "eval_averaged"):
        ev = train.get(key)
        if isinstance(ev, dict):
            for k, v in ev.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith(_SKIP_EVAL_KEYS):
                    out[k] = v
    return out


def _num(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _eval_columns(ev: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tf = ev.get("teacher_forced", {})
    st = ev.get("settings", {})
    out["task"] = st.get("task")
    out["examples"] = ev.get("num_examples")
    if tf:
        out["ppl"] = _num(tf.get("perplexity"))
        acc, ece = _num(tf.get("token_accuracy")), _num(tf.get("ece"))
        out["acc %"] = 100 * acc if isinstance(acc, float) else acc
        out["ECE %"] = 100 * ece if isinstance(ece, float) else ece
        for spec, v in tf.get("mean_scores", {}).items():
            if spec != "logarithmic":  # perplexity carries it
                out[f"S {spec}"] = _num(v)
    gen = ev.get("generation")
    if gen:
        beams = st.get("num_beams", 1)
        out["decoding"] = "greedy" if beams == 1 else f"beam{beams} {gen.get('objective', 'logarithmic')}"
        for key, label in (("bleu", "BLEU"), ("chrf", "chrF"), ("rouge1", "R-1"), ("rouge2", "R-2"),
                           ("rougeL", "R-L")):
            if key in gen:
                out[label] = gen[key]
    return out


def comparison_rows(runs: list[RunRecord]) -> tuple[list[str], list[dict[str, Any]]]:
    """``(columns, rows)``: the union of the figures of every run, in a stable order."""
    rows = []
    for r in runs:
        row: dict[str, Any] = {"run": r.label}
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
        rows.append(row)
    columns: list[str] = []
    for row in rows:
        for k in row:
            if k not in columns:
                columns.append(k)
    first_seen = {k: i for i, k in enumerate(columns)}
    columns.sort(key=lambda k: (_column_group(k), first_seen[k]))
    return columns, rows


_GROUPS = (("run",), ("train rule", "steps", "train loss"), ("eval_",), ("task", "examples", "ppl", "acc %", "ECE %"),
           ("S ",), ("decoding", "BLEU", "chrF", "R-1", "R-2", "R-L"))


def _column_group(column: str) -> int:
    for i, names in enumerate(_GROUPS):
        if column in names or any(n.endswith(("_", " ")) and column.startswith(n) for n in names):
            return i
    return len(_GROUPS)


def _cell(v: Any) -> str:
    return format_value(v, ".4g")


def comparison_table(runs: list[RunRecord]) -> str:
    """A markdown table with one row per run and one column per figure ("-" where absent)."""
    columns, rows = comparison_rows(runs)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def plot_curves(runs: list[RunRecord], path: str, max_panels: int = 6) -> str | None:
    """Plot the training curves of every run that has a ``metrics.jsonl``.

    Training loss, validation loss and validation scores against the step, one panel per quantity, rule
    switches of a schedule marked by dotted lines. Returns the PNG path, or ``None`` when no
    run has a log."""
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

    names = [os.path.basename(os.path.normpath(r.directory)) for r in logged]
    if len(set(names)) < len(names):
        names = [r.directory for r in logged]
    keys: list[str] = []
    for r in logged:
        for rec in r.log:
            for k, v in rec.items():
                if k in keys or not isinstance(v, (int, float)) or isinstance(v, bool):
                    continue
                if k == "loss" or (k.startswith("eval_") and not k.endswith((*_SKIP_EVAL_KEYS, "tokens"))):
                    keys.append(k)
    keys.sort(key=lambda k: (k != "loss", k != "eval_loss", k))
    keys = keys[:max_panels] or ["loss"]
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    try:
        for ax, key in zip(axes.flat, keys):
            for r, name in zip(logged, names):
                pts = [(rec["step"], rec[key]) for rec in r.log
                       if isinstance(rec.get(key), (int, float)) and isinstance(rec.get("step"), (int, float))]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="o" if len(pts) < 20 else None, markersize=3, label=name)
                prev = None
                for rec in r.log:
                    rule = rec.get("rule")
                    if prev is not None and rule != prev and isinstance(rec.get("step"), (int, float)):
                        ax.axvline(rec["step"], linestyle=":", color="gray", linewidth=1)
                    prev = rule
            ax.set_title("training loss" if key == "loss" else key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=8)
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
                raise CompareError(f"{item!r}: expected RUN_DIR or NAME=RUN_DIR[,RUN_DIR...] "
                                   "(a name, then comma-separated run directories)")
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
        result = compare_to_baseline(loaded[baseline], {k: v for k, v in loaded.items() if k != baseline},
                                     n_samples=n_samples)
    except ComparisonError as exc:
        raise CompareError(str(exc)) from None
    return comparison_markdown(result, baseline), result


def register(subparsers: Any) -> None:
    """Add the ``compare`` command to the ``properlm`` sub-command parsers."""
    parser = subparsers.add_parser(
        "compare", help="one table across runs and a PNG of their training curves",
        description="Compare runs: print one markdown table with a row per run (training rule, steps, final "
        "losses and validation scores from `properlm train`'s results.json; perplexity, accuracy, ECE, "
        "mean scores, BLEU/chrF/ROUGE from `properlm evaluate`'s results.json, also when it sits in a "
        "sub-directory of the run), and plot the training curves of the runs' metrics.jsonl logs. With "
        "--baseline, also whether each run (or group of seeds) beat the baseline: per seed with a paired "
        "bootstrap, over seeds with an interval and a sign test.",
        epilog="examples:\n"
        "  properlm compare runs/log runs/brier runs/sph --plot curves.png --output-md table.md\n"
        "  # did it help? three seeds each, decoded on the same test set, against the log-score runs:\n"
        "  properlm compare log=runs/log1/test,runs/log2/test,runs/log3/test \\\n"
        "      sph=runs/sph1/test,runs/sph2/test,runs/sph3/test --baseline log",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run directories (or results.json files) of `properlm train` / `properlm evaluate`; "
                        "NAME=DIR1,DIR2,... names the runs of one configuration, one per seed (for --baseline)")
    parser.add_argument("--baseline", default=None, metavar="NAME",
                        help="also compare every other run (or NAME=... group) with this one on the generation "
                        "metrics of `properlm evaluate` (BLEU and chrF, or ROUGE-1/2/L): per seed the difference "
                        "with a paired bootstrap p over the test examples; with several seeds (groups paired by "
                        "position: the i-th directory of each group trained with the same seed) the mean "
                        "difference with its 95%% Student-t interval over seeds, the seeds ahead and the sign test")
    parser.add_argument("--bootstrap-samples", type=int, default=1000, metavar="N",
                        help="bootstrap resamples per seed for --baseline (default: 1000)")
    parser.add_argument("--output-json", default=None, metavar="FILE",
                        help="write the --baseline comparison (every per-seed and over-seed figure) as JSON")
    parser.add_argument("--plot", default="comparison.png", metavar="PNG",
                        help="where to write the training-curve plot (default: comparison.png)")
    parser.add_argument("--no-plot", dest="plot", action="store_const", const=None, help="do not plot")
    parser.add_argument("--output-md", default=None, metavar="FILE", help="also write the table to this file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``properlm compare`` with parsed arguments; returns the exit code."""
    if args.bootstrap_samples < 1:
        print(f"properlm compare: error: --bootstrap-samples must be at least 1, got {args.bootstrap_samples}",
              file=sys.stderr)
        return 2
    if args.output_json and not args.baseline:
        print("properlm compare: error: --output-json writes the --baseline comparison: give --baseline",
              file=sys.stderr)
        return 2
    try:
        groups = parse_run_groups(list(args.runs))
        runs = load_runs([p for _, paths in groups for p in paths])
        against = baseline_comparison(groups, args.baseline, args.bootstrap_samples) if args.baseline else None
    except CompareError as exc:
        print(f"properlm compare: error: {exc}", file=sys.stderr)
        return 2
    table = comparison_table(runs)
    if against is not None:
        table += "\n\n" + against[0]
        if args.output_json:
            os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
            with open(args.output_json, "w", encoding="utf-8") as f:
                json.dump(against[1], f, indent=2)
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
    return 0
