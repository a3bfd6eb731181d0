"""Training-step time and peak memory of a Llama trained with several output-layer losses, eager and under
``torch.compile(model)``, and the output-layer loss alone, on the CPU (or CUDA).

Shapes: ``tiny`` (2 layers, hidden 32, vocabulary 300, batch 2 x 16) and ``smollm2`` (the
SmolLM2-135M shape: hidden 576, intermediate 1536, 9 heads, 3 key/value heads, vocabulary
49,152, tied embeddings; random init, ``--layers`` layers (SmolLM2 has 30; 2 to 4 here), batch 4 x 128,
the first 1/8 of each sequence labelled -100). One step is forward, backward and an AdamW update
(lr 1e-4) of all the weights.

Variants (``--variants``), each eager and compiled (``--modes``; compiled = ``torch.compile(model,
fullgraph=True)`` with ``--backend``, default inductor, falling back to ``fullgraph=False`` when the first call
does not trace as one graph; the ``fullgraph`` column says which):

* ``hf-ce``: the unpatched ``LlamaForCausalLM`` computing its own cross-entropy from ``labels`` (the logits
  B x T x V materialised): the **baseline**;
* ``linear-ce``: ``torch.nn.functional.linear_cross_entropy(h, lm_head.weight, y, ignore_index=-100)`` of the
  final hidden states ``h = model.model(ids).last_hidden_state[:, :-1]`` and the shifted labels
  ``y = labels[:, 1:]`` (only where this torch has it);
* ``log``, ``brier``, ``spherical``: ``properlm.apply_scoring_rule(model, rule)`` (fused loss; ``--smoothing``,
  ``--no-fused``).

Every variant is a fresh model from the same initial weights (seed 0) and sees the same batches.

Time: the variants are timed **interleaved** (A B C ... A B C ...: one step of each variant per round, after
``--warmup`` untimed rounds, the first of which compiles), so that a change of load on the machine hits every
variant alike. Per variant: the **median** wall time of a step over the ``--steps`` (at least 5) timed rounds and
its **spread** (min - max), the median process CPU time (all threads), the wall time of the first step (which
compiles), and, for the log-loss variants (HF CE, linear CE, properlm logarithmic at smoothing 0), the largest
relative difference of the step losses from the eager HF CE ones, ``max_t |L_t - L_t^HF| / |L_t^HF|`` (equal up
to float rounding). Ratios are ``x / x(HF CE)`` of the **same mode** (eager against eager HF CE, compiled against
compiled HF CE).

Peak memory (``--memory``, on by default) of one step, of its forward + backward and of the whole step
(with the AdamW update, whose temporaries, e.g. of the size of the 49,152 x 576 tied embedding, can dominate at
few layers),
each variant and mode in its **own fresh subprocess**
(``--peak-of``), which builds the model and runs ``max(--warmup, 1)`` untimed steps (the compile) first. On the
CPU: ``peak = VmHWM_after - VmRSS_before`` from ``/proc/self/status``, where ``VmRSS_before`` is read just
before the step (after ``gc.collect()`` and glibc ``malloc_trim(0)``) and the high-water mark ``VmHWM`` is reset
to the current RSS by writing ``5`` to ``/proc/self/clear_refs`` (Linux) just before the step, then read after
it (``ru_maxrss`` cannot be reset, so it would show the compile's peak). The subprocess runs with
``MALLOC_MMAP_THRESHOLD_=131072`` so that large tensors are mmapped and unmapped when freed, not kept in the
heap. This is the memory of the step above what is resident before it (weights, optimiser state; the gradients
are freed between steps): activations, logits, the loss's buffers, the gradients. On CUDA:
``torch.cuda.max_memory_allocated() - memory_allocated()`` before the step, after ``reset_peak_memory_stats``.

``--loss-only``: forward + backward of the output-layer loss alone at ``--loss-shape N,H,V`` (default
2048,512,32000): eager fused, compiled fused (the ``torch.library`` operator of ``properlm.fused.op``),
compiled fused with checkpointed chunks (the traceable fallback of ``properlm.compiled``, logits recomputed
in backward), compiled unfused, and ``torch.nn.functional.linear_cross_entropy`` (the log loss, eager
and compiled) where this torch has it, for ``--rule``.

The header names the torch version, the threads and ``torch.backends.cpu.get_cpu_capability()``.

    python benchmarks/bench_compile.py --shapes smollm2            # all variants, eager and compiled, + memory
    python benchmarks/bench_compile.py --shapes tiny --variants hf-ce,spherical --smoothing 0.1 --no-memory
    python benchmarks/bench_compile.py --loss-only --rule brier    # the output-layer loss alone
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import properlm

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "config": {
            "vocab_size": 300,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        "batch": (2, 16),
    },
    "smollm2": {
        "config": {
            "vocab_size": 49152,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "tie_word_embeddings": True,
        },
        "batch": (4, 128),
    },
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
        return {
            "first": self.wall[name][0],
            "wall": statistics.median(wall),
            "cpu": statistics.median(cpu),
            "lo": min(wall),
            "hi": max(wall),
        }


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


VARIANTS = {
    "hf-ce": "HF cross-entropy (logits materialised)",
    "linear-ce": "F.linear_cross_entropy",
    "log": "properlm fused logarithmic",
    "brier": "properlm fused Brier",
    "spherical": "properlm fused spherical",
}
LOG_VARIANTS = ("hf-ce", "linear-ce", "log")  # the same loss (at smoothing 0): compared with HF CE


class LinearCEModel(torch.nn.Module):
    """The Llama trunk (``model.model``) and ``torch.nn.functional.linear_cross_entropy`` of the final hidden
    states with the ``lm_head`` weight, the next-token shift done here (labels ``-100`` ignored)."""

    def __init__(self, llama: Any) -> None:
        super().__init__()
        self.llama = llama

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.llama.model(input_ids=input_ids).last_hidden_state
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        y = labels[:, 1:].reshape(-1)
        return torch.nn.functional.linear_cross_entropy(h, self.llama.lm_head.weight, y, ignore_index=-100)


class LabelsLoss(torch.nn.Module):
    """A causal LM whose own ``forward(input_ids=..., labels=...).loss`` is the loss (HF CE or patched)."""

    def __init__(self, llama: torch.nn.Module) -> None:
        super().__init__()
        self.llama = llama

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.llama(input_ids=input_ids, labels=labels).loss


def available_variants() -> list[str]:
    """The variants this torch can run (``linear-ce`` needs ``torch.nn.functional.linear_cross_entropy``)."""
    have_lce = hasattr(torch.nn.functional, "linear_cross_entropy")
    return [v for v in VARIANTS if v != "linear-ce" or have_lce]


def make_variant(variant: str, mode: str, shape: str, args: argparse.Namespace):
    """A fresh model of ``variant`` (same initial weights for all: seed 0), wrapped as ``f(ids, labels) -> loss``,
    compiled when ``mode == "compiled"``, and its AdamW optimiser."""
    llama = build(shape, layers_of(shape, args)).to(args.device)
    if variant == "linear-ce":
        model: torch.nn.Module = LinearCEModel(llama)
    else:
        if variant != "hf-ce":
            rule = "logarithmic" if variant == "log" else variant
            properlm.apply_scoring_rule(llama, rule, smoothing=args.smoothing, fused=args.fused)
        model = LabelsLoss(llama)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return (Compiled(model, args.backend) if mode == "compiled" else model), opt


class Compiled:
    """``torch.compile(model, fullgraph=True)``; if the first call fails to trace as one graph, ``fullgraph=False``
    (``fullgraph`` then says which was used)."""

    def __init__(self, model: torch.nn.Module, backend: str) -> None:
        self.model, self.backend, self.fullgraph = model, backend, True
        self.fn = torch.compile(model, backend=backend, fullgraph=True)
        self.called = False

    def __call__(self, *a):
        if self.called:
            return self.fn(*a)
        self.called = True
        try:
            return self.fn(*a)
        except Exception:  # a graph break (torch._dynamo.exc.Unsupported and kin): compile with breaks allowed
            torch._dynamo.reset()
            self.fullgraph = False
            self.fn = torch.compile(self.model, backend=self.backend)
            return self.fn(*a)


def layers_of(shape: str, args: argparse.Namespace) -> int:
    return 2 if shape == "tiny" else args.layers


def train_step(model, opt, ids: torch.Tensor, labels: torch.Tensor) -> float:
    """One training step: forward, backward, AdamW update; returns the loss."""
    loss = model(ids, labels)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _vm(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (Linux ``/proc/self/status``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _trim() -> None:
    """Give the heap's free memory back to the system (glibc ``malloc_trim``), so that ``VmRSS`` before the measured
    step holds what is live, not what the warm-up steps freed."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_peak(variant: str, mode: str, shape: str, args: argparse.Namespace) -> tuple[int, int]:
    """Peak memory (bytes) of one training step of ``variant`` / ``mode``, after ``max(warmup, 1)`` untimed steps
    (the first compiles): of the forward + backward, and of the whole step (with the AdamW update). On the CPU
    ``VmHWM`` after minus ``VmRSS`` before the step, ``VmHWM`` reset by writing 5 to ``/proc/self/clear_refs`` just
    before it; on CUDA ``max_memory_allocated`` (after ``reset_peak_memory_stats``) minus ``memory_allocated``
    before it. Meant for a fresh process per variant (``--peak-of``), so that no other variant's memory is in the
    picture."""
    model, opt = make_variant(variant, mode, shape, args)
    V = SHAPES[shape]["config"]["vocab_size"]
    warm = max(args.warmup, 1)
    batches = _batches(shape, V, warm + 1, args.device)
    for ids, labels in batches[:warm]:
        train_step(model, opt, ids, labels)
    ids, labels = batches[-1]
    if args.device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

        def peak() -> int:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - before
    else:
        _trim()
        before = _vm("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

        def peak() -> int:
            return _vm("VmHWM") - before

    model(ids, labels).backward()
    fwd_bwd = peak()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return fwd_bwd, peak()


def peak_in_subprocess(variant: str, mode: str, shape: str, args: argparse.Namespace) -> tuple[int | None, int | None]:
    """``measure_peak`` in a fresh Python process running this script with ``--peak-of``; ``None`` on failure."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--peak-of",
        f"{variant}:{mode}:{shape}",
        "--layers",
        str(args.layers),
        "--warmup",
        str(args.warmup),
        "--smoothing",
        str(args.smoothing),
        "--backend",
        args.backend,
        "--device",
        args.device,
        "--fused" if args.fused else "--no-fused",
    ]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}  # large blocks mmapped, unmapped when freed
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("PEAK "):
            fwd_bwd, step = line.split()[1:3]
            return int(fwd_bwd), int(step)
    print(f"peak memory of {variant} {mode} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None, None


def run_steps(shape: str, args: argparse.Namespace) -> dict[tuple[str, str], dict]:
    """Training steps of every (variant, mode), interleaved; per key the timing summary, ``losses``, ``fullgraph``
    and ``peak`` (bytes, or ``None`` without ``--memory``)."""
    runs = {}
    for mode in args.modes.split(","):
        for variant in args.variants.split(","):
            runs[(variant, mode)] = (*make_variant(variant, mode, shape, args), [])
    V = SHAPES[shape]["config"]["vocab_size"]
    timer = Timer([f"{v} {m}" for v, m in runs], args.device)
    for ids, labels in _batches(shape, V, args.warmup + args.steps, args.device):
        for (variant, mode), (model, opt, losses) in runs.items():
            losses.append(timer.time(f"{variant} {mode}", functools.partial(train_step, model, opt, ids, labels)))
    out = {}
    for (variant, mode), (model, _, losses) in runs.items():
        s: dict[str, Any] = dict(timer.summary(f"{variant} {mode}", args.warmup))
        s["losses"] = losses
        s["fullgraph"] = model.fullgraph if isinstance(model, Compiled) else None
        out[(variant, mode)] = s
    del runs
    for key in out:
        out[key]["peak_fb"], out[key]["peak"] = peak_in_subprocess(*key, shape, args) if args.memory else (None, None)
    return out


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def _mib(x: float | None) -> str:
    return f"{x / 2**20:.1f}" if x is not None else "-"


def print_steps(shape: str, r: dict[tuple[str, str], dict], args: argparse.Namespace) -> None:
    """The markdown table of ``run_steps``: ratios to the HF CE step of the same mode."""
    b, t = SHAPES[shape]["batch"]
    print(
        f"\n{shape}: {layers_of(shape, args)} layers, batch {b} x {t}, {args.steps} interleaved rounds after "
        f"{args.warmup} warm-up; ratios to HF cross-entropy of the same mode"
    )
    print(
        "| shape | variant | mode | median step (s) | spread (min - max) | step / HF CE | median CPU (s) "
        "| CPU / HF CE | first step (s) | peak fwd+bwd (MiB) | fwd+bwd memory / HF CE | peak step (MiB) "
        "| step memory / HF CE | loss rel. diff vs HF CE "
        "| fullgraph |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    ref_eager = r.get(("hf-ce", "eager"), {}).get("losses")
    for (variant, mode), s in r.items():
        base = r.get(("hf-ce", mode))
        ref = ref_eager or (base or {}).get("losses")
        diff = "-"
        if variant in LOG_VARIANTS and (args.smoothing == 0 or variant != "log") and ref:
            diff = f"{max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(s['losses'], ref)):.1e}"
        fg = {None: "-", True: "yes", False: "no"}[s["fullgraph"]]
        base = base or {}
        print(
            f"| {shape} | {VARIANTS[variant]} | {mode} | {s['wall']:.4f} | {_spread(s)} "
            f"| {_ratio(s['wall'], base.get('wall'))} | {s['cpu']:.4f} | {_ratio(s['cpu'], base.get('cpu'))} "
            f"| {s['first']:.1f} | {_mib(s['peak_fb'])} | {_ratio(s['peak_fb'], base.get('peak_fb'))} "
            f"| {_mib(s['peak'])} | {_ratio(s['peak'], base.get('peak'))} | {diff} | {fg} |",
            flush=True,
        )


def loss_variants(args: argparse.Namespace, N: int, H: int, V: int) -> dict[str, Callable]:
    """The loss variants of ``--loss-only``: name -> ``f(h, w, y)`` returning a scalar loss."""
    from properlm import compiled
    from properlm.fused import default_chunk_size
    from properlm.options import LossOptions
    from properlm.rules import get_rule

    rule, eps = get_rule(args.rule), args.smoothing
    chunk = default_chunk_size(N, H, V, cuda=args.device == "cuda")

    def fused(h, w, y):
        return properlm.fused_linear_scoring_rule_loss(h, w, y, rule, smoothing=eps)

    def checkpointed(h, w, y):  # the traceable fallback: logits recomputed in backward
        per_token = compiled.fused_token_losses(h, w, None, y, LossOptions(rule, eps), chunk)
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
    print(
        f"loss alone: N={N} scored {int((y != -100).sum())}, H={H}, V={V}, rule {args.rule}, smoothing "
        f"{args.smoothing}; {args.steps} interleaved rounds after {args.warmup} warm-up"
    )
    print(
        "| loss variant | median fwd+bwd (s) | spread (min - max) | / eager fused | median CPU (s) "
        "| first call (s) | loss |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = timer.summary("eager fused", args.warmup)["wall"]
    for name in variants:
        s = timer.summary(name, args.warmup)
        print(
            f"| {name} | {s['wall']:.4f} | {_spread(s)} | {s['wall'] / base:.2f} | {s['cpu']:.4f} "
            f"| {s['first']:.1f} | {losses[name]:.6g} |",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="tiny,smollm2", help="comma-separated: " + ", ".join(SHAPES))
    p.add_argument(
        "--variants",
        default=",".join(available_variants()),
        help="comma-separated training-step variants: " + ", ".join(VARIANTS),
    )
    p.add_argument("--modes", default="eager,compiled", help="comma-separated: eager, compiled")
    p.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the peak memory of one step of each variant in its own subprocess",
    )
    p.add_argument("--peak-of", help=argparse.SUPPRESS)  # VARIANT:MODE:SHAPE, the subprocess of --memory
    p.add_argument("--rule", default="spherical", help="the rule of --loss-only")
    p.add_argument("--smoothing", type=float, default=0.0)
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--layers", type=int, default=2, help="layers of the smollm2 shape (SmolLM2-135M has 30)")
    p.add_argument("--steps", type=int, default=5, help="timed interleaved rounds (the median and spread need 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (the first one compiles)")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--loss-only", action="store_true", help="time the output-layer loss alone instead of training steps"
    )
    p.add_argument("--loss-shape", default="2048,512,32000", help="N,H,V of --loss-only")
    args = p.parse_args(argv)
    if args.peak_of:
        variant, mode, shape = args.peak_of.split(":")
        print("PEAK {} {}".format(*measure_peak(variant, mode, shape, args)))
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, device {args.device}, smoothing {args.smoothing}, "
        f"fused {args.fused}, backend {args.backend}" + (f", rule {args.rule}" if args.loss_only else "")
    )
    if args.loss_only:
        loss_only(args)
        return
    unknown = set(args.variants.split(",")) - set(available_variants())
    if unknown:
        p.error(f"unknown or unavailable variants {sorted(unknown)}; this torch has {available_variants()}")
    for shape in args.shapes.split(","):
        print_steps(shape, run_steps(shape, args), args)


if __name__ == "__main__":
    main()
