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
from torch import Tensor, nn

from .compiled import token_losses as _traceable_token_losses
from .dtensor import is_dtensor
from .rules import RuleLike, ScoringRule, get_rule
from .stats import (
    TokenStats,
    check_head_transform,
    check_smoothing_variant,
    compute_dtype,
    compute_stats,
    head_transform_,
    head_transform_factor,
    logits_grad,
    loss_and_partials,
    warn_paper_smoothing,
)

__all__ = [
    "REDUCTIONS",
    "ScoringRuleLoss",
    "check_loss_options",
    "check_reduction",
    "check_smoothing",
    "compute_dtype",
    "reduce_loss",
    "scoring_rule_loss",
    "sequence_scores",
    "token_scores",
    "validate_inputs",
]

REDUCTIONS = ("mean", "sum", "none")

#: float32 elements of one chunk of logits rows (64 MiB), for callers that chunk by rows
CHUNK_ELEMENTS = 1 << 24
#: elements of one block of rows for the elementwise work (stays in cache)
BLOCK_ELEMENTS = 1 << 20


def check_smoothing(smoothing: float) -> float:
    """``smoothing`` as a float in ``[0, 1)``, or ``ValueError``."""
    try:
        eps = float(smoothing)
    except (TypeError, ValueError):
        raise ValueError(f"smoothing must be a number in [0, 1), got {smoothing!r}") from None
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
    return eps


def check_reduction(reduction: str) -> str:
    """``reduction`` if it is one of :data:`REDUCTIONS`, or ``ValueError``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    return reduction


def check_loss_options(smoothing: float, smoothing_variant: str, reduction: str) -> tuple[float, str]:
    """Check the options every loss takes, in this order, before any work.

    The head transform (``softcap``, ``logit_scale``) is checked apart, by
    :func:`properlm.stats.check_head_transform`.

    Args:
        smoothing: score smoothing ``eps`` in ``[0, 1)`` (:func:`check_smoothing`).
        smoothing_variant: one of :data:`properlm.stats.SMOOTHING_VARIANTS`.
        reduction: one of :data:`REDUCTIONS` (:func:`check_reduction`).

    Returns:
        ``(eps, smoothing_variant)``: ``smoothing`` as a float, and the variant.

    Raises:
        ValueError: naming the first invalid option of ``smoothing``, ``smoothing_variant``, ``reduction``.
    """
    eps = check_smoothing(smoothing)
    variant = check_smoothing_variant(smoothing_variant)
    check_reduction(reduction)
    return eps, variant


def _options_repr(module: Any, extra: str = "") -> str:
    """The ``extra_repr`` of a loss module.

    Its rule, smoothing, ``ignore_index`` and reduction, then ``extra``, then the head transform and
    the smoothing variant where they are not the defaults.
    """
    head = "".join(
        f", {k}={v}" for k, v in (("softcap", module.softcap), ("logit_scale", module.logit_scale)) if v is not None
    )
    if module.smoothing_variant != "paper":
        head += f", smoothing_variant={module.smoothing_variant!r}"
    return (
        f"rule={module.rule.spec!r}, smoothing={module.smoothing}, ignore_index={module.ignore_index}, "
        f"reduction={module.reduction!r}{extra}{head}"
    )


def validate_inputs(
    logits_shape: torch.Size | tuple[int, ...],
    logits_dtype: torch.dtype,
    target: Tensor,
    ignore_index: int,
    vocab_size: int | None = None,
    what: str = "logits",
) -> None:
    """Raise ``ValueError`` for inputs that the losses cannot score.

    ``logits_shape`` is ``(..., V)`` and ``target`` must have shape ``(...)``, an integer
    dtype, and values in ``[0, V)`` or equal to ``ignore_index``.
    """
    if not logits_dtype.is_floating_point:
        raise ValueError(f"{what} must be a floating-point tensor, got dtype {logits_dtype}")
    if len(logits_shape) < 1:
        raise ValueError(f"{what} must have at least one dimension (the vocabulary), got a scalar")
    V = logits_shape[-1] if vocab_size is None else vocab_size
    if V < 1:
        raise ValueError(f"{what} has an empty vocabulary dimension (size 0)")
    if not isinstance(target, Tensor):
        raise ValueError(f"target must be a tensor of token ids, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer token ids, got dtype {target.dtype}")
    if tuple(target.shape) != tuple(logits_shape[:-1]):
        raise ValueError(
            f"shape mismatch: {what} of shape {tuple(logits_shape)} (..., V) need target of shape "
            f"{tuple(logits_shape[:-1])}, got {tuple(target.shape)}"
        )
    # reading the targets would break a compiled graph: under torch.compile an out-of-range id
    # gives a NaN loss instead (see properlm.compiled)
    if target.numel() and not torch.compiler.is_compiling():
        bad = ((target < 0) | (target >= V)) & (target != ignore_index)
        if bool(bad.any()):
            first = target[bad][0].item()
            raise ValueError(
                f"target holds {int(bad.sum())} id(s) outside [0, {V}) (first: {first}); "
                f"only ignore_index={ignore_index} may fall outside the vocabulary"
            )


def reduce_loss(loss: Tensor, valid: Tensor, reduction: str, num_items_in_batch: Any = None) -> Tensor:
    """Reduce per-token losses ``loss`` (0 at ignored positions, mask ``valid``).

    ``mean`` divides the sum by ``num_items_in_batch`` when given (as Hugging Face does
    under gradient accumulation) and otherwise by the number of valid tokens (1 if none).
    """
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            return total / num_items_in_batch.to(device=total.device, dtype=total.dtype)
        if num_items_in_batch <= 0:
            raise ValueError(f"num_items_in_batch must be positive, got {num_items_in_batch}")
        return total / num_items_in_batch
    return total / valid.sum().clamp(min=1).to(total.dtype)


def _block_rows(vocab_size: int, device: torch.device) -> int:
    """Rows of one block of logits for the elementwise work.

    Cache-sized on the CPU, a large chunk on accelerators (where each block costs kernel launches).
    """
    elements = BLOCK_ELEMENTS if device.type == "cpu" else CHUNK_ELEMENTS
    return max(1, elements // max(vocab_size, 1))


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
        self.step = _block_rows(V, logits.device)
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
    """Per-token loss of 2-D logits ``(n, V)``.

    The forward pass keeps a few statistics per scored token; the backward pass rebuilds the gradient
    block by block from them.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,
        target: Tensor,
        rule: ScoringRule,
        smoothing: float,
        ignore_index: int,
        softcap: float | None = None,
        logit_scale: float | None = None,
        smoothing_variant: str = "paper",
    ) -> Tensor:
        n = logits.shape[0]
        valid = target != ignore_index
        scored = valid.nonzero().squeeze(1)
        rows: Tensor | None = scored
        if scored.numel() == n:
            rows, y = None, target
        else:
            y = target.index_select(0, scored)
        blocks = _RowBlocks(logits, rows, y.numel(), softcap, logit_scale)
        parts = []
        for sl, z in blocks:
            b = sl.stop - sl.start
            stats, _, _ = compute_stats(
                z, y[sl], rule, smoothing, out=blocks.e[:b], work=blocks.work[:b], variant=smoothing_variant
            )
            parts.append(stats)
        loss = torch.zeros(n, dtype=blocks.cdt, device=logits.device)
        ctx.save_for_backward(logits)
        if not parts:  # every target ignored
            ctx.stats = None
            return loss
        stats = TokenStats.cat(parts)
        need_grad = ctx.needs_input_grad[0]
        loss_v, partials = loss_and_partials(rule, stats, smoothing, need_grad, smoothing_variant)
        if rows is None:
            loss = loss_v
        else:
            loss.index_copy_(0, rows, loss_v)
        ctx.rule, ctx.smoothing, ctx.rows, ctx.y = rule, smoothing, rows, y
        ctx.stats, ctx.partials = stats, partials
        ctx.head = (softcap, logit_scale)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        (logits,) = ctx.saved_tensors
        if ctx.stats is None:
            return torch.zeros_like(logits), None, None, None, None, None, None, None
        rows = ctx.rows
        softcap, logit_scale = ctx.head
        blocks = _RowBlocks(logits, rows, ctx.y.numel(), softcap, logit_scale, grad=True)
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
                z, ctx.y[sl], stats, partials.index(sl), ctx.smoothing, ctx.rule, e=e, out=out, work=blocks.work[:b]
            )
            if factor is not None:  # the chain rule through the output-head transform
                g.mul_(factor)
            if direct:
                continue
            if rows is None:
                grad[sl].copy_(g)
            else:
                grad.index_copy_(0, rows[sl], g.to(grad.dtype))
        return grad, None, None, None, None, None, None, None


def _token_losses(
    logits: Tensor,
    target: Tensor,
    rule: ScoringRule,
    smoothing: float,
    ignore_index: int,
    softcap: float | None = None,
    logit_scale: float | None = None,
    smoothing_variant: str = "paper",
) -> Tensor:
    V = logits.shape[-1]
    if torch.compiler.is_compiling():
        flat = _traceable_token_losses(
            logits.reshape(-1, V),
            target.reshape(-1),
            rule,
            smoothing,
            ignore_index,
            softcap=softcap,
            logit_scale=logit_scale,
            smoothing_variant=smoothing_variant,
        )
        return flat.view(target.shape)
    flat = _TokenLoss.apply(
        logits.reshape(-1, V),
        target.reshape(-1),
        rule,
        smoothing,
        ignore_index,
        softcap,
        logit_scale,
        smoothing_variant,
    )
    return flat.view(target.shape)


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

    Args:
        logits: ``(..., V)`` unnormalised scores, any floating dtype (computed in float32;
            float64 input is computed in float64).
            Entries of ``-inf`` mark vocabulary entries with probability 0; ``V`` in the
            smoothing terms is then the number of finite logits of the row.
            A ``DTensor`` sharded over the vocabulary (``Shard(-1)``, tensor parallelism) is
            scored with the vocabulary-parallel loss (:mod:`properlm.dtensor`); the result is
            then a replicated ``DTensor``.
        target: ``(...)`` integer token ids in ``[0, V)`` or ``ignore_index``.
        rule: a spec string (``"logarithmic"``, ``"brier"``, ``"spherical"``,
            ``"pseudo-spherical:ALPHA"``, ``"power:ALPHA"``, or a registered name) or a
            :class:`~properlm.rules.ScoringRule`.
        smoothing: score smoothing ``eps`` in ``[0, 1)``:
            ``S_eps = (1-eps) S(p, y) + (eps/V) sum_k S(p, k)``, plus for bounded rules
            ``(eps/V) sum_j 1[p_j < eps/V] log p_j`` (the masked-log term; see ``smoothing_variant``).
        ignore_index: target value whose positions contribute neither loss nor gradient.
        reduction: ``"mean"`` (over non-ignored tokens, or ``sum / num_items_in_batch``),
            ``"sum"`` or ``"none"`` (shape of ``target``, 0 at ignored positions).
        num_items_in_batch: the number of target tokens of the whole (accumulated) batch,
            as passed by ``transformers.Trainer``; only used with ``reduction="mean"``.
        softcap: final-logit soft-capping ``c > 0`` (Gemma 2/3): the rule scores
            ``z'' = c tanh(z' / c)``. ``None``: no capping.
        logit_scale: a logit multiplier ``s > 0`` applied first, ``z' = s z`` (Cohere's
            ``logit_scale``; Granite's ``1 / logits_scaling``). ``None``: ``s = 1``.
            The transform is applied to each block of rows in the compute dtype (no transformed
            copy of the logits is kept); ``-inf`` logits stay ``-inf``. Value and gradient equal
            those of the loss of the transformed logits.
        smoothing_variant: the form of the masked-log term of bounded rules
            (:data:`properlm.stats.SMOOTHING_VARIANTS`): ``"paper"`` (default, the paper's formula),
            ``"gated"`` (the term times ``g = clamp((p_y - 1 + eps) / eps, 0, 1)``, a constant of the
            gradient: it acts only where the model is more confident than the smoothed optimum, which
            keeps it from flattening large vocabularies) or ``"none"`` (no masked-log term). Every
            variant's expected smoothed score is maximised exactly at ``(1 - eps) q + eps / V``; see
            :func:`properlm.stats.smoothed_score`. No effect on ``logarithmic`` or without smoothing.
            ``"paper"`` with a bounded rule at ``V >= 16384`` warns once
            (:func:`properlm.stats.warn_paper_smoothing`): it flattens large vocabularies; take ``"gated"``.

    Returns:
        A scalar, or a tensor of ``target``'s shape for ``"none"``, in float32 (float64
        for float64 logits).

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
    if is_dtensor(logits):  # vocabulary-sharded DTensor logits (tensor parallelism): properlm.dtensor
        from .dtensor import dtensor_scoring_rule_loss

        return dtensor_scoring_rule_loss(
            logits,
            target,
            rule,
            smoothing,
            ignore_index,
            reduction,
            num_items_in_batch,
            softcap=softcap,
            logit_scale=logit_scale,
            smoothing_variant=smoothing_variant,
        )
    rule_obj = get_rule(rule)
    eps, variant = check_loss_options(smoothing, smoothing_variant, reduction)
    cap, scale = check_head_transform(softcap, logit_scale)
    validate_inputs(logits.shape, logits.dtype, target, ignore_index)
    warn_paper_smoothing(rule_obj, eps, variant, logits.shape[-1])
    per_token = _token_losses(logits, target, rule_obj, eps, ignore_index, cap, scale, variant)
    return reduce_loss(per_token, target != ignore_index, reduction, num_items_in_batch)


class ScoringRuleLoss(nn.Module):
    """Module form of :func:`scoring_rule_loss`.

    Example::

        >>> criterion = properlm.ScoringRuleLoss("spherical", smoothing=0.1)
        >>> loss = criterion(logits.view(-1, V), labels.view(-1))
    """

    def __init__(
        self,
        rule: RuleLike = "logarithmic",
        smoothing: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        *,
        softcap: float | None = None,
        logit_scale: float | None = None,
        smoothing_variant: str = "paper",
    ) -> None:
        super().__init__()
        self.rule = get_rule(rule)
        self.smoothing, self.smoothing_variant = check_loss_options(smoothing, smoothing_variant, reduction)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.softcap, self.logit_scale = check_head_transform(softcap, logit_scale)

    def forward(self, logits: Tensor, target: Tensor, num_items_in_batch: int | Tensor | None = None) -> Tensor:
        """The loss of ``logits`` ``(..., V)`` for ``target`` ``(...)``, as :func:`scoring_rule_loss`."""
        return scoring_rule_loss(
            logits,
            target,
            self.rule,
            self.smoothing,
            self.ignore_index,
            self.reduction,
            num_items_in_batch,
            softcap=self.softcap,
            logit_scale=self.logit_scale,
            smoothing_variant=self.smoothing_variant,
        )

    def extra_repr(self) -> str:
        """The settings, as shown in ``repr(module)``."""
        return _options_repr(self)


def token_scores(logits: Tensor, target: Tensor, rule: RuleLike, ignore_index: int = -100) -> Tensor:
    """Unsmoothed token scores ``S(p(. | x, y_<t), y_t)``, 0 at ignored positions.

    ``logits`` ``(..., V)``, ``target`` ``(...)`` -> float32 (float64 for float64 logits) of ``target``'s
    shape. Differentiable with respect to ``logits``.
    """
    rule_obj = get_rule(rule)
    validate_inputs(logits.shape, logits.dtype, target, ignore_index)
    loss = _token_losses(logits, target, rule_obj, 0.0, ignore_index)
    return torch.where(target != ignore_index, rule_obj.s_max - loss, 0.0)


def sequence_scores(logits: Tensor, target: Tensor, rule: RuleLike, ignore_index: int = -100) -> Tensor:
    """Sequence scores: the sum of :func:`token_scores` over the last dimension of ``target`` (time).

    ``logits`` ``(..., T, V)``, ``target`` ``(..., T)`` -> ``(...)``.
    """
    if target.dim() < 1:
        raise ValueError("sequence_scores needs target with a time dimension, got a scalar")
    return token_scores(logits, target, rule, ignore_index).sum(-1)
