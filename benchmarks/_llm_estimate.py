"""The cost estimate of ``reproduce_llm.py`` (``--estimate``; the cost model of its module docstring)."""

from __future__ import annotations

import argparse
import math
from typing import Any

import _runner
from _llm_common import (
    DE_TOKENS_PER_WORD,
    EN_TOKENS_PER_WORD,
    EXTRA_MAX_LENGTH,
    EXTRA_MAX_NEW_TOKENS,
    MEASURED_NEW_TOKENS,
    MEASURED_PROMPT_TOKENS,
    TEMPLATE_TOKENS,
)
from _runner import Step


def _extra_words(args: argparse.Namespace, name: str) -> tuple[int, float, float]:
    src, ref = args.extra_tests[name]
    s, r = _runner.read_lines(src), _runner.read_lines(ref)
    return len(s), sum(len(x.split()) for x in s) / len(s), sum(len(x.split()) for x in r) / len(r)


def estimate(
    args: argparse.Namespace, steps: list[Step], manifest: dict[str, Any], timings: dict[str, float] | None = None
) -> tuple[str, dict[str, Any]]:
    """The estimated seconds of every step (the module docstring's cost model) and a printout:
    per kind of step the count, how many are finished, seconds each and hours in all, then the
    remaining hours on one core and with ``--jobs``."""
    r = args.est_step_seconds / (8 * 128 * 3)  # forward seconds per token
    g = max(args.est_decode_seconds - r * MEASURED_PROMPT_TOKENS, 0.0) / MEASURED_NEW_TOKENS
    words = {k: tuple(v) for k, v in manifest["mean_words"].items()}
    counts = dict(manifest["counts"])
    for name in args.extra_tests:
        n, de, en = _extra_words(args, name)
        counts[name], words[name] = n, (de, en)

    def tokens(split: str) -> tuple[float, float]:
        """(prompt tokens, teacher-forced example tokens) of a mean sentence of the split."""
        de, en = words[split]
        prompt = TEMPLATE_TOKENS + DE_TOKENS_PER_WORD * de
        limit = EXTRA_MAX_LENGTH if split in args.extra_tests else args.max_length
        return min(prompt, limit), min(prompt + EN_TOKENS_PER_WORD * en + 1, limit)

    def cap(split: str) -> float:
        new = max(EXTRA_MAX_NEW_TOKENS, args.max_new_tokens) if split in args.extra_tests else args.max_new_tokens
        if args.max_new_tokens_ratio == 0:
            return new
        return min(
            new,
            math.ceil(args.max_new_tokens_ratio * DE_TOKENS_PER_WORD * words[split][0] + args.max_new_tokens_offset),
        )

    def seconds(s: Step) -> float:
        if s.kind == "train":
            evals = s.train_steps // args.eval_steps + 1
            return (
                s.train_steps * args.est_step_seconds * args.batch_size / 8
                + evals * counts["val"] * r * tokens("val")[1]
            )
        assert s.split is not None  # every step that is not training evaluates a split
        n = counts[s.split]
        prompt, example = tokens(s.split)
        if s.kind == "fit":
            return n * r * example
        return n * (r * example + args.num_beams * (r * prompt + g * cap(s.split)))

    kinds: dict[str, dict[str, Any]] = {}
    for s in steps:
        k = kinds.setdefault(s.kind, {"count": 0, "done": 0, "seconds": 0.0, "remaining_seconds": 0.0})
        k["count"] += 1
        k["seconds"] += seconds(s)
        k["seconds_each"] = k["seconds"] / k["count"]
        if s.done:
            k["done"] += 1
        else:
            k["remaining_seconds"] += seconds(s)
    total = sum(k["seconds"] for k in kinds.values())
    remaining = sum(k["remaining_seconds"] for k in kinds.values())
    what = {
        "train": f"training runs ({args.batch_size} examples per step)",
        "fit": "dev fits (teacher-forced)",
        "test": "test decodings (+ teacher-forced)",
        "dev": "dev decodings (+ teacher-forced)",
        "extra": "extra-test decodings (+ teacher-forced)",
    }
    lines = [
        f"plan: {len(args.seed_list)} seed(s) x {len(args.arm_list)} arm(s) ({', '.join(args.arm_list)}) "
        f"+ the untuned model; {args.steps} steps x {args.batch_size} examples per run = "
        f"{args.steps * args.batch_size} examples, {args.steps * args.batch_size / counts['train']:.2f} epochs "
        f"of {counts['train']} distinct pairs",
        f"cost model: training step {args.est_step_seconds:g} s per 8 examples; forward {r * 1000:.2f} ms/token; "
        f"decoding {args.est_decode_seconds:g} s/sentence at {MEASURED_NEW_TOKENS} new tokens -> "
        f"{g * 1000:.1f} ms per generated token; test cap {cap('test')} new tokens "
        f"(mean {words['test'][0]:.1f} German words)",
        "| steps | count | finished | est. seconds each | est. hours in all | est. hours left |",
        "|---|---|---|---|---|---|",
    ]
    for kind, k in kinds.items():
        lines.append(
            f"| {what[kind]} | {k['count']} | {k['done']} | {k['seconds_each']:.0f} | "
            f"{k['seconds'] / 3600:.2f} | {k['remaining_seconds'] / 3600:.2f} |"
        )
    lines.append(
        f"estimated: {total / 3600:.1f} core-hours in all, {remaining / 3600:.1f} left = about "
        f"{remaining / 3600 / args.jobs:.1f} h wall with --jobs {args.jobs} ({args.threads} thread(s) each; "
        "perfect packing)"
    )
    measured = _measured(timings or {}, steps)
    if measured:
        lines.append("measured so far: " + "; ".join(f"{k} {v:.1f}" for k, v in measured.items()))
    return "\n".join(lines), {
        "kinds": kinds,
        "total_seconds": total,
        "remaining_seconds": remaining,
        "wall_hours_left": remaining / 3600 / args.jobs,
        "measured": measured,
        "forward_seconds_per_token": r,
        "seconds_per_generated_token": g,
        "test_cap": cap("test"),
    }


def _measured(timings: dict[str, float], steps: list[Step]) -> dict[str, float]:
    """Mean measured seconds per training step and per test sentence of the finished steps."""
    train = [(timings[s.name], s.train_steps) for s in steps if s.kind == "train" and s.name in timings and s.done]
    test = [timings[s.name] for s in steps if s.kind == "test" and s.name in timings and s.done]
    out = {}
    if train:
        out["s per training step (incl. validation)"] = sum(t for t, _ in train) / sum(n for _, n in train)
    if test:
        out["s per test evaluation"] = sum(test) / len(test)
    return out
