"""Reproduce the paper's translation findings at small scale: Multi30k English->German.

Shao et al. (ICML 2024) claim that (1) trained from scratch, the Brier and spherical scores do
worse than the logarithmic score, but (2) fine-tuning a converged logarithmic model with Brier or
spherical improves BLEU, and (3) switching to a different rule beats continuing with the same one.
This script tests that with ``properlm train`` / ``properlm evaluate``.

Protocols, all with score smoothing 0.1 and the same total number of steps T = T1 + T2::

    (a) logarithmic for T                     (b) logarithmic for T1, then Brier for T2
    (c) logarithmic for T1, then spherical    (d) Brier for T            (e) spherical for T

and beyond the paper (issue 17), switching at T1 to the alpha families or a mixture::

    (f) power:1.5   (g) power:3   (h) pseudo-spherical:1.5   (i) pseudo-spherical:3
    (j) 0.5*logarithmic+0.5*spherical          (k) that mixture from scratch for T

The default run is (a), (b), (c) for seeds 1-6 (the seed, a whole stage-1 run, is the unit of
evidence: per split the mean difference to (a) with a 95% Student-t interval across seeds and a
sign test, beside the per-seed paired bootstrap) and (f)-(j) for seeds 1-3 (``--arm-seeds``);
(d), (e), (k) run when named in ``--protocols``. Every final model and (a)'s step-T1 checkpoint
is also scored under every rule on val, and Kendall's tau between val BLEU and each score says
which score predicts generation quality. ``--extra-test NAME=SRC,REF`` decodes every final model
on further test sets (the project's held-out ones) without retraining.

What a seed controls: the model's initialisation, the dropout masks and the data order (batches
of similar length in an order drawn from ``seed + epoch``, so that a run resumed after a kill,
in any epoch, sees exactly the batches of an uninterrupted run). The BPE vocabulary does not
depend on it. Each run uses one thread (``--threads``); see RESULTS.md for thread-count effects.

(b) and (c) branch from the step-T1 checkpoint of (a): its weights, optimizer state, learning-rate
schedule and data order; the rule switches at step T1 (``--schedule logarithmic:T1,brier:T2``).
So (a), (b) and (c) share their first T1 steps exactly and differ only in the loss afterwards.

Model: a Transformer encoder-decoder (``--init tiny-seq2seq``, Marian architecture) with a joint
BPE vocabulary trained on the training pairs; dropout 0.1, linear warm-up then inverse-sqrt decay
(the paper's schedule); AdamW(0.9, 0.98). Each final model is decoded with beam 5 on ``val`` and
``test_2016_flickr`` (BLEU and chrF by sacrebleu) and scored under teacher forcing on
``test_2016_flickr`` (every rule's token score, ECE); (a), (b), (c) are also decoded with the
spherical score as the beam objective. ``val`` is the only set looked at while choosing settings.

Everything lives under ``--work-dir``: one directory per seed and protocol (``properlm train``
output: checkpoints, metrics.jsonl, results.json, final/) with ``eval_*`` sub-directories, and
the summary ``results.json``, ``results.md`` and ``training_curves.png``. A step whose
``results.json`` exists is skipped, so rerunning the same command after a kill resumes (an
interrupted training run continues from its newest checkpoint).

The defaults (T1 = 10,000, T2 = 2,500: stage 1 at its validation plateau) are the configuration
of the published results; ``--t1 3000 --t2 1000`` is the before-the-plateau contrast study.

Cost (this 2-core machine, --jobs 2, 0.29 s per step and run when nothing else runs): the
default needs 142,500 training steps (about 5.7 h) and 90 beam decodings of about 1,000 sentences
(about 2.5 h): about 8 h in all, over several sessions.

Usage::

    python benchmarks/reproduce_mt.py ../shared/data/multi30k --work-dir runs/reproduce_mt --jobs 2
    python benchmarks/reproduce_mt.py ../shared/data/multi30k --work-dir runs/reproduce_mt --report-only
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import _options
import _report
import _runner
import _seq2seq
import _stats
from _runner import RESUME_IF_CHECKPOINT, Arg, Branch, FromJson, Step, eval_name, read_json, read_json_if, read_lines
from _seq2seq import Protocol
from _stats import fmt_ci, fmt_mean_std
from properlm.evaluation.curves import plot_curves as draw_curves

PROG = "reproduce_mt.py"

MIXTURE = "0.5*logarithmic+0.5*spherical"
#: protocol -> its label and rules (:class:`_seq2seq.Protocol`)
PROTOCOLS: dict[str, Protocol] = {
    **_seq2seq.PAPER_PROTOCOLS,
    "d": Protocol("(d) brier from scratch", "brier"),
    "e": Protocol("(e) spherical from scratch", "spherical"),
    # beyond the paper: the alpha families and a mixture as the rule switched to (issue 17)
    "f": Protocol("(f) log → power:1.5", "logarithmic", "power:1.5"),
    "g": Protocol("(g) log → power:3", "logarithmic", "power:3"),
    "h": Protocol("(h) log → pseudo-spherical:1.5", "logarithmic", "pseudo-spherical:1.5"),
    "i": Protocol("(i) log → pseudo-spherical:3", "logarithmic", "pseudo-spherical:3"),
    "j": Protocol("(j) log → ½ log + ½ spherical", "logarithmic", MIXTURE),
    "k": Protocol("(k) ½ log + ½ spherical from scratch", MIXTURE),
}
#: protocols that branch from (a)'s step-T1 checkpoint
BRANCHES = ("b", "c", "f", "g", "h", "i", "j")
#: the paper's fine-tuning question, run for every seed of --seeds; the other protocols run for --arm-seeds
CORE = ("a", "b", "c")
#: teacher-forced token scores reported for every model (and correlated with BLEU)
SCORE_RULES = (
    "logarithmic",
    "brier",
    "spherical",
    "power:1.5",
    "power:3",
    "pseudo-spherical:1.5",
    "pseudo-spherical:3",
    MIXTURE,
)
#: the evaluation sets: name -> file stem in the data directory
SPLITS = {"val": "val", "test": "test_2016_flickr"}
REQUIRED_FILES = [f"{stem}.{lang}" for stem in ("train", *SPLITS.values()) for lang in ("en", "de")]
RULES = ("logarithmic", "brier", "spherical")
LABELS = {k: v.label for k, v in PROTOCOLS.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=_options.HelpFormatter)
    p.add_argument("data_dir", help="directory with train, val and test_2016_flickr .en/.de (Multi30k task 1, raw)")
    _options.add_options(p, {"work_dir": "runs/reproduce_mt"})
    p.add_argument(
        "--seeds",
        default="1,2,3,4,5,6",
        help="comma-separated seeds of the paper's protocols a, b, c (the unit of evidence)",
    )
    p.add_argument(
        "--arm-seeds",
        default="1,2,3",
        help="seeds of the other protocols (d-k), a subset of --seeds for the branches f-j",
    )
    p.add_argument(
        "--protocols", default="a,b,c,f,g,h,i,j", help=_seq2seq.protocols_help(PROTOCOLS, ", ".join(BRANCHES))
    )
    p.add_argument(
        "--extra-test",
        action="append",
        default=[],
        metavar="NAME=SOURCE_FILE,REFERENCE_FILE",
        help="also decode every final model (beam, log objective) on this English source file and "
        "score it against the German references (repeatable); no retraining",
    )
    _options.add_options(
        p,
        {
            "t1": {
                "default": 10000,
                "help": "T1: steps of the logarithmic stage before the switch (the default model's "
                "validation log score gains under 0.01 nats per 1,000 steps there: its plateau, see "
                "benchmarks/RESULTS.md)",
            },
            "t2": 2500,
            "batch_size": {"default": 64, "help": "sentence pairs per step"},
            "learning_rate": 1.5e-3,
            "warmup_steps": 300,
            "smoothing": {},
            "vocab_size": 6000,
            "hidden_size": {},
            "num_layers": {},
            "num_heads": {},
            "ffn_size": {},
            "dropout": {},
        },
    )
    p.add_argument("--max-length", type=int, default=64, help="most BPE tokens per sentence")
    _options.add_options(
        p,
        {
            "eval_every": {},
            "save_every": {},
            "num_beams": 5,
            "eval_batch_size": {},
            "bootstrap_samples": {},
            "threads": {},
            "jobs": {},
        },
    )
    p.add_argument(
        "--reuse",
        metavar="OLD_WORK_DIR",
        default=None,
        help="continue the single-rule runs (a, d, e) from the checkpoints of a work directory made "
        "with the same settings but smaller T1/T2 (e.g. to lengthen stage 1 without retraining it)",
    )
    _options.add_options(p, {"report_only": {}, "dry_run": {}, "archive": {}})
    return p


def check_args(args: argparse.Namespace) -> None:
    """Fail before any work on a bad argument or a missing data file."""
    _options.check_data_dir(PROG, args.data_dir, REQUIRED_FILES, "Multi30k task 1")
    try:
        args.seed_list = _options.int_list(args.seeds)
        args.arm_seed_list = _options.int_list(args.arm_seeds)
    except ValueError:
        raise SystemExit(
            f"{PROG}: --seeds {args.seeds!r} / --arm-seeds {args.arm_seeds!r}: comma-separated integers expected"
        ) from None
    args.protocol_list = _options.parse_protocols(PROG, args.protocols, list(PROTOCOLS), BRANCHES)
    if any(p in BRANCHES for p in args.protocol_list) and not set(args.arm_seed_list) <= set(args.seed_list):
        raise SystemExit(
            f"{PROG}: --arm-seeds {args.arm_seeds!r} must be among --seeds {args.seeds!r}: "
            "the branches start from (a) of the same seed"
        )
    args.extra_tests = {}
    for spec in args.extra_test:
        name, eq, files = spec.partition("=")
        src, comma, ref = files.partition(",")
        if not (eq and comma and name.strip() and src and ref) or not name.replace("_", "").replace("-", "").isalnum():
            raise SystemExit(
                f"{PROG}: --extra-test {spec!r}: expected NAME=SOURCE_FILE,REFERENCE_FILE "
                "(NAME: letters, digits, - and _)"
            )
        if name in SPLITS or name in args.extra_tests:
            raise SystemExit(f"{PROG}: --extra-test {spec!r}: the name {name!r} is taken")
        for f in (src, ref):
            if not os.path.isfile(f):
                raise SystemExit(f"{PROG}: --extra-test {spec!r}: no such file {f!r}")
        if len(read_lines(src)) != len(read_lines(ref)):
            raise SystemExit(f"{PROG}: --extra-test {spec!r}: {src} and {ref} differ in line count")
        args.extra_tests[name] = (src, ref)
    _options.check_stages(PROG, args, ("t1", "t2", "batch_size", "eval_every", "save_every", "num_beams"))


#: options that determine a training trajectory up to any step (the inverse-sqrt schedule and
#: the data order do not depend on the total number of steps, so T1 and T2 are not among them)
TRAJECTORY_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "ffn_size",
    "dropout",
    "max_length",
    "batch_size",
    "learning_rate",
    "warmup_steps",
    "smoothing",
    "save_every",
)
#: options whose change makes the results of a work directory incomparable
RESULT_KEYS = (*TRAJECTORY_KEYS, "t1", "t2", "num_beams", "eval_every")


def check_settings(args: argparse.Namespace) -> None:
    """Record the settings in ``WORK/settings.json``; refuse to mix settings in one work
    directory (or to report its runs under other settings), and to ``--reuse`` a work directory
    whose runs followed another trajectory."""
    _options.check_settings(
        PROG,
        args.work_dir,
        {k: getattr(args, k) for k in RESULT_KEYS},
        record=not (args.dry_run or args.report_only),
        reuse=args.reuse,
        reuse_keys=TRAJECTORY_KEYS,
    )


def run_dir(args: argparse.Namespace, seed: int, protocol: str) -> str:
    return _runner.run_dir(args.work_dir, seed, protocol)


def train_argv(args: argparse.Namespace, seed: int, protocol: str) -> list[Arg]:
    """``properlm train`` of one seed and protocol (``--resume`` is the runner's: :func:`train_step`)."""
    d = os.path.join(args.data_dir, "")
    data = [
        "--source-file",
        d + "train.en",
        "--target-file",
        d + "train.de",
        "--validation-source-file",
        d + "val.en",
        "--validation-target-file",
        d + "val.de",
        "--max-length",
        str(args.max_length),
    ]
    return _seq2seq.seq2seq_train_argv(
        args,
        seed,
        PROTOCOLS[protocol].schedule(args.t1, args.t2),
        data,
        run_dir(args, seed, protocol),
        eval_batch_size=128,
    )


def run_branch(args: argparse.Namespace, seed: int, protocol: str) -> Branch | None:
    """Where a run starts: a branch (b, c, f-j) from (a)'s step-T1 checkpoint; with ``--reuse OLD``, a
    single-rule run (a, d, e, k) from the newest checkpoint of the same seed and protocol in OLD that lies
    within its own stage (at most T1 for a, T for the others), if there is one; else from scratch (``None``)."""
    if protocol in BRANCHES:
        return Branch(run_dir(args, seed, "a"), args.t1, hint=": protocol a must save a checkpoint at T1")
    if args.reuse:
        limit = args.t1 if protocol == "a" else args.t1 + args.t2
        return Branch(
            os.path.join(args.reuse, f"seed{seed}", protocol),
            limit,
            newest=True,
            note=f"[reuse] seed {seed} {protocol}: continuing",
        )
    return None


def eval_argv(args: argparse.Namespace, seed: int, protocol: str, split: str, objective: str) -> list[str]:
    stem = os.path.join(args.data_dir, SPLITS[split])
    out = os.path.join(run_dir(args, seed, protocol), eval_name(split, objective))
    argv = [
        "evaluate",
        "--model",
        os.path.join(run_dir(args, seed, protocol), "final"),
        "--source-file",
        stem + ".en",
        "--target-file",
        stem + ".de",
        "--target-lang",
        "de",
        "--max-length",
        str(args.max_length),
        "--num-beams",
        str(args.num_beams),
        "--objective",
        objective,
        "--max-new-tokens",
        str(args.max_length),
        "--batch-size",
        str(args.eval_batch_size),
        "--output-dir",
        out,
        "--no-progress",
    ]
    return argv


#: teacher-forced temperature scaling of each final model: fitted on val, applied to test
CALIB_DIRS = {"val": "calib_val_fit", "test": "calib_test_scaled"}


def calib_argv(
    args: argparse.Namespace, seed: int, protocol: str, split: str, temperature: Arg | None = None
) -> list[Arg]:
    """``properlm evaluate`` under teacher forcing only: ``--fit-temperature`` on val, or
    ``--temperature T`` (the val fit, a placeholder read when the step starts: :func:`fitted_temperature`) on test."""
    stem = os.path.join(args.data_dir, SPLITS[split])
    argv: list[Arg] = [
        "evaluate",
        "--model",
        os.path.join(run_dir(args, seed, protocol), "final"),
        "--source-file",
        stem + ".en",
        "--target-file",
        stem + ".de",
        "--max-length",
        str(args.max_length),
        "--batch-size",
        str(args.eval_batch_size),
        "--no-generate",
        "--no-progress",
        "--output-dir",
        os.path.join(run_dir(args, seed, protocol), CALIB_DIRS[split]),
    ]
    return argv + (["--fit-temperature"] if temperature is None else ["--temperature", _runner.arg(temperature)])


def fitted_temperature(args: argparse.Namespace, seed: int, protocol: str) -> FromJson:
    """The temperature fitted on val (``calib_val_fit/results.json``), read when the test step starts."""
    fit = os.path.join(run_dir(args, seed, protocol), CALIB_DIRS["val"], "results.json")
    return FromJson(fit, ("temperature_fit", "temperature"), "T_FITTED_ON_VAL")


def evaluations(args: argparse.Namespace, protocol: str, seed: int) -> list[tuple[str, str]]:
    """(split, beam objective) pairs evaluated for a protocol and seed: the log beam always, the
    spherical beam for (a)-(c) of the first three seeds."""
    pairs = [(s, "logarithmic") for s in SPLITS]
    if protocol in CORE and seed in args.seed_list[:3]:
        pairs += [(s, "spherical") for s in SPLITS]
    return pairs


#: every model's teacher-forced scores under SCORE_RULES on val (for the rank correlations)
SCORES_DIR = "scores_val"


def scores_argv(args: argparse.Namespace, model: str, out: str) -> list[str]:
    stem = os.path.join(args.data_dir, SPLITS["val"])
    return [
        "evaluate",
        "--model",
        model,
        "--source-file",
        stem + ".en",
        "--target-file",
        stem + ".de",
        "--max-length",
        str(args.max_length),
        "--batch-size",
        str(args.eval_batch_size),
        "--no-generate",
        "--rules",
        ",".join(SCORE_RULES),
        "--no-progress",
        "--output-dir",
        out,
    ]


def extra_argv(args: argparse.Namespace, seed: int, protocol: str, name: str) -> list[str]:
    src, ref = args.extra_tests[name]
    return [
        "evaluate",
        "--model",
        os.path.join(run_dir(args, seed, protocol), "final"),
        "--source-file",
        src,
        "--target-file",
        ref,
        "--target-lang",
        "de",
        "--max-length",
        str(args.max_length),
        "--num-beams",
        str(args.num_beams),
        "--objective",
        "logarithmic",
        "--max-new-tokens",
        str(args.max_length),
        "--batch-size",
        str(args.eval_batch_size),
        "--rules",
        ",".join(SCORE_RULES),
        "--output-dir",
        os.path.join(run_dir(args, seed, protocol), f"eval_{name}_beam_logarithmic"),
        "--no-progress",
    ]


def checkpoint_eval_argv(args: argparse.Namespace, seed: int) -> list[str]:
    """(a)'s step-T1 checkpoint (the model every branch starts from), decoded on val."""
    stem = os.path.join(args.data_dir, SPLITS["val"])
    run = run_dir(args, seed, "a")
    return [
        "evaluate",
        "--model",
        os.path.join(run, f"checkpoint-{args.t1}"),
        "--source-file",
        stem + ".en",
        "--target-file",
        stem + ".de",
        "--target-lang",
        "de",
        "--max-length",
        str(args.max_length),
        "--num-beams",
        str(args.num_beams),
        "--objective",
        "logarithmic",
        "--max-new-tokens",
        str(args.max_length),
        "--batch-size",
        str(args.eval_batch_size),
        "--rules",
        ",".join(SCORE_RULES),
        "--output-dir",
        os.path.join(run, f"eval_val_checkpoint_{args.t1}"),
        "--no-progress",
    ]


def seeds_of(args: argparse.Namespace, protocol: str) -> list[int]:
    """The seeds a protocol runs for: --seeds for a, b, c; --arm-seeds for the others."""
    return list(args.seed_list if protocol in CORE else args.arm_seed_list)


def protocol_steps(args: argparse.Namespace, seed: int, protocol: str) -> list[Step]:
    """The steps of one seed and protocol: its training, then its evaluations (each after the training; the
    test calibration after the val fit)."""
    run = run_dir(args, seed, protocol)
    train = f"train {seed}{protocol}"
    fit = f"calib {seed}{protocol} val"
    steps = [
        Step(
            train,
            "train",
            run,
            train_argv(args, seed, protocol),
            label=f"seed {seed} {PROTOCOLS[protocol].label} train",
            deps=(f"train {seed}a",) if protocol in BRANCHES else (),
            train_steps=args.t2 if protocol in BRANCHES else args.t1 + args.t2,
            resume=RESUME_IF_CHECKPOINT,
            branch=run_branch(args, seed, protocol),
            arm=protocol,
            seed=seed,
        )
    ]
    for split, objective in evaluations(args, protocol, seed):
        steps.append(
            Step(
                f"eval {seed}{protocol} {split} {objective}",
                "eval",
                os.path.join(run, eval_name(split, objective)),
                eval_argv(args, seed, protocol, split, objective),
                label=f"seed {seed} {protocol} {split} beam-{objective}",
                split=split,
                deps=(train,),
                arm=protocol,
                seed=seed,
            )
        )
    steps += [
        Step(
            fit,
            "calib",
            os.path.join(run, CALIB_DIRS["val"]),
            calib_argv(args, seed, protocol, "val"),
            label=f"seed {seed} {protocol} val fit-temperature",
            split="val",
            deps=(train,),
            arm=protocol,
            seed=seed,
        ),
        Step(
            f"calib {seed}{protocol} test",
            "calib",
            os.path.join(run, CALIB_DIRS["test"]),
            calib_argv(args, seed, protocol, "test", fitted_temperature(args, seed, protocol)),
            label=f"seed {seed} {protocol} test at the val temperature",
            split="test",
            deps=(fit,),
            arm=protocol,
            seed=seed,
        ),
        Step(
            f"scores {seed}{protocol}",
            "scores",
            os.path.join(run, SCORES_DIR),
            scores_argv(args, os.path.join(run, "final"), os.path.join(run, SCORES_DIR)),
            label=f"seed {seed} {protocol} val scores",
            split="val",
            deps=(train,),
            arm=protocol,
            seed=seed,
        ),
    ]
    for name in args.extra_tests:
        steps.append(
            Step(
                f"extra {seed}{protocol} {name}",
                "extra",
                os.path.join(run, f"eval_{name}_beam_logarithmic"),
                extra_argv(args, seed, protocol, name),
                label=f"seed {seed} {protocol} {name} beam-logarithmic",
                split=name,
                deps=(train,),
                arm=protocol,
                seed=seed,
            )
        )
    if protocol == "a":
        steps.append(
            Step(
                f"checkpoint {seed}a",
                "checkpoint",
                os.path.join(run, f"eval_val_checkpoint_{args.t1}"),
                checkpoint_eval_argv(args, seed),
                label=f"seed {seed} (a) checkpoint-{args.t1} val beam-logarithmic",
                split="val",
                deps=(train,),
                arm=protocol,
                seed=seed,
            )
        )
    return steps


def plan(args: argparse.Namespace) -> list[Step]:
    """Every training and evaluation step, in priority order: (a), (b), (c) of the first three
    seeds (the fine-tuning question), then the other protocols of --arm-seeds, then the further
    seeds: their (a) runs first (the longest, on which the rest wait), then their (b), (c); each
    evaluation after its training."""
    core = [p for p in args.protocol_list if p in CORE]
    arms = [p for p in args.protocol_list if p not in CORE]
    order = (
        [(s, core) for s in args.seed_list[:3]]
        + [(s, arms) for s in args.arm_seed_list]
        + [(s, core) for s in args.seed_list[3:]]
    )
    steps = [step for seed, group in order for protocol in group for step in protocol_steps(args, seed, protocol)]
    # The further seeds' (a) runs are the longest and everything of theirs waits on them: start them first.
    later = {f"train {s}{p}" for s in args.seed_list[3:] for p in core if p not in BRANCHES}
    first = [i for i, s in enumerate(steps) if s.name in later]
    if not first:
        return steps
    head, block = steps[: first[0]], steps[first[0] :]
    return head + [s for s in block if s.name in later] + [s for s in block if s.name not in later]


# ------------------------------------------------------------------------------ the report


def _eval(args: argparse.Namespace, seed: int, protocol: str, split: str, objective: str) -> dict[str, Any] | None:
    return read_json_if(os.path.join(run_dir(args, seed, protocol), eval_name(split, objective), "results.json"))


def collect(args: argparse.Namespace) -> dict[str, Any]:
    """Per protocol and seed: BLEU/chrF per split and objective, test token scores, ECE."""
    per: dict[str, dict[int, dict[str, Any]]] = {}
    for protocol in args.protocol_list:
        for seed in seeds_of(args, protocol):
            row: dict[str, Any] = {}
            run = run_dir(args, seed, protocol)
            for name in args.extra_tests:
                path = os.path.join(run, f"eval_{name}_beam_logarithmic", "results.json")
                if os.path.isfile(path):
                    gen = read_json(path).get("generation", {})
                    row[f"bleu_{name}_logarithmic"], row[f"chrf_{name}_logarithmic"] = gen.get("bleu"), gen.get("chrf")
            path = os.path.join(run, SCORES_DIR, "results.json")
            if os.path.isfile(path):
                tf = read_json(path)["teacher_forced"]
                row.update({f"tf_val_{r}": tf["mean_scores"].get(r) for r in SCORE_RULES})
                row["tf_val_ece"] = tf["ece"]
            for split, objective in evaluations(args, protocol, seed):
                ev = _eval(args, seed, protocol, split, objective)
                if ev is None:
                    continue
                gen = ev.get("generation", {})
                row[f"bleu_{split}_{objective}"] = gen.get("bleu")
                row[f"chrf_{split}_{objective}"] = gen.get("chrf")
                if objective == "logarithmic":
                    tf = ev["teacher_forced"]
                    for r in RULES:
                        row[f"score_{r}_{split}"] = tf["mean_scores"].get(r)
                    row[f"ece_{split}"] = tf["ece"]
                    row[f"perplexity_{split}"] = tf["perplexity"]
            calib = {
                split: os.path.join(run_dir(args, seed, protocol), d, "results.json") for split, d in CALIB_DIRS.items()
            }
            if os.path.isfile(calib["val"]) and os.path.isfile(calib["test"]):
                tf = read_json(calib["test"])["teacher_forced"]
                row["temperature"] = read_json(calib["val"])["temperature_fit"]["temperature"]
                row["ece_test_scaled"] = tf["ece"]
                for r in RULES:
                    row[f"score_{r}_test_scaled"] = tf["mean_scores"].get(r)
            if row:
                per.setdefault(protocol, {})[seed] = row
    return per


def main_table(per: dict[str, Any], protocols: list[str]) -> str:
    cols = [
        ("BLEU val", "bleu_val_logarithmic", 2, 1),
        ("BLEU test", "bleu_test_logarithmic", 2, 1),
        ("chrF val", "chrf_val_logarithmic", 2, 1),
        ("chrF test", "chrf_test_logarithmic", 2, 1),
        ("log score test", "score_logarithmic_test", 3, 1),
        ("Brier test", "score_brier_test", 4, 1),
        ("spherical test", "score_spherical_test", 4, 1),
        ("ECE test (%)", "ece_test", 2, 100),
    ]
    return "\n".join(_report.seed_table(per, protocols, LABELS, cols))


def calibration_table(per: dict[str, Any], protocols: list[str]) -> str:
    """Test metrics before and after temperature scaling with the T fitted on val."""
    cols = [
        ("T (val fit)", "temperature", 3, 1),
        ("ECE test (%)", "ece_test", 2, 100),
        ("ECE test, scaled (%)", "ece_test_scaled", 2, 100),
        ("log score test", "score_logarithmic_test", 3, 1),
        ("log score test, scaled", "score_logarithmic_test_scaled", 3, 1),
        ("Brier test", "score_brier_test", 4, 1),
        ("Brier test, scaled", "score_brier_test_scaled", 4, 1),
    ]
    return "\n".join(_report.seed_table(per, protocols, LABELS, cols, count_key="temperature"))


def objective_table(per: dict[str, Any], protocols: list[str]) -> str:
    lines = [
        "| protocol | BLEU val (log beam) | BLEU val (spherical beam) | BLEU test (log beam) | "
        "BLEU test (spherical beam) | chrF test (log beam) | chrF test (spherical beam) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in protocols:
        if p not in ("a", "b", "c"):
            continue
        cells = [
            fmt_mean_std(_stats.seed_values(per, p, k))
            for k in (
                "bleu_val_logarithmic",
                "bleu_val_spherical",
                "bleu_test_logarithmic",
                "bleu_test_spherical",
                "chrf_test_logarithmic",
                "chrf_test_spherical",
            )
        ]
        lines.append(f"| {PROTOCOLS[p].label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _hypotheses(args: argparse.Namespace, seed: int, protocol: str, split: str) -> list[str]:
    name = eval_name(split, "logarithmic") if split in SPLITS else f"eval_{split}_beam_logarithmic"
    return read_lines(os.path.join(run_dir(args, seed, protocol), name, "hypotheses.txt"))


def comparisons(args: argparse.Namespace, per: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Each protocol against (a) of the same seed, per split. The seed (a whole stage-1 run) is
    the unit of evidence: the mean difference with its 95% Student-t interval across seeds and a
    two-sided sign test; beside them the per-seed paired bootstrap p (resampling sentences)."""
    out: dict[str, Any] = {}
    lines = [
        "| vs (a) | split | ΔBLEU per seed | mean ΔBLEU [95% CI over seeds] | seeds better | sign test p | "
        "ΔchrF mean [95% CI] | bootstrap p (BLEU) per seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    refs = {s: read_lines(os.path.join(args.data_dir, SPLITS[s] + ".de")) for s in SPLITS}
    refs.update({name: read_lines(ref) for name, (_, ref) in args.extra_tests.items()})
    for p in PROTOCOLS:
        if p == "a" or p not in per or "a" not in per:
            continue
        for split in refs:
            key = f"bleu_{split}_logarithmic"
            seeds, d_bleu = _stats.seed_differences(per, p, key, args.seed_list)
            if not seeds:
                continue
            d_chrf = [per[p][s][f"chrf_{split}_logarithmic"] - per["a"][s][f"chrf_{split}_logarithmic"] for s in seeds]
            pvals = []
            for s in seeds:
                base, system = (_hypotheses(args, s, q, split) for q in ("a", p))
                bs = _stats.paired_bootstrap(base, {p: system}, refs[split], n_samples=args.bootstrap_samples)
                pvals.append(bs[p]["bleu_p"])
            m, lo, hi = _stats.mean_ci(d_bleu)
            mc, loc, hic = _stats.mean_ci(d_chrf)
            better, p_sign = sum(d > 0 for d in d_bleu), _stats.sign_test(d_bleu)
            out[f"{p}_{split}"] = {
                "seeds": seeds,
                "delta_bleu": d_bleu,
                "delta_chrf": d_chrf,
                "bootstrap_p": pvals,
                "mean_delta_bleu": m,
                "ci95_bleu": [lo, hi],
                "mean_delta_chrf": mc,
                "ci95_chrf": [loc, hic],
                "sign_test_p": p_sign,
            }
            lines.append(
                f"| {PROTOCOLS[p].label} | {split} | {', '.join(f'{d:+.2f}' for d in d_bleu)} | "
                f"{fmt_ci(m, lo, hi)} | {better}/{len(seeds)} | {p_sign:.3f} | {fmt_ci(mc, loc, hic)} | "
                f"{', '.join(f'{v:.3f}' for v in pvals)} |"
            )
    return "\n".join(lines), out


def score_models(args: argparse.Namespace, per: dict[str, Any]) -> list[dict[str, Any]]:
    """Every decoded model with its val BLEU and teacher-forced val scores: the final models, and
    (a)'s step-T1 checkpoints (the models the switches start from)."""
    models = []
    for p, seeds in per.items():
        for seed, row in seeds.items():
            if row.get("bleu_val_logarithmic") is not None and row.get("tf_val_logarithmic") is not None:
                models.append(
                    {
                        "model": f"seed{seed}/{p}/final",
                        "bleu": row["bleu_val_logarithmic"],
                        **{r: row[f"tf_val_{r}"] for r in SCORE_RULES},
                        "ece": row["tf_val_ece"],
                    }
                )
    for seed in seeds_of(args, "a"):
        ev = read_json_if(os.path.join(run_dir(args, seed, "a"), f"eval_val_checkpoint_{args.t1}", "results.json"))
        if ev is not None:
            tf = ev["teacher_forced"]
            models.append(
                {
                    "model": f"seed{seed}/a/checkpoint-{args.t1}",
                    "bleu": ev["generation"]["bleu"],
                    **{r: tf["mean_scores"].get(r) for r in SCORE_RULES},
                    "ece": tf["ece"],
                }
            )
    return models


def correlations(args: argparse.Namespace, models: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Kendall's tau between val BLEU and each teacher-forced val score over the models, with a
    95% bootstrap interval (resampling models)."""
    out: dict[str, Any] = {}
    lines = [
        "| teacher-forced val score | Kendall's tau with val BLEU | 95% bootstrap CI | models |",
        "|---|---|---|---|",
    ]
    for key in (*SCORE_RULES, "ece"):
        pairs = [(m[key], m["bleu"]) for m in models if m.get(key) is not None]
        if len(pairs) < 3:
            continue
        tau, lo, hi = _stats.kendall_tau_interval(
            [x for x, _ in pairs], [y for _, y in pairs], n_samples=args.bootstrap_samples
        )
        out[key] = {"tau": tau, "ci95": [lo, hi], "n": len(pairs)}
        label = "ECE (lower is better)" if key == "ece" else key
        lines.append(f"| {label} | {tau:+.3f} | [{lo:+.3f}, {hi:+.3f}] | {len(pairs)} |")
    return "\n".join(lines), out


def plot_scatter(models: list[dict[str, Any]], path: str) -> str | None:
    """Val BLEU against each teacher-forced val score, one point per model."""
    if len(models) < 3:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [*SCORE_RULES, "ece"]
    cols = 3
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for m in models:
            if m.get(key) is None:
                continue
            kind = m["model"].split("/")[1]
            marker = "x" if "checkpoint" in m["model"] else "o"
            ax.scatter(m[key], m["bleu"], s=18, marker=marker, color=f"C{ord(kind) - ord('a')}")
        ax.set_xlabel(f"teacher-forced val {key}")
        ax.set_ylabel("val BLEU")
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    kinds = sorted({m["model"].split("/")[1] for m in models})
    handles = [
        plt.Line2D(
            [],
            [],
            linestyle="",
            marker="o",
            color=f"C{ord(k) - ord('a')}",
            label=PROTOCOLS[k].label if k in PROTOCOLS else k,
        )
        for k in kinds
    ]
    if any("checkpoint" in m["model"] for m in models):
        handles.append(plt.Line2D([], [], linestyle="", marker="x", color="C0", label="(a) at step T1"))
    fig.suptitle("Multi30k: val BLEU against each score, one point per model")
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(args: argparse.Namespace, path: str) -> str | None:
    """Validation log score, Brier and spherical score and training loss vs step, mean over the finished seeds.

    Only finished runs (with ``results.json``) are drawn, so a study in progress does not average
    runs of different lengths; the title names the seeds drawn."""
    finished = {
        p: [s for s in seeds_of(args, p) if os.path.isfile(os.path.join(run_dir(args, s, p), "results.json"))]
        for p in args.protocol_list
    }
    series = [
        _report.curve_series(
            PROTOCOLS[p].label,
            [run_dir(args, s, p) for s in finished[p]],
            {"linestyle": "-" if p in CORE else ":" if p in BRANCHES else "--"},
        )
        for p in args.protocol_list
        if finished[p]
    ]
    drawn = {",".join(map(str, v)) for v in finished.values() if v}
    seeds = (
        f"seeds {drawn.pop()}"
        if len(drawn) == 1
        else "finished seeds (" + "; ".join(f"{p}: {','.join(map(str, v))}" for p, v in finished.items() if v) + ")"
    )
    return draw_curves(
        series,
        path,
        title=f"Multi30k en-de, mean over {seeds}; dotted line: T1 = {args.t1}",
        panels=_report.CURVE_PANELS,
        mark=args.t1,
        ncols=4,
    )


def report(args: argparse.Namespace, wall_seconds: float | None) -> str:
    per = collect(args)
    cmp_md, cmp = comparisons(args, per)
    # how much (a)'s validation log score still moved over the last quarter of stage 1
    plateau_md, plateau_rows = _report.plateau(
        {s: run_dir(args, s, "a") for s in args.seed_list},
        args.t1,
        args.t2,
        what="validation",
        end_note=" (protocol a)",
    )
    png = plot_curves(args, os.path.join(args.work_dir, "training_curves.png"))
    models = score_models(args, per)
    corr_md, corr = correlations(args, models)
    scatter = plot_scatter(models, os.path.join(args.work_dir, "bleu_vs_scores.png"))
    md = "\n\n".join(
        [
            f"Beam {args.num_beams}, sacrebleu BLEU/chrF; token scores and ECE (15 bins, top-1) under teacher forcing "
            f"on test_2016_flickr; mean ± std over seeds. T1 = {args.t1}, T2 = {args.t2}, batch {args.batch_size}, "
            f"smoothing {args.smoothing}.",
            main_table(per, args.protocol_list),
            "Beam objective: logarithmic (sum of log-probabilities) vs the spherical score:",
            objective_table(per, args.protocol_list),
            "Each protocol against (a) with the same seed (paired bootstrap: sacrebleu, "
            f"{args.bootstrap_samples} resamples, one p per seed):",
            cmp_md,
            "Temperature scaling (teacher forcing): T fitted on val (`properlm evaluate --fit-temperature`), "
            "applied to test_2016_flickr (`--temperature T`):",
            calibration_table(per, args.protocol_list),
            "Plateau of stage 1 (protocol a):\n\n" + plateau_md,
            f"Which score predicts generation quality: Kendall's tau over {len(models)} models (final models and "
            f"(a)'s checkpoint-{args.t1}) between val BLEU and each teacher-forced val score "
            f"(bootstrap over models, {args.bootstrap_samples} resamples):",
            corr_md,
        ]
    )
    _report.write_report(
        args.work_dir,
        md,
        {
            "settings": vars(args),
            "per_seed": per,
            "comparisons": cmp,
            "plateau": plateau_rows,
            "curves_png": png,
            "models": models,
            "correlations": corr,
            "scatter_png": scatter,
            "wall_seconds": wall_seconds,
        },
    )
    return md


def main(argv: list[str] | None = None) -> int:
    study = _seq2seq.Seq2SeqStudy(
        build_parser().parse_args(argv),
        checks=(check_args, check_settings),
        plan=plan,
        report=report,
        report_files=("results.md", "results.json", "training_curves.png", "bleu_vs_scores.png"),
    )
    return _runner.run_study(study)


if __name__ == "__main__":
    sys.exit(main())
