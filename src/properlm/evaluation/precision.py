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
them oneDNN emulates bfloat16 matrix products far slower than float32 (:data:`EMULATED_BF16_SLOWDOWN`), so
there :func:`bf16_matmuls_in_float32` computes each one in float32 from its bfloat16 operands instead::

    C = bf16(float32(A) @ float32(B))   # A, B bfloat16: every product a_ik * b_kj is exact in float32

which is what the bfloat16 instructions compute too (exact products, float32 sums, one rounding of the
result): the same numbers up to the order of the float32 sums (measured: 1 element in 10^3 - 10^4 one bfloat16
unit apart), at about float32 speed. The CPU flash-attention kernel runs in float32 on its bfloat16 inputs too:
its output is within one bfloat16 unit of the bfloat16 kernel's (measured: a third to a half of the elements one
unit apart, as that kernel rounds inside), the same precision. :func:`bf16_autocast_matmuls` picks it where
the CPU needs it; ``properlm train|evaluate|generate --bf16`` use it and say so (:func:`emulated_bf16_warning`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

__all__ = [
    "BF16_MATMUL_OPS",
    "EMULATED_BF16_SLOWDOWN",
    "bf16_autocast_matmuls",
    "bf16_matmul_mode",
    "bf16_matmuls_in_float32",
    "cpu_has_native_bf16",
    "emulated_bf16_warning",
    "mixed_precision",
]

#: bfloat16 time / float32 time of SmolLM2-135M's forward + backward of 2 x 256 tokens on a CPU without native
#: bfloat16 matrix products (AVX2; measured 110-117 s against 3.8-4.3 s, 97.6% of it in ``aten::mm``)
EMULATED_BF16_SLOWDOWN = 27


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX), as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: no fast bfloat16 path either
        return False


def _is_cpu(device: Any) -> bool:
    name = device.type if isinstance(device, torch.device) else str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return name.startswith("cpu")


def bf16_matmul_mode(device: Any) -> str:
    """How ``--bf16`` computes bfloat16 matrix products on ``device``: ``"native"`` or ``"float32"``.

    ``"native"`` on CUDA and on a CPU with AVX512-BF16 / AMX; ``"float32"`` on a CPU without them
    (:func:`bf16_matmuls_in_float32`).

    ``device``: a ``torch.device`` or its name; ``"auto"`` means CUDA when available.
    """
    return "float32" if _is_cpu(device) and not cpu_has_native_bf16() else "native"


def emulated_bf16_warning(device: Any, command: str = "properlm") -> str | None:
    """What ``--bf16`` does on a CPU without native bfloat16 matrix products, else ``None``.

    There the products run in float32 from the bfloat16 operands (:func:`bf16_matmuls_in_float32`): bfloat16
    numerics at float32 speed, no faster than float32. ``device`` as in :func:`bf16_matmul_mode`; ``command``
    names what would run in float32 without ``--bf16``.
    """
    if bf16_matmul_mode(device) == "native":
        return None
    return (
        f"--bf16 on this CPU ({torch.backends.cpu.get_cpu_capability()}, no native bfloat16 matrix multiply): "
        "its bfloat16 matrix products run as float32 products of the bfloat16 operands (the same values up to "
        f"the order of the sums; oneDNN's emulation was measured about {EMULATED_BF16_SLOWDOWN}x slower), so "
        f"{command} gets bfloat16 numerics at float32 speed; drop --bf16 to run {command} in float32"
    )


#: the ATen operations that :func:`bf16_matmuls_in_float32` computes in float32: the matrix products
#: (``nn.Linear`` and ``torch.matmul`` reach these on CPU) and the CPU flash-attention kernel behind
#: ``F.scaled_dot_product_attention`` with its backward; every other operation runs as it is
BF16_MATMUL_OPS = frozenset(
    {
        torch.ops.aten.mm.default,
        torch.ops.aten.addmm.default,
        torch.ops.aten.bmm.default,
        torch.ops.aten.baddbmm.default,
        torch.ops.aten.addbmm.default,
        torch.ops.aten.mv.default,
        torch.ops.aten.addmv.default,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
    }
)
#: the outputs (by position) that stay float32, as bfloat16 inputs give them: the attention's log-sum-exp
_FLOAT32_OUTPUTS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default: (1,)}


def _is_weight_cast(t: Tensor) -> bool:
    """Whether ``t`` (bfloat16, not a view) looks like autocast's cached cast of a weight.

    That is a dense matrix cast from a parameter, or one outside autograd. Such tensors are reused across calls
    (at every decoding step of an autocast block), so their float32 copies are cached; a cast activation inside
    autograd is not (its copy would live as long as it does).
    """
    if t.dim() != 2 or not t.is_contiguous():
        return False
    fn = t.grad_fn
    if fn is None:
        return True
    nxt = fn.next_functions
    return type(fn).__name__ == "ToCopyBackward0" and len(nxt) == 1 and type(nxt[0][0]).__name__ == "AccumulateGrad"


class _Bf16MatmulsInFloat32(TorchDispatchMode):
    """The dispatch mode behind :func:`bf16_matmuls_in_float32` (one instance per block)."""

    def __init__(self) -> None:
        super().__init__()
        # id(bfloat16 tensor) -> (its version, its float32 copy); an entry leaves with its tensor
        self.upcasts: dict[int, tuple[int, Tensor]] = {}

    def _float32(self, t: Tensor) -> Tensor:
        """``t.float()``, from the cache when ``t`` is (a view of) a cast weight.

        ``nn.Linear`` multiplies by a new transposed view of the same cast weight at every call: the copy is of
        the view's base, and the view is taken again on the copy.
        """
        root = t if t._base is None else t._base
        if root.dtype != torch.bfloat16 or not _is_weight_cast(root):
            return t.float()
        key = id(root)
        hit = self.upcasts.get(key)
        if hit is None or hit[0] != root._version:
            if hit is None:
                weakref.finalize(root, self.upcasts.pop, key, None)
            hit = (root._version, root.float())
            self.upcasts[key] = hit
        if t is root:
            return hit[1]
        return hit[1].as_strided(t.size(), t.stride(), t.storage_offset() - root.storage_offset())

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func not in BF16_MATMUL_OPS or not any(isinstance(a, Tensor) and a.dtype == torch.bfloat16 for a in args):
            return func(*args, **kwargs)

        def up(a: Any) -> Any:
            return self._float32(a) if isinstance(a, Tensor) and a.dtype == torch.bfloat16 else a

        out = func(*tree_map(up, args), **tree_map(up, kwargs))
        if isinstance(out, Tensor):
            return out.to(torch.bfloat16)
        keep = _FLOAT32_OUTPUTS.get(func, ())
        return type(out)(o if i in keep else o.to(torch.bfloat16) for i, o in enumerate(out))


def bf16_matmuls_in_float32() -> contextlib.AbstractContextManager[Any]:
    """Inside the block, every bfloat16 matrix product (:data:`BF16_MATMUL_OPS`) runs in float32.

    For bfloat16 operands ``A`` (m x k) and ``B`` (k x n) the result is ``bf16(float32(A) @ float32(B))``:
    the products of two bfloat16 numbers (8-bit significands) are exact in float32 (24 bits) and the sums
    accumulate in float32, as in the bfloat16 instructions of AVX512-BF16 and AMX, with one rounding to
    bfloat16 at the end; only the order of the float32 sums differs. The backward pass's products are covered
    too (run ``backward()`` inside the block). Float32 copies of the cast weights are cached while autocast
    keeps their casts (a float32 copy of the weights for the block, or for a training step), so decoding does
    not copy them at every step. The attention kernel of :data:`BF16_MATMUL_OPS` returns its output (and
    gradients) in bfloat16 and its log-sum-exp in float32, as its bfloat16 version does.

    For a CPU without native bfloat16 matrix multiply, where oneDNN's bfloat16 path is about
    :data:`EMULATED_BF16_SLOWDOWN` times slower than float32; :func:`bf16_autocast_matmuls` uses it only there.
    The returned context can be entered again (one block after another).
    """
    return _Bf16MatmulsInFloat32()


def bf16_autocast_matmuls(device: Any) -> contextlib.AbstractContextManager[Any]:
    """:func:`bf16_matmuls_in_float32` where it is needed on ``device``, else a block that does nothing.

    Needed on a CPU without native bfloat16 matrix products (:func:`bf16_matmul_mode` is ``"float32"``).
    """
    return bf16_matmuls_in_float32() if bf16_matmul_mode(device) == "float32" else contextlib.nullcontext()


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
        with torch.autocast(device_type=device_type, dtype=dtype), bf16_autocast_matmuls(device_type):
            yield
    finally:
        for h in handles:
            h.remove()
