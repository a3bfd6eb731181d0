"""The report of ``reproduce_llm.py``: the finished steps' figures (:func:`collect`), each arm
against ``logarithmic`` (:func:`comparisons`), the training curves (:func:`plot_curves`) and
``WORK/results.md`` / ``results.json`` (:func:`report`)."""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

import _report
import _runner
import _stats
from _llm_common import ARMS, BASELINE, DEV_SET, RESULT_KEYS, RULES, TEST_SET, TRAIN_SETS
from _llm_steps import run_dir
from _runner import Step
from properlm.evaluation.curves import plot_curves as draw_curves


def _read(path: str) -> dict[str, Any] | None:
    return _runner.read_json_if(os.path.join(path, "results.json"))


def _hypotheses(path: str) -> list[str] | None:
    f = os.path.join(path, "hypotheses.txt")
    return _runner.read_lines(f) if os.path.isfile(f) else None


def _split_dir(rdir: str, split: str) -> str:
    return os.path.join(rdir, split if split in ("test", "dev") else f"extra_{split}")


def _splits(args: argparse.Namespace) -> list[str]:
    return ["test", *(["dev"] if args.decode_dev else []), *args.extra_tests]


def collect_run(args: argparse.Namespace, rdir: str) -> dict[str, Any]:
    """The figures of one model (untuned, or one arm and seed): BLEU/chrF per decoded split,
    test token scores and ECE at T = 1 and at the dev temperature, the temperature, and what
    training took."""
    row: dict[str, Any] = {}
    fit = _read(os.path.join(rdir, "fit_dev"))
    if fit is not None:
        row["temperature"] = fit["temperature_fit"]["temperature"]
        row["score_logarithmic_dev"] = fit["teacher_forced"]["mean_scores"].get("logarithmic")
        row["ece_dev"] = fit["teacher_forced"]["ece"]
    for split in _splits(args):
        ev = _read(_split_dir(rdir, split))
        if ev is None:
            continue
        gen = ev.get("generation", {})
        row[f"bleu_{split}"], row[f"chrf_{split}"] = gen.get("bleu"), gen.get("chrf")
        row[f"signatures_{split}"] = [gen.get("bleu_signature"), gen.get("chrf_signature")]
        row[f"at_cap_{split}"] = gen.get("new_token_cap", {}).get("num_at_cap")
        for suffix, tf in (("", ev.get("teacher_forced")), ("_scaled", ev.get("teacher_forced_scaled"))):
            if tf is None:
                continue
            for rule in RULES:
                row[f"score_{rule}_{split}{suffix}"] = tf["mean_scores"].get(rule)
            row[f"ece_{split}{suffix}"] = tf["ece"]
    train = _read(os.path.join(rdir, "train"))
    if train is not None:
        row["train_seconds"] = train.get("train_seconds")
        row["global_step"] = train.get("global_step")
    return row


def collect(args: argparse.Namespace, work: str) -> dict[str, Any]:
    """``{"untuned": row, ARM: {seed: row}}`` of what has finished (rows without figures left out)."""
    out: dict[str, Any] = {"untuned": collect_run(args, run_dir(work, "untuned", None))}
    for arm in args.arm_list:
        per = {}
        for seed in args.seed_list:
            row = collect_run(args, run_dir(work, arm, seed))
            if any(k != "train_seconds" for k in row):
                per[seed] = row
        out[arm] = per
    return out


def _refs(args: argparse.Namespace, work: str, split: str) -> list[str] | None:
    path = args.extra_tests[split][1] if split in args.extra_tests else os.path.join(work, "data", f"{split}.en")
    return _runner.read_lines(path) if os.path.isfile(path) else None


def comparisons(args: argparse.Namespace, work: str, rows: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Each arm against ``logarithmic`` of the same seed, per decoded split. The seed is the unit
    of evidence: per-seed differences, their mean with a 95% Student-t interval across seeds
    (:func:`_stats.mean_ci`) and a two-sided sign test; beside them the paired bootstrap of
    BLEU/chrF (resampling sentences) per seed and pooled over the seeds (hypotheses concatenated)."""
    out: dict[str, Any] = {}
    lines = [
        "| arm vs logarithmic | split | seeds | ΔBLEU per seed | mean ΔBLEU [95% CI] | seeds better | "
        "sign test p | mean ΔchrF [95% CI] | bootstrap p BLEU / chrF per seed | pooled ΔBLEU (p) | "
        "pooled ΔchrF (p) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = rows.get(BASELINE, {})
    for arm in args.arm_list:
        if arm == BASELINE:
            continue
        for split in _splits(args):
            refs = _refs(args, work, split)
            key_b, key_c = f"bleu_{split}", f"chrf_{split}"
            seeds = [
                s
                for s in args.seed_list
                if rows[arm].get(s, {}).get(key_b) is not None and base.get(s, {}).get(key_b) is not None
            ]
            if not seeds or refs is None:
                continue
            d_bleu = [rows[arm][s][key_b] - base[s][key_b] for s in seeds]
            d_chrf = [rows[arm][s][key_c] - base[s][key_c] for s in seeds]
            per_seed: list[dict[str, float] | None] = []
            pooled_a, pooled_b = [], []
            for s in seeds:
                ha = _hypotheses(_split_dir(run_dir(work, arm, s), split))
                hb = _hypotheses(_split_dir(run_dir(work, BASELINE, s), split))
                if ha is None or hb is None or not len(ha) == len(hb) == len(refs):
                    per_seed.append(None)
                    continue
                bs = _stats.paired_bootstrap(hb, {arm: ha}, refs, n_samples=args.bootstrap_samples)[arm]
                per_seed.append({"bleu_p": bs["bleu_p"], "chrf_p": bs["chrf_p"]})
                pooled_a += ha
                pooled_b += hb
            pooled = None
            if pooled_a:
                from sacrebleu.metrics import BLEU, CHRF

                n_seeds = len(pooled_a) // len(refs)
                bs = _stats.paired_bootstrap(
                    pooled_b, {arm: pooled_a}, refs * n_seeds, n_samples=args.bootstrap_samples
                )[arm]
                b0 = BLEU().corpus_score(pooled_b, [refs * n_seeds]).score
                c0 = CHRF().corpus_score(pooled_b, [refs * n_seeds]).score
                pooled = {
                    "seeds": n_seeds,
                    "sentences": len(pooled_a),
                    "bleu": bs["bleu"],
                    "bleu_baseline": b0,
                    "bleu_p": bs["bleu_p"],
                    "chrf": bs["chrf"],
                    "chrf_baseline": c0,
                    "chrf_p": bs["chrf_p"],
                }
            m, lo, hi = _stats.mean_ci(d_bleu)
            mc, loc, hic = _stats.mean_ci(d_chrf)
            p_sign = _stats.sign_test(d_bleu)
            tf = {}
            for rule in RULES:
                key = f"score_{rule}_{split}"
                d = [
                    rows[arm][s][key] - base[s][key]
                    for s in seeds
                    if rows[arm][s].get(key) is not None and base[s].get(key) is not None
                ]
                tf[rule] = {"diffs": d, "mean_ci": list(_stats.mean_ci(d))}
            for key in (f"ece_{split}", f"ece_{split}_scaled"):
                d = [
                    rows[arm][s][key] - base[s][key]
                    for s in seeds
                    if rows[arm][s].get(key) is not None and base[s].get(key) is not None
                ]
                tf[key.replace(f"_{split}", "")] = {"diffs": d, "mean_ci": list(_stats.mean_ci(d))}
            out[f"{arm}/{split}"] = {
                "arm": arm,
                "split": split,
                "seeds": seeds,
                "delta_bleu": d_bleu,
                "delta_chrf": d_chrf,
                "mean_delta_bleu": m,
                "ci95_bleu": [lo, hi],
                "mean_delta_chrf": mc,
                "ci95_chrf": [loc, hic],
                "seeds_better_bleu": sum(d > 0 for d in d_bleu),
                "sign_test_p": p_sign,
                "bootstrap_per_seed": per_seed,
                "bootstrap_pooled": pooled,
                "teacher_forced": tf,
            }
            bs_cells = ", ".join("-" if b is None else f"{b['bleu_p']:.3f} / {b['chrf_p']:.3f}" for b in per_seed)
            pb = (
                "-" if pooled is None else f"{pooled['bleu'] - pooled['bleu_baseline']:+.2f} (p={pooled['bleu_p']:.3f})"
            )
            pc = (
                "-" if pooled is None else f"{pooled['chrf'] - pooled['chrf_baseline']:+.2f} (p={pooled['chrf_p']:.3f})"
            )
            lines.append(
                f"| {ARMS[arm].label} | {split} | {len(seeds)} | {', '.join(f'{d:+.2f}' for d in d_bleu)} | "
                f"{_stats.fmt_ci(m, lo, hi, missing='-')} | {sum(d > 0 for d in d_bleu)}/{len(seeds)} | "
                f"{p_sign:.3f} | {_stats.fmt_ci(mc, loc, hic, missing='-')} | {bs_cells} | {pb} | {pc} |"
            )
    return lines, out


def _tf_comparison_lines(args: argparse.Namespace, comps: dict[str, Any]) -> list[str]:
    lines = [
        "| arm vs logarithmic | Δ log score [95% CI] | Δ Brier [95% CI] | Δ spherical [95% CI] | "
        "Δ ECE % [95% CI] | Δ ECE % after T [95% CI] |",
        "|---|---|---|---|---|---|",
    ]
    for c in comps.values():
        if c["split"] != "test":
            continue
        tf = c["teacher_forced"]

        def cell(key: str, digits: int, scale: float = 1.0, tf: dict[str, Any] = tf) -> str:
            m, lo, hi = tf[key]["mean_ci"]
            return _stats.fmt_ci(m * scale, lo * scale, hi * scale, digits, missing="-")

        lines.append(
            f"| {ARMS[c['arm']].label} | {cell('logarithmic', 4)} | {cell('brier', 4)} | "
            f"{cell('spherical', 4)} | {cell('ece', 2, 100)} | {cell('ece_scaled', 2, 100)} |"
        )
    return lines


def _status(steps: list[Step]) -> dict[str, Any]:
    missing = [s.name for s in steps if not s.done]
    return {
        "complete": not missing,
        "finished_steps": len(steps) - len(missing),
        "planned_steps": len(steps),
        "missing": missing,
    }


def plot_curves(args: argparse.Namespace, work: str, path: str) -> str | None:
    """The training curves (:func:`properlm.evaluation.curves.plot_curves`), a line per seed, the training loss
    first and on a log scale; ``None`` when no run has logged."""
    series = []
    for i, arm in enumerate(args.arm_list):
        runs = [os.path.join(run_dir(work, arm, seed), "train") for seed in sorted(args.seed_list)]
        style = {"color": f"C{i % 10}", "linestyle": "--" if ARMS[arm].switch else "-"}
        series.append(_report.curve_series(ARMS[arm].label, runs, style))
    loss, scores = _report.CURVE_PANELS[-1], _report.CURVE_PANELS[:-1]
    return draw_curves(
        series,
        path,
        title=f"SmolLM2-135M-Instruct de->en: {args.steps} steps x {args.batch_size} examples, one line per "
        f"seed ({len(args.seed_list)} seed(s)); validation: {args.val_examples} newstest2013 sentences",
        panels=[loss, *scores],
        per_run=True,
        log_scale={"loss"},
        ncols=2,
    )


def report(
    args: argparse.Namespace,
    work: str,
    steps: list[Step],
    manifest: dict[str, Any] | None,
    timings: dict[str, float],
    wall_seconds: float | None,
) -> str:
    rows = collect(args, work)
    comp_lines, comps = comparisons(args, work, rows)
    status = _status(steps)
    png = os.path.join(work, "training_curves.png")
    curves = plot_curves(args, work, png)
    splits = _splits(args)
    precision = (
        "bfloat16 mixed precision over float32 weights (evaluation's output head and scores in float32)"
        if getattr(args, "bf16", False)
        else "float32"
    )
    mode = (
        f"LoRA (r={args.lora_r}, alpha={args.lora_alpha:g}, all linear layers)"
        if args.lora
        else "full fine-tuning (all weights)"
    ) + f", {precision}"
    counts = manifest["counts"] if manifest else {}
    n_train = counts.get("train", args.train_examples)
    decoding = "greedy" if args.num_beams == 1 else f"beam search ({args.num_beams} beams)"
    cap = (
        (
            f", per batch at most ceil({args.max_new_tokens_ratio:g} x longest source tokens + "
            f"{args.max_new_tokens_offset})"
        )
        if args.max_new_tokens_ratio
        else ""
    )
    lines = ["# SmolLM2-135M-Instruct, German->English: proper scoring rules vs log vs improper objectives", ""]
    if not status["complete"]:
        shown = ", ".join(status["missing"][:8]) + (" ..." if len(status["missing"]) > 8 else "")
        lines += [
            f"**Partial**: {status['finished_steps']} of {status['planned_steps']} steps finished; missing: "
            f"{shown}. Figures below cover what has finished.",
            "",
        ]
    lines += [
        f"- fine-tuning: {mode}; {args.steps} steps x {args.batch_size} examples = "
        f"{args.steps * args.batch_size} examples ({args.steps * args.batch_size / n_train:.2f} epochs of "
        f"{n_train} distinct pairs), AdamW lr {args.learning_rate:g} ({args.lr_scheduler}, "
        f"{args.warmup_steps} warm-up steps), max length {args.max_length} tokens"
        + (", batches grouped by length" if args.group_by_length else "")
        + f"; seeds {', '.join(map(str, args.seed_list))}",
        f"- training data: pairs of {', '.join(TRAIN_SETS)} with at most {args.max_source_words} German "
        f"(and {int(1.5 * args.max_source_words)} English) words"
        + (f" ({manifest['train_pool_after_filter']} of {manifest['train_pool']} pass)" if manifest else ""),
        f"- dev: {counts.get('dev', args.dev_examples)} sentences of {DEV_SET} (temperature fit"
        + (", decoded" if args.decode_dev else "")
        + f"); test: {counts.get('test', args.test_examples)} "
        f"sentences of {TEST_SET}; fixed random subsets after the same filter"
        + (
            "; extra test sets: " + ", ".join(f"{k} ({os.path.basename(v[0])})" for k, v in args.extra_tests.items())
            if args.extra_tests
            else ""
        ),
        f"- decoding: {decoding}, at most {args.max_new_tokens} new tokens{cap}; token scores and ECE "
        "(15 bins, top-1 token) teacher-forced, at T = 1 and at the T fitted on dev",
        f"- arms: {', '.join(ARMS[a].name + ' = ' + ARMS[a].label for a in args.arm_list)}; smoothing "
        f"eps = {args.smoothing:g} where named"
        + (f"; switch arms branch from logarithmic at step {args.switch_at}" if args.switch_at else ""),
        "- dft and 1 - p have the same gradient (-grad p of the target token): one of them stands for both",
        "",
        "## Test (and extra) sets: mean ± std over seeds",
        "",
    ]
    cols = []
    for split in splits:
        cols += [(f"BLEU {split}", f"bleu_{split}", 2, 1.0), (f"chrF {split}", f"chrf_{split}", 2, 1.0)]
    cols += [
        ("log score test", "score_logarithmic_test", 4, 1.0),
        ("Brier test", "score_brier_test", 4, 1.0),
        ("spherical test", "score_spherical_test", 4, 1.0),
        ("ECE % test", "ece_test", 2, 100.0),
    ]
    models = ["untuned", *args.arm_list]
    per_model = {arm: {0: rows["untuned"]} if arm == "untuned" else rows[arm] for arm in models}
    labels = {arm: "untuned" if arm == "untuned" else ARMS[arm].label for arm in models}
    lines += _report.seed_table(per_model, models, labels, cols, head="arm", single=["untuned"])
    table: dict[str, Any] = {}
    for arm in models:
        per, label = per_model[arm], labels[arm]
        keys = sorted({k for r in per.values() for k in r if not k.startswith("signatures")})
        table[arm] = {
            "label": label,
            "seeds": [] if arm == "untuned" else sorted(per),
            "figures": {
                k: {
                    "values": _stats.numeric_values(per, k),
                    "mean": _stats.mean_std(_stats.numeric_values(per, k))[0],
                    "std": _stats.mean_std(_stats.numeric_values(per, k))[1],
                }
                for k in keys
            },
        }
    calib = [
        ("T (dev fit)", "temperature", 3, 1.0),
        ("ECE % test", "ece_test", 2, 100.0),
        ("ECE % test at T", "ece_test_scaled", 2, 100.0),
        ("log score test", "score_logarithmic_test", 4, 1.0),
        ("log score at T", "score_logarithmic_test_scaled", 4, 1.0),
        ("Brier test", "score_brier_test", 4, 1.0),
        ("Brier at T", "score_brier_test_scaled", 4, 1.0),
    ]
    lines += [
        "",
        "## Calibration: temperature scaling with T fitted on dev (teacher-forced test scores)",
        "",
        *_report.seed_table(per_model, models, labels, calib, head="arm", single=["untuned"]),
    ]
    lines += [
        "",
        "## Each arm against logarithmic fine-tuning (same seed)",
        "",
        "The seed is the unit of evidence: mean difference with its 95% Student-t interval across seeds and a "
        "two-sided sign test over seeds. Beside them the paired bootstrap (sacrebleu, "
        f"{args.bootstrap_samples} resamples of sentences; p: probability that the difference is not real) per "
        "seed and pooled over seeds; sentences are not independent evidence of an objective's effect.",
        "",
        *comp_lines,
        "",
        "Teacher-forced test scores (higher is better; ECE lower), differences to logarithmic:",
        "",
        *_tf_comparison_lines(args, comps),
    ]
    sigs = sorted(
        {
            s
            for per in [{0: rows["untuned"]}, *[rows[a] for a in args.arm_list]]
            for r in per.values()
            for k, v in r.items()
            if k.startswith("signatures")
            for s in v
            if s
        }
    )
    at_cap = {
        arm: sum(_stats.numeric_values({0: rows["untuned"]} if arm == "untuned" else rows[arm], "at_cap_test"))
        for arm in ["untuned", *args.arm_list]
    }
    n_test = counts.get("test", args.test_examples)
    lines += [
        "",
        "sacrebleu signatures: " + ("; ".join(f"`{s}`" for s in sigs) if sigs else "-"),
        "",
        "Test hypotheses that stopped at the new-token cap (summed over seeds, of "
        f"{n_test} per model): " + ", ".join(f"{a} {n}" for a, n in at_cap.items()),
        "",
        f"Training curves: `{os.path.basename(png)}`" if curves else "No training curves yet.",
    ]
    compute = sum(timings.values())
    lines += [
        "",
        f"Compute time of the finished steps: {compute / 3600:.2f} h (sum over steps and invocations)"
        + (
            ""
            if wall_seconds is None
            else f"; this invocation: {wall_seconds / 3600:.2f} h wall, "
            f"--jobs {args.jobs}, {args.threads} thread(s) per step"
        )
        + ".",
    ]
    md = "\n".join(lines) + "\n"
    settings = {
        k: getattr(args, k) for k in (*RESULT_KEYS, "data_dir", "threads", "jobs", "decode_dev", "bootstrap_samples")
    }
    settings.update(arms=args.arm_list, seeds=args.seed_list, extra_tests=args.extra_tests)
    results = {
        "status": status,
        "settings": settings,
        "data": manifest,
        "per_seed": rows,
        "table": table,
        "comparisons": comps,
        "signatures": sigs,
        "hypotheses_at_cap_test": at_cap,
        "timings_seconds": timings,
        "compute_seconds": compute,
        "wall_seconds_this_invocation": wall_seconds,
        "files": {"markdown": os.path.join(work, "results.md"), "curves": png if curves else None},
    }
    _report.write_report(
        work,
        md,
        results,
        newline=False,
        default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v),
    )
    return md
