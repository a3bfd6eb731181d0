"""Reproduce the paper's fine-tuning finding on abstractive summarisation: AESLC, email body -> subject line.

Shao et al. (ICML 2024) report that fine-tuning a converged logarithmic model with the Brier or
spherical score improves generation; reproduce_mt.py tests that on Multi30k translation, this
script on summarisation, with ``properlm train`` / ``properlm evaluate``. Protocols, all with the
same score smoothing (``--smoothing``) and the same total number of steps T = T1 + T2::

    (a) logarithmic for T     (b) logarithmic for T1, then Brier for T2     (c) ... then spherical for T2

(b) and (c) branch from the step-T1 checkpoint of (a) (weights, optimizer, learning-rate schedule,
data order), so the three share their first T1 steps exactly and differ only in the loss afterwards.

Model: a Transformer encoder-decoder trained from scratch (``--init tiny-seq2seq``, Marian
architecture) with a joint byte-level BPE vocabulary trained on the training emails; dropout,
linear warm-up then inverse-sqrt decay, AdamW(0.9, 0.98). Each document is cut to its first
``--max-source-length`` BPE tokens in training and evaluation alike (``properlm train
--max-source-length``, recorded with the model; ``evaluate`` states it).

Data and model selection: ``DATA_DIR/train.jsonl`` and ``dev.jsonl`` (``document``, ``summary``;
dev rows carry ``annotations``, three more subject lines). A fixed slice of train (``--heldout-
fraction``, the same examples for every seed: ``--validation-seed 0``) is held out as the
validation set of every run: the curves, the plateau of (a) and any choice of settings look at it
only. Every final model is then decoded with beam search on dev (ROUGE-1/2/L F1, rouge-score with
stemming, against ``summary`` and multi-reference: per document the best F1 over ``summary`` and
the annotations, then the mean) and scored under teacher forcing on dev (every rule's token score,
ECE); (a)-(c) are also decoded with the spherical score as the beam objective, and (a)'s step-T1
checkpoint (the branches' common start) is decoded too. ``--test-file FILE`` (repeatable) scores
every final model on further JSONL files of the same format, without retraining.

Statistics: per seed, a paired bootstrap over documents of each ROUGE of (b), (c) against (a)
(``_runner.paired_bootstrap_means``); across seeds (the unit of evidence) the mean difference with
its 95% Student-t interval and a two-sided sign test.

Smoothing: ``--smoothing EPS`` applies to every protocol. To choose it, run one seed per candidate
into its own work directory (``--seeds 1 --smoothing 0 --work-dir runs/summ_eps0`` and so on) and
compare the held-out curves (``training_curves.png``: held-out log/Brier/spherical scores of (b), (c))
and dev ROUGE; dev is the only split this task may select on (AESLC's test split is not provided).

Everything lives under ``--work-dir``: one ``properlm train`` directory per seed and protocol
(checkpoints, metrics.jsonl, results.json, final/) with ``eval_*`` sub-directories, and the summary
``results.json``, ``results.md`` and ``training_curves.png``. A step whose ``results.json`` exists is
skipped, so rerunning the same command after a kill resumes (an interrupted training run continues
from its newest checkpoint); the final models stay, so ``--test-file`` can be added later.

Usage::

    python benchmarks/reproduce_summ.py ../shared/data/aeslc --work-dir runs/reproduce_summ --jobs 2
    python benchmarks/reproduce_summ.py ../shared/data/aeslc --work-dir runs/reproduce_summ --report-only
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _runner
from _runner import Task, eval_name, fmt_ci, fmt_mean_std, read_json_if, seed_values

PROG = "reproduce_summ.py"

#: protocol -> (label, rule schedule as a function of (T1, T2))
PROTOCOLS: dict[str, tuple[str, Any]] = dict(_runner.PAPER_PROTOCOLS)
#: protocols that branch from (a)'s step-T1 checkpoint
BRANCHES = ("b", "c")
#: teacher-forced token scores reported for every model
RULES = ("logarithmic", "brier", "spherical")
#: beam objectives every final model is decoded with on dev
OBJECTIVES = ("logarithmic", "spherical")
#: the generation metrics (ROUGE F1 in percent), single- and multi-reference
ROUGE = ("rouge1", "rouge2", "rougeL")
ROUGE_LABELS = {"rouge1": "R-1", "rouge2": "R-2", "rougeL": "R-L"}
REQUIRED_FILES = ("train.jsonl", "dev.jsonl")
LABELS = {k: v[0] for k, v in PROTOCOLS.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data_dir", help="directory with train.jsonl and dev.jsonl (AESLC: document, summary, "
                   "annotations on dev)")
    _runner.add_options(p, {"work_dir": "runs/reproduce_summ"})
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (the unit of evidence)")
    p.add_argument("--protocols", default="a,b,c",
                   help=_runner.protocols_help(PROTOCOLS, "b and c"))
    p.add_argument("--test-file", action="append", default=[], metavar="FILE",
                   help="also decode every final model (beam, log objective) on this JSONL file (document, "
                   "summary, optional annotations) and score it; repeatable; no retraining")
    _runner.add_options(p, {
        "t1": {"default": 5000, "help": "T1: steps of the logarithmic stage before the switch (about 11.5 epochs of "
               "the 13,931 training emails at batch 32; sized from a measured step, see benchmarks/README.md)"},
        "t2": 1250, "batch_size": {"default": 32, "help": "emails per step"}, "learning_rate": 1e-3,
        "warmup_steps": 400,
        "smoothing": {"help": "score smoothing eps of every protocol (how to choose it: see the module docstring)"},
        "vocab_size": 8000, "hidden_size": {}, "num_layers": {}, "num_heads": {}, "ffn_size": {}, "dropout": {}})
    p.add_argument("--max-source-length", type=int, default=192,
                   help="most BPE tokens of each email body (cut in training and evaluation alike); the model "
                   "takes this + 1 positions (the body and EOS), summaries are cut there too")
    p.add_argument("--heldout-fraction", type=float, default=0.035,
                   help="fraction of train.jsonl held out (the same examples for every seed) as the validation "
                   "set: the curves, the plateau and any choice of settings")
    _runner.add_options(p, {"eval_every": {"help": "held-out scores every N steps (the curves)"}, "save_every": {},
                    "num_beams": 4})
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="most tokens per decoded subject line (the training subjects: 99%% have at most 29 BPE "
                   "tokens)")
    _runner.add_options(p, {"eval_batch_size": {"help": "documents per decoding batch"}, "bootstrap_samples": {},
                    "threads": {}, "jobs": {}, "report_only": {}, "dry_run": {}})
    return p


def _test_name(path: str) -> str:
    stem = os.path.basename(path)
    for ext in (".jsonl", ".json"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in stem) or "test"


def check_args(args: argparse.Namespace) -> None:
    """Fail before any work on a bad argument or a missing data file."""
    _runner.check_data_dir(PROG, args.data_dir, REQUIRED_FILES, "AESLC as JSONL")
    try:
        args.seed_list = _runner.int_list(args.seeds)
    except ValueError:
        raise SystemExit(f"{PROG}: --seeds {args.seeds!r}: comma-separated integers expected") from None
    if not args.seed_list:
        raise SystemExit(f"{PROG}: --seeds names no seed")
    args.protocol_list = _runner.parse_protocols(PROG, args.protocols, list(PROTOCOLS), BRANCHES)
    _runner.check_stages(PROG, args, ("t1", "t2", "batch_size", "eval_every", "save_every", "num_beams",
                                      "max_new_tokens", "max_source_length", "eval_batch_size", "bootstrap_samples"))
    if not 0.0 < args.heldout_fraction < 0.5:
        raise SystemExit(f"{PROG}: --heldout-fraction must be in (0, 0.5), got {args.heldout_fraction}")
    if not 0.0 <= args.smoothing < 1.0:
        raise SystemExit(f"{PROG}: --smoothing must be in [0, 1), got {args.smoothing}")
    if args.max_new_tokens > args.max_source_length + 1:
        raise SystemExit(f"{PROG}: --max-new-tokens {args.max_new_tokens} exceeds the model's "
                         f"{args.max_source_length + 1} positions (--max-source-length + 1)")
    args.tests = {}
    for path in args.test_file:
        if not os.path.isfile(path):
            raise SystemExit(f"{PROG}: --test-file {path!r}: no such file")
        name = _test_name(path)
        if name in ("dev", "heldout") or name in args.tests:
            raise SystemExit(f"{PROG}: --test-file {path!r}: the name {name!r} is taken; rename the file")
        args.tests[name] = os.path.abspath(path)
    args.max_length = args.max_source_length + 1


#: options whose change makes the results of a work directory incomparable
RESULT_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size", "dropout", "max_source_length",
               "heldout_fraction", "batch_size", "learning_rate", "warmup_steps", "smoothing", "save_every",
               "t1", "t2", "num_beams", "max_new_tokens", "eval_every")


def check_settings(args: argparse.Namespace) -> None:
    """Record the settings in ``WORK/settings.json``; refuse to mix settings in one work directory
    (or to report its runs under other settings)."""
    _runner.check_settings(PROG, args.work_dir, {k: getattr(args, k) for k in RESULT_KEYS},
                           record=not (args.dry_run or args.report_only))


def run_dir(args: argparse.Namespace, seed: int, protocol: str) -> str:
    return _runner.run_dir(args.work_dir, seed, protocol)


def train_argv(args: argparse.Namespace, seed: int, protocol: str, resume: bool) -> list[str]:
    data = ["--train-file", os.path.join(args.data_dir, "train.jsonl"),
            "--validation-fraction", str(args.heldout_fraction), "--validation-seed", "0",
            "--max-length", str(args.max_length), "--max-source-length", str(args.max_source_length)]
    return _runner.seq2seq_train_argv(args, seed, PROTOCOLS[protocol][1](args.t1, args.t2), data,
                                      run_dir(args, seed, protocol), eval_batch_size=64, resume=resume)


def prepare_run(args: argparse.Namespace, seed: int, protocol: str) -> None:
    """Before a branch's first step: start it from (a)'s step-T1 checkpoint."""
    dst = run_dir(args, seed, protocol)
    if protocol in BRANCHES and not _runner.started(dst):
        _runner.branch_from(run_dir(args, seed, "a"), dst, args.t1)


def split_file(args: argparse.Namespace, split: str) -> str:
    return os.path.join(args.data_dir, "dev.jsonl") if split == "dev" else args.tests[split]


def eval_argv(args: argparse.Namespace, model: str, data_file: str, objective: str, out: str) -> list[str]:
    """``properlm evaluate``: teacher-forced scores of every rule and ECE, then beam search with
    ``objective`` and ROUGE (the truncation is the training run's, read from the model directory)."""
    return ["evaluate", "--model", model, "--data-file", data_file, "--rules", ",".join(RULES),
            "--num-beams", str(args.num_beams), "--objective", objective,
            "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.eval_batch_size),
            "--output-dir", out, "--no-progress"]


def evaluations(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(split, beam objective) pairs every final model is decoded with."""
    return [("dev", o) for o in OBJECTIVES] + [(name, "logarithmic") for name in args.tests]


def tasks(args: argparse.Namespace) -> list[Task]:
    """Every training and evaluation step, in priority order: seed by seed, (a) first (the branches
    wait for it), each evaluation after its training."""
    plan = _runner.Plan(args.threads, args.dry_run)
    for seed in args.seed_list:
        for protocol in args.protocol_list:
            run = run_dir(args, seed, protocol)
            train = plan.train(f"train {seed}{protocol}", f"seed {seed} {PROTOCOLS[protocol][0]} train", run,
                               functools.partial(train_argv, args, seed, protocol),
                               functools.partial(prepare_run, args, seed, protocol),
                               {f"train {seed}a"} if protocol in BRANCHES else ())
            for split, objective in evaluations(args):
                d = os.path.join(run, eval_name(split, objective))
                plan.step(f"eval {seed}{protocol} {split} {objective}",
                          f"seed {seed} {protocol} {split} beam-{objective}",
                          eval_argv(args, os.path.join(run, "final"), split_file(args, split), objective, d), d,
                          {train})
            if protocol == "a" and any(p in BRANCHES for p in args.protocol_list):
                d = os.path.join(run, f"eval_dev_checkpoint_{args.t1}")
                plan.step(f"checkpoint {seed}a", f"seed {seed} (a) checkpoint-{args.t1} dev beam-logarithmic",
                          eval_argv(args, os.path.join(run, f"checkpoint-{args.t1}"), split_file(args, "dev"),
                                    "logarithmic", d), d, {train})
    return plan.tasks


# ------------------------------------------------------------------------------ the report


def _eval(args: argparse.Namespace, seed: int, protocol: str, split: str, objective: str) -> dict[str, Any] | None:
    return read_json_if(os.path.join(run_dir(args, seed, protocol), eval_name(split, objective), "results.json"))


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
                per.setdefault(protocol, {})[seed] = row
    return per


def main_table(per: dict[str, Any], protocols: list[str], split: str = "dev") -> str:
    cols = [(f"{ROUGE_LABELS[k]}", f"{k}_{split}_logarithmic", 2, 1) for k in ROUGE]
    if any(seed_values(per, p, f"rouge1_multi_{split}_logarithmic") for p in protocols):
        cols += [(f"{ROUGE_LABELS[k]} multi", f"{k}_multi_{split}_logarithmic", 2, 1) for k in ROUGE]
    cols += [("log score", f"score_logarithmic_{split}", 3, 1), ("Brier", f"score_brier_{split}", 4, 1),
             ("spherical", f"score_spherical_{split}", 4, 1), ("ECE (%)", f"ece_{split}", 2, 100)]
    return _runner.seed_table(per, protocols, LABELS, cols, count_key=f"rouge1_{split}_logarithmic")


def objective_table(per: dict[str, Any], protocols: list[str]) -> str:
    keys = [(f"{ROUGE_LABELS[k]}{m} ({o[:3]} beam)", f"{k}{m}_dev_{o}") for k in ("rouge1", "rougeL")
            for m in ("", "_multi") for o in OBJECTIVES]
    lines = ["| protocol | " + " | ".join(k[0].replace("_multi", " multi") for k in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for p in protocols:
        cells = [fmt_mean_std(seed_values(per, p, k)) for _, k in keys]
        lines.append(f"| {PROTOCOLS[p][0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _references(path: str, multi: bool) -> list[Any]:
    from properlm.data import load_examples

    examples = load_examples(path, task="summarization")
    return [list(e.references) if multi else e.target for e in examples]


def comparisons(args: argparse.Namespace, per: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(b), (c) against (a) of the same seed, per split and ROUGE variant: the seed-level mean
    difference with its 95% Student-t interval and sign test, and the per-seed paired bootstrap
    over documents (p and the document-resampled interval of the difference)."""
    from properlm.generation_eval import rouge_per_example

    out: dict[str, Any] = {}
    lines = ["| vs (a) | split | ROUGE | Δ per seed | mean Δ [95% CI over seeds] | seeds better | sign test p | "
             "bootstrap p per seed |", "|---|---|---|---|---|---|---|---|"]
    splits = ["dev", *args.tests]
    cache: dict[tuple[int, str, str, bool], dict[str, list[float]]] = {}

    def doc_scores(seed: int, protocol: str, split: str, refs: list[Any], multi: bool) -> dict[str, list[float]]:
        key = (seed, protocol, split, multi)
        if key not in cache:
            hyps = _runner.read_lines(os.path.join(run_dir(args, seed, protocol), eval_name(split, "logarithmic"),
                                           "hypotheses.txt"))
            cache[key] = rouge_per_example(hyps, refs)
        return cache[key]

    for split in splits:
        single_refs = _references(split_file(args, split), multi=False)
        multi_refs = _references(split_file(args, split), multi=True)
        variants = [False] + ([True] if any(len(r) > 1 for r in multi_refs) else [])
        for p in BRANCHES:
            if p not in per or "a" not in per:
                continue
            for multi in variants:
                for metric in ROUGE:
                    name = metric + ("_multi" if multi else "")
                    key = f"{name}_{split}_logarithmic"
                    seeds, deltas = _runner.seed_differences(per, p, key, args.seed_list)
                    if not seeds:
                        continue
                    boots = []
                    for s in seeds:
                        refs = multi_refs if multi else single_refs
                        base = doc_scores(s, "a", split, refs, multi)[metric]
                        system = doc_scores(s, p, split, refs, multi)[metric]
                        b = _runner.paired_bootstrap_means(base, system, n_samples=args.bootstrap_samples, seed=s)
                        boots.append({"p": b["p"], "delta": 100 * b["delta"], "ci95": [100 * v for v in b["ci95"]]})
                    m, lo, hi = _runner.mean_ci(deltas)
                    better, p_sign = sum(d > 0 for d in deltas), _runner.sign_test(deltas)
                    out[f"{p}_{split}_{name}"] = {"seeds": seeds, "delta": deltas, "mean_delta": m, "ci95": [lo, hi],
                                                  "sign_test_p": p_sign, "bootstrap": boots}
                    label = ROUGE_LABELS[metric] + (" multi" if multi else "")
                    per_seed = ", ".join(f"{d:+.2f}" for d in deltas)
                    boot_p = ", ".join(f"{b['p']:.3f}" for b in boots)
                    lines.append(f"| {PROTOCOLS[p][0]} | {split} | {label} | {per_seed} | {fmt_ci(m, lo, hi)} | "
                                 f"{better}/{len(seeds)} | {p_sign:.3f} | {boot_p} |")
    return "\n".join(lines), out


def checkpoint_rows(args: argparse.Namespace) -> tuple[str, dict[int, dict[str, Any]]]:
    """(a)'s step-T1 checkpoint on dev: where (b) and (c) start."""
    rows: dict[int, dict[str, Any]] = {}
    for s in args.seed_list:
        ev = read_json_if(os.path.join(run_dir(args, s, "a"), f"eval_dev_checkpoint_{args.t1}", "results.json"))
        if ev is not None:
            rows[s] = {k: ev["generation"].get(k) for k in (*ROUGE, *(f"{k}_multi" for k in ROUGE))}
            rows[s]["score_logarithmic"] = ev["teacher_forced"]["mean_scores"].get("logarithmic")
    if not rows:
        return "", rows
    keys = [k for k in ("rouge1", "rougeL", "rouge1_multi", "rougeL_multi", "score_logarithmic")
            if any(r.get(k) is not None for r in rows.values())]
    lines = ["| model | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys),
             f"| (a) at T1 = {args.t1} | {len(rows)} | "
             + " | ".join(fmt_mean_std([r[k] for r in rows.values() if r.get(k) is not None],
                                       3 if k.startswith("score") else 2) for k in keys) + " |"]
    return "\n".join(lines), rows


def report(args: argparse.Namespace, wall_seconds: float | None) -> str:
    per = collect(args)
    cmp_md, cmp = comparisons(args, per)
    # how much (a)'s held-out log score still moved over the last quarter of stage 1, and its best step
    plateau_md, plateau_rows = _runner.plateau({s: run_dir(args, s, "a") for s in args.seed_list}, args.t1, args.t2,
                                               what="held-out", best=True)
    ckpt_md, ckpt_rows = checkpoint_rows(args)
    # held-out log, Brier and spherical scores and the training loss vs step, mean over seeds
    png = _runner.plot_curves(os.path.join(args.work_dir, "training_curves.png"),
                              [(PROTOCOLS[p][0], [run_dir(args, s, p) for s in args.seed_list], {})
                               for p in args.protocol_list],
                              args.t1, f"AESLC email -> subject, mean over seeds {args.seeds}; dotted line: T1 = "
                              f"{args.t1}", what="held-out")
    settings = next((r.get("rouge_settings") for rows in per.values() for r in rows.values()
                     if r.get("rouge_settings")), None)
    multi_settings = next((r.get("rouge_multi_settings") for rows in per.values() for r in rows.values()
                           if r.get("rouge_multi_settings")), None)
    trunc = next((r.get("truncation_dev") for rows in per.values() for r in rows.values()
                  if r.get("truncation_dev")), None)
    cut = (f" Documents cut to their first {args.max_source_length} BPE tokens in training and evaluation"
           + (f" ({trunc['num_sources_cut']} of the dev documents cut)." if trunc else "."))
    parts = [
        f"AESLC dev ({'ROUGE F1, rouge-score with stemming' if settings is None else settings}); beam "
        f"{args.num_beams}, at most {args.max_new_tokens} new tokens; token scores and ECE (15 bins, top-1) under "
        f"teacher forcing on dev; mean ± std over seeds. T1 = {args.t1}, T2 = {args.t2}, batch {args.batch_size}, "
        f"smoothing {args.smoothing}." + cut
        + (f" Multi-reference ROUGE: {multi_settings} (the summary and the three annotations)."
           if multi_settings else ""),
        main_table(per, args.protocol_list),
        "Beam objective: logarithmic (sum of log-probabilities) vs the spherical score, dev:",
        objective_table(per, args.protocol_list),
        f"(b), (c) against (a) with the same seed (log beam; paired bootstrap over documents, "
        f"{args.bootstrap_samples} resamples, one p per seed):",
        cmp_md,
    ]
    for name in args.tests:
        parts += [f"--test-file {args.tests[name]} (log beam):", main_table(per, args.protocol_list, split=name)]
    if ckpt_md:
        parts += ["The branches' common start, (a)'s checkpoint at T1, on dev (log beam):", ckpt_md]
    if plateau_md:
        parts += ["Plateau of stage 1 (protocol a, held-out slice of train):\n\n" + plateau_md]
    md = "\n\n".join(parts)
    _runner.write_report(args.work_dir, md, {
        "settings": vars(args), "per_seed": per, "comparisons": cmp, "checkpoint_t1": ckpt_rows,
        "plateau": plateau_rows, "curves_png": png, "wall_seconds": wall_seconds})
    return md


def main(argv: list[str] | None = None) -> int:
    return _runner.run_benchmark(build_parser().parse_args(argv), check_args, check_settings, tasks, report)


if __name__ == "__main__":
    sys.exit(main())
