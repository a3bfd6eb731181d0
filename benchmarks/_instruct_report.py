"""The report of ``reproduce_instruct.py``: each model's figures (:func:`collect`), each arm against logarithmic
instruction tuning of the same seed (:func:`comparisons`), calibration, the prior axis, the training curves, and
``WORK/results.md`` / ``results.json`` (:func:`report`)."""

from __future__ import annotations

import argparse
import collections
import os
from collections.abc import Sequence
from typing import Any

import _report
import _runner
import _stats
from _llm_common import ARMS, BASELINE
from _runner import Step
from properlm.evaluation.curves import plot_curves as draw_curves

RULES = ("logarithmic", "brier", "spherical")
#: (split, result key, column title): the generation metrics compared against logarithmic
METRICS = [
    ("alpaca", "rougeL", "Alpaca ROUGE-L"),
    ("alpaca", "bleu", "Alpaca BLEU"),
    ("deen", "bleu", "de-en BLEU"),
    ("deen", "chrf", "de-en chrF"),
    ("aeslc", "rouge1", "AESLC R-1"),
    ("aeslc", "rouge2", "AESLC R-2"),
    ("aeslc", "rougeL", "AESLC R-L"),
    ("aeslc", "rouge1_multi", "AESLC R-1 multi"),
    ("aeslc", "rougeL_multi", "AESLC R-L multi"),
]
PRIOR_LABELS = {
    "alpaca": "Alpaca (instruction tuning, this study)",
    "deen": "news de-en pairs (reproduce_llm.py: task fine-tuning)",
    "aeslc": "AESLC emails -> subject (as instructions)",
}


def _dir(work: str, arm: str, seed: int | None) -> str:
    return os.path.join(work, "untuned") if seed is None else os.path.join(work, f"seed{seed}", arm)


def _read(path: str) -> dict[str, Any] | None:
    return _runner.read_json_if(os.path.join(path, "results.json"))


def _splits(args: argparse.Namespace) -> list[str]:
    return ["alpaca", "deen", "aeslc", *args.extra_tests]


def _split_dir(rdir: str, split: str) -> str:
    return os.path.join(rdir, split if split in ("alpaca", "deen", "aeslc") else f"extra_{split}")


def collect_run(args: argparse.Namespace, rdir: str) -> dict[str, Any]:
    """One model's figures: ``{split}_{metric}`` of generation, ``tf_{rule}_{split}[_scaled]``, ``ece_{split}
    [_scaled]``, the dev fit (``temperature``, ``tf_{rule}_dev``, ``ece_dev``, ``ece_dev_scaled``)."""
    row: dict[str, Any] = {}
    fit = _read(os.path.join(rdir, "fit_dev"))
    if fit is not None:
        row["temperature"] = fit["temperature_fit"]["temperature"]
    dev = _read(os.path.join(rdir, "dev"))
    if dev is not None:
        tf, at = dev["teacher_forced"], dev.get("teacher_forced_scaled") or {}
        row["ece_dev"], row["ece_dev_scaled"] = tf["ece"], at.get("ece")
        row["target_prob_dev"] = tf.get("mean_target_prob")
        for rule in RULES:
            row[f"tf_{rule}_dev"] = tf["mean_scores"].get(rule)
            row[f"tf_{rule}_dev_scaled"] = at.get("mean_scores", {}).get(rule)
    for split in _splits(args):
        ev = _read(_split_dir(rdir, split))
        if ev is None:
            continue
        gen = ev.get("generation", {})
        for k, v in gen.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                row[f"{split}_{k}"] = v
        row[f"{split}_signatures"] = [
            gen.get(k) for k in ("bleu_signature", "chrf_signature", "rouge_settings") if gen.get(k)
        ]
        row[f"{split}_at_cap"] = gen.get("new_token_cap", {}).get("num_at_cap")
        for suffix, tf in (("", ev.get("teacher_forced")), ("_scaled", ev.get("teacher_forced_scaled"))):
            if tf is None:
                continue
            for rule in RULES:
                row[f"tf_{rule}_{split}{suffix}"] = tf["mean_scores"].get(rule)
            row[f"ece_{split}{suffix}"] = tf["ece"]
    train = _read(os.path.join(rdir, "train"))
    if train is not None:
        row["train_seconds"] = train.get("train_seconds")
    return row


def collect(args: argparse.Namespace, work: str) -> dict[str, Any]:
    """``{"untuned": row, ARM: {seed: row}}`` of what has finished."""
    out: dict[str, Any] = {"untuned": collect_run(args, _dir(work, "untuned", None))}
    for arm in args.arm_list:
        out[arm] = {
            s: r
            for s in args.arm_seeds.get(arm, args.seed_list)
            if (r := collect_run(args, _dir(work, arm, s))) and set(r) != {"train_seconds"}
        }
    return out


def priors(work: str) -> dict[str, Any]:
    """The untuned model's prior on each training set: mean target probability, share of targets with p > 0.5."""
    out = {}
    for what in PRIOR_LABELS:
        res = _read(os.path.join(work, "untuned", f"prior_{what}"))
        if res is not None:
            tf = res["teacher_forced"]
            out[what] = {
                "mean_target_prob": tf.get("mean_target_prob"),
                "target_prob_above_half": tf.get("target_prob_above_half"),
                "mean_log_prob": tf.get("mean_log_prob"),
                "accuracy": tf.get("accuracy"),
                "num_tokens": tf.get("num_tokens"),
                "examples": res.get("num_examples"),
            }
    return out


def _hyps(work: str, arm: str, seed: int, split: str) -> list[str] | None:
    path = os.path.join(_split_dir(_dir(work, arm, seed), split), "hypotheses.txt")
    return _runner.read_lines(path) if os.path.isfile(path) else None


def _references(work: str, split: str) -> tuple[list[str], list[list[str]]] | None:
    """The references of a built-in split (first and all), read from ``WORK/data``."""
    from _instruct_data import read_jsonl

    d = os.path.join(work, "data")
    if split == "deen":
        path = os.path.join(d, "deen_test.en")
        if not os.path.isfile(path):
            return None
        refs = _runner.read_lines(path)
        return refs, [[r] for r in refs]
    name = {"alpaca": "alpaca_decode.jsonl", "aeslc": "aeslc_dev.jsonl"}.get(split)
    if name is None or not os.path.isfile(os.path.join(d, name)):
        return None
    rows = read_jsonl(os.path.join(d, name))
    return [r["output"] for r in rows], [[r["output"], *r.get("annotations", [])] for r in rows]


def precision_note(args: argparse.Namespace, steps: Sequence[Step]) -> str:
    """The precision, and for bf16 how the finished training runs computed their matrix products (recorded by
    ``properlm train`` as ``bf16_matmuls``: ``native`` or ``float32`` from the bf16 operands, on a CPU without native
    bf16; runs made before that record say nothing): the runs of one study may come from several machines."""
    if args.precision != "bf16":
        return "float32"
    modes: collections.Counter[str] = collections.Counter()
    for s in steps:
        out = s.output_dir()
        result = _runner.read_json_if(os.path.join(out, "results.json")) if s.kind == "train" and out else None
        if result is not None:
            modes[str(result.get("bf16_matmuls", "not recorded"))] += 1
    labels = {"native": "native", "float32": "in float32 from the bf16 operands"}
    detail = ", ".join(f"{labels.get(m, m)} in {n}" for m, n in sorted(modes.items()))
    return "bfloat16 mixed precision" + (f" (the training runs' bf16 matrix products: {detail})" if detail else "")


def comparisons(args: argparse.Namespace, work: str, rows: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Each arm against logarithmic of the same seed, per metric: per-seed differences, their mean with a 95%
    Student-t interval over seeds, seeds better, a sign test, the paired bootstrap per seed and pooled over the
    seeds (hypotheses concatenated)."""
    out: dict[str, Any] = {}
    lines = [
        "| arm vs logarithmic | metric | seeds | Δ per seed | mean Δ [95% CI] | seeds better | "
        "bootstrap p per seed | pooled Δ (p) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = rows.get(BASELINE, {})
    refs_cache: dict[str, Any] = {}
    for arm in args.arm_list:
        if arm == BASELINE:
            continue
        for split, metric, title in METRICS:
            key = f"{split}_{metric}"
            seeds = [
                s
                for s in sorted(rows[arm])
                if rows[arm][s].get(key) is not None and base.get(s, {}).get(key) is not None
            ]
            if not seeds:
                continue
            diffs = [rows[arm][s][key] - base[s][key] for s in seeds]
            refs = refs_cache.setdefault(split, _references(work, split))
            per_seed: list[dict[str, Any] | None] = []
            pooled_a, pooled_b = [], []
            for s in seeds:
                ha, hb = _hyps(work, arm, s, split), _hyps(work, BASELINE, s, split)
                if refs is None or ha is None or hb is None or not len(ha) == len(hb) == len(refs[0]):
                    per_seed.append(None)
                    continue
                per_seed.append(_stats.paired_bootstrap_metric(metric, hb, ha, refs, args.bootstrap_samples))
                pooled_a += ha
                pooled_b += hb
            pooled = None
            if pooled_a and refs is not None:
                k = len(pooled_a) // len(refs[0])
                pooled = _stats.paired_bootstrap_metric(
                    metric, pooled_b, pooled_a, (refs[0] * k, refs[1] * k), args.bootstrap_samples
                )
            m, lo, hi = _stats.mean_ci(diffs)
            better = sum(d > 0 for d in diffs)
            out[f"{arm}/{key}"] = {
                "arm": arm,
                "metric": key,
                "seeds": seeds,
                "diffs": diffs,
                "mean": m,
                "ci95": [lo, hi],
                "seeds_better": better,
                "sign_test_p": _stats.sign_test(diffs),
                "bootstrap_per_seed": per_seed,
                "bootstrap_pooled": pooled,
            }
            cells = ", ".join("-" if b is None else f"{b['p']:.3f}" for b in per_seed)
            pc = "-" if pooled is None else f"{pooled['delta']:+.2f} ({pooled['p']:.3f})"
            lines.append(
                f"| {ARMS[arm].label} | {title} | {len(seeds)} | {', '.join(f'{d:+.2f}' for d in diffs)} | "
                f"{_stats.fmt_ci(m, lo, hi, missing='-')} | {better}/{len(seeds)} | {cells} | {pc} |"
            )
    return lines, out


def _table(args: argparse.Namespace, rows: dict[str, Any], cols: list[tuple[str, str, int, float]]) -> list[str]:
    models = ["untuned", *args.arm_list]
    per = {arm: {0: rows["untuned"]} if arm == "untuned" else rows.get(arm, {}) for arm in models}
    labels = {arm: "untuned" if arm == "untuned" else ARMS[arm].label for arm in models}
    return _report.seed_table(per, models, labels, cols, head="model", single=["untuned"])


def plot_curves(args: argparse.Namespace, work: str, path: str) -> str | None:
    """Validation scores and training loss against the step, the mean over seeds per arm."""
    series = []
    for i, arm in enumerate(args.arm_list):
        runs = [os.path.join(_dir(work, arm, s), "train") for s in args.arm_seeds.get(arm, args.seed_list)]
        style = {"color": f"C{i}", "linestyle": "--" if ARMS[arm].switch else "-"}
        series.append(_report.curve_series(ARMS[arm].label, runs, style))
    return draw_curves(
        series,
        path,
        title=f"SmolLM2-135M-Instruct on Alpaca: {args.steps} steps x {args.batch_size}, mean over seeds; "
        "dotted: the switch",
        panels=_report.CURVE_PANELS,
        mark=args.switch_at or args.steps,
        what=f"Alpaca dev ({args.val_examples})",
        ncols=4,
    )


def report(
    args: argparse.Namespace, work: str, steps: list[Step], manifest: dict[str, Any] | None, wall_seconds: float | None
) -> str:
    rows = collect(args, work)
    comp_lines, comps = comparisons(args, work, rows)
    prior = priors(work)
    missing = [s.name for s in steps if not s.done]
    png = plot_curves(args, work, os.path.join(work, "training_curves.png"))
    timings = _runner.read_json_if(os.path.join(work, "timings.json")) or {}
    counts = (manifest or {}).get("counts", {})
    lines = ["# Instruction tuning with each scoring rule, then zero-shot (SmolLM2-135M-Instruct on Alpaca)", ""]
    if missing:
        lines += [
            f"**Partial**: {len(steps) - len(missing)} of {len(steps)} steps finished; missing: "
            + ", ".join(missing[:8])
            + (" ..." if len(missing) > 8 else "")
            + ". The figures cover what has "
            "finished.",
            "",
        ]
    n_train = counts.get("alpaca_train", 0)
    lines += [
        f"- model: SmolLM2-135M-Instruct (already instruction-tuned, unlike the paper's base LLaMA), full fine-tuning, "
        f"chat template, loss on the response; {precision_note(args, steps)}",
        f"- training: {args.steps} steps x {args.batch_size} = {args.steps * args.batch_size} examples of "
        f"{n_train} Alpaca records ({args.steps * args.batch_size / max(n_train, 1):.2f} epochs), AdamW lr "
        f"{args.learning_rate:g} ({args.lr_scheduler}, {args.warmup_steps} warm-up steps), max length "
        f"{args.max_length}; the same for every arm"
        + (f"; the switch at step {args.switch_at}" if args.switch_at else ""),
        f"- dev: {counts.get('alpaca_dev', args.dev_examples)} held-out Alpaca records (all scored teacher-forced; T "
        f"fitted on the first {args.fit_examples}; "
        f"{counts.get('alpaca_decode', args.decode_examples)} answered greedily, at most "
        f"{(manifest or {}).get('alpaca_response_cap', '?')} new tokens); de-en: "
        f"{counts.get('deen_test', args.test_examples)} newstest2014 sentences (the LLM study's); AESLC: "
        f"{counts.get('aeslc_dev', args.summ_examples)} dev emails as subject-line instructions",
        "- seeds per arm: " + ", ".join(f"{ARMS[a].label} {len(rows.get(a, {}))}" for a in args.arm_list),
        "",
        "## Zero-shot generation: mean ± std over seeds",
        "",
    ]
    gen_cols = [(title, f"{split}_{metric}", 2, 1.0) for split, metric, title in METRICS]
    lines += _table(args, rows, gen_cols)
    tf_cols = [
        ("dev log score", "tf_logarithmic_dev", 4, 1.0),
        ("dev Brier", "tf_brier_dev", 4, 1.0),
        ("dev spherical", "tf_spherical_dev", 4, 1.0),
        ("dev ECE %", "ece_dev", 2, 100.0),
        ("T", "temperature", 3, 1.0),
        ("dev ECE % at T", "ece_dev_scaled", 2, 100.0),
        ("de-en log score", "tf_logarithmic_deen", 4, 1.0),
        ("de-en ECE %", "ece_deen", 2, 100.0),
        ("de-en ECE % at T", "ece_deen_scaled", 2, 100.0),
    ]
    lines += [
        "",
        "## Teacher-forced scores and calibration (T fitted on the Alpaca dev slice)",
        "",
        *_table(args, rows, tf_cols),
        "",
        "## Each arm against logarithmic instruction tuning (same seed)",
        "",
        "The seed is the unit of evidence: the mean difference over seeds with its 95% Student-t interval and "
        "the seeds better; beside it the paired bootstrap over examples (sacrebleu's for BLEU/chrF, of the "
        f"per-example F1 for ROUGE; {args.bootstrap_samples} resamples) per seed and pooled over the seeds.",
        "",
        *comp_lines,
        "",
        "## The prior axis: the untuned model's probability of the targets",
        "",
        "| training set | mean p(target token) | share with p > 0.5 | mean log p | tokens |",
        "|---|---|---|---|---|",
    ]
    for what, p in prior.items():
        lines.append(
            f"| {PRIOR_LABELS[what]} | {p['mean_target_prob']:.3f} | {p['target_prob_above_half']:.3f} | "
            f"{p['mean_log_prob']:.3f} | {p['num_tokens']} |"
        )
    sigs = sorted(
        {
            s
            for per in [{0: rows["untuned"]}, *[rows.get(a, {}) for a in args.arm_list]]
            for r in per.values()
            for k, v in r.items()
            if k.endswith("_signatures")
            for s in v
        }
    )
    compute = sum(timings.values())
    lines += [
        "",
        "Signatures: " + ("; ".join(f"`{s}`" for s in sigs) if sigs else "-"),
        "",
        f"Training curves: `{os.path.basename(png)}`" if png else "No training curves yet.",
        "",
        f"Compute of the finished steps: {compute / 3600:.2f} core-hours"
        + ("" if wall_seconds is None else f"; this invocation {wall_seconds / 3600:.2f} h wall, --jobs {args.jobs}")
        + ".",
    ]
    md = "\n".join(lines) + "\n"
    settings = {
        k: getattr(args, k, None)
        for k in (
            "precision",
            "steps",
            "batch_size",
            "learning_rate",
            "lr_scheduler",
            "warmup_steps",
            "max_length",
            "switch_at",
        )
    }
    settings.update(arms=args.arm_list, seeds=args.seed_list, arm_seeds=args.arm_seeds, extra_tests=args.extra_tests)
    summary = {
        "status": {"complete": not missing, "missing": missing},
        "settings": settings,
        "data": manifest,
        "per_seed": rows,
        "comparisons": comps,
        "priors": prior,
        "timings_seconds": timings,
        "compute_seconds": compute,
        "wall_seconds_this_invocation": wall_seconds,
    }
    _report.write_report(work, md.rstrip("\n"), summary)
    return md
