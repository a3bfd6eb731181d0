"""Vocabulary-parallel losses on CPU with the gloo backend.

One spawn of 3 processes: worlds of 3 (the default group) and 2 (a subgroup), uneven
shards, one layout with an empty shard and one with shards out of rank order. The workers
run every case and write their failures to a file that the test reads, so a failing
comparison never leaves a rank waiting in a collective. Every case compares with the
single-process ``properlm.scoring_rule_loss`` of the concatenated logits.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import properlm.options as pl_options
from _multiprocess import Checker, run_ranks
from properlm import scoring_rule_loss
from properlm.distributed import (
    fused_linear_vocab_parallel_scoring_rule_loss,
    vocab_parallel_scoring_rule_loss,
    vocab_shard,
)

#: every test here runs a whole command, study, process group or build: `make check` leaves them out
pytestmark = pytest.mark.slow

Group = dist.ProcessGroup | None

RULES = ["logarithmic", "brier", "spherical", "power:3", "pseudo-spherical:1.5", "0.5*logarithmic+0.5*spherical"]
SMOOTHINGS = [0.0, 0.1]
REDUCTIONS = ["mean", "sum", "none"]
#: shard sizes per world size (uneven); the second layout of world 3 (fewer cases) has an empty shard
LAYOUTS = {2: [(5, 8)], 3: [(4, 6, 3), (7, 0, 6)]}
RTOL = 1e-5


# --------------------------------------------------------------------------- helpers


def _make_case(
    seed: int,
    V: int,
    sizes: tuple[int, ...],
    with_inf: bool,
    dtype: torch.dtype = torch.float32,
    shape: tuple[int, ...] = (3, 4),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``shape + (V,)`` and targets with ignored positions (every 5th), the same on every rank.

    With ``with_inf``: logits of -inf in columns 1 and 2 (in the first shard) for the first
    batch row, and a whole first shard of -inf for one position; targets avoid them.
    """
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, V, generator=g) * 3).to(dtype)
    target = torch.randint(V, shape, generator=g)
    target.view(-1)[::5] = -100
    if with_inf:
        logits[0, :, 1:3] = -torch.inf
        first = next(s for s in sizes if s)
        logits[1, 1, :first] = -torch.inf
        target[0] = torch.where((target[0] == 1) | (target[0] == 2), 0, target[0])
        if target[1, 1] != -100:
            target[1, 1] = V - 1
    return logits, target


def _backward(loss: torch.Tensor, reduction: str, seed: int) -> None:
    if reduction == "none":
        w = torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=loss.dtype)
        (loss * w).sum().backward()
    else:
        (loss * 1.5).backward()


def _starts(sizes: tuple[int, ...]) -> list[int]:
    return [sum(sizes[:r]) for r in range(len(sizes))]


# --------------------------------------------------------------------------- cases


def _unfused_case(
    chk: Checker,
    group: Group,
    rank: int,
    sizes: tuple[int, ...],
    seed: int,
    rule: str,
    eps: float,
    reduction: str,
    with_inf: bool,
    *,
    dtype: torch.dtype = torch.float32,
    num_items: int | None = None,
    perm: list[int] | None = None,
    shape: tuple[int, ...] = (3, 4),
    all_ignored: bool = False,
) -> None:
    """``perm``: rank r holds shard ``perm[r]`` of the vocabulary (passes vocab_start)."""
    V = sum(sizes)
    logits, target = _make_case(seed, V, sizes, with_inf, dtype, shape)
    if all_ignored:
        target.fill_(-100)
    full = logits.clone().requires_grad_()
    ref = scoring_rule_loss(full, target, rule, eps, reduction=reduction, num_items_in_batch=num_items)
    _backward(ref, reduction, seed)

    shard = rank if perm is None else perm[rank]
    a, n = _starts(sizes)[shard], sizes[shard]
    local = logits[..., a : a + n].clone().requires_grad_()
    loss = vocab_parallel_scoring_rule_loss(
        local,
        target,
        rule,
        eps,
        reduction=reduction,
        num_items_in_batch=num_items,
        group=group,
        vocab_start=None if perm is None else a,
    )
    _backward(loss, reduction, seed)
    tag = f"unfused {rule} eps={eps} {reduction} inf={with_inf} sizes={sizes} perm={perm} {dtype} rank={rank}"
    chk.close(f"{tag} loss", loss.detach(), ref.detach())
    # bfloat16 gradients: the same float32 values rounded, at most one bfloat16 ulp apart
    chk.close(f"{tag} grad", local.grad, full.grad[..., a : a + n], rtol=8e-3 if dtype == torch.bfloat16 else RTOL)
    chk.true(f"{tag} dtype {loss.dtype}", loss.dtype == ref.dtype and local.grad.dtype == dtype)


def _fused_case(
    chk: Checker,
    group: Group,
    rank: int,
    sizes: tuple[int, ...],
    seed: int,
    rule: str,
    eps: float,
    reduction: str,
    with_inf: bool,
    use_bias: bool,
    chunk_size: int | None,
    train_weight: bool = True,
) -> None:
    """``train_weight=False``: a frozen output layer (as with LoRA), only ``hidden`` gets a gradient."""
    V, H = sum(sizes), 6
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 4, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    bias = torch.randn(V, generator=g) if use_bias else None
    target = torch.randint(V, (3, 4), generator=g)
    target.view(-1)[::5] = -100
    if with_inf and bias is not None:
        bias[1] = -torch.inf
        target = torch.where(target == 1, 0, target)

    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if use_bias else ())]
    ref = scoring_rule_loss(
        F.linear(leaves[0], leaves[1], leaves[2] if use_bias else None), target, rule, eps, reduction=reduction
    )
    _backward(ref, reduction, seed)

    a, n = _starts(sizes)[rank], sizes[rank]
    h = hidden.clone().requires_grad_()
    w = weight[a : a + n].clone().requires_grad_(train_weight)
    b = bias[a : a + n].clone().requires_grad_() if use_bias else None
    loss = fused_linear_vocab_parallel_scoring_rule_loss(
        h, w, target, rule, bias=b, smoothing=eps, reduction=reduction, chunk_size=chunk_size, group=group
    )
    _backward(loss, reduction, seed)
    tag = f"fused {rule} eps={eps} {reduction} inf={with_inf} bias={use_bias} chunk={chunk_size} rank={rank}"
    chk.close(f"{tag} loss", loss.detach(), ref.detach())
    chk.close(f"{tag} grad hidden", h.grad, leaves[0].grad)
    if train_weight:
        chk.close(f"{tag} grad weight", w.grad, leaves[1].grad[a : a + n])
    else:
        chk.true(f"{tag} frozen weight has no grad", w.grad is None)
    if use_bias:
        chk.close(f"{tag} grad bias", b.grad, leaves[2].grad[a : a + n])


def _fused_autocast_case(
    chk: Checker, group: Group, rank: int, sizes: tuple[int, ...], seed: int, rule: str, chunk_size: int | None
) -> None:
    """Under bfloat16 autocast the fused loss equals the unfused one on the bfloat16 logits, and its
    backward (outside autocast) rebuilds those same logits: the gradients equal the chain rule
    through float32 logit gradients."""
    V, H = sum(sizes), 6
    g = torch.Generator().manual_seed(seed)
    hidden, weight, bias = torch.randn(12, H, generator=g), torch.randn(V, H, generator=g), torch.randn(V, generator=g)
    target = torch.randint(V, (12,), generator=g)
    target[::4] = -100
    a, n = _starts(sizes)[rank], sizes[rank]
    w_loc, b_loc = weight[a : a + n], bias[a : a + n]

    z = F.linear(hidden.bfloat16(), w_loc.bfloat16(), b_loc.bfloat16()).float().requires_grad_()
    ref = vocab_parallel_scoring_rule_loss(z, target, rule, 0.1, group=group)
    ref.backward()
    ref_h = z.grad @ w_loc
    dist.all_reduce(ref_h, group=group)

    h, w, b = (t.clone().requires_grad_() for t in (hidden, w_loc, b_loc))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_vocab_parallel_scoring_rule_loss(
            h, w, target, rule, bias=b, smoothing=0.1, chunk_size=chunk_size, group=group
        )
    loss.backward()
    tag = f"fused autocast {rule} chunk={chunk_size} sizes={sizes} rank={rank}"
    chk.close(f"{tag} loss", loss.detach(), ref.detach())
    chk.close(f"{tag} grad hidden", h.grad, ref_h)
    chk.close(f"{tag} grad weight", w.grad, z.grad.T @ hidden)
    chk.close(f"{tag} grad bias", b.grad, z.grad.sum(0))


def _error_cases(chk: Checker, group: Group, rank: int, sizes: tuple[int, ...]) -> None:
    """Invalid inputs raise the same ValueError on every rank (nobody hangs in a collective)."""
    loss_fn = functools.partial(vocab_parallel_scoring_rule_loss, group=group)
    fused_fn = functools.partial(fused_linear_vocab_parallel_scoring_rule_loss, group=group)
    V = sum(sizes)
    logits, target = _make_case(0, V, sizes, False)
    a, n = _starts(sizes)[rank], sizes[rank]
    local = logits[..., a : a + n]
    bad_target = target.clone()
    bad_target[0, 0] = V
    chk.raises("target >= V", lambda: loss_fn(local, bad_target), f"[0, {V})")
    chk.raises("bad rule", lambda: loss_fn(local, target, "nope"), "unknown scoring rule")
    chk.raises("bad smoothing", lambda: loss_fn(local, target, smoothing=1.5), "smoothing")
    chk.raises("bad reduction", lambda: loss_fn(local, target, reduction="avg"), "reduction")
    # only rank 1 has a wrong shape: every rank raises
    wrong = local[:, :3] if rank == 1 else local
    chk.raises(
        "shape on one rank", lambda: loss_fn(wrong, target), "shape mismatch" if rank == 1 else "rejected their inputs"
    )
    # ranks disagree on the settings or the targets
    chk.raises(
        "smoothing differs", lambda: loss_fn(local, target, smoothing=0.01 * rank), "differ between rank 0 and rank 1"
    )
    other = target.clone()
    if rank == 1:
        other[2, 3] = (int(other[2, 3]) + 1) % V
    chk.raises("target differs", lambda: loss_fn(local, other), "target differs between rank 0 and rank 1")
    # overlapping shards and a vocab_start on only some ranks
    chk.raises("overlap", lambda: loss_fn(local, target, vocab_start=0), "tile [0, V)")
    chk.raises(
        "start on some ranks",
        lambda: loss_fn(local, target, vocab_start=a if rank == 0 else None),
        "on every rank or on none",
    )
    chk.raises("negative start", lambda: loss_fn(local, target, vocab_start=-1), "vocab_start must be")
    H = 6
    hidden = torch.randn(3, 4, H)
    w = torch.randn(n, H)
    chk.raises("fused H mismatch", lambda: fused_fn(hidden, w[:, :5], target), "local_weight must have shape")
    chk.raises("fused bias shape", lambda: fused_fn(hidden, w, target, bias=torch.zeros(n + 1)), "bias must have shape")
    chk.raises(
        "fused chunk differs",
        lambda: fused_fn(hidden, w, target, chunk_size=2 + rank),
        "differ between rank 0 and rank 1",
    )
    chk.raises("fused dtype", lambda: fused_fn(hidden.double(), w, target), "dtype")
    chk.true(
        "vocab_shard of the group",
        vocab_shard(10, group=group) == vocab_shard(10, dist.get_rank(group), dist.get_world_size(group)),
    )


def _run_all(chk: Checker, group: Group, rank: int, world: int) -> None:
    seed = 0
    for k, sizes in enumerate(LAYOUTS[world]):
        for rule in RULES:
            # the extra layouts with fewer cases
            for eps in SMOOTHINGS if k == 0 else SMOOTHINGS[1:]:
                for reduction in REDUCTIONS:
                    for with_inf in (False, True) if k == 0 else (reduction != "sum",):
                        seed += 1
                        _unfused_case(chk, group, rank, sizes, seed, rule, eps, reduction, with_inf)
    sizes = LAYOUTS[world][0]
    perm = [(r + 1) % world for r in range(world)]
    for i, rule in enumerate(RULES):
        seed += 1
        _unfused_case(chk, group, rank, sizes, seed, rule, 0.1, "mean", True, perm=perm, num_items=7)
        _unfused_case(chk, group, rank, sizes, seed, rule, 0.1, "none", i % 2 == 0, dtype=torch.float64)
        _unfused_case(chk, group, rank, sizes, seed, rule, 0.1, "sum", False, dtype=torch.bfloat16, shape=(5,))
        _unfused_case(chk, group, rank, sizes, seed, rule, 0.1, "mean", False, all_ignored=True)
        for eps in SMOOTHINGS:
            for j, reduction in enumerate(REDUCTIONS):
                seed += 1
                _fused_case(
                    chk,
                    group,
                    rank,
                    sizes,
                    seed,
                    rule,
                    eps,
                    reduction,
                    with_inf=j != 1,
                    use_bias=j != 2,
                    chunk_size=(None, 2, 5)[j],
                )
    for i, rule in enumerate(RULES):
        seed += 1
        _fused_autocast_case(chk, group, rank, sizes, seed, rule, (None, 4)[i % 2])
        _fused_case(chk, group, rank, sizes, seed, rule, 0.1, "mean", False, False, 3, train_weight=False)
    # many row chunks (a few rows each): the statistics are still all-reduced once per pass
    saved = pl_options.CHUNK_ELEMENTS
    pl_options.CHUNK_ELEMENTS = 3 * max(sizes)
    try:
        for rule in RULES:
            seed += 1
            _unfused_case(chk, group, rank, sizes, seed, rule, 0.1, "none", True)
            _fused_case(chk, group, rank, sizes, seed, rule, 0.1, "mean", True, True, None)
    finally:
        pl_options.CHUNK_ELEMENTS = saved
    _error_cases(chk, group, rank, sizes)


def _worker(chk: Checker, rank: int) -> None:
    """Rank ``rank`` of 3: every case on the default group (world 3), then on the subgroup of
    ranks 0 and 1 (world 2, passed as ``group=``) while rank 2 waits."""
    pair = dist.new_group([0, 1])
    _run_all(chk, None, rank, 3)
    if rank < 2:
        _run_all(chk, pair, rank, 2)


def test_vocab_parallel_matches_single_process(tmp_path: Path) -> None:
    """Worlds of 3 (default group) and 2 (a subgroup) in one spawn: the loss and every shard's
    gradient equal those of the single-process loss on the concatenated logits."""
    failures, counts = run_ranks(tmp_path, _worker, 3, checker=Checker(rtol=RTOL), timeout_s=30)
    assert not failures, f"{len(failures)} failure(s):\n" + "\n".join(failures[:20])
    assert min(counts[:2]) > 600 and counts[2] > 300, f"the ranks ran only {counts} checks"


# --------------------------------------------------------------------------- no process group


def test_needs_process_group() -> None:
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="init_process_group"):
        vocab_parallel_scoring_rule_loss(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="init_process_group"):
        fused_linear_vocab_parallel_scoring_rule_loss(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1]))


def test_vocab_shard_tiles_the_vocabulary() -> None:
    for V in (1, 7, 12, 100):
        for world in (1, 2, 3, 8):
            shards = [vocab_shard(V, r, world) for r in range(world)]
            assert [s for s, _ in shards] == [sum(n for _, n in shards[:r]) for r in range(world)]
            assert sum(n for _, n in shards) == V
            assert max(n for _, n in shards) - min(n for _, n in shards) <= 1
    with pytest.raises(ValueError, match="rank"):
        vocab_shard(10, 3, 3)
