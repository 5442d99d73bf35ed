"""Channels-first ``(N, C, S)`` kernels: a channel (or a chunk of one) per parallel item.

Forward ``y = act((x - mean)·scale + shift [+ r])``, the training forward on the centered value
``((x - K) - δ)·scale + shift`` (:mod:`._segments`); backward (``g = dy·act'(pre)``, ``pre``
recomputed from ``x``): ``sum_g = Σg``, ``sum_gx = rstd·Σ g·(x - mean)``,
``dx = scale·(g - a - x̂·b)`` (``a = b = 0`` with running statistics), ``dres = g``.

With ``P == 1`` a channel is one item and every pass runs over its slab while it is in cache
(one parallel region); with ``P > 1`` (few channels) chunk partials or sums are combined in a
fixed order between two regions. Short samples with many of them take :mod:`._lanes` instead
(the host decides). Common arguments of the entry points:

- ``x``, ``y``, ``dy``, ``dx``, ``dres``: flat ``(N·C·S,)`` views, float32 or float64 (the
  accumulation dtype is the input's); outputs are written, never read;
- ``r``: the residual, like ``x``; ``x`` itself when ``has_res`` is False (then never read);
- ``N``, ``C``, ``S``: the shape; ``P``: chunks per channel (``cpu.nchw_chunks``);
- ``code``: the activation's code (:mod:`batchnorm.activations`); ``slope``: its parameter, a
  scalar of ``x``'s dtype;
- per-channel vectors (``mean``, ``rstd``, ``scale``, ``shift``, ``w``, ``bias``, ``a``, ``b``):
  ``(C,)`` in ``x``'s dtype.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import _BLOCK, _njit_called, _njit_inline, _parallel
from ._segments import (
    _chunk_partials,
    _finalize,
    _fused_samples,
    _merge,
    _run,
    _seg_apply,
    _seg_dx,
    _seg_dx_fused,
    _seg_grad,
    _seg_sums,
    _seg_sums_fused,
)


@_njit_inline
def _nchw_apply_chunk(x, y, r, has_res, C, S, c, a, b, k, dl, sc, sh, code, slope, z):
    i = a
    while i < b:
        base, L = _run(i, b, C, S, c)
        _seg_apply(x, y, r, base, L, k, dl, sc, sh, has_res, code, slope, z)
        i += L



@_parallel
def nchw_forward(x, y, r, has_res, N, C, S, P, w, bias, has_w, has_b, eps, code, slope, stat,
                 cnt, dlt, m2):
    """Training forward. ``P == 1``: one channel per item, statistics and output while the
    channel's slab is in cache (one parallel region). ``P > 1``: chunk partials, merge, output
    (two regions). Short samples take :func:`._lanes.nchw_forward_lanes` instead (the host
    decides).

    Args:
        x: the input, flat ``(N·C·S,)``, float32 or float64 (the accumulation dtype).
        y: the output, like ``x`` (written; may be ``x`` itself, as the in-place forward does).
        r: the residual, like ``x``, added before the activation; ``x`` itself when ``has_res``
            is False (then never read).
        has_res: whether ``r`` is added.
        N, C, S: the channels-first shape.
        P: chunks per channel (``cpu.nchw_chunks``), item ``c*P + p``.
        w, bias: γ and β, ``(C,)`` in ``x``'s dtype; any ``(C,)`` array of that dtype where
            ``has_w``/``has_b`` is False.
        has_w, has_b: whether the layer has γ / β (else 1 / 0).
        eps: added to the variance, a scalar of ``x``'s dtype.
        code: the activation's code (:data:`batchnorm.activations.CODES`).
        slope: the activation's parameter (leaky slope, ELU alpha), a scalar of ``x``'s dtype.
        stat: ``(6, C)`` in ``x``'s dtype, written: mean, biased variance, rstd, scale
            (``γ·rstd``), shift (β) and the centering ``δ`` (``mean - K``).
        cnt, dlt, m2: ``C*P`` float64 scratch for the chunk partials (``P > 1``).
    """
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
def nchw_partials(x, N, C, S, P, cnt_o, mean_o, m2_o):
    """Per-(channel, chunk) partials ``(n, mean, m2)``, item ``c*P + p`` (the
    distributed path merges them with :func:`batchnorm.stats.merge_many`).

    Args:
        x: the input, flat ``(N·C·S,)``, float32 or float64 (the accumulation dtype).
        N, C, S: the channels-first shape.
        P: chunks per channel (``cpu.nchw_chunks``), item ``c*P + p``.
        cnt_o, mean_o, m2_o: ``C*P`` float64, written: count, mean and
            ``Σ(x - mean)²`` of each chunk.
    """
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
    """``y = act((x - mean)·scale + shift [+ r])`` (eval forward, the distributed path
    and the in-place forward).

    Args:
        x: the input, flat ``(N·C·S,)``, float32 or float64 (the accumulation dtype).
        y: the output, like ``x`` (written; may be ``x`` itself, as the in-place forward does).
        r: the residual, like ``x``, added before the activation; ``x`` itself when ``has_res``
            is False (then never read).
        has_res: whether ``r`` is added.
        N, C, S: the channels-first shape.
        P: chunks per channel (``cpu.nchw_chunks``), item ``c*P + p``.
        mean, scale, shift: ``(C,)`` in ``x``'s dtype; ``y = act((x - mean)·scale + shift
            [+ r])``.
        code: the activation's code (:data:`batchnorm.activations.CODES`).
        slope: the activation's parameter (leaky slope, ELU alpha), a scalar of ``x``'s dtype.
    """
    z = x.dtype.type(0.0)
    NS = N * S
    for it in prange(C * P):
        c = it // P
        p = it - c * P
        _nchw_apply_chunk(x, y, r, has_res, C, S, c, p * NS // P, (p + 1) * NS // P, mean[c],
                          z, scale[c], shift[c], code, slope, z)


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
    second pass from the cache-resident slab (one region); ``P > 1``: chunk sums, fixed-order
    combine, apply (two regions). Short samples with NONE/RELU take
    :func:`._lanes.nchw_backward_lanes` instead (the host decides).

    Args:
        dy: the incoming gradient, like ``x``.
        x: the input, flat ``(N·C·S,)``, float32 or float64 (the accumulation dtype).
        r: the residual, like ``x``, added before the activation; ``x`` itself when ``has_res``
            is False (then never read).
        has_res: whether ``r`` is added.
        N, C, S: the channels-first shape.
        P: chunks per channel (``cpu.nchw_chunks``), item ``c*P + p``.
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
        tg, tgx: ``C*P`` float64 scratch for the chunk sums (``P > 1``).
    """
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
def nchw_backward_apply(dy, x, r, has_res, N, C, S, P, mean, rstd, scale, shift, a, b, code,
                        slope, need_dx, need_dres, dx, dres):
    """``dx``/``dres`` with given ``a``, ``b`` (the distributed path: they come from
    all-reduced sums); the second pass of :func:`nchw_backward`.

    Args:
        dy: the incoming gradient, like ``x``.
        x: the input, flat ``(N·C·S,)``, float32 or float64 (the accumulation dtype).
        r: the residual, like ``x``, added before the activation; ``x`` itself when ``has_res``
            is False (then never read).
        has_res: whether ``r`` is added.
        N, C, S: the channels-first shape.
        P: chunks per channel (``cpu.nchw_chunks``), item ``c*P + p``.
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
    NS = N * S
    for it in prange(C * P):
        g = np.empty(_BLOCK, dtype=x.dtype)
        c = it // P
        p = it - c * P
        _nchw_dx_chunk(dy, x, r, has_res, C, S, c, p * NS // P, (p + 1) * NS // P, mean[c],
                       scale[c], shift[c], code, slope, a[c], rstd[c] * b[c], need_dx,
                       need_dres, dx, dres, g, z)
