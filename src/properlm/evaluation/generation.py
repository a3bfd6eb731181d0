"""Batched decoding of sources.

* :func:`decode_prompts` -- greedy or beam search over prompts given as token ids, batched
  (longest first, so that padding is small), with an optional scoring-rule objective
  (:class:`properlm.evaluation.decoding.ScoringRuleObjective`) and an optional cap of the new tokens by
  source length (:func:`new_token_cap`); the hypotheses come back in the order of the prompts.
  :func:`decode_prompts_with_stats` also returns each prompt's cap and whether its hypothesis
  stopped there (:class:`DecodeStats`), and with a :class:`~properlm.evaluation.journal.DecodeJournal`
  resumes an interrupted decoding batch by batch.

The scores of the hypotheses (BLEU, chrF, ROUGE) are in :mod:`properlm.evaluation.text_metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..rules import RuleLike, get_rule
from .decoding import ScoringRuleObjective
from .journal import DecodeJournal

__all__ = [
    "DecodeStats",
    "check_new_token_cap",
    "decode_prompts",
    "decode_prompts_with_stats",
    "new_token_cap",
]


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token; cannot pad a batch")
    return int(pad)


def new_token_cap(
    source_lengths: Sequence[int], max_new_tokens: int, ratio: float | None = None, offset: int = 0
) -> int:
    """The most new tokens generated for one batch.

    Without ``ratio``: ``max_new_tokens``. With it, for the batch's longest source
    ``L = max(source_lengths)`` (in tokens)::

        cap = min(max_new_tokens, max(1, ceil(ratio * L + offset)))

    e.g. ``ratio=1.0, offset=10`` lets a translation take the source's length plus 10 tokens.
    """
    if ratio is None:
        return int(max_new_tokens)
    longest = max(source_lengths) if len(source_lengths) else 0
    return int(min(max_new_tokens, max(1, math.ceil(ratio * longest + offset))))


def check_new_token_cap(max_new_tokens_ratio: float | None, max_new_tokens_offset: int) -> None:
    """Raise ``ValueError`` (naming the argument) for bad length-cap settings.

    That is a ratio that is not a positive finite number, an offset that is not a non-negative integer,
    or an offset without a ratio.
    """
    r, b = max_new_tokens_ratio, max_new_tokens_offset
    if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0):
        raise ValueError(f"max_new_tokens_ratio must be a positive finite number or None, got {r!r}")
    if isinstance(b, bool) or not isinstance(b, int) or b < 0:
        raise ValueError(f"max_new_tokens_offset must be a non-negative integer, got {b!r}")
    if r is None and b != 0:
        raise ValueError(
            f"max_new_tokens_offset ({b}) only applies with max_new_tokens_ratio (the cap "
            "ceil(ratio * source tokens + offset)); set max_new_tokens_ratio too"
        )


@dataclass
class DecodeStats:
    """What :func:`decode_prompts_with_stats` capped, per prompt in prompt order.

    Attributes:
        caps: the new-token cap of the prompt's batch (:func:`new_token_cap`).
        at_cap: whether the hypothesis stopped at that cap rather than at an end-of-sequence
            token (it used all ``cap`` positions and its last token is neither EOS nor padding):
            it may be cut short.
    """

    caps: list[int]
    at_cap: list[bool]

    def to_dict(self) -> dict[str, Any]:
        """``{"num_hypotheses", "num_at_cap", "mean_cap", "min_cap", "max_cap"}``."""
        n = len(self.caps)
        return {
            "num_hypotheses": n,
            "num_at_cap": int(sum(self.at_cap)),
            "mean_cap": sum(self.caps) / n if n else float("nan"),
            "min_cap": min(self.caps) if n else None,
            "max_cap": max(self.caps) if n else None,
        }


def decode_prompts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    max_new_tokens: int = 128,
    max_new_tokens_ratio: float | None = None,
    max_new_tokens_offset: int = 0,
    source_lengths: Sequence[int] | None = None,
    batch_size: int = 8,
    objective: RuleLike | None = None,
    progress: Callable[[int], None] | None = None,
    generate_kwargs: dict[str, Any] | None = None,
) -> list[str]:
    """Decode every prompt and return the hypotheses (special tokens removed), in prompt order.

    The prompts are sorted by length, longest first (ties keep their order), and cut into
    batches of ``batch_size`` consecutive prompts, so that a batch holds prompts of similar
    length (little padding, and with ``max_new_tokens_ratio`` a cap that fits every source in
    it when the prompt template is the same for all); the hypotheses are put back in the order
    of ``prompts``.

    Args:
        model: a Hugging Face model with ``generate``; ``model.config.is_encoder_decoder``
            selects seq2seq (right padding, the whole output is the hypothesis) or
            decoder-only (left padding, the hypothesis is what follows the prompt).
        tokenizer: its tokenizer (for padding and detokenising).
        prompts: token ids per source (see :func:`properlm.data.encode_prompt`).
        num_beams: beam width (1: greedy search).
        length_penalty: exponent of the length normalisation of finished beams
            (``score / length ** length_penalty``); beam search only.
        max_new_tokens: the most tokens generated per hypothesis.
        max_new_tokens_ratio: with it, each batch generates at most
            ``min(max_new_tokens, ceil(ratio * L + max_new_tokens_offset))`` tokens, ``L`` the
            longest source of the batch in tokens (:func:`new_token_cap`); ``None``: no cap but
            ``max_new_tokens``.
        max_new_tokens_offset: the ``offset`` of that cap (needs ``max_new_tokens_ratio``).
        source_lengths: per prompt, its source length in tokens (e.g. the source sentence
            tokenised alone, without the prompt template); ``None``: the prompt lengths.
        batch_size: prompts per ``generate`` call.
        objective: scoring rule whose summed token scores beam search maximises
            (``None`` or ``"logarithmic"``: ordinary beam search).
        progress: called with the number of prompts finished after each batch.
        generate_kwargs: extra keyword arguments for ``generate``.
    """
    return decode_prompts_with_stats(
        model,
        tokenizer,
        prompts,
        num_beams=num_beams,
        length_penalty=length_penalty,
        max_new_tokens=max_new_tokens,
        max_new_tokens_ratio=max_new_tokens_ratio,
        max_new_tokens_offset=max_new_tokens_offset,
        source_lengths=source_lengths,
        batch_size=batch_size,
        objective=objective,
        progress=progress,
        generate_kwargs=generate_kwargs,
    )[0]


def decode_prompts_with_stats(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    max_new_tokens: int = 128,
    max_new_tokens_ratio: float | None = None,
    max_new_tokens_offset: int = 0,
    source_lengths: Sequence[int] | None = None,
    batch_size: int = 8,
    objective: RuleLike | None = None,
    progress: Callable[[int], None] | None = None,
    generate_kwargs: dict[str, Any] | None = None,
    journal: DecodeJournal | None = None,
) -> tuple[list[str], DecodeStats]:
    """:func:`decode_prompts` (same arguments), returning ``(hypotheses, stats)``.

    The hypotheses are in prompt order; the :class:`DecodeStats` records the cap each one had.
    With ``journal`` (:class:`~properlm.evaluation.journal.DecodeJournal`), every finished batch is
    written to it, and the batches it already holds from an interrupted decoding of the same
    prompts and settings are taken from it instead of decoded again (the same batches, so the
    same hypotheses as without the interruption). The caller removes it when done
    (:meth:`~properlm.evaluation.journal.DecodeJournal.finish`).
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_new_token_cap(max_new_tokens_ratio, max_new_tokens_offset)
    if source_lengths is None:
        src_len = [len(p) for p in prompts]
    else:
        src_len = [int(n) for n in source_lengths]
        if len(src_len) != len(prompts):
            raise ValueError(f"source_lengths has {len(src_len)} entries but there are {len(prompts)} prompts")
        if any(n < 0 for n in src_len):
            raise ValueError("source_lengths must be non-negative token counts")
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    pad = _pad_id(tokenizer)
    device = next(model.parameters()).device
    processors = [] if objective is None else [ScoringRuleObjective(objective)]
    kwargs: dict[str, Any] = dict(
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    if num_beams > 1:
        kwargs["length_penalty"] = length_penalty
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        kwargs["eos_token_id"] = eos
    if processors:
        kwargs["logits_processor"] = processors
    kwargs.update(generate_kwargs or {})
    eos_ids = kwargs.get("eos_token_id")
    stop_ids = {pad, *([] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids))}
    # longest prompt first (stable: equal lengths keep the input order); batches are consecutive runs
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str | None] = [None] * len(prompts)
    caps = [0] * len(prompts)
    at_cap = [False] * len(prompts)
    done: dict[int, dict[str, Any]] = {}
    if journal is not None:
        settings = {
            "num_beams": num_beams,
            "length_penalty": length_penalty,
            "max_new_tokens": max_new_tokens,
            "ratio": max_new_tokens_ratio,
            "offset": max_new_tokens_offset,
            "source_lengths": src_len,
            "batch_size": batch_size,
            "seq2seq": seq2seq,
            "pad": pad,
            "eos": eos_ids,
            "objective": None if objective is None else get_rule(objective).spec,
            "generate_kwargs": {k: v for k, v in kwargs.items() if k != "logits_processor"},
        }
        done = journal.begin(prompts, settings)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            rec = done.get(start)
            if rec is not None and rec["indices"] == idx:  # decoded before the interruption
                for i, t, a in zip(idx, rec["texts"], rec["at_cap"]):
                    out[i], caps[i], at_cap[i] = t, int(rec["cap"]), bool(a)
                if progress is not None:
                    progress(len(idx))
                continue
            rows = [list(prompts[i]) for i in idx]
            if any(len(r) == 0 for r in rows):
                raise ValueError("cannot decode an empty prompt")
            cap = new_token_cap([src_len[i] for i in idx], max_new_tokens, max_new_tokens_ratio, max_new_tokens_offset)
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                if seq2seq:
                    input_ids[j, : len(r)] = torch.tensor(r)
                    mask[j, : len(r)] = 1
                else:  # left padding: the prompts end where generation starts
                    input_ids[j, width - len(r) :] = torch.tensor(r)
                    mask[j, width - len(r) :] = 1
            with torch.no_grad():
                gen = model.generate(
                    input_ids=input_ids.to(device), attention_mask=mask.to(device), **{**kwargs, "max_new_tokens": cap}
                )
            # seq2seq output starts with the decoder start token, which was not generated
            new = gen if seq2seq else gen[:, width:]
            generated = new[:, 1:] if seq2seq else new
            texts = tokenizer.batch_decode(new.cpu(), skip_special_tokens=True)
            for j, (i, t) in enumerate(zip(idx, texts)):
                out[i] = t.strip()
                caps[i] = cap
                at_cap[i] = generated.shape[1] >= cap and int(generated[j, -1]) not in stop_ids
            if journal is not None:
                journal.record(start, idx, [out[i] or "" for i in idx], cap, [at_cap[i] for i in idx])
            if progress is not None:
                progress(len(idx))
    finally:
        model.train(was_training)
        if journal is not None:
            journal.close()
    return [t if t is not None else "" for t in out], DecodeStats(caps=caps, at_cap=at_cap)
