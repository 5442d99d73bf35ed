"""The activations of the Numba kernels: ``act(p)`` and ``dy·act'(p)`` per element.

The codes are those of the one activation table (:mod:`batchnorm.activations`), whose module
docstring derives every derivative and gives the value at each kink (PyTorch's). The formulas are
restated here because Numba needs ``math.*`` on scalars and cannot call the table's PyTorch
functions. ``none`` and ``relu`` have vectorised loops of their own in the kernels; the others go
through these per-element switches (their cost is the ``exp``/``erf``/``tanh``).
"""

from __future__ import annotations

import math

from ... import activations as A
from ...activations import CODES
from ._jit import _njit_inline

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
