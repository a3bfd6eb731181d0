"""Scoring-rule losses on PyTorch ``DTensor`` objects sharded over the vocabulary (tensor parallelism).

With PyTorch's own tensor-parallel engine (``torch.distributed.tensor.parallel``, as torchtitan
and ``transformers``' ``tp_plan`` use it) a column-parallel output layer,
``ColwiseParallel(use_local_output=False)`` on ``lm_head``, returns its logits as a ``DTensor``
with placement ``Shard(-1)``: every rank of the tensor-parallel mesh holds a contiguous slice of
the vocabulary. :func:`properlm.scoring_rule_loss` and
:func:`properlm.fused_linear_scoring_rule_loss` accept such tensors and call the functions here,
which take the local shard, the mesh's process group and the shard's offset from the ``DTensor``
and compute the loss with :func:`properlm.distributed.vocab_parallel_scoring_rule_loss`
(respectively :func:`~properlm.distributed.fused_linear_vocab_parallel_scoring_rule_loss` for a
weight of placement ``Shard(0)``): the ranks exchange a few statistics per token, never the logits.

Placements. The vocabulary dimension is sharded on exactly one mesh dimension; every other mesh
dimension must be ``Replicate()`` (a 1-D tensor-parallel mesh, or a sub-mesh of a larger one, is
the usual case). Shards follow ``DTensor``'s own layout (``torch.chunk``: uneven sizes allowed).
``target`` is a plain tensor, identical on the ranks of the vocabulary group, or a ``DTensor`` on
the same mesh (gathered with ``full_tensor()`` when sharded). For the fused loss ``hidden`` is a
plain tensor or a ``DTensor`` (redistributed to ``Replicate()``, e.g. from sequence-parallel
``Shard(1)``).

Results. The loss is a ``DTensor`` on the same mesh with every placement ``Replicate()`` (the same
value on every rank): a scalar, or ``target``'s shape for ``reduction="none"``. The gradient of the
logits (of the weight and bias) is a ``DTensor`` with their own placements; that of a replicated
``hidden`` is the full gradient on every rank.

This module imports ``torch.distributed.tensor`` only when a ``DTensor`` is passed
(:func:`is_dtensor` is a cheap check that does not import it).
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor

from .distributed.fused import fused_vocab_parallel_loss
from .distributed.unfused import vocab_parallel_loss
from .options import LossOptions

__all__ = [
    "is_dtensor",
    "sharded_logits_loss",
    "sharded_weight_loss",
]


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor``, without importing that module.

    No ``DTensor`` can exist before it is imported. Free of graph breaks under ``torch.compile``.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def _vocab_mesh_dim(t: Any, dim: int, name: str, expected: str) -> int:
    """The mesh dimension over which tensor dimension ``dim`` of the DTensor ``t`` is sharded.

    Every other mesh dimension must be ``Replicate()``; ``ValueError`` otherwise.
    """
    ndim = t.dim()
    shard_dims = []
    for i, p in enumerate(t.placements):
        if p.is_shard() and p.dim % ndim == dim % ndim:
            shard_dims.append(i)
        elif not p.is_replicate():
            shard_dims = []
            break
    if len(shard_dims) != 1:
        raise ValueError(
            f"{name} must be a DTensor sharded over the vocabulary, placements {expected} on one mesh dimension "
            f"and Replicate() on the others (as ColwiseParallel(use_local_output=False) on lm_head produces); "
            f"got placements {tuple(t.placements)} for shape {tuple(t.shape)}"
        )
    return shard_dims[0]


def _vocab_start(t: Any, dim: int) -> int:
    """Global index of this rank's first entry along dimension ``dim`` of the DTensor ``t``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return int(offset[dim % t.dim()])


def _replicated_local(x: Any, mesh: Any, name: str) -> Tensor:
    """``x`` itself when it is a plain tensor, or its full value (differentiable) when it is a DTensor.

    A DTensor must lie on ``mesh``.
    """
    if not is_dtensor(x):
        return x
    if x.device_mesh != mesh:
        raise ValueError(
            f"{name} is a DTensor on mesh {x.device_mesh}, but the vocabulary is sharded on mesh "
            f"{mesh}; pass both on the same mesh (or {name} as a plain tensor)"
        )
    from torch.distributed.tensor import Replicate

    if all(p.is_replicate() for p in x.placements):
        return x.to_local()
    return x.redistribute(mesh, [Replicate()] * mesh.ndim).to_local()


def _replicated_output(loss: Tensor, mesh: Any) -> Any:
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(loss, mesh, [Replicate()] * mesh.ndim, run_check=False)


def _plain_num_items(num_items_in_batch: Any) -> Any:
    return num_items_in_batch.full_tensor() if is_dtensor(num_items_in_batch) else num_items_in_batch


def sharded_logits_loss(
    logits: Any, target: Any, options: LossOptions, num_items_in_batch: int | Tensor | None = None
) -> Any:
    r"""The loss of ``DTensor`` logits ``(..., V)`` with placement ``Shard(-1)``: :func:`properlm.scoring_rule_loss`.

    :func:`properlm.scoring_rule_loss` calls it for ``DTensor`` logits (call that). It is
    :func:`properlm.distributed.vocab_parallel_scoring_rule_loss` of the local shard ``(..., V_local)`` over the
    process group of the sharded mesh dimension, with ``vocab_start`` the shard's global offset.

    Args:
        logits: a ``DTensor`` ``(..., V)`` with placement ``Shard(-1)`` on one mesh dimension, ``Replicate()`` on
            the others.
        target: ``(...)`` token ids: a plain tensor identical on the ranks, or a ``DTensor`` on the same mesh.
        options: the validated loss options.
        num_items_in_batch: as in :func:`properlm.scoring_rule_loss` (a ``DTensor`` is gathered).

    Returns:
        A ``DTensor`` with placements ``Replicate()``: a scalar, or ``target``'s shape for ``reduction="none"``;
        ``logits.grad`` is a ``DTensor`` with the placements of ``logits``.

    A collective: every rank of the mesh calls it, with the same ``target`` and settings.
    """
    if not is_dtensor(logits):
        raise ValueError(f"logits must be a DTensor sharded over the vocabulary, got {type(logits).__name__}")
    if logits.dim() < 1:
        raise ValueError("logits must have at least one dimension (the vocabulary), got a scalar")
    mesh = logits.device_mesh
    mesh_dim = _vocab_mesh_dim(logits, -1, "logits", "Shard(-1)")
    y = _replicated_local(target, mesh, "target")
    loss = vocab_parallel_loss(
        logits.to_local(),
        y,
        options,
        _plain_num_items(num_items_in_batch),
        group=mesh.get_group(mesh_dim),
        vocab_start=_vocab_start(logits, -1),
    )
    return _replicated_output(loss, mesh)


def sharded_weight_loss(
    hidden: Any,
    weight: Any,
    target: Any,
    bias: Any,
    options: LossOptions,
    num_items_in_batch: int | Tensor | None = None,
    chunk_size: int | None = None,
) -> Any:
    r"""The loss of ``hidden @ weight.T + bias`` for a ``DTensor`` ``weight`` ``(V, H)`` with placement ``Shard(0)``.

    :func:`properlm.fused_linear_scoring_rule_loss` calls it for a ``DTensor`` weight or hidden (call that). It is
    :func:`properlm.distributed.fused_linear_vocab_parallel_scoring_rule_loss` of the local rows over the process
    group of the sharded mesh dimension.

    Args:
        hidden: ``(..., H)``: a plain tensor identical on the ranks of the vocabulary group, or a ``DTensor`` on the
            same mesh (redistributed to ``Replicate()``).
        weight: a ``DTensor`` ``(V, H)`` with placement ``Shard(0)`` (a ``ColwiseParallel`` ``lm_head``).
        target: ``(...)`` token ids: a plain tensor identical on the ranks, or a ``DTensor`` on the same mesh.
        bias: ``None`` or a ``DTensor`` ``(V,)`` sharded like ``weight``.
        options: the validated loss options.
        num_items_in_batch: as in :func:`properlm.fused_linear_scoring_rule_loss`.
        chunk_size: tokens per chunk, as in
            :func:`properlm.distributed.fused_linear_vocab_parallel_scoring_rule_loss`.

    Returns:
        A replicated ``DTensor`` as :func:`sharded_logits_loss`; ``weight.grad`` and ``bias.grad`` keep their
        placements, ``hidden`` gets the full gradient. A collective.
    """
    if not is_dtensor(weight):
        raise ValueError(
            f"weight must be a DTensor sharded over the vocabulary (Shard(0)) when hidden is a DTensor, got "
            f"{type(weight).__name__}; use a ColwiseParallel lm_head, or pass plain tensors"
        )
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D DTensor of shape (V, H), got shape {tuple(weight.shape)}")
    mesh = weight.device_mesh
    mesh_dim = _vocab_mesh_dim(weight, 0, "weight", "Shard(0)")
    start = _vocab_start(weight, 0)
    local_bias = None
    if bias is not None:
        if not is_dtensor(bias) or bias.device_mesh != mesh or bias.dim() != 1:
            raise ValueError("bias must be None or a 1-D DTensor on the mesh of weight, sharded like it (Shard(0))")
        if _vocab_mesh_dim(bias, 0, "bias", "Shard(0)") != mesh_dim or _vocab_start(bias, 0) != start:
            raise ValueError(
                f"bias must be sharded like weight, got placements {tuple(bias.placements)} "
                f"for weight placements {tuple(weight.placements)}"
            )
        local_bias = bias.to_local()
    h = _replicated_local(hidden, mesh, "hidden")
    y = _replicated_local(target, mesh, "target")
    loss = fused_vocab_parallel_loss(
        h,
        weight.to_local(),
        y,
        local_bias,
        options,
        _plain_num_items(num_items_in_batch),
        group=mesh.get_group(mesh_dim),
        vocab_start=start,
        chunk_size=chunk_size,
    )
    return _replicated_output(loss, mesh)
