"""Vocabulary-parallel scoring-rule losses: each rank holds one contiguous slice of the vocabulary.

Every rank of a process group holds the logits (or the output-layer weight rows) of its slice.

This is the tensor-parallel loss of Megatron-LM's ``vocab_parallel_cross_entropy`` and
torchtitan's loss parallelism, for every :class:`~properlm.rules.ScoringRule`. Rank ``r``
holds ``z[..., a_r : a_r + V_r]``; the shards tile ``[0, V)`` (uneven sizes, empty shards
and any rank order are allowed). The tokens (``target``, and ``hidden`` for the fused
variant) are replicated: every rank passes the same ones.

A rule is a function of a few statistics per token (:class:`~properlm.stats.TokenStats`),
and each of them is a sum over the vocabulary once the global maximum ``m`` is known, so
the ranks exchange a handful of numbers per token and never the logits:

    m        = max_r max_{j in r} z_j                               (all-reduce MAX)
    s_c      = sum_r sum_{j in r} exp(c (z_j - m))   for c in rule.scales(eps)
    V        = sum_r #{j in r : z_j > -inf}
    sum_z    = sum_r sum_{j in r, finite} (z_j - m)       (logarithmic smoothing only)
    z_y - m  = the owner's value, 0 elsewhere, summed          (one all-reduce SUM)
    lse[c]   = log s_c                       (= LSE(c z) - c m, the shifted statistic)
    M, sum_M (z - m), |M|  with M = {j : p_j < eps / V}    (bounded rules with smoothing:
                                              a second all-reduce SUM, after L_1 is known)

The loss and its partial derivatives come from :func:`properlm.stats.loss_and_partials`
on these statistics; the backward pass forms each rank's gradient of its own shard with
:func:`properlm.stats.logits_grad` from what the forward pass saved, without communication
(the fused variant all-reduces the gradient of the replicated ``hidden``).

All ranks must call these functions together (they are collectives) with the same
``target``, ``rule``, ``smoothing``, ``ignore_index``, ``reduction`` and ``chunk_size``;
a cheap check of this runs first and raises the same ``ValueError`` on every rank.

Modules, one job each:

* :mod:`~properlm.distributed.layout` -- :func:`vocab_shard`, where each rank's shard lies and the check that runs
  first (an all-gather of the shard sizes, starts, tokens and settings);
* :mod:`~properlm.distributed.shard_stats` -- the global statistics above from one shard, and the shard's gradient;
* :mod:`~properlm.distributed.unfused` -- :func:`vocab_parallel_scoring_rule_loss` of sharded logits;
* :mod:`~properlm.distributed.fused` -- :func:`fused_linear_vocab_parallel_scoring_rule_loss` of the hidden states
  and the output layer's rows of the shard, chunk by chunk.

Each loss validates its options once (:class:`properlm.options.LossOptions`) and passes them down. The rows per
chunk of both losses come from :func:`properlm.options.chunk_rows` (setting ``properlm.options.CHUNK_ELEMENTS``
changes them).
"""

from __future__ import annotations

from .fused import fused_linear_vocab_parallel_scoring_rule_loss
from .layout import ProcessGroup as ProcessGroup
from .layout import vocab_shard
from .unfused import vocab_parallel_scoring_rule_loss

__all__ = [
    "fused_linear_vocab_parallel_scoring_rule_loss",
    "vocab_parallel_scoring_rule_loss",
    "vocab_shard",
]
