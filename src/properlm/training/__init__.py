"""The training driver behind ``properlm train``.

One :class:`~properlm.training.config.TrainConfig` in, a trained model, checkpoints, logs and a results JSON out.

Flow (:func:`~properlm.training.run.run_training`), with the module of each step::

    validate_config (arguments, files, rule, schedule, precision)      -- validation: fails fast, loads nothing
    load_examples (validated line by line)                              -- loading: fails before any model is loaded
    load_model_and_tokenizer (directory / hub id / GGUF / --init + BPE) -- loading
    [LoRA]  peft.get_peft_model                                         -- loading
    apply_scoring_rule(model, first rule, smoothing, fused)             -- the loss of every forward with labels
      (apply_improper_loss(model, name, fused) with --improper-loss: an improper baseline, properlm.improper)
    transformers.Trainer (trainer, arguments, sampler)
                          + RuleScheduleCallback (switches the rule at stage boundaries)
                          + MetricsLogCallback   (output_dir/metrics.jsonl; callbacks)
                          + TensorBoard (when installed)
    evaluation: every rule's mean held-out token score (logarithmic, brier, spherical, the training rule) -- scores
    output_dir/final, output_dir/averaged (mean of the last K checkpoints; checkpoints), output_dir/results.json

Resuming (``resume=True``) continues from the newest ``checkpoint-N`` in ``output_dir`` with
the optimizer, scheduler, RNG and data-order state of the Trainer; the rule schedule is
indexed by the global step, so it resumes in the right stage. Options that differ from the
checkpoint's run are named in a warning before training (:mod:`~properlm.training.resume`).

Modules, one job each:

* :mod:`~properlm.training.config` -- :class:`~properlm.training.config.TrainConfig`, keywords and YAML files;
* :mod:`~properlm.training.validation` -- checking a configuration before anything loads, and the warnings after;
* :mod:`~properlm.training.loading` -- the examples, the model and tokenizer, LoRA;
* :mod:`~properlm.training.arguments` -- the ``transformers.TrainingArguments`` of a run;
* :mod:`~properlm.training.sampler` -- the length-grouped sampler that resumes exactly;
* :mod:`~properlm.training.trainer` -- the ``Trainer`` subclass (its evaluation step);
* :mod:`~properlm.training.scores` -- every rule's mean held-out token score;
* :mod:`~properlm.training.callbacks` -- ``metrics.jsonl`` and the records saved with every model;
* :mod:`~properlm.training.checkpoints` -- finding and averaging ``checkpoint-N`` directories;
* :mod:`~properlm.training.resume` -- the options saved with each checkpoint and what ``--resume`` changed;
* :mod:`~properlm.training.run` -- :func:`~properlm.training.run.run_training`, the driver.

The package exports the driver, the configuration and the checkpoint helpers. How-to:
[the command line and YAML configs](../how-to/command-line.md), [rule schedules](../how-to/rule-schedule.md),
[LoRA with PEFT](../how-to/peft-lora.md).
"""

from __future__ import annotations

from .callbacks import write_training_record
from .checkpoints import average_checkpoints, find_checkpoints
from .config import LR_SCHEDULERS, ConfigError, TrainConfig, config_fields, load_yaml_config, make_config
from .run import run_training
from .sampler import EpochSeededLengthGroupedSampler as EpochSeededLengthGroupedSampler
from .scores import EVAL_RULES, eval_rules
from .validation import PAPER_SMOOTHING_WARN_VOCAB as PAPER_SMOOTHING_WARN_VOCAB
from .validation import smoothing_warning as smoothing_warning
from .validation import validate_config

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
