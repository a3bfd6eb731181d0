"""The choice of the per-chunk implementation of the fused loss (:class:`~properlm.fused.chunked.ChunkBackend`).

* :func:`triton_is_available` -- whether the Triton kernels can be used at all;
* :func:`select_backend` -- the backend for an ``impl`` argument and the inputs (the automatic choice for ``None``).

Shared by the eager entry point (:mod:`properlm.fused.loss`) and the ``torch.library`` operator that
``torch.compile`` calls (:mod:`properlm.fused.op`), so that both run the same implementation.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from .chunked import ChunkBackend, TorchChunkBackend, tensor_core_inputs

__all__ = ["IMPLS", "select_backend", "triton_is_available"]

#: the values of ``impl`` besides ``None`` (automatic)
IMPLS = ("torch", "triton")


def triton_is_available() -> bool:
    """Whether the ``triton`` package can be imported (``pip install properlm[triton]``)."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def select_backend(impl: str | None, hidden: Tensor, num_scales: int) -> ChunkBackend:
    """The chunk backend for ``impl`` (``None``, ``"torch"`` or ``"triton"``) and the inputs.

    ``hidden``: the hidden states ``(N, H)``; ``num_scales``: the log-sum-exp scales the rule needs.
    ``None`` picks Triton for 2-byte CUDA tensors (and float32 ones when TF32 matmuls are allowed) when ``triton``
    is installed and the rule needs at most ``MAX_SCALES`` scales, the chunked torch path otherwise. Exact float32
    dots are slow in Triton: on an H100 the Triton path took 3.3x and the torch path 1.07x the time of materialised
    cross-entropy (benchmarks/README.md, "GPU").

    Raises:
        ValueError: ``impl="triton"`` where it cannot run (no ``triton``, CPU tensors outside the interpreter,
            float64, too many scales).
    """
    if impl == "torch":
        return TorchChunkBackend()
    if impl == "triton":
        if not triton_is_available():
            raise ValueError("impl='triton' needs the triton package: pip install 'properlm[triton]'")
        if not hidden.is_cuda and not _interpreting():
            raise ValueError(
                f"impl='triton' needs CUDA tensors (got device {hidden.device}); on the CPU it only runs "
                "under the Triton interpreter (TRITON_INTERPRET=1)"
            )
        from .triton_kernels import MAX_SCALES, TritonChunkBackend

        if hidden.dtype == torch.float64:
            raise ValueError("impl='triton' supports float32, bfloat16 and float16 inputs, not float64")
        if num_scales > MAX_SCALES:
            raise ValueError(f"impl='triton' supports rules needing at most {MAX_SCALES} scales, got {num_scales}")
        return TritonChunkBackend()
    if tensor_core_inputs(hidden) and triton_is_available():
        from .triton_kernels import MAX_SCALES, TritonChunkBackend

        if num_scales <= MAX_SCALES:
            return TritonChunkBackend()
    return TorchChunkBackend()
