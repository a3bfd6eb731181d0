"""The vocabulary-parallel and DTensor losses under ``torch.compile`` (CPU, gloo, 2 processes): values and every
gradient equal eager mode's, for the logits and the fused (hidden x output weight) forms, with smoothing, ignored
targets and each reduction. A function calling them is compiled with ``aot_eager`` (the collectives and the
autograd Functions may split it into several graphs: correctness is what is checked, not a single graph)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import properlm
from _multiprocess import Checker, run_ranks
from properlm.distributed import fused_linear_vocab_parallel_scoring_rule_loss, vocab_parallel_scoring_rule_loss

#: every test here runs a whole command, study, process group or build: `make check` leaves them out
pytestmark = pytest.mark.slow

WORLD = 2
SIZES = (5, 8)
RULES = ["logarithmic", "brier", "spherical", "0.5*logarithmic+0.5*spherical"]


def _case(seed: int, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 4, V, generator=g) * 3
    target = torch.randint(V, (3, 4), generator=g)
    target.view(-1)[::5] = -100
    return logits, target


def _reduce(loss: torch.Tensor) -> torch.Tensor:
    return loss if loss.dim() == 0 else (loss * torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape)).sum()


def _vocab_parallel(chk: Checker, rank: int) -> None:
    start = sum(SIZES[:rank])
    V, n = sum(SIZES), SIZES[rank]
    for i, rule in enumerate(RULES):
        for reduction in ("mean", "none"):
            logits, target = _case(10 + i, V)

            def unfused(z: torch.Tensor, y: torch.Tensor, rule: str = rule, reduction: str = reduction) -> torch.Tensor:
                return _reduce(vocab_parallel_scoring_rule_loss(z, y, rule, 0.1, reduction=reduction))

            compiled = torch.compile(unfused, backend="aot_eager")
            grads = []
            for fn in (unfused, compiled):
                local = logits[..., start : start + n].clone().requires_grad_()
                loss = fn(local, target)
                loss.backward()
                grads.append((loss.detach(), local.grad))
            tag = f"vocab-parallel {rule} {reduction} rank {rank}"
            chk.close(f"{tag} loss", grads[1][0], grads[0][0])
            chk.close(f"{tag} grad", grads[1][1], grads[0][1])

            g = torch.Generator().manual_seed(20 + i)
            hidden, weight = torch.randn(3, 4, 6, generator=g), torch.randn(V, 6, generator=g)

            def fused(
                h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, rule: str = rule, reduction: str = reduction
            ) -> torch.Tensor:
                return _reduce(
                    fused_linear_vocab_parallel_scoring_rule_loss(h, w, y, rule, smoothing=0.1, reduction=reduction)
                )

            compiled_fused = torch.compile(fused, backend="aot_eager")
            out = []
            for fn in (fused, compiled_fused):
                h = hidden.clone().requires_grad_()
                w = weight[start : start + n].clone().requires_grad_()
                loss = fn(h, w, target)
                loss.backward()
                out.append((loss.detach(), h.grad, w.grad))
            tag = f"fused vocab-parallel {rule} {reduction} rank {rank}"
            for what, a, b in zip(("loss", "hidden grad", "weight grad"), out[1], out[0]):
                chk.close(f"{tag} {what}", a, b)


def _dtensor(chk: Checker, rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    for i, rule in enumerate(RULES[1:3]):
        logits, target = _case(30 + i, 12)

        def loss_of(z: torch.Tensor, y: torch.Tensor, rule: str = rule) -> torch.Tensor:
            return properlm.scoring_rule_loss(z, y, rule, 0.1)

        compiled = torch.compile(loss_of, backend="aot_eager")
        out = []
        for fn in (loss_of, compiled):
            z = distribute_tensor(logits.clone(), mesh, [Shard(-1)]).requires_grad_()
            loss = fn(z, target)
            loss.backward()
            out.append((loss.full_tensor().detach(), z.grad.full_tensor()))
        tag = f"DTensor {rule} rank {rank}"
        chk.close(f"{tag} loss", out[1][0], out[0][0])
        chk.close(f"{tag} grad", out[1][1], out[0][1])


def _worker(chk: Checker, rank: int) -> None:
    _vocab_parallel(chk, rank)
    _dtensor(chk, rank)


def test_distributed_losses_compiled_equal_eager(tmp_path: Path) -> None:
    failures, counts = run_ranks(tmp_path, _worker, WORLD, checker=Checker(rtol=1e-5), timeout_s=300)
    assert not failures, f"{len(failures)} failure(s):\n" + "\n".join(failures[:10])
    assert min(counts) == len(RULES) * 2 * 5 + 2 * 2, counts
