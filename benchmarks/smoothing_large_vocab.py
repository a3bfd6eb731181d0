"""Why score smoothing with the paper's masked-log term collapses bounded rules at large
vocabularies, and what the smoothing variants do instead (issue 14, part 1).

Logits shaped like a trained LM's: per context a few high-probability tokens (0.70, 0.12, 0.06,
0.03, 0.02; the target is the top one) and a long tail of log-probabilities ``N(-20, 2.5^2)``, far
below ``log(eps / V)`` (-13 at V = 49,152, eps = 0.1).

Part A (no training): per token, the logit-gradient mass that the masked-log term puts on the tail,
``sum_{j in M} |g_j|``, against the rule's own gradient on the target ``|g_y|`` (smoothing without
the masked term), as a function of ``V`` and ``eps``.

Part B (training): a tiny output layer ``W`` (``V x H``) on fixed, anisotropic hidden states
``h_i = 0.8 mu + u_i`` (``N`` contexts, ``H = 64``), initialised so that ``h W^T`` are exactly the
logits above, trained with Adam for a few dozen steps with each smoothing variant; reported: the
mean target log-probability and the top-1 accuracy at the end. ``pooled`` is a candidate that was
measured and not adopted: the log score of the masked set as one event,
``eps (|M|/V) log(P_M / |M|)`` (implemented here only).

Usage::

    python benchmarks/smoothing_large_vocab.py          # tables, and benchmarks/figures/smoothing_large_vocab.png
    python benchmarks/smoothing_large_vocab.py --quick          # smaller sweep
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

import properlm

HEAD = (0.70, 0.12, 0.06, 0.03, 0.02)
TAIL_MEAN, TAIL_SD = -20.0, 2.5
VARIANTS = ("paper", "pooled", "gated", "none")


def synthetic_logits(n: int, vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, V)`` float32 log-probability-like logits (head ``HEAD`` at random ids, Gaussian tail)
    and their targets (the top token of each row)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * TAIL_SD + TAIL_MEAN
    head = torch.log(torch.tensor(HEAD, dtype=torch.float64))
    for i in range(n):
        z[i, torch.randperm(vocab, generator=gen)[: len(HEAD)]] = head
    return z.float(), z.argmax(-1)


def pooled_loss(z: torch.Tensor, y: torch.Tensor, rule: str, eps: float) -> torch.Tensor:
    """Mean loss with the pooled masked term ``eps (|M|/V) log(P_M / |M|)`` (M a gradient constant)."""
    V = z.shape[-1]
    base = properlm.scoring_rule_loss(z, y, rule, eps, reduction="none", smoothing_variant="none")
    logp = torch.log_softmax(z.float(), -1)
    mask = logp.detach() < math.log(eps / V)
    count = mask.sum(-1).to(logp.dtype)
    log_pm = torch.logsumexp(torch.where(mask, logp, -math.inf), -1)
    term = torch.where(count > 0, count / V * (log_pm - torch.log(count.clamp(min=1))), 0.0)
    return (base - eps * term).mean()


def loss_fn(z: torch.Tensor, y: torch.Tensor, rule: str, eps: float, variant: str) -> torch.Tensor:
    if variant == "pooled":
        return pooled_loss(z, y, rule, eps)
    return properlm.scoring_rule_loss(z, y, rule, eps, smoothing_variant=variant)


def gradient_mass(rule: str, vocab: int, eps: float, n: int = 16) -> dict[str, float]:
    """Part A: per-token means of the masked term's tail gradient mass and the rule's target gradient."""
    z, y = synthetic_logits(n, vocab)
    out = {}
    grads: dict[str, torch.Tensor] = {}
    for variant in ("none", "paper", "pooled"):
        zz = z.clone().double().requires_grad_(True)
        loss_fn(zz, y, rule, eps, variant).backward()
        assert zz.grad is not None
        grads[variant] = zz.grad * n  # per-token gradients (the loss is a mean)
    mask = torch.log_softmax(z.double(), -1) < math.log(eps / vocab)
    g_rule_y = grads["none"].gather(1, y[:, None]).abs().mean().item()
    out["masked_share"] = mask.double().mean().item()
    out["rule_grad_y"] = g_rule_y
    for variant in ("paper", "pooled"):
        g_term = grads[variant] - grads["none"]
        out[f"{variant}_tail_mass"] = (g_term.abs() * mask).sum(-1).mean().item()
        out[f"{variant}_grad_y"] = g_term.gather(1, y[:, None]).abs().mean().item()
    return out


def adam_run(
    rule: str, vocab: int, eps: float, variant: str, steps: int, lr: float, n: int = 16, hidden: int = 64, seed: int = 1
) -> list[tuple[float, float]]:
    """Part B: ``(mean log p_y, top-1 accuracy)`` after each Adam step on the output layer ``W``."""
    z0, y = synthetic_logits(n, vocab, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    mu = torch.randn(hidden, generator=gen)
    h = 0.8 * mu + torch.randn(n, hidden, generator=gen)
    weight = (torch.linalg.pinv(h) @ z0).T.contiguous().requires_grad_(True)  # h W^T = z0
    opt = torch.optim.Adam([weight], lr=lr)
    hist = []
    for step in range(steps + 1):
        z = h @ weight.T
        with torch.no_grad():
            logp = torch.log_softmax(z.double(), -1)
            hist.append((logp.gather(1, y[:, None]).mean().item(), (z.argmax(-1) == y).double().mean().item()))
        if step == steps:
            break
        opt.zero_grad()
        loss_fn(z, y, rule, eps, variant).backward()
        opt.step()
    return hist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller sweep (fewer vocabulary sizes)")
    ap.add_argument("--steps", type=int, default=50, help="Adam steps of part B")
    ap.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate of part B")
    ap.add_argument("--eps", type=float, default=0.1, help="smoothing of part B")
    ap.add_argument("--figure", default=os.path.join(os.path.dirname(__file__), "figures", "smoothing_large_vocab.png"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    vocabs = [1024, 8192, 49152] if args.quick else [1024, 4096, 16384, 49152, 152064]
    print(f"properlm {properlm.__version__}, torch {torch.__version__}; head {HEAD}, tail N({TAIL_MEAN}, {TAIL_SD}^2)")

    print(
        "\nA. per-token logit-gradient mass of the masked-log term on the tail vs the rule's own gradient on the "
        "target (no training)\n"
    )
    print(
        "| rule | V | eps | share of V in M | rule |g_y| | paper: tail mass | paper: |g_y| | pooled: tail mass "
        "| pooled: |g_y| |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for rule in ("brier", "spherical"):
        for vocab in vocabs:
            for eps in (0.01, 0.1):
                r = gradient_mass(rule, vocab, eps)
                print(
                    f"| {rule} | {vocab} | {eps} | {r['masked_share']:.4f} | {r['rule_grad_y']:.4f} | "
                    f"{r['paper_tail_mass']:.4f} | {r['paper_grad_y']:.4f} | {r['pooled_tail_mass']:.4f} | "
                    f"{r['pooled_grad_y']:.4f} |",
                    flush=True,
                )

    print(
        f"\nB. Adam (lr {args.lr}) on a tiny output layer, eps {args.eps}: mean target log-probability (start -> "
        f"end of {args.steps} steps) and top-1 accuracy at the end; log(1 - eps) = {math.log(1 - args.eps):.3f} "
        "is the smoothed optimum\n"
    )
    print("| rule | V | " + " | ".join(VARIANTS) + " |")
    print("|---|---|" + "---|" * len(VARIANTS))
    curves: dict[tuple[str, str], list[tuple[int, float]]] = {}
    started = time.time()
    for rule in ("brier", "spherical"):
        for vocab in vocabs:
            cells = []
            for variant in VARIANTS:
                hist = adam_run(rule, vocab, args.eps, variant, args.steps, args.lr)
                curves.setdefault((rule, variant), []).append((vocab, hist[-1][0]))
                cells.append(f"{hist[0][0]:.2f} -> {hist[-1][0]:.2f} (acc {hist[-1][1]:.2f})")
            print(f"| {rule} | {vocab} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n(part B: {time.time() - started:.0f} s)")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no figure")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, rule in zip(axes, ("brier", "spherical")):
        for variant in VARIANTS:
            pts = curves[(rule, variant)]
            ax.plot([v for v, _ in pts], [lp for _, lp in pts], marker="o", label=variant)
        ax.axhline(math.log(1 - args.eps), color="grey", ls=":", lw=1, label="log(1 - eps)")
        ax.set_xscale("log")
        ax.set_xlabel("vocabulary size V")
        ax.set_title(f"{rule}, eps={args.eps}, {args.steps} Adam steps")
    axes[0].set_ylabel("mean target log-probability after training")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.figure), exist_ok=True)
    fig.savefig(args.figure, dpi=120)
    print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
