"""Backward Triton kernels: the persistent backward, tile sums, their fixed-order sum, apply.

``g = dy·act'(pre)`` with ``pre`` recomputed from ``x``; ``Σg`` (dβ), ``Σg·x̂`` (dγ), then
``dx = scale·(g - Σg/n - x̂·Σg·x̂/n)`` in training, ``dx = scale·g`` with running statistics, and
``dres = g``. Persistent strategy: :func:`_bwd_persistent_kernel` (one launch). Split strategy:
:func:`_bwd_reduce_kernel` (tile sums into ``(K, C)``) → :func:`_bwd_sum_kernel` (their sum in a
fixed order, with ``γ·rstd``, dγ, dβ) → :func:`_bwd_apply_kernel` (``dx``, ``dres``; also the
distributed path's second pass with all-reduced ``a``, ``b``). The common arguments are those of
:mod:`._forward`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._activations import _act_grad
from ._tiles import _channel_scale, _pre, _sum3, _tile

# Pointers: x, residual, y, dy, dx, dres (R, C, S) contiguous (channels-last: S = 1);
# w, b (C,) any float dtype; mean, rstd, var, scale, shift, a, b-coefficients (C,) float32;
# partial buffers (K, C) float32 with K the number of chunks per channel.


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
    """Backward of one channel block whose whole slab is this program's tile: ``g``, ``Σg``,
    ``Σg·x̂``, then ``dx``/``dres`` from the registers; one launch.

    Args:
        x_ptr: the input ``(R, C, S)``, float32/float16/bfloat16.
        dy_ptr: the incoming gradient, like ``x``.
        mean_ptr, rstd_ptr: the statistics ``(C,)`` float32.
        w_ptr, b_ptr: γ and β ``(C,)``, any float dtype (None where absent).
        res_ptr: the residual, like ``x`` (None where absent).
        dx_ptr, dres_ptr: outputs like ``x`` (None where not needed).
        dw_ptr, db_ptr: dγ and dβ ``(C,)`` in γ's / β's dtype (None where not needed).
        n: elements per channel, ``R·S`` (float).
        R, C, S, stride_r, stride_c, BLOCK_R, BLOCK_C, BLOCK_S, INT64: the shape and the tile
            (module docstring).
        slope, HAS_W, HAS_B, HAS_RES, ACT: as in the module docstring.
        TRAINING: whether ``dx`` has the batch-statistics terms.
        NEED_DX, NEED_DRES, NEED_DW, NEED_DB: which outputs to write.
    """
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
    """Per-tile (Σg, Σg·x̂) into (K, C) buffers.

    Args:
        x_ptr: the input ``(R, C, S)``, float32/float16/bfloat16.
        dy_ptr: the incoming gradient, like ``x``.
        mean_ptr, rstd_ptr: the statistics ``(C,)`` float32.
        scale_ptr: ``γ·rstd`` ``(C,)`` float32 when HAS_SCALE, else None (computed).
        w_ptr, b_ptr: γ and β ``(C,)``, any float dtype (None where absent).
        res_ptr: the residual, like ``x`` (None where absent).
        pg_ptr, pgx_ptr: ``(K, C)`` float32, written: the tile sums.
        R, C, S, stride_r, stride_c, BLOCK_R, BLOCK_C, BLOCK_S, INT64: the shape and the tile
            (module docstring).
        slope, HAS_W, HAS_B, HAS_RES, ACT: as in the module docstring.
        HAS_SCALE: whether ``scale_ptr`` is given.
    """
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
    """Sum the (K, C) partial sums in a fixed order; also γ·rstd, dγ and dβ when asked.

    Args:
        pg_ptr, pgx_ptr: the tile sums ``(K, C)`` float32.
        rstd_ptr: ``(C,)`` float32.
        w_ptr: γ ``(C,)``, any float dtype (None where absent).
        sum_g_ptr, sum_gx_ptr: ``(C,)`` float32, written: ``Σg`` and ``Σg·x̂``.
        scale_ptr: ``(C,)`` float32, written with ``γ·rstd`` when NEED_SCALE (else None).
        dw_ptr, db_ptr: dγ and dβ ``(C,)`` in γ's / β's dtype (None where not needed).
        K, C: the partial buffers' shape; BLOCK_K, BLOCK_C: the block of partials one program
            reads (one program per ``BLOCK_C`` channels).
        HAS_W: whether γ is given.
        NEED_SCALE, NEED_DW, NEED_DB: which outputs to write.
    """
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
    when a and b are given, n when they are the sums), dx = scale·g (eval); dres = g.

    Args:
        x_ptr: the input ``(R, C, S)``, float32/float16/bfloat16.
        dy_ptr: the incoming gradient, like ``x``.
        mean_ptr, rstd_ptr: the statistics ``(C,)`` float32.
        scale_ptr: ``γ·rstd`` ``(C,)`` float32.
        b_ptr: β ``(C,)``, any float dtype (None where absent).
        res_ptr: the residual, like ``x`` (None where absent).
        a_ptr, bb_ptr: ``(C,)`` float32: ``Σg`` and ``Σg·x̂`` (or ``a``, ``b`` themselves), read
            in training.
        dx_ptr, dres_ptr: outputs like ``x`` (None where not needed).
        n_div: what ``a_ptr``/``bb_ptr`` are divided by (float).
        R, C, S, stride_r, stride_c, BLOCK_R, BLOCK_C, BLOCK_S, INT64: the shape and the tile
            (module docstring).
        slope, HAS_B, HAS_RES, ACT: as in the module docstring.
        TRAINING: whether ``dx`` has the batch-statistics terms.
        NEED_X: whether ``x`` is read (training, or an activation other than none).
        NEED_DX, NEED_DRES: which outputs to write.
    """
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
