"""``--bf16`` on this CPU: a training step and greedy decoding of a Llama in float32 and in bfloat16 mixed precision,
with the bfloat16 products as this machine computes them.

Modes (``--modes``):

* ``fp32``: float32 throughout (the baseline);
* ``bf16``: ``torch.autocast("cpu", torch.bfloat16)`` with the products as ``properlm ... --bf16`` computes them
  here: oneDNN's bfloat16 kernels on a CPU with AVX512-BF16 or AMX, else
  ``properlm.evaluation.precision.bf16_matmuls_in_float32`` (float32 products of the bfloat16 operands);
* ``bf16-onednn``: autocast with oneDNN's own bfloat16 kernels whatever the CPU (on one without bfloat16
  instructions they emulate them, measured about 27x slower than float32: not in the default modes there).

Model: the SmolLM2-135M shape with random weights (hidden 576, intermediate 1536, 9 heads, 3 key/value heads,
vocabulary 49,152, tied embeddings; ``--layers``, 30 in SmolLM2) or ``--shape tiny``. A training step is forward
and backward of ``--batch`` random sequences of ``--length`` tokens (the loss on every position); decoding is
``--new-tokens`` greedy tokens for ``--decode-batch`` prompts of 32 tokens (KV cache). Calls are timed
interleaved (one of each mode per round, after one untimed round), the median wall time over ``--rounds`` rounds
is reported with its ratio to fp32, and the first round's step loss of each mode with its relative difference
from fp32's (bfloat16 rounding, not an error) and, with ``bf16-onednn``, from oneDNN's.

    python benchmarks/bench_bf16_cpu.py                       # SmolLM2 shape, the default modes
    python benchmarks/bench_bf16_cpu.py --modes fp32,bf16,bf16-onednn --layers 4 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
from typing import Any

import torch

from bench_compile import SHAPES, Timer, build
from properlm.evaluation.precision import bf16_autocast_matmuls, bf16_matmul_mode

MODES = ("fp32", "bf16", "bf16-onednn")


def context(mode: str) -> contextlib.ExitStack:
    """The precision of ``mode`` as one context (autocast, and the float32 products where ``bf16`` needs them)."""
    stack = contextlib.ExitStack()
    if mode != "fp32":
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    if mode == "bf16":
        stack.enter_context(bf16_autocast_matmuls("cpu"))
    return stack


def train_step(model: torch.nn.Module, ids: torch.Tensor, mode: str) -> float:
    """Forward and backward of the language-model loss of ``ids`` in ``mode``; returns the loss."""
    model.zero_grad(set_to_none=True)
    with context(mode):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return loss.detach().item()


def decode(model: Any, prompts: torch.Tensor, new_tokens: int, mode: str) -> None:
    with torch.no_grad(), context(mode):
        model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def med(timer: Timer, mode: str) -> float:
    """The median wall time of ``mode``'s calls after the first (untimed) round."""
    return statistics.median(timer.wall[mode][1:])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2", help="model shape (default: smollm2)")
    p.add_argument("--layers", type=int, default=30, help="decoder layers (default: 30, as SmolLM2-135M)")
    p.add_argument(
        "--modes",
        default=None,
        help="comma-separated, of " + ", ".join(MODES) + " (default: fp32,bf16, and bf16-onednn where the CPU has "
        "bfloat16 instructions)",
    )
    p.add_argument("--batch", type=int, default=8, help="training sequences per step (default: 8)")
    p.add_argument("--length", type=int, default=64, help="tokens per training sequence (default: 64)")
    p.add_argument("--decode-batch", type=int, default=32, help="prompts decoded together (default: 32)")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per prompt (default: 16)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after the untimed first (default: 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    native = bf16_matmul_mode("cpu") == "native"
    modes = (args.modes or ("fp32,bf16,bf16-onednn" if native else "fp32,bf16")).split(",")
    bad = [m for m in modes if m not in MODES]
    if bad or "fp32" not in modes:
        p.error(f"--modes: {','.join(bad) or 'fp32 is missing'}; allowed: {', '.join(MODES)} (fp32 among them)")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, bf16 products: {bf16_matmul_mode('cpu')}; shape {args.shape} "
        f"x {args.layers} layers; step {args.batch} x {args.length} tokens; decoding {args.decode_batch} prompts "
        f"x {args.new_tokens} new tokens"
    )
    model = build(args.shape, args.layers)
    vocab = SHAPES[args.shape]["config"]["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab, (args.batch, args.length), generator=gen)
    prompts = torch.randint(1, vocab, (args.decode_batch, 32), generator=gen)
    steps, decodes = Timer(modes, "cpu"), Timer(modes, "cpu")
    losses: dict[str, float] = {}
    for r in range(args.rounds + 1):
        for m in modes:
            loss = steps.time(m, functools.partial(train_step, model, ids, m))
            if r == 0:
                losses[m] = float(loss)  # type: ignore[arg-type]
        for m in modes:
            decodes.time(m, functools.partial(decode, model, prompts, args.new_tokens, m))
    rows = [
        "| mode | step s (median) | x fp32 | decoding s (median) | x fp32 | loss rel. diff. from fp32 |"
        + (" from bf16-onednn |" if "bf16-onednn" in modes else ""),
        "|---|---|---|---|---|---|" + ("---|" if "bf16-onednn" in modes else ""),
    ]
    for m in modes:
        row = (
            f"| {m} | {med(steps, m):.3f} | {med(steps, m) / med(steps, 'fp32'):.2f} | {med(decodes, m):.3f} | "
            f"{med(decodes, m) / med(decodes, 'fp32'):.2f} | {abs(losses[m] / losses['fp32'] - 1):.1e} |"
        )
        if "bf16-onednn" in modes:
            row += f" {abs(losses[m] / losses['bf16-onednn'] - 1):.1e} |"
        rows.append(row)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
