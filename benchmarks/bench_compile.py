"""Training-step time of a Llama patched with ``properlm.apply_scoring_rule``, eager against
``torch.compile(model)``, and the output-layer loss alone, on the CPU (or CUDA).

Shapes: ``tiny`` (2 layers, hidden 32, vocabulary 300, batch 2 x 16) and ``smollm2`` (the
SmolLM2-135M shape: hidden 576, intermediate 1536, 9 heads, 3 key/value heads, vocabulary
49,152, tied embeddings; random init, ``--layers`` layers, batch 4 x 128). One step is forward,
backward and an AdamW update. Both runs start from the same weights and see the same batches.

Measurement: the variants are timed **interleaved** (A B A B ...: one step, or one loss call, of each
variant per round, after ``--warmup`` untimed rounds, the first of which compiles), so that a change of
load on the machine hits every variant alike; the table gives the **median** over the ``--steps``
(at least 5) timed rounds and the **spread** (min - max) of the wall time, the median process CPU time
(all threads), the wall time of the first call (which compiles) and the largest relative difference of
the losses from the eager ones. The header names the torch version, the threads and
``torch.backends.cpu.get_cpu_capability()``.

``--loss-only``: forward + backward of the output-layer loss alone at ``--loss-shape N,H,V`` (default
2048,512,32000): eager fused, compiled fused (the ``torch.library`` operator of ``properlm.fused.op``),
compiled fused with checkpointed chunks (the traceable fallback of ``properlm.compiled``, logits recomputed
in backward), compiled unfused, and ``torch.nn.functional.linear_cross_entropy`` (the log loss, eager
and compiled) where this torch has it.

    python benchmarks/bench_compile.py                     # both shapes, spherical, fused loss
    python benchmarks/bench_compile.py --shapes tiny --rule brier --smoothing 0.1 --no-fused
    python benchmarks/bench_compile.py --loss-only --rule brier   # the output-layer loss alone
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import properlm

SHAPES = {
    "tiny": {"config": {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                        "num_key_value_heads": 2}, "batch": (2, 16)},
    "smollm2": {"config": {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                           "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True},
                "batch": (4, 128)},
}


def build(shape: str, layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=256, **SHAPES[shape]["config"])
    return LlamaForCausalLM(cfg)


class Timer:
    """Wall and process CPU times of the calls of several variants, taken interleaved (one call of each per round)."""

    def __init__(self, names: list[str], device: str) -> None:
        self.device = device
        self.wall: dict[str, list[float]] = {n: [] for n in names}
        self.cpu: dict[str, list[float]] = {n: [] for n in names}

    def time(self, name: str, fn: Callable[[], object]) -> object:
        """Run ``fn`` once, recording its wall and CPU time under ``name``; returns what it returned."""
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.wall[name].append(time.perf_counter() - start)
        self.cpu[name].append(time.process_time() - start_cpu)
        return out

    def summary(self, name: str, warmup: int) -> dict[str, float]:
        """``first`` (the first call's wall time), median ``wall`` and ``cpu``, ``lo`` / ``hi`` (wall min / max) over
        the rounds after ``warmup``."""
        wall, cpu = self.wall[name][warmup:], self.cpu[name][warmup:]
        return {"first": self.wall[name][0], "wall": statistics.median(wall), "cpu": statistics.median(cpu),
                "lo": min(wall), "hi": max(wall)}


def _spread(s: dict[str, float]) -> str:
    return f"{s['lo']:.4f} - {s['hi']:.4f}"


def _batches(shape: str, V: int, rounds: int, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    b, t = SHAPES[shape]["batch"]
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(rounds):
        ids = torch.randint(V, (b, t), generator=g).to(device)
        labels = ids.clone()
        labels[:, : t // 8] = -100  # a prompt that is not scored
        out.append((ids, labels))
    return out


def run_steps(shape: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Training steps of the eager and the compiled model, interleaved; the summaries and ``diff``."""
    layers = 2 if shape == "tiny" else args.layers
    runs = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        model = build(shape, layers).to(args.device)
        properlm.apply_scoring_rule(model, args.rule, smoothing=args.smoothing, fused=args.fused)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        runs[name] = (torch.compile(model, backend=args.backend) if compiled else model, opt, [])
    V = SHAPES[shape]["config"]["vocab_size"]
    timer = Timer(list(runs), args.device)
    for ids, labels in _batches(shape, V, args.warmup + args.steps, args.device):
        for name, (model, opt, losses) in runs.items():
            def step(model=model, opt=opt, ids=ids, labels=labels) -> float:
                loss = model(input_ids=ids, labels=labels).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.item()
            losses.append(timer.time(name, step))
    out = {name: timer.summary(name, args.warmup) for name in runs}
    eager, comp = runs["eager"][2], runs["compiled"][2]
    out["diff"] = {"max": max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(comp, eager))}
    return out


def loss_variants(args: argparse.Namespace, N: int, H: int, V: int) -> dict[str, Callable]:
    """The loss variants of ``--loss-only``: name -> ``f(h, w, y)`` returning a scalar loss."""
    from properlm import compiled
    from properlm.fused import default_chunk_size
    from properlm.rules import get_rule

    rule, eps = get_rule(args.rule), args.smoothing
    chunk = default_chunk_size(N, H, V, cuda=args.device == "cuda")

    def fused(h, w, y):
        return properlm.fused_linear_scoring_rule_loss(h, w, y, rule, smoothing=eps)

    def checkpointed(h, w, y):  # the traceable fallback: logits recomputed in backward
        per_token = compiled.fused_token_losses(h, w, None, y, rule, eps, -100, chunk)
        return per_token.sum() / (y != -100).sum().clamp(min=1)

    def unfused(h, w, y):
        return properlm.scoring_rule_loss(h @ w.T, y, rule, eps)

    def comp(f: Callable) -> Callable:
        return torch.compile(f, dynamic=False, fullgraph=True, backend=args.backend)

    variants: dict[str, Callable] = {
        "eager fused": fused,
        "compiled fused (operator)": comp(fused),
        "compiled fused, checkpointed chunks": comp(checkpointed),
        "compiled unfused": comp(unfused),
    }
    linear_ce = getattr(torch.nn.functional, "linear_cross_entropy", None)
    if linear_ce is not None:
        def lce(h, w, y):
            return linear_ce(h, w, y, ignore_index=-100)

        variants["F.linear_cross_entropy (log loss), eager"] = lce
        variants["F.linear_cross_entropy (log loss), compiled"] = comp(lce)
    return variants


def loss_only(args: argparse.Namespace) -> None:
    """Forward + backward of the output-layer loss alone, the variants interleaved (see the module docstring)."""
    N, H, V = (int(x) for x in args.loss_shape.split(","))
    dev = args.device
    torch.manual_seed(0)
    h = torch.randn(N, H, device=dev, requires_grad=True)
    w = (torch.randn(V, H, device=dev) * 0.02).requires_grad_()
    y = torch.randint(V, (N,), device=dev)
    y[: N // 8] = -100  # a prompt that is not scored
    variants = loss_variants(args, N, H, V)
    timer = Timer(list(variants), dev)
    losses: dict[str, float] = {}
    for _ in range(args.warmup + args.steps):
        for name, f in variants.items():
            def call(f=f) -> float:
                loss = f(h, w, y)
                loss.backward()
                return float(loss.detach())
            losses[name] = timer.time(name, call)  # type: ignore[assignment]
            h.grad = w.grad = None
    print(f"loss alone: N={N} scored {int((y != -100).sum())}, H={H}, V={V}, rule {args.rule}, smoothing "
          f"{args.smoothing}; {args.steps} interleaved rounds after {args.warmup} warm-up")
    print("| loss variant | median fwd+bwd (s) | spread (min - max) | / eager fused | median CPU (s) "
          "| first call (s) | loss |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = timer.summary("eager fused", args.warmup)["wall"]
    for name in variants:
        s = timer.summary(name, args.warmup)
        print(f"| {name} | {s['wall']:.4f} | {_spread(s)} | {s['wall'] / base:.2f} | {s['cpu']:.4f} "
              f"| {s['first']:.1f} | {losses[name]:.6g} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="tiny,smollm2", help="comma-separated: " + ", ".join(SHAPES))
    p.add_argument("--rule", default="spherical")
    p.add_argument("--smoothing", type=float, default=0.0)
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--layers", type=int, default=2, help="layers of the smollm2 shape (SmolLM2-135M has 30)")
    p.add_argument("--steps", type=int, default=5, help="timed interleaved rounds (the median and spread need 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (the first one compiles)")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--device", default="cpu")
    p.add_argument("--loss-only", action="store_true", help="time the output-layer loss alone instead of training "
                   "steps")
    p.add_argument("--loss-shape", default="2048,512,32000", help="N,H,V of --loss-only")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, device {args.device}, rule {args.rule}, "
          f"smoothing {args.smoothing}, fused {args.fused}, backend {args.backend}")
    if args.loss_only:
        loss_only(args)
        return
    print("| shape | eager step (s) | eager spread | compiled step (s) | compiled spread | compiled / eager "
          "| eager CPU (s) | compiled CPU (s) | CPU compiled / eager | first compiled step (s) | max loss rel. diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape in args.shapes.split(","):
        r = run_steps(shape, args)
        eager, comp = r["eager"], r["compiled"]
        print(f"| {shape} | {eager['wall']:.4f} | {_spread(eager)} | {comp['wall']:.4f} | {_spread(comp)} "
              f"| {comp['wall'] / eager['wall']:.2f} | {eager['cpu']:.4f} | {comp['cpu']:.4f} "
              f"| {comp['cpu'] / eager['cpu']:.2f} | {comp['first']:.1f} | {r['diff']['max']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
