"""The settings of ``properlm evaluate`` and their checks: everything is validated before anything loads.

:class:`EvalSettings` holds the CLI flags (one field each); :func:`validate_settings` checks them all and returns
a copy with canonical rule specs; :func:`validate_decoding` and :func:`validate_new_token_cap` are shared with
``properlm generate``. Every problem raises :class:`EvalError`, naming the flag.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..rules import get_rule

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "DTYPES",
    "RESULTS_KIND",
    "EvalError",
    "EvalSettings",
    "ignored_decoding_options",
    "parse_rules",
    "resolve_device",
    "resolve_languages",
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
    #: bfloat16 mixed precision: the body's matrix products in bfloat16, the output head in float32
    bf16: bool = False
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


def resolve_languages(
    source_lang: str | None, target_lang: str | None, record: dict[str, Any] | None, record_path: str | None = None
) -> tuple[str | None, str | None, str | None]:
    """``(source_lang, target_lang, origin)``: the language names of translation prompts.

    A name given (not ``None``) wins; else the training run's (``record``, from
    :func:`properlm.models.read_training_record`), so a decoder-only model is prompted
    with the ``Translate from {source_lang} to {target_lang}`` it was trained on and BLEU
    picks the target language's tokenizer. ``origin`` names the record when any name came
    from it, else ``None``.
    """
    rec = record or {}
    taken = [
        n
        for n, v in (("source_lang", source_lang), ("target_lang", target_lang))
        if v is None and isinstance(rec.get(n), str)
    ]
    src = rec["source_lang"] if "source_lang" in taken else source_lang
    tgt = rec["target_lang"] if "target_lang" in taken else target_lang
    origin = f"training run ({record_path})" if taken and record_path else "training run" if taken else None
    return src, tgt, origin


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


def validate_decoding(
    objective: str, num_beams: int, length_penalty: float, generate: bool = True, **positive: int
) -> str:
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
        raise EvalError(
            f"--objective {spec} only changes beam search (greedy search picks the most "
            "probable token under every proper rule): set --num-beams > 1"
        )
    return spec


def validate_new_token_cap(max_new_tokens_ratio: float | None, max_new_tokens_offset: int) -> None:
    """Check ``--max-new-tokens-ratio`` / ``--max-new-tokens-offset``; raises :class:`EvalError`."""
    from .generation import check_new_token_cap

    try:
        check_new_token_cap(max_new_tokens_ratio, max_new_tokens_offset)
    except ValueError as exc:
        raise EvalError(
            "--"
            + str(exc)
            .replace("max_new_tokens_ratio", "max-new-tokens-ratio")
            .replace("max_new_tokens_offset", "max-new-tokens-offset")
        ) from None


def ignored_decoding_options(s: EvalSettings) -> list[str]:
    """Messages for the decoding options that ``--no-generate`` makes void (none, or decoding on: ``[]``).

    An option counts as given when it differs from its :class:`EvalSettings` default (``--num-beams``,
    ``--objective``, ``--length-penalty``, ``--max-new-tokens``, ``--max-new-tokens-ratio``,
    ``--max-new-tokens-offset``)."""
    if s.generate:
        return []
    defaults = {f.name: f.default for f in dataclasses.fields(EvalSettings)}
    names = (
        "num_beams",
        "objective",
        "length_penalty",
        "max_new_tokens",
        "max_new_tokens_ratio",
        "max_new_tokens_offset",
    )
    given = [f"--{n.replace('_', '-')} {getattr(s, n)}" for n in names if getattr(s, n) != defaults[n]]
    if not given:
        return []
    return [f"{', '.join(given)}: no effect with --no-generate (no decoding; only the teacher-forced metrics)"]


def validate_settings(s: EvalSettings, check_model: bool = True, warn: bool = True) -> EvalSettings:
    """Check every setting without loading anything; returns a copy with canonical rule specs.

    ``check_model=False`` skips the model source (a model given in memory). With ``warn``, decoding
    options that ``--no-generate`` makes void (:func:`ignored_decoding_options`) give a ``UserWarning``.
    Raises :class:`EvalError`."""
    from ..models import ModelLoadError, check_model_source
    from .metrics import check_temperature

    if check_model:
        if not s.model and not s.gguf_file:
            raise EvalError(
                "no model given: pass --model (a directory saved by `properlm train` or a hub id) or --gguf-file"
            )
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
        if path is not None and (not os.path.exists(path) or os.path.isdir(path)):  # a pipe (<(command)) is fine
            what = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
            raise EvalError(f"--{name.replace('_', '-')}: file {path!r} {what}")
    rules = parse_rules(s.rules)
    objective = validate_decoding(
        s.objective,
        s.num_beams,
        s.length_penalty,
        s.generate,
        max_new_tokens=s.max_new_tokens,
        batch_size=s.batch_size,
        num_bins=s.num_bins,
    )
    validate_new_token_cap(s.max_new_tokens_ratio, s.max_new_tokens_offset)
    if warn:
        import warnings

        from .precision import emulated_bf16_warning

        slow = emulated_bf16_warning(s.device, "evaluate") if s.bf16 else None
        for message in [*ignored_decoding_options(s), *([slow] if slow else [])]:
            warnings.warn(message, UserWarning, stacklevel=2)
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
    if s.bf16 and s.dtype in ("bfloat16", "float16"):
        raise EvalError(
            f"--bf16 is mixed precision over float32 weights; with --dtype {s.dtype} the weights are "
            "already half precision (drop one of the two)"
        )
    resolve_device(s.device)
    _check_output_dir(s.output_dir)
    return dataclasses.replace(s, rules=rules, objective=objective)


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
            raise EvalError(
                f"--output-dir {path!r} already holds a results.json that `properlm evaluate` did not "
                "write (a training run's?); choose another --output-dir"
            )


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
