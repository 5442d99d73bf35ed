"""Channels-last ``(M, C)`` backward kernels: block sums, a fixed-order combine, ``dx``.

``g = dy·act'(pre)`` with ``pre`` recomputed from ``x``; per row block the float64 sums
``(Σg, Σg·(x - mean))`` (region 1, block-major items ``p*C + c``), combined over the blocks in
ascending order on one thread, then ``dx = scale·(g - a - (x - mean)·rstd·b)`` and ``dres = g``
per block (region 2); Numba's ``prange`` has no barrier, so a global reduction takes two
regions. For none/ReLU ``g`` is computed in registers (:func:`._segments._g1`); the other
activations go through a row-sized scratch (:func:`_row_grad`). The arguments are those of
:mod:`._nhwc`, plus ``dy``/``dx``/``dres`` (flat ``(M·C,)``, ``x``'s dtype).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._activations import NONE, RELU, _grad_run
from ._jit import _FLUSH_ROWS, _njit_called, _njit_inline, _parallel
from ._segments import _g1

#: row widths, in bytes, whose block sums take one row per sweep (the others: two)
_ONE_ROW_BYTES = (384, 3072)


@_njit_inline
def _flush(tot, run, C, z):
    """Add the accumulation-dtype runs into the float64 totals and zero the runs."""
    for c in range(C):
        tot[c] += run[c]
        run[c] = z


@_njit_inline
def _row_grad(dy, x, r, g, o, C, mean, scale, shift, has_res, code, slope, z):
    """``g[:C] = dy·act'(pre)`` for row offset ``o`` of a channels-last tensor."""
    dr = dy[o:o + C]
    if code == NONE:
        for c in range(C):
            g[c] = dr[c]
        return
    xr = x[o:o + C]
    if code == RELU:
        if has_res:
            rr = r[o:o + C]
            for c in range(C):
                p = (xr[c] - mean[c]) * scale[c] + shift[c] + rr[c]
                g[c] = dr[c] if p > z else z
        else:
            for c in range(C):
                p = (xr[c] - mean[c]) * scale[c] + shift[c]
                g[c] = dr[c] if p > z else z
        return
    if has_res:
        rr = r[o:o + C]
        for c in range(C):
            g[c] = (xr[c] - mean[c]) * scale[c] + shift[c] + rr[c]
    else:
        for c in range(C):
            g[c] = (xr[c] - mean[c]) * scale[c] + shift[c]
    _grad_run(dr, g, C, code, slope, z)


@_njit_inline
def _g2(d0, d1, e0, e1, sc, sh, q0, q1, code, has_res, z):
    """:func:`_g1` of two rows."""
    return _g1(d0, e0, sc, sh, q0, code, has_res, z), _g1(d1, e1, sc, sh, q1, code, has_res, z)


@_njit_called
def _nhwc_block_sums(dy, x, r, has_res, C, r0, r1, mean, scale, shift, code, slope, sg_o,
                     sgx_o, P, p, z):
    """Per-channel ``(Σg, Σg·(x - mean))`` of rows ``[r0, r1)`` (float64) into item ``p*C+c``."""
    tg = np.zeros(C)
    tgx = np.zeros(C)
    rg = np.zeros(C, dtype=x.dtype)
    rgx = np.zeros(C, dtype=x.dtype)
    cnt = 0
    row = r0
    # Rows of 384 B to 3 KB (96 to 768 float32 channels) are taken one per sweep, in memory
    # order; narrower and wider ones two per sweep (docs/decisions.md, "Channels-last backward
    # sums: one row per sweep for mid-width rows")
    one_row = _ONE_ROW_BYTES[0] <= C * x.itemsize <= _ONE_ROW_BYTES[1]
    if code == NONE and not has_res and one_row:
        while row < r1:
            o = row * C
            x0 = x[o:o + C]
            d0 = dy[o:o + C]
            for c in range(C):
                rg[c] += d0[c]
                rgx[c] += d0[c] * (x0[c] - mean[c])
            row += 1
            cnt += 1
            if cnt >= _FLUSH_ROWS:
                _flush(tg, rg, C, z)
                _flush(tgx, rgx, C, z)
                cnt = 0
    elif code == NONE and not has_res:
        # g = dy: the loop of a layer whose activation runs as its own module (what
        # convert_model gives), without the select and the masked loads of the general loop
        while row + 2 <= r1:
            o = row * C
            x0 = x[o:o + C]
            x1 = x[o + C:o + 2 * C]
            d0 = dy[o:o + C]
            d1 = dy[o + C:o + 2 * C]
            for c in range(C):
                e0 = x0[c] - mean[c]
                e1 = x1[c] - mean[c]
                rg[c] += d0[c] + d1[c]
                rgx[c] += d0[c] * e0 + d1[c] * e1
            row += 2
            cnt += 2
            if cnt >= _FLUSH_ROWS:
                _flush(tg, rg, C, z)
                _flush(tgx, rgx, C, z)
                cnt = 0
    elif (code == NONE or code == RELU) and one_row:  # noqa: SIM109 (kept plain for Numba)
        # g computed in the accumulation loop
        while row < r1:
            o = row * C
            x0 = x[o:o + C]
            d0 = dy[o:o + C]
            q0 = r[o:o + C] if has_res else x0
            for c in range(C):
                e0 = x0[c] - mean[c]
                g0 = _g1(d0[c], e0, scale[c], shift[c], q0[c], code, has_res, z)
                rg[c] += g0
                rgx[c] += g0 * e0
            row += 1
            cnt += 1
            if cnt >= _FLUSH_ROWS:
                _flush(tg, rg, C, z)
                _flush(tgx, rgx, C, z)
                cnt = 0
    elif code == NONE or code == RELU:  # noqa: SIM109 (kept plain for Numba)
        # g computed in the accumulation loop, two rows per sweep of the channel vectors
        while row + 2 <= r1:
            o = row * C
            x0 = x[o:o + C]
            x1 = x[o + C:o + 2 * C]
            d0 = dy[o:o + C]
            d1 = dy[o + C:o + 2 * C]
            q0 = r[o:o + C] if has_res else x0
            q1 = r[o + C:o + 2 * C] if has_res else x1
            for c in range(C):
                e0 = x0[c] - mean[c]
                e1 = x1[c] - mean[c]
                g0, g1 = _g2(d0[c], d1[c], e0, e1, scale[c], shift[c], q0[c], q1[c], code,
                             has_res, z)
                rg[c] += g0 + g1
                rgx[c] += g0 * e0 + g1 * e1
            row += 2
            cnt += 2
            if cnt >= _FLUSH_ROWS:
                _flush(tg, rg, C, z)
                _flush(tgx, rgx, C, z)
                cnt = 0
    g = np.empty(C, dtype=x.dtype)
    for rest in range(row, r1):
        o = rest * C
        _row_grad(dy, x, r, g, o, C, mean, scale, shift, has_res, code, slope, z)
        xr = x[o:o + C]
        for c in range(C):
            rg[c] += g[c]
            rgx[c] += g[c] * (xr[c] - mean[c])
        cnt += 1
        if cnt >= _FLUSH_ROWS:
            _flush(tg, rg, C, z)
            _flush(tgx, rgx, C, z)
            cnt = 0
    _flush(tg, rg, C, z)
    _flush(tgx, rgx, C, z)
    for c in range(C):
        sg_o[p * C + c] = tg[c]
        sgx_o[p * C + c] = tgx[c]


@_njit_called
def _nhwc_dx_rows(dy, x, r, has_res, C, r0, r1, mean, scale, shift, code, slope, a, rb,
                  need_dx, need_dres, dx, dres, z):
    if code == NONE and not has_res and need_dx and not need_dres:
        for row in range(r0, r1):  # g = dy (as in the sums)
            o = row * C
            x0 = x[o:o + C]
            d0 = dy[o:o + C]
            o0 = dx[o:o + C]
            for c in range(C):
                o0[c] = scale[c] * (d0[c] - a[c] - (x0[c] - mean[c]) * rb[c])
        return
    if (code == NONE or code == RELU) and need_dx:  # noqa: SIM109 (kept plain for Numba)
        # g computed in the dx loop, one row per sweep (two rows, as the sums take for narrow
        # and wide rows, were slower here: one more output and three more inputs; docs/decisions.md,
        # "Channels-last backward for none/ReLU: `g` in registers")
        for row in range(r0, r1):
            o = row * C
            x0 = x[o:o + C]
            d0 = dy[o:o + C]
            q0 = r[o:o + C]
            o0 = dx[o:o + C]
            if need_dres:
                s0 = dres[o:o + C]
                for c in range(C):
                    e0 = x0[c] - mean[c]
                    g0 = _g1(d0[c], e0, scale[c], shift[c], q0[c], code, has_res, z)
                    o0[c] = scale[c] * (g0 - a[c] - e0 * rb[c])
                    s0[c] = g0
            else:
                for c in range(C):
                    e0 = x0[c] - mean[c]
                    g0 = _g1(d0[c], e0, scale[c], shift[c], q0[c], code, has_res, z)
                    o0[c] = scale[c] * (g0 - a[c] - e0 * rb[c])
        return
    g = np.empty(C, dtype=x.dtype)
    for row in range(r0, r1):
        o = row * C
        _row_grad(dy, x, r, g, o, C, mean, scale, shift, has_res, code, slope, z)
        if need_dx:
            xr = x[o:o + C]
            dxr = dx[o:o + C]
            for c in range(C):
                dxr[c] = scale[c] * (g[c] - a[c] - (xr[c] - mean[c]) * rb[c])
        if need_dres:
            drr = dres[o:o + C]
            for c in range(C):
                drr[c] = g[c]


@_parallel
def nhwc_backward(dy, x, r, has_res, M, C, P, mean, rstd, scale, shift, code, slope,
                  training, need_sums, need_dx, need_dres, dx, dres, sg_o, sgx_o, tg, tgx):
    """Backward: block sums (region 1), fixed-order combine, ``dx``/``dres`` (region 2).

    Args:
        dy: the incoming gradient, like ``x``.
        x: the input, flat ``(M·C,)``, float32 or float64 (the accumulation dtype).
        r: the residual, like ``x``, added before the activation; ``x`` itself when ``has_res``
            is False (then never read).
        has_res: whether ``r`` is added.
        M, C: the channels-last shape (rows, channels).
        P: row blocks (``cpu.nhwc_blocks``); block ``p`` holds the rows
            ``[p*M//P, (p+1)*M//P)``.
        mean, rstd, scale, shift: the forward's per-channel values, ``(C,)`` in ``x``'s dtype
            (``pre = (x - mean)·scale + shift [+ r]`` is recomputed from them).
        code: the activation's code (:data:`batchnorm.activations.CODES`).
        slope: the activation's parameter (leaky slope, ELU alpha), a scalar of ``x``'s dtype.
        training: whether ``dx`` has the batch-statistics terms (``a = Σg/n``, ``b = Σg·x̂/n``);
            False with running statistics (``a = b = 0``).
        need_sums: whether to compute ``Σg`` and ``Σg·x̂`` (else written as 0).
        need_dx, need_dres: which of ``dx``, ``dres`` to write.
        dx, dres: outputs like ``x`` (``dres = g``); ``x`` itself where not needed (never written).
        sg_o, sgx_o: ``(C,)`` in ``x``'s dtype, written: ``Σg`` (dβ) and ``rstd·Σg·(x - mean)``
            (dγ).
        tg, tgx: ``C*P`` float64 scratch for the block sums, item
            ``p*C + c``.
    """
    z = x.dtype.type(0.0)
    if need_sums:
        for p in prange(P):
            _nhwc_block_sums(dy, x, r, has_res, C, p * M // P, (p + 1) * M // P, mean, scale,
                             shift, code, slope, tg, tgx, P, p, z)
    a = np.zeros(C, dtype=x.dtype)
    rb = np.zeros(C, dtype=x.dtype)
    sg = np.zeros(C)  # the blocks' sums, in ascending block order, vectorized along C
    sgx = np.zeros(C)
    if need_sums:
        for p in range(P):
            o = p * C
            for c in range(C):
                sg[c] += tg[o + c]
                sgx[c] += tgx[o + c]
    for c in range(C):
        sg_o[c] = sg[c]
        sgx_o[c] = sgx[c] * rstd[c]
        if training:
            a[c] = sg[c] / M
            rb[c] = x.dtype.type(sgx_o[c] / M) * rstd[c]
    if need_dx or need_dres:
        for p in prange(P):
            _nhwc_dx_rows(dy, x, r, has_res, C, p * M // P, (p + 1) * M // P, mean, scale,
                          shift, code, slope, a, rb, need_dx, need_dres, dx, dres, z)



@_parallel
def nhwc_backward_apply(dy, x, r, has_res, M, C, P, mean, rstd, scale, shift, a, b, code,
                        slope, need_dx, need_dres, dx, dres):
    """``dx``/``dres`` with given ``a``, ``b`` (the distributed path and the narrow
    tensors' super rows); the second region of :func:`nhwc_backward`.

    Args:
        dy: the incoming gradient, like ``x``.
        x: the input, flat ``(M·C,)``, float32 or float64 (the accumulation dtype).
        r: the residual, like ``x``, added before the activation; ``x`` itself when ``has_res``
            is False (then never read).
        has_res: whether ``r`` is added.
        M, C: the channels-last shape (rows, channels).
        P: row blocks (``cpu.nhwc_blocks``); block ``p`` holds the rows
            ``[p*M//P, (p+1)*M//P)``.
        mean, rstd, scale, shift: the forward's per-channel values, ``(C,)`` in ``x``'s dtype
            (``pre = (x - mean)·scale + shift [+ r]`` is recomputed from them).
        a, b: ``(C,)`` in ``x``'s dtype, ``dx = scale·(g - a - (x - mean)·rstd·b)``: ``Σg/n`` and
            ``Σg·x̂/n`` from the all-reduced sums in training, zeros with running statistics.
        code: the activation's code (:data:`batchnorm.activations.CODES`).
        slope: the activation's parameter (leaky slope, ELU alpha), a scalar of ``x``'s dtype.
        need_dx, need_dres: which of ``dx``, ``dres`` to write.
        dx, dres: outputs like ``x`` (``dres = g``); ``x`` itself where not needed (never written).
    """
    z = x.dtype.type(0.0)
    rb = np.empty(C, dtype=x.dtype)
    for c in range(C):
        rb[c] = rstd[c] * b[c]
    for p in prange(P):
        _nhwc_dx_rows(dy, x, r, has_res, C, p * M // P, (p + 1) * M // P, mean, scale, shift,
                      code, slope, a, rb, need_dx, need_dres, dx, dres, z)

