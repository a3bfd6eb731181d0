r"""Traceable forms of the losses for ``torch.compile``.

No host synchronisation, no data-dependent shapes, gradients by autograd.

:func:`properlm.scoring_rule_loss` and :func:`properlm.fused_linear_scoring_rule_loss` run
their tuned eager implementations (``torch.autograd.Function`` s that gather the scored rows,
decide on the ``-inf`` path from the data and form the logit gradient in closed form). Those
read values on the host (``nonzero``, ``.item()``, ``bool(...)``), which breaks a graph. While
``torch.compiler.is_compiling()`` the public functions route here instead, to the same
statistics and the same score formula (:func:`properlm.stats.smoothed_score`, the one source
of truth), written as a differentiable function of the float32 logits:

* ignored positions are masked, not removed: ``y = where(valid, target, 0)``, the rows of
  ignored positions are replaced by zeros before anything reads them, and their loss is 0;
* the finite-logit mask ``finite = z != -inf`` is always formed (``V`` = its row count);
* ``d = z - m`` with ``m = max_j z_j`` *detached* (the scores are shift invariant, so holding
  ``m`` constant gives the exact gradient), ``LSE(c d) = log sum_j exp(c d_j)``;
* the masked set ``M = {j : p_j < eps / V}`` of the masked-log term is computed from detached
  values (it is a constant of the gradient, as in the eager path) and enters only through
  ``sum_M d`` and ``|M|``;
* the gradient is autograd's; the compiler fuses the elementwise work.

Values and gradients equal the eager paths to float32 rounding (the tests assert a relative
error of at most ``1e-5``, float64 at most ``1e-12``): the operations are the same up to the
order of the summations and ``exp(c d)`` in place of ``exp(d) ** c``.

The fused loss under compilation is normally not traced at all: it is the ``torch.library`` operator of
:mod:`properlm.fused.op`, which runs the eager computation (gradients formed in the forward pass). The
traceable fused form here (:func:`fused_token_losses`) is its fallback for a rule object that its spec string
does not name (which the operator cannot be given). It splits the tokens into chunks of a static size and
runs each chunk's ``h W^T + b`` and its loss under
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: only the inputs of a chunk are
kept for backward, and its logits are recomputed there (as Cut Cross-Entropy does), so memory
stays ``O(chunk_size x V)`` instead of ``O(N x V)``.

Output-head transforms: ``logit_scale`` ``s`` and ``softcap`` ``c`` turn the logits into
``z' = c tanh(s z / c)`` (each optional), in the compute dtype, before the statistics; entries of
``-inf`` stay ``-inf`` (masked vocabulary keeps probability 0).

Data checks: the argument, dtype and shape checks of the public functions are static and run
unchanged (a ``ValueError`` while tracing, with the same message). The check that targets lie in
``[0, V)`` (or equal ``ignore_index``) reads data, so it is *not* made under compilation: a
graph break or a host synchronisation would defeat the purpose, and an in-graph assertion
(``torch._assert_async``) aborts the process on the CPU and poisons the CUDA context on a GPU.
Instead such a target gets a per-token loss of NaN (so the reduced loss is NaN; the gradient of
the other tokens is unaffected and that token's is 0), never a silently wrong score. Run the
function once in eager mode to get the eager ``ValueError`` naming the bad id.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .options import LossOptions, compute_dtype
from .stats import TokenStats, masked_log_eps, masked_set, smoothed_score

__all__ = [
    "fused_token_losses",
    "token_losses",
    "transform_logits",
]


def transform_logits(z: Tensor, softcap: float | None = None, logit_scale: float | None = None) -> Tensor:
    """``softcap * tanh(logit_scale * z / softcap)``, elementwise and differentiable.

    Each step only when its argument is given; ``-inf`` entries stay ``-inf``.
    """
    if logit_scale is None and softcap is None:
        return z
    out = z
    if logit_scale is not None:
        out = out * logit_scale
    if softcap is not None:
        out = torch.where(z == -math.inf, z, softcap * torch.tanh(out / softcap))
    return out


def token_losses(logits: Tensor, target: Tensor, options: LossOptions) -> Tensor:
    """Per-token loss ``S_max - S_eps(softmax(z'), y)`` of 2-D logits, traceable.

    Args:
        logits: ``(n, V)``, any floating dtype (computed in float32, float64 stays float64).
        target: ``(n,)`` ids in ``[0, V)`` or ``options.ignore_index`` (not checked here).
        options: the validated :class:`~properlm.options.LossOptions` (rule, smoothing, smoothing variant,
            ``ignore_index``, output-head transform ``z' = c tanh(s z / c)``; ``options.reduction`` is not
            applied).

    Returns:
        ``(n,)`` in the compute dtype, 0 at ignored positions (which also get zero gradient).
    """
    rule, smoothing, ignore_index = options.rule, options.smoothing, options.ignore_index
    softcap, logit_scale, smoothing_variant = options.softcap, options.logit_scale, options.smoothing_variant
    cdt = compute_dtype(logits.dtype)
    valid = target != ignore_index
    # clamped so that an out-of-range id (a NaN loss, below) cannot index out of bounds
    y = torch.where(valid, target, 0).clamp(0, logits.shape[1] - 1)
    # rows of ignored positions are never read (as in eager, where they are not gathered)
    z = transform_logits(torch.where(valid[:, None], logits.to(cdt), 0.0), softcap, logit_scale)
    finite = z != -math.inf
    num_classes = finite.sum(-1, dtype=cdt)
    m = z.detach().amax(dim=-1)
    d = z - m[:, None]
    lse = {float(c): torch.log(torch.exp(d * c).sum(-1)) for c in rule.scales(smoothing)}
    sum_z = None
    if smoothing > 0 and rule.uses_logit_sum:
        sum_z = torch.where(finite, d, 0.0).sum(-1)
    z_y = d.gather(1, y[:, None]).squeeze(1)
    stats = TokenStats(z_y=z_y, lse=lse, num_classes=num_classes, max_logit=m, sum_z=sum_z)
    eps = masked_log_eps(rule, smoothing, smoothing_variant)
    if eps is not None:
        with torch.no_grad():
            mask = masked_set(torch.exp(d.detach()), lse[1.0].detach(), num_classes, eps, finite)
        stats.masked_sum_z = torch.where(mask, d, 0.0).sum(-1)
        stats.masked_count = mask.sum(-1, dtype=cdt)
    loss = rule.s_max - smoothed_score(rule, stats, smoothing, smoothing_variant)
    loss = torch.where(valid, loss, 0.0)
    # an id outside [0, V) that is not ignore_index: NaN, not a silently clamped score
    in_range = (target >= 0) & (target < logits.shape[1])
    return torch.where(in_range | ~valid, loss, math.nan)


def fused_token_losses(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, options: LossOptions, chunk_size: int
) -> Tensor:
    """Per-token loss of the logits ``hidden @ weight.T + bias``, ``chunk_size`` rows at a time, traceable.

    Each chunk's logits are recomputed in backward (activation checkpointing); each chunk's loss is
    :func:`token_losses` under ``options``.

    Shapes: ``hidden (N, H)``, ``weight (V, H)``, ``bias (V,)``, ``target (N,)`` -> ``(N,)`` in the
    compute dtype (0 at ignored positions). The chunks are static (``ceil(N / chunk_size)`` of
    them, unrolled into the graph), ignored rows are computed and masked.
    """
    n = hidden.shape[0]
    parts = []
    for start in range(0, n, chunk_size):
        h_c = hidden[start : start + chunk_size]
        y_c = target[start : start + chunk_size]
        parts.append(checkpoint(_chunk_losses, h_c, weight, bias, y_c, options, use_reentrant=False))
    if not parts:
        return hidden.new_zeros(0, dtype=compute_dtype(hidden.dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _chunk_losses(h: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, options: LossOptions) -> Tensor:
    # the matmul in the inputs' dtype, as F.linear in the unfused model (and chunk_logits) does
    z = torch.nn.functional.linear(h, weight, bias)
    return token_losses(z, y, options)
