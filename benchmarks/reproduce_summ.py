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
(``_stats.paired_bootstrap_means``); across seeds (the unit of evidence) the mean difference with
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
import os
import sys

import _options
import _runner
import _seq2seq
from _runner import read_json_if
from _summ_report import (
    checkpoint_rows,
    collect,
    comparisons,
    main_table,
    objective_table,
    report,
    smoothing_report,
)
from _summ_runs import (
    BRANCH_RULES,
    BRANCHES,
    CONTROLS,
    HELDOUT,
    LABELS,
    OBJECTIVES,
    PENDING,
    PROG,
    PROTOCOLS,
    REQUIRED_FILES,
    ROUGE,
    ROUGE_LABELS,
    RULES,
    SELECTION_METRIC,
    TIE_TOLERANCE,
    VALIDATION_SEED,
    _eps_name,
    a_branch,
    branch_dir,
    branch_eps,
    choose_smoothing,
    eval_argv,
    evaluations,
    grid_dir,
    heldout_examples,
    heldout_path,
    plan,
    protocol_eps,
    run_dir,
    select_smoothing,
    selecting,
    selection_path,
    selection_rows,
    split_file,
    train_argv,
    write_heldout,
)

#: this script's names, with those of the private modules it is split into (``_summ_runs``,
#: ``_summ_report``): ``reproduce_summ.NAME`` keeps working
__all__ = [
    "BRANCHES",
    "BRANCH_RULES",
    "HELDOUT",
    "LABELS",
    "OBJECTIVES",
    "PENDING",
    "PROG",
    "PROTOCOLS",
    "REQUIRED_FILES",
    "RESULT_KEYS",
    "ROUGE",
    "ROUGE_LABELS",
    "RULES",
    "SELECTION_METRIC",
    "TIE_TOLERANCE",
    "VALIDATION_SEED",
    "a_branch",
    "branch_dir",
    "branch_eps",
    "build_parser",
    "check_args",
    "check_settings",
    "checkpoint_rows",
    "choose_smoothing",
    "collect",
    "comparisons",
    "eval_argv",
    "evaluations",
    "grid_dir",
    "heldout_examples",
    "heldout_path",
    "main",
    "main_table",
    "objective_table",
    "parse_grid",
    "plan",
    "protocol_eps",
    "report",
    "run_dir",
    "select_smoothing",
    "selecting",
    "selection_path",
    "selection_rows",
    "smoothing_report",
    "split_file",
    "train_argv",
    "write_heldout",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog=next(part for part in __doc__.split("\n\n") if part.startswith("Cost")),
        formatter_class=_options.HelpFormatter,
    )
    p.add_argument(
        "data_dir", help="directory with train.jsonl and dev.jsonl (AESLC: document, summary, annotations on dev)"
    )
    _options.add_options(p, {"work_dir": "runs/reproduce_summ"})
    p.add_argument(
        "--seeds",
        default="1,2,3",
        help="comma-separated seeds (the unit of evidence); the first also selects the branches' smoothing",
    )
    p.add_argument(
        "--protocols",
        default="a,b,c",
        help=_seq2seq.protocols_help(PROTOCOLS, "b, c and a0") + "; a0 is the control of the switch "
        "(issue 28), not a default",
    )
    p.add_argument(
        "--test-file",
        action="append",
        default=[],
        metavar="FILE",
        help="also decode every final model (beam, log objective) on this JSONL file (document, "
        "summary, optional annotations) and score it; repeatable; no retraining",
    )
    _options.add_options(
        p,
        {
            "t1": {
                "default": 5000,
                "help": "T1: steps of the logarithmic stage before the switch (about 11.5 epochs of "
                "the 13,931 training emails at batch 32; sized from a measured step, see benchmarks/README.md)",
            },
            "t2": 1250,
            "batch_size": {"default": 32, "help": "emails per step"},
            "learning_rate": 1e-3,
            "warmup_steps": 400,
            "smoothing": {
                "default": None,
                "metavar": "EPS",
                "help": "score smoothing of (b) and (c) after the switch, fixed: skips the selection; "
                "none: chosen per rule from --smoothing-grid on the held-out slice of train",
            },
        },
    )
    p.add_argument(
        "--smoothing-a",
        type=float,
        default=0.1,
        metavar="EPS",
        help="score smoothing of (a), all its T steps (so also of the branches' first T1 steps); fixed",
    )
    p.add_argument(
        "--smoothing-grid",
        default="0,0.1",
        metavar="EPS,...",
        help="candidate smoothings of (b), (c) after the switch: the first seed branches once per "
        "candidate, the best mean ROUGE-1/2/L F1 on the held-out slice of train wins (ties: the smaller)",
    )
    _options.add_options(
        p, {"vocab_size": 8000, "hidden_size": {}, "num_layers": {}, "num_heads": {}, "ffn_size": {}, "dropout": {}}
    )
    p.add_argument(
        "--max-source-length",
        type=int,
        default=192,
        help="most BPE tokens of each email body (cut in training and evaluation alike); the model "
        "takes this + 1 positions (the body and EOS), summaries are cut there too",
    )
    p.add_argument(
        "--heldout-fraction",
        type=float,
        default=0.035,
        help="fraction of train.jsonl held out (the same examples for every seed) as the validation "
        "set (the curves, the plateau) and, less verbatim duplicates of training emails, the "
        "selection slice",
    )
    _options.add_options(
        p, {"eval_every": {"help": "held-out scores every N steps (the curves)"}, "save_every": {}, "num_beams": 4}
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        help="most tokens per decoded subject line (the training subjects: 99%% have at most 29 BPE tokens)",
    )
    _options.add_options(
        p,
        {
            "eval_batch_size": {"help": "documents per decoding batch"},
            "bootstrap_samples": {},
            "threads": {},
            "jobs": {},
            "report_only": {},
            "dry_run": {},
            "archive": {},
        },
    )
    return p


def _test_name(path: str) -> str:
    stem = os.path.basename(path)
    for ext in (".jsonl", ".json"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in stem) or "test"


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
    _options.check_data_dir(PROG, args.data_dir, REQUIRED_FILES, "AESLC as JSONL")
    try:
        args.seed_list = _options.int_list(args.seeds)
    except ValueError:
        raise SystemExit(f"{PROG}: --seeds {args.seeds!r}: comma-separated integers expected") from None
    if not args.seed_list:
        raise SystemExit(f"{PROG}: --seeds names no seed")
    args.protocol_list = _options.parse_protocols(PROG, args.protocols, list(PROTOCOLS), (*BRANCHES, *CONTROLS))
    _options.check_stages(
        PROG,
        args,
        (
            "t1",
            "t2",
            "batch_size",
            "eval_every",
            "save_every",
            "num_beams",
            "max_new_tokens",
            "max_source_length",
            "eval_batch_size",
            "bootstrap_samples",
        ),
    )
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
        raise SystemExit(
            f"{PROG}: --max-new-tokens {args.max_new_tokens} exceeds the model's "
            f"{args.max_source_length + 1} positions (--max-source-length + 1)"
        )
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
RESULT_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "ffn_size",
    "dropout",
    "max_source_length",
    "heldout_fraction",
    "batch_size",
    "learning_rate",
    "warmup_steps",
    "smoothing",
    "smoothing_a",
    "smoothing_grid",
    "save_every",
    "t1",
    "t2",
    "num_beams",
    "max_new_tokens",
    "eval_every",
)


def check_settings(args: argparse.Namespace) -> None:
    """Record the settings in ``WORK/settings.json``; refuse to mix settings in one work directory
    (or to report its runs under other settings), and a first seed other than the one a finished
    selection used."""
    _options.check_settings(
        PROG, args.work_dir, {k: getattr(args, k) for k in RESULT_KEYS}, record=not (args.dry_run or args.report_only)
    )
    for protocol in BRANCHES:
        sel = read_json_if(selection_path(args, protocol))
        if sel is not None and selecting(args) and sel["seed"] != args.seed_list[0]:
            raise SystemExit(
                f"{PROG}: the smoothing of ({protocol}) was selected with seed {sel['seed']} "
                f"({selection_path(args, protocol)}); list that seed first in --seeds"
            )


def main(argv: list[str] | None = None) -> int:
    study = _seq2seq.Seq2SeqStudy(
        build_parser().parse_args(argv),
        checks=(check_args, check_settings),
        plan=plan,
        report=report,
        report_files=("results.md", "results.json", "training_curves.png"),
        files=tuple(f"selection_{p}.json" for p in BRANCHES),  # the selection records
    )
    return _runner.run_study(study)


if __name__ == "__main__":
    sys.exit(main())
