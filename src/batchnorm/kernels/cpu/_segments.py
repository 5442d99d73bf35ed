"""Segment helpers of the Numba kernels: one contiguous run, one chunk, merge and finalize.

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

Backward per run (``g = dy·act'(pre)``, ``pre`` recomputed from ``x``): ``Σg``, ``Σg·(x - m)``
and ``dx = sc·(g - a - (x - m)·rb)``, ``dres = g``; for none/ReLU the ``*_fused`` helpers
compute ``g`` inside the loop (:func:`_g1`), the others through a ``g`` scratch
(:func:`_seg_grad`).
"""

from __future__ import annotations

import math

from numba import njit

from ._activations import NONE, RELU, _act_run, _grad_run
from ._jit import _BLOCK, _njit_called, _njit_inline

# ------------------------------------------------------------------------------------------
# one contiguous run x[base : base+L]


# Loops run over ``range(L)`` on slice views: LLVM then vectorises them; indexing with
# ``range(base, base + L)`` kept a negative-index check per element and was not vectorised
# (docs/decisions.md, "Loops index slice views from zero").


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
    _act_run(y[base:base + L], L, code, slope, z)


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
    _grad_run(ds, g, L, code, slope, z)


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

