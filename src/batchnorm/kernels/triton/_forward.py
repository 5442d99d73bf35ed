"""Forward Triton kernels: the persistent forward, tile partials, merge + finalize, apply.

Training forward, persistent strategy: :func:`_fwd_persistent_kernel` (one launch). Split
strategy: :func:`_partials_kernel` (shifted tile partials ``(n, δ_k, m2_k)`` into ``(K, C)``)
→ :func:`_merge_kernel` (the ``stats.merge_many`` formula in a fixed order, then
``stats.finalize``) → :func:`_apply_kernel` on the centered value ``(x - K) - δ``. Eval forward
and the distributed path: :func:`_apply_kernel` with the given statistics. The derivation is in
the package docstring (:mod:`batchnorm.kernels.triton`). Arguments common to the kernels:

- ``R, C, S``: the canonical shape; ``stride_r = C·S``, ``stride_c = S`` (contiguous);
- ``BLOCK_R, BLOCK_C, BLOCK_S``: the tile (powers of two); ``INT64``: 64-bit offsets (more than
  2**31 elements);
- ``HAS_W``, ``HAS_B``, ``HAS_RES``: whether γ, β, the residual are given (pointers of absent
  ones are None and never read); ``ACT``: the activation's code
  (:data:`batchnorm.activations.CODES`); ``slope``: its parameter (float).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._activations import _act_fwd
from ._tiles import _channel_scale, _pre, _sum3, _tile

# Pointers: x, residual, y, dy, dx, dres (R, C, S) contiguous (channels-last: S = 1);
# w, b (C,) any float dtype; mean, rstd, var, scale, shift, a, b-coefficients (C,) float32;
# partial buffers (K, C) float32 with K the number of chunks per channel.


@triton.jit
def _fwd_persistent_kernel(
    x_ptr, w_ptr, b_ptr, res_ptr, y_ptr, mean_ptr, rstd_ptr, var_ptr,
    R, C, S, stride_r, stride_c, n, eps, slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr,
):
    """Training forward of one channel block whose whole slab is this program's tile: the
    shifted statistics in registers, then ``y``; ``x`` read once, ``y`` written once.

    Args:
        x_ptr: the input ``(R, C, S)``, float32/float16/bfloat16.
        w_ptr, b_ptr: γ and β ``(C,)``, any float dtype (None where absent).
        res_ptr: the residual, like ``x`` (None where absent).
        y_ptr: the output, like ``x``.
        mean_ptr, rstd_ptr, var_ptr: ``(C,)`` float32, written: mean, rstd and the biased variance.
        n: elements per channel, ``R·S`` (float).
        eps: added to the variance (float).
        R, C, S, stride_r, stride_c, BLOCK_R, BLOCK_C, BLOCK_S, INT64: the shape and the tile
            (module docstring).
        slope, HAS_W, HAS_B, HAS_RES, ACT: as in the module docstring.
    """
    offs, mask, cols, cmask, _k, first = _tile(
        tl.program_id(0), R, C, S, stride_r, stride_c, BLOCK_R, BLOCK_C, BLOCK_S, INT64)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(x_ptr + first, mask=cmask, other=0.0).to(tl.float32)
    xs = x - shift[None, :, None]
    delta = _sum3(tl.where(mask, xs, 0.0)) / n
    xc = tl.where(mask, xs - delta[None, :, None], 0.0)  # x - mean without rounding the mean
    var = _sum3(xc * xc) / n
    mean = shift + delta
    rstd = 1.0 / tl.sqrt(var + eps)
    scale = rstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    pre = _pre(xc, scale, b_ptr, res_ptr, cols, cmask, offs, mask, HAS_B, HAS_RES)
    y = _act_fwd(pre, slope, ACT)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + cols, mean, mask=cmask)
    tl.store(rstd_ptr + cols, rstd, mask=cmask)
    tl.store(var_ptr + cols, var, mask=cmask)


@triton.jit
def _partials_kernel(
    x_ptr, n_ptr, mean_ptr, m2_ptr, R, C, S, stride_r, stride_c,
    SHIFTED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr,
):
    """Tile partials of ``x - K`` (K = x[0, c, 0]); the stored mean is δ_k when SHIFTED, else
    K + δ_k (the partials of x itself).

    Args:
        x_ptr: the input ``(R, C, S)``, float32/float16/bfloat16.
        n_ptr, mean_ptr, m2_ptr: ``(K, C)`` float32, written: count, mean (δ_k or K + δ_k) and
            ``m2`` of each tile, row ``k`` the tile's chunk.
        R, C, S, stride_r, stride_c, BLOCK_R, BLOCK_C, BLOCK_S, INT64: the shape and the tile
            (module docstring).
        SHIFTED: whether the stored mean is δ_k (the training forward) or K + δ_k.
    """
    offs, mask, cols, cmask, k, first = _tile(
        tl.program_id(0), R, C, S, stride_r, stride_c, BLOCK_R, BLOCK_C, BLOCK_S, INT64)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(x_ptr + first, mask=cmask, other=0.0).to(tl.float32)
    cnt = _sum3(mask.to(tl.float32))
    xs = x - shift[None, :, None]
    delta = _sum3(tl.where(mask, xs, 0.0)) / tl.maximum(cnt, 1.0)
    xc = tl.where(mask, xs - delta[None, :, None], 0.0)
    out = k * C + cols
    tl.store(n_ptr + out, cnt, mask=cmask)
    if SHIFTED:
        tl.store(mean_ptr + out, delta, mask=cmask)
    else:
        tl.store(mean_ptr + out, shift + delta, mask=cmask)
    tl.store(m2_ptr + out, _sum3(xc * xc), mask=cmask)


@triton.jit
def _merge_kernel(
    n_ptr, mean_ptr, m2_ptr, w_ptr, x_ptr, out_mean_ptr, out_delta_ptr, out_rstd_ptr,
    out_var_ptr, out_scale_ptr, K, C, stride_c, eps,
    HAS_W: tl.constexpr, SHIFTED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    INT64: tl.constexpr,
):
    """Merge the (K, C) tile partials and finalize, in a fixed order (deterministic).

    The formulas of ``stats.merge_many`` and ``stats.finalize``: n = Σ n_k,
    mean = Σ n_k·m_k / n, m2 = Σ m2_k + Σ n_k·(m_k - mean)², var = m2/n, rstd = 1/sqrt(var+eps).
    SHIFTED: the partial means are δ_k of ``x - K`` (K = x[0, c, 0]); the merged δ goes to
    ``out_delta`` and ``K + δ`` to ``out_mean``. Otherwise the merged mean goes to ``out_mean``.

    Args:
        n_ptr, mean_ptr, m2_ptr: the tile partials ``(K, C)`` float32.
        w_ptr: γ ``(C,)``, any float dtype (None where absent).
        x_ptr: the input (its ``x[0, c, 0]`` is read when SHIFTED).
        out_mean_ptr, out_delta_ptr, out_rstd_ptr, out_var_ptr, out_scale_ptr: ``(C,)`` float32,
            written: mean, δ (when SHIFTED), rstd, biased variance and ``γ·rstd``.
        K, C: the partial buffers' shape; stride_c: ``S``.
        eps: added to the variance (float).
        HAS_W: whether γ is given.
        SHIFTED: see above.
        BLOCK_K, BLOCK_C: the block of partials one program reads.
        INT64: 64-bit offsets.
    """
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    tot = tl.zeros((BLOCK_C,), tl.float32)
    nm = tl.zeros((BLOCK_C,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K))[:, None]
        m = (ks < K) & cmask[None, :]
        nk = tl.load(n_ptr + ks * C + cols[None, :], mask=m, other=0.0)
        mk = tl.load(mean_ptr + ks * C + cols[None, :], mask=m, other=0.0)
        tot += tl.sum(nk, axis=0)
        nm += tl.sum(nk * mk, axis=0)
    safe = tl.where(tot > 0.0, tot, 1.0)
    mean = nm / safe
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K))[:, None]
        m = (ks < K) & cmask[None, :]
        nk = tl.load(n_ptr + ks * C + cols[None, :], mask=m, other=0.0)
        mk = tl.load(mean_ptr + ks * C + cols[None, :], mask=m, other=0.0)
        m2k = tl.load(m2_ptr + ks * C + cols[None, :], mask=m, other=0.0)
        d = mk - mean[None, :]
        m2 += tl.sum(m2k, axis=0) + tl.sum(nk * d * d, axis=0)
    var = m2 / safe
    rstd = 1.0 / tl.sqrt(var + eps)
    scale = _channel_scale(None, rstd, w_ptr, cols, cmask, False, HAS_W)
    if SHIFTED:
        ch = cols
        if INT64:  # more than 2**31 elements: 32-bit offsets would wrap
            ch = cols.to(tl.int64)
        shift = tl.load(x_ptr + ch * stride_c, mask=cmask, other=0.0).to(tl.float32)  # x[0,c,0]
        tl.store(out_delta_ptr + cols, mean, mask=cmask)
        mean = shift + mean
    tl.store(out_mean_ptr + cols, mean, mask=cmask)
    tl.store(out_rstd_ptr + cols, rstd, mask=cmask)
    tl.store(out_var_ptr + cols, var, mask=cmask)
    tl.store(out_scale_ptr + cols, scale, mask=cmask)


@triton.jit
def _apply_kernel(
    x_ptr, mean_ptr, scale_ptr, rstd_ptr, w_ptr, b_ptr, res_ptr, y_ptr,
    R, C, S, stride_r, stride_c, slope,
    HAS_SCALE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
    ACT: tl.constexpr, SHIFTED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr,
):
    """y = act((x - mean)·scale + β + r); SHIFTED: ``mean_ptr`` holds δ and ``x - mean`` is
    ``(x - K) - δ`` with K = x[0, c, 0] (the training forward's centered form).

    Args:
        x_ptr: the input ``(R, C, S)``, float32/float16/bfloat16.
        mean_ptr: the mean ``(C,)`` float32 (δ when SHIFTED).
        scale_ptr: ``γ·rstd`` ``(C,)`` float32 when HAS_SCALE, else None.
        rstd_ptr: ``(C,)`` float32, read when not HAS_SCALE (the scale is then computed).
        w_ptr, b_ptr: γ and β ``(C,)``, any float dtype (None where absent).
        res_ptr: the residual, like ``x`` (None where absent).
        y_ptr: the output, like ``x``.
        R, C, S, stride_r, stride_c, BLOCK_R, BLOCK_C, BLOCK_S, INT64: the shape and the tile
            (module docstring).
        slope, HAS_W, HAS_B, HAS_RES, ACT: as in the module docstring.
        HAS_SCALE: whether ``scale_ptr`` is given.
        SHIFTED: see above.
    """
    offs, mask, cols, cmask, _k, first = _tile(
        tl.program_id(0), R, C, S, stride_r, stride_c, BLOCK_R, BLOCK_C, BLOCK_S, INT64)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SHIFTED:
        x = x - tl.load(x_ptr + first, mask=cmask, other=0.0).to(tl.float32)[None, :, None]
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    rstd = 1.0
    if not HAS_SCALE:
        rstd = tl.load(rstd_ptr + cols, mask=cmask, other=0.0)
    scale = _channel_scale(scale_ptr, rstd, w_ptr, cols, cmask, HAS_SCALE, HAS_W)
    pre = _pre(x - mean[None, :, None], scale, b_ptr, res_ptr, cols, cmask, offs, mask,
               HAS_B, HAS_RES)
    y = _act_fwd(pre, slope, ACT)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
