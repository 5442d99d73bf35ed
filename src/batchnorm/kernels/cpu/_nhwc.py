"""Channels-last ``(M, C)`` forward kernels: rows split into ``P`` blocks, loops along ``C``.

Training forward: per-block shifted partials (the shift ``K``: the first row), the fixed-order
Chan merge of :mod:`._segments` run along the channels, then the output
``y = act(((x - K) - δ)·scale + shift [+ r])``: two parallel regions, ``x`` read twice. A block's
partials take two passes over each run of ``R`` rows (for narrow tensors a few KB, from L1),
merged into the block's by the Chan formula. Partials
are block-major (item ``p*C + c``): each block writes its own contiguous run, no cache line
shared between threads. The backward is in :mod:`._nhwc_backward`. Common arguments:

- ``x``, ``y``: flat ``(M·C,)`` views, float32 or float64; ``r``: the residual, like ``x``
  (``x`` itself when ``has_res`` is False, then never read);
- ``M``, ``C``: the shape; ``P``: row blocks (``cpu.nhwc_blocks``); block ``p`` holds the rows
  ``[p*M//P, (p+1)*M//P)``;
- ``code``/``slope``: the activation's code and parameter (a scalar of ``x``'s dtype);
- per-channel vectors: ``(C,)`` in ``x``'s dtype.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._activations import NONE, RELU, _act_run
from ._jit import _njit_called, _njit_inline, _parallel
from ._segments import _finalize

# The block partials take rows four at a time: the per-channel accumulators are loaded and
# stored once per four rows instead of once per row (the loops along C are L1-bound otherwise).
# The output pass takes one row at a time (see _nhwc_apply_rows).


@_njit_called
def _nhwc_block_partials(x, C, r0, r1, k, dlt_o, m2_o, p, R, z):
    """Shifted partials of rows ``[r0, r1)`` into item ``p*C+c`` (block-major: each block
    writes its own contiguous run, no cache line shared between threads): ``δ`` (the mean of
    ``x - K``) and ``m2`` per channel, in float64.

    The rows are taken ``R`` at a time (``cpu.sub_rows``; at most ``_FLUSH_ROWS``, summed in
    the accumulation dtype): each run gets its own two passes, its shifted mean ``d`` and
    ``Σ((x - K) - d)²``, and the runs are merged into the block's ``(δ, m2)`` by the Chan
    formula, in ascending order. A narrow tensor's run is a few KB, so its second pass reads
    L1 and the block's rows are read from memory once."""
    dlt = np.zeros(C)
    q = np.zeros(C)
    run = np.empty(C, dtype=x.dtype)
    d = np.empty(C, dtype=x.dtype)
    n_b = 0
    row0 = r0
    while row0 < r1:
        row1 = min(row0 + R, r1)
        for c in range(C):
            run[c] = z
        row = row0
        while row + 4 <= row1:
            x0 = x[row * C:(row + 1) * C]
            x1 = x[(row + 1) * C:(row + 2) * C]
            x2 = x[(row + 2) * C:(row + 3) * C]
            x3 = x[(row + 3) * C:(row + 4) * C]
            for c in range(C):
                kc = k[c]
                run[c] += ((x0[c] - kc) + (x1[c] - kc)) + ((x2[c] - kc) + (x3[c] - kc))
            row += 4
        while row < row1:
            x0 = x[row * C:(row + 1) * C]
            for c in range(C):
                run[c] += x0[c] - k[c]
            row += 1
        n = row1 - row0
        for c in range(C):
            d[c] = run[c] / n
            run[c] = z
        row = row0
        while row + 4 <= row1:
            x0 = x[row * C:(row + 1) * C]
            x1 = x[(row + 1) * C:(row + 2) * C]
            x2 = x[(row + 2) * C:(row + 3) * C]
            x3 = x[(row + 3) * C:(row + 4) * C]
            for c in range(C):
                kc = k[c]
                dc = d[c]
                e0 = (x0[c] - kc) - dc
                e1 = (x1[c] - kc) - dc
                e2 = (x2[c] - kc) - dc
                e3 = (x3[c] - kc) - dc
                run[c] += (e0 * e0 + e1 * e1) + (e2 * e2 + e3 * e3)
            row += 4
        while row < row1:
            x0 = x[row * C:(row + 1) * C]
            for c in range(C):
                e = (x0[c] - k[c]) - d[c]
                run[c] += e * e
            row += 1
        # Chan's merge of (n, d, run) into the block's (n_b, dlt, q), in float64; the run's
        # centre is the rounded d itself, so its m2 is exact about the value merged
        n_a = n_b
        n_b += n
        f_new = n / n_b
        f_ab = n_a * (n / n_b)
        for c in range(C):
            dd = np.float64(d[c]) - dlt[c]
            dlt[c] += dd * f_new
            q[c] += np.float64(run[c]) + dd * dd * f_ab
        row0 = row1
    for c in range(C):
        dlt_o[p * C + c] = dlt[c]
        m2_o[p * C + c] = q[c]


@_njit_inline
def _merge_blocks(dlt, m2, M, C, P, k, w, bias, has_w, has_b, eps, stat, mu):
    """:func:`_merge` + :func:`_finalize` for block-major items ``p*C + c`` (block ``p`` holds
    the rows ``[p*M//P, (p+1)*M//P)``), with the loops along the channels so that they
    vectorize; each channel still sums its blocks in ascending order. ``mu``: C scratch."""
    for c in range(C):
        mu[c] = 0.0
    for p in range(P):
        n_p = float((p + 1) * M // P - p * M // P)
        o = p * C
        for c in range(C):
            mu[c] += n_p * dlt[o + c]
    n = float(M)
    for c in range(C):
        mu[c] = mu[c] / n
    q = np.zeros(C)
    for p in range(P):
        n_p = float((p + 1) * M // P - p * M // P)
        o = p * C
        for c in range(C):
            d = dlt[o + c] - mu[c]
            q[c] += m2[o + c] + n_p * d * d
    for c in range(C):
        _finalize(c, n, k[c], mu[c], q[c], w, bias, has_w, has_b, eps, stat)


@_njit_inline
def _relu_or_id(v, code, z):
    if code == RELU:
        return z if v <= z else v  # NaN propagates; -0 → +0 like torch
    return v


@_njit_inline
def _nhwc_apply_rows(x, y, r, has_res, C, r0, r1, k, dl, scale, shift, code, slope, z):
    """``y = act(((x - k) - dl)·scale + shift [+ r])`` for rows ``[r0, r1)``.

    One row per sweep of the channel vectors: the rows are read and written in memory order,
    one stream each. Four rows per sweep (the vectors loaded once for four rows) win on data in
    L1/L2 and lose in the kernel, where this pass reads ``x`` from L3 or memory
    (docs/decisions.md, "Channels-last output one row per sweep")."""
    # The rows are written with ReLU or nothing (``lin``); another activation then runs once
    # over the block's rows, which are contiguous and still in cache (one loop, vectorised).
    simple = code == NONE or code == RELU  # noqa: SIM109 (kept plain for Numba)
    lin = code if simple else NONE
    if not has_res and lin == NONE:
        # no activation (convert_model's layers, whose activation is a module of its own): the
        # loop without the select
        for row in range(r0, r1):
            o = row * C
            xr = x[o:o + C]
            yr = y[o:o + C]
            for c in range(C):
                yr[c] = ((xr[c] - k[c]) - dl[c]) * scale[c] + shift[c]
    elif not has_res:
        for row in range(r0, r1):
            o = row * C
            xr = x[o:o + C]
            yr = y[o:o + C]
            for c in range(C):
                yr[c] = _relu_or_id(((xr[c] - k[c]) - dl[c]) * scale[c] + shift[c], lin, z)
    else:
        for row in range(r0, r1):
            o = row * C
            xr = x[o:o + C]
            yr = y[o:o + C]
            rr = r[o:o + C]
            for c in range(C):
                yr[c] = _relu_or_id(((xr[c] - k[c]) - dl[c]) * scale[c] + shift[c] + rr[c],
                                    lin, z)
    if not simple:
        _act_run(y[r0 * C:r1 * C], (r1 - r0) * C, code, slope, z)


@_parallel
def nhwc_forward(x, y, r, has_res, M, C, P, R, w, bias, has_w, has_b, eps, code, slope, stat,
                 cnt, dlt, m2):
    """Training forward: block partials (shift ``K``: the first row), merge, output; two
    regions.

    Args:
        x: the input, flat ``(M·C,)``, float32 or float64 (the accumulation dtype).
        y: the output, like ``x`` (written; may be ``x`` itself, as the in-place forward does).
        r: the residual, like ``x``, added before the activation; ``x`` itself when ``has_res``
            is False (then never read).
        has_res: whether ``r`` is added.
        M, C: the channels-last shape (rows, channels).
        P: row blocks (``cpu.nhwc_blocks``); block ``p`` holds the rows
            ``[p*M//P, (p+1)*M//P)``.
        R: rows per run of the block partials (``cpu.sub_rows``).
        w, bias: γ and β, ``(C,)`` in ``x``'s dtype; any ``(C,)`` array of that dtype where
            ``has_w``/``has_b`` is False.
        has_w, has_b: whether the layer has γ / β (else 1 / 0).
        eps: added to the variance, a scalar of ``x``'s dtype.
        code: the activation's code (:data:`batchnorm.activations.CODES`).
        slope: the activation's parameter (leaky slope, ELU alpha), a scalar of ``x``'s dtype.
        stat: ``(6, C)`` in ``x``'s dtype, written: mean, biased variance, rstd, scale
            (``γ·rstd``), shift (β) and the centering ``δ`` (``mean - K``).
        cnt: float64 scratch of at least ``C`` (the merge's running means).
        dlt, m2: ``C*P`` float64 scratch for the block partials, item ``p*C + c``.
    """
    z = x.dtype.type(0.0)
    k = x[0:C]
    for p in prange(P):
        _nhwc_block_partials(x, C, p * M // P, (p + 1) * M // P, k, dlt, m2, p, R, z)
    _merge_blocks(dlt, m2, M, C, P, k, w, bias, has_w, has_b, eps, stat, cnt)
    dl = np.empty(C, dtype=x.dtype)
    sc = np.empty(C, dtype=x.dtype)
    sh = np.empty(C, dtype=x.dtype)
    for c in range(C):
        dl[c] = stat[5, c]
        sc[c] = stat[3, c]
        sh[c] = stat[4, c]
    for p in prange(P):
        _nhwc_apply_rows(x, y, r, has_res, C, p * M // P, (p + 1) * M // P, k, dl, sc, sh,
                         code, slope, z)


@_parallel
def nhwc_partials(x, M, C, P, R, cnt_o, mean_o, m2_o):
    """Per-(row block, channel) partials ``(n, mean, m2)``, item ``p*C + c`` (the
    distributed path merges them with :func:`batchnorm.stats.merge_many`).

    Args:
        x: the input, flat ``(M·C,)``, float32 or float64 (the accumulation dtype).
        M, C: the channels-last shape (rows, channels).
        P: row blocks (``cpu.nhwc_blocks``); block ``p`` holds the rows
            ``[p*M//P, (p+1)*M//P)``.
        R: rows per run of the block partials (``cpu.sub_rows``).
        cnt_o, mean_o, m2_o: ``C*P`` float64, written: count, mean and ``Σ(x - mean)²`` of
            each block.
    """
    z = x.dtype.type(0.0)
    k = x[0:C]
    for p in prange(P):
        r0 = p * M // P
        r1 = (p + 1) * M // P
        _nhwc_block_partials(x, C, r0, r1, k, mean_o, m2_o, p, R, z)
        for c in range(C):
            mean_o[p * C + c] += k[c]
            cnt_o[p * C + c] = r1 - r0


@_parallel
def nhwc_apply(x, y, r, has_res, M, C, P, mean, scale, shift, code, slope):
    """``y = act((x - mean)·scale + shift [+ r])`` (eval forward, the distributed path
    and the in-place forward).

    Args:
        x: the input, flat ``(M·C,)``, float32 or float64 (the accumulation dtype).
        y: the output, like ``x`` (written; may be ``x`` itself, as the in-place forward does).
        r: the residual, like ``x``, added before the activation; ``x`` itself when ``has_res``
            is False (then never read).
        has_res: whether ``r`` is added.
        M, C: the channels-last shape (rows, channels).
        P: row blocks (``cpu.nhwc_blocks``); block ``p`` holds the rows
            ``[p*M//P, (p+1)*M//P)``.
        mean, scale, shift: ``(C,)`` in ``x``'s dtype; ``y = act((x - mean)·scale + shift
            [+ r])``.
        code: the activation's code (:data:`batchnorm.activations.CODES`).
        slope: the activation's parameter (leaky slope, ELU alpha), a scalar of ``x``'s dtype.
    """
    z = x.dtype.type(0.0)
    zero = np.zeros(C, dtype=x.dtype)
    for p in prange(P):
        _nhwc_apply_rows(x, y, r, has_res, C, p * M // P, (p + 1) * M // P, mean, zero, scale,
                         shift, code, slope, z)

