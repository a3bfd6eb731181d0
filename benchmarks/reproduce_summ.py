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
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _runner import (
    Task,
    checkpoint_steps,
    fmt_mean_std,
    mean_ci,
    paired_bootstrap_means,
    read_json,
    read_lines,
    read_log,
    run_step,
    run_tasks,
    sign_test,
    start_from_checkpoint,
)
from properlm.training import find_checkpoints

#: protocol -> (label, rule schedule as a function of (T1, T2))
PROTOCOLS: dict[str, tuple[str, Any]] = {
    "a": ("(a) log → log", lambda t1, t2: f"logarithmic:{t1 + t2}"),
    "b": ("(b) log → brier", lambda t1, t2: f"logarithmic:{t1},brier:{t2}"),
    "c": ("(c) log → spherical", lambda t1, t2: f"logarithmic:{t1},spherical:{t2}"),
}
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reproduce_summ.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data_dir", help="directory with train.jsonl and dev.jsonl (AESLC: document, summary, "
                   "annotations on dev)")
    p.add_argument("--work-dir", default="runs/reproduce_summ", help="where runs, evaluations and the summary go")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (the unit of evidence)")
    p.add_argument("--protocols", default="a,b,c",
                   help="protocols to run: " + "; ".join(f"{k} = {v[0][4:]}" for k, v in PROTOCOLS.items())
                   + "; b and c branch from a's step-T1 checkpoint and need a")
    p.add_argument("--test-file", action="append", default=[], metavar="FILE",
                   help="also decode every final model (beam, log objective) on this JSONL file (document, "
                   "summary, optional annotations) and score it; repeatable; no retraining")
    p.add_argument("--t1", type=int, default=5000,
                   help="T1: steps of the logarithmic stage before the switch (about 11.5 epochs of the 13,931 "
                   "training emails at batch 32; sized from a measured step, see benchmarks/README.md)")
    p.add_argument("--t2", type=int, default=1250, help="T2: steps after the switch (every protocol runs T1 + T2)")
    p.add_argument("--batch-size", type=int, default=32, help="emails per step")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=400, help="linear warm-up steps before inverse-sqrt decay")
    p.add_argument("--smoothing", type=float, default=0.1,
                   help="score smoothing eps of every protocol (how to choose it: see the module docstring)")
    p.add_argument("--vocab-size", type=int, default=8000, help="joint BPE vocabulary size")
    p.add_argument("--hidden-size", type=int, default=128, help="model width")
    p.add_argument("--num-layers", type=int, default=2, help="encoder and decoder layers (each)")
    p.add_argument("--num-heads", type=int, default=4, help="attention heads")
    p.add_argument("--ffn-size", type=int, default=512, help="feed-forward width")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout")
    p.add_argument("--max-source-length", type=int, default=192,
                   help="most BPE tokens of each email body (cut in training and evaluation alike); the model "
                   "takes this + 1 positions (the body and EOS), summaries are cut there too")
    p.add_argument("--heldout-fraction", type=float, default=0.035,
                   help="fraction of train.jsonl held out (the same examples for every seed) as the validation "
                   "set: the curves, the plateau and any choice of settings")
    p.add_argument("--eval-every", type=int, default=250, help="held-out scores every N steps (the curves)")
    p.add_argument("--save-every", type=int, default=500,
                   help="checkpoint every N steps (T1 must be a multiple: the branches start from it)")
    p.add_argument("--num-beams", type=int, default=4, help="beam width of every decoding")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="most tokens per decoded subject line (the training subjects: 99%% have at most 29 BPE "
                   "tokens)")
    p.add_argument("--eval-batch-size", type=int, default=50, help="documents per decoding batch")
    p.add_argument("--bootstrap-samples", type=int, default=1000, help="paired bootstrap resamples")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each step")
    p.add_argument("--jobs", type=int, default=1, help="steps run at the same time (independent runs in parallel)")
    p.add_argument("--report-only", action="store_true", help="only aggregate what has finished")
    p.add_argument("--dry-run", action="store_true", help="print the commands that would run")
    return p


def _test_name(path: str) -> str:
    stem = os.path.basename(path)
    for ext in (".jsonl", ".json"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in stem) or "test"


def check_args(args: argparse.Namespace) -> None:
    """Fail before any work on a bad argument or a missing data file."""
    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(args.data_dir, f))]
    if missing:
        raise SystemExit(f"reproduce_summ.py: data directory {args.data_dir!r} lacks {', '.join(missing)} "
                         f"(expected AESLC as JSONL: {', '.join(REQUIRED_FILES)})")
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"reproduce_summ.py: --seeds {args.seeds!r}: comma-separated integers expected") from None
    if not args.seed_list:
        raise SystemExit("reproduce_summ.py: --seeds names no seed")
    args.protocol_list = [p.strip() for p in args.protocols.split(",") if p.strip()]
    bad = [p for p in args.protocol_list if p not in PROTOCOLS]
    if bad or not args.protocol_list:
        raise SystemExit(f"reproduce_summ.py: --protocols {args.protocols!r}: allowed values are "
                         f"{', '.join(PROTOCOLS)}")
    if any(p in BRANCHES for p in args.protocol_list) and "a" not in args.protocol_list:
        raise SystemExit(f"reproduce_summ.py: protocols {', '.join(BRANCHES)} branch from a's checkpoint; include a")
    for name in ("t1", "t2", "batch_size", "eval_every", "save_every", "num_beams", "max_new_tokens",
                 "max_source_length", "eval_batch_size", "bootstrap_samples"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"reproduce_summ.py: --{name.replace('_', '-')} must be positive")
    if args.t1 % args.save_every:
        raise SystemExit(f"reproduce_summ.py: --t1 {args.t1} must be a multiple of --save-every {args.save_every}")
    if not 0.0 < args.heldout_fraction < 0.5:
        raise SystemExit(f"reproduce_summ.py: --heldout-fraction must be in (0, 0.5), got {args.heldout_fraction}")
    if not 0.0 <= args.smoothing < 1.0:
        raise SystemExit(f"reproduce_summ.py: --smoothing must be in [0, 1), got {args.smoothing}")
    if args.max_new_tokens > args.max_source_length + 1:
        raise SystemExit(f"reproduce_summ.py: --max-new-tokens {args.max_new_tokens} exceeds the model's "
                         f"{args.max_source_length + 1} positions (--max-source-length + 1)")
    args.tests = {}
    for path in args.test_file:
        if not os.path.isfile(path):
            raise SystemExit(f"reproduce_summ.py: --test-file {path!r}: no such file")
        name = _test_name(path)
        if name in ("dev", "heldout") or name in args.tests:
            raise SystemExit(f"reproduce_summ.py: --test-file {path!r}: the name {name!r} is taken; rename the file")
        args.tests[name] = os.path.abspath(path)
    args.max_length = args.max_source_length + 1


#: options whose change makes the results of a work directory incomparable
RESULT_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size", "dropout", "max_source_length",
               "heldout_fraction", "batch_size", "learning_rate", "warmup_steps", "smoothing", "save_every",
               "t1", "t2", "num_beams", "max_new_tokens", "eval_every")


def check_settings(args: argparse.Namespace) -> None:
    """Record the settings in ``WORK/settings.json``; refuse to mix settings in one work directory
    (or to report its runs under other settings)."""
    mine = {k: getattr(args, k) for k in RESULT_KEYS}
    path = os.path.join(args.work_dir, "settings.json")
    if os.path.isfile(path):
        saved = read_json(path)
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            raise SystemExit(f"reproduce_summ.py: {args.work_dir} holds runs made with other settings "
                             f"(option: (saved, now)) {diff}; use the same options or another --work-dir")
    elif not (args.dry_run or args.report_only):
        os.makedirs(args.work_dir, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(mine, f, indent=2)


def run_dir(args: argparse.Namespace, seed: int, protocol: str) -> str:
    return os.path.join(args.work_dir, f"seed{seed}", protocol)


def train_argv(args: argparse.Namespace, seed: int, protocol: str, resume: bool) -> list[str]:
    argv = [
        "train", "--init", "tiny-seq2seq", "--vocab-size", str(args.vocab_size),
        "--hidden-size", str(args.hidden_size), "--num-layers", str(args.num_layers),
        "--num-heads", str(args.num_heads), "--ffn-size", str(args.ffn_size), "--dropout", str(args.dropout),
        "--train-file", os.path.join(args.data_dir, "train.jsonl"),
        "--validation-fraction", str(args.heldout_fraction), "--validation-seed", "0",
        "--max-length", str(args.max_length), "--max-source-length", str(args.max_source_length),
        "--schedule", PROTOCOLS[protocol][1](args.t1, args.t2), "--smoothing", str(args.smoothing),
        "--seed", str(seed), "--per-device-train-batch-size", str(args.batch_size),
        "--per-device-eval-batch-size", "64",
        "--learning-rate", str(args.learning_rate), "--lr-scheduler", "inverse_sqrt",
        "--warmup-steps", str(args.warmup_steps), "--adam-beta2", "0.98",
        "--group-by-length", "--eval-steps", str(args.eval_every), "--save-steps", str(args.save_every),
        "--logging-steps", "50",
        "--output-dir", run_dir(args, seed, protocol), "--no-progress-bar", "--no-tensorboard",
    ]
    return argv + (["--resume"] if resume else [])


def prepare_run(args: argparse.Namespace, seed: int, protocol: str) -> None:
    """Before a branch's first step: start it from (a)'s step-T1 checkpoint."""
    dst = run_dir(args, seed, protocol)
    if protocol not in BRANCHES or checkpoint_steps(dst) or os.path.isfile(os.path.join(dst, "results.json")):
        return
    src = run_dir(args, seed, "a")
    if args.t1 not in checkpoint_steps(src):
        raise RuntimeError(f"{src}/checkpoint-{args.t1} is missing: protocol a must save a checkpoint at T1")
    start_from_checkpoint(src, dst, args.t1)


def eval_name(split: str, objective: str) -> str:
    return f"eval_{split}_beam_{objective}"


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
    out: list[Task] = []
    for seed in args.seed_list:
        for protocol in args.protocol_list:
            train = f"train {seed}{protocol}"
            out.append(Task(train, functools.partial(_train, args, seed, protocol),
                            {f"train {seed}a"} if protocol in BRANCHES else set()))
            run = run_dir(args, seed, protocol)
            for split, objective in evaluations(args):
                d = os.path.join(run, eval_name(split, objective))
                out.append(Task(f"eval {seed}{protocol} {split} {objective}", functools.partial(
                    run_step, f"seed {seed} {protocol} {split} beam-{objective}",
                    eval_argv(args, os.path.join(run, "final"), split_file(args, split), objective, d), d,
                    threads=args.threads, dry_run=args.dry_run), {train}))
            if protocol == "a" and any(p in BRANCHES for p in args.protocol_list):
                d = os.path.join(run, f"eval_dev_checkpoint_{args.t1}")
                out.append(Task(f"checkpoint {seed}a", functools.partial(
                    run_step, f"seed {seed} (a) checkpoint-{args.t1} dev beam-logarithmic",
                    eval_argv(args, os.path.join(run, f"checkpoint-{args.t1}"), split_file(args, "dev"),
                              "logarithmic", d), d, threads=args.threads, dry_run=args.dry_run), {train}))
    return out


def _train(args: argparse.Namespace, seed: int, protocol: str) -> None:
    out = run_dir(args, seed, protocol)
    if not args.dry_run:
        prepare_run(args, seed, protocol)
    resume = bool(find_checkpoints(out))
    run_step(f"seed {seed} {PROTOCOLS[protocol][0]} train", train_argv(args, seed, protocol, resume), out,
             threads=args.threads, dry_run=args.dry_run)


# ------------------------------------------------------------------------------ the report


def _eval(args: argparse.Namespace, seed: int, protocol: str, split: str, objective: str) -> dict[str, Any] | None:
    path = os.path.join(run_dir(args, seed, protocol), eval_name(split, objective), "results.json")
    return read_json(path) if os.path.isfile(path) else None


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


def _values(per: dict[str, dict[int, dict[str, Any]]], protocol: str, key: str) -> list[float]:
    return [r[key] for r in per.get(protocol, {}).values() if r.get(key) is not None]


def main_table(per: dict[str, Any], protocols: list[str], split: str = "dev") -> str:
    cols = [(f"{ROUGE_LABELS[k]}", f"{k}_{split}_logarithmic", 2, 1) for k in ROUGE]
    if any(_values(per, p, f"rouge1_multi_{split}_logarithmic") for p in protocols):
        cols += [(f"{ROUGE_LABELS[k]} multi", f"{k}_multi_{split}_logarithmic", 2, 1) for k in ROUGE]
    cols += [("log score", f"score_logarithmic_{split}", 3, 1), ("Brier", f"score_brier_{split}", 4, 1),
             ("spherical", f"score_spherical_{split}", 4, 1), ("ECE (%)", f"ece_{split}", 2, 100)]
    lines = ["| protocol | seeds | " + " | ".join(c[0] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for p in protocols:
        n = len(_values(per, p, f"rouge1_{split}_logarithmic"))
        cells = [fmt_mean_std(_values(per, p, key), digits, scale) for _, key, digits, scale in cols]
        lines.append(f"| {PROTOCOLS[p][0]} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def objective_table(per: dict[str, Any], protocols: list[str]) -> str:
    keys = [(f"{ROUGE_LABELS[k]}{m} ({o[:3]} beam)", f"{k}{m}_dev_{o}") for k in ("rouge1", "rougeL")
            for m in ("", "_multi") for o in OBJECTIVES]
    lines = ["| protocol | " + " | ".join(k[0].replace("_multi", " multi") for k in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for p in protocols:
        lines.append(f"| {PROTOCOLS[p][0]} | " + " | ".join(fmt_mean_std(_values(per, p, k)) for _, k in keys) + " |")
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
            hyps = read_lines(os.path.join(run_dir(args, seed, protocol), eval_name(split, "logarithmic"),
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
                    seeds = [s for s in args.seed_list if per[p].get(s, {}).get(key) is not None
                             and per["a"].get(s, {}).get(key) is not None]
                    if not seeds:
                        continue
                    deltas = [per[p][s][key] - per["a"][s][key] for s in seeds]
                    boots = []
                    for s in seeds:
                        refs = multi_refs if multi else single_refs
                        base = doc_scores(s, "a", split, refs, multi)[metric]
                        system = doc_scores(s, p, split, refs, multi)[metric]
                        b = paired_bootstrap_means(base, system, n_samples=args.bootstrap_samples, seed=s)
                        boots.append({"p": b["p"], "delta": 100 * b["delta"], "ci95": [100 * v for v in b["ci95"]]})
                    m, lo, hi = mean_ci(deltas)
                    better, p_sign = sum(d > 0 for d in deltas), sign_test(deltas)
                    out[f"{p}_{split}_{name}"] = {"seeds": seeds, "delta": deltas, "mean_delta": m, "ci95": [lo, hi],
                                                  "sign_test_p": p_sign, "bootstrap": boots}
                    label = ROUGE_LABELS[metric] + (" multi" if multi else "")
                    per_seed = ", ".join(f"{d:+.2f}" for d in deltas)
                    boot_p = ", ".join(f"{b['p']:.3f}" for b in boots)
                    lines.append(f"| {PROTOCOLS[p][0]} | {split} | {label} | {per_seed} | {_ci(m, lo, hi)} | "
                                 f"{better}/{len(seeds)} | {p_sign:.3f} | {boot_p} |")
    return "\n".join(lines), out


def _ci(m: float, lo: float, hi: float) -> str:
    return f"{m:+.2f}" if lo != lo else f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def checkpoint_rows(args: argparse.Namespace) -> tuple[str, dict[int, dict[str, Any]]]:
    """(a)'s step-T1 checkpoint on dev: where (b) and (c) start."""
    rows: dict[int, dict[str, Any]] = {}
    for s in args.seed_list:
        path = os.path.join(run_dir(args, s, "a"), f"eval_dev_checkpoint_{args.t1}", "results.json")
        if os.path.isfile(path):
            ev = read_json(path)
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


def plateau(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """How much (a)'s held-out log score still moved over the last quarter of stage 1, and its best step."""
    rows, lines = {}, []
    for s in args.seed_list:
        log = [r for r in read_log(os.path.join(run_dir(args, s, "a"), "metrics.jsonl"))
               if "eval_score_logarithmic" in r]
        by_step = {r["step"]: r["eval_score_logarithmic"] for r in log}
        early = max((st for st in by_step if st <= 0.75 * args.t1), default=None)
        if early is None or args.t1 not in by_step:
            continue
        best = max(by_step, key=lambda st: by_step[st])
        rows[s] = {"step_early": early, "early": by_step[early], "t1": by_step[args.t1],
                   "end": by_step.get(args.t1 + args.t2), "best_step": best, "best": by_step[best]}
        lines.append(f"seed {s}: held-out log score {by_step[early]:.4f} at step {early}, {by_step[args.t1]:.4f} at "
                     f"T1={args.t1}" + (f", {by_step[args.t1 + args.t2]:.4f} at T={args.t1 + args.t2}"
                                       if args.t1 + args.t2 in by_step else "")
                     + f"; best {by_step[best]:.4f} at step {best}")
    return "\n".join(lines), rows


def plot_curves(args: argparse.Namespace, path: str) -> str | None:
    """Held-out log, Brier and spherical scores and the training loss vs step, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("eval_score_logarithmic", "held-out log score"), ("eval_score_brier", "held-out Brier score"),
              ("eval_score_spherical", "held-out spherical score"), ("loss", "training loss")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    drawn = False
    for p in args.protocol_list:
        logs = [read_log(os.path.join(run_dir(args, s, p), "metrics.jsonl")) for s in args.seed_list]
        for ax, (key, title) in zip(axes, panels):
            by_step: dict[int, list[float]] = {}
            for log in logs:
                for r in log:
                    if key in r and r[key] is not None:
                        by_step.setdefault(r["step"], []).append(r[key])
            if not by_step:
                continue
            steps = sorted(by_step)
            ax.plot(steps, [sum(by_step[t]) / len(by_step[t]) for t in steps], label=PROTOCOLS[p][0])
            ax.set_title(title)
            ax.set_xlabel("step")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for ax in axes:
        ax.axvline(args.t1, color="grey", linewidth=0.8, linestyle=":")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"AESLC email -> subject, mean over seeds {args.seeds}; dotted line: T1 = {args.t1}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(args: argparse.Namespace, wall_seconds: float | None) -> str:
    per = collect(args)
    cmp_md, cmp = comparisons(args, per)
    plateau_md, plateau_rows = plateau(args)
    ckpt_md, ckpt_rows = checkpoint_rows(args)
    png = plot_curves(args, os.path.join(args.work_dir, "training_curves.png"))
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
    os.makedirs(args.work_dir, exist_ok=True)
    with open(os.path.join(args.work_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(md + "\n")
    with open(os.path.join(args.work_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"settings": vars(args), "per_seed": per, "comparisons": cmp, "checkpoint_t1": ckpt_rows,
                   "plateau": plateau_rows, "curves_png": png, "wall_seconds": wall_seconds}, f, indent=2,
                  default=str)
    return md


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    started = time.time()
    check_settings(args)
    if not args.report_only:
        run_tasks(tasks(args), jobs=args.jobs)
    if args.dry_run:
        return 0
    md = report(args, None if args.report_only else time.time() - started)
    print(md)
    if not args.report_only:
        print(f"\nwall time of this invocation: {(time.time() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
