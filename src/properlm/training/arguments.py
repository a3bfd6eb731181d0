"""The ``transformers.TrainingArguments`` of a run, from its :class:`~properlm.training.config.TrainConfig`."""

from __future__ import annotations

import sys
from typing import Any

import torch

from .config import TrainConfig


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            return False
    return True


def _sampling_arguments(group_by_length: bool) -> dict[str, Any]:
    """The TrainingArguments keyword of the length-grouped sampler (renamed in transformers 5)."""
    import inspect

    from transformers import TrainingArguments

    if not group_by_length:
        return {}
    if "train_sampling_strategy" in inspect.signature(TrainingArguments).parameters:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}


#: ``lr_scheduler`` -> the ``transformers`` scheduler type. Every schedule starts with ``warmup_steps`` of linear
#: warm-up; transformers' ``"constant"`` ignores ``warmup_steps``, its ``"constant_with_warmup"`` is our
#: ``constant`` (the same as ``"constant"`` when ``warmup_steps`` is 0).
_HF_SCHEDULERS = {
    "inverse_sqrt": "inverse_sqrt",
    "cosine": "cosine",
    "linear": "linear",
    "constant": "constant_with_warmup",
}


def training_arguments(cfg: TrainConfig, max_steps: int, has_eval: bool) -> Any:
    """The ``TrainingArguments`` of a run of ``max_steps`` steps (with evaluation when ``has_eval``)."""
    from transformers import TrainingArguments

    # TensorBoard writes to OUTPUT_DIR/runs/<date_host> (or $TENSORBOARD_LOGGING_DIR when set)
    report = ["tensorboard"] if cfg.tensorboard and _tensorboard_available() else "none"
    kwargs: dict[str, Any] = {
        "output_dir": cfg.output_dir,
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "per_device_eval_batch_size": cfg.per_device_eval_batch_size or cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": _HF_SCHEDULERS[cfg.lr_scheduler],
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
        "disable_tqdm": not show_progress_bar(cfg),
        "remove_unused_columns": False,
        "label_names": ["labels"],
        "dataloader_num_workers": cfg.dataloader_num_workers,
        **_sampling_arguments(cfg.group_by_length),
        "use_cpu": not torch.cuda.is_available(),
        "ddp_find_unused_parameters": False,
    }
    return TrainingArguments(**kwargs)


def show_progress_bar(cfg: TrainConfig) -> bool:
    """Whether training shows progress bars: ``--progress-bar`` (the default) and a terminal on stderr.

    Redirected to a file, a bar's carriage-return updates flood the log; the periodic log lines stay.
    """
    return bool(cfg.progress_bar) and sys.stderr.isatty()
