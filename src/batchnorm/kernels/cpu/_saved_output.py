"""Numba kernels of the memory mode ``save="output"``: the backward from the layer's output.

Loaded on the first backward of the mode (compiled then, cached on disk). Arrays are flat,
contiguous 1-D views, as in :mod:`._jit`: channels-first ``(N, C, S)`` element
``(n, c, s)`` at ``(n*C + c)*S + s``, channels-last ``(M, C)`` element ``(m, c)`` at ``m*C + c``.

Derivation. The forward computed ``y = act(pre)``, ``pre = x̂·γ + β [+ r]``, with ``x̂ =
(x - mean)·rstd``. Read from ``y`` (the rows' ``output_grad`` and ``inverse``,
:mod:`batchnorm.activations`)::

    g = dy·act'(pre) = dy·d(y)                  d: the derivative written in y
    u = act⁻¹(y) - β [- r] = x̂·γ                so x̂ = u/γ

Sums per channel (float64 across runs): ``sg = Σg``, ``sgu = Σg·u``. Then ``dβ = sg``,
``dγ = Σg·x̂ = sgu/γ``, ``dres = g`` and, with ``a = sg/n`` and ``b = Σg·x̂/n = sgu/(γ·n)``::

    dx = γ·rstd·(g - a - x̂·b) = c1·g - c2 - c3·u,   c1 = γ·rstd, c2 = c1·a, c3 = rstd·b

(training); with running statistics ``c2 = c3 = 0``. ``γ`` is the op's effective weight
(``|γ| >= GAMMA_MIN``), 1 without affine weight; ``β`` is 0 without bias.

Work split: channels-first, ``P`` chunks of samples per channel (``P = 1``: one channel per
parallel item, both passes over the cache-resident slab); channels-last, ``P`` row blocks
whose per-channel partial sums are combined in a fixed order. ``P`` comes from the shape and
the thread count only, and every item writes its own slot: the results are bitwise
reproducible.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from ...activations import CODES
from ._host import (
    SERIAL_ELEMENTS,
    SERIAL_ELEMENTS_LAST,
    _np,
    _threads,
    nchw_chunks,
    nhwc_blocks,
)
from ._jit import _njit_inline as _inline
from ._jit import _parallel

NONE, LEAKY, ELU, SIGMOID, TANH = (CODES[k] for k in ("none", "leaky_relu", "elu", "sigmoid",
                                                      "tanh"))
# _inline/_parallel: the flags of every cpu kernel (_jit: reassoc/contract, never nnan/ninf)


@_inline
def _du(yv, dyv, code, a, inv_a, z, one, arr):
    """``(g, u + β [+ r])`` of one element: ``dy·d(y)`` and ``act⁻¹(y)`` (in ``arr``'s
    dtype)."""
    if code == LEAKY:
        if yv > z:
            return dyv, yv
        return dyv * a, yv * inv_a
    if code == ELU:
        if yv > z:
            return dyv, yv
        return dyv * (yv + a), arr.dtype.type(math.log1p(yv * inv_a))
    if code == SIGMOID:
        return dyv * (yv * (one - yv)), arr.dtype.type(math.log(yv / (one - yv)))
    if code == TANH:
        return dyv * (one - yv * yv), arr.dtype.type(math.atanh(yv))
    return dyv, yv


@_inline
def _du_pl(yv, dyv, a, inv_a, z):
    """:func:`_du` of the piecewise-linear activations (leaky ReLU; identity with
    ``a = inv_a = 1``): no switch, so the loops that call it vectorise."""
    if yv > z:
        return dyv, yv
    return dyv * a, yv * inv_a


@_inline
def _run_sums(dy, y, r, has_res, base, L, code, a, inv_a, sh, z, one):
    """``(Σg, Σg·u)`` over ``[base, base + L)`` in the array dtype."""
    # slice views and range(L): LLVM vectorises these loops (see _segments)
    pl = code == LEAKY or code == NONE  # noqa: SIM109 (kept plain for Numba)
    a_pl = a if code == LEAKY else one
    inv_a_pl = inv_a if code == LEAKY else one
    ys = y[base:base + L]
    ds = dy[base:base + L]
    rs = r[base:base + L]
    sg = z
    sgu = z
    if pl:
        for j in range(L):
            g, p = _du_pl(ys[j], ds[j], a_pl, inv_a_pl, z)
            u = p - sh
            if has_res:
                u -= rs[j]
            sg += g
            sgu += g * u
    else:
        for j in range(L):
            g, p = _du(ys[j], ds[j], code, a, inv_a, z, one, y)
            u = p - sh
            if has_res:
                u -= rs[j]
            sg += g
            sgu += g * u
    return sg, sgu


@_inline
def _run_dx(dy, y, r, has_res, dx, dres, base, L, code, a, inv_a, sh, c1, c2, c3, need_dx,
            need_dres, z, one):
    pl = code == LEAKY or code == NONE  # noqa: SIM109 (kept plain for Numba)
    a_pl = a if code == LEAKY else one
    inv_a_pl = inv_a if code == LEAKY else one
    ys = y[base:base + L]
    ds = dy[base:base + L]
    rs = r[base:base + L]
    xs = dx[base:base + L]
    es = dres[base:base + L]
    if pl:
        for j in range(L):
            g, p = _du_pl(ys[j], ds[j], a_pl, inv_a_pl, z)
            if need_dx:
                u = p - sh
                if has_res:
                    u -= rs[j]
                xs[j] = c1 * g - c2 - c3 * u
            if need_dres:
                es[j] = g
    else:
        for j in range(L):
            g, p = _du(ys[j], ds[j], code, a, inv_a, z, one, y)
            if need_dx:
                u = p - sh
                if has_res:
                    u -= rs[j]
                xs[j] = c1 * g - c2 - c3 * u
            if need_dres:
                es[j] = g


@njit(inline="always")
def _coefs(sg, sgu, n, w, rs, training):
    """``(c1, c2, c3)`` of the dx formula (module docstring), in float64."""
    c1 = w * rs
    if not training:
        return c1, 0.0, 0.0
    return c1, c1 * sg / n, rs * (sgu / w) / n


@_parallel
def nchw_backward_from_output(dy, y, r, has_res, N, C, S, P, w, sh, rstd, code, a, training,
                              need_dx, need_dres, dx, dres, sg_o, sgu_o, tg, tgu):
    """The backward from the output, channels-first (the module docstring's derivation).

    Args:
        dy: the incoming gradient, like ``y``.
        y: the layer's output, flat ``(N·C·S,)``, float32 or float64 (the accumulation dtype).
        r: the residual, like ``y``; ``y`` itself when ``has_res`` is False (then never read).
        has_res: whether the forward added ``r``.
        N, C, S: the channels-first shape.
        P: chunks per channel; chunk ``p`` of channel ``c`` holds the samples
            ``[p*N//P, (p+1)*N//P)``, item ``c*P + p``.
        w: the effective weight ``γ`` (``|γ| >= GAMMA_MIN``; ones without affine weight),
            ``(C,)`` float64.
        sh: β, ``(C,)`` in ``y``'s dtype (zeros without bias).
        rstd: ``1/sqrt(var + eps)`` of the forward, ``(C,)`` float64.
        code: the activation's code (:data:`batchnorm.activations.CODES`; an invertible one).
        a: the activation's parameter (leaky slope, ELU alpha), a float.
        training: whether ``dx`` has the batch-statistics terms (``c2``, ``c3``).
        need_dx, need_dres: which of ``dx``, ``dres`` to write.
        dx, dres: outputs like ``y``; ``y`` itself where not needed (never written).
        sg_o, sgu_o: ``(C,)`` float64, written: ``Σg`` (dβ) and ``Σg·u`` (dγ is ``Σg·u/γ``).
        tg, tgu: ``C*P`` float64 scratch for the chunk sums.
    """
    dt = y.dtype.type
    z = y.dtype.type(0.0)
    one = y.dtype.type(1.0)
    av = y.dtype.type(a)
    inv_a = y.dtype.type(1.0 / a) if a != 0.0 else z
    n = float(N * S)
    for it in prange(C * P):
        c = it // P
        p = it - c * P
        s1 = 0.0
        s2 = 0.0
        for i in range(p * N // P, (p + 1) * N // P):
            q1, q2 = _run_sums(dy, y, r, has_res, (i * C + c) * S, S, code, av, inv_a, sh[c],
                               z, one)
            s1 += q1
            s2 += q2
        tg[it] = s1
        tgu[it] = s2
        if P == 1:  # the channel is whole: dx now, while its slab is in cache
            sg_o[c] = s1
            sgu_o[c] = s2
            c1, c2, c3 = _coefs(s1, s2, n, w[c], rstd[c], training)
            if need_dx or need_dres:
                for i in range(N):
                    _run_dx(dy, y, r, has_res, dx, dres, (i * C + c) * S, S, code, av, inv_a,
                            sh[c], dt(c1), dt(c2), dt(c3), need_dx, need_dres, z, one)
    if P > 1:
        for c in range(C):
            s1 = 0.0
            s2 = 0.0
            for p in range(P):
                s1 += tg[c * P + p]
                s2 += tgu[c * P + p]
            sg_o[c] = s1
            sgu_o[c] = s2
        if need_dx or need_dres:
            for it in prange(C * P):
                c = it // P
                p = it - c * P
                c1, c2, c3 = _coefs(sg_o[c], sgu_o[c], n, w[c], rstd[c], training)
                for i in range(p * N // P, (p + 1) * N // P):
                    _run_dx(dy, y, r, has_res, dx, dres, (i * C + c) * S, S, code, av, inv_a,
                            sh[c], dt(c1), dt(c2), dt(c3), need_dx, need_dres, z, one)


@_parallel
def nhwc_backward_from_output(dy, y, r, has_res, M, C, P, w, sh, rstd, code, a, training,
                              need_dx, need_dres, dx, dres, sg_o, sgu_o, tg, tgu):
    """The backward from the output, channels-last (the module docstring's derivation); the
    block sums are combined over the blocks in ascending order.

    Args:
        dy: the incoming gradient, like ``y``.
        y: the layer's output, flat ``(M·C,)``, float32 or float64 (the accumulation dtype).
        r: the residual, like ``y``; ``y`` itself when ``has_res`` is False (then never read).
        has_res: whether the forward added ``r``.
        M, C: the channels-last shape.
        P: row blocks; block ``p`` holds the rows ``[p*M//P, (p+1)*M//P)``, item ``p*C + c``
            (block-major).
        w: the effective weight ``γ`` (``|γ| >= GAMMA_MIN``; ones without affine weight),
            ``(C,)`` float64.
        sh: β, ``(C,)`` in ``y``'s dtype (zeros without bias).
        rstd: ``1/sqrt(var + eps)`` of the forward, ``(C,)`` float64.
        code: the activation's code (:data:`batchnorm.activations.CODES`; an invertible one).
        a: the activation's parameter (leaky slope, ELU alpha), a float.
        training: whether ``dx`` has the batch-statistics terms (``c2``, ``c3``).
        need_dx, need_dres: which of ``dx``, ``dres`` to write.
        dx, dres: outputs like ``y``; ``y`` itself where not needed (never written).
        sg_o, sgu_o: ``(C,)`` float64, written: ``Σg`` (dβ) and ``Σg·u`` (dγ is ``Σg·u/γ``).
        tg, tgu: ``C*P`` float64 scratch for the block sums.
    """
    z = y.dtype.type(0.0)
    one = y.dtype.type(1.0)
    av = y.dtype.type(a)
    inv_a = y.dtype.type(1.0 / a) if a != 0.0 else z
    pl = code == LEAKY or code == NONE  # noqa: SIM109 (kept plain for Numba)
    av_pl = av if code == LEAKY else one
    inv_a_pl = inv_a if code == LEAKY else one
    n = float(M)
    for p in prange(P):
        acc1 = np.zeros(C, dtype=y.dtype)
        acc2 = np.zeros(C, dtype=y.dtype)
        t1 = tg[p * C:(p + 1) * C]
        t2 = tgu[p * C:(p + 1) * C]
        t1[:] = 0.0
        t2[:] = 0.0
        k = 0
        for m in range(p * M // P, (p + 1) * M // P):
            ys = y[m * C:(m + 1) * C]
            ds = dy[m * C:(m + 1) * C]
            rs = r[m * C:(m + 1) * C]
            if pl:
                for c in range(C):
                    g, q = _du_pl(ys[c], ds[c], av_pl, inv_a_pl, z)
                    u = q - sh[c]
                    if has_res:
                        u -= rs[c]
                    acc1[c] += g
                    acc2[c] += g * u
            else:
                for c in range(C):
                    g, q = _du(ys[c], ds[c], code, av, inv_a, z, one, y)
                    u = q - sh[c]
                    if has_res:
                        u -= rs[c]
                    acc1[c] += g
                    acc2[c] += g * u
            k += 1
            if k == 256:  # flush the accumulation-dtype run into float64
                for c in range(C):
                    t1[c] += acc1[c]
                    t2[c] += acc2[c]
                    acc1[c] = z
                    acc2[c] = z
                k = 0
        for c in range(C):
            t1[c] += acc1[c]
            t2[c] += acc2[c]
    for c in range(C):
        s1 = 0.0
        s2 = 0.0
        for p in range(P):
            s1 += tg[p * C + c]
            s2 += tgu[p * C + c]
        sg_o[c] = s1
        sgu_o[c] = s2
    if need_dx or need_dres:
        c1 = np.empty(C, dtype=y.dtype)
        c2 = np.empty(C, dtype=y.dtype)
        c3 = np.empty(C, dtype=y.dtype)
        for c in range(C):
            c1[c], c2[c], c3[c] = _coefs(sg_o[c], sgu_o[c], n, w[c], rstd[c], training)
        for p in prange(P):
            for m in range(p * M // P, (p + 1) * M // P):
                ys = y[m * C:(m + 1) * C]
                ds = dy[m * C:(m + 1) * C]
                rs = r[m * C:(m + 1) * C]
                xs = dx[m * C:(m + 1) * C]
                es = dres[m * C:(m + 1) * C]
                if pl:
                    for c in range(C):
                        g, q = _du_pl(ys[c], ds[c], av_pl, inv_a_pl, z)
                        if need_dx:
                            u = q - sh[c]
                            if has_res:
                                u -= rs[c]
                            xs[c] = c1[c] * g - c2[c] - c3[c] * u
                        if need_dres:
                            es[c] = g
                else:
                    for c in range(C):
                        g, q = _du(ys[c], ds[c], code, av, inv_a, z, one, y)
                        if need_dx:
                            u = q - sh[c]
                            if has_res:
                                u -= rs[c]
                            xs[c] = c1[c] * g - c2[c] - c3[c] * u
                        if need_dres:
                            es[c] = g


def backward_from_output(
    grad_y: Tensor, y: Tensor, weight: Tensor | None, bias: Tensor | None,
    residual: Tensor | None, rstd: Tensor, training: bool, act: str, slope: float,
    need_dx: bool, need_dweight: bool, need_dbias: bool, need_dres: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """The host side of :meth:`batchnorm.kernels.base.Backend.backward_from_output`."""
    yf = _np(y)
    dt = yf.dtype
    c = y.shape[1]
    first = y.dim() == 3
    threads = _threads(yf.size, SERIAL_ELEMENTS if first else SERIAL_ELEMENTS_LAST)
    w = np.ones(c) if weight is None else _np(weight).astype(np.float64)
    sh = np.zeros(c, dtype=dt) if bias is None else _np(bias).astype(dt)
    rs = _np(rstd).astype(np.float64)
    dyf = _np(grad_y.contiguous())
    rf = _np(residual) if residual is not None else yf
    dx = torch.empty_like(y) if need_dx else None
    dres = torch.empty_like(y) if need_dres else None
    dxf = _np(dx) if dx is not None else yf
    drf = _np(dres) if dres is not None else yf
    sg, sgu = np.empty(c), np.empty(c)
    code = CODES[act]
    if first:
        n, s = y.shape[0], y.shape[2]
        # chunks of whole samples: at most N of them
        p = max(1, min(nchw_chunks(c, n * s, threads), n))
        tmp = np.empty((2, c * p))
        nchw_backward_from_output(dyf, yf, rf, residual is not None, n, c, s, p, w, sh, rs,
                                  code, float(slope), bool(training), need_dx, need_dres, dxf,
                                  drf, sg, sgu, tmp[0], tmp[1])
    else:
        m = y.shape[0]
        p = nhwc_blocks(m, c, threads)
        tmp = np.empty((2, c * p))
        nhwc_backward_from_output(dyf, yf, rf, residual is not None, m, c, p, w, sh, rs, code,
                                  float(slope), bool(training), need_dx, need_dres, dxf, drf,
                                  sg, sgu, tmp[0], tmp[1])
    dw = torch.from_numpy(sgu / w).to(weight.dtype) if need_dweight and weight is not None \
        else None
    db = torch.from_numpy(sg).to(bias.dtype) if need_dbias and bias is not None else None
    return dx, dw, db, dres
