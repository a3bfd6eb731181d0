"""Checking a :class:`~properlm.training.config.TrainConfig` before anything is loaded, and the warnings after.

:func:`validate_config` checks every argument, the files, the rule, the schedule, the precision and the output
directory without loading data or models, and raises :class:`~properlm.training.config.ConfigError` naming the
option; it warns about valid options that the configuration ignores (:func:`ignored_option_warnings`). Once the
model and the ``Trainer`` exist, :func:`smoothing_warning` (the paper's masked-log smoothing at a large vocabulary)
and ``warn_if_fsdp_ignored`` (FSDP asked for but not enabled) warn about settings that are valid but likely not
what was meant.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import torch

from ..improper import IMPROPER_OBJECTIVES
from ..models import MIN_VOCAB_SIZE, ModelLoadError, check_model_source, model_config_dict, model_max_positions
from ..options import SMOOTHING_VARIANTS
from ..rules import get_rule
from ..stats import PAPER_SMOOTHING_WARN_VOCAB, warn_paper_smoothing
from .checkpoints import find_checkpoints, finished_run
from .config import LR_SCHEDULERS, ConfigError, TrainConfig

__all__ = [
    "PAPER_SMOOTHING_WARN_VOCAB",
    "expected_vocab_size",
    "ignored_option_warnings",
    "run_smoothing_warning",
    "smoothing_warning",
    "validate_config",
]


def parse_schedule(spec: str) -> Any:
    from ..integrations.schedule import RuleSchedule

    try:
        return RuleSchedule.parse(spec)
    except ValueError as exc:
        raise ConfigError(f"--schedule {spec!r}: {exc}") from None


def _check_precision(cfg: TrainConfig) -> None:
    if cfg.bf16 and cfg.fp16:
        raise ConfigError("choose at most one of --bf16 and --fp16")
    if cfg.fp16 and not torch.cuda.is_available():
        raise ConfigError("--fp16 needs a CUDA GPU (none is available); use --bf16 on CPU or train in float32")
    if cfg.bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError("--bf16: this GPU does not support bfloat16; use --fp16")


def _check_file(path: str | None, option: str) -> None:
    if path is not None and (not os.path.exists(path) or os.path.isdir(path)):  # a pipe (<(command)) is fine
        what = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
        raise ConfigError(f"--{option.replace('_', '-')}: file {path!r} {what}")


def _check_improper(cfg: TrainConfig, rule_spec: str) -> None:
    """``--improper-loss`` replaces the scoring rule: a known name, and none of the rule's own options."""
    name = cfg.improper_loss
    if name not in IMPROPER_OBJECTIVES:
        raise ConfigError(f"--improper-loss must be one of {', '.join(IMPROPER_OBJECTIVES)}, got {name!r}")
    if cfg.schedule is not None:
        raise ConfigError(
            f"--improper-loss {name} cannot be combined with --schedule: the improper objective "
            "replaces the scoring rule for the whole run"
        )
    if cfg.smoothing > 0:
        raise ConfigError(
            f"--improper-loss {name} cannot be combined with --smoothing {cfg.smoothing:g}: score "
            "smoothing is defined for scoring rules only"
        )
    if cfg.smoothing_variant != "paper":
        raise ConfigError(
            f"--improper-loss {name} cannot be combined with --smoothing-variant "
            f"{cfg.smoothing_variant}: score smoothing is defined for scoring rules only"
        )
    if rule_spec != "logarithmic":
        raise ConfigError(
            f"--improper-loss {name} replaces the scoring rule: give either --rule or "
            f"--improper-loss, not both (got --rule {cfg.rule})"
        )


def validate_config(cfg: TrainConfig, warn: bool = True) -> None:
    """Check every argument without loading data or models; raise :class:`ConfigError`.

    With ``warn``, a valid option that has no effect in ``cfg`` (:func:`ignored_option_warnings`) gives a
    ``UserWarning``."""
    try:
        check_model_source(cfg.model, cfg.gguf_file, cfg.init)
    except ModelLoadError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.train_file is None and cfg.source_file is None and cfg.target_file is None:
        raise ConfigError("no training data: pass --train-file (JSON/JSONL) or --source-file and --target-file")
    if cfg.train_file is not None and (cfg.source_file or cfg.target_file):
        raise ConfigError("give either --train-file or --source-file/--target-file, not both")
    if cfg.task == "translation" and cfg.train_file is not None:
        raise ConfigError("--task translation reads --source-file/--target-file, not --train-file")
    if cfg.task in ("instruction", "summarization") and cfg.source_file is not None:
        raise ConfigError(f"--task {cfg.task} reads --train-file (JSON/JSONL), not --source-file/--target-file")
    if (cfg.source_file is None) != (cfg.target_file is None):
        raise ConfigError("translation data needs both --source-file and --target-file")
    if (cfg.validation_source_file is None) != (cfg.validation_target_file is None):
        raise ConfigError(
            "translation validation data needs both --validation-source-file and --validation-target-file"
        )
    for name in (
        "train_file",
        "source_file",
        "target_file",
        "validation_file",
        "validation_source_file",
        "validation_target_file",
    ):
        _check_file(getattr(cfg, name), name)
    has_val_files = cfg.validation_file is not None or cfg.validation_source_file is not None
    if not 0.0 <= cfg.validation_fraction < 1.0:
        raise ConfigError(f"--validation-fraction must be in [0, 1), got {cfg.validation_fraction}")
    if has_val_files and cfg.validation_fraction > 0:
        raise ConfigError("give either validation files or --validation-fraction, not both")
    if cfg.eval_steps is not None and not has_val_files and cfg.validation_fraction == 0:
        raise ConfigError(
            "--eval-steps needs a validation set: --validation-file, --validation-source-file/"
            "--validation-target-file or --validation-fraction"
        )
    try:
        rule = get_rule(cfg.rule)
    except ValueError as exc:
        raise ConfigError(f"--rule: {exc}") from None
    if not 0.0 <= cfg.smoothing < 1.0:
        raise ConfigError(f"--smoothing must be in [0, 1), got {cfg.smoothing}")
    if cfg.smoothing_variant not in SMOOTHING_VARIANTS:
        raise ConfigError(
            f"--smoothing-variant must be one of {', '.join(SMOOTHING_VARIANTS)}, got {cfg.smoothing_variant!r}"
        )
    if cfg.improper_loss is not None:
        _check_improper(cfg, rule.spec)
    if cfg.smoothing > 0:
        try:
            rule.mean_score_scales()
        except NotImplementedError as exc:
            raise ConfigError(f"--smoothing: {exc}") from None
    if cfg.torch_compile:
        backends = torch._dynamo.list_backends(exclude_tags=())
        if cfg.torch_compile_backend not in backends:
            raise ConfigError(
                f"--torch-compile-backend must be one of {', '.join(backends)}, got {cfg.torch_compile_backend!r}"
            )
    positive = [
        "vocab_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "max_length",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "logging_steps",
        "lora_r",
    ]
    optional_positive = [
        "max_steps",
        "per_device_eval_batch_size",
        "eval_steps",
        "save_steps",
        "save_total_limit",
        "ffn_size",
    ]
    for name in positive + optional_positive:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
    for name in ("warmup_steps", "average_last", "dataloader_num_workers", "weight_decay", "max_grad_norm"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    for name in ("weight_decay", "lora_alpha"):
        if not math.isfinite(getattr(cfg, name)):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(cfg, name)}")
    if math.isnan(cfg.max_grad_norm):
        raise ConfigError("--max-grad-norm must be a number >= 0 (0 disables clipping), got nan")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.max_length < 2:
        raise ConfigError(f"--max-length must be at least 2, got {cfg.max_length}")
    if cfg.max_source_length is not None and cfg.max_source_length < 1:
        raise ConfigError(f"--max-source-length must be positive, got {cfg.max_source_length}")
    if cfg.init is None:
        limit, key = model_max_positions(model_config_dict(cfg.model, cfg.gguf_file))
        if limit is not None and cfg.max_length > limit:
            raise ConfigError(
                f"--max-length {cfg.max_length} exceeds the {limit} positions model {cfg.model!r} "
                f"takes ({key} in its config.json); use --max-length {limit} or less"
            )
    if not cfg.learning_rate > 0 or not math.isfinite(cfg.learning_rate):
        raise ConfigError(f"--learning-rate must be positive, got {cfg.learning_rate}")
    if not cfg.num_train_epochs > 0 or not math.isfinite(cfg.num_train_epochs):
        raise ConfigError(f"--num-train-epochs must be positive, got {cfg.num_train_epochs}")
    if cfg.lr_scheduler not in LR_SCHEDULERS:
        raise ConfigError(f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {cfg.lr_scheduler!r}")
    if not 0.0 <= cfg.dropout < 1.0 or not 0.0 <= cfg.lora_dropout < 1.0:
        raise ConfigError("--dropout and --lora-dropout must be in [0, 1)")
    if cfg.init is not None and cfg.vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"--vocab-size must be at least {MIN_VOCAB_SIZE} (256 bytes + special tokens) for the "
            f"byte-level BPE of --init, got {cfg.vocab_size}"
        )
    if cfg.init is not None and cfg.hidden_size % cfg.num_heads:
        raise ConfigError(f"--hidden-size {cfg.hidden_size} is not divisible by --num-heads {cfg.num_heads}")
    if cfg.schedule is not None:
        schedule = parse_schedule(cfg.schedule)
        if cfg.max_steps is not None and cfg.max_steps != schedule.total_steps:
            raise ConfigError(
                f"--max-steps {cfg.max_steps} differs from the schedule's total of "
                f"{schedule.total_steps} steps ({cfg.schedule}); omit --max-steps"
            )
        if cfg.rule != "logarithmic" and get_rule(cfg.rule) != schedule.rule_at(0):
            raise ConfigError("give either --rule or --schedule, not both")
    if cfg.average_last > 0 and cfg.save_steps is None:
        raise ConfigError("--average-last needs checkpoints: set --save-steps")
    if cfg.save_total_limit is not None and cfg.save_total_limit < cfg.average_last:
        raise ConfigError(
            f"--save-total-limit {cfg.save_total_limit} keeps fewer checkpoints than --average-last {cfg.average_last}"
        )
    _check_precision(cfg)
    if cfg.lora:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ConfigError("--lora needs the 'peft' package: pip install peft") from None
    if os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
        raise ConfigError(f"--output-dir {cfg.output_dir!r} is a file")
    checkpoints = find_checkpoints(cfg.output_dir)
    _check_earlier_run(cfg, checkpoints)
    if warn:
        import warnings

        from ..evaluation.precision import emulated_bf16_warning

        slow = emulated_bf16_warning("auto", "training") if cfg.bf16 else None
        smoothing = run_smoothing_warning(cfg, expected_vocab_size(cfg))
        for message in [
            *ignored_option_warnings(cfg),
            *_earlier_run_warnings(cfg, checkpoints),
            *_resume_warnings(cfg, checkpoints),
            *([slow] if slow else []),
            *([smoothing] if smoothing else []),
        ]:
            warnings.warn(message, UserWarning, stacklevel=2)


def _check_earlier_run(cfg: TrainConfig, checkpoints: list[str]) -> None:
    """Refuse to train into an earlier run's ``--output-dir`` unless told what to do with it.

    Its checkpoints need ``--resume`` (continue) or ``--overwrite-output-dir`` (start afresh); a finished run
    with no checkpoint left (``final/``, ``results.json``) needs ``--overwrite-output-dir``: a new run would
    append to its ``metrics.jsonl``, take up its tokenizer and overwrite its ``final/``.
    """
    finished = finished_run(cfg.output_dir)
    if cfg.resume and not checkpoints:
        held = f" (it holds a finished run: {', '.join(finished)})" if finished else ""
        raise ConfigError(f"--resume: no checkpoint-N directory in {cfg.output_dir!r} to resume from{held}")
    if cfg.resume or cfg.overwrite_output_dir:
        return
    if checkpoints:
        raise ConfigError(
            f"--output-dir {cfg.output_dir!r} already holds checkpoints; pass --resume to continue "
            "that run or --overwrite-output-dir to start afresh"
        )
    if finished:
        raise ConfigError(
            f"--output-dir {cfg.output_dir!r} holds a finished run ({', '.join(finished)}); pass "
            "--overwrite-output-dir to replace it, or choose another --output-dir"
        )


def _resume_warnings(cfg: TrainConfig, checkpoints: list[str]) -> list[str]:
    """With ``--resume``: one message naming the options that differ from the newest checkpoint's run."""
    from .resume import resume_differences

    if not cfg.resume or not checkpoints:
        return []
    changed = resume_differences(cfg, checkpoints[-1])
    if not changed:
        return []
    return [
        f"--resume: {len(changed)} option(s) differ from the run saved in {checkpoints[-1]!r}: "
        f"{'; '.join(changed)}. Training continues with the new values, so the result is not the run "
        "that the original command would have produced without the interruption"
    ]


def _earlier_run_warnings(cfg: TrainConfig, checkpoints: list[str]) -> list[str]:
    """Messages for what an earlier run left in ``--output-dir`` that a new (not ``--resume``) run takes up.

    The tokenizer of ``OUTPUT_DIR/tokenizer`` (an ``--init`` run loads it instead of training one), the
    records of ``metrics.jsonl`` (appended to). None with ``--overwrite-output-dir``, which removes the earlier
    run first (:func:`properlm.training.checkpoints.remove_earlier_run`)."""
    if cfg.resume or cfg.overwrite_output_dir:  # continued, or removed before training
        return []
    out: list[str] = []
    if cfg.init is not None and os.path.isfile(os.path.join(cfg.output_dir, "tokenizer", "tokenizer.json")):
        out.append(
            f"--output-dir {cfg.output_dir!r} holds the tokenizer of an earlier run (tokenizer/): this --init "
            "run uses it as it is, so --vocab-size and the training data do not change it; to train a new "
            "tokenizer, remove that directory, choose another --output-dir, or pass --overwrite-output-dir "
            "(which removes the earlier run)"
        )
    if os.path.isfile(os.path.join(cfg.output_dir, "metrics.jsonl")):
        out.append(
            f"--output-dir {cfg.output_dir!r} holds the metrics.jsonl of an earlier run: this run appends its "
            "records to it, after the earlier run's (--overwrite-output-dir removes the earlier run first)"
        )
    return out


#: the options that only configure a fresh ``--init`` model, and those that only configure ``--lora``
_INIT_OPTIONS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size", "dropout")
_LORA_OPTIONS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")


def _flags(names: list[str]) -> tuple[str, bool]:
    """``("--a, --b", plural)`` for option names ``["a", "b"]``."""
    return ", ".join("--" + n.replace("_", "-") for n in names), len(names) > 1


def ignored_option_warnings(cfg: TrainConfig) -> list[str]:
    """Messages for valid options that this ``cfg`` ignores or that do less than asked (none: ``[]``).

    An option counts as given when it differs from its default: the ``--init`` model options without
    ``--init``, the LoRA options without ``--lora``, ``--torch-compile-backend`` without ``--torch-compile``,
    ``--validation-seed`` without ``--validation-fraction``, ``--smoothing-variant`` without ``--smoothing``,
    ``--save-total-limit`` without ``--save-steps``, ``--num-train-epochs`` with a step count, the language
    names with ``--train-file`` data; and, with a known step count N (``--max-steps`` or ``--schedule``),
    ``--warmup-steps`` >= N (the peak learning rate is never reached) and ``--average-last`` K above the
    ceil(N / --save-steps) checkpoints the run saves.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}

    def given(name: str) -> bool:
        return getattr(cfg, name) != defaults[name]

    out: list[str] = []
    if cfg.init is None:
        flags, plural = _flags([n for n in _INIT_OPTIONS if given(n)])
        if flags:
            out.append(
                f"{flags} only configure{'' if plural else 's'} a fresh --init model and "
                f"{'have' if plural else 'has'} no effect on --model/--gguf-file, whose own configuration "
                "is used"
            )
    if not cfg.lora:
        flags, plural = _flags([n for n in _LORA_OPTIONS if given(n)])
        if flags:
            out.append(f"{flags} {'have' if plural else 'has'} no effect without --lora")
    if not cfg.torch_compile and given("torch_compile_backend"):
        out.append(f"--torch-compile-backend {cfg.torch_compile_backend} has no effect without --torch-compile")
    if cfg.validation_seed is not None and cfg.validation_fraction == 0:
        out.append(f"--validation-seed {cfg.validation_seed} has no effect without --validation-fraction")
    if cfg.smoothing == 0 and given("smoothing_variant"):
        out.append(f"--smoothing-variant {cfg.smoothing_variant} has no effect without --smoothing")
    if cfg.save_total_limit is not None and cfg.save_steps is None:
        out.append(
            f"--save-total-limit {cfg.save_total_limit} has no effect without --save-steps (no checkpoints are saved)"
        )
    steps = None
    if cfg.schedule is not None:
        steps = parse_schedule(cfg.schedule).total_steps
    elif cfg.max_steps is not None:
        steps = cfg.max_steps
    if steps is not None and given("num_train_epochs"):
        out.append(
            f"--num-train-epochs {cfg.num_train_epochs:g} has no effect: the run takes {steps} steps "
            f"({'--schedule' if cfg.schedule is not None else '--max-steps'})"
        )
    if cfg.train_file is not None:
        flags, plural = _flags([n for n in ("source_lang", "target_lang") if getattr(cfg, n) is not None])
        if flags:
            out.append(
                f"{flags} only name{'' if plural else 's'} a language of --source-file/--target-file "
                f"translation prompts and {'have' if plural else 'has'} no effect on --train-file data"
            )
    if steps is not None and cfg.warmup_steps >= steps:
        out.append(
            f"--warmup-steps {cfg.warmup_steps} is not below the run's {steps} steps: the learning rate "
            f"rises linearly for the whole run and never reaches --learning-rate {cfg.learning_rate:g}"
        )
    if steps is not None and cfg.save_steps is not None and cfg.average_last > 0:
        saved = -(-steps // cfg.save_steps)
        if cfg.average_last > saved:
            out.append(
                f"--average-last {cfg.average_last}: the run saves only {saved} checkpoint(s) (every "
                f"{cfg.save_steps} of {steps} steps, and the last), so OUTPUT_DIR/averaged averages "
                f"{saved}"
            )
    return out


def smoothing_warning(rule: str, smoothing: float, smoothing_variant: str, vocab_size: int) -> str | None:
    """The warning for the paper's masked-log smoothing of a bounded rule at a large vocabulary, or ``None``.

    It warns for a bounded rule (or a mixture with one) smoothed with the paper's masked-log term at a
    vocabulary of at least :data:`PAPER_SMOOTHING_WARN_VOCAB` tokens.
    """
    import warnings

    rule_obj = get_rule(rule)
    with warnings.catch_warnings():  # the library's warning of the same thing (properlm.stats) stays silent then
        warnings.simplefilter("ignore")
        if not warn_paper_smoothing(rule_obj, smoothing, smoothing_variant, vocab_size):
            return None
    return (
        f"--smoothing {smoothing:g} with the bounded rule {rule_obj.spec!r} uses the paper's masked-log term "
        f"(--smoothing-variant paper) at a vocabulary of {vocab_size} tokens: it pulls the target's "
        "probability down by about eps per token until every tail token reaches eps/V, and under Adam this "
        "flattens the distribution within a few steps (SmolLM2, V = 49152: decoding degenerates). "
        "Use --smoothing-variant gated (or none); see the README, 'Score smoothing'."
    )


def expected_vocab_size(cfg: TrainConfig) -> int | None:
    """The vocabulary size the run will have, known before loading anything.

    ``--vocab-size`` of ``--init`` (an upper bound: the trained tokenizer may be smaller), or the local model
    directory's ``config.json`` (also a nested ``text_config``); ``None`` for a hub id or a GGUF file.
    """
    if cfg.init is not None:
        return cfg.vocab_size
    config = model_config_dict(cfg.model, cfg.gguf_file) or {}
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(vocab) if isinstance(vocab, int) else None


def run_smoothing_warning(cfg: TrainConfig, vocab_size: int | None) -> str | None:
    """:func:`smoothing_warning` for the run's rules (every stage of a schedule) at ``vocab_size``, or ``None``."""
    if vocab_size is None or cfg.improper_loss is not None:
        return None
    rules = [r for r, _ in parse_schedule(cfg.schedule).stages] if cfg.schedule else [cfg.rule]
    for rule in rules:
        message = smoothing_warning(rule, cfg.smoothing, cfg.smoothing_variant, vocab_size)
        if message is not None:
            return message
    return None


def warn_if_fsdp_ignored(trainer: Any) -> None:
    """Warn when ``accelerate launch --use_fsdp`` asked for FSDP but the Trainer does not shard.

    accelerate (checked with 1.15) switches to FSDP only on accelerators (its ``AcceleratorState``
    keeps ``DistributedType.MULTI_CPU`` for CPU processes over gloo), so on CPUs it trains with
    plain DDP, full model on every process, and says nothing.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not trainer.is_fsdp_enabled:
        import warnings

        warnings.warn(
            "FSDP was requested (accelerate launch --use_fsdp) but accelerate did not enable it for "
            f"distributed type {trainer.accelerator.distributed_type}: accelerate shards with FSDP only on "
            "accelerators (GPU, XPU, NPU, ...), so this run trains with DDP, an unsharded model on every process",
            stacklevel=2,
        )
