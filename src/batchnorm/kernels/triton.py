"""The Triton backend: fused batch-norm kernels for CUDA tensors (CPU tensors in the interpreter).

One kernel family covers both canonical layouts by viewing every input as ``(R, C, S)``:
channels-first ``(N, C, S)`` is itself, channels-last ``(M, C)`` is ``(M, C, 1)``. A program
works on a tile ``(BLOCK_R, BLOCK_C, BLOCK_S)``; for channels-last ``BLOCK_S = 1`` and the tile
reads ``BLOCK_C`` contiguous channels of ``BLOCK_R`` rows (a column reduction in row blocks),
for channels-first it reads contiguous runs of ``S``. Per-channel results reduce axes 0 and 2.

Two strategies, chosen by size (``persistent_max``, overridable per instance):

- **persistent** — the whole channel slab ``R x S`` (padded to powers of two) fits one tile:
  one program per channel block reads ``x`` once, computes the statistics in registers and
  writes ``y`` once (backward: reads ``x``, ``dy`` once, writes ``dx`` once).
- **split** — each tile writes its partials ``(n, mean, m2)`` (backward: ``(Σg, Σg·x̂)``) into a
  ``(K, C)`` buffer; a merge kernel combines them with the formula of
  :func:`batchnorm.stats.merge_many` in a fixed order (no synchronization) and an elementwise
  kernel applies the result.

The math is that of :mod:`batchnorm.stats` and :mod:`batchnorm.kernels.base`::

    tile partials:  n = #valid, δ_k = Σ(x - K)/n, m2 = Σ((x - K) - δ_k)²
                    (K: the channel's first sample, the same for every tile of the channel)
    merge:          δ = Σ n_k·δ_k / n, m2 = Σ m2_k + Σ n_k·(δ_k - δ)², mean = K + δ
    finalize:       var = m2/n, rstd = 1/sqrt(var + eps), scale = γ·rstd
    forward:        y = act(((x - K) - δ)·scale + β [+ residual])  (training, as
                    stats.centered_partials: exact to one rounding when |mean| ≫ std)
                    y = act((x - mean)·scale + β [+ residual])     (eval, apply)
    backward:       g = dy·act'(pre), x̂ = (x - mean)·rstd, Σg, Σg·x̂,
                    dx = scale·(g - Σg/n - x̂·Σg·x̂/n) (training), dx = scale·g (eval), dres = g

Accumulation is float32 for float32/float16/bfloat16 input; float64 input is left to the
reference backend (``supports`` returns False). No float atomics and no autotuning: block sizes
are a function of the shape alone, so a given input gives bitwise the same result on every
run. Nothing here synchronizes with the host (CUDA-graph safe), and no kernel has a side
effect beyond its outputs (the running statistics are updated by a separate op).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from batchnorm import activations as A
from batchnorm import stats as S
from batchnorm.kernels.base import Backend

__all__ = ["TritonBackend", "BACKEND"]

_ACT = A.CODES  # name -> the integer code the kernels specialise on (the one activation table)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# kernels may read constexpr globals only
_INV_SQRT2 = tl.constexpr(A.INV_SQRT2)
_INV_SQRT_2PI = tl.constexpr(A.INV_SQRT_2PI)
_SQRT_2_OVER_PI = tl.constexpr(A.SQRT_2_OVER_PI)
_GELU_TANH_K = tl.constexpr(A.GELU_TANH_K)
_RELU = tl.constexpr(A.CODES["relu"])
_LEAKY = tl.constexpr(A.CODES["leaky_relu"])
_SILU = tl.constexpr(A.CODES["silu"])
_GELU = tl.constexpr(A.CODES["gelu"])
_RELU6 = tl.constexpr(A.CODES["relu6"])
_HARDSWISH = tl.constexpr(A.CODES["hardswish"])
_HARDSIGMOID = tl.constexpr(A.CODES["hardsigmoid"])
_SIGMOID = tl.constexpr(A.CODES["sigmoid"])
_TANH = tl.constexpr(A.CODES["tanh"])
_ELU = tl.constexpr(A.CODES["elu"])
_MISH = tl.constexpr(A.CODES["mish"])
_GELU_TANH = tl.constexpr(A.CODES["gelu_tanh"])


# ---------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _act_fwd(p, slope, ACT: tl.constexpr):
    """act(p) (``slope``: the activation's parameter), the formulas of
    :mod:`batchnorm.activations`; NaN propagates as in PyTorch (relu keeps a NaN).

    Triton's core language has no tanh: ``tanh(u) = 2σ(2u) - 1`` (absolute error of a float32
    rounding, which is what the sums ``1 + tanh`` and ``1 - tanh²`` below need). Mish's
    ``tanh(softplus(p)) = n/(n + 2)`` with ``n = eᵖ(eᵖ + 2)`` (from ``tanh(log u) =
    (u² - 1)/(u² + 1)``, ``u = 1 + eᵖ``): no log, accurate for very negative ``p``, and 1 to
    float32 precision above ``p = 20``, where ``n`` would overflow. (Written inline, not as
    jit helpers: a further level of helpers failed under Triton's interpreter, which CI runs.)"""
    y = p
    if ACT == _RELU:
        y = tl.where(p < 0.0, 0.0, p)
    elif ACT == _LEAKY:
        y = tl.where(p > 0.0, p, p * slope)
    elif ACT == _SILU:
        y = p * tl.sigmoid(p)
    elif ACT == _GELU:
        y = 0.5 * p * (1.0 + tl.math.erf(p * _INV_SQRT2))
    elif ACT == _RELU6:
        y = tl.where(p < 0.0, 0.0, tl.where(p > 6.0, 6.0, p))
    elif ACT == _HARDSWISH:
        y = p * tl.minimum(tl.maximum(p + 3.0, 0.0), 6.0) / 6.0
    elif ACT == _HARDSIGMOID:
        y = tl.minimum(tl.maximum(p + 3.0, 0.0), 6.0) / 6.0
    elif ACT == _SIGMOID:
        y = tl.sigmoid(p)
    elif ACT == _TANH:
        y = 2.0 * tl.sigmoid(2.0 * p) - 1.0
    elif ACT == _ELU:
        y = tl.where(p > 0.0, p, slope * (tl.exp(tl.minimum(p, 0.0)) - 1.0))
    elif ACT == _MISH:
        e = tl.exp(tl.minimum(p, 20.0))
        n = e * (e + 2.0)
        y = p * tl.where(p > 20.0, 1.0, n / (n + 2.0))
    elif ACT == _GELU_TANH:
        u = _SQRT_2_OVER_PI * (p + _GELU_TANH_K * p * p * p)
        y = p * tl.sigmoid(2.0 * u)  # ½p(1 + tanh u) = p·σ(2u)
    return y


@triton.jit
def _act_grad(p, slope, ACT: tl.constexpr):
    """act'(p), as :func:`batchnorm.activations.act_grad` (PyTorch's value at each kink);
    tanh and mish's tanh(softplus) as in :func:`_act_fwd`."""
    d = tl.full(p.shape, 1.0, tl.float32)
    if ACT == _RELU:
        d = tl.where(p > 0.0, 1.0, 0.0)
    elif ACT == _LEAKY:
        d = tl.where(p > 0.0, 1.0, slope)
    elif ACT == _SILU:
        sg = tl.sigmoid(p)
        d = sg * (1.0 + p * (1.0 - sg))
    elif ACT == _GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(p * _INV_SQRT2))
        d = cdf + p * tl.exp(-0.5 * p * p) * _INV_SQRT_2PI
    elif ACT == _RELU6:
        d = tl.where((p > 0.0) & (p < 6.0), 1.0, 0.0)
    elif ACT == _HARDSWISH:
        d = tl.where(p <= -3.0, 0.0, tl.where(p < 3.0, p / 3.0 + 0.5, 1.0))
    elif ACT == _HARDSIGMOID:
        d = tl.where((p > -3.0) & (p < 3.0), 1.0 / 6.0, 0.0)
    elif ACT == _SIGMOID:
        sg = tl.sigmoid(p)
        d = sg * (1.0 - sg)
    elif ACT == _TANH:
        t = 2.0 * tl.sigmoid(2.0 * p) - 1.0
        d = 1.0 - t * t
    elif ACT == _ELU:
        d = tl.where(p > 0.0, 1.0, slope * tl.exp(tl.minimum(p, 0.0)))
    elif ACT == _MISH:
        e = tl.exp(tl.minimum(p, 20.0))
        n = e * (e + 2.0)
        t = tl.where(p > 20.0, 1.0, n / (n + 2.0))
        d = t + p * tl.sigmoid(p) * (1.0 - t * t)
    elif ACT == _GELU_TANH:
        u = _SQRT_2_OVER_PI * (p + _GELU_TANH_K * p * p * p)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        d = 0.5 * (1.0 + t) + 0.5 * p * (1.0 - t * t) * _SQRT_2_OVER_PI * (
            1.0 + 3.0 * _GELU_TANH_K * p * p)
    return d


@triton.jit
def _tile(pid, R, C, S, stride_r, stride_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
          BLOCK_S: tl.constexpr, INT64: tl.constexpr):
    """Tile ``pid`` of the 1-D grid: ``(offsets, mask)`` of shape (BR, BC, BS), its channels
    ``cols`` (BC,) with their mask, its chunk index ``k`` and the offset of each channel's
    first sample ``x[0, c, 0]`` (the shift K, the same for every tile of the channel)."""
    n_cb = tl.cdiv(C, BLOCK_C)
    n_sb = tl.cdiv(S, BLOCK_S)
    pid_c = pid % n_cb
    k = pid // n_cb
    r0 = (k // n_sb) * BLOCK_R
    s0 = (k % n_sb) * BLOCK_S
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if INT64:  # more than 2**31 elements: 32-bit offsets would wrap
        r0 = r0.to(tl.int64)
        cols = cols.to(tl.int64)
    rows = r0 + tl.arange(0, BLOCK_R)
    sp = s0 + tl.arange(0, BLOCK_S)
    r3 = rows[:, None, None]
    c3 = cols[None, :, None]
    s3 = sp[None, None, :]
    mask = (r3 < R) & (c3 < C) & (s3 < S)
    offs = r3 * stride_r + c3 * stride_c + s3
    first = cols * stride_c  # (BC,): x[0, c, 0]
    return offs, mask, cols, cols < C, k, first


@triton.jit
def _sum3(t):
    """Per-channel sum of a (BR, BC, BS) tile."""
    return tl.sum(tl.sum(t, axis=2), axis=0)


@triton.jit
def _pre(xc, scale, b_ptr, res_ptr, cols, cmask, offs, mask,
         HAS_B: tl.constexpr, HAS_RES: tl.constexpr):
    """pre = (x - mean)·scale + β + residual, from ``xc = x - mean``."""
    pre = xc * scale[None, :, None]
    if HAS_B:
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        pre += b[None, :, None]
    if HAS_RES:
        pre += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return pre


# ---------------------------------------------------------------------------------------------
# Kernels. Pointers: x, residual, y, dy, dx, dres (R, C, S) contiguous (channels-last: S = 1);
# w, b (C,) any float dtype; mean, rstd, var, scale, shift, a, b-coefficients (C,) float32;
# partial buffers (K, C) float32 with K the number of chunks per channel.


@triton.jit
def _fwd_persistent_kernel(
    x_ptr, w_ptr, b_ptr, res_ptr, y_ptr, mean_ptr, rstd_ptr, var_ptr,
    R, C, S, stride_r, stride_c, n, eps, slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr,
):
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
    K + δ_k (the partials of x itself)."""
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
def _channel_scale(scale_ptr, rstd, w_ptr, cols, cmask,
                   HAS_SCALE: tl.constexpr, HAS_W: tl.constexpr):
    """scale = γ·rstd per channel: given (a primitive's argument) or computed from γ."""
    if HAS_SCALE:
        scale = tl.load(scale_ptr + cols, mask=cmask, other=0.0)
    elif HAS_W:
        scale = rstd * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        scale = rstd
    return scale


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
    ``(x - K) - δ`` with K = x[0, c, 0] (the training forward's centered form)."""
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


@triton.jit
def _grad_and_xhat(x_ptr, dy_ptr, mean_ptr, rstd_ptr, scale_ptr, w_ptr, b_ptr, res_ptr,
                   offs, mask, cols, cmask, slope,
                   HAS_SCALE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   HAS_RES: tl.constexpr, ACT: tl.constexpr):
    """``(g, x̂, scale)`` of a tile; masked lanes of g and x̂ are 0."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + cols, mask=cmask, other=0.0)
    scale = _channel_scale(scale_ptr, rstd, w_ptr, cols, cmask, HAS_SCALE, HAS_W)
    xc = tl.where(mask, x - mean[None, :, None], 0.0)
    if ACT != 0:
        pre = _pre(xc, scale, b_ptr, res_ptr, cols, cmask, offs, mask, HAS_B, HAS_RES)
        g = g * _act_grad(pre, slope, ACT)
    g = tl.where(mask, g, 0.0)
    return g, xc * rstd[None, :, None], scale


@triton.jit
def _bwd_persistent_kernel(
    x_ptr, dy_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, res_ptr, dx_ptr, dres_ptr,
    dw_ptr, db_ptr, R, C, S, stride_r, stride_c, n, slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    TRAINING: tl.constexpr, NEED_DX: tl.constexpr, NEED_DRES: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr,
):
    offs, mask, cols, cmask, _k, _first = _tile(
        tl.program_id(0), R, C, S, stride_r, stride_c, BLOCK_R, BLOCK_C, BLOCK_S, INT64)
    g, xhat, scale = _grad_and_xhat(x_ptr, dy_ptr, mean_ptr, rstd_ptr, None, w_ptr, b_ptr,
                                    res_ptr, offs, mask, cols, cmask, slope, False, HAS_W,
                                    HAS_B, HAS_RES, ACT)
    sum_g = _sum3(g)
    sum_gx = _sum3(g * xhat)
    if NEED_DW:  # dγ = Σ g·x̂, stored in the weight's dtype
        tl.store(dw_ptr + cols, sum_gx.to(dw_ptr.dtype.element_ty), mask=cmask)
    if NEED_DB:  # dβ = Σ g
        tl.store(db_ptr + cols, sum_g.to(db_ptr.dtype.element_ty), mask=cmask)
    if NEED_DX:
        if TRAINING:
            a = sum_g / n
            bb = sum_gx / n
            dx = (g - a[None, :, None] - xhat * bb[None, :, None]) * scale[None, :, None]
        else:
            dx = g * scale[None, :, None]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if NEED_DRES:
        tl.store(dres_ptr + offs, g.to(dres_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_reduce_kernel(
    x_ptr, dy_ptr, mean_ptr, rstd_ptr, scale_ptr, w_ptr, b_ptr, res_ptr, pg_ptr, pgx_ptr,
    R, C, S, stride_r, stride_c, slope,
    HAS_SCALE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr,
):
    """Per-tile (Σg, Σg·x̂) into (K, C) buffers."""
    offs, mask, cols, cmask, k, _first = _tile(
        tl.program_id(0), R, C, S, stride_r, stride_c, BLOCK_R, BLOCK_C, BLOCK_S, INT64)
    g, xhat, _scale = _grad_and_xhat(x_ptr, dy_ptr, mean_ptr, rstd_ptr, scale_ptr, w_ptr,
                                     b_ptr, res_ptr, offs, mask, cols, cmask, slope, HAS_SCALE,
                                     HAS_W, HAS_B, HAS_RES, ACT)
    out = k * C + cols
    tl.store(pg_ptr + out, _sum3(g), mask=cmask)
    tl.store(pgx_ptr + out, _sum3(g * xhat), mask=cmask)


@triton.jit
def _bwd_sum_kernel(
    pg_ptr, pgx_ptr, rstd_ptr, w_ptr, sum_g_ptr, sum_gx_ptr, scale_ptr, dw_ptr, db_ptr, K, C,
    HAS_W: tl.constexpr, NEED_SCALE: tl.constexpr, NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Sum the (K, C) partial sums in a fixed order; also γ·rstd, dγ and dβ when asked."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    sg = tl.zeros((BLOCK_C,), tl.float32)
    sgx = tl.zeros((BLOCK_C,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K))[:, None]
        m = (ks < K) & cmask[None, :]
        sg += tl.sum(tl.load(pg_ptr + ks * C + cols[None, :], mask=m, other=0.0), axis=0)
        sgx += tl.sum(tl.load(pgx_ptr + ks * C + cols[None, :], mask=m, other=0.0), axis=0)
    tl.store(sum_g_ptr + cols, sg, mask=cmask)
    tl.store(sum_gx_ptr + cols, sgx, mask=cmask)
    if NEED_SCALE:
        rstd = tl.load(rstd_ptr + cols, mask=cmask, other=0.0)
        scale = _channel_scale(None, rstd, w_ptr, cols, cmask, False, HAS_W)
        tl.store(scale_ptr + cols, scale, mask=cmask)
    if NEED_DW:
        tl.store(dw_ptr + cols, sgx.to(dw_ptr.dtype.element_ty), mask=cmask)
    if NEED_DB:
        tl.store(db_ptr + cols, sg.to(db_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _bwd_apply_kernel(
    x_ptr, dy_ptr, mean_ptr, rstd_ptr, scale_ptr, b_ptr, res_ptr, a_ptr, bb_ptr,
    dx_ptr, dres_ptr, R, C, S, stride_r, stride_c, n_div, slope,
    HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, TRAINING: tl.constexpr,
    NEED_X: tl.constexpr, NEED_DX: tl.constexpr, NEED_DRES: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr,
):
    """dx = scale·(g - a - x̂·b) with a = a_ptr/n_div, b = bb_ptr/n_div (training; n_div is 1
    when a and b are given, n when they are the sums), dx = scale·g (eval); dres = g."""
    offs, mask, cols, cmask, _k, _first = _tile(
        tl.program_id(0), R, C, S, stride_r, stride_c, BLOCK_R, BLOCK_C, BLOCK_S, INT64)
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + cols, mask=cmask, other=0.0)
    xc = g  # replaced below whenever it is read (NEED_X covers every use)
    if NEED_X:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
        xc = x - mean[None, :, None]
    if ACT != 0:
        pre = _pre(xc, scale, b_ptr, res_ptr, cols, cmask, offs, mask, HAS_B, HAS_RES)
        g = g * _act_grad(pre, slope, ACT)
    if NEED_DX:
        if TRAINING:
            rstd = tl.load(rstd_ptr + cols, mask=cmask, other=0.0)
            a = tl.load(a_ptr + cols, mask=cmask, other=0.0) / n_div
            bb = tl.load(bb_ptr + cols, mask=cmask, other=0.0) / n_div
            xhat = xc * rstd[None, :, None]
            dx = (g - a[None, :, None] - xhat * bb[None, :, None]) * scale[None, :, None]
        else:
            dx = g * scale[None, :, None]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if NEED_DRES:
        tl.store(dres_ptr + offs, g.to(dres_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Host side: tiling plans and the Backend


def _interpreted() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (decided at decoration)."""
    return not isinstance(_apply_kernel, triton.runtime.jit.JITFunction)


# A tile row should hold at least this many contiguous elements (channels-last: BLOCK_C
# channels; channels-first with a small S: several channels of S each) for coalesced access.
_ROW = 32


class _Plan:
    """How a canonical tensor is cut into tiles: block sizes, 1-D grid, chunks per channel."""

    __slots__ = ("R", "C", "S", "stride_r", "stride_c", "blocks", "grid", "K", "num_warps")

    def __init__(self, x: Tensor, block_r: int, block_c: int, block_s: int) -> None:
        self.R, self.C, self.S = _rcs(x)
        self.stride_r, self.stride_c = self.C * self.S, self.S
        self.K = triton.cdiv(self.R, block_r) * triton.cdiv(self.S, block_s)
        self.grid = (triton.cdiv(self.C, block_c) * self.K,)
        tile = block_r * block_c * block_s
        self.num_warps = 4 if tile <= 2048 else 8 if tile <= 8192 else 16
        self.blocks = {
            "BLOCK_R": block_r, "BLOCK_C": block_c, "BLOCK_S": block_s,
            "INT64": x.numel() >= 2**31,
        }

    def dims(self) -> tuple[int, int, int, int, int]:
        return self.R, self.C, self.S, self.stride_r, self.stride_c

    @property
    def n(self) -> float:
        """Elements per channel (a float: kernels divide by it in float32, as stats.py does)."""
        return float(self.R * self.S)


def _rcs(x: Tensor) -> tuple[int, int, int]:
    """``(R, C, S)`` of a canonical tensor; channels-last ``(M, C)`` is ``(M, C, 1)``."""
    if x.dim() == 3:
        return x.shape[0], x.shape[1], x.shape[2]
    return x.shape[0], x.shape[1], 1


def _pow2_at_most(v: int) -> int:
    return 1 << (max(v, 1).bit_length() - 1)


class TritonBackend(Backend):
    """Fused Triton kernels; see the module docstring for the two strategies.

    Args:
        persistent_max: largest padded slab tile ``BLOCK_R·BLOCK_C·BLOCK_S`` (elements) that
            one program holds on chip; larger slabs take the split strategy. 0 forces split.
        tile: target elements per tile of the split and elementwise kernels (a power of two).
    """

    name = "triton"

    def __init__(self, persistent_max: int | None = None, tile: int | None = None) -> None:
        interp = _interpreted()
        # On a GPU a tile of 8192 fp32 values is 32 per thread at 8 warps (backward holds x,
        # dy and g: still inside the register file). The interpreter runs each program as
        # numpy calls, so there fewer, larger programs are faster.
        self.persistent_max = (1 << 16 if interp else 8192) if persistent_max is None \
            else persistent_max
        self.tile = (1 << 14 if interp else 4096) if tile is None else tile

    # -- capability ---------------------------------------------------------------------------
    def available(self) -> bool:
        return _interpreted() or torch.cuda.is_available()

    def supports(self, x: Tensor) -> bool:
        if x.dtype not in _DTYPES or x.dim() not in (2, 3) or not x.is_contiguous():
            return False
        if x.device.type == "cuda":
            return True
        return x.device.type == "cpu" and _interpreted()

    # -- launching ------------------------------------------------------------------------------
    def _launch(self, kernel):
        """What a launch indexes with its grid: ``self._launch(kernel)[grid](...)``.

        The kernel itself here. The ``torch.library.triton_op`` wrappers
        (:mod:`batchnorm.ops.triton_op`) run a subclass that returns
        ``torch.library.wrap_triton(kernel)`` so that ``torch.compile`` sees every launch."""
        return kernel

    # -- plans ----------------------------------------------------------------------------------
    def _persistent(self, x: Tensor) -> _Plan | None:
        """One program per channel block holding the whole slab, or None if it does not fit."""
        r, c, s = _rcs(x)
        br, bs = triton.next_power_of_2(r), triton.next_power_of_2(s)
        if br * bs > self.persistent_max:
            return None
        bc = min(triton.next_power_of_2(c), max(1, _ROW // bs),
                 _pow2_at_most(self.persistent_max // (br * bs)))
        return _Plan(x, br, bc, bs)

    def _split(self, x: Tensor) -> _Plan:
        r, c, s = _rcs(x)
        tile = max(self.tile, 1)
        bs = min(triton.next_power_of_2(s), _pow2_at_most(tile))
        bc = min(triton.next_power_of_2(c), max(1, _ROW // bs))
        br = min(triton.next_power_of_2(r), max(1, _pow2_at_most(tile // (bs * bc))))
        return _Plan(x, br, bc, bs)

    def _reduction(self, k: int, c: int) -> tuple[tuple[int], dict[str, int], int]:
        """Grid and blocks of the kernels that reduce (K, C) partials to (C,)."""
        bc = min(triton.next_power_of_2(c), _ROW)
        bk = min(triton.next_power_of_2(k), max(1, _pow2_at_most(max(self.tile, 1) // bc)))
        return (triton.cdiv(c, bc),), {"BLOCK_K": bk, "BLOCK_C": bc}, 4

    def _partials(self, x: Tensor, plan: _Plan, shifted: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(K, C) tile partials; ``shifted``: means of ``x - K`` (δ_k), else of ``x``."""
        n, mean, m2 = (x.new_empty((plan.K, plan.C), dtype=torch.float32) for _ in range(3))
        self._launch(_partials_kernel)[plan.grid](
            x, n, mean, m2, *plan.dims(), SHIFTED=shifted, **plan.blocks,
            num_warps=plan.num_warps,
        )
        return n, mean, m2

    # -- primitives -----------------------------------------------------------------------------
    def stats(self, x: Tensor) -> S.Partials:
        plan = self._persistent(x) or self._split(x)
        return S.merge_many(S.Partials(*self._partials(x, plan, False)))

    def apply(self, x, mean, scale, shift, residual, act, slope):
        return self._apply(x, mean, scale.contiguous(), None, None, shift, residual, act, slope)

    def _apply(self, x, mean, scale, rstd, weight, bias, residual, act, slope,
               shifted: bool = False) -> Tensor:
        """y = act((x - mean)·scale + β + r); ``scale`` given, or γ·rstd computed in-kernel.
        ``shifted``: ``mean`` is δ and ``x - mean`` is computed as ``(x - K) - δ``."""
        plan = self._split(x)
        y = torch.empty_like(x)
        self._launch(_apply_kernel)[plan.grid](
            x, mean.contiguous(), scale, _opt(rstd), _opt(weight), _opt(bias), _opt(residual),
            y, *plan.dims(), float(slope), HAS_SCALE=scale is not None,
            HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=residual is not None,
            ACT=_ACT[act], SHIFTED=shifted, **plan.blocks, num_warps=plan.num_warps,
        )
        return y

    def _reduce_sums(self, grad_y, x, mean, rstd, scale, weight, bias, residual, act, slope,
                     need_scale: bool, dweight: Tensor | None, dbias: Tensor | None,
                     ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per-tile (Σg, Σg·x̂), then their fixed-order sums (and γ·rstd, dγ, dβ if asked)."""
        plan = self._persistent(x) or self._split(x)
        pg, pgx = (x.new_empty((plan.K, plan.C), dtype=torch.float32) for _ in range(2))
        self._launch(_bwd_reduce_kernel)[plan.grid](
            x, grad_y, mean.contiguous(), rstd.contiguous(), scale, _opt(weight), _opt(bias),
            _opt(residual), pg, pgx, *plan.dims(), float(slope), HAS_SCALE=scale is not None,
            HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=residual is not None,
            ACT=_ACT[act], **plan.blocks, num_warps=plan.num_warps,
        )
        sum_g, sum_gx = (x.new_empty((plan.C,), dtype=torch.float32) for _ in range(2))
        new_scale = x.new_empty((plan.C,), dtype=torch.float32) if need_scale else None
        grid, blocks, warps = self._reduction(plan.K, plan.C)
        self._launch(_bwd_sum_kernel)[grid](
            pg, pgx, rstd.contiguous(), _opt(weight), sum_g, sum_gx, new_scale, dweight, dbias,
            plan.K, plan.C, HAS_W=weight is not None, NEED_SCALE=need_scale,
            NEED_DW=dweight is not None, NEED_DB=dbias is not None, **blocks, num_warps=warps,
        )
        return sum_g, sum_gx, new_scale

    def backward_reduce(self, grad_y, x, mean, rstd, scale, shift, residual, act, slope):
        sum_g, sum_gx, _ = self._reduce_sums(
            grad_y.contiguous(), x, mean, rstd, scale.contiguous(), None, shift, residual, act,
            slope, False, None, None)
        return sum_g, sum_gx

    def backward_apply(self, grad_y, x, mean, rstd, scale, shift, residual, act, slope,
                       a, b, need_dx, need_dres):
        return self._backward_apply(grad_y.contiguous(), x, mean, rstd, scale.contiguous(),
                                    shift, residual, act, slope, a, b, 1.0, need_dx, need_dres)

    def _backward_apply(self, grad_y, x, mean, rstd, scale, bias, residual, act, slope,
                        a, b, n_div, need_dx, need_dres):
        plan = self._split(x)
        dx = torch.empty_like(x) if need_dx else None
        dres = torch.empty_like(grad_y) if need_dres else None
        training = a is not None and b is not None
        self._launch(_bwd_apply_kernel)[plan.grid](
            x, grad_y, mean.contiguous(), rstd.contiguous(), scale, _opt(bias),
            _opt(residual), _opt(a), _opt(b), dx, dres, *plan.dims(), float(n_div),
            float(slope), HAS_B=bias is not None, HAS_RES=residual is not None,
            ACT=_ACT[act], TRAINING=training, NEED_X=training or act != "none",
            NEED_DX=need_dx, NEED_DRES=need_dres, **plan.blocks, num_warps=plan.num_warps,
        )
        return dx, dres

    # -- fused paths ----------------------------------------------------------------------------
    def forward_train(self, x, weight, bias, residual, eps, act, slope, running=None):
        acc = S.accumulation_dtype(x.dtype)
        plan = self._persistent(x)
        if plan is None:  # split: tile partials -> merge + finalize -> apply (3 launches)
            plan = self._split(x)
            # The partials and the apply shift by K = x[0, c, 0], the merge yields δ and
            # mean = K + δ, and the apply normalizes (x - K) - δ (stats.centered_partials).
            n, pdelta, pm2 = self._partials(x, plan, True)
            mean, delta, rstd, var, scale = (x.new_empty((plan.C,), dtype=acc) for _ in range(5))
            grid, blocks, warps = self._reduction(plan.K, plan.C)
            self._launch(_merge_kernel)[grid](
                n, pdelta, pm2, _opt(weight), x, mean, delta, rstd, var, scale, plan.K,
                plan.C, plan.stride_c, float(eps), HAS_W=weight is not None, SHIFTED=True,
                **blocks, INT64=plan.blocks["INT64"], num_warps=warps,
            )
            y = self._apply(x, delta, scale, None, None, bias, residual, act, slope, True)
            return y, mean, rstd, var
        y = torch.empty_like(x)
        mean, rstd, var = (x.new_empty((plan.C,), dtype=acc) for _ in range(3))
        self._launch(_fwd_persistent_kernel)[plan.grid](
            x, _opt(weight), _opt(bias), _opt(residual), y, mean, rstd, var, *plan.dims(),
            plan.n, float(eps), float(slope), HAS_W=weight is not None,
            HAS_B=bias is not None, HAS_RES=residual is not None, ACT=_ACT[act],
            **plan.blocks, num_warps=plan.num_warps,
        )
        return y, mean, rstd, var

    def forward_eval(self, x, weight, bias, residual, mean, rstd, act, slope):
        return self._apply(x, mean, None, rstd, weight, bias, residual, act, slope)

    def backward(self, grad_y, x, weight, bias, residual, mean, rstd, training, act, slope,
                 need_dx, need_dweight, need_dbias, need_dres, allreduce=None):
        if allreduce is not None:  # the sums leave the process between the two passes
            return super().backward(grad_y, x, weight, bias, residual, mean, rstd, training, act,
                                    slope, need_dx, need_dweight, need_dbias, need_dres,
                                    allreduce)
        grad_y = grad_y.contiguous()
        dweight = torch.empty_like(weight) if need_dweight and weight is not None else None
        dbias = torch.empty_like(bias) if need_dbias and bias is not None else None
        plan = self._persistent(x)
        if plan is not None:  # one launch
            dx = torch.empty_like(x) if need_dx else None
            dres = torch.empty_like(grad_y) if need_dres else None
            self._launch(_bwd_persistent_kernel)[plan.grid](
                x, grad_y, mean.contiguous(), rstd.contiguous(), _opt(weight), _opt(bias),
                _opt(residual), dx, dres, dweight, dbias, *plan.dims(), plan.n, float(slope),
                HAS_W=weight is not None, HAS_B=bias is not None,
                HAS_RES=residual is not None, ACT=_ACT[act], TRAINING=bool(training),
                NEED_DX=need_dx, NEED_DRES=need_dres, NEED_DW=dweight is not None,
                NEED_DB=dbias is not None, **plan.blocks, num_warps=plan.num_warps,
            )
            return dx, dweight, dbias, dres
        # split: tile sums -> fixed-order sums (+ γ·rstd, dγ, dβ) -> elementwise dx, dres
        a = b = None
        if training and need_dx or dweight is not None or dbias is not None:
            a, b, scale = self._reduce_sums(grad_y, x, mean, rstd, None, weight, bias,
                                            residual, act, slope, True, dweight, dbias)
        else:
            scale = S.scale_of(rstd, weight).contiguous()
        dx = dres = None
        if need_dx or need_dres:
            n = float(x.numel() // x.shape[1])
            dx, dres = self._backward_apply(
                grad_y, x, mean, rstd, scale, bias, residual, act, slope,
                a if training else None, b if training else None, n, need_dx, need_dres)
        return dx, dweight, dbias, dres

    def backward_from_output(self, grad_y, y, weight, bias, residual, rstd, training, act, slope,
                             need_dx, need_dweight, need_dbias, need_dres):
        from .triton_saved_output import backward_from_output  # the memory mode's kernels
        return backward_from_output(self, grad_y, y, weight, bias, residual, rstd, training, act,
                                    slope, need_dx, need_dweight, need_dbias, need_dres)


def _opt(t: Tensor | None) -> Tensor | None:
    """An optional kernel argument: contiguous, or None (the kernel's flag keeps it unread)."""
    return None if t is None else t.contiguous()


BACKEND = TritonBackend()
