"""What a run writes beside the ``Trainer``'s own files, and the ``TrainerCallback`` objects that write it.

* ``output_dir/metrics.jsonl``: one record per logging step and evaluation (``metrics_callback``);
* :data:`properlm.models.TRAINING_RECORD` in ``final/``, ``averaged/`` and every ``checkpoint-N``: the data
  settings that ``properlm evaluate`` and ``generate`` reuse (:func:`write_training_record`,
  ``training_record_callback``);
* :data:`properlm.training.resume.RUN_CONFIG` in every ``checkpoint-N``: the run's options, for ``--resume``;
* for a LoRA adapter trained on a GGUF model, the GGUF file name next to every saved adapter
  (``record_adapter_gguf_base``, ``gguf_base_callback``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

from ..models import TRAINING_RECORD, gguf_location, record_gguf_base
from .config import TrainConfig

__all__ = ["drop_records_after", "write_training_record"]


def metrics_callback(path: str, rule_at: Any) -> Any:
    from transformers import TrainerCallback

    class MetricsLogCallback(TrainerCallback):
        """Append one JSON record per logging step / evaluation to ``metrics.jsonl``.

        The record is ``{"step", "epoch", "rule", "time", **logs}`` (``loss``, ``learning_rate``,
        ``grad_norm``, ``eval_loss``, ``eval_score_<rule>``, ...). ``rule`` is the rule of
        the last optimizer step taken (``rule_at(step - 1)``). A resumed run first drops the records of the
        steps after its checkpoint, which it takes again, so that no step is logged twice."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero and state.global_step > 0:
                drop_records_after(path, state.global_step)

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
        ) -> None:
            if not state.is_world_process_zero or not logs:
                return
            step = state.global_step
            record = {"step": step, "epoch": state.epoch, "rule": rule_at(max(step - 1, 0)), "time": time.time()}
            record.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str, bool)) or v is None})
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    return MetricsLogCallback()


def drop_records_after(path: str, step: int) -> int:
    """Remove the records of ``metrics.jsonl`` at ``path`` logged after ``step``; how many were removed.

    A run stopped after its last checkpoint logged steps that its resumed run takes (and logs) again.
    Lines that are not JSON records with a ``step`` stay as they are.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError:
        return 0
    kept = [line for line in lines if _record_step(line) <= step]
    if len(kept) < len(lines):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(kept)
    return len(lines) - len(kept)


def _record_step(line: str) -> float:
    """The ``step`` of one ``metrics.jsonl`` line (``-inf`` for a line without one)."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return float("-inf")
    return float(step) if isinstance(step, (int, float)) else float("-inf")


def resume_callback(checkpoint: str) -> Any:
    from transformers import TrainerCallback

    class ResumeMessageCallback(TrainerCallback):
        """Say, once the checkpoint is loaded, which one the run continues from and how far it is."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                print(
                    f"properlm train: resuming from {os.path.basename(os.path.normpath(checkpoint))} "
                    f"(step {state.global_step} of {state.max_steps}) in {args.output_dir}",
                    flush=True,
                )

    return ResumeMessageCallback()


def write_training_record(directory: str, record: Mapping[str, Any]) -> None:
    """Write :data:`properlm.models.TRAINING_RECORD` into a saved model directory.

    The record holds the data settings (``max_length``, ``max_source_length``, ``task``, ``seq2seq``), so
    that ``properlm evaluate`` and ``generate`` truncate as training did.
    """
    if os.path.isdir(directory):
        with open(os.path.join(directory, TRAINING_RECORD), "w", encoding="utf-8") as f:
            json.dump(dict(record), f, indent=2)


def training_record_callback(record: Mapping[str, Any], cfg: TrainConfig | None = None) -> Any:
    from transformers import TrainerCallback

    from .resume import write_run_config

    class TrainingRecordCallback(TrainerCallback):
        """Write the training record (and, given ``cfg``, the run's options) into every ``checkpoint-N``.

        An intermediate model then evaluates with the truncation of its run, as ``final/`` does, and
        ``--resume`` can say which options changed since the checkpoint (:mod:`properlm.training.resume`).
        """

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                directory = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                write_training_record(directory, record)
                if cfg is not None:
                    write_run_config(directory, cfg)

    return TrainingRecordCallback()


def record_adapter_gguf_base(cfg: TrainConfig, directory: str) -> None:
    """Next to a LoRA adapter trained on a GGUF model, record the GGUF file name.

    With :func:`properlm.models.record_gguf_base`: ``adapter_config.json`` can only name a directory.
    """
    if cfg.lora and cfg.gguf_file and os.path.isdir(directory):
        record_gguf_base(directory, gguf_location(cfg.model, cfg.gguf_file)[1])


def gguf_base_callback(cfg: TrainConfig) -> Any:
    from transformers import TrainerCallback

    class GGUFBaseRecordCallback(TrainerCallback):
        """Write the GGUF base record into every ``checkpoint-N`` of a LoRA run on a GGUF model.

        So an intermediate adapter reloads as ``final/`` does.
        """

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                record_adapter_gguf_base(cfg, os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    return GGUFBaseRecordCallback()
