"""The options of ``properlm train``: :class:`TrainConfig`, and building one from keywords or a YAML file.

Every field is one option: its ``metadata`` holds the help text, the group of the ``--help`` listing and the
allowed values, from which :mod:`properlm.cli.train` builds the command line and ``docs/hooks.py`` the option
table. :func:`make_config` and :func:`load_yaml_config` convert and check names and types only; the values are
checked by :func:`properlm.training.validation.validate_config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..improper import IMPROPER_OBJECTIVES
from ..models import INIT_CONFIGS
from ..options import SMOOTHING_VARIANTS

__all__ = ["LR_SCHEDULERS", "ConfigError", "TrainConfig", "config_fields", "load_yaml_config", "make_config"]


#: accepted ``lr_scheduler`` values, each after ``warmup_steps`` of linear warm-up from 0 to the peak learning rate
#: (``inverse_sqrt``: then ``lr * sqrt(W / step)`` for ``W = warmup_steps``; with no warm-up transformers' timescale
#: of 10,000 steps, ``lr * sqrt(10000 / (step + 10000))``, nearly constant for short runs; ``constant``: the peak)
LR_SCHEDULERS = ("inverse_sqrt", "cosine", "linear", "constant")


class ConfigError(ValueError):
    """A training argument (from the command line or the YAML file) is invalid."""


def _opt(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    """Every option of ``properlm train``; the YAML keys are these field names (``-`` or ``_``)."""

    # model
    model: str | None = _opt(None, "model to train: a local directory (save_pretrained) or a hub id", group="model")
    gguf_file: str | None = _opt(
        None, "a GGUF model file (needs the 'gguf' package); a path, or a file name inside --model", group="model"
    )
    init: str | None = _opt(
        None,
        "train a fresh model from a named small config, with a BPE tokenizer trained on the training data",
        choices=INIT_CONFIGS,
        group="model",
    )
    vocab_size: int = _opt(1000, "--init: BPE vocabulary size", group="model")
    hidden_size: int = _opt(128, "--init: hidden size", group="model")
    num_layers: int = _opt(2, "--init: number of layers (encoder and decoder each for tiny-seq2seq)", group="model")
    num_heads: int = _opt(4, "--init: attention heads", group="model")
    ffn_size: int | None = _opt(None, "--init: feed-forward size; none means 4 x hidden size", group="model")
    dropout: float = _opt(0.1, "--init: dropout", group="model")
    # data
    train_file: str | None = _opt(
        None,
        "training data: Alpaca JSON/JSONL (instruction, input, output) or JSONL with document/summary",
        group="data",
    )
    source_file: str | None = _opt(None, "translation: source sentences, one per line", group="data")
    target_file: str | None = _opt(None, "translation: target sentences, line-aligned with --source-file", group="data")
    source_lang: str | None = _opt(None, "translation: source language name (decoder-only prompt)", group="data")
    target_lang: str | None = _opt(None, "translation: target language name (decoder-only prompt)", group="data")
    task: str | None = _opt(
        None,
        "data format; detected from the files when omitted",
        choices=("instruction", "translation", "summarization"),
        group="data",
    )
    validation_file: str | None = _opt(None, "validation data in the format of --train-file", group="data")
    validation_source_file: str | None = _opt(None, "translation validation: source sentences", group="data")
    validation_target_file: str | None = _opt(None, "translation validation: target sentences", group="data")
    validation_fraction: float = _opt(
        0.0,
        "split this fraction of the training data off as the validation set (when no validation files are given)",
        group="data",
    )
    validation_seed: int | None = _opt(
        None,
        "seed of the --validation-fraction split; none means --seed (a fixed "
        "value holds out the same examples in runs with different seeds)",
        group="data",
    )
    max_length: int = _opt(512, "maximum tokens per sequence (longer ones are truncated)", group="data")
    max_source_length: int | None = _opt(
        None,
        "cut each source text (document, source sentence, instruction "
        "input) to its first N tokens before the prompt template; recorded with "
        "the model, and `properlm evaluate` cuts the same way; none means only "
        "--max-length cuts",
        group="data",
    )
    # objective
    rule: str = _opt(
        "logarithmic",
        "scoring rule: logarithmic, brier, spherical, power:ALPHA, pseudo-spherical:ALPHA",
        group="objective",
    )
    smoothing: float = _opt(0.0, "score smoothing eps in [0, 1)", group="objective")
    smoothing_variant: str = _opt(
        "paper",
        "masked-log term of score smoothing for bounded rules: paper (the "
        "paper's formula; it flattens the distribution at large vocabularies), gated (the "
        "term only on tokens predicted with p > 1 - eps: recommended for LLM vocabularies) "
        "or none (no masked-log term)",
        choices=SMOOTHING_VARIANTS,
        group="objective",
    )
    schedule: str | None = _opt(
        None,
        "rule schedule RULE:STEPS,RULE:STEPS,... e.g. logarithmic:13000,brier:5000 "
        "(one optimizer across stages; --max-steps defaults to the total)",
        group="objective",
    )
    improper_loss: str | None = _opt(
        None,
        "train with an improper baseline objective instead of the scoring rule: "
        "dft (-log p * stopgrad(p), Wu et al. 2025; TRL's loss_type='dft') or "
        "one-minus-p (1 - p, Li et al. 2025). Not proper: the expected loss is minimised "
        "at the one-hot on the most likely token. Not with --schedule or --smoothing",
        choices=tuple(IMPROPER_OBJECTIVES),
        group="objective",
    )
    fused: bool = _opt(
        True,
        "use the fused (chunked, no full logits) loss; --no-fused computes the loss on the model's logits",
        group="objective",
        negate="--no-fused",
    )
    # optimisation
    output_dir: str = _opt(
        "properlm_output", "directory for checkpoints, logs and the final model", group="optimisation"
    )
    overwrite_output_dir: bool = _opt(
        False,
        "start afresh in an output directory that holds an earlier run "
        "(without --resume): its checkpoint-N, final, averaged, tokenizer, base, "
        "runs, metrics.jsonl and results.json are removed first; other files stay",
        group="optimisation",
    )
    seed: int = _opt(42, "random seed (model init, data order, dropout)", group="optimisation")
    max_steps: int | None = _opt(
        None, "number of optimizer steps; none means --num-train-epochs decides", group="optimisation"
    )
    num_train_epochs: float = _opt(1.0, "epochs when --max-steps is not given", group="optimisation")
    per_device_train_batch_size: int = _opt(8, "examples per device per step", group="optimisation")
    per_device_eval_batch_size: int | None = _opt(
        None, "evaluation batch size; none means the training one", group="optimisation"
    )
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step", group="optimisation")
    group_by_length: bool = _opt(
        False,
        "draw batches of examples of similar length (less padding: about 2x faster "
        "on short, varied sentences; the order stays random across batches)",
        group="optimisation",
    )
    learning_rate: float = _opt(5e-5, "peak learning rate", group="optimisation")
    lr_scheduler: str = _opt(
        "inverse_sqrt",
        "learning-rate schedule after warm-up (inverse_sqrt: lr*sqrt(W/step) "
        "after W = --warmup-steps; with W = 0, lr*sqrt(10000/(step+10000)))",
        choices=LR_SCHEDULERS,
        group="optimisation",
    )
    warmup_steps: int = _opt(0, "linear warm-up steps", group="optimisation")
    weight_decay: float = _opt(0.0, "AdamW weight decay", group="optimisation")
    adam_beta1: float = _opt(0.9, "AdamW beta1", group="optimisation")
    adam_beta2: float = _opt(0.999, "AdamW beta2 (the paper uses 0.98)", group="optimisation")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 disables)", group="optimisation")
    bf16: bool = _opt(
        False,
        "bfloat16 mixed precision (CUDA with bf16 support, or CPU; a CPU without AVX512-BF16 or AMX computes the "
        "bfloat16 products in float32: the same values, no faster than float32)",
        group="optimisation",
    )
    fp16: bool = _opt(False, "float16 mixed precision (CUDA only)", group="optimisation")
    torch_compile: bool = _opt(
        False,
        "compile the model with torch.compile (TrainingArguments(torch_compile=True)); "
        "the scoring-rule losses trace without graph breaks",
        group="optimisation",
    )
    torch_compile_backend: str = _opt(
        "inductor",
        "torch.compile backend for --torch-compile (aot_eager traces without generating kernels: for debugging)",
        group="optimisation",
    )
    # LoRA
    lora: bool = _opt(False, "train LoRA adapters (peft) instead of all weights", group="lora")
    lora_r: int = _opt(8, "LoRA rank", group="lora")
    lora_alpha: float = _opt(16.0, "LoRA alpha", group="lora")
    lora_dropout: float = _opt(0.05, "LoRA dropout", group="lora")
    lora_target_modules: str = _opt("all-linear", "comma-separated module names to adapt, or all-linear", group="lora")
    # evaluation, checkpoints, logs
    eval_steps: int | None = _opt(
        None, "evaluate on the validation set every N steps (and always at the end)", group="checkpoints"
    )
    save_steps: int | None = _opt(None, "save a checkpoint every N steps", group="checkpoints")
    save_total_limit: int | None = _opt(
        None, "keep at most this many checkpoints (at least --average-last)", group="checkpoints"
    )
    average_last: int = _opt(
        0, "average the parameters of the last K checkpoints into OUTPUT_DIR/averaged", group="checkpoints"
    )
    resume: bool = _opt(
        False,
        "continue a stopped run from the newest checkpoint in --output-dir; given without "
        "the data options, the options not given are those saved with the run",
        group="checkpoints",
    )
    logging_steps: int = _opt(10, "log the training loss and learning rate every N steps", group="checkpoints")
    tensorboard: bool = _opt(
        True,
        "write TensorBoard logs to OUTPUT_DIR/runs (when tensorboard is installed)",
        group="checkpoints",
        negate="--no-tensorboard",
    )
    progress_bar: bool = _opt(True, "show the progress bar", group="checkpoints", negate="--no-progress-bar")
    dataloader_num_workers: int = _opt(0, "data loader worker processes", group="checkpoints")


def config_fields() -> list[dataclasses.Field]:
    """The fields of :class:`TrainConfig` (name, default, ``metadata['help']``, ...)."""
    return list(dataclasses.fields(TrainConfig))


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
