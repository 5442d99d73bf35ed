"""``g = dy·act'(pre)`` over a whole tensor: the first pass of the backward of an activation
other than ReLU (``pre = (x - mean)·scale + shift [+ r]`` recomputed from ``x``).

The host then runs the activation-free backward on ``g`` (``dres = g``). ``none`` and ``relu``
compute ``g`` inside the backward's own loops, in registers; every other activation's
derivative is a loop of its own (:func:`._activations._grad_run`), which, run per row or per
sample inside those kernels, was called on runs as short as 16 elements, and twice (the sums pass
and the ``dx`` pass). Here it runs once per element, on runs of a whole sample (channels-first)
or a whole row block (channels-last) (docs/decisions.md, "Activations in the CPU kernels").
"""

from __future__ import annotations

from numba import prange

from ._activations import _grad_run
from ._jit import _parallel


@_parallel
def nchw_act_grad(dy, x, r, has_res, N, C, S, mean, scale, shift, code, slope, g):
    """``g = dy·act'(pre)`` of a channels-first tensor, one sample per parallel item.

    Args:
        dy: the incoming gradient, flat ``(N·C·S,)``, float32 or float64.
        x: the input, like ``dy``.
        r: the residual, like ``dy``, added before the activation; ``x`` itself when
            ``has_res`` is False (then never read).
        has_res: whether ``r`` is added.
        N, C, S: the channels-first shape.
        mean, scale, shift: the forward's per-channel values, ``(C,)`` in ``x``'s dtype.
        code: the activation's code (:data:`batchnorm.activations.CODES`), not NONE or RELU.
        slope: the activation's parameter, a scalar of ``x``'s dtype.
        g: the output, like ``dy``.
    """
    z = x.dtype.type(0.0)
    CS = C * S
    for n in prange(N):
        for c in range(C):
            o = n * CS + c * S
            xs = x[o:o + S]
            gs = g[o:o + S]
            m = mean[c]
            sc = scale[c]
            sh = shift[c]
            if has_res:
                rs = r[o:o + S]
                for k in range(S):
                    gs[k] = (xs[k] - m) * sc + sh + rs[k]
            else:
                for k in range(S):
                    gs[k] = (xs[k] - m) * sc + sh
        o = n * CS
        _grad_run(dy[o:o + CS], g[o:o + CS], CS, code, slope, z)


@_parallel
def nhwc_act_grad(dy, x, r, has_res, M, C, P, mean, scale, shift, code, slope, g):
    """``g = dy·act'(pre)`` of a channels-last tensor, one row block per parallel item.

    Args:
        dy: the incoming gradient, flat ``(M·C,)``, float32 or float64.
        x: the input, like ``dy``.
        r: the residual, like ``dy``; ``x`` itself when ``has_res`` is False (never read).
        has_res: whether ``r`` is added.
        M, C: the channels-last shape (rows, channels).
        P: row blocks; block ``p`` holds the rows ``[p*M//P, (p+1)*M//P)``.
        mean, scale, shift: the forward's per-channel values, ``(C,)`` in ``x``'s dtype.
        code: the activation's code, not NONE or RELU.
        slope: the activation's parameter, a scalar of ``x``'s dtype.
        g: the output, like ``dy``.
    """
    z = x.dtype.type(0.0)
    for p in prange(P):
        r0 = p * M // P
        r1 = (p + 1) * M // P
        for row in range(r0, r1):
            o = row * C
            xr = x[o:o + C]
            gr = g[o:o + C]
            if has_res:
                rr = r[o:o + C]
                for c in range(C):
                    gr[c] = (xr[c] - mean[c]) * scale[c] + shift[c] + rr[c]
            else:
                for c in range(C):
                    gr[c] = (xr[c] - mean[c]) * scale[c] + shift[c]
        _grad_run(dy[r0 * C:r1 * C], g[r0 * C:r1 * C], (r1 - r0) * C, code, slope, z)
