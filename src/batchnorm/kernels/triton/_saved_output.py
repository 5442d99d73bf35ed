"""Triton kernels of the memory mode ``save="output"``: the backward from the layer's output.

Same tiling as the package's kernels (:mod:`batchnorm.kernels.triton`; every input viewed
as ``(R, C, S)``, channels-last ``(M, C)`` as ``(M, C, 1)``; tiles of its split plan) and the same
determinism: per-tile partials into a ``(K, C)`` buffer, summed in a fixed order, no atomics.

Derivation (as :mod:`batchnorm.kernels.cpu._saved_output`). The forward computed
``y = act(pre)``, ``pre = x̂·γ + β [+ r]``; from ``y`` alone::

    g = dy·d(y)                      act' written in y (batchnorm.activations)
    u = act⁻¹(y) - β [- r] = x̂·γ     so x̂ = u/γ
    sg = Σg, sgu = Σg·u              per channel (tile partials, fixed-order sum)
    dβ = sg;  dγ = sgu/γ;  dres = g
    dx = c1·g - c2 - c3·u,  c1 = γ·rstd, c2 = c1·sg/n, c3 = rstd·sgu/(γ·n)   (training)
    dx = c1·g                                                               (running stats)

``γ`` is the op's effective weight (``|γ| >= GAMMA_MIN``), 1 without affine weight. Three
launches: tile sums, channel sums with the coefficients, elementwise ``dx``/``dres``.
Accumulation in float32 (float64 input goes to the reference backend, as everywhere here).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from batchnorm.activations import CODES

from . import _opt
from ._tiles import _sum3, _tile

_NONE = tl.constexpr(CODES["none"])
_LEAKY = tl.constexpr(CODES["leaky_relu"])
_ELU = tl.constexpr(CODES["elu"])
_SIGMOID = tl.constexpr(CODES["sigmoid"])
_TANH = tl.constexpr(CODES["tanh"])


@triton.jit
def _g_and_u(y_ptr, dy_ptr, b_ptr, res_ptr, offs, mask, cols, cmask, a,
             HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr):
    """``(g, u)`` of a tile, float32; masked lanes are 0."""
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = y
    if ACT == _LEAKY:
        g = tl.where(y > 0.0, g, g * a)
        p = tl.where(y > 0.0, y, y / a)
    elif ACT == _ELU:
        g = tl.where(y > 0.0, g, g * (y + a))
        # where(): the untaken branch may be log(<= 0) for y > 0 lanes; it is discarded
        p = tl.where(y > 0.0, y, tl.log(1.0 + y / a))
    elif ACT == _SIGMOID:
        y = tl.where(mask, y, 0.5)  # masked lanes: a finite logit
        g = g * (y * (1.0 - y))
        p = tl.log(y / (1.0 - y))
    elif ACT == _TANH:
        g = g * (1.0 - y * y)
        p = 0.5 * tl.log((1.0 + y) / (1.0 - y))
    u = p
    if HAS_B:
        u -= tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :, None]
    if HAS_RES:
        u -= tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, g, 0.0), tl.where(mask, u, 0.0)


@triton.jit
def _from_output_reduce_kernel(
    y_ptr, dy_ptr, b_ptr, res_ptr, pg_ptr, pgu_ptr, R, C, S, stride_r, stride_c, a,
    HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr,
):
    """Per-tile (Σg, Σg·u) into (K, C) buffers.

    Args:
        y_ptr: the layer's output ``(R, C, S)``, float32/float16/bfloat16.
        dy_ptr: the incoming gradient, like ``y``.
        b_ptr: β ``(C,)`` (None where absent).
        res_ptr: the residual, like ``y`` (None where absent).
        pg_ptr, pgu_ptr: ``(K, C)`` float32, written: the tile sums.
        R, C, S, stride_r, stride_c, BLOCK_R, BLOCK_C, BLOCK_S, INT64: the shape and the tile
            (:mod:`._forward`).
        a: the activation's parameter (float).
        HAS_B, HAS_RES: whether β, the residual are given.
        ACT: the activation's code (an invertible one).
    """
    offs, mask, cols, cmask, k, _first = _tile(
        tl.program_id(0), R, C, S, stride_r, stride_c, BLOCK_R, BLOCK_C, BLOCK_S, INT64)
    g, u = _g_and_u(y_ptr, dy_ptr, b_ptr, res_ptr, offs, mask, cols, cmask, a, HAS_B, HAS_RES,
                    ACT)
    out = k * C + cols
    tl.store(pg_ptr + out, _sum3(g), mask=cmask)
    tl.store(pgu_ptr + out, _sum3(g * u), mask=cmask)


@triton.jit
def _from_output_sum_kernel(
    pg_ptr, pgu_ptr, w_ptr, rstd_ptr, coef_ptr, dw_ptr, db_ptr, K, C, n,
    HAS_W: tl.constexpr, TRAINING: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Fixed-order sums over the K tiles; ``coef`` (3, C) = (c1, c2, c3); dγ, dβ if asked.

    Args:
        pg_ptr, pgu_ptr: the tile sums ``(K, C)`` float32.
        w_ptr: the effective γ ``(C,)``, any float dtype (None where absent: 1).
        rstd_ptr: ``(C,)`` float32.
        coef_ptr: ``(3, C)`` float32, written: c1, c2, c3.
        dw_ptr, db_ptr: dγ and dβ ``(C,)`` in γ's / β's dtype (None where not needed).
        K, C: the partial buffers' shape.
        n: elements per channel (float).
        HAS_W: whether γ is given.
        TRAINING: whether c2 and c3 are the batch-statistics terms
            (else 0).
        NEED_DW, NEED_DB: which outputs to write.
        BLOCK_K, BLOCK_C: the block of partials one
            program reads.
    """
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    sg = tl.zeros((BLOCK_C,), tl.float32)
    sgu = tl.zeros((BLOCK_C,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K))[:, None]
        m = (ks < K) & cmask[None, :]
        sg += tl.sum(tl.load(pg_ptr + ks * C + cols[None, :], mask=m, other=0.0), axis=0)
        sgu += tl.sum(tl.load(pgu_ptr + ks * C + cols[None, :], mask=m, other=0.0), axis=0)
    w = tl.full((BLOCK_C,), 1.0, tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + cols, mask=cmask, other=0.0)
    c1 = w * rstd
    c2 = tl.zeros((BLOCK_C,), tl.float32)
    c3 = tl.zeros((BLOCK_C,), tl.float32)
    if TRAINING:
        c2 = c1 * sg / n
        c3 = rstd * (sgu / w) / n
    tl.store(coef_ptr + cols, c1, mask=cmask)
    tl.store(coef_ptr + C + cols, c2, mask=cmask)
    tl.store(coef_ptr + 2 * C + cols, c3, mask=cmask)
    if NEED_DW:
        tl.store(dw_ptr + cols, (sgu / w).to(dw_ptr.dtype.element_ty), mask=cmask)
    if NEED_DB:
        tl.store(db_ptr + cols, sg.to(db_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _from_output_apply_kernel(
    y_ptr, dy_ptr, b_ptr, res_ptr, coef_ptr, dx_ptr, dres_ptr, R, C, S, stride_r, stride_c, a,
    HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, NEED_DX: tl.constexpr,
    NEED_DRES: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr,
):
    """dx = c1·g - c2 - c3·u; dres = g.

    Args:
        y_ptr: the layer's output ``(R, C, S)``, float32/float16/bfloat16.
        dy_ptr: the incoming gradient, like ``y``.
        b_ptr: β ``(C,)`` (None where absent).
        res_ptr: the residual, like ``y`` (None where absent).
        coef_ptr: ``(3, C)`` float32: c1, c2, c3.
        dx_ptr, dres_ptr: outputs like ``y`` (None where not needed).
        R, C, S, stride_r, stride_c, BLOCK_R, BLOCK_C, BLOCK_S, INT64: the shape and the tile
            (:mod:`._forward`).
        a: the activation's parameter (float).
        HAS_B, HAS_RES: whether β, the residual are given.
        ACT: the activation's code (an invertible one).
        NEED_DX, NEED_DRES: which outputs to write.
    """
    offs, mask, cols, cmask, _k, _first = _tile(
        tl.program_id(0), R, C, S, stride_r, stride_c, BLOCK_R, BLOCK_C, BLOCK_S, INT64)
    g, u = _g_and_u(y_ptr, dy_ptr, b_ptr, res_ptr, offs, mask, cols, cmask, a, HAS_B, HAS_RES,
                    ACT)
    if NEED_DX:
        c1 = tl.load(coef_ptr + cols, mask=cmask, other=0.0)
        c2 = tl.load(coef_ptr + C + cols, mask=cmask, other=0.0)
        c3 = tl.load(coef_ptr + 2 * C + cols, mask=cmask, other=0.0)
        dx = c1[None, :, None] * g - c2[None, :, None] - c3[None, :, None] * u
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if NEED_DRES:
        tl.store(dres_ptr + offs, g.to(dres_ptr.dtype.element_ty), mask=mask)


def backward_from_output(
    backend, grad_y: Tensor, y: Tensor, weight: Tensor | None, bias: Tensor | None,
    residual: Tensor | None, rstd: Tensor, training: bool, act: str, slope: float,
    need_dx: bool, need_dweight: bool, need_dbias: bool, need_dres: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """The host side of :meth:`batchnorm.kernels.base.Backend.backward_from_output` for
    ``backend`` (a :class:`~batchnorm.kernels.triton.TritonBackend`: its split plan, its
    reduction blocks and its launcher)."""
    grad_y = grad_y.contiguous()
    plan = backend._split(y)
    flags = dict(HAS_B=bias is not None, HAS_RES=residual is not None, ACT=CODES[act])
    pg, pgu = (y.new_empty((plan.K, plan.C), dtype=torch.float32) for _ in range(2))
    backend._launch(_from_output_reduce_kernel)[plan.grid](
        y, grad_y, _opt(bias), _opt(residual), pg, pgu, *plan.dims(), float(slope), **flags,
        **plan.blocks, num_warps=plan.num_warps)
    coef = y.new_empty((3, plan.C), dtype=torch.float32)
    dw = torch.empty_like(weight) if need_dweight and weight is not None else None
    db = torch.empty_like(bias) if need_dbias and bias is not None else None
    grid, blocks, warps = backend._reduction(plan.K, plan.C)
    backend._launch(_from_output_sum_kernel)[grid](
        pg, pgu, _opt(weight), rstd.contiguous(), coef, dw, db, plan.K, plan.C, plan.n,
        HAS_W=weight is not None, TRAINING=bool(training), NEED_DW=dw is not None,
        NEED_DB=db is not None, **blocks, num_warps=warps)
    dx = torch.empty_like(y) if need_dx else None
    dres = torch.empty_like(y) if need_dres else None
    if need_dx or need_dres:
        backend._launch(_from_output_apply_kernel)[plan.grid](
            y, grad_y, _opt(bias), _opt(residual), coef, dx, dres, *plan.dims(), float(slope),
            **flags, NEED_DX=need_dx, NEED_DRES=need_dres, **plan.blocks,
            num_warps=plan.num_warps)
    return dx, dw, db, dres
