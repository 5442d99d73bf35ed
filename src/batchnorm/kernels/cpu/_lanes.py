"""Lane blocks: the channels-first kernels for many short samples (``S ≤ 64``, ``N ≥ 16``).

With short samples a channel is many short runs ``C·S`` elements apart: the passes of
:mod:`._nchw` spend their time in each run's loop set-up and horizontal reduction, and read
memory the prefetcher cannot follow. A block of channels is, in every sample, one contiguous run
of ``(c1 - c0)·S`` elements: the passes go sample by sample over it with the per-channel values
expanded to lanes, each lane accumulating its ``N`` values (flushed to float64 every
``_FLUSH_ROWS`` samples), and a channel's sums are its ``S`` lanes in order, so no result
depends on the blocking or the thread count. The math is that of :mod:`._nchw`.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._activations import NONE, RELU, _act_run
from ._jit import _FLUSH_ROWS, _njit_called, _njit_inline, _parallel
from ._segments import _finalize, _g1

# Lane blocks (channels-first, one channel per item): samples of at most _LANE_MAX_S elements
# and at least _LANE_MIN_N samples. Longer samples ran slower (the per-element loads of the
# expanded per-channel values cost more than the short runs' overhead they save), as did few
# samples (set-up per block) (docs/decisions.md, "Channels-first 7×7 samples: lane blocks").
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
                _act_run(ys, w, code, slope, z)




@_parallel
def nchw_forward_lanes(x, y, r, has_res, N, C, S, T, w, bias, has_w, has_b, eps, code, slope,
                       stat):
    """Training forward of short samples (:func:`lanes`): one lane block of channels per item
    (:func:`_lane_forward`). A separate entry point, compiled only when a shape needs it (as a
    branch of ``nchw_forward`` it lengthened every first compile; docs/decisions.md,
    "Channels-first 7×7 samples: lane blocks").

    Args:
        x: the input, flat ``(N·C·S,)``, float32 or float64 (the accumulation dtype).
        y: the output, like ``x`` (written; may be ``x`` itself, as the in-place forward does).
        r: the residual, like ``x``, added before the activation; ``x`` itself when ``has_res``
            is False (then never read).
        has_res: whether ``r`` is added.
        N, C, S: the channels-first shape.
        T: the thread count; it sets only the number of lane blocks, never a result.
        w, bias: γ and β, ``(C,)`` in ``x``'s dtype; any ``(C,)`` array of that dtype where
            ``has_w``/``has_b`` is False.
        has_w, has_b: whether the layer has γ / β (else 1 / 0).
        eps: added to the variance, a scalar of ``x``'s dtype.
        code: the activation's code (:data:`batchnorm.activations.CODES`).
        slope: the activation's parameter (leaky slope, ELU alpha), a scalar of ``x``'s dtype.
        stat: ``(6, C)`` in ``x``'s dtype, written: mean, biased variance, rstd, scale
            (``γ·rstd``), shift (β) and the centering ``δ`` (``mean - K``).
    """
    z = x.dtype.type(0.0)
    cb = max(1, min(_LANE_ELEMENTS // S, C // (4 * T)))
    for bi in prange((C + cb - 1) // cb):
        _lane_forward(x, y, r, has_res, N, C, S, bi * cb, min(C, (bi + 1) * cb), w, bias,
                      has_w, has_b, eps, code, slope, stat, z)




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



@_parallel
def nchw_backward_lanes(dy, x, r, has_res, N, C, S, T, mean, rstd, scale, shift, code, training,
                        need_sums, need_dx, need_dres, dx, dres, sg_o, sgx_o):
    """The NONE/RELU backward of short samples (:func:`lanes`): one lane block of channels per
    item (:func:`_lane_backward`); at most ``_LANE_ELEMENTS // S`` channels and at least four
    blocks per thread (``T``) when there are channels enough.

    Args:
        dy: the incoming gradient, like ``x``.
        x: the input, flat ``(N·C·S,)``, float32 or float64 (the accumulation dtype).
        r: the residual, like ``x``, added before the activation; ``x`` itself when ``has_res``
            is False (then never read).
        has_res: whether ``r`` is added.
        N, C, S: the channels-first shape.
        T: the thread count; it sets only the number of lane blocks, never a result.
        mean, rstd, scale, shift: the forward's per-channel values, ``(C,)`` in ``x``'s dtype
            (``pre = (x - mean)·scale + shift [+ r]`` is recomputed from them).
        code: the activation's code, ``NONE`` or ``RELU`` only (the host checks).
        training: whether ``dx`` has the batch-statistics terms (``a = Σg/n``, ``b = Σg·x̂/n``);
            False with running statistics (``a = b = 0``).
        need_sums: whether to compute ``Σg`` and ``Σg·x̂`` (else written as 0).
        need_dx, need_dres: which of ``dx``, ``dres`` to write.
        dx, dres: outputs like ``x`` (``dres = g``); ``x`` itself where not needed (never written).
        sg_o, sgx_o: ``(C,)`` in ``x``'s dtype, written: ``Σg`` (dβ) and ``rstd·Σg·(x - mean)``
            (dγ).
    """
    z = x.dtype.type(0.0)
    cb = max(1, min(_LANE_ELEMENTS // S, C // (4 * T)))
    for bi in prange((C + cb - 1) // cb):
        _lane_backward(dy, x, r, has_res, N, C, S, bi * cb, min(C, (bi + 1) * cb), mean, rstd,
                       scale, shift, code, training, need_sums, need_dx, need_dres, dx, dres,
                       sg_o, sgx_o, z)

