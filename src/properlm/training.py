"""The training driver behind ``properlm train``.

One :class:`TrainConfig` in, a trained model, checkpoints, logs and a results JSON out.

Flow (:func:`run_training`)::

    validate_config (arguments, files, rule, schedule, precision)      -- fails fast, loads nothing
    load_examples (validated line by line)                              -- fails before any model is loaded
    load_model_and_tokenizer (directory / hub id / GGUF / --init + BPE)
    [LoRA]  peft.get_peft_model
    apply_scoring_rule(model, first rule, smoothing, fused)             -- the loss of every forward with labels
      (apply_improper_loss(model, name, fused) with --improper-loss: an improper baseline, properlm.improper)
    transformers.Trainer  + RuleScheduleCallback (switches the rule at stage boundaries)
                          + MetricsLogCallback   (output_dir/metrics.jsonl)
                          + TensorBoard (when installed)
    evaluation: every rule's mean held-out token score (logarithmic, brier, spherical, the training rule)
    output_dir/final, output_dir/averaged (mean of the last K checkpoints), output_dir/results.json

Resuming (``resume=True``) continues from the newest ``checkpoint-N`` in ``output_dir`` with
the optimizer, scheduler, RNG and data-order state of the Trainer; the rule schedule is
indexed by the global step, so it resumes in the right stage.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .data import DataError, Example, load_examples, split_validation
from .improper import IMPROPER_OBJECTIVES
from .modeling import (
    INIT_CONFIGS,
    MIN_VOCAB_SIZE,
    TRAINING_RECORD,
    ModelLoadError,
    check_model_source,
    gguf_location,
    is_seq2seq,
    model_config_dict,
    model_max_positions,
    record_gguf_base,
    unwrap_model,
)
from .rules import get_rule
from .stats import SMOOTHING_VARIANTS

__all__ = [
    "EVAL_RULES",
    "LR_SCHEDULERS",
    "ConfigError",
    "TrainConfig",
    "average_checkpoints",
    "config_fields",
    "eval_rules",
    "find_checkpoints",
    "load_yaml_config",
    "make_config",
    "run_training",
    "validate_config",
    "write_training_record",
]

#: accepted ``lr_scheduler`` values (``inverse_sqrt``: linear warm-up, then ``lr * sqrt(warmup / step)``)
LR_SCHEDULERS = ("inverse_sqrt", "cosine", "linear", "constant")

#: rules whose mean held-out token score every evaluation reports
EVAL_RULES = ("logarithmic", "brier", "spherical")

#: float32 elements of one chunk of logits rows in the evaluation's score computation (64 MiB)
_EVAL_CHUNK_ELEMENTS = 1 << 24

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class ConfigError(ValueError):
    """A training argument (from the command line or the YAML file) is invalid."""


def _opt(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    """Every option of ``properlm train``; the YAML keys are these field names (``-`` or ``_``)."""

    # model
    model: str | None = _opt(None, "model to train: a local directory (save_pretrained) or a hub id", group="model")
    gguf_file: str | None = _opt(None, "a GGUF model file (needs the 'gguf' package); a path, or a file name "
                                 "inside --model", group="model")
    init: str | None = _opt(None, "train a fresh model from a named small config, with a BPE tokenizer trained "
                            "on the training data", choices=INIT_CONFIGS, group="model")
    vocab_size: int = _opt(1000, "--init: BPE vocabulary size", group="model")
    hidden_size: int = _opt(128, "--init: hidden size", group="model")
    num_layers: int = _opt(2, "--init: number of layers (encoder and decoder each for tiny-seq2seq)", group="model")
    num_heads: int = _opt(4, "--init: attention heads", group="model")
    ffn_size: int | None = _opt(None, "--init: feed-forward size; none means 4 x hidden size", group="model")
    dropout: float = _opt(0.1, "--init: dropout", group="model")
    # data
    train_file: str | None = _opt(None, "training data: Alpaca JSON/JSONL (instruction, input, output) or JSONL "
                                  "with document/summary", group="data")
    source_file: str | None = _opt(None, "translation: source sentences, one per line", group="data")
    target_file: str | None = _opt(None, "translation: target sentences, line-aligned with --source-file",
                                   group="data")
    source_lang: str | None = _opt(None, "translation: source language name (decoder-only prompt)", group="data")
    target_lang: str | None = _opt(None, "translation: target language name (decoder-only prompt)", group="data")
    task: str | None = _opt(None, "data format; detected from the files when omitted",
                            choices=("instruction", "translation", "summarization"), group="data")
    validation_file: str | None = _opt(None, "validation data in the format of --train-file", group="data")
    validation_source_file: str | None = _opt(None, "translation validation: source sentences", group="data")
    validation_target_file: str | None = _opt(None, "translation validation: target sentences", group="data")
    validation_fraction: float = _opt(0.0, "split this fraction of the training data off as the validation set "
                                      "(when no validation files are given)", group="data")
    validation_seed: int | None = _opt(None, "seed of the --validation-fraction split; none means --seed (a fixed "
                                       "value holds out the same examples in runs with different seeds)",
                                       group="data")
    max_length: int = _opt(512, "maximum tokens per sequence (longer ones are truncated)", group="data")
    max_source_length: int | None = _opt(None, "cut each source text (document, source sentence, instruction "
                                         "input) to its first N tokens before the prompt template; recorded with "
                                         "the model, and `properlm evaluate` cuts the same way; none means only "
                                         "--max-length cuts", group="data")
    # objective
    rule: str = _opt("logarithmic", "scoring rule: logarithmic, brier, spherical, power:ALPHA, "
                     "pseudo-spherical:ALPHA", group="objective")
    smoothing: float = _opt(0.0, "score smoothing eps in [0, 1)", group="objective")
    smoothing_variant: str = _opt("paper", "masked-log term of score smoothing for bounded rules: paper (the "
                                  "paper's formula; it flattens the distribution at large vocabularies), gated (the "
                                  "term only on tokens predicted with p > 1 - eps: recommended for LLM vocabularies) "
                                  "or none (no masked-log term)", choices=SMOOTHING_VARIANTS, group="objective")
    schedule: str | None = _opt(None, "rule schedule RULE:STEPS,RULE:STEPS,... e.g. logarithmic:13000,brier:5000 "
                                "(one optimizer across stages; --max-steps defaults to the total)",
                                group="objective")
    improper_loss: str | None = _opt(None, "train with an improper baseline objective instead of the scoring rule: "
                                     "dft (-log p * stopgrad(p), Wu et al. 2025; TRL's loss_type='dft') or "
                                     "one-minus-p (1 - p, Li et al. 2025). Not proper: the expected loss is minimised "
                                     "at the one-hot on the most likely token. Not with --schedule or --smoothing",
                                     choices=tuple(IMPROPER_OBJECTIVES), group="objective")
    fused: bool = _opt(True, "use the fused (chunked, no full logits) loss; --no-fused computes the loss on the "
                       "model's logits", group="objective", negate="--no-fused")
    # optimisation
    output_dir: str = _opt("properlm_output", "directory for checkpoints, logs and the final model",
                           group="optimisation")
    overwrite_output_dir: bool = _opt(False, "allow an output directory that already holds checkpoints "
                                      "(without --resume)", group="optimisation")
    seed: int = _opt(42, "random seed (model init, data order, dropout)", group="optimisation")
    max_steps: int | None = _opt(None, "number of optimizer steps; none means --num-train-epochs decides",
                                 group="optimisation")
    num_train_epochs: float = _opt(1.0, "epochs when --max-steps is not given", group="optimisation")
    per_device_train_batch_size: int = _opt(8, "examples per device per step", group="optimisation")
    per_device_eval_batch_size: int | None = _opt(None, "evaluation batch size; none means the training one",
                                                  group="optimisation")
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step", group="optimisation")
    group_by_length: bool = _opt(False, "draw batches of examples of similar length (less padding: about 2x faster "
                                 "on short, varied sentences; the order stays random across batches)",
                                 group="optimisation")
    learning_rate: float = _opt(5e-5, "peak learning rate", group="optimisation")
    lr_scheduler: str = _opt("inverse_sqrt", "learning-rate schedule after warm-up", choices=LR_SCHEDULERS,
                             group="optimisation")
    warmup_steps: int = _opt(0, "linear warm-up steps", group="optimisation")
    weight_decay: float = _opt(0.0, "AdamW weight decay", group="optimisation")
    adam_beta1: float = _opt(0.9, "AdamW beta1", group="optimisation")
    adam_beta2: float = _opt(0.999, "AdamW beta2 (the paper uses 0.98)", group="optimisation")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 disables)", group="optimisation")
    bf16: bool = _opt(False, "bfloat16 mixed precision (CUDA with bf16 support, or CPU)", group="optimisation")
    fp16: bool = _opt(False, "float16 mixed precision (CUDA only)", group="optimisation")
    torch_compile: bool = _opt(False, "compile the model with torch.compile (TrainingArguments(torch_compile=True)); "
                               "the scoring-rule losses trace without graph breaks", group="optimisation")
    torch_compile_backend: str = _opt("inductor", "torch.compile backend for --torch-compile (aot_eager traces "
                                      "without generating kernels: for debugging)", group="optimisation")
    # LoRA
    lora: bool = _opt(False, "train LoRA adapters (peft) instead of all weights", group="lora")
    lora_r: int = _opt(8, "LoRA rank", group="lora")
    lora_alpha: float = _opt(16.0, "LoRA alpha", group="lora")
    lora_dropout: float = _opt(0.05, "LoRA dropout", group="lora")
    lora_target_modules: str = _opt("all-linear", "comma-separated module names to adapt, or all-linear",
                                    group="lora")
    # evaluation, checkpoints, logs
    eval_steps: int | None = _opt(None, "evaluate on the validation set every N steps (and always at the end)",
                                  group="checkpoints")
    save_steps: int | None = _opt(None, "save a checkpoint every N steps", group="checkpoints")
    save_total_limit: int | None = _opt(None, "keep at most this many checkpoints (at least --average-last)",
                                        group="checkpoints")
    average_last: int = _opt(0, "average the parameters of the last K checkpoints into OUTPUT_DIR/averaged",
                             group="checkpoints")
    resume: bool = _opt(False, "continue a stopped run from the newest checkpoint in --output-dir",
                        group="checkpoints")
    logging_steps: int = _opt(10, "log the training loss and learning rate every N steps", group="checkpoints")
    tensorboard: bool = _opt(True, "write TensorBoard logs to OUTPUT_DIR/runs (when tensorboard is installed)",
                             group="checkpoints", negate="--no-tensorboard")
    progress_bar: bool = _opt(True, "show the progress bar", group="checkpoints", negate="--no-progress-bar")
    dataloader_num_workers: int = _opt(0, "data loader worker processes", group="checkpoints")


def config_fields() -> list[dataclasses.Field]:
    """The fields of :class:`TrainConfig` (name, default, ``metadata['help']``, ...)."""
    return list(dataclasses.fields(TrainConfig))


# ------------------------------------------------------------------------------ building configs


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    """Convert a YAML/keyword value to the field's type, or raise :class:`ConfigError`."""
    if value is None:
        if f.default is None:
            return None
        raise ConfigError(f"{source}: option {f.name!r} cannot be null")
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    base = kind.replace(" | None", "")
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base == "str":
            if isinstance(value, list) and f.name == "lora_target_modules" and all(isinstance(v, str) for v in value):
                return ",".join(value)
            if isinstance(value, (dict, list, bool)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: option {f.name!r} must be {base}, got {value!r}") from None
    return value


def make_config(values: Mapping[str, Any], source: str = "config") -> TrainConfig:
    """A :class:`TrainConfig` from a mapping of option names (``-`` or ``_``) to values.

    Unknown names raise :class:`ConfigError` naming the key and the allowed ones."""
    fields = {f.name: f for f in config_fields()}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise ConfigError(f"{source}: unknown option {key!r}; allowed options: {', '.join(sorted(fields))}")
        kwargs[name] = _coerce(fields[name], value, source)
    return TrainConfig(**kwargs)


def load_yaml_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping of options (keys as in :class:`TrainConfig`, ``-`` or ``_``)."""
    import yaml

    p = os.fspath(path)
    if not os.path.isfile(p):
        raise ConfigError(f"config file {p!r} does not exist")
    try:
        with open(p, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p!r} must hold a mapping of option: value, got {type(data).__name__}")
    fields = {f.name for f in config_fields()}
    for key in data:
        name = str(key).replace("-", "_")
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"config file {p}: unknown key {key!r}{hint}; allowed keys: {', '.join(sorted(fields))}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


# ------------------------------------------------------------------------------ validation


def _parse_schedule(spec: str) -> Any:
    from .integrations.schedule import RuleSchedule

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
    if path is not None and not os.path.isfile(path):
        raise ConfigError(f"--{option.replace('_', '-')}: file {path!r} does not exist")


def _check_improper(cfg: TrainConfig, rule_spec: str) -> None:
    """``--improper-loss`` replaces the scoring rule: a known name, and none of the rule's own options."""
    name = cfg.improper_loss
    if name not in IMPROPER_OBJECTIVES:
        raise ConfigError(f"--improper-loss must be one of {', '.join(IMPROPER_OBJECTIVES)}, got {name!r}")
    if cfg.schedule is not None:
        raise ConfigError(f"--improper-loss {name} cannot be combined with --schedule: the improper objective "
                          "replaces the scoring rule for the whole run")
    if cfg.smoothing > 0:
        raise ConfigError(f"--improper-loss {name} cannot be combined with --smoothing {cfg.smoothing:g}: score "
                          "smoothing is defined for scoring rules only")
    if cfg.smoothing_variant != "paper":
        raise ConfigError(f"--improper-loss {name} cannot be combined with --smoothing-variant "
                          f"{cfg.smoothing_variant}: score smoothing is defined for scoring rules only")
    if rule_spec != "logarithmic":
        raise ConfigError(f"--improper-loss {name} replaces the scoring rule: give either --rule or "
                          f"--improper-loss, not both (got --rule {cfg.rule})")


def validate_config(cfg: TrainConfig) -> None:
    """Check every argument without loading data or models; raise :class:`ConfigError`."""
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
        raise ConfigError("translation validation data needs both --validation-source-file and "
                          "--validation-target-file")
    for name in ("train_file", "source_file", "target_file", "validation_file", "validation_source_file",
                 "validation_target_file"):
        _check_file(getattr(cfg, name), name)
    has_val_files = cfg.validation_file is not None or cfg.validation_source_file is not None
    if not 0.0 <= cfg.validation_fraction < 1.0:
        raise ConfigError(f"--validation-fraction must be in [0, 1), got {cfg.validation_fraction}")
    if has_val_files and cfg.validation_fraction > 0:
        raise ConfigError("give either validation files or --validation-fraction, not both")
    if cfg.eval_steps is not None and not has_val_files and cfg.validation_fraction == 0:
        raise ConfigError("--eval-steps needs a validation set: --validation-file, --validation-source-file/"
                          "--validation-target-file or --validation-fraction")
    try:
        rule = get_rule(cfg.rule)
    except ValueError as exc:
        raise ConfigError(f"--rule: {exc}") from None
    if not 0.0 <= cfg.smoothing < 1.0:
        raise ConfigError(f"--smoothing must be in [0, 1), got {cfg.smoothing}")
    if cfg.smoothing_variant not in SMOOTHING_VARIANTS:
        raise ConfigError(f"--smoothing-variant must be one of {', '.join(SMOOTHING_VARIANTS)}, "
                          f"got {cfg.smoothing_variant!r}")
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
            raise ConfigError(f"--torch-compile-backend must be one of {', '.join(backends)}, "
                              f"got {cfg.torch_compile_backend!r}")
    positive = ["vocab_size", "hidden_size", "num_layers", "num_heads", "max_length", "per_device_train_batch_size",
                "gradient_accumulation_steps", "logging_steps", "lora_r"]
    optional_positive = ["max_steps", "per_device_eval_batch_size", "eval_steps", "save_steps", "save_total_limit",
                         "ffn_size"]
    for name in positive + optional_positive:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
    for name in ("warmup_steps", "average_last", "dataloader_num_workers", "weight_decay", "max_grad_norm"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.max_length < 2:
        raise ConfigError(f"--max-length must be at least 2, got {cfg.max_length}")
    if cfg.max_source_length is not None and cfg.max_source_length < 1:
        raise ConfigError(f"--max-source-length must be positive, got {cfg.max_source_length}")
    if cfg.init is None:
        limit, key = model_max_positions(model_config_dict(cfg.model, cfg.gguf_file))
        if limit is not None and cfg.max_length > limit:
            raise ConfigError(f"--max-length {cfg.max_length} exceeds the {limit} positions model {cfg.model!r} "
                              f"takes ({key} in its config.json); use --max-length {limit} or less")
    if not cfg.learning_rate > 0 or not math.isfinite(cfg.learning_rate):
        raise ConfigError(f"--learning-rate must be positive, got {cfg.learning_rate}")
    if cfg.num_train_epochs <= 0:
        raise ConfigError(f"--num-train-epochs must be positive, got {cfg.num_train_epochs}")
    if cfg.lr_scheduler not in LR_SCHEDULERS:
        raise ConfigError(f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {cfg.lr_scheduler!r}")
    if not 0.0 <= cfg.dropout < 1.0 or not 0.0 <= cfg.lora_dropout < 1.0:
        raise ConfigError("--dropout and --lora-dropout must be in [0, 1)")
    if cfg.init is not None and cfg.vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"--vocab-size must be at least {MIN_VOCAB_SIZE} (256 bytes + special tokens) for the "
                          f"byte-level BPE of --init, got {cfg.vocab_size}")
    if cfg.init is not None and cfg.hidden_size % cfg.num_heads:
        raise ConfigError(f"--hidden-size {cfg.hidden_size} is not divisible by --num-heads {cfg.num_heads}")
    if cfg.schedule is not None:
        schedule = _parse_schedule(cfg.schedule)
        if cfg.max_steps is not None and cfg.max_steps != schedule.total_steps:
            raise ConfigError(f"--max-steps {cfg.max_steps} differs from the schedule's total of "
                              f"{schedule.total_steps} steps ({cfg.schedule}); omit --max-steps")
        if cfg.rule != "logarithmic" and get_rule(cfg.rule) != schedule.rule_at(0):
            raise ConfigError("give either --rule or --schedule, not both")
    if cfg.average_last > 0 and cfg.save_steps is None:
        raise ConfigError("--average-last needs checkpoints: set --save-steps")
    if cfg.save_total_limit is not None and cfg.save_total_limit < cfg.average_last:
        raise ConfigError(f"--save-total-limit {cfg.save_total_limit} keeps fewer checkpoints than --average-last "
                          f"{cfg.average_last}")
    _check_precision(cfg)
    if cfg.lora:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ConfigError("--lora needs the 'peft' package: pip install peft") from None
    if os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
        raise ConfigError(f"--output-dir {cfg.output_dir!r} is a file")
    checkpoints = find_checkpoints(cfg.output_dir)
    if cfg.resume and not checkpoints:
        raise ConfigError(f"--resume: no checkpoint-N directory in {cfg.output_dir!r} to resume from")
    if not cfg.resume and checkpoints and not cfg.overwrite_output_dir:
        raise ConfigError(f"--output-dir {cfg.output_dir!r} already holds checkpoints; pass --resume to continue "
                          "that run or --overwrite-output-dir to start afresh")


# ------------------------------------------------------------------------------ checkpoints


def find_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """``checkpoint-N`` directories in ``output_dir`` that hold a ``trainer_state.json``, by step."""
    d = os.fspath(output_dir)
    if not os.path.isdir(d):
        return []
    found = []
    for name in os.listdir(d):
        m = _CHECKPOINT_RE.match(name)
        if m and os.path.isfile(os.path.join(d, name, "trainer_state.json")):
            found.append((int(m.group(1)), os.path.join(d, name)))
    return [p for _, p in sorted(found)]


def _weights_file(checkpoint: str) -> str:
    for name in ("adapter_model.safetensors", "model.safetensors"):
        path = os.path.join(checkpoint, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{checkpoint} holds no model.safetensors / adapter_model.safetensors "
                            "(sharded checkpoints are not supported for averaging)")


def average_checkpoints(checkpoints: Sequence[str]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the parameters saved in ``checkpoints``.

    Accumulated in float64, returned in each tensor's stored dtype. Non-floating tensors are taken from
    the last checkpoint. Keys are as stored (full model or PEFT adapter)."""
    from safetensors.torch import load_file

    if not checkpoints:
        raise ValueError("average_checkpoints needs at least one checkpoint")
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path in checkpoints:
        state = load_file(_weights_file(path))
        if total and set(state) != set(total):
            raise ValueError(f"{path} holds different parameters from {checkpoints[0]}")
        for k, v in state.items():
            dtypes[k] = v.dtype
            if v.is_floating_point():
                total[k] = total.get(k, 0) + v.to(torch.float64)
            else:
                total[k] = v
    n = len(checkpoints)
    return {k: (v / n).to(dtypes[k]) if dtypes[k].is_floating_point else v for k, v in total.items()}


def _load_averaged(model: Any, state: dict[str, torch.Tensor], lora: bool) -> None:
    if lora:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        unexpected = getattr(result, "unexpected_keys", [])
    else:
        result = unwrap_model(model).load_state_dict(state, strict=False)
        unexpected = result.unexpected_keys
    if unexpected:
        raise RuntimeError(f"averaged checkpoint has parameters the model lacks: {unexpected[:5]}")


# ------------------------------------------------------------------------------ evaluation


def eval_rules(training_rule: str) -> list[str]:
    """Rules reported at evaluation: :data:`EVAL_RULES` plus the training rule(s)."""
    rules = [get_rule(r).spec for r in EVAL_RULES]
    spec = get_rule(training_rule).spec
    return rules if spec in rules else [*rules, spec]


def _score_sums(logits: torch.Tensor, labels: torch.Tensor, rules: Sequence[str]) -> torch.Tensor:
    """Per-sequence sums of each rule's token score: ``(B, T, V)``, ``(B, T)`` -> ``(B, R)``.

    The statistics are computed once per chunk of scored rows for all rules
    (:func:`properlm.stats.rule_scores`), and each rule's score comes from its rule object.
    """
    from .stats import rule_scores

    B, T, V = logits.shape
    valid = labels != -100
    rows = valid.reshape(-1).nonzero().squeeze(1)
    z = logits.reshape(-1, V).index_select(0, rows)
    y = labels.reshape(-1).index_select(0, rows)
    seq = rows // T
    out = torch.zeros(B, len(rules), dtype=torch.float64, device=logits.device)
    chunk = max(1, _EVAL_CHUNK_ELEMENTS // max(V, 1))  # rows per chunk: bounded float32 temporaries
    rule_objs = [get_rule(spec) for spec in rules]
    for start in range(0, rows.numel(), chunk):
        scores, _ = rule_scores(z[start:start + chunk].float(), y[start:start + chunk], rule_objs)
        out.index_add_(0, seq[start:start + chunk], scores.double())
    return out


class EpochSeededLengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Batches of similar length in an order that depends only on ``(seed, epoch)``.

    The same grouping as ``transformers.trainer_pt_utils.get_length_grouped_indices`` (a random
    permutation cut into mega-batches of up to 50 batches, each sorted by length, the longest batch
    first), with the permutation drawn from ``torch.Generator().manual_seed(seed + epoch)``.
    The Trainer (through accelerate's ``DataLoaderShard.set_epoch``) calls :meth:`set_epoch`
    before each epoch, including the one a resumed run starts in.

    Args:
        batch_size: examples per optimizer step on one process (batch x gradient accumulation).
        lengths: the length of every example, ``len(lengths)`` = dataset size.
        seed: the data seed.
    """

    def __init__(self, batch_size: int, lengths: Sequence[int], seed: int) -> None:
        self.batch_size = int(batch_size)
        self.lengths = list(lengths)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Any:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


def _make_trainer_class() -> type:
    from transformers import Trainer

    from .improper import get_improper_objective
    from .loss import scoring_rule_loss

    class ScoringRuleTrainer(Trainer):
        """``Trainer`` whose evaluation reports every rule's mean token score.

        ``prediction_step`` runs the model without labels (so the logits are materialised
        whatever loss patch is applied), computes the current training rule's loss on them
        with :func:`properlm.scoring_rule_loss` (or the improper objective's loss, with
        ``--improper-loss``), and returns per-sequence score sums
        ``(B, R)`` as predictions and token counts ``(B, 1)`` as labels, which
        :meth:`compute_score_metrics` turns into means over all held-out tokens.
        """

        properlm_rules: Sequence[str] = ()
        properlm_rule_at: Any = None
        properlm_smoothing: float = 0.0
        properlm_smoothing_variant: str = "paper"
        properlm_improper_loss: str | None = None

        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            """The length-grouped sampler, made a function of (seed, epoch) so that resuming is exact.

            ``transformers``' ``LengthGroupedSampler`` draws each epoch's permutation from the global
            torch RNG, whose state at an epoch start depends on everything drawn before (dropout).
            A run resumed past its first epoch restores that RNG only after the permutation is
            drawn, so it saw another data order. :class:`EpochSeededLengthGroupedSampler` seeds
            each epoch from ``data_seed`` (or ``seed``) and the epoch, like accelerate's seedable
            random sampler does for the plain shuffle.
            """
            from transformers.trainer_pt_utils import LengthGroupedSampler

            sampler = super()._get_train_sampler(*args, **kwargs)
            if type(sampler) is LengthGroupedSampler:
                seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
                sampler = EpochSeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
            return sampler

        def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                            ignore_keys: Any = None) -> tuple[Any, Any, Any]:
            inputs = self._prepare_inputs(inputs)
            labels = inputs["labels"]
            fwd = {k: v for k, v in inputs.items() if k != "labels"}
            base = unwrap_model(model)
            seq2seq = is_seq2seq(base)
            if seq2seq:
                fwd["decoder_input_ids"] = base.prepare_decoder_input_ids_from_labels(labels=labels)
            with torch.no_grad(), self.compute_loss_context_manager():
                logits = model(**fwd).logits
            if not seq2seq:
                logits, labels = logits[:, :-1], labels[:, 1:]
            if self.properlm_improper_loss is not None:  # the improper objective trained instead of a rule
                loss = get_improper_objective(self.properlm_improper_loss)(logits, labels).detach()
            else:
                rule = self.properlm_rule_at(self.state.global_step)
                loss = scoring_rule_loss(logits, labels, rule, self.properlm_smoothing,
                                         smoothing_variant=self.properlm_smoothing_variant).detach()
            sums = _score_sums(logits.detach(), labels, self.properlm_rules)
            counts = (labels != -100).sum(-1, keepdim=True).double()
            return loss, sums, counts

    return ScoringRuleTrainer


def _score_metrics(rules: Sequence[str]) -> Any:
    def compute(pred: Any) -> dict[str, float]:
        sums = torch.as_tensor(pred.predictions, dtype=torch.float64).reshape(-1, len(rules))
        counts = torch.as_tensor(pred.label_ids, dtype=torch.float64).reshape(-1)
        n = float(counts.sum())
        out = {f"score_{r}": float(sums[:, j].sum()) / max(n, 1.0) for j, r in enumerate(rules)}
        out["tokens"] = n
        return out

    return compute


# ------------------------------------------------------------------------------ logging


def _metrics_callback(path: str, rule_at: Any) -> Any:
    from transformers import TrainerCallback

    class MetricsLogCallback(TrainerCallback):
        """Append one JSON record per logging step / evaluation to ``metrics.jsonl``.

        The record is ``{"step", "epoch", "rule", "time", **logs}`` (``loss``, ``learning_rate``,
        ``grad_norm``, ``eval_loss``, ``eval_score_<rule>``, ...). ``rule`` is the rule of
        the last optimizer step taken (``rule_at(step - 1)``)."""

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            if not state.is_world_process_zero or not logs:
                return
            step = state.global_step
            record = {"step": step, "epoch": state.epoch, "rule": rule_at(max(step - 1, 0)), "time": time.time()}
            record.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str, bool)) or v is None})
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    return MetricsLogCallback()


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            return False
    return True


# ------------------------------------------------------------------------------ the driver


def _load_data(cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
    train = load_examples(cfg.train_file, task=cfg.task if cfg.task != "translation" else None,
                          source_file=cfg.source_file, target_file=cfg.target_file,
                          source_lang=cfg.source_lang, target_lang=cfg.target_lang)
    val: list[Example] = []
    if cfg.validation_file is not None or cfg.validation_source_file is not None:
        val = load_examples(cfg.validation_file, task=train[0].task if cfg.validation_file else None,
                            source_file=cfg.validation_source_file, target_file=cfg.validation_target_file,
                            source_lang=cfg.source_lang, target_lang=cfg.target_lang)
        if val[0].task != train[0].task:
            raise DataError(f"validation data is {val[0].task} but training data is {train[0].task}")
    elif cfg.validation_fraction > 0:
        seed = cfg.seed if cfg.validation_seed is None else cfg.validation_seed
        train, val = split_validation(train, cfg.validation_fraction, seed)
    return train, val


def _sampling_arguments(group_by_length: bool) -> dict[str, Any]:
    """The TrainingArguments keyword of the length-grouped sampler (renamed in transformers 5)."""
    import inspect

    from transformers import TrainingArguments

    if not group_by_length:
        return {}
    if "train_sampling_strategy" in inspect.signature(TrainingArguments).parameters:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}


def _training_arguments(cfg: TrainConfig, max_steps: int, has_eval: bool) -> Any:
    from transformers import TrainingArguments

    # TensorBoard writes to OUTPUT_DIR/runs/<date_host> (or $TENSORBOARD_LOGGING_DIR when set)
    report = ["tensorboard"] if cfg.tensorboard and _tensorboard_available() else "none"
    kwargs: dict[str, Any] = {
        "output_dir": cfg.output_dir,
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "per_device_eval_batch_size": cfg.per_device_eval_batch_size or cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": cfg.lr_scheduler,
        "warmup_steps": cfg.warmup_steps,
        "weight_decay": cfg.weight_decay,
        "adam_beta1": cfg.adam_beta1,
        "adam_beta2": cfg.adam_beta2,
        "max_grad_norm": cfg.max_grad_norm,
        "max_steps": max_steps,
        "num_train_epochs": cfg.num_train_epochs,
        "bf16": cfg.bf16,
        "fp16": cfg.fp16,
        "torch_compile": cfg.torch_compile,
        **({"torch_compile_backend": cfg.torch_compile_backend} if cfg.torch_compile else {}),
        "seed": cfg.seed,
        "logging_steps": cfg.logging_steps,
        "logging_strategy": "steps",
        "eval_strategy": "steps" if (has_eval and cfg.eval_steps) else "no",
        "eval_steps": cfg.eval_steps if has_eval else None,
        "save_strategy": "steps" if cfg.save_steps else "no",
        "save_steps": cfg.save_steps or 500,
        "save_total_limit": cfg.save_total_limit,
        "report_to": report,
        "disable_tqdm": not cfg.progress_bar,
        "remove_unused_columns": False,
        "label_names": ["labels"],
        "dataloader_num_workers": cfg.dataloader_num_workers,
        **_sampling_arguments(cfg.group_by_length),
        "use_cpu": not torch.cuda.is_available(),
        "ddp_find_unused_parameters": False,
    }
    return TrainingArguments(**kwargs)


def _build_model(cfg: TrainConfig, train: list[Example], args: Any) -> tuple[Any, Any]:
    from .modeling import load_model_and_tokenizer

    if cfg.init is None:
        return load_model_and_tokenizer(cfg.model, gguf_file=cfg.gguf_file)
    from transformers import PreTrainedTokenizerFast

    tok_dir = os.path.join(cfg.output_dir, "tokenizer")
    init_options = {"hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
                    "ffn_size": cfg.ffn_size, "dropout": cfg.dropout,
                    "max_positions": max(cfg.max_length, 64)}
    # rank 0 trains and saves the tokenizer first; other ranks (and resumed runs) load it
    with args.main_process_first(desc="tokenizer"):
        tokenizer = None
        if os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
            tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
        texts = [t for e in train for t in (e.source, e.target)]
        model, tokenizer = load_model_and_tokenizer(init=cfg.init, train_texts=texts, vocab_size=cfg.vocab_size,
                                                    seed=cfg.seed, tokenizer=tokenizer, init_options=init_options)
        if args.process_index == 0 and not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
            tokenizer.save_pretrained(tok_dir)
    return model, tokenizer


def _record_gguf_base(cfg: TrainConfig, directory: str) -> None:
    """Next to a LoRA adapter trained on a GGUF model, record the GGUF file name.

    With :func:`properlm.modeling.record_gguf_base`: ``adapter_config.json`` can only name a directory.
    """
    if cfg.lora and cfg.gguf_file and os.path.isdir(directory):
        record_gguf_base(directory, gguf_location(cfg.model, cfg.gguf_file)[1])


def _gguf_base_callback(cfg: TrainConfig) -> Any:
    from transformers import TrainerCallback

    class GGUFBaseRecordCallback(TrainerCallback):
        """Write the GGUF base record into every ``checkpoint-N`` of a LoRA run on a GGUF model.

        So an intermediate adapter reloads as ``final/`` does.
        """

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                _record_gguf_base(cfg, os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    return GGUFBaseRecordCallback()


def write_training_record(directory: str, record: Mapping[str, Any]) -> None:
    """Write :data:`properlm.modeling.TRAINING_RECORD` into a saved model directory.

    The record holds the data settings (``max_length``, ``max_source_length``, ``task``, ``seq2seq``), so
    that ``properlm evaluate`` and ``generate`` truncate as training did.
    """
    if os.path.isdir(directory):
        with open(os.path.join(directory, TRAINING_RECORD), "w", encoding="utf-8") as f:
            json.dump(dict(record), f, indent=2)


def _training_record_callback(record: Mapping[str, Any]) -> Any:
    from transformers import TrainerCallback

    class TrainingRecordCallback(TrainerCallback):
        """Write the training record into every ``checkpoint-N``.

        An intermediate model then evaluates with the truncation of its run, as ``final/`` does.
        """

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                write_training_record(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"), record)

    return TrainingRecordCallback()


def _apply_lora(cfg: TrainConfig, model: Any, seq2seq: bool) -> Any:
    from peft import LoraConfig, TaskType, get_peft_model

    targets: Any = cfg.lora_target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    lora_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                             target_modules=targets,
                             task_type=TaskType.SEQ_2_SEQ_LM if seq2seq else TaskType.CAUSAL_LM)
    try:
        return get_peft_model(model, lora_config)
    except ValueError as exc:
        raise ConfigError(f"--lora-target-modules {cfg.lora_target_modules!r}: {exc}") from None


def _final_eval(trainer: Any) -> dict[str, Any]:
    """The validation metrics of the final model.

    Those of the scheduled evaluation when one ran at the last step (same weights), else a fresh
    ``trainer.evaluate()``.
    """
    if getattr(trainer.args, "load_best_model_at_end", False):
        return trainer.evaluate()  # the weights are no longer those of the last evaluation
    step = trainer.state.global_step
    for record in reversed(trainer.state.log_history):
        if record.get("step") == step and "eval_loss" in record:
            return {k: v for k, v in record.items() if k.startswith("eval_") or k == "epoch"}
    return trainer.evaluate()


def _warn_if_fsdp_ignored(trainer: Any) -> None:
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


#: from this vocabulary size on, ``properlm train`` warns about the paper's masked-log smoothing of a
#: bounded rule: it trained well at V = 6,000 (Multi30k, benchmarks/RESULTS.md) and collapsed SmolLM2
#: (V = 49,152) within 4 steps; in ``benchmarks/smoothing_large_vocab.py`` the damage grows with V
#: (README, "Score smoothing")
PAPER_SMOOTHING_WARN_VOCAB = 16384


def _vocab_size(model: Any) -> int:
    """Rows of the model's output embedding (its vocabulary as the loss sees it)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    return int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)


def smoothing_warning(rule: str, smoothing: float, smoothing_variant: str, vocab_size: int) -> str | None:
    """The warning for the paper's masked-log smoothing of a bounded rule at a large vocabulary, or ``None``.

    It warns for a bounded rule (or a mixture with one) smoothed with the paper's masked-log term at a
    vocabulary of at least :data:`PAPER_SMOOTHING_WARN_VOCAB` tokens.
    """
    rule_obj = get_rule(rule)
    if smoothing <= 0 or smoothing_variant != "paper" or not rule_obj.masked_log_smoothing \
            or vocab_size < PAPER_SMOOTHING_WARN_VOCAB:
        return None
    return (f"--smoothing {smoothing:g} with the bounded rule {rule_obj.spec!r} uses the paper's masked-log term "
            f"(--smoothing-variant paper) at a vocabulary of {vocab_size} tokens: it pulls the target's "
            "probability down by about eps per token until every tail token reaches eps/V, and under Adam this "
            "flattens the distribution within a few steps (SmolLM2, V = 49152: decoding degenerates). "
            "Use --smoothing-variant gated (or none); see the README, 'Score smoothing'.")


def run_training(cfg: TrainConfig, callbacks: Sequence[Any] = (), *, quiet: bool = False) -> dict[str, Any]:
    """Train as configured by ``cfg``; returns the results dictionary also written to ``output_dir/results.json``.

    ``callbacks`` are extra ``transformers.TrainerCallback`` objects (tests use one to stop
    a run early, as a kill would). ``quiet`` prints nothing to the console (no progress bar,
    no log lines; ``metrics.jsonl`` is still written).
    """
    validate_config(cfg)
    train_examples, val_examples = _load_data(cfg)

    from transformers import set_seed

    from .data import DataCollator, tokenize_examples
    from .integrations.transformers import apply_improper_loss, apply_scoring_rule

    schedule = _parse_schedule(cfg.schedule) if cfg.schedule else None
    if schedule is not None:
        max_steps = schedule.total_steps

        def rule_at(step: int) -> str:
            return get_rule(schedule.rule_at(step)).spec
    else:
        max_steps = cfg.max_steps if cfg.max_steps is not None else -1
        fixed = get_rule(cfg.rule).spec

        def rule_at(step: int) -> str:
            return fixed

    improper = cfg.improper_loss

    def label_at(step: int) -> str:
        """The objective of ``step`` in the logs and results: the rule, or the improper objective's name."""
        return rule_at(step) if improper is None else improper

    os.makedirs(cfg.output_dir, exist_ok=True)
    args = _training_arguments(cfg, max_steps, bool(val_examples))
    set_seed(cfg.seed)
    model, tokenizer = _build_model(cfg, train_examples, args)
    seq2seq = is_seq2seq(model)
    if cfg.lora:
        if cfg.init is not None:
            base_dir = os.path.abspath(os.path.join(cfg.output_dir, "base"))
            if args.process_index == 0 and not os.path.isfile(os.path.join(base_dir, "config.json")):
                model.save_pretrained(base_dir)
                tokenizer.save_pretrained(base_dir)
            model.config._name_or_path = base_dir
            model.name_or_path = base_dir
        elif cfg.gguf_file is not None:
            # the adapter's base is the GGUF file: record its directory (absolute), and the file
            # name in BASE_RECORD next to every saved adapter, so that the adapter reloads
            base_dir = gguf_location(cfg.model, cfg.gguf_file)[0]
            model.config._name_or_path = base_dir
            model.name_or_path = base_dir
        model = _apply_lora(cfg, model, seq2seq)
    lengths = {"max_length": cfg.max_length, "max_source_length": cfg.max_source_length}
    train_ds = tokenize_examples(train_examples, tokenizer, seq2seq=seq2seq, **lengths)
    val_ds = tokenize_examples(val_examples, tokenizer, seq2seq=seq2seq, **lengths) if val_examples else None

    stage_rules = [r for r, _ in schedule.stages] if schedule is not None else [cfg.rule]
    vocab = _vocab_size(model)
    for stage_rule in stage_rules:
        message = smoothing_warning(stage_rule, cfg.smoothing, cfg.smoothing_variant, vocab)
        if message is not None:
            import warnings

            warnings.warn(message, UserWarning, stacklevel=2)
            break
    if improper is not None:
        handle = apply_improper_loss(model, improper, fused=cfg.fused)
        if not quiet and args.process_index == 0:
            objective = IMPROPER_OBJECTIVES[improper]
            print(f"properlm train: training with the improper objective {improper!r} (L = {objective.formula}; "
                  f"{objective.reference}) instead of a scoring rule: a baseline, not a proper scoring rule",
                  flush=True)
    else:
        handle = apply_scoring_rule(model, rule_at(0), smoothing=cfg.smoothing, fused=cfg.fused,
                                    smoothing_variant=cfg.smoothing_variant)
    record: dict[str, Any] = {**lengths, "task": train_examples[0].task, "seq2seq": seq2seq}
    if improper is not None:
        record["improper_loss"] = improper
    all_callbacks: list[Any] = [_metrics_callback(os.path.join(cfg.output_dir, "metrics.jsonl"), label_at),
                                _training_record_callback(record)]
    if cfg.lora and cfg.gguf_file:
        all_callbacks.append(_gguf_base_callback(cfg))
    if schedule is not None:
        from .integrations.schedule import RuleScheduleCallback

        all_callbacks.insert(0, RuleScheduleCallback(schedule, handle, cfg.smoothing))
    all_callbacks.extend(callbacks)

    rules = eval_rules(cfg.rule)
    if schedule is not None:
        for stage_rule, _ in schedule.stages:
            spec = get_rule(stage_rule).spec
            if spec not in rules:
                rules.append(spec)
    trainer_cls = _make_trainer_class()
    trainer = trainer_cls(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                          data_collator=DataCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                          callbacks=all_callbacks, compute_metrics=_score_metrics(rules) if val_ds else None)
    _warn_if_fsdp_ignored(trainer)
    if quiet:
        from transformers import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    trainer.properlm_rules = rules
    trainer.properlm_rule_at = rule_at
    trainer.properlm_smoothing = cfg.smoothing
    trainer.properlm_smoothing_variant = cfg.smoothing_variant
    trainer.properlm_improper_loss = improper

    resume_from = find_checkpoints(cfg.output_dir)[-1] if cfg.resume else None
    started = time.time()
    train_output = trainer.train(resume_from_checkpoint=resume_from)
    results: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "rule_stages": [[get_rule(r).spec, int(n)] for r, n in schedule.stages] if schedule is not None
        else [[label_at(0), trainer.state.max_steps]],
        "resumed_from": resume_from,
        "train": dict(train_output.metrics),
        "train_seconds": time.time() - started,
        "global_step": trainer.state.global_step,
        "num_train_examples": len(train_examples),
        "num_validation_examples": len(val_examples),
        "seq2seq": seq2seq,
    }
    if val_ds is not None:
        results["eval"] = _final_eval(trainer)

    final_dir = os.path.join(cfg.output_dir, "final")
    trainer.save_model(final_dir)
    _record_gguf_base(cfg, final_dir)
    if trainer.is_world_process_zero():
        write_training_record(final_dir, record)
    results["final_model"] = final_dir

    if cfg.average_last > 0:
        checkpoints = find_checkpoints(cfg.output_dir)[-cfg.average_last:]
        state = average_checkpoints(checkpoints)
        _load_averaged(trainer.model, state, cfg.lora)
        avg_dir = os.path.join(cfg.output_dir, "averaged")
        trainer.save_model(avg_dir)
        _record_gguf_base(cfg, avg_dir)
        if trainer.is_world_process_zero():
            write_training_record(avg_dir, record)
        results["averaged_model"] = avg_dir
        results["averaged_checkpoints"] = checkpoints
        if val_ds is not None:
            results["eval_averaged"] = trainer.evaluate(metric_key_prefix="eval_averaged")
    handle.remove()
    if trainer.is_world_process_zero():
        with open(os.path.join(cfg.output_dir, "results.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, default=str)
    return results

