"""The global per-token statistics of a sharded vocabulary, and each rank's gradient of its own shard.

A rule is a function of a few statistics per token (:class:`~properlm.stats.TokenStats`), and each is a sum over
the vocabulary once the global maximum ``m`` is known; :func:`shard_stats` computes them from this rank's shard with
two or three all-reduces over all tokens (the shifted statistics ``lse[c] = log s_c = LSE(c z) - c m``):

    m        = max_r max_{j in r} z_j                               (all-reduce MAX)
    s_c      = sum_r sum_{j in r} exp(c (z_j - m))   for c in rule.scales(eps)
    V        = sum_r #{j in r : z_j > -inf}
    sum_z    = sum_r sum_{j in r, finite} (z_j - m)       (logarithmic smoothing only)
    z_y - m  = the owner's value, 0 elsewhere, summed          (one all-reduce SUM)
    M, sum_M (z - m), |M|  with M = {j : p_j < eps / V}    (bounded rules with smoothing:
                                              a second all-reduce SUM, after L_1 is known)

:func:`shard_grad` forms the gradient of the shard from these statistics and the partial derivatives of the loss
(:func:`properlm.stats.logits_grad`), without communication.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..options import LossOptions
from ..stats import (
    TokenStats,
    head_transform_,
    head_transform_factor,
    logits_grad,
    masked_log_eps,
    masked_set,
    scale_power,
)
from .layout import ProcessGroup

__all__: list[str] = []


def all_reduce(t: Tensor, op: Any, group: ProcessGroup) -> Tensor:
    """``t`` all-reduced in place with ``op`` over ``group`` (``torch.distributed.all_reduce``); returns ``t``."""
    dist.all_reduce(t, op=op, group=group)
    return t


def _local_finite(z: Tensor) -> Tensor | None:
    """Mask of finite logits of a shard chunk, ``None`` when all are finite."""
    if z.shape[1] == 0 or not bool((z.amin(dim=-1) == -math.inf).any()):
        return None
    return z != -math.inf


def shard_stats(
    get_z: Callable[[int, int], Tensor],
    n: int,
    step: int,
    local_target: Tensor,
    owned: Tensor,
    options: LossOptions,
    group: ProcessGroup,
    local_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> TokenStats:
    """Global :class:`~properlm.stats.TokenStats` of ``n`` token rows from this rank's shard.

    ``get_z(a, b)`` returns the compute-dtype logits of rows ``[a, b)`` of the shard
    (``(b - a, V_local)``, after the output-head transform); they are visited in chunks of ``step`` rows, two or
    three times (max, sums, masked sums), with one all-reduce per visit over all ``n`` rows. ``local_target`` and
    ``owned`` are :func:`~properlm.distributed.layout.local_targets` of the rows' targets; the statistics are
    those ``options.rule`` needs with ``options.smoothing`` and ``options.smoothing_variant``.
    """
    rule, smoothing, variant = options.rule, options.smoothing, options.smoothing_variant
    chunks = [(a, min(a + step, n)) for a in range(0, n, step)] if local_size else []
    m = torch.full((n,), -math.inf, dtype=dtype, device=device)
    for a, b in chunks:
        m[a:b] = get_z(a, b).amax(dim=-1)
    all_reduce(m, dist.ReduceOp.MAX, group)

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
    all_reduce(buf, dist.ReduceOp.SUM, group)
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
        all_reduce(mbuf, dist.ReduceOp.SUM, group)
        stats.masked_sum_z, stats.masked_count = mbuf[0], mbuf[1]
    return stats


def shard_grad(
    z: Tensor, local_target: Tensor, owned: Tensor, stats: TokenStats, partials: TokenStats, options: LossOptions
) -> Tensor:
    """Gradient of ``sum_i loss_i`` with respect to the shard ``z``, from the global statistics.

    ``z`` (``(n, V_local)``) holds the logits before the head transform (a scratch tensor, overwritten);
    the ``z_y`` term enters only where this rank owns the target. ``partials`` are the partial derivatives of the
    loss (times the upstream gradient) under ``options``; the chain factor of its head transform is included.
    """
    softcap, logit_scale = options.softcap, options.logit_scale
    if z.shape[1] == 0:
        return torch.zeros_like(z)
    partials = replace(partials, z_y=torch.where(owned, partials.z_y, 0.0))
    head_transform_(z, softcap, logit_scale)
    factor = head_transform_factor(z, softcap, logit_scale)
    # pass ``finite`` explicitly: logits_grad infers it from num_classes < z.shape[1],
    # which compares the global count with the shard width
    g = logits_grad(z, local_target, stats, partials, options.smoothing, options.rule, finite=_local_finite(z))
    return g if factor is None else g.mul_(factor)
