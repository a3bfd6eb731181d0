"""Mixed precision for evaluation: the model's matrix products in bfloat16, its output head in float32.

``properlm evaluate --bf16`` runs the teacher-forced pass and decoding under
:func:`mixed_precision`: ``torch.autocast`` casts the weights (kept in their dtype, float32) to
bfloat16 for every matrix product of the body, as mixed-precision training does, while the output
head runs outside autocast on a float32 copy of its input, so the logits -- and every score,
calibration bin and temperature computed from them -- are float32 products of float32 weights::

    h = body_bf16(x)            # autocast: matmuls in bfloat16, norms and softmax in float32
    z = W_out float32(h) (+ b)  # the head in float32 (its weights' dtype)

On CPUs with bfloat16 instructions (AVX512-BF16, AMX) this is several times faster than float32
(SmolLM2-135M, one thread of an AMD EPYC with AVX512-BF16: a forward pass 3.3x faster).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["mixed_precision"]


class _HeadOutsideAutocast:
    """Forward pre-hook + forward hook pair: the head's call runs with autocast disabled.

    Its floating-point inputs are cast to the head's weight dtype.
    """

    def __init__(self, device_type: str, dtype: torch.dtype) -> None:
        self.device_type, self.dtype = device_type, dtype
        self.stack: list[Any] = []

    def pre(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        ctx = torch.autocast(device_type=self.device_type, enabled=False)
        ctx.__enter__()
        self.stack.append(ctx)
        return tuple(a.to(self.dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)

    def post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.stack:
            self.stack.pop().__exit__(None, None, None)


def _head_weight_dtype(head: nn.Module) -> torch.dtype:
    weight = getattr(head, "weight", None)
    return weight.dtype if isinstance(weight, Tensor) and weight.is_floating_point() else torch.float32


@contextlib.contextmanager
def mixed_precision(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> Iterator[None]:
    """Run ``model`` inside the block with its matrix products in ``dtype`` and its head in float32.

    ``torch.autocast(device, dtype)`` for the whole block (one context, so autocast's cache casts each
    weight once per block, not once per decoding step), and on the output embedding
    (``model.get_output_embeddings()``) hooks that leave autocast for its call and cast its input to
    its weight's dtype (float32 weights: float32 logits). A model without an output embedding runs
    entirely under autocast. Hooks are removed on exit.
    """
    from .teacher_forced import _output_head

    device_type = next(model.parameters()).device.type
    head = _output_head(model)
    handles = []
    if head is not None:
        hook = _HeadOutsideAutocast(device_type, _head_weight_dtype(head))
        handles = [head.register_forward_pre_hook(hook.pre),
                   head.register_forward_hook(hook.post, always_call=True)]
    try:
        with torch.autocast(device_type=device_type, dtype=dtype):
            yield
    finally:
        for h in handles:
            h.remove()
