"""Scoring-rule losses on materialised logits: the functional API and ``nn.Module``.

The loss of one position is ``S_max - S_eps(p, y)`` (see :mod:`properlm.rules` for the
rules and :func:`properlm.stats.smoothed_score` for the smoothing). For ``logarithmic``
it is cross-entropy, with smoothing it is ``F.cross_entropy(..., label_smoothing=eps)``.

The computation runs over cache-sized blocks of rows in float32 (float64 for float64 input),
in reused buffers: the forward pass keeps a handful of numbers per token, and the backward
pass rebuilds each block's gradient from them, so no float32 copy of the whole logits tensor
is ever held.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from .compiled import token_losses as traceable_token_losses
from .dtensor import is_dtensor, sharded_logits_loss
from .options import (
    LossModule,
    LossOptions,
    block_rows,
    compute_dtype,
    document_options,
    reduce_loss,
    validate_inputs,
)
from .rules import RuleLike
from .stats import (
    TokenStats,
    compute_stats,
    head_transform_,
    head_transform_factor,
    logits_grad,
    loss_and_partials,
    warn_paper_smoothing,
)

__all__ = [
    "ScoringRuleLoss",
    "scoring_rule_loss",
    "sequence_scores",
    "token_losses",
    "token_scores",
]


class _RowBlocks:
    """The scored rows of 2-D logits, in cache-sized blocks of rows.

    The rows are gathered (and upcast to the compute dtype) into reused buffers: no float32 copy of the
    whole logits is made, and no large tensor is allocated per block.
    """

    def __init__(
        self,
        logits: Tensor,
        rows: Tensor | None,
        num_rows: int,
        softcap: float | None = None,
        logit_scale: float | None = None,
        grad: bool = False,
    ) -> None:
        self.logits, self.rows, self.num_rows = logits, rows, num_rows
        self.softcap, self.logit_scale = softcap, logit_scale
        transformed = softcap is not None or logit_scale is not None
        V = logits.shape[1]
        self.cdt = compute_dtype(logits.dtype)
        self.step = block_rows(V, logits.device)
        # a block of the logits themselves (no copy) when the rows are contiguous, already in
        # the compute dtype and not transformed; otherwise a gathered / upcast copy in ``z``
        self.in_place = rows is None and logits.dtype == self.cdt and not transformed
        size = (min(self.step, max(num_rows, 1)), V)
        new = lambda: torch.empty(size, dtype=self.cdt, device=logits.device)  # noqa: E731
        self.z = None if self.in_place else new()
        self.e, self.work = new(), new()
        # the chain factor of the soft-cap (backward only; a logit scale alone is a scalar)
        self.factor = new() if grad and softcap is not None else None

    def __iter__(self) -> Iterator[tuple[slice, Tensor]]:
        """``(block slice over the scored rows, float logits of the block (b, V))``."""
        for start in range(0, self.num_rows, self.step):
            sl = slice(start, min(start + self.step, self.num_rows))
            b = sl.stop - sl.start
            if self.in_place:
                yield sl, self.logits[sl]
                continue
            assert self.z is not None
            z = self.z[:b]
            if self.rows is None:
                z.copy_(self.logits[sl])
            elif self.logits.dtype == self.cdt:
                torch.index_select(self.logits, 0, self.rows[sl], out=z)
            else:
                z.copy_(self.logits.index_select(0, self.rows[sl]))
            yield sl, head_transform_(z, self.softcap, self.logit_scale)

    def chain_factor(self, z: Tensor) -> Tensor | float | None:
        """``dz'' / dz`` of the block ``z`` (transformed logits) of :func:`head_transform_`."""
        out = None if self.factor is None else self.factor[: z.shape[0]]
        return head_transform_factor(z, self.softcap, self.logit_scale, out=out)


class _TokenLoss(torch.autograd.Function):
    """Per-token loss of 2-D logits ``(n, V)`` under validated :class:`~properlm.options.LossOptions`.

    The forward pass keeps a few statistics per scored token; the backward pass rebuilds the gradient
    block by block from them.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor, options: LossOptions) -> Tensor:
        rule, smoothing, variant = options.rule, options.smoothing, options.smoothing_variant
        n = logits.shape[0]
        valid = target != options.ignore_index
        scored = valid.nonzero().squeeze(1)
        rows: Tensor | None = scored
        if scored.numel() == n:
            rows, y = None, target
        else:
            y = target.index_select(0, scored)
        blocks = _RowBlocks(logits, rows, y.numel(), options.softcap, options.logit_scale)
        parts = []
        for sl, z in blocks:
            b = sl.stop - sl.start
            stats, _, _ = compute_stats(
                z, y[sl], rule, smoothing, out=blocks.e[:b], work=blocks.work[:b], variant=variant
            )
            parts.append(stats)
        loss = torch.zeros(n, dtype=blocks.cdt, device=logits.device)
        ctx.save_for_backward(logits)
        if not parts:  # every target ignored
            ctx.stats = None
            return loss
        stats = TokenStats.cat(parts)
        need_grad = ctx.needs_input_grad[0]
        loss_v, partials = loss_and_partials(rule, stats, smoothing, need_grad, variant)
        if rows is None:
            loss = loss_v
        else:
            loss.index_copy_(0, rows, loss_v)
        ctx.options, ctx.rows, ctx.y = options, rows, y
        ctx.stats, ctx.partials = stats, partials
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, None, None]:
        (logits,) = ctx.saved_tensors
        if ctx.stats is None:
            return torch.zeros_like(logits), None, None
        opts: LossOptions = ctx.options
        rows = ctx.rows
        blocks = _RowBlocks(logits, rows, ctx.y.numel(), opts.softcap, opts.logit_scale, grad=True)
        w = (grad_loss if rows is None else grad_loss.index_select(0, rows)).to(blocks.cdt)
        partials = ctx.partials.scaled(w)
        grad = torch.empty_like(logits) if rows is None else torch.zeros_like(logits)
        direct = rows is None and grad.dtype == blocks.cdt  # write straight into grad
        for sl, z in blocks:
            b = sl.stop - sl.start
            stats = ctx.stats.index(sl)
            factor = blocks.chain_factor(z)  # before the gradient overwrites z
            e = torch.sub(z, stats.max_logit[:, None], out=blocks.e[:b]).exp_()
            out = grad[sl] if direct else z  # z is a gathered copy when not in place
            g = logits_grad(
                z, ctx.y[sl], stats, partials.index(sl), opts.smoothing, opts.rule, e=e, out=out, work=blocks.work[:b]
            )
            if factor is not None:  # the chain rule through the output-head transform
                g.mul_(factor)
            if direct:
                continue
            if rows is None:
                grad[sl].copy_(g)
            else:
                grad.index_copy_(0, rows[sl], g.to(grad.dtype))
        return grad, None, None


def token_losses(logits: Tensor, target: Tensor, options: LossOptions) -> Tensor:
    """Per-token losses ``S_max - S_eps(softmax(z), y)`` of validated inputs, 0 at ignored positions.

    ``logits`` ``(..., V)`` and ``target`` ``(...)`` as :func:`scoring_rule_loss` takes them (checked by
    :func:`properlm.options.validate_inputs`); ``options.reduction`` is not applied. Returns ``target``'s shape in
    the compute dtype (:func:`properlm.options.compute_dtype`). Under ``torch.compile`` the traceable form
    :func:`properlm.compiled.token_losses`, else the blockwise autograd function.
    """
    V = logits.shape[-1]
    if torch.compiler.is_compiling():
        flat = traceable_token_losses(logits.reshape(-1, V), target.reshape(-1), options)
        return flat.view(target.shape)
    flat = _TokenLoss.apply(logits.reshape(-1, V), target.reshape(-1), options)
    return flat.view(target.shape)


def _loss(
    logits: Tensor, target: Tensor, options: LossOptions, num_items_in_batch: int | Tensor | None, stacklevel: int
) -> Tensor:
    """:func:`scoring_rule_loss` under validated options.

    A warning names the code ``stacklevel`` frames up.
    """
    if is_dtensor(logits):  # vocabulary-sharded DTensor logits (tensor parallelism): properlm.dtensor
        return sharded_logits_loss(logits, target, options, num_items_in_batch)
    validate_inputs(logits.shape, logits.dtype, target, options.ignore_index)
    warn_paper_smoothing(options.rule, options.smoothing, options.smoothing_variant, logits.shape[-1], stacklevel)
    per_token = token_losses(logits, target, options)
    return reduce_loss(per_token, target != options.ignore_index, options.reduction, num_items_in_batch)


@document_options
def scoring_rule_loss(
    logits: Tensor,
    target: Tensor,
    rule: RuleLike = "logarithmic",
    smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    *,
    softcap: float | None = None,
    logit_scale: float | None = None,
    smoothing_variant: str = "paper",
) -> Tensor:
    r"""Scoring-rule loss ``S_max - S_eps(softmax(logits), target)``.

    Per position ``i`` with logits ``z_i`` (after the output-head transform ``z'' = c tanh(s z / c)`` when
    ``softcap`` / ``logit_scale`` are given) and target ``y_i``::

        loss_i = S_max - S_eps(softmax(z_i), y_i)      (0 where y_i == ignore_index)

    reduced by ``reduction``. For ``logarithmic`` it is cross-entropy; with smoothing,
    ``F.cross_entropy(..., label_smoothing=eps)``. See :mod:`properlm.rules` for the rules and
    :func:`properlm.stats.smoothed_score` for the smoothing.

    Shapes: ``logits`` ``(..., V)``, ``target`` ``(...)``; the result is a scalar, or ``target``'s shape for
    ``reduction="none"``.

    Args:
        logits: ``(..., V)`` unnormalised scores, any floating dtype (computed in float32;
            float64 input is computed in float64).
            Entries of ``-inf`` mark vocabulary entries with probability 0; ``V`` in the
            smoothing terms is then the number of finite logits of the row.
            A ``DTensor`` sharded over the vocabulary (``Shard(-1)``, tensor parallelism) is
            scored with the vocabulary-parallel loss (:mod:`properlm.dtensor`); the result is
            then a replicated ``DTensor``.
        target: ``(...)`` integer token ids in ``[0, V)`` or ``ignore_index``.
        rule: {rule}
        smoothing: {smoothing}
        ignore_index: {ignore_index}
        reduction: {reduction}
        num_items_in_batch: {num_items_in_batch}
        softcap: {softcap}
        logit_scale: {logit_scale}
        smoothing_variant: {smoothing_variant}

    Returns:
        A scalar, or a tensor of ``target``'s shape for ``"none"``, in float32 (float64
        for float64 logits).

    Raises:
        ValueError: an invalid option (:class:`~properlm.options.LossOptions`), or inputs that cannot be scored
            (:func:`~properlm.options.validate_inputs`: dtype, shapes, target ids outside ``[0, V)``).

    Under ``torch.compile`` (``fullgraph=True`` works) the loss is computed by the traceable
    form in :mod:`properlm.compiled`: the same statistics and score formula, ignored positions
    masked instead of gathered, gradients by autograd, no host synchronisation. Values and
    gradients equal eager mode to float32 rounding (tests: relative error ``<= 1e-5``). The
    argument, dtype and shape checks run while tracing, unchanged; the data check of the
    targets does not (it would need the values on the host): an id outside ``[0, V)`` other
    than ``ignore_index`` gives that token a loss of NaN (so a NaN reduced loss) instead of the
    eager ``ValueError``.

    Example::

        >>> logits = torch.randn(2, 5, 100, requires_grad=True)
        >>> target = torch.randint(100, (2, 5))
        >>> loss = properlm.scoring_rule_loss(logits, target, rule="brier", smoothing=0.1)
        >>> loss.backward()
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
    return _loss(logits, target, options, num_items_in_batch, stacklevel=4)  # a warning names the caller


@document_options
class ScoringRuleLoss(LossModule):
    """Module form of :func:`scoring_rule_loss`.

    Args:
        rule: {rule}
        smoothing: {smoothing}
        ignore_index: {ignore_index}
        reduction: {reduction}
        softcap: {softcap}
        logit_scale: {logit_scale}
        smoothing_variant: {smoothing_variant}

    Attributes:
        options: the validated :class:`~properlm.options.LossOptions`; each option is also a property that reads
            it and, when set, replaces ``options`` with a validated copy (:class:`~properlm.options.LossModule`).

    Shape: ``forward(logits (..., V), target (...), num_items_in_batch=None)`` -> a scalar, or ``target``'s shape
    for ``reduction="none"``.

    Example::

        >>> criterion = properlm.ScoringRuleLoss("spherical", smoothing=0.1)
        >>> loss = criterion(logits.view(-1, V), labels.view(-1))
    """

    def forward(self, logits: Tensor, target: Tensor, num_items_in_batch: int | Tensor | None = None) -> Tensor:
        """The loss of ``logits`` ``(..., V)`` for ``target`` ``(...)``, as :func:`scoring_rule_loss`."""
        return _loss(logits, target, self.options, num_items_in_batch, stacklevel=3)


def token_scores(logits: Tensor, target: Tensor, rule: RuleLike, ignore_index: int = -100) -> Tensor:
    """Unsmoothed token scores ``S(p(. | x, y_<t), y_t)``, 0 at ignored positions.

    ``logits`` ``(..., V)``, ``target`` ``(...)`` -> float32 (float64 for float64 logits) of ``target``'s
    shape. Differentiable with respect to ``logits``.
    """
    options = LossOptions(rule, 0.0, ignore_index)
    validate_inputs(logits.shape, logits.dtype, target, ignore_index)
    loss = token_losses(logits, target, options)
    return torch.where(target != ignore_index, options.rule.s_max - loss, 0.0)


def sequence_scores(logits: Tensor, target: Tensor, rule: RuleLike, ignore_index: int = -100) -> Tensor:
    """Sequence scores: the sum of :func:`token_scores` over the last dimension of ``target`` (time).

    ``logits`` ``(..., T, V)``, ``target`` ``(..., T)`` -> ``(...)``.
    """
    if target.dim() < 1:
        raise ValueError("sequence_scores needs target with a time dimension, got a scalar")
    return token_scores(logits, target, rule, ignore_index).sum(-1)
