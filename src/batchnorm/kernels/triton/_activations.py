"""The activations of the Triton kernels: ``act(p)`` and ``act'(p)`` on a block.

The codes are those of the one activation table (:mod:`batchnorm.activations`), whose module
docstring derives every derivative and gives the value at each kink (PyTorch's). The formulas are
restated here because Triton needs ``tl.*`` on blocks and cannot call the table's PyTorch
functions; ``ACT`` is a ``tl.constexpr``, so each kernel is specialised per activation.
"""

from __future__ import annotations

import triton
import triton.language as tl

from batchnorm import activations as A

# kernels may read constexpr globals only
_INV_SQRT2 = tl.constexpr(A.INV_SQRT2)
_INV_SQRT_2PI = tl.constexpr(A.INV_SQRT_2PI)
_SQRT_2_OVER_PI = tl.constexpr(A.SQRT_2_OVER_PI)
_GELU_TANH_K = tl.constexpr(A.GELU_TANH_K)
_RELU = tl.constexpr(A.CODES["relu"])
_LEAKY = tl.constexpr(A.CODES["leaky_relu"])
_SILU = tl.constexpr(A.CODES["silu"])
_GELU = tl.constexpr(A.CODES["gelu"])
_RELU6 = tl.constexpr(A.CODES["relu6"])
_HARDSWISH = tl.constexpr(A.CODES["hardswish"])
_HARDSIGMOID = tl.constexpr(A.CODES["hardsigmoid"])
_SIGMOID = tl.constexpr(A.CODES["sigmoid"])
_TANH = tl.constexpr(A.CODES["tanh"])
_ELU = tl.constexpr(A.CODES["elu"])
_MISH = tl.constexpr(A.CODES["mish"])
_GELU_TANH = tl.constexpr(A.CODES["gelu_tanh"])


@triton.jit
def _act_fwd(p, slope, ACT: tl.constexpr):
    """act(p) (``slope``: the activation's parameter), the formulas of
    :mod:`batchnorm.activations`; NaN propagates as in PyTorch (relu keeps a NaN).

    Triton's core language has no tanh: ``tanh(u) = 2σ(2u) - 1`` (absolute error of a float32
    rounding, which is what the sums ``1 + tanh`` and ``1 - tanh²`` below need). Mish's
    ``tanh(softplus(p)) = n/(n + 2)`` with ``n = eᵖ(eᵖ + 2)`` (from ``tanh(log u) =
    (u² - 1)/(u² + 1)``, ``u = 1 + eᵖ``): no log, accurate for very negative ``p``, and 1 to
    float32 precision above ``p = 20``, where ``n`` would overflow. (Written inline, not as
    jit helpers: a further level of helpers failed under Triton's interpreter, which CI runs.)"""
    y = p
    if ACT == _RELU:
        y = tl.where(p < 0.0, 0.0, p)
    elif ACT == _LEAKY:
        y = tl.where(p > 0.0, p, p * slope)
    elif ACT == _SILU:
        y = p * tl.sigmoid(p)
    elif ACT == _GELU:
        y = 0.5 * p * (1.0 + tl.math.erf(p * _INV_SQRT2))
    elif ACT == _RELU6:
        y = tl.where(p < 0.0, 0.0, tl.where(p > 6.0, 6.0, p))
    elif ACT == _HARDSWISH:
        y = p * tl.minimum(tl.maximum(p + 3.0, 0.0), 6.0) / 6.0
    elif ACT == _HARDSIGMOID:
        y = tl.minimum(tl.maximum(p + 3.0, 0.0), 6.0) / 6.0
    elif ACT == _SIGMOID:
        y = tl.sigmoid(p)
    elif ACT == _TANH:
        y = 2.0 * tl.sigmoid(2.0 * p) - 1.0
    elif ACT == _ELU:
        y = tl.where(p > 0.0, p, slope * (tl.exp(tl.minimum(p, 0.0)) - 1.0))
    elif ACT == _MISH:
        e = tl.exp(tl.minimum(p, 20.0))
        n = e * (e + 2.0)
        y = p * tl.where(p > 20.0, 1.0, n / (n + 2.0))
    elif ACT == _GELU_TANH:
        u = _SQRT_2_OVER_PI * (p + _GELU_TANH_K * p * p * p)
        y = p * tl.sigmoid(2.0 * u)  # ½p(1 + tanh u) = p·σ(2u)
    return y


@triton.jit
def _act_grad(p, slope, ACT: tl.constexpr):
    """act'(p), as :func:`batchnorm.activations.act_grad` (PyTorch's value at each kink);
    tanh and mish's tanh(softplus) as in :func:`_act_fwd`."""
    d = tl.full(p.shape, 1.0, tl.float32)
    if ACT == _RELU:
        d = tl.where(p > 0.0, 1.0, 0.0)
    elif ACT == _LEAKY:
        d = tl.where(p > 0.0, 1.0, slope)
    elif ACT == _SILU:
        sg = tl.sigmoid(p)
        d = sg * (1.0 + p * (1.0 - sg))
    elif ACT == _GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(p * _INV_SQRT2))
        d = cdf + p * tl.exp(-0.5 * p * p) * _INV_SQRT_2PI
    elif ACT == _RELU6:
        d = tl.where((p > 0.0) & (p < 6.0), 1.0, 0.0)
    elif ACT == _HARDSWISH:
        d = tl.where(p <= -3.0, 0.0, tl.where(p < 3.0, p / 3.0 + 0.5, 1.0))
    elif ACT == _HARDSIGMOID:
        d = tl.where((p > -3.0) & (p < 3.0), 1.0 / 6.0, 0.0)
    elif ACT == _SIGMOID:
        sg = tl.sigmoid(p)
        d = sg * (1.0 - sg)
    elif ACT == _TANH:
        t = 2.0 * tl.sigmoid(2.0 * p) - 1.0
        d = 1.0 - t * t
    elif ACT == _ELU:
        d = tl.where(p > 0.0, 1.0, slope * tl.exp(tl.minimum(p, 0.0)))
    elif ACT == _MISH:
        e = tl.exp(tl.minimum(p, 20.0))
        n = e * (e + 2.0)
        t = tl.where(p > 20.0, 1.0, n / (n + 2.0))
        d = t + p * tl.sigmoid(p) * (1.0 - t * t)
    elif ACT == _GELU_TANH:
        u = _SQRT_2_OVER_PI * (p + _GELU_TANH_K * p * p * p)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        d = 0.5 * (1.0 + t) + 0.5 * p * (1.0 - t * t) * _SQRT_2_OVER_PI * (
            1.0 + 3.0 * _GELU_TANH_K * p * p)
    return d
