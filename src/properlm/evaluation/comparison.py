"""Evaluated runs against a baseline: the tables of ``properlm compare --baseline``.

Each system is a list of evaluations (``properlm evaluate`` output directories), one per seed, and
so is the baseline; the ``s``-th evaluation of each was trained with the same seed ``s`` (paired by
position) and decoded the same examples. For every generation metric of the task (BLEU and chrF for
translation, ROUGE-1/2/L F1 for summarisation, all five for instructions) it reports, per seed, the
difference against the baseline with a paired bootstrap p over the examples
(:func:`~properlm.evaluation.significance.paired_bootstrap` /
:func:`~properlm.evaluation.significance.paired_bootstrap_means`), and over seeds the mean
difference with its 95% interval, the seeds ahead and the sign test
(:func:`~properlm.evaluation.significance.compare_seeds`). The teacher-forced figures every evaluation
holds (each rule's mean token score, the ECE) are compared over seeds too (no bootstrap: the
token-level values are not kept).

The hypotheses are read from the evaluation's ``hypotheses.txt``, the references from the data
files its ``results.json`` names (resolved as ``properlm evaluate`` was given them: relative to the
working directory, else to the evaluation directory's parents).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .significance import SeedComparison, compare_seeds, paired_bootstrap, paired_bootstrap_means
from .text_metrics import ROUGE_TYPES, rouge_per_example

__all__ = [
    "ComparisonError",
    "EvaluatedRun",
    "baseline_comparison",
    "compare_to_baseline",
    "comparison_markdown",
    "load_evaluated_run",
    "metrics_of_task",
    "read_json_object",
]

#: generation metrics compared, per task: (results key, label)
_TRANSLATION = (("bleu", "BLEU"), ("chrf", "chrF"))
_SUMMARIZATION = (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"))


class ComparisonError(ValueError):
    """A run directory is missing or holds nothing readable, or an evaluation cannot be paired with its baseline."""


def metrics_of_task(task: str) -> tuple[tuple[str, str], ...]:
    """``(key, label)`` of the metrics compared for ``task``."""
    if task == "translation":
        return _TRANSLATION
    if task == "summarization":
        return _SUMMARIZATION
    if task == "instruction":
        return _TRANSLATION + _SUMMARIZATION
    raise ComparisonError(f"unknown task {task!r}; expected translation, summarization or instruction")


@dataclass
class EvaluatedRun:
    """One ``properlm evaluate`` output: its hypotheses and the references they were scored against.

    Attributes:
        label: how tables name it.
        directory: the evaluation's output directory.
        task: the evaluated task.
        hypotheses: ``n`` hypotheses, in data order.
        references: ``n`` references (the data's target field).
        target_lang: the target language given to evaluate (picks the BLEU tokenizer).
        data: what identifies the examples: the data files (absolute) and ``n``.
        teacher_forced: the ``teacher_forced`` block of its ``results.json`` (mean rule scores, ECE).
        seed: the training seed of the evaluated model when its run says it (``properlm train``'s
            ``results.json`` beside the model's ``final/``, ``averaged/`` or ``checkpoint-N/``), else ``None``.
    """

    label: str
    directory: str
    task: str
    hypotheses: list[str]
    references: list[str]
    target_lang: str | None
    data: tuple[Any, ...]
    seed: int | None = None
    teacher_forced: dict[str, Any] = field(default_factory=dict)


def _results_path(path: str) -> str:
    """``path``'s evaluate ``results.json``.

    The file itself, the directory's, or that of its one evaluation sub-directory with hypotheses.
    """
    from .settings import RESULTS_KIND

    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise ComparisonError(f"{path!r} does not exist")
    top = os.path.join(path, "results.json")
    if os.path.isfile(top) and read_json_object(top).get("kind") == RESULTS_KIND:
        return top
    subs = sorted(
        n
        for n in os.listdir(path)
        if os.path.isfile(os.path.join(path, n, "hypotheses.txt"))
        and os.path.isfile(os.path.join(path, n, "results.json"))
    )
    if len(subs) == 1:
        return os.path.join(path, subs[0], "results.json")
    if not subs:
        raise ComparisonError(
            f"{path!r} holds no `properlm evaluate` results with hypotheses "
            "(results.json and hypotheses.txt; evaluate without --no-generate writes them)"
        )
    raise ComparisonError(
        f"{path!r} holds several evaluations ({', '.join(subs)}): name the one to compare, "
        f"e.g. {os.path.join(path, subs[0])}"
    )


def read_json_object(path: str) -> dict[str, Any]:
    """The JSON object in ``path``; :class:`ComparisonError` naming the file (and line) otherwise."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as exc:
        raise ComparisonError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg})") from None
    except OSError as exc:
        raise ComparisonError(f"cannot read {path}: {exc}") from None
    if not isinstance(value, dict):
        raise ComparisonError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _locate(name: str, directory: str, results_path: str) -> str:
    """The absolute path of a data file named in ``results.json``.

    As given (relative to the working directory), else relative to one of the evaluation
    directory's parents (evaluate may have run elsewhere).
    """
    if os.path.isabs(name) or os.path.isfile(name):
        if not os.path.isfile(name):
            raise ComparisonError(f"{results_path}: its data file {name!r} does not exist")
        return os.path.abspath(name)
    here = os.path.abspath(directory)
    while True:
        candidate = os.path.join(here, name)
        if os.path.isfile(candidate):
            return candidate
        parent = os.path.dirname(here)
        if parent == here:
            raise ComparisonError(
                f"{results_path}: its data file {name!r} is not found from the working directory "
                "(run compare where evaluate ran)"
            )
        here = parent


def _training_seed(model: Any) -> int | None:
    """The ``--seed`` of the ``properlm train`` run whose output directory holds ``model``, if known."""
    if not isinstance(model, str) or not os.path.isdir(model):
        return None
    run_results = os.path.join(os.path.dirname(os.path.abspath(model)), "results.json")
    try:
        seed = read_json_object(run_results).get("config", {}).get("seed")
    except (ComparisonError, AttributeError):
        return None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def load_evaluated_run(path: str, label: str | None = None) -> EvaluatedRun:
    """Read an evaluation with the references it was scored against.

    ``path`` is an output directory of ``properlm evaluate``, its ``results.json``, or a run directory
    holding exactly one evaluation with hypotheses. Raises :class:`ComparisonError` naming the file
    when it holds no hypotheses, its data files are missing, or their examples do not match the
    hypotheses in number.
    """
    from ..data import DataError, load_examples

    results_path = _results_path(path)
    results = read_json_object(results_path)
    directory = os.path.dirname(results_path) or "."
    gen = results.get("generation")
    hyp_path = os.path.join(directory, "hypotheses.txt")
    if not isinstance(gen, dict) or not os.path.isfile(hyp_path):
        raise ComparisonError(f"{results_path}: no generated hypotheses (evaluated with --no-generate?)")
    st = results.get("settings") or {}
    files = {
        k: _locate(st[k], directory, results_path) if st.get(k) else None
        for k in ("data_file", "source_file", "target_file")
    }
    try:
        examples = load_examples(
            files["data_file"],
            task=st.get("task"),
            source_file=files["source_file"],
            target_file=files["target_file"],
            source_lang=st.get("source_lang"),
            target_lang=st.get("target_lang"),
        )
    except DataError as exc:
        raise ComparisonError(f"{results_path}: its data: {exc}") from None
    if st.get("max_examples") is not None:
        examples = examples[: int(st["max_examples"])]
    with open(hyp_path, encoding="utf-8") as f:
        hyps = f.read().split("\n")
    if hyps and hyps[-1] == "":
        hyps.pop()
    if len(hyps) != len(examples):
        raise ComparisonError(
            f"{hyp_path}: {len(hyps)} hypotheses but {len(examples)} examples in its data "
            "(the data files changed since it was evaluated?)"
        )
    task = examples[0].task if examples else str(st.get("task"))
    return EvaluatedRun(
        label=label or path,
        directory=directory,
        task=task,
        hypotheses=hyps,
        references=[e.target for e in examples],
        target_lang=st.get("target_lang"),
        data=(files["data_file"], files["source_file"], files["target_file"], len(examples)),
        seed=_training_seed(st.get("model")),
        teacher_forced=results.get("teacher_forced") or {},
    )


def _check_pair(base: EvaluatedRun, run: EvaluatedRun) -> None:
    if base.seed is not None and run.seed is not None and base.seed != run.seed:
        raise ComparisonError(
            f"{run.label} (trained with seed {run.seed}) is paired with the baseline's {base.label} "
            f"(seed {base.seed}): list each group's directories in the same seed order"
        )
    if run.data != base.data or run.task != base.task:
        raise ComparisonError(
            f"{run.label} and the baseline {base.label} were not evaluated on the same examples "
            f"({run.task}, {run.data[:3]}, n = {run.data[3]} against {base.task}, "
            f"{base.data[:3]}, n = {base.data[3]})"
        )


def _per_seed(base: EvaluatedRun, runs: Mapping[str, EvaluatedRun], n_samples: int) -> dict[str, dict[str, Any]]:
    """``{system: {metric: {"baseline", "system", "delta", "p"}}}`` of one seed (scores in percent).

    The baseline is scored once for all systems (one sacrebleu paired test, one ROUGE pass)."""
    out: dict[str, dict[str, Any]] = {name: {} for name in runs}
    keys = dict(metrics_of_task(base.task))
    if "bleu" in keys:
        tests = paired_bootstrap(
            base.hypotheses,
            {n: r.hypotheses for n, r in runs.items()},
            base.references,
            target_lang=base.target_lang,
            n_samples=n_samples,
        )
        for name, bs in tests.items():
            for k in ("bleu", "chrf"):
                out[name][k] = {
                    "baseline": bs[f"{k}_baseline"],
                    "system": bs[k],
                    "delta": bs[k] - bs[f"{k}_baseline"],
                    "p": bs[f"{k}_p"],
                }
    if "rouge1" in keys:
        fb = rouge_per_example(base.hypotheses, base.references)
        for name, run in runs.items():
            fs = rouge_per_example(run.hypotheses, base.references)
            for t in ROUGE_TYPES:
                r = paired_bootstrap_means([100 * v for v in fb[t]], [100 * v for v in fs[t]], n_samples=n_samples)
                out[name][t] = {
                    "baseline": 100 * sum(fb[t]) / len(fb[t]),
                    "system": 100 * sum(fs[t]) / len(fs[t]),
                    "delta": r["delta"],
                    "p": r["p"],
                }
    return out


def compare_to_baseline(
    baseline: Sequence[EvaluatedRun], systems: Mapping[str, Sequence[EvaluatedRun]], *, n_samples: int = 1000
) -> dict[str, Any]:
    """Every system against the baseline, per seed and over seeds.

    Args:
        baseline: the baseline's evaluations, one per seed.
        systems: name -> evaluations, as many as the baseline's, paired by position (the same seeds).
        n_samples: bootstrap resamples per seed.

    Returns ``{"baseline": [labels], "seeds": [training seeds or None], "n_samples", "systems": {name:
    {"runs": [labels], "metrics": {key: {"label", "per_seed": [{"baseline", "system", "delta", "p"}],
    "over_seeds": SeedComparison.to_dict()}}}}}``; the keys are the generation metrics, then
    ``"score RULE"`` and ``"ece"`` (percent) of the teacher-forced pass, whose ``p`` is ``None``.
    Raises :class:`ComparisonError` when the numbers of seeds differ, a pair was not evaluated on
    the same examples, or its models' runs name different training seeds (checked for all before any
    bootstrap)."""
    if not baseline:
        raise ComparisonError("the baseline has no evaluation")
    for name, runs in systems.items():
        if len(runs) != len(baseline):
            raise ComparisonError(
                f"{name} has {len(runs)} evaluations but the baseline {len(baseline)}: "
                "give one per seed for each, in the same seed order"
            )
        for base, run in zip(baseline, runs):
            _check_pair(base, run)
    out: dict[str, Any] = {
        "baseline": [b.label for b in baseline],
        "seeds": [b.seed for b in baseline],
        "n_samples": n_samples,
        "systems": {},
    }
    seeds = [_per_seed(b, {name: runs[i] for name, runs in systems.items()}, n_samples) for i, b in enumerate(baseline)]
    for name, runs in systems.items():
        metrics: dict[str, Any] = {}
        for key, label in metrics_of_task(baseline[0].task):
            per: list[dict[str, Any]] = [s[name][key] for s in seeds]
            over: SeedComparison = compare_seeds([p["baseline"] for p in per], [p["system"] for p in per])
            metrics[key] = {"label": label, "per_seed": per, "over_seeds": over.to_dict()}
        for key, label, values in _teacher_forced_rows(baseline, runs):
            per = [{"baseline": b, "system": v, "delta": v - b, "p": None} for b, v in values]
            over = compare_seeds([b for b, _ in values], [v for _, v in values])
            metrics[key] = {"label": label, "per_seed": per, "over_seeds": over.to_dict()}
        out["systems"][name] = {"runs": [r.label for r in runs], "metrics": metrics}
    return out


def _teacher_forced_rows(baseline: Sequence[EvaluatedRun], runs: Sequence[EvaluatedRun]) -> list[tuple[str, str, list]]:
    """``(key, label, [(baseline, system) per seed])`` of the teacher-forced figures every pair has.

    Each rule's mean token score (higher is better) and the ECE in percent (lower is better); no
    bootstrap (the token-level values are not kept), only the comparison over seeds.
    """
    pairs = list(zip(baseline, runs))
    rows = []
    rules = [
        r
        for r in baseline[0].teacher_forced.get("mean_scores", {})
        if all(isinstance(x.teacher_forced.get("mean_scores", {}).get(r), (int, float)) for p in pairs for x in p)
    ]
    for rule in rules:
        values = [
            (float(b.teacher_forced["mean_scores"][rule]), float(r.teacher_forced["mean_scores"][rule]))
            for b, r in pairs
        ]
        rows.append((f"score {rule}", f"score {rule}", values))
    if all(isinstance(x.teacher_forced.get("ece"), (int, float)) for p in pairs for x in p):
        rows.append(
            (
                "ece",
                "ECE % (lower is better)",
                [(100 * float(b.teacher_forced["ece"]), 100 * float(r.teacher_forced["ece"])) for b, r in pairs],
            )
        )
    return rows


def _signed(x: float) -> str:
    return "n/a" if x != x else f"{x:+.2f}"


def _p(x: float) -> str:
    return f"{x:.3f}"


def comparison_markdown(result: Mapping[str, Any], baseline_name: str = "baseline") -> str:
    """The result of :func:`compare_to_baseline` as a markdown table.

    A row per system and metric, with the per-seed differences (bootstrap p), and with two or more
    seeds the mean difference [95% interval over seeds], the seeds ahead and the sign test p.
    """
    n_seeds = len(result["baseline"])
    head = ["system", "metric", "baseline", "system score", "Δ per seed (bootstrap p)"]
    if n_seeds > 1:
        head += ["mean Δ [95% CI over seeds]", "seeds ahead", "sign test p"]
    lines = [
        f"Against {baseline_name} ({n_seeds} seed{'s' if n_seeds > 1 else ''}; paired bootstrap over examples, "
        f"{result['n_samples']} resamples per seed):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for name, sys_result in result["systems"].items():
        for m in sys_result["metrics"].values():
            per = m["per_seed"]
            cells = [
                name,
                m["label"],
                ", ".join(f"{p['baseline']:.2f}" for p in per),
                ", ".join(f"{p['system']:.2f}" for p in per),
                ", ".join(_signed(p["delta"]) + ("" if p["p"] is None else f" ({_p(p['p'])})") for p in per),
            ]
            if n_seeds > 1:
                o = m["over_seeds"]
                lo, hi = o["ci95"]
                ci = "" if math.isnan(lo) else f" [{_signed(lo)}, {_signed(hi)}]"
                cells += [f"{_signed(o['mean'])}{ci}", f"{o['seeds_ahead']}/{o['num_seeds']}", _p(o["sign_test_p"])]
            lines.append("| " + " | ".join(cells) + " |")
    if n_seeds < 3:
        lines += [
            "",
            "With fewer than 3 seeds a difference may be the seeds' luck: one training run per seed is "
            "the unit of evidence, and the bootstrap sees only the test set's noise.",
        ]
    return "\n".join(lines)


def baseline_comparison(groups: list[tuple[str, list[str]]], baseline: str, n_samples: int) -> tuple[str, dict]:
    """``(markdown, result)`` of every group against the group named ``baseline``.

    ``groups`` are ``(name, evaluation directories)``, one directory per seed; see :func:`compare_to_baseline`.
    """
    names = [g for g, _ in groups]
    if baseline not in names:
        raise ComparisonError(f"--baseline {baseline!r} is none of the runs given; choose one of {', '.join(names)}")
    if len(groups) < 2:
        raise ComparisonError("--baseline needs at least one other run to compare with it")
    loaded = {name: [load_evaluated_run(p) for p in paths] for name, paths in groups}
    result = compare_to_baseline(
        loaded[baseline], {k: v for k, v in loaded.items() if k != baseline}, n_samples=n_samples
    )
    return comparison_markdown(result, baseline), result
