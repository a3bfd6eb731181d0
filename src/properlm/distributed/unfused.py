"""The vocabulary-parallel loss of sharded logits: :func:`vocab_parallel_scoring_rule_loss`.

Each rank passes its logits ``(..., V_local)``; the forward pass checks the layout (one all-gather), computes the
global statistics in chunks of rows (two or three all-reduces) and the loss; the backward pass forms each rank's
gradient of its own shard from what the forward pass saved, without communication.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..loss import check_loss_options, compute_dtype, reduce_loss, validate_inputs
from ..rules import RuleLike, ScoringRule, get_rule
from ..stats import check_head_transform, head_transform_, loss_and_partials
from .layout import _NO_LIMIT, ProcessGroup, _chunk_rows, _config, _local_error, _local_targets, _resolve_layout
from .stats import _shard_grad, _shard_stats

__all__ = ["vocab_parallel_scoring_rule_loss"]


class _VocabParallelTokenLoss(torch.autograd.Function):
    """Per-token loss ``(n,)`` of the shard ``(n, V_local)``; backward without communication."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,
        target: Tensor,
        rule: ScoringRule,
        smoothing: float,
        ignore_index: int,
        group: ProcessGroup,
        start: int,
        softcap: float | None = None,
        logit_scale: float | None = None,
        smoothing_variant: str = "paper",
    ) -> Tensor:
        n, size = logits.shape
        cdt = compute_dtype(logits.dtype)
        rows = (target != ignore_index).nonzero().squeeze(1)
        local, owned = _local_targets(target[rows], start, size)
        step = _chunk_rows(size)
        # (the gathered rows are a copy: transformed in place, chunk by chunk)
        stats = _shard_stats(
            lambda a, b: head_transform_(logits[rows[a:b]].to(cdt), softcap, logit_scale),
            rows.numel(),
            step,
            local,
            owned,
            rule,
            smoothing,
            group,
            size,
            cdt,
            logits.device,
            smoothing_variant,
        )
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
            g = _shard_grad(
                logits[idx].to(cdt),
                local[sl],
                owned[sl],
                ctx.stats.index(sl),
                partials,
                ctx.smoothing,
                ctx.rule,
                *ctx.head,
            )
            grad[idx] = g.to(grad.dtype)
        return grad, None, None, None, None, None, None, None, None, None


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
    error = _local_error(
        lambda: validate_inputs(
            local_logits.shape, local_logits.dtype, target, ignore_index, vocab_size=_NO_LIMIT, what="local_logits"
        )
    )
    local_size = local_logits.shape[-1] if local_logits.dim() else 0
    shard = _resolve_layout(
        local_size,
        vocab_start,
        target,
        _config(rule_obj, eps, ignore_index, reduction, variant, softcap=cap, logit_scale=scale),
        group,
        local_logits.device,
        error,
    )
    validate_inputs(
        local_logits.shape, local_logits.dtype, target, ignore_index, vocab_size=shard.vocab_size, what="local_logits"
    )
    size = local_logits.shape[-1]
    flat = _VocabParallelTokenLoss.apply(
        local_logits.reshape(target.numel(), size),
        target.reshape(-1),
        rule_obj,
        eps,
        ignore_index,
        group,
        shard.start,
        cap,
        scale,
        variant,
    )
    per_token = flat.view(target.shape)
    return reduce_loss(per_token, target != ignore_index, reduction, num_items_in_batch)
