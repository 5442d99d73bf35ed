"""Numba kernels of the ``cpu`` backend (imported lazily; compiled on first call, cached on disk).

Every array is a flat, contiguous 1-D view; shapes travel as integers:

- channels-first ``(N, C, S)``: element ``(n, c, s)`` is ``x[(n*C + c)*S + s]``; a channel's
  ``N*S`` elements are numbered ``i = n*S + s`` and split into ``P`` chunks
  ``[p*NS//P, (p+1)*NS//P)``;
- channels-last ``(M, C)``: element ``(m, c)`` is ``x[m*C + c]``; rows split into ``P`` blocks.

``P`` is fixed by the host from the shape and the thread count, and every parallel item writes
its own slot, so results never depend on scheduling (determinism). Accumulation: runs of at most
``_BLOCK`` elements in the accumulation dtype (vectorised), runs summed in float64.

Statistics (the math of :mod:`batchnorm.stats`, not a second version of it): a chunk's partial is
``(n, mean, m2)`` from a *shifted* sum ``mean = K + Σ(x - K)/n`` (``K`` the chunk's first sample,
as ``stats.channel_partials``) and a second pass ``m2 = Σ(x - mean)²`` over the same, cache-resident
chunk. Chunks are merged with the K-way Chan formula of ``stats.merge_many``::

    n = Σ n_k;  mean = Σ n_k·mean_k / n;  m2 = Σ m2_k + Σ n_k·(mean_k - mean)²

and finalized as ``stats.finalize``: ``var = m2/n``, ``rstd = 1/sqrt(var + eps)``.

Forward ``y = act((x - mean)·scale + shift [+ r])``; backward (``g = dy·act'(pre)``, ``pre``
recomputed from ``x``): ``sum_g = Σg``, ``sum_gx = rstd·Σ g·(x - mean)``,
``dx = scale·(g - a - x̂·b)`` (``a = b = 0`` with running statistics), ``dres = g``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

NONE, RELU, LEAKY, SILU, GELU = 0, 1, 2, 3, 4
CODES = {"none": NONE, "relu": RELU, "leaky_relu": LEAKY, "silu": SILU, "gelu": GELU}

_BLOCK = 2048  # elements summed in the accumulation dtype before going to float64
_INV_SQRT2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327

# reassoc/contract let LLVM vectorise the sums; never nnan/ninf: NaN must propagate so that
# the running statistics can skip a non-finite batch. Helpers are inlined at the Numba IR level
# and so compile under the flags of the kernel that calls them.
_FM = {"reassoc", "contract"}
_parallel = njit(cache=True, nogil=True, fastmath=_FM, parallel=True)
_njit_inline = njit(inline="always", fastmath=_FM)


# ------------------------------------------------------------------------------------------
# activations


@_njit_inline
def _act(p, code, slope, z, x):
    """``act(p)`` in ``x``'s dtype (``z`` its zero, ``slope`` already of that dtype)."""
    if code == RELU:
        return z if p <= z else p  # NaN propagates; -0 → +0 like torch
    if code == LEAKY:
        return p * slope if p <= z else p
    if code == SILU:
        return x.dtype.type(p / (1.0 + math.exp(-p)))
    if code == GELU:
        return x.dtype.type(0.5 * p * (1.0 + math.erf(p * _INV_SQRT2)))
    return p


@_njit_inline
def _grad(dy, p, code, slope, z, x):
    """``dy·act'(p)`` in ``x``'s dtype (derivatives in :mod:`batchnorm.activations`)."""
    if code == RELU:
        return dy if p > z else z
    if code == LEAKY:
        return dy if p > z else dy * slope
    if code == SILU:
        s = 1.0 / (1.0 + math.exp(-p))
        return x.dtype.type(dy * (s * (1.0 + p * (1.0 - s))))
    if code == GELU:
        cdf = 0.5 * (1.0 + math.erf(p * _INV_SQRT2))
        return x.dtype.type(dy * (cdf + p * math.exp(-0.5 * p * p) * _INV_SQRT_2PI))
    return dy


# ------------------------------------------------------------------------------------------
# segment helpers: one contiguous run x[base : base+L]


# Loops run over ``range(L)`` on slice views: LLVM then vectorises them; indexing with
# ``range(base, base + L)`` kept a negative-index check per element and ran 5x slower (measured).


@_njit_inline
def _seg_shifted_sum(x, base, L, k, z):
    xs = x[base:base + L]
    s = z
    for j in range(L):
        s += xs[j] - k
    return s


@_njit_inline
def _seg_sq(x, base, L, m, z):
    xs = x[base:base + L]
    s = z
    for j in range(L):
        d = xs[j] - m
        s += d * d
    return s


@_njit_inline
def _act_inplace(y, base, L, code, slope, z):
    """``y = act(y)`` over a run that is in L1 (the loop for ReLU stays vectorised)."""
    ys = y[base:base + L]
    if code == RELU:
        for j in range(L):
            p = ys[j]
            ys[j] = z if p <= z else p  # NaN propagates; -0 → +0 like torch
    elif code != NONE:
        for j in range(L):
            ys[j] = _act(ys[j], code, slope, z, y)


@_njit_inline
def _seg_apply(x, y, r, base, L, m, sc, sh, has_res, code, slope, z):
    """``y = act((x - m)·sc + sh [+ r])``: the affine pass, then the activation in place."""
    xs = x[base:base + L]
    ys = y[base:base + L]
    if has_res:
        rs = r[base:base + L]
        for j in range(L):
            ys[j] = (xs[j] - m) * sc + sh + rs[j]
    else:
        for j in range(L):
            ys[j] = (xs[j] - m) * sc + sh
    _act_inplace(y, base, L, code, slope, z)


@_njit_inline
def _seg_grad(dy, x, r, g, base, L, m, sc, sh, has_res, code, slope, z):
    """``g[:L] = dy·act'(pre)`` over a run; ``g`` is a thread-local scratch of ``_BLOCK``."""
    ds = dy[base:base + L]
    if code == NONE:
        for k in range(L):
            g[k] = ds[k]
        return
    xs = x[base:base + L]
    if code == RELU:  # one loop each: the select stays vectorised
        if has_res:
            rs = r[base:base + L]
            for k in range(L):
                p = (xs[k] - m) * sc + sh + rs[k]
                g[k] = ds[k] if p > z else z
        else:
            for k in range(L):
                p = (xs[k] - m) * sc + sh
                g[k] = ds[k] if p > z else z
        return
    if has_res:
        rs = r[base:base + L]
        for k in range(L):
            g[k] = (xs[k] - m) * sc + sh + rs[k]
    else:
        for k in range(L):
            g[k] = (xs[k] - m) * sc + sh
    for k in range(L):
        g[k] = _grad(ds[k], g[k], code, slope, z, x)


@_njit_inline
def _seg_sums(x, g, base, L, m, z):
    """``(Σ g, Σ g·(x - m))`` over a run."""
    xs = x[base:base + L]
    sg = z
    sgx = z
    for k in range(L):
        sg += g[k]
        sgx += g[k] * (xs[k] - m)
    return sg, sgx


@_njit_inline
def _seg_dx(x, g, dx, dres, base, L, m, sc, a, rb, need_dx, need_dres):
    """``dx = sc·(g - a - (x - m)·rb)`` with ``rb = rstd·b``; ``dres = g``."""
    if need_dx:
        xs = x[base:base + L]
        dxs = dx[base:base + L]
        for k in range(L):
            dxs[k] = sc * (g[k] - a - (xs[k] - m) * rb)
    if need_dres:
        drs = dres[base:base + L]
        for k in range(L):
            drs[k] = g[k]


@njit(inline="always")
def _run(i, b, C, S, c):
    """The contiguous run starting at channel index ``i`` (< b): ``(flat base, length)``."""
    n = i // S
    s0 = i - n * S
    L = min(S - s0, b - i, _BLOCK)
    return (n * C + c) * S + s0, L


@_njit_inline
def _chunk_partials(x, C, S, c, a, b, z):
    """``(n, mean, m2)`` of channel ``c``'s elements ``[a, b)`` (float64 results)."""
    k = x[_run(a, b, C, S, c)[0]]
    tot = 0.0
    i = a
    while i < b:
        base, L = _run(i, b, C, S, c)
        tot += _seg_shifted_sum(x, base, L, k, z)
        i += L
    cnt = b - a
    mean = k + tot / cnt
    m = x.dtype.type(mean)
    tot2 = 0.0
    i = a
    while i < b:
        base, L = _run(i, b, C, S, c)
        tot2 += _seg_sq(x, base, L, m, z)
        i += L
    return float(cnt), mean, tot2


@njit(inline="always")
def _finalize(c, cnt, mean, m2, w, bias, has_w, has_b, eps, mean_o, var_o, rstd_o, scale_o,
              shift_o):
    """``stats.finalize`` + ``stats.scale_of`` for one channel, stored in the acc dtype."""
    mean_o[c] = mean
    var_o[c] = m2 / cnt
    rstd_o[c] = 1.0 / math.sqrt(var_o[c] + eps)
    scale_o[c] = w[c] * rstd_o[c] if has_w else rstd_o[c]
    shift_o[c] = bias[c] if has_b else 0.0


@_parallel
def nchw_train_fused(x, y, r, has_res, N, C, S, w, bias, has_w, has_b, eps, code, slope,
                     mean_o, var_o, rstd_o, scale_o, shift_o):
    """Training forward, one channel per item: stats and output while the slab is in cache."""
    z = x.dtype.type(0.0)
    NS = N * S
    for c in prange(C):
        cnt, mean, m2 = _chunk_partials(x, C, S, c, 0, NS, z)
        _finalize(c, cnt, mean, m2, w, bias, has_w, has_b, eps, mean_o, var_o, rstd_o,
                  scale_o, shift_o)
        m = mean_o[c]
        sc = scale_o[c]
        sh = shift_o[c]
        i = 0
        while i < NS:
            base, L = _run(i, NS, C, S, c)
            _seg_apply(x, y, r, base, L, m, sc, sh, has_res, code, slope, z)
            i += L


@_parallel
def nchw_partials(x, N, C, S, P, cnt_o, mean_o, m2_o):
    """Per-(channel, chunk) partials; item ``c*P + p``."""
    z = x.dtype.type(0.0)
    NS = N * S
    for it in prange(C * P):
        c = it // P
        p = it - c * P
        cnt, mean, m2 = _chunk_partials(x, C, S, c, p * NS // P, (p + 1) * NS // P, z)
        cnt_o[it] = cnt
        mean_o[it] = mean
        m2_o[it] = m2


@_parallel
def merge_finalize(cnt, mean, m2, C, P, w, bias, has_w, has_b, eps, mean_o, var_o, rstd_o,
                   scale_o, shift_o):
    """K-way Chan merge of ``stats.merge_many`` per channel (items ``c*P + p``), then finalize."""
    for c in prange(C):
        n = 0.0
        s = 0.0
        for p in range(P):
            n += cnt[c * P + p]
            s += cnt[c * P + p] * mean[c * P + p]
        mu = s / n
        q = 0.0
        for p in range(P):
            d = mean[c * P + p] - mu
            q += m2[c * P + p] + cnt[c * P + p] * d * d
        _finalize(c, n, mu, q, w, bias, has_w, has_b, eps, mean_o, var_o, rstd_o, scale_o,
                  shift_o)


@_parallel
def nchw_apply(x, y, r, has_res, N, C, S, P, mean, scale, shift, code, slope):
    z = x.dtype.type(0.0)
    NS = N * S
    for it in prange(C * P):
        c = it // P
        p = it - c * P
        a = p * NS // P
        b = (p + 1) * NS // P
        i = a
        while i < b:
            base, L = _run(i, b, C, S, c)
            _seg_apply(x, y, r, base, L, mean[c], scale[c], shift[c], has_res, code, slope, z)
            i += L


@_parallel
def nchw_backward_fused(dy, x, r, has_res, N, C, S, mean, rstd, scale, shift, code, slope,
                        training, need_sums, need_dx, need_dres, dx, dres, sg_o, sgx_o):
    """Backward, one channel per item: sums, then dx/dres from the cache-resident slab."""
    z = x.dtype.type(0.0)
    NS = N * S
    for c in prange(C):
        g = np.empty(_BLOCK, dtype=x.dtype)
        m = mean[c]
        sc = scale[c]
        sh = shift[c]
        sg = 0.0
        sgx = 0.0
        if need_sums:
            i = 0
            while i < NS:
                base, L = _run(i, NS, C, S, c)
                _seg_grad(dy, x, r, g, base, L, m, sc, sh, has_res, code, slope, z)
                u, v = _seg_sums(x, g, base, L, m, z)
                sg += u
                sgx += v
                i += L
        sg_o[c] = sg
        sgx_o[c] = sgx * rstd[c]
        a = z
        rb = z
        if training:
            a = x.dtype.type(sg / NS)
            rb = x.dtype.type(sgx_o[c] / NS) * rstd[c]
        if need_dx or need_dres:
            i = 0
            while i < NS:
                base, L = _run(i, NS, C, S, c)
                _seg_grad(dy, x, r, g, base, L, m, sc, sh, has_res, code, slope, z)
                _seg_dx(x, g, dx, dres, base, L, m, sc, a, rb, need_dx, need_dres)
                i += L


@_parallel
def nchw_backward_sums(dy, x, r, has_res, N, C, S, P, mean, scale, shift, code, slope,
                       sg_o, sgx_o):
    """Per-(channel, chunk) ``(Σg, Σg·(x - mean))`` in float64; item ``c*P + p``."""
    z = x.dtype.type(0.0)
    NS = N * S
    for it in prange(C * P):
        g = np.empty(_BLOCK, dtype=x.dtype)
        c = it // P
        p = it - c * P
        e = (p + 1) * NS // P
        sg = 0.0
        sgx = 0.0
        i = p * NS // P
        while i < e:
            base, L = _run(i, e, C, S, c)
            _seg_grad(dy, x, r, g, base, L, mean[c], scale[c], shift[c], has_res, code, slope,
                      z)
            u, v = _seg_sums(x, g, base, L, mean[c], z)
            sg += u
            sgx += v
            i += L
        sg_o[it] = sg
        sgx_o[it] = sgx


@_parallel
def nchw_backward_apply(dy, x, r, has_res, N, C, S, P, mean, rstd, scale, shift, a, b, code,
                        slope, need_dx, need_dres, dx, dres):
    z = x.dtype.type(0.0)
    NS = N * S
    for it in prange(C * P):
        g = np.empty(_BLOCK, dtype=x.dtype)
        c = it // P
        p = it - c * P
        rb = rstd[c] * b[c]
        e = (p + 1) * NS // P
        i = p * NS // P
        while i < e:
            base, L = _run(i, e, C, S, c)
            _seg_grad(dy, x, r, g, base, L, mean[c], scale[c], shift[c], has_res, code, slope,
                      z)
            _seg_dx(x, g, dx, dres, base, L, mean[c], scale[c], a[c], rb, need_dx, need_dres)
            i += L


# ------------------------------------------------------------------------------------------
# channels-last (M, C): rows split into P blocks; inner loops run along C (vectorised)


@_parallel
def nhwc_partials(x, M, C, P, cnt_o, mean_o, m2_o):
    """Per-(channel, row block) partials, item ``c*P + p``; shift = the block's first row."""
    z = x.dtype.type(0.0)
    for p in prange(P):
        r0 = p * M // P
        r1 = (p + 1) * M // P
        k = x[r0 * C:(r0 + 1) * C]
        tot = np.zeros(C)
        run = np.zeros(C, dtype=x.dtype)
        cnt = 0
        for row in range(r0, r1):
            xr = x[row * C:(row + 1) * C]
            for c in range(C):
                run[c] += xr[c] - k[c]
            cnt += 1
            if cnt == 256 or row == r1 - 1:  # flush the accumulation-dtype run into float64
                for c in range(C):
                    tot[c] += run[c]
                    run[c] = z
                cnt = 0
        n = r1 - r0
        m = np.empty(C, dtype=x.dtype)
        for c in range(C):
            mu = k[c] + tot[c] / n
            mean_o[c * P + p] = mu
            m[c] = mu
            tot[c] = 0.0
        for row in range(r0, r1):
            xr = x[row * C:(row + 1) * C]
            for c in range(C):
                d = xr[c] - m[c]
                run[c] += d * d
            cnt += 1
            if cnt == 256 or row == r1 - 1:
                for c in range(C):
                    tot[c] += run[c]
                    run[c] = z
                cnt = 0
        for c in range(C):
            m2_o[c * P + p] = tot[c]
            cnt_o[c * P + p] = n


@_parallel
def nhwc_apply(x, y, r, has_res, M, C, P, mean, scale, shift, code, slope):
    z = x.dtype.type(0.0)
    for p in prange(P):
        for row in range(p * M // P, (p + 1) * M // P):
            o = row * C
            xr = x[o:o + C]
            yr = y[o:o + C]
            if has_res:
                rr = r[o:o + C]
                for c in range(C):
                    yr[c] = (xr[c] - mean[c]) * scale[c] + shift[c] + rr[c]
            else:
                for c in range(C):
                    yr[c] = (xr[c] - mean[c]) * scale[c] + shift[c]
            _act_inplace(y, o, C, code, slope, z)


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
    for c in range(C):
        g[c] = _grad(dr[c], g[c], code, slope, z, x)


@_parallel
def nhwc_backward_sums(dy, x, r, has_res, M, C, P, mean, scale, shift, code, slope,
                       sg_o, sgx_o):
    """Per-(channel, row block) ``(Σg, Σg·(x - mean))`` in float64; item ``c*P + p``."""
    z = x.dtype.type(0.0)
    for p in prange(P):
        r0 = p * M // P
        r1 = (p + 1) * M // P
        g = np.empty(C, dtype=x.dtype)
        tg = np.zeros(C)
        tgx = np.zeros(C)
        rg = np.zeros(C, dtype=x.dtype)
        rgx = np.zeros(C, dtype=x.dtype)
        cnt = 0
        for row in range(r0, r1):
            o = row * C
            _row_grad(dy, x, r, g, o, C, mean, scale, shift, has_res, code, slope, z)
            xr = x[o:o + C]
            for c in range(C):
                rg[c] += g[c]
                rgx[c] += g[c] * (xr[c] - mean[c])
            cnt += 1
            if cnt == 256 or row == r1 - 1:
                for c in range(C):
                    tg[c] += rg[c]
                    tgx[c] += rgx[c]
                    rg[c] = z
                    rgx[c] = z
                cnt = 0
        for c in range(C):
            sg_o[c * P + p] = tg[c]
            sgx_o[c * P + p] = tgx[c]


@_parallel
def nhwc_backward_apply(dy, x, r, has_res, M, C, P, mean, rstd, scale, shift, a, b, code,
                        slope, need_dx, need_dres, dx, dres):
    z = x.dtype.type(0.0)
    for p in prange(P):
        g = np.empty(C, dtype=x.dtype)
        rb = np.empty(C, dtype=x.dtype)
        for c in range(C):
            rb[c] = rstd[c] * b[c]
        for row in range(p * M // P, (p + 1) * M // P):
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
