"""Vocabulary-parallel scoring-rule losses: each rank holds one contiguous slice of the vocabulary.

Every rank of a process group holds the logits (or the output-layer weight rows) of its slice.

This is the tensor-parallel loss of Megatron-LM's ``vocab_parallel_cross_entropy`` and
torchtitan's loss parallelism, for every :class:`~properlm.rules.ScoringRule`. Rank ``r``
holds ``z[..., a_r : a_r + V_r]``; the shards tile ``[0, V)`` (uneven sizes, empty shards
and any rank order are allowed). The tokens (``target``, and ``hidden`` for the fused
variant) are replicated: every rank passes the same ones.

A rule is a function of a few statistics per token (:class:`~properlm.stats.TokenStats`),
and each of them is a sum over the vocabulary once the global maximum ``m`` is known, so
the ranks exchange a handful of numbers per token and never the logits:

    m        = max_r max_{j in r} z_j                               (all-reduce MAX)
    s_c      = sum_r sum_{j in r} exp(c (z_j - m))   for c in rule.scales(eps)
    V        = sum_r #{j in r : z_j > -inf}
    sum_z    = sum_r sum_{j in r, finite} (z_j - m)       (logarithmic smoothing only)
    z_y - m  = the owner's value, 0 elsewhere, summed          (one all-reduce SUM)
    lse[c]   = log s_c                       (= LSE(c z) - c m, the shifted statistic)
    M, sum_M (z - m), |M|  with M = {j : p_j < eps / V}    (bounded rules with smoothing:
                                              a second all-reduce SUM, after L_1 is known)

The loss and its partial derivatives come from :func:`properlm.stats.loss_and_partials`
on these statistics; the backward pass forms each rank's gradient of its own shard with
:func:`properlm.stats.logits_grad` from what the forward pass saved, without communication
(the fused variant all-reduces the gradient of the replicated ``hidden``).

All ranks must call these functions together (they are collectives) with the same
``target``, ``rule``, ``smoothing``, ``ignore_index``, ``reduction`` and ``chunk_size``;
a cheap check of this runs first and raises the same ``ValueError`` on every rank.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .loss import (
    CHUNK_ELEMENTS,
    check_loss_options,
    compute_dtype,
    reduce_loss,
    validate_inputs,
)
from .rules import RuleLike, ScoringRule, get_rule
from .stats import (
    TokenStats,
    check_head_transform,
    head_transform_,
    head_transform_factor,
    logits_grad,
    loss_and_partials,
    masked_log_eps,
    masked_set,
    scale_power,
)

__all__ = [
    "fused_linear_vocab_parallel_scoring_rule_loss",
    "vocab_parallel_scoring_rule_loss",
    "vocab_shard",
]

ProcessGroup = Any  # torch.distributed.ProcessGroup (None: the default group)


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class _Layout:
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


def vocab_shard(vocab_size: int, rank: int | None = None, world_size: int | None = None,
                group: ProcessGroup = None) -> tuple[int, int]:
    """``(start, size)`` of ``rank``'s shard when ``vocab_size`` ids are split evenly in rank order.

    As evenly as possible: the first ``vocab_size % world_size`` ranks get one more id.

    ``rank`` and ``world_size`` default to those of ``group`` (the default group if ``None``).
    Useful to slice a full output layer: ``weight[start:start + size]``.
    """
    if rank is None or world_size is None:
        _require_initialized()
        rank = dist.get_rank(group) if rank is None else rank
        world_size = dist.get_world_size(group) if world_size is None else world_size
    if vocab_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"vocab_shard: need vocab_size >= 1 and 0 <= rank < world_size, got "
                         f"vocab_size={vocab_size}, rank={rank}, world_size={world_size}")
    base, extra = divmod(vocab_size, world_size)
    size = base + (rank < extra)
    start = rank * base + min(rank, extra)
    return start, size


def _require_initialized() -> None:
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
_NO_LIMIT = 1 << 62


def _local_error(check: Callable[[], None]) -> str | None:
    """The message of the ``ValueError`` that ``check`` raises, or ``None``."""
    try:
        check()
    except ValueError as exc:
        return str(exc)
    return None


def _resolve_layout(local_size: int, vocab_start: int | None, target: Tensor, config: str,
                    group: ProcessGroup, device: torch.device, error: str | None = None) -> _Layout:
    """All-gather ``(size, start, #tokens, checksum(target), crc(config), error flag)`` and check them.

    Checks that no rank rejected its inputs, that the shards tile ``[0, V)`` and that every rank passed
    the same tokens and settings. Every rank raises the same way, so none waits in a collective.
    """
    _require_initialized()
    if vocab_start is not None and (isinstance(vocab_start, bool) or not isinstance(vocab_start, int)
                                    or vocab_start < 0):
        error = error or f"vocab_start must be a non-negative int or None, got {vocab_start!r}"
        vocab_start = None
    world = dist.get_world_size(group)
    info = torch.stack([
        torch.tensor(local_size, dtype=torch.long, device=device),
        torch.tensor(-1 if vocab_start is None else vocab_start, dtype=torch.long, device=device),
        torch.tensor(target.numel(), dtype=torch.long, device=device),
        _target_checksum(target).to(device),
        torch.tensor(zlib.crc32(config.encode()), dtype=torch.long, device=device),
        torch.tensor(error is not None, dtype=torch.long, device=device),
    ])
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
            raise ValueError(f"target has {rows[0][2]} tokens on rank 0 but {numel} on rank {r}; every rank "
                             f"of the group must pass the same target (only the vocabulary is sharded)")
        if checksum != rows[0][3]:
            raise ValueError(f"target differs between rank 0 and rank {r}; every rank of the group must pass "
                             f"the same target (only the vocabulary is sharded)")
        if crc != rows[0][4]:
            raise ValueError(f"rule, smoothing, smoothing_variant, ignore_index, reduction, chunk_size, hidden "
                             f"size, softcap or "
                             f"logit_scale differ between "
                             f"rank 0 and rank {r}; every rank must pass the same settings")
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
    return _Layout(start=starts[rank], size=sizes[rank], vocab_size=sum(sizes), max_size=max(sizes))


# --------------------------------------------------------------------------- statistics


def _all_reduce(t: Tensor, op: Any, group: ProcessGroup) -> Tensor:
    dist.all_reduce(t, op=op, group=group)
    return t


def _local_finite(z: Tensor) -> Tensor | None:
    """Mask of finite logits of a shard chunk, ``None`` when all are finite."""
    if z.shape[1] == 0 or not bool((z.amin(dim=-1) == -math.inf).any()):
        return None
    return z != -math.inf


def _shard_stats(get_z: Callable[[int, int], Tensor], n: int, step: int, local_target: Tensor,
                 owned: Tensor, rule: ScoringRule, smoothing: float, group: ProcessGroup,
                 local_size: int, dtype: torch.dtype, device: torch.device, variant: str = "paper") -> TokenStats:
    """Global :class:`TokenStats` of ``n`` token rows from this rank's shard.

    ``get_z(a, b)`` returns the compute-dtype logits of rows ``[a, b)`` of the shard
    (``(b - a, V_local)``); they are visited in chunks of ``step`` rows, two or three times
    (max, sums, masked sums), with one all-reduce per visit over all ``n`` rows.
    """
    chunks = [(a, min(a + step, n)) for a in range(0, n, step)] if local_size else []
    m = torch.full((n,), -math.inf, dtype=dtype, device=device)
    for a, b in chunks:
        m[a:b] = get_z(a, b).amax(dim=-1)
    _all_reduce(m, dist.ReduceOp.MAX, group)

    scales = rule.scales(smoothing)
    k = len(scales)
    need_sum = smoothing > 0 and rule.uses_logit_sum
    # rows: s_c for each scale, finite count, z_y - m (owner only), [sum of finite z - m]
    buf = torch.zeros((k + 2 + need_sum, n), dtype=dtype, device=device)
    for a, b in chunks:
        d = get_z(a, b) - m[a:b, None]
        finite = _local_finite(d)
        if need_sum:
            buf[k + 2, a:b] = (d if finite is None else torch.where(finite, d, 0.0)).sum(-1)
        buf[k, a:b] = local_size if finite is None else finite.sum(-1, dtype=dtype)
        zy = d.gather(1, local_target[a:b, None]).squeeze(1)
        buf[k + 1, a:b] = torch.where(owned[a:b], zy, 0.0)
        e = d.exp_()
        for i, c in enumerate(scales):
            buf[i, a:b] = scale_power(e, c).sum(-1)
    _all_reduce(buf, dist.ReduceOp.SUM, group)
    stats = TokenStats(
        z_y=buf[k + 1],
        lse={c: torch.log(buf[i]) for i, c in enumerate(scales)},
        num_classes=buf[k],
        max_logit=m,
        sum_z=buf[k + 2] if need_sum else None,
    )

    eps = masked_log_eps(rule, smoothing, variant)
    if eps is not None:
        mbuf = torch.zeros((2, n), dtype=dtype, device=device)
        for a, b in chunks:
            d = get_z(a, b) - m[a:b, None]
            finite = _local_finite(d)
            mask = masked_set(torch.exp(d), stats.lse[1.0][a:b], stats.num_classes[a:b], eps, finite)
            mbuf[0, a:b] = torch.where(mask, d, 0.0).sum(-1)
            mbuf[1, a:b] = mask.sum(-1, dtype=dtype)
        _all_reduce(mbuf, dist.ReduceOp.SUM, group)
        stats.masked_sum_z, stats.masked_count = mbuf[0], mbuf[1]
    return stats


def _shard_grad(z: Tensor, local_target: Tensor, owned: Tensor, stats: TokenStats, partials: TokenStats,
                smoothing: float, rule: ScoringRule, softcap: float | None = None,
                logit_scale: float | None = None) -> Tensor:
    """Gradient of ``sum_i loss_i`` with respect to the shard ``z``, from the global statistics.

    ``z`` (``(n, V_local)``) holds the logits before the head transform (a scratch tensor, overwritten);
    the ``z_y`` term enters only where this rank owns the target.
    """
    if z.shape[1] == 0:
        return torch.zeros_like(z)
    partials = replace(partials, z_y=torch.where(owned, partials.z_y, 0.0))
    head_transform_(z, softcap, logit_scale)
    factor = head_transform_factor(z, softcap, logit_scale)
    # pass ``finite`` explicitly: logits_grad infers it from num_classes < z.shape[1],
    # which compares the global count with the shard width
    g = logits_grad(z, local_target, stats, partials, smoothing, rule, finite=_local_finite(z))
    return g if factor is None else g.mul_(factor)


def _local_targets(target: Tensor, start: int, size: int) -> tuple[Tensor, Tensor]:
    """``(local index clamped into the shard, owned mask)`` for global ids ``target``."""
    local = target - start
    owned = (local >= 0) & (local < size)
    return local.clamp(0, max(size - 1, 0)), owned


def _chunk_rows(width: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(width, 1))


# --------------------------------------------------------------------------- unfused


class _VocabParallelTokenLoss(torch.autograd.Function):
    """Per-token loss ``(n,)`` of the shard ``(n, V_local)``; backward without communication."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor, rule: ScoringRule, smoothing: float,
                ignore_index: int, group: ProcessGroup, start: int, softcap: float | None = None,
                logit_scale: float | None = None, smoothing_variant: str = "paper") -> Tensor:
        n, size = logits.shape
        cdt = compute_dtype(logits.dtype)
        rows = (target != ignore_index).nonzero().squeeze(1)
        local, owned = _local_targets(target[rows], start, size)
        step = _chunk_rows(size)
        # (the gathered rows are a copy: transformed in place, chunk by chunk)
        stats = _shard_stats(lambda a, b: head_transform_(logits[rows[a:b]].to(cdt), softcap, logit_scale),
                             rows.numel(), step, local, owned, rule, smoothing, group, size, cdt, logits.device,
                             smoothing_variant)
        need_grad = ctx.needs_input_grad[0]
        loss_v, partials = loss_and_partials(rule, stats, smoothing, need_grad, smoothing_variant)
        loss = torch.zeros(n, dtype=cdt, device=logits.device)
        loss[rows] = loss_v
        ctx.rule, ctx.smoothing, ctx.step = rule, smoothing, step
        ctx.stats, ctx.partials = stats, partials
        ctx.head = (softcap, logit_scale)
        ctx.save_for_backward(logits, rows, local, owned)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        logits, rows, local, owned = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        cdt = compute_dtype(logits.dtype)
        for a in range(0, rows.numel(), ctx.step):
            sl = slice(a, a + ctx.step)
            idx = rows[sl]
            partials = ctx.partials.index(sl).scaled(grad_loss[idx].to(cdt))
            g = _shard_grad(logits[idx].to(cdt), local[sl], owned[sl], ctx.stats.index(sl), partials,
                            ctx.smoothing, ctx.rule, *ctx.head)
            grad[idx] = g.to(grad.dtype)
        return grad, None, None, None, None, None, None, None, None, None


def _config(rule: ScoringRule, smoothing: float, ignore_index: int, reduction: str, extra: str = "",
            softcap: float | None = None, logit_scale: float | None = None) -> str:
    return f"{rule.spec}|{smoothing!r}|{ignore_index}|{reduction}|{extra}|{softcap!r}|{logit_scale!r}"


def vocab_parallel_scoring_rule_loss(
    local_logits: Tensor,
    target: Tensor,
    rule: RuleLike = "spherical",
    smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    group: ProcessGroup = None,
    vocab_start: int | None = None,
    *,
    softcap: float | None = None,
    logit_scale: float | None = None,
    smoothing_variant: str = "paper",
) -> Tensor:
    r"""Scoring-rule loss ``S_max - S_eps(softmax(z), target)`` of logits sharded over the vocabulary.

    The logits ``z`` are sharded across the ranks of ``group``; a collective: every rank calls it.

    Equal to :func:`properlm.scoring_rule_loss` of the concatenated logits
    ``z = cat(shards in vocabulary order, -1)``, and each rank receives the gradient of its
    own shard. The ranks exchange ``len(rule.scales(smoothing)) + 3`` numbers per token
    (+1 for the logit sum of logarithmic smoothing, +2 for the masked-log term of bounded
    rules with smoothing) in two or three all-reduces, after one small all-gather that
    checks the layout; backward communicates nothing.

    Args:
        local_logits: ``(..., V_local)`` this rank's logits for vocabulary ids
            ``[vocab_start, vocab_start + V_local)`` (any floating dtype, computed in float32;
            float64 in float64). ``V_local`` may differ between ranks and may be 0. Entries of
            ``-inf`` have probability 0; ``V`` in the smoothing terms counts the finite logits
            of all shards.
        target: ``(...)`` global token ids in ``[0, V)`` or ``ignore_index``, identical on
            every rank (``V`` = sum of the shard sizes).
        rule: as in :func:`properlm.scoring_rule_loss`.
        smoothing: as in :func:`properlm.scoring_rule_loss`.
        ignore_index: as in :func:`properlm.scoring_rule_loss`.
        reduction: as in :func:`properlm.scoring_rule_loss`.
        num_items_in_batch: as in :func:`properlm.scoring_rule_loss`.
        group: the process group over which the vocabulary is sharded (``None``: the default group).
        vocab_start: first vocabulary id of this rank's shard. ``None`` on every rank: the
            shards follow rank order (computed from an all-gather of the shard sizes).
            Given on every rank: any order, checked to tile ``[0, V)``.
        softcap: the output-head soft-cap of :func:`properlm.scoring_rule_loss`
            (``z'' = softcap * tanh(logit_scale * z / softcap)``), applied to each rank's shard
            chunk by chunk; the same on every rank.
        logit_scale: the output-head logit scale, as ``softcap``.
        smoothing_variant: ``"paper"`` (default), ``"gated"`` or ``"none"``, as in
            :func:`properlm.scoring_rule_loss`; the same on every rank.

    Returns:
        The same value on every rank: a scalar, or ``target``'s shape for ``"none"``
        (0 at ignored positions), in float32 (float64 for float64 logits).

    Raises:
        ValueError: bad arguments, no initialised process group, shards that do not tile
            ``[0, V)``, or ranks that disagree on ``target`` or the settings (raised on every rank).

    Example::

        >>> # rank r of world w holds rows [a, a + n) of the output layer
        >>> a, n = properlm.distributed.vocab_shard(V)
        >>> local_logits = hidden @ lm_head.weight[a:a + n].T          # (B, T, n)
        >>> loss = vocab_parallel_scoring_rule_loss(local_logits, labels, "brier", smoothing=0.1)
        >>> loss.backward()                                              # grads of this shard only
    """
    rule_obj = get_rule(rule)
    eps, variant = check_loss_options(smoothing, smoothing_variant, reduction)
    cap, scale = check_head_transform(softcap, logit_scale)
    if not isinstance(local_logits, Tensor):
        raise ValueError(f"local_logits must be a tensor, got {type(local_logits).__name__}")
    if not isinstance(target, Tensor):
        raise ValueError(f"target must be a tensor of token ids, got {type(target).__name__}")
    error = _local_error(lambda: validate_inputs(local_logits.shape, local_logits.dtype, target, ignore_index,
                                                 vocab_size=_NO_LIMIT, what="local_logits"))
    local_size = local_logits.shape[-1] if local_logits.dim() else 0
    shard = _resolve_layout(local_size, vocab_start, target,
                            _config(rule_obj, eps, ignore_index, reduction, variant, softcap=cap, logit_scale=scale),
                            group,
                            local_logits.device, error)
    validate_inputs(local_logits.shape, local_logits.dtype, target, ignore_index, vocab_size=shard.vocab_size,
                    what="local_logits")
    size = local_logits.shape[-1]
    flat = _VocabParallelTokenLoss.apply(local_logits.reshape(target.numel(), size), target.reshape(-1), rule_obj, eps,
                                         ignore_index, group, shard.start, cap, scale, variant)
    per_token = flat.view(target.shape)
    return reduce_loss(per_token, target != ignore_index, reduction, num_items_in_batch)


# --------------------------------------------------------------------------- fused linear


def _check_fused_inputs(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                        ignore_index: int) -> None:
    for name, t in (("hidden", hidden), ("local_weight", weight)):
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., H), got a scalar")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"local_weight must have shape (V_local, H={hidden.shape[-1]}) to match hidden "
                         f"{tuple(hidden.shape)}, got {tuple(weight.shape)}")
    autocast = torch.is_autocast_enabled(hidden.device.type)
    if weight.dtype != hidden.dtype and not autocast:
        raise ValueError(f"local_weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape (V_local,) = ({weight.shape[0]},), got "
                             f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")
        if bias.dtype != weight.dtype:
            raise ValueError(f"bias dtype {bias.dtype} differs from local_weight dtype {weight.dtype}")
    validate_inputs((*hidden.shape[:-1], weight.shape[0]), hidden.dtype, target, ignore_index,
                    vocab_size=_NO_LIMIT, what="hidden @ local_weight.T")


class _FusedVocabParallelTokenLoss(torch.autograd.Function):
    """Per-token loss of ``hidden @ weight_local.T + bias_local``, chunked over tokens.

    Forward: per chunk of tokens, the shard's logits, the global statistics (collectives
    per chunk) and the partials; nothing of size ``(n, V_local)`` is kept. Backward:
    per chunk, the logits again, their gradient ``g`` (``(t, V_local)``), then
    ``grad_hidden = all_reduce_SUM(g @ W_local)``, ``grad_W_local = g.T @ h``,
    ``grad_b_local = sum_t g``.
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                rule: ScoringRule, smoothing: float, ignore_index: int, group: ProcessGroup, start: int,
                chunk: int, softcap: float | None = None, logit_scale: float | None = None,
                smoothing_variant: str = "paper") -> Tensor:
        n = hidden.shape[0]
        size = weight.shape[0]
        cdt = compute_dtype(hidden.dtype)
        rows = (target != ignore_index).nonzero().squeeze(1)
        local, owned = _local_targets(target[rows], start, size)
        need_grad = any(ctx.needs_input_grad[:3])
        loss = torch.zeros(n, dtype=cdt, device=hidden.device)
        chunks: list[tuple[TokenStats, TokenStats | None]] = []
        for a in range(0, rows.numel(), chunk):
            sl = slice(a, a + chunk)
            idx = rows[sl]
            z_lin = F.linear(hidden[idx], weight, bias)  # under autocast: in its dtype
            ctx.lin_dtype = z_lin.dtype
            z = head_transform_(z_lin.to(cdt), softcap, logit_scale)  # z_lin is not used again
            stats = _shard_stats(lambda a2, b2, z=z: z[a2:b2],  # type: ignore[misc]  # (mypy: the default z)
                                 idx.numel(), idx.numel(), local[sl], owned[sl],
                                 rule, smoothing, group, size, cdt, hidden.device, smoothing_variant)
            loss_c, partials = loss_and_partials(rule, stats, smoothing, need_grad, smoothing_variant)
            loss[idx] = loss_c
            chunks.append((stats, partials))
        ctx.rule, ctx.smoothing, ctx.chunk, ctx.group, ctx.chunks = rule, smoothing, chunk, group, chunks
        ctx.head = (softcap, logit_scale)
        ctx.save_for_backward(hidden, weight, bias, rows, local, owned)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, rows, local, owned = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        cdt = compute_dtype(hidden.dtype)
        w = weight.to(cdt)
        if ctx.chunks:
            # recompute the logits exactly as forward did (backward runs outside autocast)
            lin_dtype = ctx.lin_dtype
            w_lin = weight.to(lin_dtype)
            b_lin = None if bias is None else bias.to(lin_dtype)
        grad_h = torch.zeros(hidden.shape, dtype=cdt, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=cdt, device=weight.device) if need_b else None
        for i, (stats, partials) in enumerate(ctx.chunks):
            sl = slice(i * ctx.chunk, (i + 1) * ctx.chunk)
            idx = rows[sl]
            h = hidden[idx]
            with torch.autocast(device_type=h.device.type, enabled=False):
                z = F.linear(h.to(lin_dtype), w_lin, b_lin).to(cdt)
            g = _shard_grad(z, local[sl], owned[sl], stats, partials.scaled(grad_loss[idx].to(cdt)),
                            ctx.smoothing, ctx.rule, *ctx.head)
            if grad_h is not None:
                grad_h[idx] = g @ w
            if grad_w is not None:
                grad_w.addmm_(g.T, h.to(cdt))
            if grad_b is not None:
                grad_b += g.sum(0)
        if grad_h is not None:
            # hidden is replicated: its gradient is the sum of every shard's contribution
            _all_reduce(grad_h, dist.ReduceOp.SUM, ctx.group)
            grad_h = grad_h.to(hidden.dtype)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None, None, None


def fused_linear_vocab_parallel_scoring_rule_loss(
    hidden: Tensor,
    local_weight: Tensor,
    target: Tensor,
    rule: RuleLike = "spherical",
    bias: Tensor | None = None,
    smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    group: ProcessGroup = None,
    vocab_start: int | None = None,
    chunk_size: int | None = None,
    *,
    softcap: float | None = None,
    logit_scale: float | None = None,
    smoothing_variant: str = "paper",
) -> Tensor:
    r""":func:`vocab_parallel_scoring_rule_loss` of ``hidden @ local_weight.T + bias``, chunk by chunk.

    The logits are formed chunk by chunk over the tokens, so no ``(tokens, V_local)`` logits tensor is
    ever held.

    Equal to ``vocab_parallel_scoring_rule_loss(F.linear(hidden, local_weight, bias), ...)``.

    Args:
        hidden: ``(..., H)`` final hidden states, identical on every rank (replicated).
        local_weight: ``(V_local, H)`` this rank's rows ``[vocab_start, vocab_start + V_local)``
            of the output layer (``lm_head.weight``), same dtype as ``hidden``.
        target: ``(...)`` global token ids in ``[0, V)`` or ``ignore_index``, identical on every rank.
        rule: as in :func:`properlm.scoring_rule_loss`.
        bias: ``(V_local,)`` this rank's slice of the output bias, or ``None``.
        smoothing: as in :func:`properlm.scoring_rule_loss`.
        ignore_index: as in :func:`properlm.scoring_rule_loss`.
        reduction: as in :func:`properlm.scoring_rule_loss`.
        num_items_in_batch: as in :func:`properlm.scoring_rule_loss`.
        group: as in :func:`vocab_parallel_scoring_rule_loss`.
        vocab_start: as in :func:`vocab_parallel_scoring_rule_loss`.
        chunk_size: tokens per chunk (the same on every rank); default: as many as fit
            ``2**24`` float32 logits of the largest shard. Each chunk costs two or three
            all-reduces in forward.
        softcap: the output-head soft-cap (as in :func:`vocab_parallel_scoring_rule_loss`), applied
            to each chunk of the shard's logits where it is formed.
        logit_scale: the output-head logit scale, as ``softcap``.
        smoothing_variant: as in :func:`vocab_parallel_scoring_rule_loss`.

    Returns:
        As :func:`vocab_parallel_scoring_rule_loss`. In backward, ``hidden`` receives the full
        gradient (the shards' contributions all-reduced over ``group``), ``local_weight`` and
        ``bias`` the gradients of this rank's rows.

    Example::

        >>> a, n = properlm.distributed.vocab_shard(model.config.vocab_size)
        >>> w_local = model.lm_head.weight[a:a + n]         # or a tensor-parallel shard
        >>> loss = fused_linear_vocab_parallel_scoring_rule_loss(hidden, w_local, labels, "spherical")
    """
    rule_obj = get_rule(rule)
    eps, variant = check_loss_options(smoothing, smoothing_variant, reduction)
    for name, t in (("hidden", hidden), ("local_weight", local_weight)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if not isinstance(target, Tensor):
        raise ValueError(f"target must be a tensor of token ids, got {type(target).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    cap, scale = check_head_transform(softcap, logit_scale)
    error = _local_error(lambda: _check_fused_inputs(hidden, local_weight, bias, target, ignore_index))
    H = hidden.shape[-1] if hidden.dim() else 0
    local_size = local_weight.shape[0] if local_weight.dim() else 0
    config = _config(rule_obj, eps, ignore_index, reduction, f"{chunk_size}|{H}|{variant}", cap, scale)
    shard = _resolve_layout(local_size, vocab_start, target, config, group, hidden.device, error)
    validate_inputs((*hidden.shape[:-1], local_size), hidden.dtype, target, ignore_index,
                    vocab_size=shard.vocab_size, what="hidden @ local_weight.T")
    chunk = chunk_size if chunk_size is not None else _chunk_rows(shard.max_size)
    flat = _FusedVocabParallelTokenLoss.apply(hidden.reshape(target.numel(), H), local_weight, bias, target.reshape(-1),
                                              rule_obj, eps, ignore_index, group, shard.start, chunk, cap, scale,
                                              variant)
    per_token = flat.view(target.shape)
    return reduce_loss(per_token, target != ignore_index, reduction, num_items_in_batch)
