"""Triton kernels of the fused linear + scoring-rule loss (CUDA; CPU under ``TRITON_INTERPRET=1``).

The logits ``z = h W^T + b`` are formed tile by tile in registers (``tl.dot`` over blocks of
the hidden size) and never written to memory:

* **pass 1** (:func:`_stats_kernel`): one program per block of ``BLOCK_N`` tokens and slice of
  the vocabulary (a chunk has few token blocks, so the vocabulary is cut into enough slices to
  fill the GPU) streams its slice in tiles of ``BLOCK_V`` and keeps, per token, the online statistics

      m = max_j z_j,   s_c = sum_j exp(c (z_j - m))  for each scale c of the rule,
      sum_j (z_j - m) and #{j : z_j finite},   z_y - m,

  rescaling ``s_c`` by ``exp(c (m_old - m_new))`` (and shifting the sum by
  ``count (m_old - m_new)``) when the running max grows. These are the shifted statistics of
  :class:`properlm.stats.TokenStats` (``lse[c] = LSE(c (z - m)) = log s_c``), and the rule's
  loss and partial derivatives come from the same Python functions as every other path
  (:func:`properlm.stats.loss_and_partials`) once the slices are merged
  (:meth:`TritonChunkBackend._merge`: a log-sum-exp of the slices' statistics).
* **pass 2** (:func:`_masked_kernel`, bounded rules with smoothing only): the masked-log term
  needs the set ``M = {j : p_j < eps / V}``, known only once ``LSE(z)`` is final, so a second
  sweep sums ``z_j - m`` and counts ``j`` over ``M``.
* **gradient** (:func:`_grad_kernel`): one program per (token block, vocabulary tile)
  recomputes the logit tile and writes the logit gradient tile

      g = sum_c coef_c exp(c (z - m)) + f_sumz [z finite] + f_msum [j in M] + f_zy [j = y],
      coef_c = f_Lc c exp(-lse[c]),

  for the rows of one token chunk; the driver (:class:`properlm.fused.chunked.FusedLinearLossFunction`)
  turns it into ``grad_h = g W`` and ``grad_W += g^T h`` with two matmuls and drops it. So the
  largest temporary is one ``chunk x V`` gradient, never ``N x V``; for bfloat16/float16
  inputs it is stored in the input dtype, which the two (tensor-core) matmuls take anyway.

Speed on an H100 (bfloat16, N=8192, H=4096, V=128256; ``benchmarks/README.md``): 1.18x the time of
materialised cross-entropy without smoothing, 1.43x for bounded rules with smoothing (pass 2 is
one more sweep over the logits), at 0.26x its memory. Exact float32 dots are slow in Triton
(3.3x), so the dispatcher uses these kernels for 2-byte inputs (and float32 under TF32) only.

Output-head transforms (``softcap`` ``c``, ``logit_scale`` ``s``): every kernel applies
``z'' = c tanh(s z / c)`` (:func:`_head_transform`) to each logit tile right after
:func:`_logits_tile`, ``-inf`` kept, so passes 1 and 2 see ``z''``; the gradient kernel multiplies
its tile by ``s (1 - (z'' / c)^2)`` (by ``s`` without a cap). ``tanh`` is built from ``exp``
(:func:`tanh_from_exp`, a few ulps) because the interpreter has no ``libdevice``.

For float32 inputs ``tl.dot`` runs with ``input_precision="ieee"`` (no TF32) unless
``torch.backends.cuda.matmul.allow_tf32`` is set, so the kernels match the float32 reference
to rounding. ``tests/test_fused_triton.py`` checks them under the interpreter and, where a GPU
is present, compiled.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..options import LossOptions
from ..rules import ScoringRule
from ..stats import TokenStats, masked_log_eps, masked_threshold
from .chunked import logit_grad_dtype, tensor_core_inputs

__all__ = ["MAX_SCALES", "PROGRAMS_PER_SM", "TritonChunkBackend"]

#: the kernels keep at most this many online sums ``s_c`` (every built-in rule needs <= 3)
MAX_SCALES = 4
#: passes 1 and 2 split the vocabulary into slices until there are about this many programs per SM
PROGRAMS_PER_SM = 4
#: default tile sizes (upper bounds; smaller powers of two are used for small inputs):
#: tokens per program, vocabulary entries per tile, hidden units per ``tl.dot`` step
BLOCK_N, BLOCK_V, BLOCK_H = 64, 128, 64
#: the same for 2-byte inputs (bfloat16, float16): larger tiles fit in shared memory (measured
#: on an H100 at N=8192, H=4096, V=128256: benchmarks/README.md)
LOWP_BLOCK_N, LOWP_BLOCK_V, LOWP_BLOCK_H = 128, 256, 64


@triton.jit
def _logits_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    rows,
    row_mask,
    cols,
    col_mask,
    hidden_size,
    stride_h,
    stride_w,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``z[rows, cols] = h[rows] @ W[cols]^T + b[cols]`` in float32; ``-inf`` outside the vocabulary.

    ``UPCAST`` converts the operands to float32 before ``tl.dot`` (the products of bfloat16 or
    float16 numbers are exact in float32, so the result is what a float32-accumulating
    tensor-core dot gives); the interpreter needs it because its ``tl.dot`` misreads bfloat16."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    # 64-bit offsets: V * H can exceed 2^31 (e.g. 256k x 8k)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_w
    for k0 in range(0, hidden_size, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_mask = ks < hidden_size
        h = tl.load(h_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_cols + ks[:, None], mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    return tl.where(col_mask[None, :], acc, float("-inf"))


@triton.jit
def tanh_from_exp(x):
    """``tanh(x)`` in float32 from ``exp`` (the interpreter has no ``libdevice``).

    The odd Taylor polynomial to ``x^11`` for ``|x| < 0.3`` (truncation below 1e-9 relative), ``(1 - e) / (1 + e)``
    with ``e = exp(-2 |x|)`` above (no cancellation there: ``e < 0.55``); ``+-1`` at ``+-inf``."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = x * (
        1.0
        + x2
        * (
            -0.3333333333333333
            + x2
            * (
                0.13333333333333333
                + x2 * (-0.05396825396825397 + x2 * (0.021869488536155203 + x2 * -0.008863235529902197))
            )
        )
    )
    return tl.where(a < 0.3, small, tl.where(x < 0, -big, big))


@triton.jit
def _head_transform(z, head_mul, cap, HEAD: tl.constexpr):
    """The output-head transform of a logit tile (:func:`properlm.stats.head_transform_`).

    ``HEAD`` 0 none, 1 ``z * head_mul`` (logit scale), 2 ``cap * tanh(z * head_mul)`` with
    ``head_mul = logit_scale / cap`` (soft-cap); ``-inf`` stays ``-inf``."""
    if HEAD == 1:
        z = z * head_mul
    if HEAD == 2:
        z = tl.where(z > float("-inf"), cap * tanh_from_exp(z * head_mul), z)
    return z


@triton.jit
def _stats_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    m_ptr,
    s_ptr,
    sumz_ptr,
    count_ptr,
    zy_ptr,
    n_rows,
    vocab_size,
    hidden_size,
    stride_h,
    stride_w,
    split_cols,
    head_mul,
    cap,
    scale,
    C0: tl.constexpr,
    C1: tl.constexpr,
    C2: tl.constexpr,
    C3: tl.constexpr,
    NUM_SCALES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HEAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Pass 1 over the vocabulary slice ``[k split_cols, (k + 1) split_cols)`` of program ``(i, k)``.

    Per token and slice ``m_k``, ``s_c,k`` relative to ``m_k``, ``sum (z - m_k)``, count and the raw
    ``z_y`` (0 when ``y`` lies outside the slice). Every output has shape ``(splits, n_rows)``
    (``s_ptr``: ``(NUM_SCALES, splits, n_rows)``); :meth:`TritonChunkBackend._merge` combines them."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    v_lo = split * split_cols
    v_hi = tl.minimum(v_lo + split_cols, vocab_size)
    out = split * n_rows
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s3 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_z = tl.zeros((BLOCK_N,), dtype=tl.float32)
    count = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_y = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_hi
        z = _logits_tile(
            h_ptr,
            w_ptr,
            b_ptr,
            rows,
            row_mask,
            cols,
            col_mask,
            hidden_size,
            stride_h,
            stride_w,
            HAS_BIAS,
            BLOCK_N,
            BLOCK_V,
            BLOCK_H,
            PRECISION,
            UPCAST,
        )
        z = _head_transform(z, head_mul, cap, HEAD)
        finite = z > float("-inf")
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = z - m_ref[:, None]
        shift = m - m_ref  # <= 0; -inf before the first finite logit
        m_prev = tl.where(m == float("-inf"), 0.0, m)
        sum_z += count * (m_prev - m_ref) + tl.sum(tl.where(finite, d, 0.0), axis=1)
        s0 = s0 * tl.exp(C0 * shift) + tl.sum(tl.exp(C0 * d), axis=1)
        if NUM_SCALES > 1:
            s1 = s1 * tl.exp(C1 * shift) + tl.sum(tl.exp(C1 * d), axis=1)
        if NUM_SCALES > 2:
            s2 = s2 * tl.exp(C2 * shift) + tl.sum(tl.exp(C2 * d), axis=1)
        if NUM_SCALES > 3:
            s3 = s3 * tl.exp(C3 * shift) + tl.sum(tl.exp(C3 * d), axis=1)
        m = m_new
        count += tl.sum(finite.to(tl.float32), axis=1)
        z_y += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
    plane = n_splits * n_rows
    tl.store(m_ptr + out + rows, m, mask=row_mask)
    tl.store(s_ptr + out + rows, s0, mask=row_mask)
    if NUM_SCALES > 1:
        tl.store(s_ptr + plane + out + rows, s1, mask=row_mask)
    if NUM_SCALES > 2:
        tl.store(s_ptr + 2 * plane + out + rows, s2, mask=row_mask)
    if NUM_SCALES > 3:
        tl.store(s_ptr + 3 * plane + out + rows, s3, mask=row_mask)
    tl.store(sumz_ptr + out + rows, sum_z, mask=row_mask)
    tl.store(count_ptr + out + rows, count, mask=row_mask)
    tl.store(zy_ptr + out + rows, z_y, mask=row_mask)


@triton.jit
def _masked_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    m_ptr,
    thresh_ptr,
    msum_ptr,
    mcount_ptr,
    n_rows,
    vocab_size,
    hidden_size,
    stride_h,
    stride_w,
    split_cols,
    head_mul,
    cap,
    scale,
    HAS_BIAS: tl.constexpr,
    HEAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Pass 2: ``sum_{j in M} (z_j - m)`` and ``|M|`` with ``M = {j finite : exp(z_j - m) < thresh}``.

    Per vocabulary slice as in :func:`_stats_kernel` (outputs ``(splits, n_rows)``, to be summed)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    v_lo = split * split_cols
    v_hi = tl.minimum(v_lo + split_cols, vocab_size)
    out = split * n_rows
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    m = tl.load(m_ptr + rows, mask=row_mask, other=0.0)
    thresh = tl.load(thresh_ptr + rows, mask=row_mask, other=0.0)
    msum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    mcount = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_hi
        z = _logits_tile(
            h_ptr,
            w_ptr,
            b_ptr,
            rows,
            row_mask,
            cols,
            col_mask,
            hidden_size,
            stride_h,
            stride_w,
            HAS_BIAS,
            BLOCK_N,
            BLOCK_V,
            BLOCK_H,
            PRECISION,
            UPCAST,
        )
        z = _head_transform(z, head_mul, cap, HEAD)
        d = z - m[:, None]
        in_m = (tl.exp(d) < thresh[:, None]) & (z > float("-inf"))
        msum += tl.sum(tl.where(in_m, d, 0.0), axis=1)
        mcount += tl.sum(in_m.to(tl.float32), axis=1)
    tl.store(msum_ptr + out + rows, msum, mask=row_mask)
    tl.store(mcount_ptr + out + rows, mcount, mask=row_mask)


@triton.jit
def _grad_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    m_ptr,
    coef_ptr,
    fsumz_ptr,
    thresh_ptr,
    fmsum_ptr,
    fzy_ptr,
    g_ptr,
    n_rows,
    vocab_size,
    hidden_size,
    stride_h,
    stride_w,
    stride_g,
    head_mul,
    cap,
    scale,
    C0: tl.constexpr,
    C1: tl.constexpr,
    C2: tl.constexpr,
    C3: tl.constexpr,
    NUM_SCALES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SUMZ: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HEAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Logit-gradient tile ``g[rows, cols]`` from the per-token coefficients (see module docstring)."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < vocab_size
    z = _logits_tile(
        h_ptr,
        w_ptr,
        b_ptr,
        rows,
        row_mask,
        cols,
        col_mask,
        hidden_size,
        stride_h,
        stride_w,
        HAS_BIAS,
        BLOCK_N,
        BLOCK_V,
        BLOCK_H,
        PRECISION,
        UPCAST,
    )
    z = _head_transform(z, head_mul, cap, HEAD)
    m = tl.load(m_ptr + rows, mask=row_mask, other=0.0)
    d = z - m[:, None]
    c0 = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)
    g = c0[:, None] * tl.exp(C0 * d)
    if NUM_SCALES > 1:
        c1 = tl.load(coef_ptr + n_rows + rows, mask=row_mask, other=0.0)
        g += c1[:, None] * tl.exp(C1 * d)
    if NUM_SCALES > 2:
        c2 = tl.load(coef_ptr + 2 * n_rows + rows, mask=row_mask, other=0.0)
        g += c2[:, None] * tl.exp(C2 * d)
    if NUM_SCALES > 3:
        c3 = tl.load(coef_ptr + 3 * n_rows + rows, mask=row_mask, other=0.0)
        g += c3[:, None] * tl.exp(C3 * d)
    finite = z > float("-inf")
    if HAS_SUMZ:
        fsumz = tl.load(fsumz_ptr + rows, mask=row_mask, other=0.0)
        g += tl.where(finite, fsumz[:, None], 0.0)
    if HAS_MASK:
        thresh = tl.load(thresh_ptr + rows, mask=row_mask, other=0.0)
        fmsum = tl.load(fmsum_ptr + rows, mask=row_mask, other=0.0)
        in_m = (tl.exp(d) < thresh[:, None]) & finite
        g += tl.where(in_m, fmsum[:, None], 0.0)
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
    fzy = tl.load(fzy_ptr + rows, mask=row_mask, other=0.0)
    g += tl.where(cols[None, :] == y[:, None], fzy[:, None], 0.0)
    # the chain rule through the head transform: dz''/dz = scale (1 - (z'' / cap)^2) (0 at -inf)
    if HEAD == 1:
        g = g * head_mul
    if HEAD == 2:
        t = z / cap
        g = g * tl.where(finite, tl.maximum(scale * (1.0 - t * t), 0.0), 0.0)
    g_rows = g_ptr + rows.to(tl.int64)[:, None] * stride_g
    tl.store(g_rows + cols[None, :], g, mask=row_mask[:, None] & col_mask[None, :])


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


class TritonChunkBackend:
    """Chunk statistics (passes 1 and 2) and logit gradient with the Triton kernels above.

    Implements :class:`properlm.fused.chunked.ChunkBackend`; the cache is always ``None``
    because nothing of size ``chunk x V`` is kept between the passes.
    """

    name = "triton"

    def __init__(
        self,
        block_n: int | None = None,
        block_v: int | None = None,
        block_h: int | None = None,
        num_warps: int = 8,
        split_tiles: int | None = None,
    ) -> None:
        self.block_n, self.block_v, self.block_h = block_n, block_v, block_h
        self.num_warps = num_warps
        self.split_tiles = split_tiles

    # ------------------------------------------------------------------ helpers
    def _launch_cfg(self, h: Tensor, weight: Tensor) -> dict[str, Any]:
        n, H = h.shape
        V = weight.shape[0]
        # float32: exact products unless torch itself is allowed TF32 matmuls (as the unfused
        # logits would then be); other dtypes: the native tensor-core dot, float32 accumulation
        lowp = h.dtype != torch.float32
        upcast = lowp and os.environ.get("TRITON_INTERPRET", "0") == "1"
        precision = "tf32" if tensor_core_inputs(h) and not upcast else "ieee"
        bn = self.block_n or (LOWP_BLOCK_N if lowp else BLOCK_N)
        bv = self.block_v or (LOWP_BLOCK_V if lowp else BLOCK_V)
        bh = self.block_h or (LOWP_BLOCK_H if lowp else BLOCK_H)
        return {
            "UPCAST": upcast,
            "BLOCK_N": _pow2(n, 16, bn),
            "BLOCK_V": _pow2(V, 16, bv),
            "BLOCK_H": _pow2(H, 16, bh),
            "PRECISION": precision,
        }

    def _split_cols(self, n_blocks: int, vocab_size: int, block_v: int, device: torch.device) -> tuple[int, int]:
        """``(columns per vocabulary slice, number of slices)`` of passes 1 and 2.

        A chunk has few token blocks (a few hundred rows for a large vocabulary), so each block's
        sweep over the vocabulary is cut into slices run by separate programs, enough for about
        ``PROGRAMS_PER_SM`` programs per multiprocessor; under the interpreter, slices of two
        tiles (so that the tests cover both the online rescaling and the merge of slices)."""
        n_tiles = triton.cdiv(vocab_size, block_v)
        if self.split_tiles is not None:
            per = self.split_tiles
        elif device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            splits = max(1, min(n_tiles, triton.cdiv(PROGRAMS_PER_SM * sms, n_blocks)))
            per = triton.cdiv(n_tiles, splits)
        else:
            per = 2
        per = max(1, min(per, n_tiles))
        return per * block_v, triton.cdiv(n_tiles, per)

    @staticmethod
    def _merge(
        m: Tensor, s: Tensor, sum_z: Tensor, count: Tensor, z_y: Tensor, scales: tuple[float, ...]
    ) -> tuple[Tensor, dict[float, Tensor], Tensor, Tensor, Tensor]:
        """Combine per-slice statistics ``(splits, n)`` into per-token ones (``lse`` relative to the max).

        That is:

            m = max_k m_k,  s_c = sum_k s_c,k exp(c (m_k - m)),
            sum (z - m) = sum_k [sum_k (z - m_k) + count_k (m_k - m)],  z_y - m = sum_k z_y,k - m.

        Slices with no finite logit (``m_k = -inf``) have ``s_c,k = count_k = 0`` and drop out."""
        mx = m.max(0).values
        ref = torch.where(mx == float("-inf"), torch.zeros_like(mx), mx)
        shift = m - ref  # -inf for empty slices
        ref_k = torch.where(m == float("-inf"), ref.expand_as(m), m)
        lse = {c: torch.log((s[i] * torch.exp(c * shift)).sum(0)) for i, c in enumerate(scales)}
        sz = (sum_z + count * (ref_k - ref)).sum(0)
        return mx, lse, sz, count.sum(0), z_y.sum(0) - mx

    @staticmethod
    def _prep(h: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        h = h if h.stride(-1) == 1 else h.contiguous()
        weight = weight if weight.stride(-1) == 1 else weight.contiguous()
        b = bias if bias is not None else weight  # dummy pointer when there is no bias
        return h, weight, b

    @staticmethod
    def _head(softcap: float | None, logit_scale: float | None) -> dict[str, Any]:
        """Kernel arguments of the output-head transform (see :func:`_head_transform`)."""
        scale = 1.0 if logit_scale is None else float(logit_scale)
        if softcap is not None:
            return {"HEAD": 2, "head_mul": scale / softcap, "cap": float(softcap), "scale": scale}
        return {"HEAD": 0 if logit_scale is None else 1, "head_mul": scale, "cap": 1.0, "scale": scale}

    @staticmethod
    def _scales(rule: ScoringRule, smoothing: float) -> tuple[tuple[float, ...], dict[str, float]]:
        scales = rule.scales(smoothing)
        if len(scales) > MAX_SCALES:
            raise ValueError(
                f"the Triton kernels support at most {MAX_SCALES} scales, rule {rule.spec!r} needs {len(scales)}"
            )
        padded = tuple(scales) + (1.0,) * (MAX_SCALES - len(scales))
        return scales, {f"C{i}": float(c) for i, c in enumerate(padded)}

    # ------------------------------------------------------------------ backend interface
    def stats(
        self, h: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, options: LossOptions
    ) -> tuple[TokenStats, Any]:
        """See :meth:`properlm.fused.chunked.ChunkBackend.stats`: online over vocabulary tiles."""
        rule, smoothing, softcap, logit_scale = options.rule, options.smoothing, options.softcap, options.logit_scale
        h, weight, b = self._prep(h, weight, bias)
        head = self._head(softcap, logit_scale)
        y = y.contiguous()
        n, H = h.shape
        V = weight.shape[0]
        scales, cs = self._scales(rule, smoothing)
        cfg = self._launch_cfg(h, weight)
        f32: dict[str, Any] = {"dtype": torch.float32, "device": h.device}
        n_blocks = triton.cdiv(n, cfg["BLOCK_N"])
        split_cols, splits = self._split_cols(n_blocks, V, cfg["BLOCK_V"], h.device)
        m = torch.empty(splits, n, **f32)
        s = torch.empty(len(scales), splits, n, **f32)
        sum_z = torch.empty(splits, n, **f32)
        count = torch.empty(splits, n, **f32)
        z_y = torch.empty(splits, n, **f32)
        grid = (n_blocks, splits)
        _stats_kernel[grid](
            h,
            weight,
            b,
            y,
            m,
            s,
            sum_z,
            count,
            z_y,
            n,
            V,
            H,
            h.stride(0),
            weight.stride(0),
            split_cols,
            **head,
            **cs,
            NUM_SCALES=len(scales),
            HAS_BIAS=bias is not None,
            num_warps=self.num_warps,
            **cfg,
        )
        m, lse, sum_z, count, z_y = self._merge(m, s, sum_z, count, z_y, scales)
        stats = TokenStats(z_y=z_y, lse=lse, num_classes=count, max_logit=m)
        if smoothing > 0 and rule.uses_logit_sum:
            stats.sum_z = sum_z
        eps = masked_log_eps(rule, smoothing, options.smoothing_variant)
        if eps is not None:
            thresh = self._threshold(stats, eps)
            msum = torch.empty(splits, n, **f32)
            mcount = torch.empty(splits, n, **f32)
            _masked_kernel[grid](
                h,
                weight,
                b,
                m,
                thresh,
                msum,
                mcount,
                n,
                V,
                H,
                h.stride(0),
                weight.stride(0),
                split_cols,
                **head,
                HAS_BIAS=bias is not None,
                num_warps=self.num_warps,
                **cfg,
            )
            stats.masked_sum_z, stats.masked_count = msum.sum(0), mcount.sum(0)
        return stats, None

    @staticmethod
    def _threshold(stats: TokenStats, eps: float) -> Tensor:
        # the test of properlm.stats.masked_set: j in M  <=>  exp(z_j - m) < threshold
        return masked_threshold(stats.lse[1.0], stats.num_classes, eps, torch.float32).contiguous()

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
        """See :meth:`properlm.fused.chunked.ChunkBackend.grad_logits`: written tile by tile."""
        rule, smoothing, softcap, logit_scale = options.rule, options.smoothing, options.softcap, options.logit_scale
        h, weight, b = self._prep(h, weight, bias)
        head = self._head(softcap, logit_scale)
        y = y.contiguous()
        n, H = h.shape
        V = weight.shape[0]
        scales, cs = self._scales(rule, smoothing)
        cfg = self._launch_cfg(h, weight)
        m = stats.max_logit.contiguous()
        # sum_c f_Lc * c * softmax(c z) with softmax(c z) = exp(c (z - m)) * exp(-lse[c])
        coef = torch.stack([partials.lse[c] * c * torch.exp(-stats.lse[c]) for c in scales]).contiguous()
        has_sumz = stats.sum_z is not None and partials.sum_z is not None
        eps = masked_log_eps(rule, smoothing)
        has_mask = eps is not None and partials.masked_sum_z is not None
        fsumz = partials.sum_z.contiguous() if has_sumz else m
        thresh = self._threshold(stats, eps) if has_mask else m
        fmsum = partials.masked_sum_z.contiguous() if has_mask else m
        fzy = partials.z_y.contiguous()
        # bfloat16/float16 inputs on a GPU: the gradient tile is rounded to the input dtype as it is
        # stored (the next matmuls run in that dtype anyway), which halves its memory traffic
        g = torch.empty(n, V, dtype=logit_grad_dtype(h), device=h.device)
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"]))
        _grad_kernel[grid](
            h,
            weight,
            b,
            y,
            m,
            coef,
            fsumz,
            thresh,
            fmsum,
            fzy,
            g,
            n,
            V,
            H,
            h.stride(0),
            weight.stride(0),
            g.stride(0),
            **head,
            **cs,
            NUM_SCALES=len(scales),
            HAS_BIAS=bias is not None,
            HAS_SUMZ=has_sumz,
            HAS_MASK=has_mask,
            num_warps=self.num_warps,
            **cfg,
        )
        return g
