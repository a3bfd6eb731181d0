"""The comparison table of ``properlm compare``: a row per run and split, the key figures in fixed units."""

from __future__ import annotations

import math
from typing import Any

from .report import format_value
from .run_records import RunRecord

__all__ = ["COLUMNS", "SCORE_PREFIX", "comparison_rows", "comparison_table", "run_figures"]

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
