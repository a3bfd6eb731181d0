"""The driver of ``properlm evaluate``: :func:`run_evaluation`.

Validate the settings, load data and model, compute the teacher-forced metrics
(:mod:`properlm.evaluation.metrics`) and the generation metrics (:mod:`properlm.evaluation.text_metrics`), and write the
results.

Outputs in ``output_dir``:

* ``results.json`` -- every figure and every setting (``"kind": "properlm-evaluate"``);
* ``hypotheses.txt`` -- one hypothesis per line, in the order of the data;
* ``reliability.png`` -- the reliability diagram of the top-1 token;
* ``reliability_fitted.png`` -- with ``fit_temperature``, the same at the fitted temperature.

Temperature: the teacher-forced metrics are of ``softmax(logits / temperature)``;
``also_temperature`` adds them at a second temperature from the same forward passes
(``"teacher_forced_scaled"``: e.g. before and after temperature scaling with a temperature
fitted on validation data by ``fit_temperature``). Decoding is never affected.

``fit_temperature``: a :class:`~properlm.evaluation.temperature.TemperatureScan` rides along the teacher-forced
pass and fits ``T`` (grid, then refined between grid values); one more teacher-forced pass at that
``T`` measures the metrics there. ``"temperature_fit"`` holds ``temperature`` (the fitted ``T``, for
``--temperature``), ``mean_log_prob``, ``ece``, ``bins``, ``mean_scores`` and ``perplexity``
measured at it, ``grid_temperature``, ``grid_mean_log_prob`` and ``grid_ece`` (the best grid value
and the scan's values there), ``on_boundary``, and the whole scan (``temperatures``,
``mean_log_probs``, ``eces``, ``slopes``).

Decoding length: at most ``max_new_tokens`` new tokens, and with ``max_new_tokens_ratio`` at most
``ceil(ratio * L + max_new_tokens_offset)`` per batch, ``L`` the longest source text of the batch
in tokens (:func:`properlm.evaluation.generation.new_token_cap`); ``generation.new_token_cap`` in the
results counts the hypotheses that stopped at their cap.
Truncation: :mod:`properlm.evaluation.lengths`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

from .journal import DecodeJournal, journal_key
from .lengths import config_is_seq2seq, resolve_lengths
from .precision import bf16_matmul_mode, mixed_precision
from .settings import RESULTS_KIND, EvalSettings, resolve_device, resolve_languages, torch_dtype, validate_settings
from .teacher_forced import ScoredHiddenStates, progress_bar, teacher_forced_metrics

__all__ = ["DECODE_JOURNAL", "run_evaluation"]

#: the decoding journal in ``output_dir`` while ``properlm evaluate`` decodes (removed when it is done)
DECODE_JOURNAL = "decode_journal.jsonl"


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from .. import __version__

    return {
        "properlm": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def run_evaluation(settings: EvalSettings, model_and_tokenizer: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Validate, evaluate and write ``results.json``, ``hypotheses.txt`` and ``reliability.png``.

    ``model_and_tokenizer`` skips loading (for callers that already hold the model).
    Returns the results dictionary (also written as JSON).
    """
    from ..data import encode_prompt, load_examples, truncate_source
    from ..models import (
        is_seq2seq,
        load_model_and_tokenizer,
        model_config_dict,
        read_training_record,
        unwrap_model,
    )
    from .calibration import reliability_diagram
    from .generation import decode_prompts_with_stats
    from .metrics import MetricsAccumulator
    from .temperature import TemperatureScan
    from .text_metrics import generation_metrics, one_line

    s = validate_settings(settings, check_model=model_and_tokenizer is None)
    # the truncation next, from the options, the training run and the model's config.json: a length
    # the model cannot take stops here, before any data is read
    if model_and_tokenizer is None:
        config: Any = model_config_dict(s.model, s.gguf_file)
        record, record_path = read_training_record(s.model) if s.gguf_file is None else (None, None)
    else:
        config = getattr(unwrap_model(model_and_tokenizer[0]), "config", None)
        record, record_path = None, None
    length_args = dict(record=record, record_path=record_path, max_new_tokens=s.max_new_tokens if s.generate else None)
    limits = resolve_lengths(
        s.max_length, s.max_source_length, config=config, seq2seq=config_is_seq2seq(config), **length_args
    )
    languages = None
    if s.source_file is not None:  # translation: the prompt's language names default to the training run's
        src_lang, tgt_lang, origin = resolve_languages(s.source_lang, s.target_lang, record, record_path)
        if origin is not None:
            s = dataclasses.replace(s, source_lang=src_lang, target_lang=tgt_lang)
            languages = {"source_lang": src_lang, "target_lang": tgt_lang, "from": origin}
            if s.progress:
                print(
                    f"properlm evaluate: language names {src_lang or 'source'} -> {tgt_lang or 'target'} "
                    f"from the {origin}",
                    file=sys.stderr,
                    flush=True,
                )
    # data first: a malformed file stops here, before the model is loaded
    examples = load_examples(
        s.data_file,
        task=s.task,
        source_file=s.source_file,
        target_file=s.target_file,
        source_lang=s.source_lang,
        target_lang=s.target_lang,
    )
    total_examples = len(examples)
    if s.max_examples is not None:
        examples = examples[: s.max_examples]
    task = examples[0].task
    os.makedirs(s.output_dir, exist_ok=True)

    started = time.time()
    if model_and_tokenizer is None:
        model, tokenizer = load_model_and_tokenizer(s.model, gguf_file=s.gguf_file, dtype=torch_dtype(s.dtype))
        model.to(resolve_device(s.device))
    else:
        model, tokenizer = model_and_tokenizer
    load_seconds = time.time() - started
    seq2seq = is_seq2seq(model)
    if config is None:  # a hub id or GGUF file: its limits are known now
        limits = resolve_lengths(
            s.max_length, s.max_source_length, config=unwrap_model(model).config, seq2seq=seq2seq, **length_args
        )
    s = dataclasses.replace(s, max_length=limits.max_length, max_source_length=limits.max_source_length)
    cut = [truncate_source(e, tokenizer, s.max_source_length) for e in examples]
    full_prompts = [encode_prompt(e, tokenizer, seq2seq=seq2seq) for e in cut]
    truncation = {
        **limits.to_dict(),
        "num_sources_cut": sum(c is not e for c, e in zip(cut, examples)),
        "num_prompts_over_max_length": sum(len(p) > s.max_length for p in full_prompts),
    }

    t0 = time.time()
    scan = TemperatureScan(num_bins=s.num_bins) if s.fit_temperature else None
    # the scored positions' hidden states: the metrics at the fitted temperature then cost the head alone
    store = ScoredHiddenStates() if s.fit_temperature else None
    also = (
        None
        if s.also_temperature is None
        else MetricsAccumulator(s.rules, num_bins=s.num_bins, temperature=s.also_temperature)
    )
    precision = (lambda: mixed_precision(model)) if s.bf16 else contextlib.nullcontext
    with precision():
        tf = teacher_forced_metrics(
            model,
            tokenizer,
            cut,
            s.rules,
            max_length=s.max_length,
            batch_size=s.batch_size,
            num_bins=s.num_bins,
            progress=s.progress,
            temperature=s.temperature,
            scan=scan,
            extra_consumers=[] if also is None else [also],
            hidden_store=store,
        )
    tf_seconds = time.time() - t0
    rel_path = os.path.join(s.output_dir, "reliability.png")
    name = "/".join(os.path.normpath(s.model or s.gguf_file or "model").split(os.sep)[-2:])
    reliability_diagram(tf.bins, rel_path, title=name, ece=tf.ece)

    results: dict[str, Any] = {
        "kind": RESULTS_KIND,
        "settings": {**dataclasses.asdict(s), "task": task, "seq2seq": seq2seq},
        "num_examples": len(examples),
        "num_examples_in_data": total_examples,
        "truncation": truncation,
        **({"languages": languages} if languages else {}),
        **({"bf16_matmuls": bf16_matmul_mode(next(model.parameters()).device)} if s.bf16 else {}),
        "teacher_forced": _tf_dict(tf, s.num_bins, s.temperature),
        "files": {"results": os.path.join(s.output_dir, "results.json"), "reliability_diagram": rel_path},
        "versions": _versions(),
        "seconds": {"load": load_seconds, "teacher_forced": tf_seconds},
    }

    if scan is not None:
        with precision():
            results["temperature_fit"] = _fit_temperature(scan, tf, results, model, tokenizer, cut, s, name, store)
    if also is not None:
        results["teacher_forced_scaled"] = _tf_dict(also.compute(), s.num_bins, s.also_temperature)

    journal: DecodeJournal | None = None
    if s.generate:
        n = limits.decode_prompt_length
        prompts = [p[:n] if seq2seq else p[-n:] for p in full_prompts]  # as encode_prompt(max_length=n)
        # the source text alone (after --max-source-length), for the new-token cap
        source_lengths = [len(tokenizer(e.source, add_special_tokens=False, verbose=False)["input_ids"]) for e in cut]
        # a model loaded here is known by its files: an interrupted decoding resumes from the journal
        if model_and_tokenizer is None:
            journal = DecodeJournal(
                os.path.join(s.output_dir, DECODE_JOURNAL),
                key=journal_key(s.model, s.gguf_file, s.dtype + ("+bf16-autocast" if s.bf16 else ""), model),
            )
        bar = progress_bar(len(prompts), "decoding", s.progress)
        t0 = time.time()
        try:
            with precision():
                hyps, stats = decode_prompts_with_stats(
                    model,
                    tokenizer,
                    prompts,
                    num_beams=s.num_beams,
                    length_penalty=s.length_penalty,
                    max_new_tokens=s.max_new_tokens,
                    max_new_tokens_ratio=s.max_new_tokens_ratio,
                    max_new_tokens_offset=s.max_new_tokens_offset,
                    source_lengths=source_lengths,
                    batch_size=s.batch_size,
                    objective=None if s.objective == "logarithmic" else s.objective,
                    progress=_resume_note(bar, journal, s.progress),
                    journal=journal,
                )
        finally:
            bar.close()
        results["seconds"]["decode"] = time.time() - t0
        refs = [e.target for e in examples]
        multi = [list(e.references) for e in examples] if any(len(e.references) > 1 for e in examples) else None
        hyp_path = os.path.join(s.output_dir, "hypotheses.txt")
        with open(hyp_path, "w", encoding="utf-8") as f:
            for h in hyps:
                f.write(one_line(h) + "\n")
        results["files"]["hypotheses"] = hyp_path
        results["generation"] = {
            "decoding": "greedy" if s.num_beams == 1 else f"beam search, {s.num_beams} beams",
            "objective": s.objective,
            **generation_metrics(task, hyps, refs, s.target_lang, multi_references=multi),
            "new_token_cap": {
                "max_new_tokens": s.max_new_tokens,
                "ratio": s.max_new_tokens_ratio,
                "offset": s.max_new_tokens_offset,
                "source_lengths": "source text tokens",
                "mean_source_tokens": sum(source_lengths) / len(source_lengths),
                **stats.to_dict(),
            },
            # hypotheses taken from the journal of an interrupted run ("seconds" -> "decode" is the rest's)
            "resumed_hypotheses": 0 if journal is None else journal.resumed,
        }

    with open(os.path.join(s.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(_json_safe(results), f, indent=2)
    if journal is not None:
        journal.finish()  # the hypotheses and results are written: nothing left to resume
    return results


def _resume_note(bar: Any, journal: DecodeJournal | None, progress: bool) -> Any:
    """``bar.update``, saying once (on stderr) how many hypotheses came from an interrupted run's journal."""
    said = [False]

    def update(n: int) -> None:
        if not said[0] and journal is not None and progress:
            said[0] = True
            if journal.resumed:
                print(
                    f"properlm evaluate: {journal.resumed} hypotheses from the interrupted decoding in "
                    f"{journal.path} (same model and settings); decoding the rest",
                    file=sys.stderr,
                    flush=True,
                )
            elif journal.discarded:
                print(
                    f"properlm evaluate: {journal.path} is from another model or other settings; decoding afresh",
                    file=sys.stderr,
                    flush=True,
                )
        bar.update(n)

    return update


def _fit_temperature(
    scan: Any,
    tf: Any,
    results: dict[str, Any],
    model: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    s: EvalSettings,
    name: str,
    store: ScoredHiddenStates | None = None,
) -> dict[str, Any]:
    """The ``temperature_fit`` entry: the scan's fit, with its metrics measured at the fitted ``T``.

    The scan refines ``T`` between its grid values, where it has no measured metrics; the exact mean
    log score, ECE, reliability table (and ``reliability_fitted.png``) and rule scores at ``T`` come
    from the scored positions' hidden states of the first pass through the output head
    (``store``, a complete :class:`ScoredHiddenStates`: decoder-only models), else from one more
    teacher-forced pass at ``T``. Neither when ``T`` is the temperature of the first pass (its
    metrics are reused) or no position was scored.
    """
    from .calibration import reliability_diagram

    fit = scan.compute()
    if fit.num_tokens == 0:
        return {**fit.to_dict(), "mean_scores": {}, "perplexity": float("nan")}
    if fit.temperature == s.temperature:
        at = tf
    else:
        t0 = time.time()
        if store is not None and store.complete:
            at = store.metrics(s.rules, temperature=fit.temperature, num_bins=s.num_bins)
        else:
            at = teacher_forced_metrics(
                model,
                tokenizer,
                examples,
                s.rules,
                max_length=s.max_length,
                batch_size=s.batch_size,
                num_bins=s.num_bins,
                progress=s.progress,
                temperature=fit.temperature,
            )
        results["seconds"]["teacher_forced_at_fitted_temperature"] = time.time() - t0

    fit = fit.with_metrics(at, fit.temperature)
    path = os.path.join(s.output_dir, "reliability_fitted.png")
    reliability_diagram(fit.bins, path, title=f"{name}, T = {fit.temperature:.4f}", ece=fit.ece)
    results["files"]["reliability_diagram_fitted"] = path
    source = (
        "the first pass"
        if at is tf
        else "the scored hidden states of the first pass"
        if store is not None and store.complete
        else "a second teacher-forced pass"
    )
    return {**fit.to_dict(), "mean_scores": at.mean_scores, "perplexity": at.perplexity, "metrics_from": source}


def _tf_dict(tf: Any, num_bins: int, temperature: float) -> dict[str, Any]:
    """The ``teacher_forced`` entry of the results: an ``EvalMetrics`` at ``temperature``."""
    return {
        "num_tokens": tf.num_tokens,
        "mean_scores": tf.mean_scores,
        "mean_log_prob": tf.mean_log_prob,
        "perplexity": tf.perplexity,
        "token_accuracy": tf.accuracy,
        "mean_target_prob": tf.mean_target_prob,
        "target_prob_above_half": tf.target_prob_above_half,
        "ece": tf.ece,
        "mce": tf.mce,
        "num_bins": num_bins,
        "temperature": temperature,
        "bins": [dataclasses.asdict(b) for b in tf.bins],
    }


def _json_safe(x: Any) -> Any:
    """NaN/inf -> None-free JSON: non-finite floats become strings ("nan", "inf")."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x
