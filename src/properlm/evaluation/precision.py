"""Mixed precision for evaluation: the model's matrix products in bfloat16, its output head in float32.

``properlm evaluate --bf16`` runs the teacher-forced pass and decoding under
:func:`mixed_precision`: ``torch.autocast`` casts the weights (kept in their dtype, float32) to
bfloat16 for every matrix product of the body, as mixed-precision training does, while the output
head runs outside autocast on a float32 copy of its input, so the logits -- and every score,
calibration bin and temperature computed from them -- are float32 products of float32 weights::

    h = body_bf16(x)            # autocast: matmuls in bfloat16, norms and softmax in float32
    z = W_out float32(h) (+ b)  # the head in float32 (its weights' dtype)

On CPUs with bfloat16 instructions (AVX512-BF16, AMX) this is several times faster than float32
(SmolLM2-135M, one thread of an AMD EPYC with AVX512-BF16: a forward pass 3.3x faster). On a CPU without
them bfloat16 matrix products are emulated and far slower than float32 (:data:`EMULATED_BF16_SLOWDOWN`):
:func:`slow_bf16_warning` says so before the work starts (``properlm train|evaluate|generate --bf16``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EMULATED_BF16_SLOWDOWN", "cpu_has_native_bf16", "mixed_precision", "slow_bf16_warning"]

#: bfloat16 time / float32 time of SmolLM2-135M's forward + backward of 2 x 256 tokens on a CPU without native
#: bfloat16 matrix products (AVX2; measured 110-117 s against 3.8-4.3 s, 97.6% of it in ``aten::mm``)
EMULATED_BF16_SLOWDOWN = 27


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX), as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: no fast bfloat16 path either
        return False


def slow_bf16_warning(device: Any, command: str = "properlm") -> str | None:
    """The warning for ``--bf16`` on a CPU without native bfloat16 matrix products, else ``None``.

    ``device``: a ``torch.device`` or its name; ``"auto"`` means CUDA when available. ``command`` names what would
    run in float32 without ``--bf16``.
    """
    name = device.type if isinstance(device, torch.device) else str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if not name.startswith("cpu") or cpu_has_native_bf16():
        return None
    return (
        f"--bf16 on this CPU ({torch.backends.cpu.get_cpu_capability()}, no native bfloat16 matrix multiply): "
        f"bfloat16 is emulated there, measured about {EMULATED_BF16_SLOWDOWN}x slower than float32 "
        f"(SmolLM2-135M forward + backward); drop --bf16 to run {command} in float32"
    )


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
    from .teacher_forced import find_output_head

    device_type = next(model.parameters()).device.type
    head = find_output_head(model)
    handles = []
    if head is not None:
        hook = _HeadOutsideAutocast(device_type, _head_weight_dtype(head))
        handles = [head.register_forward_pre_hook(hook.pre), head.register_forward_hook(hook.post, always_call=True)]
    try:
        with torch.autocast(device_type=device_type, dtype=dtype):
            yield
    finally:
        for h in handles:
            h.remove()
