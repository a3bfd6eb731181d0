"""The fused linear vocabulary-parallel loss: :func:`fused_linear_vocab_parallel_scoring_rule_loss`.

Each rank passes the replicated hidden states ``(..., H)`` and its rows of the output layer ``(V_local, H)``; the
shard's logits are formed chunk by chunk over the tokens, so no ``(tokens, V_local)`` tensor is ever held. Forward
costs one all-gather (the layout check) and two or three all-reduces per chunk; backward recomputes each chunk's
logits and all-reduces the gradient of the replicated ``hidden``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..options import LossOptions, chunk_rows, compute_dtype, document_options, reduce_loss, validate_inputs
from ..rules import RuleLike
from ..stats import TokenStats, head_transform_, loss_and_partials
from .layout import NO_VOCAB_LIMIT, ProcessGroup, local_error, local_targets, resolve_layout, settings_key
from .shard_stats import all_reduce, shard_grad, shard_stats

__all__ = ["fused_linear_vocab_parallel_scoring_rule_loss"]


def _check_fused_inputs(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, ignore_index: int) -> None:
    for name, t in (("hidden", hidden), ("local_weight", weight)):
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., H), got a scalar")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"local_weight must have shape (V_local, H={hidden.shape[-1]}) to match hidden "
            f"{tuple(hidden.shape)}, got {tuple(weight.shape)}"
        )
    autocast = torch.is_autocast_enabled(hidden.device.type)
    if weight.dtype != hidden.dtype and not autocast:
        raise ValueError(f"local_weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"bias must have shape (V_local,) = ({weight.shape[0]},), got "
                f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}"
            )
        if bias.dtype != weight.dtype:
            raise ValueError(f"bias dtype {bias.dtype} differs from local_weight dtype {weight.dtype}")
    validate_inputs(
        (*hidden.shape[:-1], weight.shape[0]),
        hidden.dtype,
        target,
        ignore_index,
        vocab_size=NO_VOCAB_LIMIT,
        what="hidden @ local_weight.T",
    )


class _FusedVocabParallelTokenLoss(torch.autograd.Function):
    """Per-token loss of ``hidden @ weight_local.T + bias_local``, chunked over tokens.

    Forward: per chunk of tokens, the shard's logits, the global statistics (collectives
    per chunk) and the partials; nothing of size ``(n, V_local)`` is kept. Backward:
    per chunk, the logits again, their gradient ``g`` (``(t, V_local)``), then
    ``grad_hidden = all_reduce_SUM(g @ W_local)``, ``grad_W_local = g.T @ h``,
    ``grad_b_local = sum_t g``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        target: Tensor,
        options: LossOptions,
        group: ProcessGroup,
        start: int,
        chunk: int,
    ) -> Tensor:
        n = hidden.shape[0]
        size = weight.shape[0]
        cdt = compute_dtype(hidden.dtype)
        rows = (target != options.ignore_index).nonzero().squeeze(1)
        local, owned = local_targets(target[rows], start, size)
        need_grad = any(ctx.needs_input_grad[:3])
        loss = torch.zeros(n, dtype=cdt, device=hidden.device)
        chunks: list[tuple[TokenStats, TokenStats | None]] = []
        for a in range(0, rows.numel(), chunk):
            sl = slice(a, a + chunk)
            idx = rows[sl]
            z_lin = F.linear(hidden[idx], weight, bias)  # under autocast: in its dtype
            ctx.lin_dtype = z_lin.dtype
            z = head_transform_(z_lin.to(cdt), options.softcap, options.logit_scale)  # z_lin is not used again
            stats = shard_stats(
                lambda a2, b2, z=z: z[a2:b2],  # type: ignore[misc]  # (mypy: the default z)
                idx.numel(),
                idx.numel(),
                local[sl],
                owned[sl],
                options,
                group,
                size,
                cdt,
                hidden.device,
            )
            loss_c, partials = loss_and_partials(
                options.rule, stats, options.smoothing, need_grad, options.smoothing_variant
            )
            loss[idx] = loss_c
            chunks.append((stats, partials))
        ctx.options, ctx.chunk, ctx.group, ctx.chunks = options, chunk, group, chunks
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
            g = shard_grad(z, local[sl], owned[sl], stats, partials.scaled(grad_loss[idx].to(cdt)), ctx.options)
            if grad_h is not None:
                grad_h[idx] = g @ w
            if grad_w is not None:
                grad_w.addmm_(g.T, h.to(cdt))
            if grad_b is not None:
                grad_b += g.sum(0)
        if grad_h is not None:
            # hidden is replicated: its gradient is the sum of every shard's contribution
            all_reduce(grad_h, dist.ReduceOp.SUM, ctx.group)
            grad_h = grad_h.to(hidden.dtype)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def fused_vocab_parallel_loss(
    hidden: Tensor,
    local_weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    options: LossOptions,
    num_items_in_batch: int | Tensor | None = None,
    group: ProcessGroup = None,
    vocab_start: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """:func:`fused_linear_vocab_parallel_scoring_rule_loss` under validated :class:`~properlm.options.LossOptions`.

    The arguments as there; ``options`` holds the rule, smoothing, smoothing variant, ``ignore_index``, reduction
    and head transform. A collective.
    """
    for name, t in (("hidden", hidden), ("local_weight", local_weight)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if not isinstance(target, Tensor):
        raise ValueError(f"target must be a tensor of token ids, got {type(target).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    ignore_index = options.ignore_index
    error = local_error(lambda: _check_fused_inputs(hidden, local_weight, bias, target, ignore_index))
    H = hidden.shape[-1] if hidden.dim() else 0
    local_size = local_weight.shape[0] if local_weight.dim() else 0
    config = settings_key(options, f"{chunk_size}|{H}")
    shard = resolve_layout(local_size, vocab_start, target, config, group, hidden.device, error)
    validate_inputs(
        (*hidden.shape[:-1], local_size),
        hidden.dtype,
        target,
        ignore_index,
        vocab_size=shard.vocab_size,
        what="hidden @ local_weight.T",
    )
    chunk = chunk_size if chunk_size is not None else chunk_rows(shard.max_size)
    flat = _FusedVocabParallelTokenLoss.apply(
        hidden.reshape(target.numel(), H), local_weight, bias, target.reshape(-1), options, group, shard.start, chunk
    )
    per_token = flat.view(target.shape)
    return reduce_loss(per_token, target != ignore_index, options.reduction, num_items_in_batch)


@document_options
def fused_linear_vocab_parallel_scoring_rule_loss(
    hidden: Tensor,
    local_weight: Tensor,
    target: Tensor,
    rule: RuleLike = "logarithmic",
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

    Shapes: ``hidden`` ``(..., H)``, ``local_weight`` ``(V_local, H)``, ``bias`` ``(V_local,)``, ``target``
    ``(...)``; the result is a scalar, or ``target``'s shape for ``reduction="none"``.

    Args:
        hidden: ``(..., H)`` final hidden states, identical on every rank (replicated).
        local_weight: ``(V_local, H)`` this rank's rows ``[vocab_start, vocab_start + V_local)``
            of the output layer (``lm_head.weight``), same dtype as ``hidden``.
        target: ``(...)`` global token ids in ``[0, V)`` or ``ignore_index``, identical on every rank.
        rule: {rule}
        bias: ``(V_local,)`` this rank's slice of the output bias, or ``None``.
        smoothing: {smoothing}
        ignore_index: {ignore_index}
        reduction: {reduction}
        num_items_in_batch: {num_items_in_batch}
        group: as in :func:`~properlm.distributed.vocab_parallel_scoring_rule_loss`.
        vocab_start: as in :func:`~properlm.distributed.vocab_parallel_scoring_rule_loss`.
        chunk_size: tokens per chunk (the same on every rank); default: as many as fit
            ``2**24`` float32 logits of the largest shard (:func:`properlm.options.chunk_rows`). Each chunk costs
            two or three all-reduces in forward.
        softcap: {softcap} Applied to each chunk of the shard's logits where it is formed.
        logit_scale: {logit_scale}
        smoothing_variant: {smoothing_variant} The same on every rank.

    Returns:
        As :func:`~properlm.distributed.vocab_parallel_scoring_rule_loss`. In backward, ``hidden`` receives the
        full gradient (the shards' contributions all-reduced over ``group``), ``local_weight`` and
        ``bias`` the gradients of this rank's rows.

    Example::

        >>> a, n = properlm.distributed.vocab_shard(model.config.vocab_size)
        >>> w_local = model.lm_head.weight[a:a + n]         # or a tensor-parallel shard
        >>> loss = fused_linear_vocab_parallel_scoring_rule_loss(hidden, w_local, labels, "spherical")
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
    return fused_vocab_parallel_loss(
        hidden, local_weight, target, bias, options, num_items_in_batch, group, vocab_start, chunk_size
    )
