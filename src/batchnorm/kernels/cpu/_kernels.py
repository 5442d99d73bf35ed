"""Numba kernels of the ``cpu`` backend (imported lazily; compiled on first call, cached on disk).

Every array is a flat, contiguous 1-D view; shapes travel as integers:

- channels-first ``(N, C, S)``: element ``(n, c, s)`` is ``x[(n*C + c)*S + s]``; a channel's
  ``N*S`` elements are numbered ``i = n*S + s`` and split into ``P`` chunks
  ``[p*NS//P, (p+1)*NS//P)``;
- channels-last ``(M, C)``: element ``(m, c)`` is ``x[m*C + c]``; rows split into ``P`` blocks.

``P`` is fixed by the host from the shape and the thread count, and every parallel item writes
its own slot, so results never depend on scheduling (determinism). Accumulation: runs of at most
``_BLOCK`` elements in the accumulation dtype (vectorised), runs summed in float64.

One call of the backend is one Numba dispatch: the entry points (``nchw_forward``,
``nhwc_forward``, ``nchw_backward``, ``nhwc_backward``, ``*_apply``) hold every pass, with as few
parallel regions as the data dependencies allow (one per channel-first call when a channel is one
item; statistics region + apply region otherwise). Each region is a fork/join of the thread pool,
which on a loaded machine costs a scheduler time slice.

Statistics (the math of :mod:`batchnorm.stats`, not a second version of it): as
``stats.centered_partials``, every element of channel ``c`` is shifted by one sample ``K_c`` of
the channel (its first element); a chunk's partial is ``(n, δ = Σ(x - K)/n, m2 = Σ((x - K) - δ)²)``
(the second sum a second pass over the same, cache-resident chunk). All chunks of a channel share
``K_c``, so they are merged with the K-way Chan formula of ``stats.merge_many`` on the shifted
means::

    n = Σ n_k;  δ = Σ n_k·δ_k / n;  m2 = Σ m2_k + Σ n_k·(δ_k - δ)²

and finalized as ``stats.finalize``: ``mean = K + δ``, ``var = m2/n``,
``rstd = 1/sqrt(var + eps)``. The training forward normalizes the centered value
``(x - K) - δ`` (exact to one rounding when ``|mean| ≫ std``), as the reference backend does.

Forward ``y = act((x - mean)·scale + shift [+ r])``; backward (``g = dy·act'(pre)``, ``pre``
recomputed from ``x``): ``sum_g = Σg``, ``sum_gx = rstd·Σ g·(x - mean)``,
``dx = scale·(g - a - x̂·b)`` (``a = b = 0`` with running statistics), ``dres = g``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ... import activations as A
from ...activations import CODES

# The codes of the one activation table (batchnorm.activations). Numba freezes module globals
# at compile time, and its disk cache is keyed on this file: a code is never renumbered.
NONE, RELU, LEAKY, SILU, GELU = (CODES[n] for n in ("none", "relu", "leaky_relu", "silu", "gelu"))
RELU6, HARDSWISH, HARDSIGMOID = (CODES[n] for n in ("relu6", "hardswish", "hardsigmoid"))
SIGMOID, TANH, ELU, MISH, GELU_TANH = (
    CODES[n] for n in ("sigmoid", "tanh", "elu", "mish", "gelu_tanh"))

_BLOCK = 2048  # elements summed in the accumulation dtype before going to float64
_FLUSH_ROWS = 256  # channels-last: rows summed in the accumulation dtype before float64
_INV_SQRT2 = A.INV_SQRT2
_INV_SQRT_2PI = A.INV_SQRT_2PI
_SQRT_2_OVER_PI = A.SQRT_2_OVER_PI
_GELU_TANH_K = A.GELU_TANH_K

# reassoc/contract let LLVM vectorise the sums; never nnan/ninf: NaN must propagate so that
# the running statistics can skip a non-finite batch. Helpers are inlined at the Numba IR level
# and so compile under the flags of the kernel that calls them. Vectorised reductions are
# reassociated in a way fixed by the loop length alone, so results stay bitwise reproducible.
_FM = {"reassoc", "contract"}
_parallel = njit(cache=True, nogil=True, fastmath=_FM, parallel=True)
_njit_inline = njit(inline="always", fastmath=_FM)
# A helper compiled once and called (not inlined at every call site): the short-run paths, whose
# inlined copies tripled the first-call compile time (17 s → 48 s for forward + backward), and
# the channels-last block sums and dx rows (one call per row block).
_njit_called = njit(cache=True, nogil=True, fastmath=_FM)


# ------------------------------------------------------------------------------------------
# activations


@_njit_inline
def _act(p, code, slope, z, x):
    """``act(p)`` in ``x``'s dtype (``z`` its zero, ``slope`` the activation's parameter,
    already of that dtype); the formulas of :mod:`batchnorm.activations`, rounded to ``x``'s
    dtype once at the end (the float literals promote the arithmetic to float64)."""
    if code == RELU:
        return z if p <= z else p  # NaN propagates; -0 → +0 like torch
    if code == LEAKY:
        return p * slope if p <= z else p
    if code == SILU:
        return x.dtype.type(p / (1.0 + math.exp(-p)))
    if code == GELU:
        return x.dtype.type(0.5 * p * (1.0 + math.erf(p * _INV_SQRT2)))
    if code == RELU6:
        return z if p <= z else (x.dtype.type(6.0) if p >= 6.0 else p)
    if code == HARDSWISH:
        return x.dtype.type(p * min(max(p + 3.0, 0.0), 6.0) / 6.0)
    if code == HARDSIGMOID:
        return x.dtype.type(min(max(p + 3.0, 0.0), 6.0) / 6.0)
    if code == SIGMOID:
        return x.dtype.type(1.0 / (1.0 + math.exp(-p)))
    if code == TANH:
        return x.dtype.type(math.tanh(p))
    if code == ELU:
        return p if p > z else x.dtype.type(slope * math.expm1(p))
    if code == MISH:
        # softplus(p) = p + log1p(e^-p) for p > 0: e^p would overflow for large p
        sp = p + math.log1p(math.exp(-p)) if p > 0.0 else math.log1p(math.exp(p))
        return x.dtype.type(p * math.tanh(sp))
    if code == GELU_TANH:
        return x.dtype.type(0.5 * p * (1.0 + math.tanh(_SQRT_2_OVER_PI
                                                       * (p + _GELU_TANH_K * p * p * p))))
    return p


@_njit_inline
def _grad(dy, p, code, slope, z, x):
    """``dy·act'(p)`` in ``x``'s dtype (derivatives and the value at each kink: those of
    :mod:`batchnorm.activations`, PyTorch's)."""
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
    if code == RELU6:
        return dy if p > z and p < 6.0 else z
    if code == HARDSWISH:
        if p <= -3.0:
            return z
        return x.dtype.type(dy * (p / 3.0 + 0.5)) if p < 3.0 else dy
    if code == HARDSIGMOID:
        return x.dtype.type(dy / 6.0) if p > -3.0 and p < 3.0 else z
    if code == SIGMOID:
        s = 1.0 / (1.0 + math.exp(-p))
        return x.dtype.type(dy * (s * (1.0 - s)))
    if code == TANH:
        t = math.tanh(p)
        return x.dtype.type(dy * (1.0 - t * t))
    if code == ELU:
        return dy if p > z else x.dtype.type(dy * (slope * math.exp(p)))
    if code == MISH:
        sp = p + math.log1p(math.exp(-p)) if p > 0.0 else math.log1p(math.exp(p))
        t = math.tanh(sp)
        s = 1.0 / (1.0 + math.exp(-p))
        return x.dtype.type(dy * (t + p * s * (1.0 - t * t)))
    if code == GELU_TANH:
        t = math.tanh(_SQRT_2_OVER_PI * (p + _GELU_TANH_K * p * p * p))
        d = 0.5 * (1.0 + t) + 0.5 * p * (1.0 - t * t) * _SQRT_2_OVER_PI * (
            1.0 + 3.0 * _GELU_TANH_K * p * p)
        return x.dtype.type(dy * d)
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
def _seg_sq(x, base, L, k, dl, z):
    """``Σ((x - K) - δ)²`` over a run."""
    xs = x[base:base + L]
    s = z
    for j in range(L):
        d = (xs[j] - k) - dl
        s += d * d
    return s


@_njit_inline
def _act_inplace(y, base, L, code, slope, z):
    """``y = act(y)`` over a run that is in L1 (non-ReLU activations)."""
    ys = y[base:base + L]
    for j in range(L):
        ys[j] = _act(ys[j], code, slope, z, y)


@_njit_inline
def _seg_apply(x, y, r, base, L, k, dl, sc, sh, has_res, code, slope, z):
    """``y = act(((x - K) - δ)·sc + sh [+ r])`` (``K``, ``δ``: the centering of the channel)."""
    xs = x[base:base + L]
    ys = y[base:base + L]
    if has_res:
        rs = r[base:base + L]
        if code == RELU:
            for j in range(L):
                p = ((xs[j] - k) - dl) * sc + sh + rs[j]
                ys[j] = z if p <= z else p  # NaN propagates; -0 → +0 like torch
        else:
            for j in range(L):
                ys[j] = ((xs[j] - k) - dl) * sc + sh + rs[j]
    else:
        if code == RELU:
            for j in range(L):
                p = ((xs[j] - k) - dl) * sc + sh
                ys[j] = z if p <= z else p
        else:
            for j in range(L):
                ys[j] = ((xs[j] - k) - dl) * sc + sh
    if code != NONE and code != RELU:
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


@njit(inline="always")
def _whole_samples(a, b, S):
    """Whether elements ``[a, b)`` of a channel are whole samples of at most ``_BLOCK``: then
    every run is one sample's ``S`` contiguous elements, and the loops take them directly
    (short runs, e.g. ``S = 49``, spent most of their time in the run bookkeeping)."""
    return S <= _BLOCK and a % S == 0 and b % S == 0


@_njit_called
def _sample_partials(x, C, S, c, n0, n1, k, z):
    """:func:`_chunk_partials` over whole samples ``[n0, n1)``: the same runs, taken directly."""
    tot = 0.0
    for n in range(n0, n1):
        tot += _seg_shifted_sum(x, (n * C + c) * S, S, k, z)
    cnt = (n1 - n0) * S
    delta = tot / cnt
    dl = x.dtype.type(delta)
    tot2 = 0.0
    for n in range(n0, n1):
        tot2 += _seg_sq(x, (n * C + c) * S, S, k, dl, z)
    return float(cnt), delta, tot2


@njit(inline="always")
def _fused_samples(a, b, S, code):
    """Whether the backward of elements ``[a, b)`` takes the whole-sample NONE/RELU loops, which
    use no ``g`` scratch (the one predicate for both the loops and the scratch allocation)."""
    return _whole_samples(a, b, S) and (code == NONE or code == RELU)  # noqa: SIM109


@_njit_inline
def _chunk_partials(x, C, S, c, a, b, k, z):
    """``(n, δ, m2)`` of channel ``c``'s elements ``[a, b)`` shifted by ``k`` (float64)."""
    tot = 0.0
    cnt = b - a
    if _whole_samples(a, b, S):
        return _sample_partials(x, C, S, c, a // S, b // S, k, z)
    i = a
    while i < b:
        base, L = _run(i, b, C, S, c)
        tot += _seg_shifted_sum(x, base, L, k, z)
        i += L
    delta = tot / cnt
    dl = x.dtype.type(delta)
    tot2 = 0.0
    i = a
    while i < b:
        base, L = _run(i, b, C, S, c)
        tot2 += _seg_sq(x, base, L, k, dl, z)
        i += L
    return float(cnt), delta, tot2


@njit(inline="always")
def _finalize(c, cnt, k, delta, m2, w, bias, has_w, has_b, eps, stat):
    """``stats.finalize`` + ``stats.scale_of`` for one channel.

    ``stat`` rows (accumulation dtype): mean, var, rstd, scale, shift, δ (the centering)."""
    stat[0, c] = k + delta
    stat[1, c] = m2 / cnt
    stat[2, c] = 1.0 / math.sqrt(stat[1, c] + eps)
    stat[3, c] = w[c] * stat[2, c] if has_w else stat[2, c]
    stat[4, c] = bias[c] if has_b else 0.0
    stat[5, c] = delta


@njit(inline="always")
def _merge(cnt, dlt, m2, base, stride, P):
    """K-way Chan merge of ``stats.merge_many`` over items ``base + p*stride``, ``p < P``
    (shared shift)."""
    n = 0.0
    s = 0.0
    for p in range(P):
        i = base + p * stride
        n += cnt[i]
        s += cnt[i] * dlt[i]
    mu = s / n
    q = 0.0
    for p in range(P):
        i = base + p * stride
        d = dlt[i] - mu
        q += m2[i] + cnt[i] * d * d
    return n, mu, q


# ------------------------------------------------------------------------------------------
# channels-first (N, C, S)


@_njit_inline
def _nchw_apply_chunk(x, y, r, has_res, C, S, c, a, b, k, dl, sc, sh, code, slope, z):
    i = a
    while i < b:
        base, L = _run(i, b, C, S, c)
        _seg_apply(x, y, r, base, L, k, dl, sc, sh, has_res, code, slope, z)
        i += L


# Lane blocks (channels-first, one channel per item): samples of at most _LANE_MAX_S elements
# and at least _LANE_MIN_N samples. Measured (single thread, (32, C, S)): S = 49 backward
# 6.3 → 2.8 ms, forward 2.3 → 2.0 ms; but S = 196 and 784 ran slower (the per-element loads
# of the expanded per-channel values cost more than the short runs' overhead they save), as
# did (8, 256, 49) (setup per block against 8 samples).
_LANE_MAX_S = 64
_LANE_MIN_N = 16
_LANE_ELEMENTS = 2048  # a lane block's width: (channels per block) · S ≤ this


def lanes(N: int, S: int, P: int) -> bool:
    """Whether a channels-first call takes the lane-block entry points (host side)."""
    return P == 1 and S <= _LANE_MAX_S and N >= _LANE_MIN_N


@_njit_inline
def _lane_sums(x, N, C, S, c0, c1, ek, edl, square, tot, acc, z):
    """Per-lane float64 sums over the ``N`` samples of ``(x - K)`` (``square`` False) or of
    ``((x - K) - δ)²``, for the lane block ``[c0, c1)`` (see :func:`_lane_backward`); ``acc``
    is the accumulation-dtype run, flushed every ``_FLUSH_ROWS`` samples."""
    w = (c1 - c0) * S
    for k in range(w):
        tot[k] = 0.0
        acc[k] = z
    cnt = 0
    for n in range(N):
        xs = x[(n * C + c0) * S:(n * C + c0) * S + w]
        if square:
            for k in range(w):
                d = (xs[k] - ek[k]) - edl[k]
                acc[k] += d * d
        else:
            for k in range(w):
                acc[k] += xs[k] - ek[k]
        cnt += 1
        if cnt == _FLUSH_ROWS or n == N - 1:
            for k in range(w):
                tot[k] += acc[k]
                acc[k] = z
            cnt = 0


@_njit_called
def _lane_forward(x, y, r, has_res, N, C, S, c0, c1, w_, bias, has_w, has_b, eps, code, slope,
                  stat, z):
    """The training forward of channels ``[c0, c1)`` with short samples, lane-wise as
    :func:`_lane_backward`: shifted sums, squared deviations and the output, each one loop of
    ``(c1 - c0)·S`` elements per sample; a channel's statistics are its ``S`` lanes in order
    (independent of the blocking)."""
    dt = x.dtype
    w = (c1 - c0) * S
    NS = N * S
    ek = np.empty(w, dtype=dt)
    edl = np.empty(w, dtype=dt)
    acc = np.empty(w, dtype=dt)
    tot = np.empty(w)
    for c in range(c0, c1):
        o = (c - c0) * S
        for j in range(S):
            ek[o + j] = x[c * S]
    _lane_sums(x, N, C, S, c0, c1, ek, edl, False, tot, acc, z)
    deltas = np.empty(c1 - c0)
    for c in range(c0, c1):
        o = (c - c0) * S
        t = 0.0
        for j in range(S):
            t += tot[o + j]
        deltas[c - c0] = t / NS
        dl = dt.type(deltas[c - c0])
        for j in range(S):
            edl[o + j] = dl
    _lane_sums(x, N, C, S, c0, c1, ek, edl, True, tot, acc, z)
    esc = acc  # reused: the sums are done
    esh = np.empty(w, dtype=dt)
    for c in range(c0, c1):
        o = (c - c0) * S
        q = 0.0
        for j in range(S):
            q += tot[o + j]
        _finalize(c, float(NS), x[c * S], deltas[c - c0], q, w_, bias, has_w, has_b, eps, stat)
        for j in range(S):
            esc[o + j] = stat[3, c]
            esh[o + j] = stat[4, c]
    for n in range(N):
        base = (n * C + c0) * S
        xs = x[base:base + w]
        ys = y[base:base + w]
        rs = r[base:base + w]
        if code == RELU:
            for k in range(w):
                p = ((xs[k] - ek[k]) - edl[k]) * esc[k] + esh[k]
                if has_res:
                    p += rs[k]
                ys[k] = z if p <= z else p  # NaN propagates; -0 → +0 like torch
        else:
            for k in range(w):
                p = ((xs[k] - ek[k]) - edl[k]) * esc[k] + esh[k]
                if has_res:
                    p += rs[k]
                ys[k] = p
            if code != NONE:
                for k in range(w):
                    ys[k] = _act(ys[k], code, slope, z, x)


@_parallel
def nchw_forward(x, y, r, has_res, N, C, S, P, w, bias, has_w, has_b, eps, code, slope, stat,
                 cnt, dlt, m2):
    """Training forward. ``P == 1``: one channel per item, statistics and output while the
    channel's slab is in cache (one parallel region). ``P > 1``: chunk partials, merge, output
    (two regions). ``cnt``/``dlt``/``m2`` are ``C*P`` float64 scratch. Short samples take
    :func:`nchw_forward_lanes` instead (the host decides)."""
    z = x.dtype.type(0.0)
    NS = N * S
    if P == 1:
        for c in prange(C):
            k = x[c * S]
            n_, d_, q_ = _chunk_partials(x, C, S, c, 0, NS, k, z)
            _finalize(c, n_, k, d_, q_, w, bias, has_w, has_b, eps, stat)
            _nchw_apply_chunk(x, y, r, has_res, C, S, c, 0, NS, k, x.dtype.type(d_),
                              stat[3, c], stat[4, c], code, slope, z)
    else:
        for it in prange(C * P):
            c = it // P
            p = it - c * P
            n_, d_, q_ = _chunk_partials(x, C, S, c, p * NS // P, (p + 1) * NS // P, x[c * S], z)
            cnt[it] = n_
            dlt[it] = d_
            m2[it] = q_
        for c in range(C):  # P > 1 only with few channels
            n_, d_, q_ = _merge(cnt, dlt, m2, c * P, 1, P)
            _finalize(c, n_, x[c * S], d_, q_, w, bias, has_w, has_b, eps, stat)
        for it in prange(C * P):
            c = it // P
            p = it - c * P
            _nchw_apply_chunk(x, y, r, has_res, C, S, c, p * NS // P, (p + 1) * NS // P, x[c * S],
                              x.dtype.type(stat[5, c]), stat[3, c], stat[4, c], code, slope, z)


@_parallel
def nchw_forward_lanes(x, y, r, has_res, N, C, S, T, w, bias, has_w, has_b, eps, code, slope,
                       stat):
    """Training forward of short samples (:func:`lanes`): one lane block of channels per item
    (:func:`_lane_forward`). A separate entry point, compiled only when a shape needs it (in
    :func:`nchw_forward` it added 7 s to every first compile); ``T``, the thread count, sets
    only the number of blocks."""
    z = x.dtype.type(0.0)
    cb = max(1, min(_LANE_ELEMENTS // S, C // (4 * T)))
    for bi in prange((C + cb - 1) // cb):
        _lane_forward(x, y, r, has_res, N, C, S, bi * cb, min(C, (bi + 1) * cb), w, bias,
                      has_w, has_b, eps, code, slope, stat, z)


@_parallel
def nchw_partials(x, N, C, S, P, cnt_o, mean_o, m2_o):
    """Per-(channel, chunk) partials ``(n, mean, m2)``; item ``c*P + p``."""
    z = x.dtype.type(0.0)
    NS = N * S
    for it in prange(C * P):
        c = it // P
        p = it - c * P
        k = x[c * S]
        n_, d_, q_ = _chunk_partials(x, C, S, c, p * NS // P, (p + 1) * NS // P, k, z)
        cnt_o[it] = n_
        mean_o[it] = k + d_
        m2_o[it] = q_


@_parallel
def nchw_apply(x, y, r, has_res, N, C, S, P, mean, scale, shift, code, slope):
    """``y = act((x - mean)·scale + shift [+ r])`` (eval forward and the distributed path)."""
    z = x.dtype.type(0.0)
    NS = N * S
    for it in prange(C * P):
        c = it // P
        p = it - c * P
        _nchw_apply_chunk(x, y, r, has_res, C, S, c, p * NS // P, (p + 1) * NS // P, mean[c],
                          z, scale[c], shift[c], code, slope, z)


@_njit_inline
def _g1(d, e, sc, sh, q, code, has_res, z):
    """``dy·act'(pre)`` for ``code`` NONE or RELU, ``pre = e·sc + sh [+ q]`` as
    :func:`_seg_grad` computes it (``e = x - mean``)."""
    if code == RELU:
        p = e * sc + sh
        if has_res:
            p += q
        return d if p > z else z
    return d


@_njit_inline
def _seg_sums_fused(dy, x, r, base, L, m, sc, sh, has_res, code, z):
    """:func:`_seg_grad` + :func:`_seg_sums` in one loop (NONE/RELU), no ``g`` scratch."""
    xs = x[base:base + L]
    ds = dy[base:base + L]
    rs = r[base:base + L]
    sg = z
    sgx = z
    for k in range(L):
        e = xs[k] - m
        gk = _g1(ds[k], e, sc, sh, rs[k], code, has_res, z)
        sg += gk
        sgx += gk * e
    return sg, sgx


@_njit_inline
def _seg_dx_fused(dy, x, r, dx, dres, base, L, m, sc, sh, a, rb, has_res, code, need_dx,
                  need_dres, z):
    """:func:`_seg_grad` + :func:`_seg_dx` (NONE/RELU), ``g`` recomputed in each loop."""
    xs = x[base:base + L]
    ds = dy[base:base + L]
    rs = r[base:base + L]
    if need_dx:
        dxs = dx[base:base + L]
        for k in range(L):
            e = xs[k] - m
            dxs[k] = sc * (_g1(ds[k], e, sc, sh, rs[k], code, has_res, z) - a - e * rb)
    if need_dres:
        drs = dres[base:base + L]
        for k in range(L):
            drs[k] = _g1(ds[k], xs[k] - m, sc, sh, rs[k], code, has_res, z)


@_njit_called
def _sample_sums(dy, x, r, has_res, C, S, c, n0, n1, m, sc, sh, code, z):
    """``(Σg, Σg·(x - m))`` of channel ``c`` over whole samples ``[n0, n1)`` (NONE/RELU)."""
    sg = 0.0
    sgx = 0.0
    for n in range(n0, n1):
        u, v = _seg_sums_fused(dy, x, r, (n * C + c) * S, S, m, sc, sh, has_res, code, z)
        sg += u
        sgx += v
    return sg, sgx


@_njit_called
def _sample_dx(dy, x, r, has_res, C, S, c, n0, n1, m, sc, sh, code, aa, rb, need_dx, need_dres,
               dx, dres, z):
    """``dx``/``dres`` of channel ``c`` over whole samples ``[n0, n1)`` (NONE/RELU)."""
    for n in range(n0, n1):
        _seg_dx_fused(dy, x, r, dx, dres, (n * C + c) * S, S, m, sc, sh, aa, rb, has_res, code,
                      need_dx, need_dres, z)


@_njit_called
def _lane_backward(dy, x, r, has_res, N, C, S, c0, c1, mean, rstd, scale, shift, code,
                   training, need_sums, need_dx, need_dres, dx, dres, sg_o, sgx_o, z):
    """The NONE/RELU backward of channels ``[c0, c1)`` whose samples are short (``S`` elements).

    In every sample the block's channels are one contiguous run of ``w = (c1 - c0)·S``
    elements, so the passes go sample by sample over that run with the per-channel values
    expanded to ``w`` lanes: one long vectorized loop per sample instead of ``c1 - c0`` short
    ones, and memory read in order (one channel's samples at a time are ``C·S`` apart, too far
    for the prefetcher). Each lane sums its ``N`` values in the accumulation dtype, flushed to
    float64 every ``_FLUSH_ROWS`` samples; a channel's sums are its ``S`` lanes in order. Every
    value depends on its channel alone, not on the block, so results do not depend on the
    blocking (or the thread count)."""
    dt = x.dtype
    w = (c1 - c0) * S
    NS = N * S
    em = np.empty(w, dtype=dt)
    esc = np.empty(w, dtype=dt)
    esh = np.empty(w, dtype=dt)
    for c in range(c0, c1):
        o = (c - c0) * S
        for j in range(S):
            em[o + j] = mean[c]
            esc[o + j] = scale[c]
            esh[o + j] = shift[c]
    s1 = np.zeros(c1 - c0)
    s2 = np.zeros(c1 - c0)
    if need_sums:
        ag = np.zeros(w, dtype=dt)
        agx = np.zeros(w, dtype=dt)
        tg = np.zeros(w)
        tgx = np.zeros(w)
        cnt = 0
        for n in range(N):
            base = (n * C + c0) * S
            xs = x[base:base + w]
            ds = dy[base:base + w]
            rs = r[base:base + w]
            for k in range(w):
                e = xs[k] - em[k]
                g = _g1(ds[k], e, esc[k], esh[k], rs[k], code, has_res, z)
                ag[k] += g
                agx[k] += g * e
            cnt += 1
            if cnt == _FLUSH_ROWS or n == N - 1:
                for k in range(w):
                    tg[k] += ag[k]
                    tgx[k] += agx[k]
                    ag[k] = z
                    agx[k] = z
                cnt = 0
        for c in range(c0, c1):
            o = (c - c0) * S
            u = 0.0
            v = 0.0
            for j in range(S):
                u += tg[o + j]
                v += tgx[o + j]
            s1[c - c0] = u
            s2[c - c0] = v
    for c in range(c0, c1):
        sg_o[c] = s1[c - c0]
        sgx_o[c] = s2[c - c0] * rstd[c]
    if not (need_dx or need_dres):
        return
    ea = np.zeros(w, dtype=dt)
    erb = np.zeros(w, dtype=dt)
    if training:
        for c in range(c0, c1):
            o = (c - c0) * S
            aa = dt.type(s1[c - c0] / NS)
            rb = dt.type(sgx_o[c] / NS) * rstd[c]
            for j in range(S):
                ea[o + j] = aa
                erb[o + j] = rb
    for n in range(N):
        base = (n * C + c0) * S
        xs = x[base:base + w]
        ds = dy[base:base + w]
        rs = r[base:base + w]
        if need_dx:
            dxs = dx[base:base + w]
            for k in range(w):
                e = xs[k] - em[k]
                dxs[k] = esc[k] * (_g1(ds[k], e, esc[k], esh[k], rs[k], code, has_res, z)
                                   - ea[k] - e * erb[k])
        if need_dres:
            drs = dres[base:base + w]
            for k in range(w):
                drs[k] = _g1(ds[k], xs[k] - em[k], esc[k], esh[k], rs[k], code, has_res, z)


@_njit_inline
def _nchw_sums_chunk(dy, x, r, has_res, C, S, c, a, b, m, sc, sh, code, slope, g, z):
    sg = 0.0
    sgx = 0.0
    if _fused_samples(a, b, S, code):
        return _sample_sums(dy, x, r, has_res, C, S, c, a // S, b // S, m, sc, sh, code, z)
    i = a
    while i < b:
        base, L = _run(i, b, C, S, c)
        _seg_grad(dy, x, r, g, base, L, m, sc, sh, has_res, code, slope, z)
        u, v = _seg_sums(x, g, base, L, m, z)
        sg += u
        sgx += v
        i += L
    return sg, sgx


@_njit_inline
def _nchw_dx_chunk(dy, x, r, has_res, C, S, c, a, b, m, sc, sh, code, slope, aa, rb,
                   need_dx, need_dres, dx, dres, g, z):
    if _fused_samples(a, b, S, code):
        _sample_dx(dy, x, r, has_res, C, S, c, a // S, b // S, m, sc, sh, code, aa, rb,
                   need_dx, need_dres, dx, dres, z)
        return
    i = a
    while i < b:
        base, L = _run(i, b, C, S, c)
        _seg_grad(dy, x, r, g, base, L, m, sc, sh, has_res, code, slope, z)
        _seg_dx(x, g, dx, dres, base, L, m, sc, aa, rb, need_dx, need_dres)
        i += L


@_parallel
def nchw_backward(dy, x, r, has_res, N, C, S, P, mean, rstd, scale, shift, code, slope,
                  training, need_sums, need_dx, need_dres, dx, dres, sg_o, sgx_o, tg, tgx):
    """Backward: ``(Σg, Σg·x̂)`` then ``dx``/``dres``. ``P == 1``: one channel per item, the
    second pass from the cache-resident slab (one region); ``P > 1``: chunk sums (``tg``/``tgx``
    float64 scratch of ``C*P``), fixed-order combine, apply (two regions). Short samples with
    NONE/RELU take :func:`nchw_backward_lanes` instead (the host decides)."""
    z = x.dtype.type(0.0)
    NS = N * S
    # the fused NONE/RELU loops need no ``g`` scratch (one allocation per channel cost as much
    # as the arithmetic of a small channel)
    no_scratch = _fused_samples(0, NS, S, code)
    dummy = np.empty(1, dtype=x.dtype)
    if P == 1:
        for c in prange(C):
            g = dummy if no_scratch else np.empty(_BLOCK, dtype=x.dtype)
            m = mean[c]
            sg = 0.0
            sgx = 0.0
            if need_sums:
                sg, sgx = _nchw_sums_chunk(dy, x, r, has_res, C, S, c, 0, NS, m, scale[c],
                                           shift[c], code, slope, g, z)
            sg_o[c] = sg
            sgx_o[c] = sgx * rstd[c]
            aa = z
            rb = z
            if training:
                aa = x.dtype.type(sg / NS)
                rb = x.dtype.type(sgx_o[c] / NS) * rstd[c]
            if need_dx or need_dres:
                _nchw_dx_chunk(dy, x, r, has_res, C, S, c, 0, NS, m, scale[c], shift[c], code,
                               slope, aa, rb, need_dx, need_dres, dx, dres, g, z)
    else:
        if need_sums:
            for it in prange(C * P):
                g = np.empty(_BLOCK, dtype=x.dtype)
                c = it // P
                p = it - c * P
                tg[it], tgx[it] = _nchw_sums_chunk(dy, x, r, has_res, C, S, c, p * NS // P,
                                                   (p + 1) * NS // P, mean[c], scale[c],
                                                   shift[c], code, slope, g, z)
        for c in range(C):
            sg = 0.0
            sgx = 0.0
            if need_sums:
                for p in range(P):
                    sg += tg[c * P + p]
                    sgx += tgx[c * P + p]
            sg_o[c] = sg
            sgx_o[c] = sgx * rstd[c]
        if need_dx or need_dres:
            for it in prange(C * P):
                g = np.empty(_BLOCK, dtype=x.dtype)
                c = it // P
                p = it - c * P
                aa = z
                rb = z
                if training:
                    aa = x.dtype.type(sg_o[c] / NS)
                    rb = x.dtype.type(sgx_o[c] / NS) * rstd[c]
                _nchw_dx_chunk(dy, x, r, has_res, C, S, c, p * NS // P, (p + 1) * NS // P, mean[c],
                               scale[c], shift[c], code, slope, aa, rb, need_dx, need_dres, dx,
                               dres, g, z)


@_parallel
def nchw_backward_lanes(dy, x, r, has_res, N, C, S, T, mean, rstd, scale, shift, code, training,
                        need_sums, need_dx, need_dres, dx, dres, sg_o, sgx_o):
    """The NONE/RELU backward of short samples (:func:`lanes`): one lane block of channels per
    item (:func:`_lane_backward`); at most ``_LANE_ELEMENTS // S`` channels and at least four
    blocks per thread (``T``) when there are channels enough."""
    z = x.dtype.type(0.0)
    cb = max(1, min(_LANE_ELEMENTS // S, C // (4 * T)))
    for bi in prange((C + cb - 1) // cb):
        _lane_backward(dy, x, r, has_res, N, C, S, bi * cb, min(C, (bi + 1) * cb), mean, rstd,
                       scale, shift, code, training, need_sums, need_dx, need_dres, dx, dres,
                       sg_o, sgx_o, z)


# ------------------------------------------------------------------------------------------
# channels-last (M, C): rows split into P blocks; inner loops run along C (vectorised)


# Rows are taken four at a time: the per-channel vectors (shift, accumulators, scale, ...) are
# loaded once per four rows instead of once per row (the loops along C are L1-bound otherwise).


@_njit_inline
def _flush(tot, run, C, z):
    for c in range(C):
        tot[c] += run[c]
        run[c] = z


@_njit_inline
def _nhwc_block_partials(x, C, r0, r1, k, dlt_o, m2_o, P, p, z):
    """Shifted partials of rows ``[r0, r1)``: ``δ`` and ``m2`` per channel into item ``p*C+c``
    (block-major: each block writes its own contiguous run, no cache line shared between
    threads)."""
    tot = np.zeros(C)
    run = np.zeros(C, dtype=x.dtype)
    cnt = 0
    row = r0
    while row < r1:
        if row + 4 <= r1:
            x0 = x[row * C:(row + 1) * C]
            x1 = x[(row + 1) * C:(row + 2) * C]
            x2 = x[(row + 2) * C:(row + 3) * C]
            x3 = x[(row + 3) * C:(row + 4) * C]
            for c in range(C):
                kc = k[c]
                run[c] += ((x0[c] - kc) + (x1[c] - kc)) + ((x2[c] - kc) + (x3[c] - kc))
            row += 4
            cnt += 4
        else:
            x0 = x[row * C:(row + 1) * C]
            for c in range(C):
                run[c] += x0[c] - k[c]
            row += 1
            cnt += 1
        if cnt >= _FLUSH_ROWS or row == r1:  # flush the acc-dtype run into float64
            _flush(tot, run, C, z)
            cnt = 0
    n = r1 - r0
    dl = np.empty(C, dtype=x.dtype)
    for c in range(C):
        d = tot[c] / n
        dlt_o[p * C + c] = d
        dl[c] = d
        tot[c] = 0.0
    row = r0
    while row < r1:
        if row + 4 <= r1:
            x0 = x[row * C:(row + 1) * C]
            x1 = x[(row + 1) * C:(row + 2) * C]
            x2 = x[(row + 2) * C:(row + 3) * C]
            x3 = x[(row + 3) * C:(row + 4) * C]
            for c in range(C):
                kc = k[c]
                dc = dl[c]
                e0 = (x0[c] - kc) - dc
                e1 = (x1[c] - kc) - dc
                e2 = (x2[c] - kc) - dc
                e3 = (x3[c] - kc) - dc
                run[c] += (e0 * e0 + e1 * e1) + (e2 * e2 + e3 * e3)
            row += 4
            cnt += 4
        else:
            x0 = x[row * C:(row + 1) * C]
            for c in range(C):
                e = (x0[c] - k[c]) - dl[c]
                run[c] += e * e
            row += 1
            cnt += 1
        if cnt >= _FLUSH_ROWS or row == r1:
            _flush(tot, run, C, z)
            cnt = 0
    for c in range(C):
        m2_o[p * C + c] = tot[c]


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
    """``y = act(((x - k) - dl)·scale + shift [+ r])`` for rows ``[r0, r1)``."""
    simple = code == NONE or code == RELU  # noqa: SIM109 (kept plain for Numba)
    row = r0
    if simple and not has_res:
        while row + 4 <= r1:
            o = row * C
            x0 = x[o:o + C]
            x1 = x[o + C:o + 2 * C]
            x2 = x[o + 2 * C:o + 3 * C]
            x3 = x[o + 3 * C:o + 4 * C]
            y0 = y[o:o + C]
            y1 = y[o + C:o + 2 * C]
            y2 = y[o + 2 * C:o + 3 * C]
            y3 = y[o + 3 * C:o + 4 * C]
            for c in range(C):
                kc = k[c]
                dc = dl[c]
                s = scale[c]
                h = shift[c]
                y0[c] = _relu_or_id(((x0[c] - kc) - dc) * s + h, code, z)
                y1[c] = _relu_or_id(((x1[c] - kc) - dc) * s + h, code, z)
                y2[c] = _relu_or_id(((x2[c] - kc) - dc) * s + h, code, z)
                y3[c] = _relu_or_id(((x3[c] - kc) - dc) * s + h, code, z)
            row += 4
    elif simple:
        while row + 2 <= r1:
            o = row * C
            x0 = x[o:o + C]
            x1 = x[o + C:o + 2 * C]
            q0 = r[o:o + C]
            q1 = r[o + C:o + 2 * C]
            y0 = y[o:o + C]
            y1 = y[o + C:o + 2 * C]
            for c in range(C):
                kc = k[c]
                dc = dl[c]
                s = scale[c]
                h = shift[c]
                y0[c] = _relu_or_id(((x0[c] - kc) - dc) * s + h + q0[c], code, z)
                y1[c] = _relu_or_id(((x1[c] - kc) - dc) * s + h + q1[c], code, z)
            row += 2
    while row < r1:
        o = row * C
        xr = x[o:o + C]
        yr = y[o:o + C]
        if has_res:
            rr = r[o:o + C]
            for c in range(C):
                yr[c] = _relu_or_id(((xr[c] - k[c]) - dl[c]) * scale[c] + shift[c] + rr[c],
                                    code, z)
        else:
            for c in range(C):
                yr[c] = _relu_or_id(((xr[c] - k[c]) - dl[c]) * scale[c] + shift[c], code, z)
        if not simple:
            _act_inplace(y, o, C, code, slope, z)
        row += 1


@_parallel
def nhwc_forward(x, y, r, has_res, M, C, P, w, bias, has_w, has_b, eps, code, slope, stat,
                 cnt, dlt, m2):
    """Training forward: block partials (shift: the first row), merge, output; two regions."""
    z = x.dtype.type(0.0)
    k = x[0:C]
    for p in prange(P):
        _nhwc_block_partials(x, C, p * M // P, (p + 1) * M // P, k, dlt, m2, P, p, z)
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
def nhwc_partials(x, M, C, P, cnt_o, mean_o, m2_o):
    """Per-(row block, channel) partials ``(n, mean, m2)``, item ``p*C + c``."""
    z = x.dtype.type(0.0)
    k = x[0:C]
    for p in prange(P):
        r0 = p * M // P
        r1 = (p + 1) * M // P
        _nhwc_block_partials(x, C, r0, r1, k, mean_o, m2_o, P, p, z)
        for c in range(C):
            mean_o[p * C + c] += k[c]
            cnt_o[p * C + c] = r1 - r0


@_parallel
def nhwc_apply(x, y, r, has_res, M, C, P, mean, scale, shift, code, slope):
    z = x.dtype.type(0.0)
    zero = np.zeros(C, dtype=x.dtype)
    for p in prange(P):
        _nhwc_apply_rows(x, y, r, has_res, C, p * M // P, (p + 1) * M // P, mean, zero, scale,
                         shift, code, slope, z)


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
    if code == NONE or code == RELU:  # noqa: SIM109 (kept plain for Numba)
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
    if (code == NONE or code == RELU) and need_dx:  # noqa: SIM109 (kept plain for Numba)
        # g computed in the dx loop, one row per sweep (two rows, as in the sums, were slower
        # here: one more output and three more inputs in the loop; 89.9 vs 50.2 µs at C = 64)
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
    """Backward: block sums (region 1), fixed-order combine, ``dx``/``dres`` (region 2)."""
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


# ------------------------------------------------------------------------------------------
# backward apply with given a, b (the distributed path: a, b come from all-reduced sums)


@_parallel
def nchw_backward_apply(dy, x, r, has_res, N, C, S, P, mean, rstd, scale, shift, a, b, code,
                        slope, need_dx, need_dres, dx, dres):
    z = x.dtype.type(0.0)
    NS = N * S
    for it in prange(C * P):
        g = np.empty(_BLOCK, dtype=x.dtype)
        c = it // P
        p = it - c * P
        _nchw_dx_chunk(dy, x, r, has_res, C, S, c, p * NS // P, (p + 1) * NS // P, mean[c],
                       scale[c], shift[c], code, slope, a[c], rstd[c] * b[c], need_dx,
                       need_dres, dx, dres, g, z)


@_parallel
def nhwc_backward_apply(dy, x, r, has_res, M, C, P, mean, rstd, scale, shift, a, b, code,
                        slope, need_dx, need_dres, dx, dres):
    z = x.dtype.type(0.0)
    rb = np.empty(C, dtype=x.dtype)
    for c in range(C):
        rb[c] = rstd[c] * b[c]
    for p in prange(P):
        _nhwc_dx_rows(dy, x, r, has_res, C, p * M // P, (p + 1) * M // P, mean, scale, shift,
                      code, slope, a, rb, need_dx, need_dres, dx, dres, z)


# ------------------------------------------------------------------------------------------
# running statistics


@njit(cache=True, nogil=True)
def running_blend(rm, rv, mean, var, bessel, factor):
    """:meth:`Backend.blend_running <batchnorm.kernels.base.Backend.blend_running>` of ``mean``
    and ``var·bessel`` (a scalar of ``var``'s dtype: 1 for an unbiased ``var``, else the product
    ``stats.unbiased_var`` computes, rounded to that dtype as torch rounds it): nothing written
    unless every batch statistic is finite; the blend in float64 (no fastmath: the same IEEE
    operations, in the same order, as ``stats.blend``), rounded once on the store."""
    C = mean.shape[0]
    for c in range(C):
        if not (math.isfinite(mean[c]) and math.isfinite(var[c] * bessel)):
            return False
    keep = 1.0 - factor
    for c in range(C):
        rm[c] = factor * np.float64(mean[c]) + keep * np.float64(rm[c])
        rv[c] = factor * np.float64(var[c] * bessel) + keep * np.float64(rv[c])
    return True
