"""Reproduce the paper's fine-tuning finding on abstractive summarisation: AESLC, email body -> subject line.

Shao et al. (ICML 2024) report that fine-tuning a converged logarithmic model with the Brier or
spherical score improves generation; reproduce_mt.py tests that on Multi30k translation, this
script on summarisation, with ``properlm train`` / ``properlm evaluate``. Protocols, all with the
same total number of steps T = T1 + T2::

    (a) logarithmic for T     (b) logarithmic for T1, then Brier for T2     (c) ... then spherical for T2

(b) and (c) branch from the step-T1 checkpoint of (a) (weights, optimizer, learning-rate schedule,
data order), so the three share their first T1 steps exactly and differ only in the loss (and its
score smoothing, below) afterwards.

Model: a Transformer encoder-decoder trained from scratch (``--init tiny-seq2seq``, Marian
architecture) with a joint byte-level BPE vocabulary trained on the training emails; dropout,
linear warm-up then inverse-sqrt decay, AdamW(0.9, 0.98). Each document is cut to its first
``--max-source-length`` BPE tokens in training and evaluation alike (``properlm train
--max-source-length``, recorded with the model; ``evaluate`` states it).

Data and model selection: ``DATA_DIR/train.jsonl`` and ``dev.jsonl`` (``document``, ``summary``;
dev rows carry ``annotations``, three more subject lines). A fixed slice of train (``--heldout-
fraction``, the same examples for every seed: ``--validation-seed 0``; 505 of the 14,436 AESLC
emails) is held out as the validation set of every run: the curves and the plateau of (a) look at
it. Every setting chosen here is chosen on that held-out slice of train, never on dev: dev is the
split this script reports (AESLC's test split is not provided), so choosing on it would bias the
reported numbers. Every final model is then decoded with beam search on dev (ROUGE-1/2/L F1,
rouge-score with stemming, against ``summary`` and multi-reference: per document the best F1 over
``summary`` and the annotations, then the mean) and scored under teacher forcing on dev (every
rule's token score, ECE); (a)-(c) are also decoded with the spherical score as the beam objective,
and (a)'s step-T1 checkpoint (the branches' common start) is decoded too. ``--test-file FILE``
(repeatable) scores every final model on further JSONL files of the same format, without retraining.

Score smoothing. (a) trains all its T steps with ``--smoothing-a`` (default 0.1, the usual label
smoothing of Transformer seq2seq models and the setting of reproduce_mt.py), so the branches'
first T1 steps, copied from it, do too; it is fixed, not selected: a grid over it would cost a
whole (a) run of T steps per candidate. The branches' smoothing after the switch is selected, per
rule, in the same command before their seed runs: for the first seed of ``--seeds`` only, (b) and
(c) branch from (a)'s step-T1 checkpoint once per eps of ``--smoothing-grid`` (default 0, 0.1; the
paper's masked-log formula: it trained well on Multi30k's vocabulary of 6,000, and this one of
8,000 is below the 16,384 from which ``properlm train`` warns about it, so ``--smoothing-variant
gated`` is not a candidate), each is decoded (beam, log objective) on the selection slice, and the
eps with the best mean of ROUGE-1/2/L F1 there is chosen (ties: the smaller eps). The choice and
every candidate's scores go to ``WORK/selection_b.json`` / ``selection_c.json`` and the report. The
other seeds' (b), (c) wait for it and use the chosen eps; the first seed's run with the chosen eps
is that seed's run (not retrained). The branches thus get a choice that (a) does not; with two
candidates chosen on one seed the advantage is small, and every candidate's scores are reported.
The selection slice, ``WORK/heldout.jsonl``: the held-out validation slice of train less the emails
whose body also occurs verbatim in the training part (52 of the 505; 453 remain), so that memorised
duplicates do not decide; no run trains on any of it. ``--smoothing EPS`` fixes the branches' eps
instead and skips the selection (``--smoothing EPS --smoothing-a EPS``: one eps in every protocol,
as reproduce_mt.py). Run directories name their eps: ``seedS/a``, ``seedS/b_eps0.1``.

Statistics: per seed, a paired bootstrap over documents of each ROUGE of (b), (c) against (a)
(``_runner.paired_bootstrap_means``); across seeds (the unit of evidence) the mean difference with
its 95% Student-t interval and a two-sided sign test.

Everything lives under ``--work-dir``: one ``properlm train`` directory per seed and protocol
(checkpoints, metrics.jsonl, results.json, final/) with ``eval_*`` sub-directories, the selection
files, and the summary ``results.json``, ``results.md`` and ``training_curves.png``. A step whose
``results.json`` exists is skipped, so rerunning the same command after a kill resumes (an
interrupted training run continues from its newest checkpoint); the final models stay, so
``--test-file`` can be added later. ``--report-only`` reports whatever has finished.

Cost (one training step of 32 emails measured at 0.57 s of CPU, 0.86 s wall on loaded cores; see
benchmarks/README.md): the seed runs take 3 x (T1 + 3 T2) = 26,250 steps and the selection
2 x (len(grid) - 1) x T2 = 2,500 more (the chosen candidates are the first seed's runs): 28,750
steps, about 16,400 core-seconds; with the held-out scores during training (about 1,000 s), the 21
dev decodings (about 90 s each), 4 decodings of the 453 selection emails (about 30 s each) and
start-up, about 5.45 core-hours (4.98 without the selection). The task graph scheduled as
``--jobs 2`` runs it (every seed's (a) first, so the last (a) trains beside the selection) takes
about 2.75 h on two idle cores (2.5 h without the selection), 4.1 h at the loaded 0.86 s per step
and 5.5 h at twice the idle time; a third candidate (``--smoothing-grid 0,0.05,0.1``) would add
1,250 x 2 steps: 3.0 h idle, 5.9 h at twice.

Usage::

    python benchmarks/reproduce_summ.py ../shared/data/aeslc --work-dir runs/reproduce_summ --jobs 2
    python benchmarks/reproduce_summ.py ../shared/data/aeslc --work-dir runs/reproduce_summ --report-only
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _runner
from _runner import Task, eval_name, fmt_ci, fmt_mean_std, read_json_if, seed_values

PROG = "reproduce_summ.py"

#: protocol -> (label, rule schedule as a function of (T1, T2))
PROTOCOLS: dict[str, tuple[str, Any]] = dict(_runner.PAPER_PROTOCOLS)
#: protocols that branch from (a)'s step-T1 checkpoint
BRANCHES = ("b", "c")
#: the rule each branch switches to at T1
BRANCH_RULES = {"b": "brier", "c": "spherical"}
#: teacher-forced token scores reported for every model
RULES = ("logarithmic", "brier", "spherical")
#: beam objectives every final model is decoded with on dev
OBJECTIVES = ("logarithmic", "spherical")
#: the generation metrics (ROUGE F1 in percent), single- and multi-reference
ROUGE = ("rouge1", "rouge2", "rougeL")
ROUGE_LABELS = {"rouge1": "R-1", "rouge2": "R-2", "rougeL": "R-L"}
REQUIRED_FILES = ("train.jsonl", "dev.jsonl")
LABELS = {k: v[0] for k, v in PROTOCOLS.items()}
#: the seed of the held-out split of train (``properlm train --validation-seed``): the same slice for every seed
VALIDATION_SEED = 0
#: the split name of the selection slice (its decodings: ``eval_heldout_beam_logarithmic``)
HELDOUT = "heldout"
#: what the smoothing selection maximises
SELECTION_METRIC = "mean of ROUGE-1/2/L F1 (%), beam search with the log objective, on the selection slice"
#: scores closer than this count as a tie (the smaller eps wins)
TIE_TOLERANCE = 1e-9
#: the directory-name stand-in for a branch eps a --dry-run cannot know yet (the selection has not run)
PENDING = "CHOSEN"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0],
        epilog=next(part for part in __doc__.split("\n\n") if part.startswith("Cost")),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data_dir", help="directory with train.jsonl and dev.jsonl (AESLC: document, summary, "
                   "annotations on dev)")
    _runner.add_options(p, {"work_dir": "runs/reproduce_summ"})
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (the unit of evidence); the first also "
                   "selects the branches' smoothing")
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
        "smoothing": {"default": None, "metavar": "EPS",
                      "help": "score smoothing of (b) and (c) after the switch, fixed: skips the selection; "
                      "none: chosen per rule from --smoothing-grid on the held-out slice of train"}})
    p.add_argument("--smoothing-a", type=float, default=0.1, metavar="EPS",
                   help="score smoothing of (a), all its T steps (so also of the branches' first T1 steps); fixed")
    p.add_argument("--smoothing-grid", default="0,0.1", metavar="EPS,...",
                   help="candidate smoothings of (b), (c) after the switch: the first seed branches once per "
                   "candidate, the best mean ROUGE-1/2/L F1 on the held-out slice of train wins (ties: the smaller)")
    _runner.add_options(p, {
        "vocab_size": 8000, "hidden_size": {}, "num_layers": {}, "num_heads": {}, "ffn_size": {}, "dropout": {}})
    p.add_argument("--max-source-length", type=int, default=192,
                   help="most BPE tokens of each email body (cut in training and evaluation alike); the model "
                   "takes this + 1 positions (the body and EOS), summaries are cut there too")
    p.add_argument("--heldout-fraction", type=float, default=0.035,
                   help="fraction of train.jsonl held out (the same examples for every seed) as the validation "
                   "set (the curves, the plateau) and, less verbatim duplicates of training emails, the "
                   "selection slice")
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


def _eps_name(eps: float | str) -> str:
    return eps if isinstance(eps, str) else f"{eps:g}"


def parse_grid(text: str) -> list[float]:
    """``"0, 0.1"`` -> ``[0.0, 0.1]`` (ascending); ``ValueError`` naming the problem for a non-number,
    a value outside [0, 1), a repeat or an empty grid."""
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--smoothing-grid {text!r}: comma-separated numbers expected") from None
    if not values:
        raise ValueError(f"--smoothing-grid {text!r} names no value")
    bad = [v for v in values if not 0.0 <= v < 1.0]
    if bad:
        raise ValueError(f"--smoothing-grid {text!r}: every value must be in [0, 1), got {bad[0]:g}")
    if len({_eps_name(v) for v in values}) != len(values):
        raise ValueError(f"--smoothing-grid {text!r} repeats a value")
    return sorted(values)


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
    for name in ("smoothing", "smoothing_a"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value < 1.0:
            raise SystemExit(f"{PROG}: --{name.replace('_', '-')} must be in [0, 1), got {value}")
    if args.smoothing is None:
        try:
            args.smoothing_grid = parse_grid(args.smoothing_grid)
        except ValueError as exc:
            raise SystemExit(f"{PROG}: {exc}") from None
    else:
        args.smoothing_grid = None  # fixed: no selection
    if args.max_new_tokens > args.max_source_length + 1:
        raise SystemExit(f"{PROG}: --max-new-tokens {args.max_new_tokens} exceeds the model's "
                         f"{args.max_source_length + 1} positions (--max-source-length + 1)")
    args.tests = {}
    for path in args.test_file:
        if not os.path.isfile(path):
            raise SystemExit(f"{PROG}: --test-file {path!r}: no such file")
        name = _test_name(path)
        if name in ("dev", HELDOUT) or name in args.tests:
            raise SystemExit(f"{PROG}: --test-file {path!r}: the name {name!r} is taken; rename the file")
        args.tests[name] = os.path.abspath(path)
    args.max_length = args.max_source_length + 1


#: options whose change makes the results of a work directory incomparable
RESULT_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size", "dropout", "max_source_length",
               "heldout_fraction", "batch_size", "learning_rate", "warmup_steps", "smoothing", "smoothing_a",
               "smoothing_grid", "save_every", "t1", "t2", "num_beams", "max_new_tokens", "eval_every")


def check_settings(args: argparse.Namespace) -> None:
    """Record the settings in ``WORK/settings.json``; refuse to mix settings in one work directory
    (or to report its runs under other settings), and a first seed other than the one a finished
    selection used."""
    _runner.check_settings(PROG, args.work_dir, {k: getattr(args, k) for k in RESULT_KEYS},
                           record=not (args.dry_run or args.report_only))
    for protocol in BRANCHES:
        sel = read_json_if(selection_path(args, protocol))
        if sel is not None and selecting(args) and sel["seed"] != args.seed_list[0]:
            raise SystemExit(f"{PROG}: the smoothing of ({protocol}) was selected with seed {sel['seed']} "
                             f"({selection_path(args, protocol)}); list that seed first in --seeds")


# ------------------------------------------------------------------------------ runs and the smoothing selection


def selecting(args: argparse.Namespace) -> bool:
    """Whether the branches' smoothing is selected (no ``--smoothing``, and a branch is run)."""
    return args.smoothing is None and any(p in BRANCHES for p in args.protocol_list)


def selection_path(args: argparse.Namespace, protocol: str) -> str:
    """The selection record of a branch: ``WORK/selection_PROTOCOL.json``."""
    return os.path.join(args.work_dir, f"selection_{protocol}.json")


def heldout_path(args: argparse.Namespace) -> str:
    """The selection slice of train, as JSONL: ``WORK/heldout.jsonl``."""
    return os.path.join(args.work_dir, "heldout.jsonl")


def protocol_eps(args: argparse.Namespace, protocol: str) -> float | None:
    """The smoothing of a protocol's run: (a)'s ``--smoothing-a``, a branch's ``--smoothing`` or the
    selection's choice (``None`` until the selection has run)."""
    if protocol not in BRANCHES:
        return args.smoothing_a
    if args.smoothing is not None:
        return args.smoothing
    sel = read_json_if(selection_path(args, protocol))
    return None if sel is None else float(sel["chosen"])


def grid_dir(args: argparse.Namespace, seed: int, protocol: str, eps: float | str) -> str:
    """The ``properlm train`` directory of a branch with smoothing ``eps``: ``WORK/seedS/PROTOCOL_epsEPS``."""
    return _runner.run_dir(args.work_dir, seed, f"{protocol}_eps{_eps_name(eps)}")


def run_dir(args: argparse.Namespace, seed: int, protocol: str) -> str | None:
    """The run of a seed and protocol that the report counts: ``WORK/seedS/a``, or the branch with its
    smoothing (``None`` while the selection has not chosen it)."""
    if protocol not in BRANCHES:
        return _runner.run_dir(args.work_dir, seed, protocol)
    eps = protocol_eps(args, protocol)
    return None if eps is None else grid_dir(args, seed, protocol, eps)


def train_argv(args: argparse.Namespace, seed: int, protocol: str, eps: float | str, output_dir: str,
               resume: bool) -> list[str]:
    """``properlm train`` of one seed and protocol with score smoothing ``eps`` into ``output_dir``."""
    data = ["--train-file", os.path.join(args.data_dir, "train.jsonl"),
            "--validation-fraction", str(args.heldout_fraction), "--validation-seed", str(VALIDATION_SEED),
            "--max-length", str(args.max_length), "--max-source-length", str(args.max_source_length)]
    with_eps = argparse.Namespace(**{**vars(args), "smoothing": _eps_name(eps)})
    return _runner.seq2seq_train_argv(with_eps, seed, PROTOCOLS[protocol][1](args.t1, args.t2), data, output_dir,
                                      eval_batch_size=64, resume=resume)


def prepare_branch(args: argparse.Namespace, seed: int, run: str) -> None:
    """Before a branch's first step: start it from (a)'s step-T1 checkpoint."""
    if not _runner.started(run):
        _runner.branch_from(_runner.run_dir(args.work_dir, seed, "a"), run, args.t1)


def heldout_examples(args: argparse.Namespace) -> tuple[list[Any], int]:
    """The selection slice: the examples ``properlm train`` holds out of ``train.jsonl`` (the same
    split, ``--heldout-fraction`` with seed :data:`VALIDATION_SEED`) whose document does not also
    occur verbatim among the examples it trains on; returns them and how many were dropped."""
    from properlm.data import load_examples, split_validation

    examples = load_examples(os.path.join(args.data_dir, "train.jsonl"), task="summarization")
    train, held_out = split_validation(examples, args.heldout_fraction, VALIDATION_SEED)
    trained_on = {e.source for e in train}
    kept = [e for e in held_out if e.source not in trained_on]
    return kept, len(held_out) - len(kept)


def write_heldout(args: argparse.Namespace) -> None:
    """Write the selection slice to ``WORK/heldout.jsonl`` (``document``, ``summary``) unless it exists."""
    path = heldout_path(args)
    if os.path.isfile(path):
        print(f"[skip] heldout slice: {path} exists", flush=True)
        return
    if args.dry_run:
        print(f"[dry-run] heldout slice: write {path} (the held-out {args.heldout_fraction:g} of train.jsonl, "
              "split seed 0, less documents also in the training part)", flush=True)
        return
    kept, dropped = heldout_examples(args)
    os.makedirs(args.work_dir, exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"document": e.source, "summary": e.target}, ensure_ascii=False) + "\n"
                     for e in kept)
    os.replace(path + ".tmp", path)
    print(f"[done] heldout slice: {len(kept)} emails ({dropped} dropped: their body also occurs in the training "
          f"part) -> {path}", flush=True)


def choose_smoothing(scores: Mapping[float, float]) -> float:
    """The eps of ``scores`` (eps -> selection score, higher is better) with the best score; scores
    within :data:`TIE_TOLERANCE` of the best tie, and the smallest tied eps wins. NaN scores never win;
    ``ValueError`` when there is no finite score."""
    finite = {e: s for e, s in scores.items() if s is not None and not math.isnan(s)}
    if not finite:
        raise ValueError(f"no finite selection score among {dict(scores)}")
    best = max(finite.values())
    return min(e for e, s in finite.items() if s >= best - TIE_TOLERANCE)


def selection_rows(args: argparse.Namespace, protocol: str, seed: int) -> list[dict[str, Any]]:
    """Per candidate eps whose held-out decoding has finished: its ROUGE, their mean (the selection
    score) and the held-out token scores."""
    rows = []
    for eps in args.smoothing_grid or ():
        ev = read_json_if(os.path.join(grid_dir(args, seed, protocol, eps), eval_name(HELDOUT, "logarithmic"),
                                       "results.json"))
        if ev is None:
            continue
        gen, tf = ev["generation"], ev["teacher_forced"]
        row: dict[str, Any] = {"smoothing": eps, **{k: gen[k] for k in ROUGE}}
        row["selection_score"] = sum(gen[k] for k in ROUGE) / len(ROUGE)
        row.update({f"score_{r}": tf["mean_scores"].get(r) for r in RULES})
        row["num_examples"] = ev.get("num_examples")
        rows.append(row)
    return rows


def select_smoothing(args: argparse.Namespace, protocol: str, seed: int) -> None:
    """Choose a branch's smoothing from its candidates' held-out decodings (:func:`choose_smoothing`
    of :data:`SELECTION_METRIC`) and record it in ``WORK/selection_PROTOCOL.json``, unless recorded."""
    path = selection_path(args, protocol)
    if os.path.isfile(path):
        print(f"[skip] select {protocol}: {path} exists (smoothing {read_json_if(path)['chosen']:g})", flush=True)
        return
    grid = ", ".join(map(_eps_name, args.smoothing_grid))
    if args.dry_run:
        print(f"[dry-run] select {protocol}: choose the smoothing of ({protocol}) from {grid}, seed {seed}, by the "
              f"{SELECTION_METRIC} -> {path}; the other seeds' ({protocol}) use it ({PENDING} below)", flush=True)
        return
    rows = selection_rows(args, protocol, seed)
    if len(rows) != len(args.smoothing_grid):
        raise RuntimeError(f"select {protocol}: {len(rows)} of the {len(args.smoothing_grid)} held-out decodings "
                           "exist")
    chosen = choose_smoothing({r["smoothing"]: r["selection_score"] for r in rows})
    record = {"protocol": protocol, "rule": BRANCH_RULES[protocol], "seed": seed, "grid": args.smoothing_grid,
              "metric": SELECTION_METRIC, "tie_rule": "scores within 1e-9 tie; the smaller eps wins",
              "slice": heldout_path(args), "rows": rows, "chosen": chosen}
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)
    scores = ", ".join(f"eps {_eps_name(r['smoothing'])}: {r['selection_score']:.2f}" for r in rows)
    print(f"[done] select {protocol}: smoothing {chosen:g} ({scores})", flush=True)


def train_branch(args: argparse.Namespace, seed: int, protocol: str, name: str) -> bool:
    """Train a branch with its chosen smoothing (known once its selection has run: the directory and
    the command are made when the task runs; a dry run before the selection shows :data:`PENDING`)."""
    eps = protocol_eps(args, protocol)
    if eps is None and not args.dry_run:
        raise RuntimeError(f"the smoothing of ({protocol}) has not been selected ({selection_path(args, protocol)})")
    run = grid_dir(args, seed, protocol, PENDING if eps is None else eps)
    if not args.dry_run:
        prepare_branch(args, seed, run)
    argv = train_argv(args, seed, protocol, PENDING if eps is None else eps, run,
                      bool(_runner.checkpoint_steps(run)))
    return _runner.run_step(name, argv, run, threads=args.threads, dry_run=args.dry_run)


def split_file(args: argparse.Namespace, split: str) -> str:
    if split == "dev":
        return os.path.join(args.data_dir, "dev.jsonl")
    return heldout_path(args) if split == HELDOUT else args.tests[split]


def eval_argv(args: argparse.Namespace, model: str, data_file: str, objective: str, out: str) -> list[str]:
    """``properlm evaluate``: teacher-forced scores of every rule and ECE, then beam search with
    ``objective`` and ROUGE (the truncation is the training run's, read from the model directory)."""
    return ["evaluate", "--model", model, "--data-file", data_file, "--rules", ",".join(RULES),
            "--num-beams", str(args.num_beams), "--objective", objective,
            "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.eval_batch_size),
            "--output-dir", out, "--no-progress"]


def eval_branch(args: argparse.Namespace, seed: int, protocol: str, split: str, objective: str, name: str) -> bool:
    """Decode a branch's final model (its directory known once its smoothing is: see :func:`train_branch`)."""
    eps = protocol_eps(args, protocol)
    run = grid_dir(args, seed, protocol, PENDING if eps is None else eps)
    d = os.path.join(run, eval_name(split, objective))
    return _runner.run_step(name, eval_argv(args, os.path.join(run, "final"), split_file(args, split), objective, d),
                            d, threads=args.threads, dry_run=args.dry_run)


def evaluations(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(split, beam objective) pairs every final model is decoded with."""
    return [("dev", o) for o in OBJECTIVES] + [(name, "logarithmic") for name in args.tests]


def tasks(args: argparse.Namespace) -> list[Task]:
    """Every training and evaluation step, in priority order: every seed's (a) first (the longest
    runs, which the rest waits for: with ``--jobs 2`` the last (a) then trains beside the selection),
    then seed by seed (a)'s decodings and the branches; with the selection, the first seed's
    candidate branches and their held-out decodings, then the choice (``select b``, ``select c``),
    which the branches' runs and decodings wait for; each evaluation after its training."""
    plan = _runner.Plan(args.threads, args.dry_run)
    select = selecting(args)
    if select:
        plan.tasks.append(Task("heldout slice", functools.partial(write_heldout, args)))
    for seed in args.seed_list:
        for protocol in args.protocol_list:
            label = PROTOCOLS[protocol][0]
            if protocol not in BRANCHES:
                run = _runner.run_dir(args.work_dir, seed, protocol)
                train = plan.train(f"train {seed}{protocol}", f"seed {seed} {label} train", run,
                                   functools.partial(train_argv, args, seed, protocol, args.smoothing_a, run))
                for split, objective in evaluations(args):
                    d = os.path.join(run, eval_name(split, objective))
                    plan.step(f"eval {seed}{protocol} {split} {objective}",
                              f"seed {seed} {protocol} {split} beam-{objective}",
                              eval_argv(args, os.path.join(run, "final"), split_file(args, split), objective, d), d,
                              {train})
                if any(p in BRANCHES for p in args.protocol_list):
                    d = os.path.join(run, f"eval_dev_checkpoint_{args.t1}")
                    plan.step(f"checkpoint {seed}{protocol}",
                              f"seed {seed} {label[:3]} checkpoint-{args.t1} dev beam-logarithmic",
                              eval_argv(args, os.path.join(run, f"checkpoint-{args.t1}"), split_file(args, "dev"),
                                        "logarithmic", d), d, {train})
                continue
            if select and seed == args.seed_list[0]:
                # the selection: one branch per candidate eps, each decoded on the held-out slice
                decoded = set()
                for eps in args.smoothing_grid:
                    run = grid_dir(args, seed, protocol, eps)
                    cand = plan.train(f"train {seed}{protocol} eps{_eps_name(eps)}",
                                      f"seed {seed} {label} train, smoothing {_eps_name(eps)} (selection)", run,
                                      functools.partial(train_argv, args, seed, protocol, eps, run),
                                      functools.partial(prepare_branch, args, seed, run), {f"train {seed}a"})
                    d = os.path.join(run, eval_name(HELDOUT, "logarithmic"))
                    decoded.add(plan.step(f"{HELDOUT} {seed}{protocol} eps{_eps_name(eps)}",
                                          f"seed {seed} {protocol} smoothing {_eps_name(eps)} {HELDOUT} "
                                          "beam-logarithmic",
                                          eval_argv(args, os.path.join(run, "final"), heldout_path(args),
                                                    "logarithmic", d), d, {cand, "heldout slice"}))
                train = f"select {protocol}"  # the chosen candidate is this seed's run
                plan.tasks.append(Task(train, functools.partial(select_smoothing, args, protocol, seed), decoded))
            else:
                train = f"train {seed}{protocol}"
                deps = {f"train {seed}a"} | ({f"select {protocol}"} if select else set())
                plan.tasks.append(Task(train, functools.partial(train_branch, args, seed, protocol,
                                                                f"seed {seed} {label} train"), deps))
            for split, objective in evaluations(args):
                plan.tasks.append(Task(f"eval {seed}{protocol} {split} {objective}",
                                       functools.partial(eval_branch, args, seed, protocol, split, objective,
                                                         f"seed {seed} {protocol} {split} beam-{objective}"),
                                       {train}))
    roots = {f"train {seed}{p}" for seed in args.seed_list for p in args.protocol_list if p not in BRANCHES}
    return sorted(plan.tasks, key=lambda t: t.name not in roots)  # stable: otherwise the order above


# ------------------------------------------------------------------------------ the report


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
            run = run_dir(args, seed, protocol)
            assert run is not None  # only seeds with results are compared
            hyps = _runner.read_lines(os.path.join(run, eval_name(split, "logarithmic"), "hypotheses.txt"))
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
        ev = read_json_if(os.path.join(_runner.run_dir(args.work_dir, s, "a"), f"eval_dev_checkpoint_{args.t1}",
                                       "results.json"))
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


def smoothing_report(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """How every protocol's smoothing was set: (a)'s fixed value, the branches' fixed value or their
    selection on the held-out slice of train (every candidate's held-out scores, the choice)."""
    branches = [p for p in args.protocol_list if p in BRANCHES]
    out: dict[str, Any] = {"a": args.smoothing_a, "a_how": "fixed (--smoothing-a), not selected"}
    text = (f"Score smoothing: (a) {args.smoothing_a:g} in all its T steps (--smoothing-a, fixed, not selected; "
            "so also the branches' first T1 steps)")
    if not branches:
        return text + ".", out
    if not selecting(args):
        out.update({p: args.smoothing for p in branches}, branches_how="fixed (--smoothing), no selection")
        return text + f"; {', '.join(f'({p})' for p in branches)} {args.smoothing:g} after the switch " \
            "(--smoothing, fixed: no selection).", out
    seed = args.seed_list[0]
    heldout = heldout_path(args)
    n = sum(1 for _ in open(heldout, encoding="utf-8")) if os.path.isfile(heldout) else None
    lines = ["| protocol | eps | held-out R-1 | R-2 | R-L | mean (selection score) | log score | Brier | spherical "
             "| chosen |", "|---|---|---|---|---|---|---|---|---|---|"]
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
        for eps in args.smoothing_grid:
            r = by_eps.get(eps)
            if r is None:
                lines.append(f"| {PROTOCOLS[p][0]} | {eps:g} | - | - | - | - | - | - | - | pending |")
                continue
            mark = "pending" if chosen is None else ("**chosen**" if eps == chosen else "")
            lines.append(f"| {PROTOCOLS[p][0]} | {eps:g} | {r['rouge1']:.2f} | {r['rouge2']:.2f} | {r['rougeL']:.2f} | "
                         f"{r['selection_score']:.2f} | {r['score_logarithmic']:.3f} | {r['score_brier']:.4f} | "
                         f"{r['score_spherical']:.4f} | {mark} |")
    out.update(branches_how="selected on the held-out training slice", selection=selection,
               selection_metric=SELECTION_METRIC, selection_slice=heldout, selection_examples=n)
    size = f"{n} emails" if n is not None else "not written yet"
    text += (f"; after the switch, smoothing chosen on the held-out training slice: {', '.join(chosen_text)}, "
             f"from {', '.join(map(_eps_name, args.smoothing_grid))} (the paper's formula), by the "
             f"{SELECTION_METRIC} ({size}: the held-out {args.heldout_fraction:g} of train.jsonl that no run trains "
             f"on, less verbatim duplicates of training emails; not dev, the split reported here), seed {seed}; "
             "ties go to the smaller eps. The chosen candidate is that seed's run; the other seeds use the choice "
             "((a) gets no such choice).")
    return text + "\n\n" + "\n".join(lines), out


def report(args: argparse.Namespace, wall_seconds: float | None) -> str:
    per = collect(args)
    cmp_md, cmp = comparisons(args, per)
    a_runs = {s: _runner.run_dir(args.work_dir, s, "a") for s in args.seed_list}
    # how much (a)'s held-out log score still moved over the last quarter of stage 1, and its best step
    plateau_md, plateau_rows = _runner.plateau(a_runs, args.t1, args.t2, what="held-out", best=True)
    ckpt_md, ckpt_rows = checkpoint_rows(args)
    smoothing_md, smoothing = smoothing_report(args)
    # held-out log, Brier and spherical scores and the training loss vs step, mean over seeds
    series = []
    for p in args.protocol_list:
        runs = [r for r in (run_dir(args, s, p) for s in args.seed_list) if r is not None]
        if runs:
            series.append((PROTOCOLS[p][0], runs, {}))
    png = _runner.plot_curves(os.path.join(args.work_dir, "training_curves.png"), series, args.t1,
                              f"AESLC email -> subject, mean over seeds {args.seeds}; dotted line: T1 = "
                              f"{args.t1}", what="held-out")
    settings = next((r.get("rouge_settings") for rows in per.values() for r in rows.values()
                     if r.get("rouge_settings")), None)
    multi_settings = next((r.get("rouge_multi_settings") for rows in per.values() for r in rows.values()
                           if r.get("rouge_multi_settings")), None)
    trunc = next((r.get("truncation_dev") for rows in per.values() for r in rows.values()
                  if r.get("truncation_dev")), None)
    cut = (f" Documents cut to their first {args.max_source_length} BPE tokens in training and evaluation"
           + (f" ({trunc['num_sources_cut']} of the dev documents cut)." if trunc else "."))
    eps = ", ".join(f"({p}) {'pending' if smoothing.get(p) is None else format(smoothing[p], 'g')}"
                    for p in args.protocol_list)
    parts = [
        f"AESLC dev ({'ROUGE F1, rouge-score with stemming' if settings is None else settings}); beam "
        f"{args.num_beams}, at most {args.max_new_tokens} new tokens; token scores and ECE (15 bins, top-1) under "
        f"teacher forcing on dev; mean ± std over seeds. T1 = {args.t1}, T2 = {args.t2}, batch {args.batch_size}, "
        f"smoothing {eps} (below)." + cut
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
    parts.append(smoothing_md)
    if ckpt_md:
        parts += ["The branches' common start, (a)'s checkpoint at T1, on dev (log beam):", ckpt_md]
    if plateau_md:
        parts += ["Plateau of stage 1 (protocol a, held-out slice of train):\n\n" + plateau_md]
    md = "\n\n".join(parts)
    _runner.write_report(args.work_dir, md, {
        "settings": vars(args), "per_seed": per, "smoothing": smoothing, "comparisons": cmp,
        "checkpoint_t1": ckpt_rows, "plateau": plateau_rows, "curves_png": png, "wall_seconds": wall_seconds})
    return md


def main(argv: list[str] | None = None) -> int:
    return _runner.run_benchmark(build_parser().parse_args(argv), check_args, check_settings, tasks, report)


if __name__ == "__main__":
    sys.exit(main())
