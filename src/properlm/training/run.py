"""The training driver: :func:`run_training`.

One :class:`~properlm.training.config.TrainConfig` in; a trained model, checkpoints, logs and ``results.json``
out (the steps are listed in :mod:`properlm.training`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..evaluation.precision import bf16_autocast_matmuls, bf16_matmul_mode
from ..improper import IMPROPER_OBJECTIVES
from ..models import gguf_location, is_seq2seq
from ..rules import get_rule
from .arguments import show_progress_bar, training_arguments
from .callbacks import (
    gguf_base_callback,
    metrics_callback,
    record_adapter_gguf_base,
    resume_callback,
    training_record_callback,
    write_training_record,
)
from .checkpoints import average_checkpoints, find_checkpoints, load_averaged, remove_earlier_run
from .config import TrainConfig
from .loading import apply_lora, build_model, load_data, model_vocab_size
from .scores import eval_rules, final_eval, score_metrics
from .trainer import make_trainer_class
from .validation import (
    expected_vocab_size,
    parse_schedule,
    run_smoothing_warning,
    validate_config,
    warn_if_fsdp_ignored,
)

__all__ = ["run_training", "truncation_line"]


def _save(trainer: Any, cfg: TrainConfig, name: str, record: Mapping[str, Any]) -> str:
    """Save the trainer's model as ``OUTPUT_DIR/NAME`` with its GGUF base and training record; the path."""
    directory = os.path.join(cfg.output_dir, name)
    trainer.save_model(directory)
    record_adapter_gguf_base(cfg, directory)
    if trainer.is_world_process_zero():
        write_training_record(directory, record)
    return directory


def truncation_line(counts: dict[str, int], cfg: TrainConfig) -> str:
    """What the training data lost to the length limits, as one line.

    E.g. ``"12 of 4498 training examples cut at --max-length 384"``, and the sources cut at ``--max-source-length``.
    """
    parts = []
    if counts["num_cut_at_max_length"]:
        parts.append(
            f"{counts['num_cut_at_max_length']} of {counts['num_examples']} training examples cut at "
            f"--max-length {cfg.max_length}"
        )
    if counts["num_sources_cut"]:
        parts.append(
            f"{counts['num_sources_cut']} of {counts['num_examples']} sources cut at --max-source-length "
            f"{cfg.max_source_length}"
        )
    return "; ".join(parts)


def run_training(cfg: TrainConfig, callbacks: Sequence[Any] = (), *, quiet: bool = False) -> dict[str, Any]:
    """Train as configured by ``cfg``; returns the results dictionary also written to ``output_dir/results.json``.

    ``callbacks`` are extra ``transformers.TrainerCallback`` objects (tests use one to stop
    a run early, as a kill would). ``quiet`` prints nothing to the console (no progress bar,
    no log lines; ``metrics.jsonl`` is still written).
    """
    validate_config(cfg)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if bars and (quiet or not show_progress_bar(cfg)):  # transformers' loading and saving bars too
        hf_logging.disable_progress_bar()
    try:
        return _train(cfg, callbacks, quiet)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _train(cfg: TrainConfig, callbacks: Sequence[Any], quiet: bool) -> dict[str, Any]:
    """:func:`run_training` after the checks."""
    train_examples, val_examples = load_data(cfg)

    from transformers import set_seed

    from ..data import DataCollator, tokenize_examples
    from ..integrations.transformers import apply_improper_loss, apply_scoring_rule

    schedule = parse_schedule(cfg.schedule) if cfg.schedule else None
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
    args = training_arguments(cfg, max_steps, bool(val_examples))
    if cfg.overwrite_output_dir and not cfg.resume:  # start afresh: nothing of the earlier run is taken up
        with args.main_process_first(desc="removing the earlier run"):
            if args.process_index == 0:
                removed = remove_earlier_run(cfg.output_dir)
                if removed and not quiet:
                    print(
                        f"properlm train: --overwrite-output-dir removed the earlier run's {', '.join(removed)} "
                        f"from {cfg.output_dir}",
                        flush=True,
                    )
    set_seed(cfg.seed)
    model, tokenizer = build_model(cfg, train_examples, args)
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
        model = apply_lora(cfg, model, seq2seq)
    lengths = {"max_length": cfg.max_length, "max_source_length": cfg.max_source_length}
    truncation: dict[str, int] = {}
    train_ds = tokenize_examples(train_examples, tokenizer, seq2seq=seq2seq, truncation=truncation, **lengths)
    if not quiet and args.process_index == 0 and (truncation["num_sources_cut"] or truncation["num_cut_at_max_length"]):
        print("properlm train: " + truncation_line(truncation, cfg), flush=True)
    val_ds = tokenize_examples(val_examples, tokenizer, seq2seq=seq2seq, **lengths) if val_examples else None

    vocab = model_vocab_size(model)
    if vocab != expected_vocab_size(cfg):  # not known, or other than validate_config warned for before loading
        message = run_smoothing_warning(cfg, vocab)
        if message is not None:
            import warnings

            warnings.warn(message, UserWarning, stacklevel=2)
    if improper is not None:
        handle = apply_improper_loss(model, improper, fused=cfg.fused)
        if not quiet and args.process_index == 0:
            objective = IMPROPER_OBJECTIVES[improper]
            print(
                f"properlm train: training with the improper objective {improper!r} (L = {objective.formula}; "
                f"{objective.reference}) instead of a scoring rule: a baseline, not a proper scoring rule",
                flush=True,
            )
    else:
        handle = apply_scoring_rule(
            model, rule_at(0), smoothing=cfg.smoothing, fused=cfg.fused, smoothing_variant=cfg.smoothing_variant
        )
    record: dict[str, Any] = {**lengths, "task": train_examples[0].task, "seq2seq": seq2seq}
    if cfg.source_file is not None:  # the language names of the prompts (they apply to parallel files only)
        record.update({n: getattr(cfg, n) for n in ("source_lang", "target_lang") if getattr(cfg, n) is not None})
    if improper is not None:
        record["improper_loss"] = improper
    all_callbacks: list[Any] = [
        metrics_callback(os.path.join(cfg.output_dir, "metrics.jsonl"), label_at),
        training_record_callback(record, cfg),
    ]
    if cfg.lora and cfg.gguf_file:
        all_callbacks.append(gguf_base_callback(cfg))
    if schedule is not None:
        from ..integrations.schedule import RuleScheduleCallback

        all_callbacks.insert(0, RuleScheduleCallback(schedule, handle, cfg.smoothing))
    all_callbacks.extend(callbacks)

    rules = eval_rules(cfg.rule)
    if schedule is not None:
        for stage_rule, _ in schedule.stages:
            spec = get_rule(stage_rule).spec
            if spec not in rules:
                rules.append(spec)
    trainer_cls = make_trainer_class()
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=DataCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=all_callbacks,
        compute_metrics=score_metrics(rules) if val_ds else None,
    )
    warn_if_fsdp_ignored(trainer)
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
    if resume_from is not None and not quiet:
        trainer.add_callback(resume_callback(resume_from))
    started = time.time()
    # --bf16 on a CPU without native bfloat16 matrix products: those products in float32 (the same values)
    matmuls = bf16_autocast_matmuls("auto") if cfg.bf16 else contextlib.nullcontext()
    with matmuls:
        train_output = trainer.train(resume_from_checkpoint=resume_from)
    results: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "rule_stages": [[get_rule(r).spec, int(n)] for r, n in schedule.stages]
        if schedule is not None
        else [[label_at(0), trainer.state.max_steps]],
        "resumed_from": resume_from,
        "train": dict(train_output.metrics),
        "train_seconds": time.time() - started,
        "global_step": trainer.state.global_step,
        "num_train_examples": len(train_examples),
        "truncation": {**lengths, **truncation},
        "num_validation_examples": len(val_examples),
        "seq2seq": seq2seq,
    }
    if cfg.bf16:
        results["bf16_matmuls"] = bf16_matmul_mode("auto")
    if val_ds is not None:
        with matmuls:
            results["eval"] = final_eval(trainer)

    results["final_model"] = _save(trainer, cfg, "final", record)

    if cfg.average_last > 0:
        checkpoints = find_checkpoints(cfg.output_dir)[-cfg.average_last :]
        state = average_checkpoints(checkpoints)
        load_averaged(trainer.model, state, cfg.lora)
        results["averaged_model"] = _save(trainer, cfg, "averaged", record)
        results["averaged_checkpoints"] = checkpoints
        if val_ds is not None:
            with matmuls:
                results["eval_averaged"] = trainer.evaluate(metric_key_prefix="eval_averaged")
    handle.remove()
    if trainer.is_world_process_zero():
        with open(os.path.join(cfg.output_dir, "results.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, default=str)
    return results
