"""The evaluation pipeline behind ``properlm evaluate``.

Validate the settings, load data and model, compute the teacher-forced metrics
(:mod:`properlm.metrics`) and the generation metrics (:mod:`properlm.generation_eval`), and write the
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

``fit_temperature``: a :class:`~properlm.metrics.TemperatureScan` rides along the teacher-forced
pass and fits ``T`` (grid, then refined between grid values); one more teacher-forced pass at that
``T`` measures the metrics there. ``"temperature_fit"`` holds ``temperature`` (the fitted ``T``, for
``--temperature``), ``mean_log_prob``, ``ece``, ``bins``, ``mean_scores`` and ``perplexity``
measured at it, ``grid_temperature``, ``grid_mean_log_prob`` and ``grid_ece`` (the best grid value
and the scan's values there), ``on_boundary``, and the whole scan (``temperatures``,
``mean_log_probs``, ``eces``, ``slopes``).

Decoding length: at most ``max_new_tokens`` new tokens, and with ``max_new_tokens_ratio`` at most
``ceil(ratio * L + max_new_tokens_offset)`` per batch, ``L`` the longest source text of the batch
in tokens (:func:`properlm.generation_eval.new_token_cap`); ``generation.new_token_cap`` in the
results counts the hypotheses that stopped at their cap.

Truncation (:func:`resolve_lengths`): unless given, ``max_length`` and ``max_source_length``
are those the model was trained with (:func:`properlm.modeling.read_training_record`), and a
``max_length`` (or, for an encoder-decoder, ``max_new_tokens``) beyond the model's position
table (``config.max_position_embeddings``) is refused before any data is read. The results
state both lengths, where each came from, and how many sources were cut.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .rules import get_rule

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "DTYPES",
    "RESULTS_KIND",
    "EvalError",
    "EvalSettings",
    "LengthLimits",
    "format_value",
    "markdown_table",
    "parse_rules",
    "resolve_device",
    "resolve_lengths",
    "run_evaluation",
    "teacher_forced_metrics",
    "torch_dtype",
    "validate_decoding",
    "validate_new_token_cap",
    "validate_settings",
]

#: ``kind`` field of the results JSON written by :func:`run_evaluation`
RESULTS_KIND = "properlm-evaluate"

#: accepted ``dtype`` names (``auto``: as stored in the checkpoint)
DTYPES = ("auto", "float32", "bfloat16", "float16")

#: ``max_length`` when neither the option, the training run nor a smaller position table sets one
DEFAULT_MAX_LENGTH = 512


class EvalError(ValueError):
    """An evaluation setting is invalid."""


@dataclass
class EvalSettings:
    """Everything ``properlm evaluate`` needs (the CLI flags, one field each)."""

    model: str | None = None
    gguf_file: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    data_file: str | None = None
    source_file: str | None = None
    target_file: str | None = None
    source_lang: str | None = None
    target_lang: str | None = None
    task: str | None = None
    #: ``None``: the training run's (else the model's position limit, at most DEFAULT_MAX_LENGTH)
    max_length: int | None = None
    #: ``None``: the training run's (else the source is not cut on its own)
    max_source_length: int | None = None
    rules: list[str] = field(default_factory=lambda: ["logarithmic", "brier", "spherical"])
    num_bins: int = 15
    temperature: float = 1.0
    fit_temperature: bool = False
    objective: str = "logarithmic"
    num_beams: int = 1
    length_penalty: float = 1.0
    max_new_tokens: int = 128
    #: cap each batch at ceil(ratio * longest source tokens + offset) new tokens (None: max_new_tokens only)
    max_new_tokens_ratio: float | None = None
    max_new_tokens_offset: int = 0
    #: also report the teacher-forced metrics at this temperature, from the same forward passes
    also_temperature: float | None = None
    batch_size: int = 8
    max_examples: int | None = None
    generate: bool = True
    output_dir: str = "eval"
    progress: bool = True


def parse_rules(spec: str | Sequence[str]) -> list[str]:
    """``"logarithmic,brier,power:3"`` -> canonical specs (duplicates removed, order kept).

    A comma followed by a number continues the previous rule's parameters, so
    ``"power:1.5,2"``-style multi-parameter specs survive. Raises :class:`EvalError`."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    merged: list[str] = []
    for part in parts:
        p = part.strip()
        if not p:
            continue
        try:
            float(p)
            is_number = True
        except ValueError:
            is_number = False
        if is_number and merged and ":" in merged[-1]:
            merged[-1] += "," + p
        else:
            merged.append(p)
    out: list[str] = []
    for p in merged:
        try:
            s = get_rule(p).spec
        except ValueError as exc:
            raise EvalError(f"--rules: {exc}") from None
        if s not in out:
            out.append(s)
    if not out:
        raise EvalError("--rules names no rule; e.g. --rules logarithmic,brier,spherical,power:3")
    return out


def validate_decoding(objective: str, num_beams: int, length_penalty: float, generate: bool = True,
                      **positive: int) -> str:
    """Check the decoding options shared by ``evaluate`` and ``generate``; return the objective's rule spec.

    Also checks the positive integers named in ``positive`` (e.g. ``batch_size=8``). The spec returned is
    the canonical one. Raises :class:`EvalError`.
    """
    try:
        spec = get_rule(objective).spec
    except ValueError as exc:
        raise EvalError(f"--objective: {exc}") from None
    for name, v in {"num_beams": num_beams, **positive}.items():
        if not isinstance(v, int) or v < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    if not math.isfinite(length_penalty):
        raise EvalError(f"--length-penalty must be a finite number, got {length_penalty}")
    if length_penalty != 1.0 and num_beams == 1 and generate:
        raise EvalError("--length-penalty only applies to beam search: set --num-beams > 1")
    if spec != "logarithmic" and num_beams == 1 and generate:
        raise EvalError(f"--objective {spec} only changes beam search (greedy search picks the most "
                        "probable token under every proper rule): set --num-beams > 1")
    return spec


def validate_new_token_cap(max_new_tokens_ratio: float | None, max_new_tokens_offset: int) -> None:
    """Check ``--max-new-tokens-ratio`` / ``--max-new-tokens-offset``; raises :class:`EvalError`."""
    from .generation_eval import check_new_token_cap

    try:
        check_new_token_cap(max_new_tokens_ratio, max_new_tokens_offset)
    except ValueError as exc:
        raise EvalError("--" + str(exc).replace("max_new_tokens_ratio", "max-new-tokens-ratio")
                        .replace("max_new_tokens_offset", "max-new-tokens-offset")) from None


def validate_settings(s: EvalSettings, check_model: bool = True) -> EvalSettings:
    """Check every setting without loading anything; returns a copy with canonical rule specs.

    ``check_model=False`` skips the model source (a model given in memory).
    Raises :class:`EvalError`."""
    from .metrics import check_temperature
    from .modeling import ModelLoadError, check_model_source

    if check_model:
        if not s.model and not s.gguf_file:
            raise EvalError("no model given: pass --model (a directory saved by `properlm train` or a hub id) "
                            "or --gguf-file")
        try:
            check_model_source(s.model, s.gguf_file, None)
        except ModelLoadError as exc:
            raise EvalError(str(exc)) from None
    if s.data_file is None and s.source_file is None and s.target_file is None:
        raise EvalError("no data: pass --data-file (JSON/JSONL) or --source-file and --target-file")
    if s.data_file is not None and (s.source_file or s.target_file):
        raise EvalError("give either --data-file or --source-file/--target-file, not both")
    if (s.source_file is None) != (s.target_file is None):
        raise EvalError("translation data needs both --source-file and --target-file")
    for name in ("data_file", "source_file", "target_file"):
        path = getattr(s, name)
        if path is not None and not os.path.isfile(path):
            raise EvalError(f"--{name.replace('_', '-')}: file {path!r} does not exist")
    rules = parse_rules(s.rules)
    objective = validate_decoding(s.objective, s.num_beams, s.length_penalty, s.generate,
                                  max_new_tokens=s.max_new_tokens, batch_size=s.batch_size, num_bins=s.num_bins)
    validate_new_token_cap(s.max_new_tokens_ratio, s.max_new_tokens_offset)
    for flag, t in (("--temperature", s.temperature), ("--also-temperature", s.also_temperature)):
        if flag == "--also-temperature" and t is None:
            continue
        try:
            check_temperature(t)
        except (TypeError, ValueError):
            raise EvalError(f"{flag} must be a positive finite number, got {t!r}") from None
    if s.max_length is not None and s.max_length < 2:
        raise EvalError(f"--max-length must be at least 2, got {s.max_length}")
    if s.max_source_length is not None and s.max_source_length < 1:
        raise EvalError(f"--max-source-length must be positive, got {s.max_source_length}")
    if s.max_examples is not None and s.max_examples < 1:
        raise EvalError(f"--max-examples must be positive, got {s.max_examples}")
    if s.dtype not in DTYPES:
        raise EvalError(f"--dtype must be one of {', '.join(DTYPES)}, got {s.dtype!r}")
    resolve_device(s.device)
    _check_output_dir(s.output_dir)
    return dataclasses.replace(s, rules=rules, objective=objective)


@dataclass
class LengthLimits:
    """The truncation an evaluation (or ``properlm generate``) applies, and where it came from.

    Attributes:
        max_length: the most tokens of a tokenised example (seq2seq: of the encoder input and
            of the labels; decoder-only: of prompt + target), as in training.
        max_length_from: ``"--max-length"``, ``"training run (PATH)"``, ``"model limit"`` or ``"default"``.
        max_source_length: the most tokens of the source text (:func:`properlm.data.truncate_source`),
            ``None`` when only ``max_length`` cuts.
        max_source_length_from: where it came from (as above; ``"not set"`` for ``None``).
        model_max_positions: the model's position limit (``None``: unknown or unbounded), and
            ``position_key``, the config field it was read from.
        decode_prompt_length: the most prompt tokens for decoding: ``max_length``, and for a
            decoder-only model with a position limit at most ``limit - max_new_tokens``.
        trained: the training record (``max_length``, ``max_source_length``, ...) or ``None``.
    """

    max_length: int
    max_length_from: str
    max_source_length: int | None
    max_source_length_from: str
    model_max_positions: int | None
    position_key: str | None
    decode_prompt_length: int
    trained: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The limits and their sources as a JSON-ready dict."""
        return dataclasses.asdict(self)


def resolve_lengths(max_length: int | None, max_source_length: int | None, *, config: Any = None,
                    record: dict[str, Any] | None = None, record_path: str | None = None,
                    seq2seq: bool | None = None, max_new_tokens: int | None = None) -> LengthLimits:
    """Choose the truncation from the options, the training record and the model's config.

    An option given (not ``None``) wins; else the training run's value (``record``); else, for
    ``max_length``, the model's position limit when below :data:`DEFAULT_MAX_LENGTH`, else
    :data:`DEFAULT_MAX_LENGTH`. Raises :class:`EvalError` when ``max_length`` exceeds the model's
    position limit (``config.max_position_embeddings`` or ``n_positions``), or when
    ``max_new_tokens`` (given when decoding) does not fit: an encoder-decoder's decoder takes at
    most ``limit`` positions; a decoder-only model's prompts are cut to ``limit - max_new_tokens``.
    """
    from .modeling import model_max_positions

    limit, key = model_max_positions(config)
    trained_len = record.get("max_length") if record else None
    trained_src = record.get("max_source_length") if record else None
    where = f"training run ({record_path})" if record_path else "training run"
    if max_length is not None:
        length, length_from = max_length, "--max-length"
        if trained_len is not None and trained_len != max_length:
            length_from += f" (training used {trained_len})"
    elif isinstance(trained_len, int):
        length, length_from = trained_len, where
    elif limit is not None and limit < DEFAULT_MAX_LENGTH:
        length, length_from = limit, f"model limit ({key})"
    else:
        length, length_from = DEFAULT_MAX_LENGTH, "default"
    if length < 2:
        raise EvalError(f"--max-length must be at least 2, got {length}")
    if limit is not None and length > limit:
        hint = f"use --max-length {limit} or less"
        if max_length is not None and isinstance(trained_len, int) and trained_len <= limit:
            hint += f" (leave it out to use the training run's {trained_len})"
        what = f"--max-length {length}" if max_length is not None else f"max_length {length} of the {length_from}"
        raise EvalError(f"{what} exceeds the {limit} positions the model takes ({key} in its config): longer "
                        f"inputs would index past its position table; {hint}")
    if max_source_length is not None:
        src, src_from = max_source_length, "--max-source-length"
        if trained_src != max_source_length:
            src_from += f" (training used {trained_src if trained_src is not None else 'none'})"
    elif isinstance(trained_src, int):
        src, src_from = trained_src, where
    else:
        src, src_from = None, "not set"
    if src is not None and src < 1:
        raise EvalError(f"--max-source-length must be positive, got {src}")
    prompt_len = length
    if limit is not None and max_new_tokens is not None:
        if seq2seq and max_new_tokens > limit:
            raise EvalError(f"--max-new-tokens {max_new_tokens} exceeds the {limit} decoder positions the model "
                            f"takes ({key} in its config); use --max-new-tokens {limit} or less")
        if seq2seq is False:
            if max_new_tokens >= limit:
                raise EvalError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the {limit} "
                                f"positions the model takes ({key} in its config)")
            prompt_len = min(length, limit - max_new_tokens)
    return LengthLimits(max_length=length, max_length_from=length_from, max_source_length=src,
                        max_source_length_from=src_from, model_max_positions=limit, position_key=key,
                        decode_prompt_length=prompt_len, trained=dict(record) if record else None)


def _check_output_dir(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise EvalError(f"--output-dir {path!r} is a file")
    results = os.path.join(path, "results.json")
    if os.path.isfile(results):
        try:
            with open(results, encoding="utf-8") as f:
                kind = json.load(f).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind != RESULTS_KIND:
            raise EvalError(f"--output-dir {path!r} already holds a results.json that `properlm evaluate` did not "
                            "write (a training run's?); choose another --output-dir")


def resolve_device(device: str) -> Any:
    """``"auto"`` -> CUDA when available, else CPU; other names as ``torch.device``."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise EvalError(f"--device: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda: CUDA is not available")
    return dev


def torch_dtype(name: str) -> Any:
    """``"auto"`` -> ``None`` (as stored), else the ``torch`` dtype of that name."""
    import torch

    return None if name == "auto" else getattr(torch, name)


def _tqdm(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ex", disable=not enabled, leave=False)


def teacher_forced_metrics(model: Any, tokenizer: Any, examples: Sequence[Any], rules: Sequence[str], *,
                           max_length: int = 512, batch_size: int = 8, num_bins: int = 15,
                           progress: bool = False, temperature: float = 1.0, scan: Any = None,
                           max_source_length: int | None = None, extra_consumers: Sequence[Any] = ()) -> Any:
    """Score the reference targets of ``examples`` under teacher forcing.

    Examples are tokenised as for training (:func:`properlm.data.tokenize_example`, with
    ``max_length`` and ``max_source_length``: prompt positions labelled -100), batched
    (longest first), and the logits of each batch fed to
    a :class:`~properlm.metrics.MetricsAccumulator` (with ``temperature``), and to ``scan`` (a
    :class:`~properlm.metrics.TemperatureScan`, unscaled logits) when given, and to each of
    ``extra_consumers`` (objects with ``update(logits, labels)``, e.g. a second accumulator at another
    temperature). Returns the accumulator's :class:`~properlm.metrics.EvalMetrics`.
    """
    import torch

    from .data import DataCollator, tokenize_example
    from .metrics import MetricsAccumulator
    from .modeling import is_seq2seq

    seq2seq = is_seq2seq(model)
    device = next(model.parameters()).device
    features = [tokenize_example(e, tokenizer, seq2seq=seq2seq, max_length=max_length,
                                 max_source_length=max_source_length) for e in examples]
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = DataCollator(pad_token_id=int(pad))
    acc = MetricsAccumulator(rules, num_bins=num_bins, temperature=temperature)
    consumers = [acc, *([] if scan is None else [scan]), *extra_consumers]
    was_training = model.training
    model.eval()
    bar = _tqdm(len(features), "teacher-forced", progress)
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = collate([features[i] for i in order[start:start + batch_size]])
                batch = {k: v.to(device) for k, v in batch.items()}
                if seq2seq:
                    logits = model(**batch).logits
                    labels = batch["labels"]
                else:
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    # position t predicts token t+1: shift the labels, not the (large) logits
                    labels = torch.full_like(batch["labels"], -100)
                    labels[:, :-1] = batch["labels"][:, 1:]
                for consumer in consumers:
                    consumer.update(logits, labels)
                bar.update(len(batch["input_ids"]))
    finally:
        bar.close()
        model.train(was_training)
    return acc.compute()


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from . import __version__

    return {"properlm": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def run_evaluation(settings: EvalSettings, model_and_tokenizer: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Validate, evaluate and write ``results.json``, ``hypotheses.txt`` and ``reliability.png``.

    ``model_and_tokenizer`` skips loading (for callers that already hold the model).
    Returns the results dictionary (also written as JSON).
    """
    from .data import encode_prompt, load_examples, truncate_source
    from .generation_eval import decode_prompts_with_stats, generation_metrics, one_line
    from .metrics import MetricsAccumulator, TemperatureScan, reliability_diagram
    from .modeling import (
        is_seq2seq,
        load_model_and_tokenizer,
        model_config_dict,
        read_training_record,
        unwrap_model,
    )

    s = validate_settings(settings, check_model=model_and_tokenizer is None)
    # the truncation next, from the options, the training run and the model's config.json: a length
    # the model cannot take stops here, before any data is read
    if model_and_tokenizer is None:
        config: Any = model_config_dict(s.model, s.gguf_file)
        record, record_path = read_training_record(s.model) if s.gguf_file is None else (None, None)
    else:
        config = getattr(unwrap_model(model_and_tokenizer[0]), "config", None)
        record, record_path = None, None
    length_args = dict(record=record, record_path=record_path,
                       max_new_tokens=s.max_new_tokens if s.generate else None)
    limits = resolve_lengths(s.max_length, s.max_source_length, config=config, seq2seq=_config_seq2seq(config),
                             **length_args)
    # data first: a malformed file stops here, before the model is loaded
    examples = load_examples(s.data_file, task=s.task, source_file=s.source_file, target_file=s.target_file,
                             source_lang=s.source_lang, target_lang=s.target_lang)
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
        limits = resolve_lengths(s.max_length, s.max_source_length, config=unwrap_model(model).config,
                                 seq2seq=seq2seq, **length_args)
    s = dataclasses.replace(s, max_length=limits.max_length, max_source_length=limits.max_source_length)
    cut = [truncate_source(e, tokenizer, s.max_source_length) for e in examples]
    full_prompts = [encode_prompt(e, tokenizer, seq2seq=seq2seq) for e in cut]
    truncation = {**limits.to_dict(), "num_sources_cut": sum(c is not e for c, e in zip(cut, examples)),
                  "num_prompts_over_max_length": sum(len(p) > s.max_length for p in full_prompts)}

    t0 = time.time()
    scan = TemperatureScan(num_bins=s.num_bins) if s.fit_temperature else None
    also = None if s.also_temperature is None else \
        MetricsAccumulator(s.rules, num_bins=s.num_bins, temperature=s.also_temperature)
    tf = teacher_forced_metrics(model, tokenizer, cut, s.rules, max_length=s.max_length,
                                batch_size=s.batch_size, num_bins=s.num_bins, progress=s.progress,
                                temperature=s.temperature, scan=scan, extra_consumers=[] if also is None else [also])
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
        "teacher_forced": _tf_dict(tf, s.num_bins, s.temperature),
        "files": {"results": os.path.join(s.output_dir, "results.json"), "reliability_diagram": rel_path},
        "versions": _versions(),
        "seconds": {"load": load_seconds, "teacher_forced": tf_seconds},
    }

    if scan is not None:
        results["temperature_fit"] = _fit_temperature(scan, tf, results, model, tokenizer, cut, s, name)
    if also is not None:
        results["teacher_forced_scaled"] = _tf_dict(also.compute(), s.num_bins, s.also_temperature)

    if s.generate:
        n = limits.decode_prompt_length
        prompts = [p[:n] if seq2seq else p[-n:] for p in full_prompts]  # as encode_prompt(max_length=n)
        # the source text alone (after --max-source-length), for the new-token cap
        source_lengths = [len(tokenizer(e.source, add_special_tokens=False, verbose=False)["input_ids"]) for e in cut]
        bar = _tqdm(len(prompts), "decoding", s.progress)
        t0 = time.time()
        try:
            hyps, stats = decode_prompts_with_stats(
                model, tokenizer, prompts, num_beams=s.num_beams, length_penalty=s.length_penalty,
                max_new_tokens=s.max_new_tokens, max_new_tokens_ratio=s.max_new_tokens_ratio,
                max_new_tokens_offset=s.max_new_tokens_offset, source_lengths=source_lengths,
                batch_size=s.batch_size, objective=None if s.objective == "logarithmic" else s.objective,
                progress=bar.update)
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
            "new_token_cap": {"max_new_tokens": s.max_new_tokens, "ratio": s.max_new_tokens_ratio,
                              "offset": s.max_new_tokens_offset, "source_lengths": "source text tokens",
                              "mean_source_tokens": sum(source_lengths) / len(source_lengths),
                              **stats.to_dict()},
        }

    with open(os.path.join(s.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(_json_safe(results), f, indent=2)
    return results


def _fit_temperature(scan: Any, tf: Any, results: dict[str, Any], model: Any, tokenizer: Any,
                     examples: Sequence[Any], s: EvalSettings, name: str) -> dict[str, Any]:
    """The ``temperature_fit`` entry: the scan's fit, with its metrics measured at the fitted ``T``.

    The scan refines ``T`` between its grid values, where it has no measured metrics; one more
    teacher-forced pass at ``T`` (the cost of a plain scoring pass) gives the exact mean log score,
    ECE, reliability table (and ``reliability_fitted.png``) and rule scores at ``T``. No pass when
    ``T`` is the temperature of the first pass (its metrics are reused) or no position was scored.
    """
    from .metrics import reliability_diagram

    fit = scan.compute()
    if fit.num_tokens == 0:
        return {**fit.to_dict(), "mean_scores": {}, "perplexity": float("nan")}
    if fit.temperature == s.temperature:
        at = tf
    else:
        t0 = time.time()
        at = teacher_forced_metrics(model, tokenizer, examples, s.rules, max_length=s.max_length,
                                    batch_size=s.batch_size, num_bins=s.num_bins, progress=s.progress,
                                    temperature=fit.temperature)
        results["seconds"]["teacher_forced_at_fitted_temperature"] = time.time() - t0
    fit = fit.with_metrics(at, fit.temperature)
    path = os.path.join(s.output_dir, "reliability_fitted.png")
    reliability_diagram(fit.bins, path, title=f"{name}, T = {fit.temperature:.4f}", ece=fit.ece)
    results["files"]["reliability_diagram_fitted"] = path
    return {**fit.to_dict(), "mean_scores": at.mean_scores, "perplexity": at.perplexity}


def _tf_dict(tf: Any, num_bins: int, temperature: float) -> dict[str, Any]:
    """The ``teacher_forced`` entry of the results: an :class:`~properlm.metrics.EvalMetrics` at ``temperature``."""
    return {
        "num_tokens": tf.num_tokens,
        "mean_scores": tf.mean_scores,
        "mean_log_prob": tf.mean_log_prob,
        "perplexity": tf.perplexity,
        "token_accuracy": tf.accuracy,
        "ece": tf.ece,
        "mce": tf.mce,
        "num_bins": num_bins,
        "temperature": temperature,
        "bins": [dataclasses.asdict(b) for b in tf.bins],
    }


def _config_seq2seq(config: Any) -> bool | None:
    """``is_encoder_decoder`` of a config (object or dict); ``None`` for no config."""
    if config is None:
        return None
    if isinstance(config, dict):
        return bool(config.get("is_encoder_decoder"))
    return bool(getattr(config, "is_encoder_decoder", False))


def _json_safe(x: Any) -> Any:
    """NaN/inf -> None-free JSON: non-finite floats become strings ("nan", "inf")."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def format_value(v: Any, spec: str = ".4f") -> str:
    """One markdown table cell.

    ``-`` for missing, numbers with ``spec`` (floats only), ``|`` escaped in text.
    """
    if v is None:
        return "-"
    if isinstance(v, bool | int):
        return str(v)
    if isinstance(v, float):
        return format(v, spec) if math.isfinite(v) else str(v)
    return str(v).replace("|", "\\|")


def _fmt(v: Any, digits: int = 4) -> str:
    return format_value(v, f".{digits}f")


def _pct(v: Any) -> Any:
    return 100 * v if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def markdown_table(results: dict[str, Any]) -> str:
    """The headline figures of a results dictionary as a two-column markdown table.

    The sacrebleu signatures follow it.
    """
    tf = results["teacher_forced"]
    rows: list[tuple[str, str]] = [
        ("examples", _fmt(results["num_examples"])),
        ("reference tokens", _fmt(tf["num_tokens"])),
        ("perplexity", _fmt(tf["perplexity"], 3)),
        ("token accuracy (%)", _fmt(_pct(tf["token_accuracy"]), 2)),
        (f"ECE, {tf['num_bins']} bins (%)", _fmt(_pct(tf["ece"]), 2)),
    ]
    if tf.get("temperature", 1.0) != 1.0:
        rows.insert(2, ("temperature (scores, ECE)", _fmt(tf["temperature"], 3)))
    cut = results.get("truncation")
    if cut:
        limit = f"; the model takes {cut['model_max_positions']}" if cut.get("model_max_positions") else ""
        rows.insert(1, ("max length (tokens)", f"{cut['max_length']} ({cut['max_length_from']}{limit})"))
        if cut.get("max_source_length") is not None:
            rows.insert(2, ("source cut at (tokens)", f"{cut['max_source_length']} ({cut['max_source_length_from']}); "
                            f"{cut['num_sources_cut']} of {results['num_examples']} sources cut"))
    fit = results.get("temperature_fit")
    if fit:
        if fit["on_boundary"]:
            where = " (grid edge: the optimum may lie beyond)"
        elif "grid_temperature" in fit and fit["grid_temperature"] != fit["temperature"]:
            where = f" (refined from the grid's {_fmt(fit['grid_temperature'], 4)})"
        else:
            where = ""
        rows += [("fitted temperature", _fmt(fit["temperature"], 4) + where),
                 ("mean log score at it", _fmt(fit["mean_log_prob"], 4)),
                 ("ECE at it (%)", _fmt(_pct(fit["ece"]), 2))]
    for spec, v in tf["mean_scores"].items():
        rows.append((f"mean score {spec}", f"{v:.5g}" if isinstance(v, float) else _fmt(v)))
    scaled = results.get("teacher_forced_scaled")
    if scaled:
        t = _fmt(scaled["temperature"], 3)
        rows += [(f"ECE at T={t} (%)", _fmt(_pct(scaled["ece"]), 2)),
                 (f"mean log score at T={t}", _fmt(scaled["mean_log_prob"], 4))]
        for spec, v in scaled["mean_scores"].items():
            rows.append((f"mean score {spec} at T={t}", f"{v:.5g}" if isinstance(v, float) else _fmt(v)))
    gen = results.get("generation")
    notes: list[str] = []
    if gen:
        rows.append(("decoding", f"{gen['decoding']}, objective {gen['objective']}"))
        cap = gen.get("new_token_cap")
        if cap:
            rule = "" if cap["ratio"] is None else \
                f", per batch ceil({cap['ratio']:g} x longest source + {cap['offset']}): mean {cap['mean_cap']:.1f}"
            rows.append(("new-token cap", f"{cap['max_new_tokens']}{rule}; {cap['num_at_cap']} of "
                         f"{cap['num_hypotheses']} hypotheses stopped at it"))
        multi = f" (multi-ref, {gen['num_references']:.3g} refs/example)" if "num_references" in gen else ""
        for key, label in (("bleu", "BLEU"), ("chrf", "chrF"), ("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"),
                           ("rougeL", "ROUGE-L"), ("rouge1_multi", "ROUGE-1" + multi),
                           ("rouge2_multi", "ROUGE-2" + multi), ("rougeL_multi", "ROUGE-L" + multi)):
            if key in gen:
                rows.append((label, _fmt(gen[key], 2)))
        for key, label in (("bleu_signature", "BLEU"), ("chrf_signature", "chrF"), ("rouge_settings", "ROUGE"),
                           ("rouge_multi_settings", "ROUGE multi-reference")):
            if key in gen:
                notes.append(f"{label} signature: {gen[key]}")
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines + (["", *notes] if notes else []))
