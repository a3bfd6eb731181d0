"""Tile sizes of the Triton kernels of the fused loss: forward+backward time per configuration (CUDA).

Times ``fused_linear_scoring_rule_loss(..., impl="triton")`` with every ``(BLOCK_N, BLOCK_V,
BLOCK_H, num_warps)`` of a small grid, next to materialised ``F.cross_entropy`` and the chunked
PyTorch path in the same process, with CUDA events (median of ``--repeats`` after warm-up).

Usage::

    python benchmarks/bench_triton_tiles.py                      # N=8192 H=4096 V=128256 bfloat16
    python benchmarks/bench_triton_tiles.py --rule brier --smoothing 0.1
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from properlm.fused import fused_linear_scoring_rule_loss
from properlm.fused import triton_kernels as tk
from properlm.fused.chunked import FusedLinearLossFunction, default_chunk_size
from properlm.rules import get_rule


def _time(step, repeats: int) -> float:
    step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rule", default="spherical", help="rule spec (default spherical)")
    p.add_argument("--smoothing", type=float, default=0.0, help="score smoothing eps (default 0)")
    p.add_argument("--n", type=int, default=8192, help="tokens (default 8192)")
    p.add_argument("--h", type=int, default=4096, help="hidden size (default 4096)")
    p.add_argument("--v", type=int, default=128256, help="vocabulary (default 128256)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16, float16 or float32 (default bfloat16)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per configuration (median reported)")
    p.add_argument("--blocks-n", default="64,128", help="BLOCK_N values (default 64,128)")
    p.add_argument("--blocks-v", default="128,256", help="BLOCK_V values (default 128,256)")
    p.add_argument("--blocks-h", default="32,64", help="BLOCK_H values (default 32,64)")
    p.add_argument("--warps", default="4,8", help="num_warps values (default 4,8)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_triton_tiles.py needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.n, args.h, generator=g).to("cuda", dtype).requires_grad_()
    weight = (torch.randn(args.v, args.h, generator=g) / args.h**0.5).to("cuda", dtype).requires_grad_()
    y = torch.randint(args.v, (args.n,), generator=g).cuda()

    def step(fn):
        def run():
            hidden.grad = weight.grad = None
            fn().backward()

        return run

    ce = _time(
        step(lambda: F.cross_entropy((hidden @ weight.T).float(), y, label_smoothing=args.smoothing)), args.repeats
    )
    fused_torch = _time(
        step(
            lambda: fused_linear_scoring_rule_loss(hidden, weight, y, args.rule, smoothing=args.smoothing, impl="torch")
        ),
        args.repeats,
    )
    print(
        f"{torch.cuda.get_device_name()} N={args.n} H={args.h} V={args.v} {args.dtype} rule={args.rule} "
        f"smoothing={args.smoothing} torch={torch.__version__}"
    )
    print(
        f"materialised cross_entropy: {ce * 1e3:.1f} ms; fused impl=torch: {fused_torch * 1e3:.1f} ms "
        f"({fused_torch / ce:.2f}x)"
    )
    print("| BLOCK_N | BLOCK_V | BLOCK_H | warps | time (ms) | / CE |")
    print("|---:|---:|---:|---:|---:|---:|")
    rule = get_rule(args.rule)
    chunk = default_chunk_size(args.n, args.h, args.v, cuda=True)
    grid = itertools.product(
        *(map(int, s.split(",")) for s in (args.blocks_n, args.blocks_v, args.blocks_h, args.warps))
    )
    for bn, bv, bh, warps in grid:
        backend = tk.TritonChunkBackend(block_n=bn, block_v=bv, block_h=bh, num_warps=warps)

        def fn(backend=backend, rule=rule, chunk=chunk):
            return FusedLinearLossFunction.apply(
                hidden, weight, None, y, rule, args.smoothing, -100, "mean", None, chunk, backend
            )

        try:
            t = _time(step(fn), args.repeats)
            print(f"| {bn} | {bv} | {bh} | {warps} | {t * 1e3:.1f} | {t / ce:.2f} |", flush=True)
        except Exception as e:  # a configuration that does not fit the chip's shared memory
            print(f"| {bn} | {bv} | {bh} | {warps} | failed: {type(e).__name__} | |", flush=True)


if __name__ == "__main__":
    main()
