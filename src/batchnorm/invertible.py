"""Invertible activations: the pre-activation and the derivative, both read from the *output*.

The memory mode ``save="output"`` (:mod:`batchnorm.ops.saved_output`) keeps only a layer's
output ``y = act(pre)`` for the backward, so it needs, for each activation it accepts,

- ``inverse(y, a)``: ``pre = act⁻¹(y)``;
- ``grad(y, a)``: ``act'(pre)`` written as a function of ``y``.

``a`` is the activation's parameter (the leaky slope, the ELU alpha), the float that crosses
the op boundary next to the name. Adding an invertible activation is one entry of
:data:`FROM_OUTPUT` here plus its two device functions in ``kernels/cpu/_saved_output.py`` and
``kernels/triton_saved_output.py`` (the code in :data:`CODES`).

=============  =========================  ===============================  ============
activation     ``act⁻¹(y)``                ``act'`` from ``y``              invertible
=============  =========================  ===============================  ============
none           ``y``                      ``1``                            always
leaky_relu     ``y`` if ``y > 0`` else    ``1`` if ``y > 0`` else ``a``     ``a > 0``
               ``y / a``
elu            ``y`` if ``y > 0`` else    ``1`` if ``y > 0`` else          ``a > 0``
               ``log1p(y / a)``           ``y + a``
sigmoid        ``log(y / (1 - y))``       ``y·(1 - y)``                    always
tanh           ``atanh(y)``               ``1 - y²``                       always
=============  =========================  ===============================  ============

Kinks follow the stored-input path: with ``a > 0``, ``y > 0`` exactly when ``pre > 0``, so
the derivative at ``pre = 0`` is ``a`` on both paths (PyTorch's convention). ELU, sigmoid and
tanh saturate: there ``act⁻¹`` loses the digits ``y`` no longer holds (docs/saved_output.md).
ReLU (and every activation that maps an interval to one value: relu6, hardswish, hardsigmoid)
or one that is not monotone (silu, gelu, mish) has no inverse and is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["FROM_OUTPUT", "CODES", "refusal", "inverse_from_output", "grad_from_output"]

Fn = Callable[[Tensor, float], Tensor]


class FromOutput(NamedTuple):
    code: int  # what the Numba and Triton kernels of the mode switch on
    inverse: Fn
    grad: Fn
    valid: Callable[[float], bool]  # whether the parameter makes the activation a bijection
    needs: str  # the parameter rule, for the error message


def _positive(a: float) -> bool:
    return a > 0


def _always(a: float) -> bool:
    return True


FROM_OUTPUT: dict[str, FromOutput] = {
    "none": FromOutput(0, lambda y, a: y, lambda y, a: torch.ones_like(y), _always, ""),
    "leaky_relu": FromOutput(
        1, lambda y, a: torch.where(y > 0, y, y / a),
        lambda y, a: torch.where(y > 0, torch.ones_like(y), torch.full_like(y, a)),
        _positive, "a negative slope > 0"),
    "elu": FromOutput(
        2, lambda y, a: torch.where(y > 0, y, torch.log1p(y / a)),
        lambda y, a: torch.where(y > 0, torch.ones_like(y), y + a),
        _positive, "alpha > 0"),
    "sigmoid": FromOutput(3, lambda y, a: torch.logit(y), lambda y, a: y * (1 - y), _always, ""),
    "tanh": FromOutput(4, lambda y, a: torch.atanh(y), lambda y, a: 1 - y * y, _always, ""),
}
CODES: dict[str, int] = {name: e.code for name, e in FROM_OUTPUT.items()}


def refusal(name: str, a: float) -> str | None:
    """Why ``save="output"`` cannot take activation ``(name, a)``, or ``None`` when it can."""
    entry = FROM_OUTPUT.get(name)
    if entry is None:
        return (f"activation {name!r} is not invertible, so the backward cannot recover the "
                "normalized input from the output; use activation='leaky_relu' (or "
                "('leaky_relu', slope) with slope > 0), which is, or save='input'")
    if not entry.valid(a):
        return (f"activation {name!r} with parameter {a} is not invertible (it needs "
                f"{entry.needs}); use activation='leaky_relu' with a slope > 0, or "
                "save='input'")
    return None


def inverse_from_output(y: Tensor, name: str, a: float) -> Tensor:
    """``act⁻¹(y)`` (plain PyTorch ops, any device)."""
    return FROM_OUTPUT[name].inverse(y, a)


def grad_from_output(y: Tensor, name: str, a: float) -> Tensor:
    """``act'(act⁻¹(y))`` as a function of ``y`` (plain PyTorch ops, any device)."""
    return FROM_OUTPUT[name].grad(y, a)
