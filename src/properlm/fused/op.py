r"""The fused linear + scoring-rule loss as a ``torch.library`` custom operator, for ``torch.compile``.

Under ``torch.compile`` :func:`properlm.fused_linear_scoring_rule_loss` calls :func:`fused_linear_loss`, which
calls the operator ``torch.ops.properlm.fused_linear_loss``. The compiler does not trace into it: it is one opaque
node of the graph whose Python implementation is the eager chunked computation
(:func:`properlm.fused.chunked.fused_linear_forward`, the one source of truth; the Triton kernels on CUDA where
eager mode would pick them). So the compiled loss does exactly the eager path's work:

* ``reduction="mean"`` / ``"sum"``: the gradients of ``hidden``, ``weight`` and ``bias`` are formed in the forward
  pass (three matmul-sized passes: the chunk's logits, ``g W`` and ``g^T h``) and returned as further outputs of
  the operator; only they are kept for backward, whose whole work is to multiply them by the scalar upstream
  gradient. No logits are recomputed, and nothing of size ``N x V`` is kept.
* ``reduction="none"``: the per-token upstream gradient is only known in backward, so -- as in eager mode -- the
  forward pass keeps the per-token statistics and their partial derivatives (a fifth output, ``(F, N)`` with ``F``
  a handful of rows fixed by the rule and the smoothing) and the backward operator
  ``torch.ops.properlm.fused_linear_loss_backward`` (:func:`properlm.fused.chunked.fused_linear_backward`)
  recomputes each chunk's logits and forms its gradient from them; only the inputs and those statistics are kept.

Both operators read data on the host (the scored rows, the default chunk size from their number, the check that
targets lie in ``[0, V)``), which is allowed inside an operator: the compiled graph has no break and an
out-of-range target raises the eager ``ValueError``.

**The operator's arguments.** A custom operator takes tensors, numbers, strings and lists of them only. So the
options are passed as

==================  ===========  =========================================================================
argument            type         meaning
==================  ===========  =========================================================================
``rule``            ``str``      the rule's spec (:attr:`properlm.rules.ScoringRule.spec`), parsed back by
                                 :func:`properlm.get_rule` (cached); mixtures and parameterised rules too
``num_items``       ``float?``   an integer ``num_items_in_batch`` (a tensor goes as ``num_items_tensor``)
``chunk_size``      ``int``      rows per chunk, ``0`` for the eager default (from the scored tokens)
``impl``            ``str``      ``""`` (automatic), ``"torch"`` or ``"triton"``
``softcap``,        ``float?``   the output-head transform
``logit_scale``
``need``            ``bool[3]``  which of ``hidden``, ``weight``, ``bias`` need a gradient (known when tracing)
==================  ===========  =========================================================================

and ``smoothing``, ``ignore_index``, ``reduction``, ``smoothing_variant`` as they are. A rule object whose spec
does not turn back into the same rule (an unregistered subclass, a spec that does not parse) cannot be named by a
string; :func:`spec_names_rule` says which can (a rule is taken to be determined by its class and spec, as
``ScoringRule.__eq__`` takes it), and for the others the compiled loss falls back to
the traceable form of :mod:`properlm.compiled` (chunks under activation checkpointing, logits recomputed in
backward).

The operator returns ``(loss, grad_hidden, grad_weight, grad_bias, stats)``: the loss (float32 scalar, or
``(N,)`` per-token losses for ``"none"``), the gradients formed in the forward pass and the kept statistics of
``"none"`` (an empty tensor where there are none). Its autograd formula (``register_autograd``) and its fake
implementation (``register_fake``, the shapes and dtypes for tracing) are registered here. A second backward
(``create_graph``) is not supported.
"""

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..options import LossOptions, compute_dtype, default_chunk_size, validate_inputs
from ..rules import Mixture, ScoringRule, get_rule
from ..stats import TokenStats, masked_log_eps
from .backends import select_backend
from .chunked import fused_linear_backward, fused_linear_forward

__all__ = ["fused_linear_loss", "spec_names_rule"]


@functools.lru_cache(maxsize=256)
def _rule(spec: str) -> ScoringRule:
    return get_rule(spec)


@functools.lru_cache(maxsize=256)
def _options(
    rule: str,
    smoothing: float,
    ignore_index: int,
    reduction: str,
    softcap: float | None,
    logit_scale: float | None,
    smoothing_variant: str,
) -> LossOptions:
    """The :class:`~properlm.options.LossOptions` that the operator's option arguments spell (cached)."""
    return LossOptions(
        _rule(rule),
        smoothing,
        ignore_index,
        reduction,
        softcap=softcap,
        logit_scale=logit_scale,
        smoothing_variant=smoothing_variant,
    )


def _same_rule(a: ScoringRule, b: ScoringRule) -> bool:
    if type(a) is not type(b) or a.spec != b.spec:
        return False
    if isinstance(a, Mixture) and isinstance(b, Mixture):
        return len(a.components) == len(b.components) and all(
            wa == wb and _same_rule(ra, rb) for (wa, ra), (wb, rb) in zip(a.components, b.components)
        )
    return True


def spec_names_rule(rule: ScoringRule) -> bool:
    """Whether ``get_rule(rule.spec)`` rebuilds ``rule``: same class (components, for a mixture) and spec.

    Then the rule can be passed to the operator by its spec. ``False`` for an unregistered subclass or a rule
    whose spec does not parse.
    """
    try:
        return _same_rule(get_rule(rule.spec), rule)
    except ValueError:
        return False


@contextlib.contextmanager
def _eager_autograd() -> Iterator[None]:
    """The dispatch state of an eager ``autograd.Function.forward`` inside the operator's implementation.

    The dispatcher calls an operator's implementation below autograd (the autograd keys excluded; under a
    compiled graph functorch as well), where ``torch.autograd.grad`` cannot work; the per-token partial
    derivatives of the score (:func:`properlm.stats.loss_and_partials`) are taken by autograd. So the autograd
    keys are put back (a private guard of ``torch._C``; no public API does this) and grad mode is off, as in the
    eager ``FusedLinearLossFunction.forward``.
    """
    keys = torch._C.DispatchKey
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradCPU, keys.AutogradOther, keys.AutogradNestedTensor, keys.ADInplaceOrView):
        excluded = excluded.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded), torch.no_grad():
        yield


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _need(need: list[bool]) -> tuple[bool, bool, bool]:
    return bool(need[0]), bool(need[1]), bool(need[2])


def _layout(rule: ScoringRule, smoothing: float, variant: str) -> tuple[tuple[float, ...], bool, bool]:
    """``(scales, has sum_z, has the masked-set statistics)`` of the statistics of ``rule``."""
    return (
        rule.scales(smoothing),
        smoothing > 0 and rule.uses_logit_sum,
        masked_log_eps(rule, smoothing, variant) is not None,
    )


def _num_stat_rows(rule: ScoringRule, smoothing: float, variant: str) -> int:
    """Rows of the packed statistics and partial derivatives (:func:`_pack`)."""
    scales, has_sum, has_mask = _layout(rule, smoothing, variant)
    return 2 * (1 + len(scales)) + 2 + 2 * has_sum + 3 * has_mask


def _present(x: Tensor | None) -> Tensor:
    if x is None:
        raise RuntimeError("properlm internal error: a statistic of the fused loss is missing")
    return x


def _pack(
    saved: list[tuple[int, TokenStats, TokenStats]],
    rows: Tensor | None,
    n: int,
    rule: ScoringRule,
    smoothing: float,
    variant: str,
    like: Tensor,
) -> Tensor:
    """The per-token statistics and partial derivatives kept by the forward pass of ``reduction="none"``.

    One ``(F, n)`` tensor (``F = _num_stat_rows``; columns of ignored positions 0): ``z_y``, ``lse[c]`` for each
    scale, ``num_classes``, ``max_logit``, [``sum_z``], [``masked_sum_z``, ``masked_count``], then the partial
    derivatives of ``z_y``, ``lse[c]``, [``sum_z``], [``masked_sum_z``].
    """
    scales, has_sum, has_mask = _layout(rule, smoothing, variant)
    cdt = compute_dtype(like.dtype)
    out = torch.zeros(_num_stat_rows(rule, smoothing, variant), n, dtype=cdt, device=like.device)
    if not saved:
        return out
    st = TokenStats.cat([x[1] for x in saved])
    pa = TokenStats.cat([x[2] for x in saved])
    cols = [st.z_y, *(st.lse[c] for c in scales), st.num_classes, st.max_logit]
    cols += [_present(st.sum_z)] if has_sum else []
    cols += [_present(st.masked_sum_z), _present(st.masked_count)] if has_mask else []
    cols += [pa.z_y, *(pa.lse[c] for c in scales)]
    cols += [_present(pa.sum_z)] if has_sum else []
    cols += [_present(pa.masked_sum_z)] if has_mask else []
    packed = torch.stack([c.to(cdt) for c in cols])
    return packed if rows is None else out.index_copy_(1, rows, packed)


def _unpack(
    packed: Tensor, rows: Tensor | None, chunk_size: int, rule: ScoringRule, smoothing: float, variant: str
) -> list[tuple[int, TokenStats, TokenStats]]:
    """The ``saved`` chunks of :func:`properlm.fused.chunked.fused_linear_backward` from :func:`_pack`'s tensor."""
    scales, has_sum, has_mask = _layout(rule, smoothing, variant)
    p = packed if rows is None else packed.index_select(1, rows)
    it = iter(p.unbind(0))
    st = TokenStats(z_y=next(it), lse={c: next(it) for c in scales}, num_classes=next(it), max_logit=next(it))
    st.sum_z = next(it) if has_sum else None
    if has_mask:
        st.masked_sum_z, st.masked_count = next(it), next(it)
    pa = TokenStats(
        z_y=next(it),
        lse={c: next(it) for c in scales},
        num_classes=st.num_classes,
        max_logit=st.max_logit,
        masked_count=st.masked_count,
    )
    pa.sum_z = next(it) if has_sum else None
    pa.masked_sum_z = next(it) if has_mask else None
    nv = p.shape[1]
    return [
        (start, st.index(slice(start, start + chunk_size)), pa.index(slice(start, start + chunk_size)))
        for start in range(0, nv, chunk_size)
    ]


def _scored(target: Tensor, ignore_index: int) -> Tensor | None:
    rows = (target != ignore_index).nonzero().squeeze(1)
    return None if rows.numel() == target.shape[0] else rows


#: the operators synchronise with the host (the scored rows, the target check): no CUDA graph may capture them
_TAGS: dict[str, Any] = {"tags": (torch.Tag.cudagraph_unsafe,)} if hasattr(torch.Tag, "cudagraph_unsafe") else {}


@torch.library.custom_op("properlm::fused_linear_loss", mutates_args=(), **_TAGS)
def _fused_linear_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    num_items_tensor: Tensor | None,
    rule: str,
    smoothing: float,
    ignore_index: int,
    reduction: str,
    num_items: float | None,
    chunk_size: int,
    impl: str,
    softcap: float | None,
    logit_scale: float | None,
    smoothing_variant: str,
    need: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    options = _options(rule, smoothing, ignore_index, reduction, softcap, logit_scale, smoothing_variant)
    validate_inputs(
        (hidden.shape[0], weight.shape[0]), hidden.dtype, target, ignore_index, what="logits (hidden @ weight.T)"
    )
    backend = select_backend(impl or None, hidden, len(options.rule.scales(smoothing)))
    n_items: Any = num_items_tensor if num_items_tensor is not None else num_items
    with _eager_autograd():
        res = fused_linear_forward(
            hidden, weight, bias, target, options, n_items, chunk_size or None, backend, _need(need)
        )
    gh, gw, gb = res.grads if res.grads is not None else (None, None, None)
    stats = (
        _empty(res.out)
        if res.saved is None
        else _pack(res.saved, res.rows, hidden.shape[0], options.rule, smoothing, smoothing_variant, hidden)
    )
    return (
        res.out,
        _empty(hidden) if gh is None else gh,
        _empty(weight) if gw is None else gw,
        _empty(weight) if gb is None else gb,
        stats,
    )


@_fused_linear_loss.register_fake
def _(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    num_items_tensor: Tensor | None,
    rule: str,
    smoothing: float,
    ignore_index: int,
    reduction: str,
    num_items: float | None,
    chunk_size: int,
    impl: str,
    softcap: float | None,
    logit_scale: float | None,
    smoothing_variant: str,
    need: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    cdt = compute_dtype(hidden.dtype)
    n = hidden.shape[0]
    per_token = reduction == "none"
    loss = hidden.new_empty((n,) if per_token else (), dtype=cdt)
    nh, nw, nb = _need(need) if not per_token else (False, False, False)
    rows = _num_stat_rows(_rule(rule), smoothing, smoothing_variant)
    stats = hidden.new_empty((rows, n) if per_token and any(need) else (0,), dtype=cdt)
    return (
        loss,
        hidden.new_empty(hidden.shape) if nh else _empty(hidden),
        weight.new_empty(weight.shape) if nw else _empty(weight),
        bias.new_empty(bias.shape) if nb and bias is not None else _empty(weight),
        stats,
    )


@torch.library.custom_op("properlm::fused_linear_loss_backward", mutates_args=(), **_TAGS)
def _fused_linear_loss_backward(
    grad_out: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    stats: Tensor,
    rule: str,
    smoothing: float,
    ignore_index: int,
    chunk_size: int,
    impl: str,
    softcap: float | None,
    logit_scale: float | None,
    smoothing_variant: str,
    need: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    # the reduction is "none" (only then is there a backward operator)
    options = _options(rule, smoothing, ignore_index, "none", softcap, logit_scale, smoothing_variant)
    backend = select_backend(impl or None, hidden, len(options.rule.scales(smoothing)))
    rows = _scored(target, ignore_index)
    nv = target.shape[0] if rows is None else rows.numel()
    chunk = chunk_size or default_chunk_size(max(nv, 1), hidden.shape[1], weight.shape[0], cuda=hidden.is_cuda)
    saved = _unpack(stats, rows, chunk, options.rule, smoothing, smoothing_variant)
    with _eager_autograd():
        gh, gw, gb = fused_linear_backward(
            hidden, weight, bias, target, grad_out, options, backend, _need(need), rows, saved
        )
    return (
        _empty(hidden) if gh is None else gh,
        _empty(weight) if gw is None else gw,
        _empty(weight) if gb is None else gb,
    )


@_fused_linear_loss_backward.register_fake
def _(
    grad_out: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    stats: Tensor,
    rule: str,
    smoothing: float,
    ignore_index: int,
    chunk_size: int,
    impl: str,
    softcap: float | None,
    logit_scale: float | None,
    smoothing_variant: str,
    need: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    nh, nw, nb = _need(need)
    return (
        hidden.new_empty(hidden.shape) if nh else _empty(hidden),
        weight.new_empty(weight.shape) if nw else _empty(weight),
        bias.new_empty(bias.shape) if nb and bias is not None else _empty(weight),
    )


#: positions of the options after the tensors in the operator's arguments
_OPTIONS = (
    "rule",
    "smoothing",
    "ignore_index",
    "reduction",
    "num_items",
    "chunk_size",
    "impl",
    "softcap",
    "logit_scale",
    "smoothing_variant",
    "need",
)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    hidden, weight, bias, target, _num_items_tensor, *options = inputs
    ctx.options = dict(zip(_OPTIONS, options))
    ctx.mark_non_differentiable(*output[1:])
    if ctx.options["reduction"] == "none":  # the inputs and the per-token statistics
        ctx.save_for_backward(hidden, weight, bias, target, output[4])
    else:  # the gradients formed in the forward pass, and nothing else
        ctx.save_for_backward(*output[1:4])


def _backward(ctx: Any, grad_loss: Tensor, *_unused: Tensor) -> tuple[Tensor | None, ...]:
    o = ctx.options
    need = _need(o["need"])
    if o["reduction"] == "none":
        hidden, weight, bias, target, stats = ctx.saved_tensors
        grads = torch.ops.properlm.fused_linear_loss_backward(
            grad_loss,
            hidden,
            weight,
            bias,
            target,
            stats,
            o["rule"],
            o["smoothing"],
            o["ignore_index"],
            o["chunk_size"],
            o["impl"],
            o["softcap"],
            o["logit_scale"],
            o["smoothing_variant"],
            list(need),
        )
    else:
        grads = tuple(g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
    gh, gw, gb = (g if k else None for g, k in zip(grads, need))
    return (gh, gw, gb) + (None,) * (2 + len(_OPTIONS))


_fused_linear_loss.register_autograd(_backward, setup_context=_setup_context)


def fused_linear_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    options: LossOptions,
    num_items_in_batch: int | Tensor | None = None,
    chunk_size: int | None = None,
    impl: str | None = None,
) -> Tensor:
    r"""The fused loss of 2-D validated inputs through the operator ``torch.ops.properlm.fused_linear_loss``.

    Equal in value and gradients to the eager :class:`~properlm.fused.chunked.FusedLinearLossFunction` (it runs
    the same code); traceable by ``torch.compile`` as one opaque node, with no graph break. ``options`` are
    passed as the operator's arguments (the table above) and rebuilt inside it.

    Args:
        hidden: ``(N, H)``.
        weight: ``(V, H)``.
        bias: ``(V,)`` or ``None``.
        target: ``(N,)`` ids in ``[0, V)`` or ``options.ignore_index`` (checked when the operator runs).
        options: validated :class:`~properlm.options.LossOptions` whose rule :func:`spec_names_rule` names.
        num_items_in_batch: ``None``, a positive int or a tensor (the ``"mean"`` denominator).
        chunk_size: rows per chunk, ``None`` for the eager default (from the number of scored tokens).
        impl: ``None``, ``"torch"`` or ``"triton"``.

    See :func:`properlm.fused_linear_scoring_rule_loss` for the options.

    Returns:
        The float32 (float64 for float64 inputs) scalar loss, or ``(N,)`` per-token losses for ``"none"``.
    """
    grad = torch.is_grad_enabled()
    need = [
        grad and hidden.requires_grad,
        grad and weight.requires_grad,
        grad and bias is not None and bias.requires_grad,
    ]
    tensor_items = num_items_in_batch if isinstance(num_items_in_batch, Tensor) else None
    float_items = None if num_items_in_batch is None or tensor_items is not None else float(num_items_in_batch)
    out = torch.ops.properlm.fused_linear_loss(
        hidden,
        weight,
        bias,
        target,
        tensor_items,
        options.rule.spec,
        float(options.smoothing),
        int(options.ignore_index),
        options.reduction,
        float_items,
        chunk_size or 0,
        impl or "",
        options.softcap,
        options.logit_scale,
        options.smoothing_variant,
        need,
    )
    return out[0]
