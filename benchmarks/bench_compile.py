"""Training-step time of a Llama patched with ``properlm.apply_scoring_rule``, eager against
``torch.compile(model)``, on the CPU (or CUDA).

Shapes: ``tiny`` (2 layers, hidden 32, vocabulary 300, batch 2 x 16) and ``smollm2`` (the
SmolLM2-135M shape: hidden 576, intermediate 1536, 9 heads, 3 key/value heads, vocabulary
49,152, tied embeddings; random init, ``--layers`` layers, batch 4 x 128). One step is forward,
backward and an AdamW update. Both runs start from the same weights and see the same batches;
the table gives the minimum over the ``--steps`` steps after ``--warmup`` steps of the wall time
and of the process CPU time (all threads) of one step (as ``bench_loss.py``: the minimum is the
least disturbed by other jobs), the wall time of the first compiled step (which compiles), and the
largest relative difference between the compiled and the eager losses.

    python benchmarks/bench_compile.py                     # both shapes, spherical, fused loss
    python benchmarks/bench_compile.py --shapes tiny --rule brier --smoothing 0.1 --no-fused
    python benchmarks/bench_compile.py --loss-only         # the output-layer loss alone, smollm2 head
"""

from __future__ import annotations

import argparse
import time

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


def run(shape: str, args: argparse.Namespace, compiled: bool) -> dict:
    layers = 2 if shape == "tiny" else args.layers
    model = build(shape, layers).to(args.device)
    properlm.apply_scoring_rule(model, args.rule, smoothing=args.smoothing, fused=args.fused)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_model = torch.compile(model, backend=args.backend) if compiled else model
    b, t = SHAPES[shape]["batch"]
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    losses, times, cpu = [], [], []
    for _ in range(args.warmup + args.steps):
        ids = torch.randint(V, (b, t), generator=g).to(args.device)
        labels = ids.clone()
        labels[:, : t // 8] = -100  # a prompt that is not scored
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = step_model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"losses": losses, "first": times[0], "wall": min(times[args.warmup:]), "cpu": min(cpu[args.warmup:])}


def loss_only(args: argparse.Namespace) -> None:
    """Forward + backward of the output-layer loss alone at the ``smollm2`` head shape (4 x 127
    scored tokens, H 576, V 49,152): eager fused, compiled fused (checkpointed chunks), the
    traceable loss compiled without checkpointing and compiled unfused (both keep N x V for backward)."""
    from properlm import compiled
    from properlm.rules import get_rule

    torch.manual_seed(0)
    N, H, V = 4 * 127, 576, 49152
    dev = args.device
    h = torch.randn(N, H, device=dev, requires_grad=True)
    w = (torch.randn(V, H, device=dev) * 0.02).requires_grad_()
    y = torch.randint(V, (N,), device=dev)
    rule, eps = get_rule(args.rule), args.smoothing

    def fused(h, w, y):
        return properlm.fused_linear_scoring_rule_loss(h, w, y, rule, smoothing=eps)

    def traceable(h, w, y):
        return compiled.token_losses(torch.nn.functional.linear(h, w), y, rule, eps).mean()

    def unfused(h, w, y):
        return properlm.scoring_rule_loss(h @ w.T, y, rule, eps)

    variants = {"eager fused": fused,
                "compiled fused (checkpointed chunks)": torch.compile(fused, dynamic=False, backend=args.backend),
                "compiled, no checkpointing": torch.compile(traceable, dynamic=False, backend=args.backend),
                "compiled unfused": torch.compile(unfused, dynamic=False, backend=args.backend)}
    print("| loss variant | fwd+bwd (s) | / eager fused | first call (s) |")
    print("|---|---:|---:|---:|")
    base = None
    for name, f in variants.items():
        times = []
        for _ in range(args.warmup + args.steps):
            start = time.perf_counter()
            f(h, w, y).backward()
            if dev == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            h.grad = w.grad = None
        best = min(times[args.warmup:])
        base = base or best
        print(f"| {name} | {best:.3f} | {best / base:.2f} | {times[0]:.1f} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="tiny,smollm2", help="comma-separated: " + ", ".join(SHAPES))
    p.add_argument("--rule", default="spherical")
    p.add_argument("--smoothing", type=float, default=0.0)
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--layers", type=int, default=2, help="layers of the smollm2 shape (SmolLM2-135M has 30)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one compiles)")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--device", default="cpu")
    p.add_argument("--loss-only", action="store_true", help="time the output-layer loss alone at the smollm2 "
                   "head shape instead of training steps")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, rule {args.rule}, "
          f"smoothing {args.smoothing}, fused {args.fused}, backend {args.backend}")
    if args.loss_only:
        loss_only(args)
        return
    print("| shape | eager step (s) | compiled step (s) | compiled / eager | eager CPU (s) | compiled CPU (s) "
          "| CPU compiled / eager | first compiled step (s) | max loss rel. diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape in args.shapes.split(","):
        eager = run(shape, args, compiled=False)
        comp = run(shape, args, compiled=True)
        diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(comp["losses"], eager["losses"]))
        print(f"| {shape} | {eager['wall']:.4f} | {comp['wall']:.4f} | {comp['wall'] / eager['wall']:.2f} "
              f"| {eager['cpu']:.4f} | {comp['cpu']:.4f} | {comp['cpu'] / eager['cpu']:.2f} "
              f"| {comp['first']:.1f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
