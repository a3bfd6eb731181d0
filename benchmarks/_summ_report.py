"""The report of ``reproduce_summ.py``: the finished runs' figures (:func:`collect`), the tables,
(b) and (c) against (a) (:func:`comparisons`), the smoothing selection (:func:`smoothing_report`)
and ``WORK/results.md`` / ``results.json`` (:func:`report`)."""

from __future__ import annotations

import argparse
import os
from typing import Any

import _report
import _runner
import _stats
from _runner import eval_name, read_json_if
from _stats import fmt_ci, fmt_mean_std, seed_values
from _summ_runs import (
    BRANCHES,
    CONTROLS,
    LABELS,
    OBJECTIVES,
    PROTOCOLS,
    ROUGE,
    ROUGE_LABELS,
    RULES,
    SELECTION_METRIC,
    _eps_name,
    evaluations,
    heldout_path,
    protocol_eps,
    run_dir,
    selecting,
    selection_path,
    selection_rows,
    split_file,
)
from properlm.evaluation.curves import plot_curves as draw_curves


def _eval(args: argparse.Namespace, seed: int, protocol: str, split: str, objective: str) -> dict[str, Any] | None:
    run = run_dir(args, seed, protocol)
    return None if run is None else read_json_if(os.path.join(run, eval_name(split, objective), "results.json"))


def collect(args: argparse.Namespace) -> dict[str, dict[int, dict[str, Any]]]:
    """Per protocol and seed: ROUGE per split and objective, dev token scores and ECE."""
    per: dict[str, dict[int, dict[str, Any]]] = {}
    for protocol in args.protocol_list:
        for seed in args.seed_list:
            row: dict[str, Any] = {}
            for split, objective in evaluations(args):
                ev = _eval(args, seed, protocol, split, objective)
                if ev is None:
                    continue
                gen = ev.get("generation", {})
                for key in ROUGE:
                    for suffix in ("", "_multi"):
                        if key + suffix in gen:
                            row[f"{key}{suffix}_{split}_{objective}"] = gen[key + suffix]
                if objective == "logarithmic":
                    tf = ev["teacher_forced"]
                    for r in RULES:
                        row[f"score_{r}_{split}"] = tf["mean_scores"].get(r)
                    row[f"ece_{split}"] = tf["ece"]
                    row[f"truncation_{split}"] = ev.get("truncation")
                    row["rouge_settings"] = gen.get("rouge_settings")
                    row["rouge_multi_settings"] = gen.get("rouge_multi_settings", row.get("rouge_multi_settings"))
            if row:
                row["smoothing"] = protocol_eps(args, protocol)
                per.setdefault(protocol, {})[seed] = row
    return per


def main_table(per: dict[str, Any], protocols: list[str], split: str = "dev") -> str:
    cols = [(f"{ROUGE_LABELS[k]}", f"{k}_{split}_logarithmic", 2, 1) for k in ROUGE]
    if any(seed_values(per, p, f"rouge1_multi_{split}_logarithmic") for p in protocols):
        cols += [(f"{ROUGE_LABELS[k]} multi", f"{k}_multi_{split}_logarithmic", 2, 1) for k in ROUGE]
    cols += [
        ("log score", f"score_logarithmic_{split}", 3, 1),
        ("Brier", f"score_brier_{split}", 4, 1),
        ("spherical", f"score_spherical_{split}", 4, 1),
        ("ECE (%)", f"ece_{split}", 2, 100),
    ]
    return "\n".join(_report.seed_table(per, protocols, LABELS, cols, count_key=f"rouge1_{split}_logarithmic"))


def objective_table(per: dict[str, Any], protocols: list[str]) -> str:
    keys = [
        (f"{ROUGE_LABELS[k]}{m} ({o[:3]} beam)", f"{k}{m}_dev_{o}")
        for k in ("rouge1", "rougeL")
        for m in ("", "_multi")
        for o in OBJECTIVES
    ]
    lines = [
        "| protocol | " + " | ".join(k[0].replace("_multi", " multi") for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for p in protocols:
        cells = [fmt_mean_std(seed_values(per, p, k)) for _, k in keys]
        lines.append(f"| {PROTOCOLS[p].label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _references(path: str, multi: bool) -> list[Any]:
    from properlm.data import load_examples

    examples = load_examples(path, task="summarization")
    return [list(e.references) if multi else e.target for e in examples]


def comparisons(
    args: argparse.Namespace, per: dict[str, Any], baseline: str = "a", systems: tuple[str, ...] = BRANCHES
) -> tuple[str, dict[str, Any]]:
    """``systems`` (the branches (b), (c)) against ``baseline`` ((a), or the control (a0)) of the same seed, per
    split and ROUGE variant: the seed-level mean difference with its 95% Student-t interval and sign test, and
    the per-seed paired bootstrap over documents (p and the document-resampled interval of the difference)."""
    from properlm.evaluation.text_metrics import rouge_per_example

    out: dict[str, Any] = {}
    lines = [
        f"| vs ({baseline}) | split | ROUGE | Δ per seed | mean Δ [95% CI over seeds] | seeds better | "
        "sign test p | bootstrap p per seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    splits = ["dev", *args.tests]
    cache: dict[tuple[int, str, str, bool], dict[str, list[float]]] = {}

    def doc_scores(seed: int, protocol: str, split: str, refs: list[Any], multi: bool) -> dict[str, list[float]]:
        key = (seed, protocol, split, multi)
        if key not in cache:
            run = run_dir(args, seed, protocol)
            assert run is not None  # only seeds with results are compared
            hyps = _runner.read_lines(os.path.join(run, eval_name(split, "logarithmic"), "hypotheses.txt"))
            cache[key] = rouge_per_example(hyps, refs)
        return cache[key]

    for split in splits:
        single_refs = _references(split_file(args, split), multi=False)
        multi_refs = _references(split_file(args, split), multi=True)
        variants = [False] + ([True] if any(len(r) > 1 for r in multi_refs) else [])
        for p in systems:
            if p not in per or baseline not in per:
                continue
            for multi in variants:
                for metric in ROUGE:
                    name = metric + ("_multi" if multi else "")
                    key = f"{name}_{split}_logarithmic"
                    seeds, deltas = _stats.seed_differences(per, p, key, args.seed_list, baseline=baseline)
                    if not seeds:
                        continue
                    boots = []
                    for s in seeds:
                        refs = multi_refs if multi else single_refs
                        base = doc_scores(s, baseline, split, refs, multi)[metric]
                        system = doc_scores(s, p, split, refs, multi)[metric]
                        b = _stats.paired_bootstrap_means(base, system, n_samples=args.bootstrap_samples, seed=s)
                        boots.append({"p": b["p"], "delta": 100 * b["delta"], "ci95": [100 * v for v in b["ci95"]]})
                    m, lo, hi = _stats.mean_ci(deltas)
                    better, p_sign = sum(d > 0 for d in deltas), _stats.sign_test(deltas)
                    out[f"{p}_{split}_{name}"] = {
                        "seeds": seeds,
                        "delta": deltas,
                        "mean_delta": m,
                        "ci95": [lo, hi],
                        "sign_test_p": p_sign,
                        "bootstrap": boots,
                    }
                    label = ROUGE_LABELS[metric] + (" multi" if multi else "")
                    per_seed = ", ".join(f"{d:+.2f}" for d in deltas)
                    boot_p = ", ".join(f"{b['p']:.3f}" for b in boots)
                    lines.append(
                        f"| {PROTOCOLS[p].label} | {split} | {label} | {per_seed} | {fmt_ci(m, lo, hi)} | "
                        f"{better}/{len(seeds)} | {p_sign:.3f} | {boot_p} |"
                    )
    return "\n".join(lines), out


def checkpoint_rows(args: argparse.Namespace) -> tuple[str, dict[int, dict[str, Any]]]:
    """(a)'s step-T1 checkpoint on dev: where (b) and (c) start."""
    rows: dict[int, dict[str, Any]] = {}
    for s in args.seed_list:
        ev = read_json_if(
            os.path.join(_runner.run_dir(args.work_dir, s, "a"), f"eval_dev_checkpoint_{args.t1}", "results.json")
        )
        if ev is not None:
            rows[s] = {k: ev["generation"].get(k) for k in (*ROUGE, *(f"{k}_multi" for k in ROUGE))}
            rows[s]["score_logarithmic"] = ev["teacher_forced"]["mean_scores"].get("logarithmic")
    if not rows:
        return "", rows
    keys = [
        k
        for k in ("rouge1", "rougeL", "rouge1_multi", "rougeL_multi", "score_logarithmic")
        if any(r.get(k) is not None for r in rows.values())
    ]
    lines = [
        "| model | seeds | " + " | ".join(keys) + " |",
        "|---|---|" + "---|" * len(keys),
        f"| (a) at T1 = {args.t1} | {len(rows)} | "
        + " | ".join(
            fmt_mean_std([r[k] for r in rows.values() if r.get(k) is not None], 3 if k.startswith("score") else 2)
            for k in keys
        )
        + " |",
    ]
    return "\n".join(lines), rows


def smoothing_report(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """How every protocol's smoothing was set: (a)'s fixed value, the branches' fixed value or their
    selection on the held-out slice of train (every candidate's held-out scores, the choice)."""
    branches = [p for p in args.protocol_list if p in BRANCHES]
    out: dict[str, Any] = {
        "a": args.smoothing_a,
        "a_how": "fixed (--smoothing-a), not selected",
        **{p: eps for p, eps in CONTROLS.items() if p in args.protocol_list},
    }
    text = (
        f"Score smoothing: (a) {args.smoothing_a:g} in all its T steps (--smoothing-a, fixed, not selected; "
        "so also the branches' first T1 steps)"
    )
    if not branches:
        return text + ".", out
    if not selecting(args):
        out.update({p: args.smoothing for p in branches}, branches_how="fixed (--smoothing), no selection")
        return (
            text + f"; {', '.join(f'({p})' for p in branches)} {args.smoothing:g} after the switch "
            "(--smoothing, fixed: no selection).",
            out,
        )
    seed = args.seed_list[0]
    heldout = heldout_path(args)
    n = sum(1 for _ in open(heldout, encoding="utf-8")) if os.path.isfile(heldout) else None
    lines = [
        "| protocol | eps | held-out R-1 | R-2 | R-L | mean (selection score) | log score | Brier | spherical "
        "| chosen |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    selection: dict[str, Any] = {}
    chosen_text = []
    for p in branches:
        sel = read_json_if(selection_path(args, p))
        rows = sel["rows"] if sel else selection_rows(args, p, seed)
        chosen = None if sel is None else sel["chosen"]
        out[p] = chosen
        selection[p] = {"grid": args.smoothing_grid, "rows": rows, "chosen": chosen, "seed": seed}
        chosen_text.append(f"({p}) {'pending' if chosen is None else f'{chosen:g}'}")
        by_eps = {r["smoothing"]: r for r in rows}
        if n is None:  # the slice is not in this work directory (a report from the archive): its size as evaluated
            n = next((r["num_examples"] for r in rows if r.get("num_examples") is not None), None)
        for eps in args.smoothing_grid:
            r = by_eps.get(eps)
            if r is None:
                lines.append(f"| {PROTOCOLS[p].label} | {eps:g} | - | - | - | - | - | - | - | pending |")
                continue
            mark = "pending" if chosen is None else ("**chosen**" if eps == chosen else "")
            lines.append(
                f"| {PROTOCOLS[p].label} | {eps:g} | {r['rouge1']:.2f} | {r['rouge2']:.2f} | {r['rougeL']:.2f} | "
                f"{r['selection_score']:.2f} | {r['score_logarithmic']:.3f} | {r['score_brier']:.4f} | "
                f"{r['score_spherical']:.4f} | {mark} |"
            )
    out.update(
        branches_how="selected on the held-out training slice",
        selection=selection,
        selection_metric=SELECTION_METRIC,
        selection_slice=heldout,
        selection_examples=n,
    )
    size = f"{n} emails" if n is not None else "not written yet"
    text += (
        f"; after the switch, smoothing chosen on the held-out training slice: {', '.join(chosen_text)}, "
        f"from {', '.join(map(_eps_name, args.smoothing_grid))} (the paper's formula), by the "
        f"{SELECTION_METRIC} ({size}: the held-out {args.heldout_fraction:g} of train.jsonl that no run trains "
        f"on, less verbatim duplicates of training emails; not dev, the split reported here), seed {seed}; "
        "ties go to the smaller eps. The chosen candidate is that seed's run; the other seeds use the choice "
        "((a) gets no such choice)."
    )
    return text + "\n\n" + "\n".join(lines), out


def report(args: argparse.Namespace, wall_seconds: float | None) -> str:
    per = collect(args)
    cmp_md, cmp = comparisons(args, per)
    controls = [(c, comparisons(args, per, baseline=c, systems=("a", *BRANCHES))) for c in CONTROLS if c in per]
    a_runs = {s: _runner.run_dir(args.work_dir, s, "a") for s in args.seed_list}
    # how much (a)'s held-out log score still moved over the last quarter of stage 1, and its best step
    plateau_md, plateau_rows = _report.plateau(a_runs, args.t1, args.t2, what="held-out", best=True)
    ckpt_md, ckpt_rows = checkpoint_rows(args)
    smoothing_md, smoothing = smoothing_report(args)
    # held-out log, Brier and spherical scores and the training loss vs step, mean over seeds
    series = []
    for p in args.protocol_list:
        runs = [r for r in (run_dir(args, s, p) for s in args.seed_list) if r is not None]
        if runs:
            series.append(_report.curve_series(PROTOCOLS[p].label, runs))
    png = draw_curves(
        series,
        os.path.join(args.work_dir, "training_curves.png"),
        title=f"AESLC email -> subject, mean over seeds {args.seeds}; dotted line: T1 = {args.t1}",
        panels=_report.CURVE_PANELS,
        mark=args.t1,
        what="held-out",
        ncols=4,
    )
    settings = next(
        (r.get("rouge_settings") for rows in per.values() for r in rows.values() if r.get("rouge_settings")), None
    )
    multi_settings = next(
        (
            r.get("rouge_multi_settings")
            for rows in per.values()
            for r in rows.values()
            if r.get("rouge_multi_settings")
        ),
        None,
    )
    trunc = next(
        (r.get("truncation_dev") for rows in per.values() for r in rows.values() if r.get("truncation_dev")), None
    )
    cut = f" Documents cut to their first {args.max_source_length} BPE tokens in training and evaluation" + (
        f" ({trunc['num_sources_cut']} of the dev documents cut)." if trunc else "."
    )
    eps = ", ".join(
        f"({p}) {'pending' if smoothing.get(p) is None else format(smoothing[p], 'g')}" for p in args.protocol_list
    )
    parts = [
        f"AESLC dev ({'ROUGE F1, rouge-score with stemming' if settings is None else settings}); beam "
        f"{args.num_beams}, at most {args.max_new_tokens} new tokens; token scores and ECE (15 bins, top-1) under "
        f"teacher forcing on dev; mean ± std over seeds. T1 = {args.t1}, T2 = {args.t2}, batch {args.batch_size}, "
        f"smoothing {eps} (below)."
        + cut
        + (
            f" Multi-reference ROUGE: {multi_settings} (the summary and the three annotations)."
            if multi_settings
            else ""
        ),
        main_table(per, args.protocol_list),
        "Beam objective: logarithmic (sum of log-probabilities) vs the spherical score, dev:",
        objective_table(per, args.protocol_list),
        f"(b), (c) against (a) with the same seed (log beam; paired bootstrap over documents, "
        f"{args.bootstrap_samples} resamples, one p per seed):",
        cmp_md,
    ]
    for c, (c_md, c_cmp) in controls:
        parts += [
            f"The control {PROTOCOLS[c].label}: (a) continued from its own step-T1 checkpoint with smoothing "
            f"{CONTROLS[c]:g}, the smoothing the branches switch to; (a), (b) and (c) against it (a gain over "
            "it is the rule's, not the change of smoothing):",
            c_md,
        ]
        cmp.update({f"vs_{c}_{k}": v for k, v in c_cmp.items()})
    for name in args.tests:
        parts += [f"--test-file {args.tests[name]} (log beam):", main_table(per, args.protocol_list, split=name)]
    parts.append(smoothing_md)
    if ckpt_md:
        parts += ["The branches' common start, (a)'s checkpoint at T1, on dev (log beam):", ckpt_md]
    if plateau_md:
        parts += ["Plateau of stage 1 (protocol a, held-out slice of train):\n\n" + plateau_md]
    md = "\n\n".join(parts)
    _report.write_report(
        args.work_dir,
        md,
        {
            "settings": vars(args),
            "per_seed": per,
            "smoothing": smoothing,
            "comparisons": cmp,
            "checkpoint_t1": ckpt_rows,
            "plateau": plateau_rows,
            "curves_png": png,
            "wall_seconds": wall_seconds,
        },
    )
    return md
