"""The fused linear + scoring-rule loss, token chunk by token chunk, in plain PyTorch.

For hidden states ``h`` (``(N, H)``), an output layer ``W`` (``(V, H)``, as stored by
``nn.Linear``) with optional bias ``b`` (``(V,)``) and targets ``y`` (``(N,)``), the loss of
token ``i`` is ``S_max - S_eps(softmax(z_i), y_i)`` with ``z_i = W h_i + b``. The full
``(N, V)`` logits are never formed: rows are processed ``chunk_size`` at a time, and for
each chunk

1. ``z = h_c W^T + b`` (float32, or float64 for float64 inputs; ``(chunk, V)``), soft-capped /
   scaled in place when ``softcap`` / ``logit_scale`` are given
   (:func:`~properlm.stats.head_transform_`; the statistics see the transformed logits),
2. the per-token statistics and their partial derivatives
   (:func:`~properlm.stats.compute_stats`, :func:`~properlm.stats.loss_and_partials`),
3. the closed-form logit gradient ``g = d loss / d z``
   (:func:`~properlm.stats.logits_grad`, reusing ``exp(z - m)`` from step 2), times the chain
   factor of the head transform (:func:`~properlm.stats.head_transform_factor`, elementwise, one
   block of rows at a time),
4. ``grad_h_c = g W``, ``grad_W += g^T h_c``, ``grad_b += sum_i g_i`` (float32 accumulators;
   on CUDA with bfloat16/float16 inputs the two matmuls run in the input dtype on the tensor
   cores, accumulating into float32),

after which the chunk is dropped. Ignored positions are removed before the matmul.

The per-chunk work is behind a small :class:`ChunkBackend` interface (statistics of a
chunk; its logit gradient) so that the Triton implementation
(:mod:`properlm.fused.triton_kernels`) shares this driver, its reductions and its
gradient accumulation.

Gradients: for ``reduction="mean"``/``"sum"`` they are computed during the forward pass
(as Liger-Kernel's fused linear cross-entropy does) and only scaled by the scalar
``grad_output`` in backward. For ``reduction="none"`` the per-token upstream gradient is
only known in backward, so the forward keeps the per-token statistics and partial
derivatives (a few numbers per token) and the backward recomputes each chunk's logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..options import LossOptions, compute_dtype, default_chunk_size, reduce_loss
from ..stats import TokenStats, compute_stats, head_transform_, head_transform_factor, logits_grad, loss_and_partials

__all__ = [
    "ChunkBackend",
    "FusedForward",
    "FusedLinearLossFunction",
    "TorchChunkBackend",
    "chunk_logits",
    "fused_linear_backward",
    "fused_linear_forward",
    "logit_grad_dtype",
    "tensor_core_inputs",
]


def tensor_core_inputs(h: Tensor) -> bool:
    """Whether matmuls of ``h`` run on a GPU's tensor cores.

    They do for bfloat16/float16 CUDA tensors, and for float32 ones while
    ``torch.backends.cuda.matmul.allow_tf32`` is set.
    """
    return h.is_cuda and (
        h.dtype in (torch.bfloat16, torch.float16)
        or (h.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32)
    )


def logit_grad_dtype(h: Tensor) -> torch.dtype:
    """The dtype of the logit gradient that the backward matmuls take.

    The input dtype for bfloat16/float16 CUDA tensors (tensor-core matmuls, as the unfused path's logit
    gradient), the compute dtype otherwise (float32 matmuls on the CPU are as fast and exact).
    """
    if h.is_cuda and h.dtype in (torch.bfloat16, torch.float16):
        return h.dtype
    return compute_dtype(h.dtype)


def chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor | None = None) -> Tensor:
    """``h W^T + b`` in the compute dtype (float32, float64 for float64 inputs).

    ``(n, H) x (V, H) -> (n, V)``, written into ``out`` when given.

    The matmul runs in the inputs' dtype (float32 accumulation inside), exactly as the
    unfused ``F.linear`` would, so that low-precision inputs give the same logits as the
    unfused path; only then is the result upcast.
    """
    cdt = compute_dtype(h.dtype)
    if h.dtype == cdt:
        if bias is None:
            return torch.mm(h, weight.t(), out=out)
        return torch.addmm(bias, h, weight.t(), out=out)
    z = torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())
    return z.to(cdt) if out is None else out.copy_(z)


class ChunkBackend(Protocol):
    """How the statistics and the logit gradient of one chunk of rows are computed."""

    def stats(
        self, h: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, options: LossOptions
    ) -> tuple[TokenStats, Any]:
        """Statistics of the logits ``z'' = head(h W^T + b)`` of ``n`` rows, and a cache.

        ``h``: ``(n, H)``, ``y``: ``(n,)``; ``head`` is the output-head transform
        :func:`~properlm.stats.head_transform_` of ``options.softcap`` / ``options.logit_scale``; the statistics
        are those ``options.rule`` needs with ``options.smoothing`` (``options.smoothing_variant`` ``"none"`` needs
        no masked-set statistics, :func:`~properlm.stats.masked_log_eps`). The cache is opaque, for
        :meth:`grad_logits` (may be ``None``)."""
        ...

    def grad_logits(
        self,
        h: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        y: Tensor,
        stats: TokenStats,
        partials: TokenStats,
        options: LossOptions,
        cache: Any,
    ) -> Tensor:
        """``d sum_i loss_i / d z`` as float32 ``(n, V)``.

        ``z = h W^T + b``, the chain factor of the head transform included; ``partials`` are already
        scaled by the upstream gradient. ``cache`` is what :meth:`stats` returned, or ``None`` (then everything is
        recomputed from ``h``)."""
        ...


class TorchChunkBackend:
    """Chunk statistics and gradient with PyTorch ops (any device).

    Memory traffic, not arithmetic, bounds the elementwise work, so on the CPU:

    * two ``chunk x V`` buffers are allocated at the first chunk and reused for every later
      one (the logits, then the gradient, in one; ``exp(z - m)`` in the other): a fresh
      allocation of this size per chunk costs page faults comparable to the arithmetic;
    * the elementwise statistics and the gradient run over blocks of rows of the chunk
      (``SUB_ELEMENTS`` elements, which stay in cache), with one reused block-sized buffer
      for the powers ``e^c``; the matmuls still see the whole chunk.

    On CUDA the whole chunk is one block. :meth:`release` frees the buffers.
    """

    name = "torch"

    #: elements of one block of rows for the elementwise work on the CPU
    SUB_ELEMENTS = 1 << 20

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def _buf(self, name: str, rows: int, like: Tensor, vocab_size: int) -> Tensor:
        cdt = compute_dtype(like.dtype)
        b = self._bufs.get(name)
        if b is None or b.shape[0] < rows or b.shape[1] != vocab_size or b.dtype != cdt or b.device != like.device:
            b = self._bufs[name] = torch.empty(rows, vocab_size, dtype=cdt, device=like.device)
        return b[:rows]

    def release(self) -> None:
        """Free the work buffers."""
        self._bufs.clear()

    def _blocks(self, n: int, vocab_size: int, like: Tensor) -> tuple[list[slice], Tensor | None]:
        """Row blocks of the elementwise work and a work buffer of one block (CPU only)."""
        if like.device.type != "cpu":
            return [slice(0, n)], None
        step = max(1, self.SUB_ELEMENTS // max(vocab_size, 1))
        work = self._buf("work", min(step, n), like, vocab_size)
        return [slice(r, min(r + step, n)) for r in range(0, n, step)], work

    def stats(
        self, h: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, options: LossOptions
    ) -> tuple[TokenStats, Any]:
        """See :meth:`ChunkBackend.stats`; the cache holds the transformed logits and ``exp(z - m)``."""
        rule, smoothing, softcap, logit_scale = options.rule, options.smoothing, options.softcap, options.logit_scale
        n, V = h.shape[0], weight.shape[0]
        z = chunk_logits(h, weight, bias, out=self._buf("z", n, h, V))
        ebuf = self._buf("e", n, h, V)
        parts, finites = [], []
        blocks, work = self._blocks(n, V, h)
        for sl in blocks:
            wk = None if work is None else work[: sl.stop - sl.start]
            head_transform_(z[sl], softcap, logit_scale)  # in place: the cache holds z''
            st, e, finite = compute_stats(
                z[sl], y[sl], rule, smoothing, out=ebuf[sl], work=wk, variant=options.smoothing_variant
            )
            if e.data_ptr() != ebuf[sl].data_ptr():  # with a masked-log term, e is a new tensor
                ebuf[sl].copy_(e)
            parts.append(st)
            finites.append(finite)
        return TokenStats.cat(parts), (z, ebuf, finites)

    def grad_logits(
        self,
        h: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        y: Tensor,
        stats: TokenStats,
        partials: TokenStats,
        options: LossOptions,
        cache: Any,
    ) -> Tensor:
        """See :meth:`ChunkBackend.grad_logits`."""
        softcap, logit_scale = options.softcap, options.logit_scale
        n, V = h.shape[0], weight.shape[0]
        blocks, work = self._blocks(n, V, h)
        if cache is None:
            z = chunk_logits(h, weight, bias, out=self._buf("z", n, h, V))
            e = self._buf("e", n, h, V)
            finites: list[Tensor | None] = [None] * len(blocks)  # logits_grad finds them if any
        else:
            z, e, finites = cache  # z holds the transformed logits z''
        # the chain factor of the soft-cap, one block at a time (a logit scale alone is a scalar)
        fbuf = self._buf("factor", blocks[0].stop - blocks[0].start, h, V) if softcap is not None else None
        for sl, finite in zip(blocks, finites):
            e_b = e[sl]
            if cache is None:
                head_transform_(z[sl], softcap, logit_scale)
                torch.sub(z[sl], stats.max_logit[sl, None], out=e_b).exp_()
            factor = head_transform_factor(
                z[sl], softcap, logit_scale, out=None if fbuf is None else fbuf[: sl.stop - sl.start]
            )
            # the gradient overwrites the logits (logits_grad allows out=z)
            wk = None if work is None else work[: sl.stop - sl.start]
            g = logits_grad(
                z[sl],
                y[sl],
                stats.index(sl),
                partials.index(sl),
                options.smoothing,
                options.rule,
                e=e_b,
                finite=finite,
                out=z[sl],
                work=wk,
            )
            if factor is not None:  # d/dz = d/dz'' * dz''/dz
                g.mul_(factor)
        return z


class _GradAccumulator:
    """Accumulators of ``grad_h`` (rows of the valid tokens), ``grad_W`` and ``grad_b``.

    In the compute dtype (float32; float64 for float64 inputs).
    """

    def __init__(
        self, num_rows: int, weight: Tensor, bias: Tensor | None, hidden_dtype: torch.dtype, need: tuple[bool, ...]
    ) -> None:
        self.weight = weight
        self.need_h, self.need_w, self.need_b = need[0], need[1], need[2] and bias is not None
        dev = weight.device
        V, H = weight.shape
        self.cdt = cdt = compute_dtype(weight.dtype)
        self.grad_h = torch.empty(num_rows, H, dtype=hidden_dtype, device=dev) if self.need_h else None
        self.grad_w = torch.zeros(V, H, dtype=cdt, device=dev) if self.need_w else None
        self.grad_b = torch.zeros(V, dtype=cdt, device=dev) if self.need_b else None

    def add(self, start: int, h: Tensor, g: Tensor) -> None:
        """Add the contribution of rows ``start : start + len(h)`` with logit gradient ``g``.

        On CUDA with bfloat16/float16 inputs both matmuls run on the tensor cores in the input
        dtype with float32 accumulation (``g`` rounded to the input dtype, as the unfused path's
        logit gradient is), and ``grad_W`` is accumulated over chunks in float32. Elsewhere
        ``g`` stays in the compute dtype (:func:`logit_grad_dtype`)."""
        gdt = logit_grad_dtype(h)
        if g.dtype != gdt:
            g = g.to(gdt)
        if self.grad_h is not None:
            out = self.grad_h[start : start + g.shape[0]]
            if self.weight.dtype == g.dtype:
                torch.mm(g, self.weight, out=out)
            else:
                out.copy_(torch.mm(g.to(self.weight.dtype), self.weight))
        if self.grad_w is not None:
            if g.dtype == self.cdt:
                self.grad_w.addmm_(g.t(), h if h.dtype == g.dtype else h.to(g.dtype))
            else:
                _addmm_float32_(self.grad_w, g.t(), h)
        if self.grad_b is not None:
            self.grad_b.add_(g.sum(0, dtype=self.cdt))

    def result(
        self, rows: Tensor | None, num_tokens: int, weight: Tensor, bias: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(grad_hidden (N, H), grad_weight, grad_bias)`` in the parameters' dtypes."""
        gh = self.grad_h
        if gh is not None and rows is not None:
            full = torch.zeros(num_tokens, gh.shape[1], dtype=gh.dtype, device=gh.device)
            gh = full.index_copy_(0, rows, gh)
        gw = None if self.grad_w is None else self.grad_w.to(weight.dtype)
        gb = None if self.grad_b is None or bias is None else self.grad_b.to(bias.dtype)
        return gh, gw, gb


def _addmm_float32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` for low-precision CUDA matrices ``a``, ``b`` and a float32 ``acc``, in place.

    One tensor-core matmul that reads and writes ``acc`` in float32 (``torch.addmm(...,
    out_dtype=torch.float32)``); where this torch lacks it, the product is formed in the inputs'
    dtype and added."""
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (TypeError, RuntimeError, NotImplementedError):
        acc.add_(torch.mm(a, b))


def _scaled(p: TokenStats, w: Tensor) -> TokenStats:
    return p.scaled(w)


def _release(backend: ChunkBackend) -> None:
    release = getattr(backend, "release", None)
    if release is not None:
        release()


@dataclass
class FusedForward:
    """What :func:`fused_linear_forward` returns.

    Attributes:
        out: the reduced float32 loss (``"mean"``, ``"sum"``), or the per-token losses ``(N,)`` (``"none"``,
            0 at ignored positions).
        grads: ``(grad_hidden, grad_weight, grad_bias)`` formed in the forward pass (a reduction and a gradient
            needed), each ``None`` where not needed; else ``None``.
        rows: indices of the scored rows, or ``None`` when every row is scored.
        chunk_size: the rows per chunk that were used (the default resolved).
        saved: for ``"none"`` with ``keep_stats``: ``(start, stats, partials)`` of each chunk, for
            :func:`fused_linear_backward`; else ``None``.
    """

    out: Tensor
    grads: tuple[Tensor | None, Tensor | None, Tensor | None] | None
    rows: Tensor | None
    chunk_size: int
    saved: list[tuple[int, TokenStats, TokenStats]] | None


def _scored_rows(hidden: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(hidden rows, targets, row indices)`` of the scored positions (indices ``None``: every row is scored)."""
    scored = (target != ignore_index).nonzero().squeeze(1)
    if scored.numel() == hidden.shape[0]:
        return hidden, target, None  # every row is scored: slice instead of gathering
    return hidden.index_select(0, scored), target.index_select(0, scored), scored


def fused_linear_forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    options: LossOptions,
    num_items_in_batch: Any,
    chunk_size: int | None,
    backend: ChunkBackend,
    need: tuple[bool, bool, bool],
) -> FusedForward:
    """The forward pass of the fused loss on 2-D inputs, chunk by chunk (the module docstring's steps 1 to 4).

    Shapes: ``hidden (N, H)``, ``weight (V, H)``, ``bias (V,)`` or ``None``, ``target (N,)``; inputs and
    ``options`` validated (:mod:`properlm.fused.loss`). ``need`` says which of ``(hidden, weight, bias)`` need a
    gradient.

    With ``options.reduction`` ``"mean"`` or ``"sum"`` and any gradient needed, the gradients of the *reduced*
    loss are formed here (``grad_out = 1``). With ``"none"`` the per-token upstream gradient is unknown: the
    per-token statistics and partial derivatives of each chunk (a few numbers per token) are kept for
    :func:`fused_linear_backward`.

    ``chunk_size`` ``None``: :func:`~properlm.options.default_chunk_size` of the number of scored tokens.
    """
    rule, smoothing, variant = options.rule, options.smoothing, options.smoothing_variant
    reduction = options.reduction
    n = hidden.shape[0]
    per_token = reduction == "none"
    need_grad = any(need)
    valid = target != options.ignore_index
    h_valid, y_valid, rows = _scored_rows(hidden, target, options.ignore_index)
    nv = h_valid.shape[0]
    if chunk_size is None:
        chunk_size = default_chunk_size(max(nv, 1), hidden.shape[1], weight.shape[0], cuda=hidden.is_cuda)
    dev = hidden.device
    cdt = compute_dtype(hidden.dtype)

    scale: Tensor | None = None
    acc: _GradAccumulator | None = None
    if need_grad and not per_token:
        # d(reduced loss)/d(loss_i): 1 for "sum", 1/denominator for "mean"
        scale = reduce_loss(torch.ones((), dtype=cdt, device=dev), valid, reduction, num_items_in_batch)
        acc = _GradAccumulator(nv, weight, bias, hidden.dtype, need)

    losses = torch.zeros(nv, dtype=cdt, device=dev)
    saved: list[tuple[int, TokenStats, TokenStats]] | None = [] if per_token and need_grad else None
    for start in range(0, nv, chunk_size):
        h_c = h_valid[start : start + chunk_size]
        y_c = y_valid[start : start + chunk_size]
        stats, cache = backend.stats(h_c, weight, bias, y_c, options)
        loss_c, partials = loss_and_partials(rule, stats, smoothing, need_grad, variant)
        losses[start : start + h_c.shape[0]] = loss_c
        if not need_grad:
            continue
        assert partials is not None
        if saved is not None:
            saved.append((start, stats, partials))
        else:
            assert acc is not None and scale is not None
            g = backend.grad_logits(h_c, weight, bias, y_c, stats, _scaled(partials, scale), options, cache)
            del cache
            acc.add(start, h_c, g)
            del g
    _release(backend)

    if per_token:
        out = losses if rows is None else torch.zeros(n, dtype=cdt, device=dev).index_copy_(0, rows, losses)
        return FusedForward(out, None, rows, chunk_size, saved)
    grads = None if acc is None else acc.result(rows, n, weight, bias)
    return FusedForward(reduce_loss(losses.sum(), valid, reduction, num_items_in_batch), grads, rows, chunk_size, None)


def fused_linear_backward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    grad_out: Tensor,
    options: LossOptions,
    backend: ChunkBackend,
    need: tuple[bool, bool, bool],
    rows: Tensor | None,
    saved: list[tuple[int, TokenStats, TokenStats]],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of ``sum_i grad_out_i loss_i`` (per-token losses, ``reduction="none"``).

    ``(grad_hidden (N, H), grad_weight (V, H), grad_bias (V,))`` in the parameters' dtypes, each ``None`` where
    ``need`` says so. ``grad_out``: ``(N,)`` (ignored positions get no gradient whatever it holds there).
    ``rows`` and ``saved`` are those of :func:`fused_linear_forward` (with the same ``options``): each chunk's
    logits are recomputed and its gradient formed from the kept statistics and partial derivatives (three
    matmul-sized passes: the logits, ``g W`` and ``g^T h``).
    """
    cdt = compute_dtype(hidden.dtype)
    nv = hidden.shape[0] if rows is None else rows.numel()
    acc = _GradAccumulator(nv, weight, bias, hidden.dtype, need)
    go = grad_out.to(cdt) if rows is None else grad_out.to(cdt).index_select(0, rows)
    for start, stats, partials in saved:
        stop = start + stats.z_y.shape[0]
        if rows is None:
            h_c, y_c = hidden[start:stop], target[start:stop]
        else:
            idx = rows[start:stop]
            h_c, y_c = hidden.index_select(0, idx), target.index_select(0, idx)
        g = backend.grad_logits(h_c, weight, bias, y_c, stats, _scaled(partials, go[start:stop]), options, None)
        acc.add(start, h_c, g)
        del g
    _release(backend)
    return acc.result(rows, hidden.shape[0], weight, bias)


class FusedLinearLossFunction(torch.autograd.Function):
    """Autograd function of the fused loss on 2-D inputs; see the module docstring.

    ``forward(hidden (N, H), weight (V, H), bias (V,) | None, target (N,), options, num_items_in_batch,
    chunk_size, backend)`` with validated :class:`~properlm.options.LossOptions` returns a float32 scalar
    (``"mean"``, ``"sum"``) or per-token losses ``(N,)`` (``"none"``, 0 at ignored positions). Inputs are assumed
    validated (see :mod:`properlm.fused.loss`); ``chunk_size`` ``None`` is
    :func:`~properlm.options.default_chunk_size` of the scored tokens. The work is :func:`fused_linear_forward`
    and :func:`fused_linear_backward`.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        target: Tensor,
        options: LossOptions,
        num_items_in_batch: Any,
        chunk_size: int | None,
        backend: ChunkBackend,
    ) -> Tensor:
        """The reduced loss (per-token losses for ``"none"``); with a reduction, also the gradients."""
        need = (bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]), bool(ctx.needs_input_grad[2]))
        res = fused_linear_forward(hidden, weight, bias, target, options, num_items_in_batch, chunk_size, backend, need)
        ctx.options, ctx.backend = options, backend
        ctx.per_token, ctx.need = options.reduction == "none", need
        ctx.grads = res.grads
        ctx.saved_chunks = res.saved
        if ctx.per_token and any(need):
            ctx.save_for_backward(hidden, weight, bias, target, res.rows)
        return res.out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        """The gradients of ``hidden``, ``weight`` and ``bias``, scaled by ``grad_out``."""
        tail = (None,) * 5  # target, options, num_items_in_batch, chunk_size, backend
        if not ctx.per_token:
            if ctx.grads is None:
                raise RuntimeError(
                    "the fused loss computes its gradients once, in the forward pass; "
                    "backward through it a second time is not supported (retain_graph)"
                )
            gh, gw, gb = ctx.grads
            ctx.grads = None  # hand the tensors over to autograd without another reference
            if not bool(torch.all(grad_out == 1)):
                # in place: these tensors were made by the forward pass and nothing else holds them
                for g in (gh, gw, gb):
                    if g is not None:
                        g.mul_(grad_out.to(g.dtype))
            return (gh, gw, gb, *tail)

        hidden, weight, bias, target, rows = ctx.saved_tensors
        saved = ctx.saved_chunks
        ctx.saved_chunks = None
        gh, gw, gb = fused_linear_backward(
            hidden, weight, bias, target, grad_out, ctx.options, ctx.backend, ctx.need, rows, saved
        )
        return (gh, gw, gb, *tail)
