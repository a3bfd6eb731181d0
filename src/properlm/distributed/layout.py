"""Where each rank's slice of the vocabulary lies, and the checks every rank runs before the losses.

Rank ``r`` holds the ids ``[a_r, a_r + V_r)``: :func:`vocab_shard` gives the even split in rank order;
any other tiling of ``[0, V)`` (uneven sizes, empty shards, any rank order) is given by ``vocab_start``.
:func:`resolve_layout` all-gathers ``(V_r, a_r, #tokens, checksum(target), crc(settings), error flag)`` once per
call, checks that the shards tile ``[0, V)`` and that every rank passed the same tokens and settings, and raises the
same ``ValueError`` on every rank (so that none waits in a later collective); it returns this rank's
:class:`Layout`. A rank's own input errors are caught first (:func:`local_error`) so that they travel in that
all-gather.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..options import LossOptions

__all__ = ["vocab_shard"]

ProcessGroup = Any  # torch.distributed.ProcessGroup (None: the default group)


@dataclass(frozen=True)
class Layout:
    """Where this rank's slice of the vocabulary lies: ids ``[start, start + size)`` of ``vocab_size``.

    Attributes:
        start: first vocabulary id of this rank's shard.
        size: number of ids in this rank's shard (may be 0).
        vocab_size: the global vocabulary size ``V`` (sum of all shard sizes).
        max_size: the largest shard of the group (sets the default chunk sizes, which must agree).
    """

    start: int
    size: int
    vocab_size: int
    max_size: int


def vocab_shard(
    vocab_size: int, rank: int | None = None, world_size: int | None = None, group: ProcessGroup = None
) -> tuple[int, int]:
    """``(start, size)`` of ``rank``'s shard when ``vocab_size`` ids are split evenly in rank order.

    As evenly as possible: the first ``vocab_size % world_size`` ranks get one more id.

    ``rank`` and ``world_size`` default to those of ``group`` (the default group if ``None``).
    Useful to slice a full output layer: ``weight[start:start + size]``.
    """
    if rank is None or world_size is None:
        require_initialized()
        rank = dist.get_rank(group) if rank is None else rank
        world_size = dist.get_world_size(group) if world_size is None else world_size
    if vocab_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"vocab_shard: need vocab_size >= 1 and 0 <= rank < world_size, got "
            f"vocab_size={vocab_size}, rank={rank}, world_size={world_size}"
        )
    base, extra = divmod(vocab_size, world_size)
    size = base + (rank < extra)
    start = rank * base + min(rank, extra)
    return start, size


def require_initialized() -> None:
    """``ValueError`` unless a ``torch.distributed`` process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "the vocabulary-parallel losses need an initialised torch.distributed process group "
            "(torch.distributed.init_process_group, or run under torchrun); on one device use "
            "properlm.scoring_rule_loss"
        )


def _target_checksum(target: Tensor) -> Tensor:
    """A position-weighted int64 sum of ``target``: cheap, on device, differs for most mismatches."""
    t = target.reshape(-1).long()
    if t.numel() == 0:
        return torch.zeros((), dtype=torch.long, device=t.device)
    w = torch.arange(t.numel(), device=t.device) % 8191 + 1
    return ((t + 1) * w).sum()


#: vocabulary size used to check target's dtype and shape before the global size is known
#: (:func:`properlm.options.validate_inputs` with ``vocab_size=NO_VOCAB_LIMIT``)
NO_VOCAB_LIMIT = 1 << 62


def local_error(check: Callable[[], None]) -> str | None:
    """The message of the ``ValueError`` that ``check`` raises, or ``None``.

    For :func:`resolve_layout`, which raises it on this rank and makes every other rank raise too.
    """
    try:
        check()
    except ValueError as exc:
        return str(exc)
    return None


def resolve_layout(
    local_size: int,
    vocab_start: int | None,
    target: Tensor,
    config: str,
    group: ProcessGroup,
    device: torch.device,
    error: str | None = None,
) -> Layout:
    """All-gather ``(size, start, #tokens, checksum(target), crc(config), error flag)`` and check them.

    Checks that no rank rejected its inputs, that the shards tile ``[0, V)`` and that every rank passed
    the same tokens and settings. Every rank raises the same way, so none waits in a collective.

    Args:
        local_size: ``V_local``, this rank's shard width.
        vocab_start: this rank's first id, or ``None`` (then on every rank: the shards follow rank order).
        target: the (replicated) token ids, compared across ranks by a checksum.
        config: the settings as a string (:func:`settings_key`), compared across ranks by a CRC.
        group: the process group (``None``: the default group).
        device: where the all-gathered tensor lives (the logits' device).
        error: this rank's input error (:func:`local_error`), raised after the all-gather.

    Returns:
        This rank's :class:`Layout`.
    """
    require_initialized()
    if vocab_start is not None and (
        isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0
    ):
        error = error or f"vocab_start must be a non-negative int or None, got {vocab_start!r}"
        vocab_start = None
    world = dist.get_world_size(group)
    info = torch.stack(
        [
            torch.tensor(local_size, dtype=torch.long, device=device),
            torch.tensor(-1 if vocab_start is None else vocab_start, dtype=torch.long, device=device),
            torch.tensor(target.numel(), dtype=torch.long, device=device),
            _target_checksum(target).to(device),
            torch.tensor(zlib.crc32(config.encode()), dtype=torch.long, device=device),
            torch.tensor(error is not None, dtype=torch.long, device=device),
        ]
    )
    gathered = [torch.empty_like(info) for _ in range(world)]
    dist.all_gather(gathered, info, group=group)
    rows = torch.stack(gathered).tolist()
    rank = dist.get_rank(group)
    if error is not None:
        raise ValueError(error)
    bad = [r for r, row in enumerate(rows) if row[5]]
    if bad:
        raise ValueError(f"rank(s) {bad} rejected their inputs (see the error raised there)")
    sizes = [r[0] for r in rows]
    for r, (_, _, numel, checksum, crc, _) in enumerate(rows):
        if numel != rows[0][2]:
            raise ValueError(
                f"target has {rows[0][2]} tokens on rank 0 but {numel} on rank {r}; every rank "
                f"of the group must pass the same target (only the vocabulary is sharded)"
            )
        if checksum != rows[0][3]:
            raise ValueError(
                f"target differs between rank 0 and rank {r}; every rank of the group must pass "
                f"the same target (only the vocabulary is sharded)"
            )
        if crc != rows[0][4]:
            raise ValueError(
                f"rule, smoothing, smoothing_variant, ignore_index, reduction, chunk_size, hidden "
                f"size, softcap or "
                f"logit_scale differ between "
                f"rank 0 and rank {r}; every rank must pass the same settings"
            )
    given = [r[1] >= 0 for r in rows]
    if all(given):
        starts = [r[1] for r in rows]
        expected = 0
        for r in sorted(range(world), key=lambda r: (starts[r], sizes[r])):
            if starts[r] != expected:
                raise ValueError(
                    f"vocab_start: the shards must tile [0, V) without gaps or overlaps, but rank {r} starts at "
                    f"{starts[r]} where {expected} was expected (starts {starts}, sizes {sizes})"
                )
            expected += sizes[r]
    elif any(given):
        raise ValueError("vocab_start must be given on every rank or on none (then the shards follow rank order)")
    else:
        starts = [sum(sizes[:r]) for r in range(world)]
    return Layout(start=starts[rank], size=sizes[rank], vocab_size=sum(sizes), max_size=max(sizes))


def local_targets(target: Tensor, start: int, size: int) -> tuple[Tensor, Tensor]:
    """``(local index clamped into the shard, owned mask)`` for global ids ``target``."""
    local = target - start
    owned = (local >= 0) & (local < size)
    return local.clamp(0, max(size - 1, 0)), owned


def settings_key(options: LossOptions, extra: str = "") -> str:
    """The settings of a call as a string, which :func:`resolve_layout` checks to agree across ranks.

    The rule spec, smoothing, ``ignore_index``, reduction, smoothing variant, ``extra`` (what else must agree, e.g.
    the chunk size and the hidden size of the fused loss) and the head transform.
    """
    o = options
    return (
        f"{o.rule.spec}|{o.smoothing!r}|{o.ignore_index}|{o.reduction}|{o.smoothing_variant}|{extra}|"
        f"{o.softcap!r}|{o.logit_scale!r}"
    )
