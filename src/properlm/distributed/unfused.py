"""The vocabulary-parallel loss of sharded logits: :func:`vocab_parallel_scoring_rule_loss`.

Each rank passes its logits ``(..., V_local)``; the forward pass checks the layout (one all-gather), computes the
global statistics in chunks of rows (two or three all-reduces) and the loss; the backward pass forms each rank's
gradient of its own shard from what the forward pass saved, without communication.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..options import LossOptions, chunk_rows, compute_dtype, document_options, reduce_loss, validate_inputs
from ..rules import RuleLike
from ..stats import head_transform_, loss_and_partials
from .layout import NO_VOCAB_LIMIT, ProcessGroup, local_error, local_targets, resolve_layout, settings_key
from .shard_stats import shard_grad, shard_stats

__all__ = ["vocab_parallel_scoring_rule_loss"]


class _VocabParallelTokenLoss(torch.autograd.Function):
    """Per-token loss ``(n,)`` of the shard ``(n, V_local)`` under validated options; backward without communication."""

    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, target: Tensor, options: LossOptions, group: ProcessGroup, start: int
    ) -> Tensor:
        n, size = logits.shape
        cdt = compute_dtype(logits.dtype)
        rows = (target != options.ignore_index).nonzero().squeeze(1)
        local, owned = local_targets(target[rows], start, size)
        step = chunk_rows(size)
        softcap, logit_scale = options.softcap, options.logit_scale
        # (the gathered rows are a copy: transformed in place, chunk by chunk)
        stats = shard_stats(
            lambda a, b: head_transform_(logits[rows[a:b]].to(cdt), softcap, logit_scale),
            rows.numel(),
            step,
            local,
            owned,
            options,
            group,
            size,
            cdt,
            logits.device,
        )
        need_grad = ctx.needs_input_grad[0]
        loss_v, partials = loss_and_partials(
            options.rule, stats, options.smoothing, need_grad, options.smoothing_variant
        )
        loss = torch.zeros(n, dtype=cdt, device=logits.device)
        loss[rows] = loss_v
        ctx.options, ctx.step = options, step
        ctx.stats, ctx.partials = stats, partials
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
            g = shard_grad(logits[idx].to(cdt), local[sl], owned[sl], ctx.stats.index(sl), partials, ctx.options)
            grad[idx] = g.to(grad.dtype)
        return grad, None, None, None, None


def vocab_parallel_loss(
    local_logits: Tensor,
    target: Tensor,
    options: LossOptions,
    num_items_in_batch: int | Tensor | None = None,
    group: ProcessGroup = None,
    vocab_start: int | None = None,
) -> Tensor:
    """:func:`vocab_parallel_scoring_rule_loss` under validated :class:`~properlm.options.LossOptions`.

    The arguments as there; ``options`` holds the rule, smoothing, smoothing variant, ``ignore_index``, reduction
    and head transform. A collective.
    """
    if not isinstance(local_logits, Tensor):
        raise ValueError(f"local_logits must be a tensor, got {type(local_logits).__name__}")
    if not isinstance(target, Tensor):
        raise ValueError(f"target must be a tensor of token ids, got {type(target).__name__}")
    ignore_index = options.ignore_index
    error = local_error(
        lambda: validate_inputs(
            local_logits.shape,
            local_logits.dtype,
            target,
            ignore_index,
            vocab_size=NO_VOCAB_LIMIT,
            what="local_logits",
        )
    )
    local_size = local_logits.shape[-1] if local_logits.dim() else 0
    shard = resolve_layout(local_size, vocab_start, target, settings_key(options), group, local_logits.device, error)
    validate_inputs(
        local_logits.shape, local_logits.dtype, target, ignore_index, vocab_size=shard.vocab_size, what="local_logits"
    )
    size = local_logits.shape[-1]
    flat = _VocabParallelTokenLoss.apply(
        local_logits.reshape(target.numel(), size), target.reshape(-1), options, group, shard.start
    )
    per_token = flat.view(target.shape)
    return reduce_loss(per_token, target != ignore_index, options.reduction, num_items_in_batch)


@document_options
def vocab_parallel_scoring_rule_loss(
    local_logits: Tensor,
    target: Tensor,
    rule: RuleLike = "logarithmic",
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

    Shapes: ``local_logits`` ``(..., V_local)``, ``target`` ``(...)``; the result is a scalar, or ``target``'s
    shape for ``reduction="none"``.

    Args:
        local_logits: ``(..., V_local)`` this rank's logits for vocabulary ids
            ``[vocab_start, vocab_start + V_local)`` (any floating dtype, computed in float32;
            float64 in float64). ``V_local`` may differ between ranks and may be 0. Entries of
            ``-inf`` have probability 0; ``V`` in the smoothing terms counts the finite logits
            of all shards.
        target: ``(...)`` global token ids in ``[0, V)`` or ``ignore_index``, identical on
            every rank (``V`` = sum of the shard sizes).
        rule: {rule}
        smoothing: {smoothing}
        ignore_index: {ignore_index}
        reduction: {reduction}
        num_items_in_batch: {num_items_in_batch}
        group: the process group over which the vocabulary is sharded (``None``: the default group).
        vocab_start: first vocabulary id of this rank's shard. ``None`` on every rank: the
            shards follow rank order (computed from an all-gather of the shard sizes).
            Given on every rank: any order, checked to tile ``[0, V)``.
        softcap: {softcap} Applied to each rank's shard chunk by chunk; the same on every rank.
        logit_scale: {logit_scale}
        smoothing_variant: {smoothing_variant} The same on every rank.

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
    options = LossOptions(
        rule,
        smoothing,
        ignore_index,
        reduction,
        softcap=softcap,
        logit_scale=logit_scale,
        smoothing_variant=smoothing_variant,
    )
    return vocab_parallel_loss(local_logits, target, options, num_items_in_batch, group, vocab_start)
