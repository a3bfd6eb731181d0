"""The fused linear + scoring-rule loss: the public function and ``nn.Module``, input validation, choice of path.

``fused_linear_scoring_rule_loss(hidden, weight, target, ...)`` equals
``scoring_rule_loss(hidden @ weight.T + bias, target, ...)`` in value and in its gradients
with respect to ``hidden``, ``weight`` and ``bias``, without forming the ``(N, V)`` logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..compiled import fused_token_losses
from ..dtensor import is_dtensor, sharded_weight_loss
from ..options import (
    LossModule,
    LossOptions,
    check_num_items,
    default_chunk_size,
    document_options,
    options_repr,
    reduce_loss,
    validate_inputs,
)
from ..rules import RuleLike
from ..stats import warn_paper_smoothing
from .backends import IMPLS, select_backend, triton_is_available
from .chunked import FusedLinearLossFunction
from .op import fused_linear_loss, spec_names_rule

__all__ = ["IMPLS", "LinearScoringRuleLoss", "fused_linear_scoring_rule_loss", "triton_is_available"]


def _validate(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    chunk_size: int | None,
    impl: str | None,
) -> None:
    if not isinstance(hidden, Tensor):
        raise ValueError(f"hidden must be a tensor of shape (..., H), got {type(hidden).__name__}")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 2-D tensor of shape (V, H) as stored by nn.Linear, got {shape}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., H), got a scalar")
    V, H = weight.shape
    if hidden.shape[-1] != H:
        raise ValueError(
            f"shape mismatch: hidden of shape {tuple(hidden.shape)} has hidden size {hidden.shape[-1]} but "
            f"weight of shape {tuple(weight.shape)} (V, H) expects H={H}"
        )
    if not hidden.dtype.is_floating_point:
        raise ValueError(f"hidden must be a floating-point tensor, got dtype {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"dtype mismatch: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one of them")
    if weight.device != hidden.device:
        raise ValueError(f"device mismatch: hidden is on {hidden.device} but weight is on {weight.device}")
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (V,):
            shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"bias must be a tensor of shape (V,) = ({V},), got {shape}")
        if bias.dtype != weight.dtype:
            raise ValueError(f"dtype mismatch: bias is {bias.dtype} but weight is {weight.dtype}")
        if bias.device != weight.device:
            raise ValueError(f"device mismatch: bias is on {bias.device} but weight is on {weight.device}")
    if isinstance(target, Tensor) and target.device != hidden.device:
        raise ValueError(f"device mismatch: target is on {target.device} but hidden is on {hidden.device}")
    validate_inputs((*hidden.shape[:-1], V), hidden.dtype, target, ignore_index, what="logits (hidden @ weight.T)")
    _check_chunking(chunk_size, impl)


def _check_chunking(chunk_size: int | None, impl: str | None) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"impl must be None, 'torch' or 'triton', got {impl!r}")


@document_options
def fused_linear_scoring_rule_loss(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    rule: RuleLike = "logarithmic",
    bias: Tensor | None = None,
    smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    chunk_size: int | None = None,
    impl: str | None = None,
    *,
    softcap: float | None = None,
    logit_scale: float | None = None,
    smoothing_variant: str = "paper",
) -> Tensor:
    r"""Scoring-rule loss of the output layer ``logits = hidden @ weight.T + bias``, without the logits.

    The ``(N, V)`` logits are never materialised. Per token ``i`` with ``z_i = W h_i + b``::

        loss_i = S_max - S_eps(softmax(z_i''), y_i)      (z'' the output-head transform of z)

    Equal in value and gradients (``hidden``, ``weight``, ``bias``) to
    ``scoring_rule_loss(hidden @ weight.T + bias, target, rule, smoothing, ignore_index,
    reduction, num_items_in_batch, softcap=..., logit_scale=..., smoothing_variant=...)``.

    Shapes: ``hidden`` ``(..., H)``, ``weight`` ``(V, H)``, ``bias`` ``(V,)``, ``target`` ``(...)``; the result
    is a scalar, or ``target``'s shape for ``reduction="none"``.

    Args:
        hidden: ``(..., H)`` final hidden states (float32, bfloat16 or float16).
        weight: ``(V, H)`` output projection, as stored by ``nn.Linear`` / ``lm_head``; same
            dtype and device as ``hidden``. A ``DTensor`` sharded over the vocabulary
            (``Shard(0)``, a ``ColwiseParallel`` head) is scored with the vocabulary-parallel
            loss (:mod:`properlm.dtensor`; ``impl`` is ignored); the result is then a replicated ``DTensor``.
        target: ``(...)`` integer token ids in ``[0, V)`` or ``ignore_index``; ignored positions are dropped
            before the matmul.
        rule: {rule}
        bias: optional ``(V,)`` output bias.
        smoothing: {smoothing}
        ignore_index: {ignore_index}
        reduction: {reduction}
        num_items_in_batch: {num_items_in_batch}
        chunk_size: rows of logits formed at a time; default about ``N H / V`` rows (chunk
            logits the size of ``hidden``) within sane bounds, see
            :func:`properlm.options.default_chunk_size`.
        impl: ``None`` (Triton for bfloat16/float16 CUDA tensors, and float32 ones when
            ``torch.backends.cuda.matmul.allow_tf32`` is set, when ``triton`` is installed; the
            chunked PyTorch path otherwise), ``"torch"`` or ``"triton"`` to force one.
        softcap: {softcap} Applied to each chunk (tile, for Triton) of logits where it is formed.
        logit_scale: {logit_scale}
        smoothing_variant: {smoothing_variant}

    Returns:
        A float32 scalar, or float32 per-token losses of ``target``'s shape for ``"none"``.

    Raises:
        ValueError: an invalid option (:class:`~properlm.options.LossOptions`, ``chunk_size``, ``impl``), or
            inputs that cannot be scored (dtypes, devices, shapes, target ids outside ``[0, V)``).

    Memory: besides the float32 gradient accumulator of ``weight`` (``V x H``), a few
    ``chunk_size x V`` float32 tensors at a time.

    Under ``torch.compile`` (``fullgraph=True`` works) the loss is one opaque ``torch.library`` operator,
    ``torch.ops.properlm.fused_linear_loss`` (:mod:`properlm.fused.op`), that runs this same eager
    computation: with ``"mean"`` / ``"sum"`` the gradients are formed in the forward pass and no logits are
    recomputed in backward (``"none"``: as in eager mode, the backward recomputes them from kept per-token
    statistics); values and gradients equal eager mode's and an out-of-range target raises the eager
    ``ValueError``. A rule object that its spec does not name (:func:`properlm.fused.op.spec_names_rule`)
    falls back to the traceable chunked form of :mod:`properlm.compiled` (activation checkpointing; ``impl``
    unused; an out-of-range id gives a NaN loss).

    Example::

        >>> hidden = torch.randn(2, 16, 64, requires_grad=True)
        >>> lm_head = torch.nn.Linear(64, 1000, bias=False)
        >>> target = torch.randint(1000, (2, 16))
        >>> loss = properlm.fused_linear_scoring_rule_loss(hidden, lm_head.weight, target, rule="brier")
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
    # a warning names the caller
    return _fused_loss(hidden, weight, target, bias, options, num_items_in_batch, chunk_size, impl, stacklevel=4)


def _fused_loss(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    options: LossOptions,
    num_items_in_batch: int | Tensor | None,
    chunk_size: int | None,
    impl: str | None,
    stacklevel: int,
) -> Tensor:
    """:func:`fused_linear_scoring_rule_loss` under validated options.

    A warning names the code ``stacklevel`` frames up.
    """
    if is_dtensor(weight) or is_dtensor(hidden):  # vocabulary-sharded DTensor weight: properlm.dtensor
        return sharded_weight_loss(hidden, weight, target, bias, options, num_items_in_batch, chunk_size)
    _validate(hidden, weight, target, bias, options.ignore_index, chunk_size, impl)
    warn_paper_smoothing(options.rule, options.smoothing, options.smoothing_variant, weight.shape[0], stacklevel)
    check_num_items(options.reduction, num_items_in_batch)
    H = weight.shape[1]
    h2 = hidden.reshape(-1, H)
    y = target.reshape(-1)
    reduction = options.reduction
    if torch.compiler.is_compiling() and not spec_names_rule(options.rule):
        # a rule that its spec cannot name: traceable chunks with recomputed logits (properlm.compiled); the chunk
        # size from the static number of tokens (counting the valid ones would read the data)
        if chunk_size is None:
            chunk_size = default_chunk_size(max(y.numel(), 1), H, weight.shape[0], cuda=hidden.is_cuda)
        per_token = fused_token_losses(h2, weight, bias, y, options, chunk_size)
        out = reduce_loss(per_token, y != options.ignore_index, reduction, num_items_in_batch)
        return out.view(target.shape) if reduction == "none" else out
    if torch.compiler.is_compiling():
        # the eager computation as one opaque operator (properlm.fused.op): gradients formed in the forward pass
        out = fused_linear_loss(h2, weight, bias, y, options, num_items_in_batch, chunk_size, impl)
        return out.view(target.shape) if reduction == "none" else out
    backend = select_backend(impl, hidden, len(options.rule.scales(options.smoothing)))
    out = FusedLinearLossFunction.apply(h2, weight, bias, y, options, num_items_in_batch, chunk_size, backend)
    return out.view(target.shape) if reduction == "none" else out


@document_options
class LinearScoringRuleLoss(LossModule):
    """Module form of :func:`fused_linear_scoring_rule_loss`.

    The loss of an output layer given its hidden states, never forming the full logits.

    Args:
        rule: {rule}
        smoothing: {smoothing}
        ignore_index: {ignore_index}
        reduction: {reduction}
        chunk_size: as in :func:`fused_linear_scoring_rule_loss`.
        impl: as in :func:`fused_linear_scoring_rule_loss`.
        softcap: {softcap}
        logit_scale: {logit_scale}
        smoothing_variant: {smoothing_variant}

    Attributes:
        options: the validated :class:`~properlm.options.LossOptions`; each option is also a property that reads
            it and, when set, replaces ``options`` with a validated copy (:class:`~properlm.options.LossModule`).

    Shape: ``forward(hidden (..., H), weight (V, H), target (...), bias=None, num_items_in_batch=None)`` -> a
    scalar, or ``target``'s shape for ``reduction="none"``.

    Example::

        >>> criterion = properlm.LinearScoringRuleLoss("spherical", smoothing=0.1)
        >>> loss = criterion(hidden, model.lm_head.weight, labels)
    """

    def __init__(
        self,
        rule: RuleLike = "logarithmic",
        smoothing: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        chunk_size: int | None = None,
        impl: str | None = None,
        *,
        softcap: float | None = None,
        logit_scale: float | None = None,
        smoothing_variant: str = "paper",
    ) -> None:
        super().__init__(
            rule,
            smoothing,
            ignore_index,
            reduction,
            softcap=softcap,
            logit_scale=logit_scale,
            smoothing_variant=smoothing_variant,
        )
        _check_chunking(chunk_size, impl)
        self.chunk_size = chunk_size
        self.impl = impl

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        target: Tensor,
        bias: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
    ) -> Tensor:
        """The loss of ``hidden @ weight.T + bias`` for ``target``, as :func:`fused_linear_scoring_rule_loss`."""
        return _fused_loss(
            hidden, weight, target, bias, self.options, num_items_in_batch, self.chunk_size, self.impl, stacklevel=3
        )

    def extra_repr(self) -> str:
        """The settings, as shown in ``repr(module)``."""
        return options_repr(self.options, f", chunk_size={self.chunk_size}, impl={self.impl!r}")
