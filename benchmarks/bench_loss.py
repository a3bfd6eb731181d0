"""Forward+backward time and peak memory of the output-layer loss, materialised vs fused.

Each variant runs in its own subprocess (``python benchmarks/bench_loss.py --variant X``), so
that peak memory is measured in a fresh process; the parent prints a markdown table with
ratios against ``F.cross_entropy`` on materialised logits measured in the same run.

Variants (per rule, plus the cross-entropy baselines):

* ``naive``   -- the reference implementation's way: materialise the logits, ``softmax``
  probabilities, gather, powers (and ``log(probs) * mask`` for smoothing), autograd;
* ``unfused`` -- materialised logits + :func:`properlm.scoring_rule_loss`;
* ``fused``   -- :func:`properlm.fused.fused_linear_scoring_rule_loss` (no ``N x V`` logits), its
  default implementation; ``fused-torch`` / ``fused-triton`` force the chunked PyTorch path or
  the Triton kernels;
* ``ce``      -- ``F.cross_entropy(hidden @ W.T, y)``;
* ``linear_ce`` -- ``torch.nn.functional.linear_cross_entropy`` where torch has it;
* ``liger_flce`` -- Liger-Kernel's fused linear cross-entropy
  (``liger_kernel.transformers.functional.liger_fused_linear_cross_entropy``; ``pip install
  liger-kernel``), CUDA only;
* ``cce``     -- Apple's Cut Cross-Entropy (``cut_cross_entropy.linear_cross_entropy``;
  ``pip install cut-cross-entropy``), CUDA only.

The cross-entropy baselines run once per table (they are log-score losses); a baseline that
cannot run here (no GPU, package not installed) gets a row that says why.

Peak memory: on CPU the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs`` before each call) minus its resident set just before the call; on
CUDA ``torch.cuda.max_memory_allocated()`` minus the allocation before the call. Gradients of
``hidden`` and ``weight`` are freed before every call, so their memory counts in every variant.

Usage::

    python benchmarks/bench_loss.py                       # CPU, N=4096 H=512 V=32000 float32
    python benchmarks/bench_loss.py --device cuda         # N=8192 H=4096 V=128256 bfloat16
    python benchmarks/bench_loss.py --rules brier,spherical --n 1024 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

RULES = ["logarithmic", "brier", "spherical", "power:3", "pseudo-spherical:1.5"]
CPU_SHAPE = {"n": 4096, "h": 512, "v": 32000, "dtype": "float32"}
CUDA_SHAPE = {"n": 8192, "h": 4096, "v": 128256, "dtype": "bfloat16"}


# ---------------------------------------------------------------------- memory probes
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------- the variants
def _naive_loss(logits, y, rule: str, smoothing: float):
    """The reference implementation's way: probabilities, gather, powers (float32)."""
    import torch

    name, _, arg = rule.partition(":")
    a = float(arg) if arg else 2.0
    V = logits.shape[-1]
    probs = torch.softmax(logits.float(), -1)
    p_y = probs.gather(-1, y[:, None]).squeeze(-1)
    if name == "logarithmic":
        score = torch.log(p_y)
        mean_score = torch.log(probs).mean(-1) if smoothing > 0 else None
        s_max = 0.0
    elif name == "brier":
        sq = probs.pow(2).sum(-1)
        score = 2 * p_y - sq
        mean_score = 2 / V - sq if smoothing > 0 else None
        s_max = 1.0
    elif name == "spherical":
        norm = probs.pow(2).sum(-1).sqrt()
        score = p_y / norm
        mean_score = probs.sum(-1) / norm / V if smoothing > 0 else None
        s_max = 1.0
    elif name == "power":
        spa = probs.pow(a).sum(-1)
        score = a * p_y.pow(a - 1) - (a - 1) * spa
        mean_score = a / V * probs.pow(a - 1).sum(-1) - (a - 1) * spa if smoothing > 0 else None
        s_max = 1.0
    elif name == "pseudo-spherical":
        norm = probs.pow(a).sum(-1).pow(1 / a)
        score = (p_y / norm).pow(a - 1)
        mean_score = (probs / norm[:, None]).pow(a - 1).mean(-1) if smoothing > 0 else None
        s_max = 1.0
    else:
        raise ValueError(f"no naive implementation of rule {rule!r}")
    if smoothing > 0:
        assert mean_score is not None
        score = (1 - smoothing) * score + smoothing * mean_score
        if name != "logarithmic":
            mask = (probs < smoothing / V).detach()
            score = score + smoothing / V * (torch.log(probs) * mask).sum(-1)
    return (s_max - score).mean()


def _make_step(variant: str, rule: str, smoothing: float, hidden, weight, y) -> Callable[[], None]:
    import torch
    import torch.nn.functional as F

    import properlm
    from properlm.fused import fused_linear_scoring_rule_loss

    if variant == "ce":

        def loss_fn():
            return F.cross_entropy((hidden @ weight.T).float(), y, label_smoothing=smoothing)
    elif variant == "linear_ce":
        if not hasattr(F, "linear_cross_entropy"):
            raise SystemExit("torch.nn.functional.linear_cross_entropy is not available in this torch")

        def loss_fn():
            return F.linear_cross_entropy(hidden, weight, y, label_smoothing=smoothing)
    elif variant in ("liger_flce", "cce"):
        if hidden.device.type != "cuda":
            raise SystemExit(f"skipped: {variant} needs a CUDA GPU (Triton kernels)")
        try:
            if variant == "liger_flce":
                from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as fn
            else:
                from cut_cross_entropy import linear_cross_entropy as fn
        except ImportError:
            package = "liger-kernel" if variant == "liger_flce" else "cut-cross-entropy"
            raise SystemExit(f"skipped: {variant} is not installed (pip install {package})") from None
        if variant == "liger_flce":

            def loss_fn():
                return fn(hidden, weight, y, label_smoothing=smoothing)
        else:
            if smoothing:
                raise SystemExit("skipped: cce has no label smoothing")

            def loss_fn():
                return fn(hidden, weight, y)
    elif variant == "naive":

        def loss_fn():
            return _naive_loss(hidden @ weight.T, y, rule, smoothing)
    elif variant == "unfused":

        def loss_fn():
            return properlm.scoring_rule_loss(hidden @ weight.T, y, rule, smoothing)
    elif variant in ("fused", "fused-torch", "fused-triton"):
        impl = variant.partition("-")[2] or None

        def loss_fn():
            return fused_linear_scoring_rule_loss(hidden, weight, y, rule, smoothing=smoothing, impl=impl)
    else:
        raise SystemExit(f"unknown variant {variant!r}")

    def step() -> None:
        hidden.grad = None
        weight.grad = None
        loss = loss_fn()
        loss.backward()
        if not torch.isfinite(loss):
            raise SystemExit(f"non-finite loss {loss.item()} for {variant} {rule}")

    return step


def run_variant(args: argparse.Namespace) -> dict[str, float]:
    """Time and peak memory of one variant, in this process."""
    import torch

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(args.n, args.h, generator=gen) * 1.0).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(args.v, args.h, generator=gen) / args.h**0.5).to(device=device, dtype=dtype)
    weight.requires_grad_()
    y = torch.randint(args.v, (args.n,), generator=gen).to(device)
    step = _make_step(args.variant, args.rule, args.smoothing, hidden, weight, y)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up (allocator pools, kernel compilation)
    hidden.grad = weight.grad = None
    times, cpu_times, peaks = [], [], []
    for _ in range(args.repeats):
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            if not _reset_peak_rss():
                raise SystemExit("cannot reset the peak RSS (/proc/self/clear_refs); CPU memory needs Linux")
            base = _status_kib("VmRSS") * 1024
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
        peaks.append(peak - base)
        hidden.grad = weight.grad = None
    return {
        "time_s": min(times),
        "time_median_s": sorted(times)[len(times) // 2],
        "cpu_s": min(cpu_times),
        "peak_bytes": max(peaks),
    }


# ---------------------------------------------------------------------- the driver
def _child(args: argparse.Namespace, variant: str, rule: str) -> dict[str, float] | str:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--variant",
        variant,
        "--rule",
        rule,
        "--device",
        args.device,
        "--n",
        str(args.n),
        "--h",
        str(args.h),
        "--v",
        str(args.v),
        "--dtype",
        args.dtype,
        "--repeats",
        str(args.repeats),
        "--smoothing",
        str(args.smoothing),
    ]
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["failed"])[-1]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(x: float, base: float, digits: int) -> str:
    """``x / base`` rounded, or ``n/a`` when the baseline is too small to measure (tiny shapes)."""
    return f"{x / base:.{digits}f}" if base > 0 else "n/a"


def _fmt_mib(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--rules", default=",".join(RULES), help="comma-separated rule specs")
    p.add_argument("--n", type=int, default=None, help="tokens (default 4096 on CPU, 8192 on CUDA)")
    p.add_argument("--h", type=int, default=None, help="hidden size (default 512 / 4096)")
    p.add_argument("--v", type=int, default=None, help="vocabulary (default 32000 / 128256)")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default float32 / bfloat16)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up (min time reported)")
    p.add_argument("--smoothing", type=float, default=0.0)
    p.add_argument(
        "--variants",
        default="naive,unfused,fused",
        help="per-rule variants to run: naive, unfused, fused, fused-torch, fused-triton",
    )
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--rule", default="spherical", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shape = CUDA_SHAPE if args.device.startswith("cuda") else CPU_SHAPE
    for k in ("n", "h", "v", "dtype"):
        if getattr(args, k) is None:
            setattr(args, k, shape[k])
    if args.variant:  # child process
        print(json.dumps(run_variant(args)))
        return

    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    per_rule = [v.strip() for v in args.variants.split(",") if v.strip()]
    import torch

    name = (
        torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else f"cpu, capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print(
        f"device={args.device} ({name}) N={args.n} H={args.h} V={args.v} dtype={args.dtype} "
        f"smoothing={args.smoothing} "
        f"repeats={args.repeats} torch={torch.__version__} threads={torch.get_num_threads()} "
        "(times: min over repeats, wall and process CPU; peak memory: max over repeats)",
        flush=True,
    )
    results: list[tuple[str, str, dict[str, float] | str]] = []
    ce = _child(args, "ce", "logarithmic")
    results.append(("cross_entropy (materialised)", "logarithmic", ce))
    results.append(("linear_cross_entropy (torch)", "logarithmic", _child(args, "linear_ce", "logarithmic")))
    results.append(("Liger fused linear CE", "logarithmic", _child(args, "liger_flce", "logarithmic")))
    results.append(("Cut Cross-Entropy", "logarithmic", _child(args, "cce", "logarithmic")))
    for rule in rules:
        for variant in per_rule:
            results.append((variant, rule, _child(args, variant, rule)))
            print(f"  done {variant} {rule}", file=sys.stderr, flush=True)

    print()
    print(
        "| rule | variant | fwd+bwd time (s) | time / CE | CPU time (s) | CPU time / CE | peak memory (MiB) "
        "| memory / CE |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for variant, rule, r in results:
        if isinstance(r, str):
            status = r.partition("SystemExit: ")[2] or r
            print(
                f"| {rule} | {variant} | {status if status.startswith('skipped') else 'failed: ' + status} | | | | | |"
            )
            continue
        t_ratio = c_ratio = m_ratio = ""
        if isinstance(ce, dict):
            t_ratio, c_ratio, m_ratio = (
                _ratio(r[k], ce[k], digits) for k, digits in (("time_s", 2), ("cpu_s", 2), ("peak_bytes", 3))
            )
        print(
            f"| {rule} | {variant} | {r['time_s']:.3f} | {t_ratio} | {r['cpu_s']:.3f} | {c_ratio} "
            f"| {_fmt_mib(r['peak_bytes'])} | {m_ratio} |"
        )


if __name__ == "__main__":
    main()
