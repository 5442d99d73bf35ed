"""The activations of the Numba kernels: ``act(p)`` and ``dy·act'(p)`` per element.

The codes are those of the one activation table (:mod:`batchnorm.activations`), whose module
docstring derives every derivative and gives the value at each kink (PyTorch's). The formulas are
restated here because Numba needs ``math.*`` on scalars and cannot call the table's PyTorch
functions. ``none`` and ``relu`` have vectorised loops of their own in the kernels; the others go
through :func:`_act_run` and :func:`_grad_run`, which switch on the code once per run and then
loop: a switch inside the loop keeps LLVM from vectorising it. They are called, not inlined:
inlined into a ``parallel=True`` kernel, the SiLU loop was left scalar (docs/decisions.md,
"Activations in the CPU kernels"). Leaky ReLU, ReLU6, hardswish,
hardsigmoid, SiLU and sigmoid have loops of their own (SiLU and sigmoid in float32 through the
vectorisable :func:`_exp_f32`); the rest take the per-element switches :func:`_act` and
:func:`_grad` (``erf``/``tanh``/``expm1`` have no vector form in Numba here).
"""

from __future__ import annotations

import math

import numpy as np

from ... import activations as A
from ...activations import CODES
from ._jit import _njit_called, _njit_inline

# The codes of the one activation table (batchnorm.activations). Numba freezes module globals
# at compile time, and its disk cache is keyed on the kernels' own files, not on the table's:
# a code is never renumbered.
NONE, RELU, LEAKY, SILU, GELU = (CODES[n] for n in ("none", "relu", "leaky_relu", "silu", "gelu"))
RELU6, HARDSWISH, HARDSIGMOID = (CODES[n] for n in ("relu6", "hardswish", "hardsigmoid"))
SIGMOID, TANH, ELU, MISH, GELU_TANH = (
    CODES[n] for n in ("sigmoid", "tanh", "elu", "mish", "gelu_tanh"))
_INV_SQRT2 = A.INV_SQRT2
_INV_SQRT_2PI = A.INV_SQRT_2PI
_SQRT_2_OVER_PI = A.SQRT_2_OVER_PI
_GELU_TANH_K = A.GELU_TANH_K


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
# runs: one loop per activation


@_njit_inline
def _exp_f32(t):
    """``e^t`` for a float64 ``t``, to about 1e-13 relative: enough for a result rounded to
    float32, and written without calls or branches so that a loop calling it vectorises
    (Numba's ``math.exp`` is a scalar call). ``t`` is clamped to ``[-110, 110]`` (beyond which a
    float32 ``sigmoid``/``silu`` no longer changes), then ``e^{t/256}`` is a Taylor polynomial
    (``|t/256| ≤ 0.43``, the degree-14 remainder 1e-16) squared eight times (the relative error
    grows 256-fold). ``+inf`` stays ``+inf``; NaN propagates (the clamps compare it false)."""
    u = (110.0 if t > 110.0 else (-110.0 if t < -110.0 else t)) * (1.0 / 256.0)
    q = 1.0 + u * (1.0 + u * (1.0 / 2 + u * (1.0 / 6 + u * (1.0 / 24 + u * (1.0 / 120 + u * (
        1.0 / 720 + u * (1.0 / 5040 + u * (1.0 / 40320 + u * (1.0 / 362880 + u * (
            1.0 / 3628800 + u * (1.0 / 39916800 + u * (1.0 / 479001600 + u * (
                1.0 / 6227020800)))))))))))))
    q = q * q
    q = q * q
    q = q * q
    q = q * q
    q = q * q
    q = q * q
    q = q * q
    q = q * q
    return np.inf if t > 110.0 else q


@_njit_inline
def _exp(t, x):
    """``e^t`` (float64 ``t``) for results in ``x``'s dtype: :func:`_exp_f32` for float32,
    ``math.exp`` for float64 (whose results need every digit)."""
    if x.itemsize == 4:
        return _exp_f32(t)
    return math.exp(t)


@_njit_called
def _act_run(ys, L, code, slope, z):
    """``ys[:L] = act(ys[:L])`` in place (``code`` not NONE/RELU, which the kernels inline).
    The values are :func:`_act`'s (SiLU and sigmoid: with a float64 ``e^-p``)."""
    if code == LEAKY:
        for j in range(L):
            p = ys[j]
            ys[j] = p * slope if p <= z else p
    elif code == HARDSWISH:
        for j in range(L):
            p = ys[j]
            ys[j] = ys.dtype.type(p * min(max(p + 3.0, 0.0), 6.0) / 6.0)
    elif code == RELU6:
        for j in range(L):
            p = ys[j]
            ys[j] = z if p <= z else (ys.dtype.type(6.0) if p >= 6.0 else p)
    elif code == HARDSIGMOID:
        for j in range(L):
            p = ys[j]
            ys[j] = ys.dtype.type(min(max(p + 3.0, 0.0), 6.0) / 6.0)
    elif code == SILU:
        for j in range(L):
            p = np.float64(ys[j])
            ys[j] = ys.dtype.type(p / (1.0 + _exp(-p, ys)))
    elif code == SIGMOID:
        for j in range(L):
            p = np.float64(ys[j])
            ys[j] = ys.dtype.type(1.0 / (1.0 + _exp(-p, ys)))
    else:
        for j in range(L):
            ys[j] = _act(ys[j], code, slope, z, ys)


@_njit_called
def _grad_run(ds, g, L, code, slope, z):
    """``g[:L] = ds[:L]·act'(g[:L])`` in place: ``g`` holds the pre-activation on entry (``code``
    not NONE/RELU). The values are :func:`_grad`'s (SiLU and sigmoid: float64 ``e^-p``)."""
    if code == LEAKY:
        for k in range(L):
            p = g[k]
            d = ds[k]
            g[k] = d if p > z else d * slope
    elif code == HARDSWISH:
        for k in range(L):
            p = g[k]
            d = ds[k]
            v = g.dtype.type(d * (p / 3.0 + 0.5)) if p < 3.0 else d
            g[k] = z if p <= -3.0 else v
    elif code == RELU6:
        for k in range(L):
            p = g[k]
            g[k] = ds[k] if p > z and p < 6.0 else z
    elif code == HARDSIGMOID:
        for k in range(L):
            p = g[k]
            g[k] = g.dtype.type(ds[k] / 6.0) if p > -3.0 and p < 3.0 else z
    elif code == SILU:
        for k in range(L):
            p = np.float64(g[k])
            s = 1.0 / (1.0 + _exp(-p, g))
            g[k] = g.dtype.type(ds[k] * (s * (1.0 + p * (1.0 - s))))
    elif code == SIGMOID:
        for k in range(L):
            p = np.float64(g[k])
            s = 1.0 / (1.0 + _exp(-p, g))
            g[k] = g.dtype.type(ds[k] * (s * (1.0 - s)))
    else:
        for k in range(L):
            g[k] = _grad(ds[k], g[k], code, slope, z, g)
