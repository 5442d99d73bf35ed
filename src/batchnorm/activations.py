"""The one activation table: every backend, the modules and the converters read it.

An activation is given as ``None``, a name (``"relu"``, ``"elu"``, ...), a pair
``(name, parameter)`` for the activations that take one (``("leaky_relu", 0.2)``,
``("elu", 0.5)``), or the PyTorch module that computes it (``nn.ReLU()``, ``nn.ELU(0.5)``,
``nn.GELU(approximate="tanh")``, ...), so a timm-style ``act_layer`` converts. Internally it is
the pair ``(name, param)``, ``name == "none"`` for no activation: the form that crosses the op
boundary (the custom-op schemas take a ``str`` and a ``float``; the float, historically called
``slope``, is the activation's parameter: the leaky slope, the ELU alpha, 0 otherwise).

Each :class:`Activation` entry holds, in one place: its name and the integer code the Numba and
Triton kernels switch on, its parameter (name, default), the PyTorch module it is parsed from
and converted back to, the reference forward (differentiable twice: the ``create_graph`` path
differentiates it) and derivative, and, where the activation is a bijection, its inverse (in-place
activated BN recovers the pre-activation from the output). Adding an activation is one entry
here plus its two kernel functions in ``kernels/cpu/_activations.py`` (``_act``, ``_grad``) and
``kernels/triton/_activations.py`` (``_act_fwd``, ``_act_grad``).

Derivatives, as functions of the pre-activation ``p`` (recomputed in the backward from ``x``,
never stored). At a kink the value is PyTorch's own choice, so gradients match bit for bit there:

- relu ``1[p > 0]``; leaky_relu ``1`` if ``p > 0`` else ``a``; relu6 ``1[0 < p < 6]``;
- hardswish ``0`` if ``p ≤ -3``, ``p/3 + ½`` if ``p < 3``, else ``1``;
  hardsigmoid ``1/6`` on ``-3 < p < 3``, else ``0`` (exactly 1/6: PyTorch's float64
  ``hardsigmoid_backward`` multiplies by the float32 rounding of 1/6, 3e-8 off);
- sigmoid ``σ(1 - σ)``; tanh ``1 - tanh²``; elu ``1`` if ``p > 0`` else ``a·eᵖ``;
- silu ``σ(p)·(1 + p·(1 - σ(p)))``;
- gelu (erf form) ``Φ(p) + p·φ(p)``, ``Φ(p) = ½(1 + erf(p/√2))``, ``φ(p) = e^{-p²/2}/√(2π)``;
- gelu_tanh: ``y = ½p(1 + t)``, ``t = tanh(k(p + 0.044715p³))``, ``k = √(2/π)``:
  ``½(1 + t) + ½p(1 - t²)·k(1 + 3·0.044715p²)``;
- mish: ``y = p·t``, ``t = tanh(softplus(p))``: ``t + p·σ(p)·(1 - t²)``
  (``softplus' = σ``).

Invertible activations: the pre-activation and the derivative, both read from the *output*. The
memory mode ``save="output"`` (:mod:`batchnorm.ops.saved_output`) keeps only a layer's output
``y = act(pre)`` for the backward, so it needs, for each activation it accepts, the row's
``inverse(y, a)`` (``pre = act⁻¹(y)``) and ``output_grad(y, a)`` (``act'(pre)`` written as a
function of ``y``). Adding an invertible activation is those two fields of its row plus its two
device functions in ``kernels/cpu/_saved_output.py`` and ``kernels/triton/_saved_output.py``
(switching on the row's code).

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
or one that is not monotone (silu, gelu, mish) has no inverse and is refused (:func:`refusal`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "TABLE", "INVERTIBLE", "Activation", "ActivationSpec",
           "parse_activation", "act_forward", "act_grad", "act_inverse", "act_grad_from_output",
           "invertible", "refusal", "module_of", "spec_of"]

ActivationSpec = Any  # None | str | tuple[str, float] | nn.Module, see parse_activation
Fn = Callable[[Tensor, float], Tensor]

INV_SQRT2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_TANH_K = 0.044715  # the cubic coefficient of the tanh approximation of GELU


@dataclass(frozen=True)
class Activation:
    """One row of the table.

    ``param``: the constructor keyword of ``module`` that holds the parameter (``None`` when the
    activation has none); ``fixed``: constructor keywords whose value selects this activation
    (``approximate="tanh"``); ``inverse``/``invertible``: ``act⁻¹(y, param)`` and whether it
    exists for a given parameter, ``output_grad``: ``act'(act⁻¹(y))`` as a function of ``y``,
    ``needs``: the parameter rule for the error message (the module docstring's table);
    ``foreign``: the qualified names of other libraries' classes
    that compute exactly this activation and take no parameter (timm's ``GELU``, ``Tanh``, ...),
    parsed as it too (by name: this module imports no other library).
    """

    name: str
    code: int
    forward: Fn
    grad: Fn
    module: type[nn.Module] | None
    param: str | None = None
    default: float = 0.0
    fixed: tuple[tuple[str, Any], ...] = ()
    inverse: Fn | None = None
    invertible: Callable[[float], bool] = lambda param: False
    output_grad: Fn | None = None
    needs: str = ""
    foreign: tuple[str, ...] = ()

    def to_module(self, param: float) -> nn.Module | None:
        if self.module is None:
            return None
        kwargs = dict(self.fixed)
        if self.param is not None:
            kwargs[self.param] = param
        return self.module(**kwargs)


def _ones(p: Tensor, a: float) -> Tensor:
    return torch.ones_like(p)


def _step(p: Tensor, a: float) -> Tensor:
    return (p > 0).to(p.dtype)


def _leaky_grad(p: Tensor, a: float) -> Tensor:
    return torch.where(p > 0, torch.ones_like(p), torch.full_like(p, a))


def _relu6_grad(p: Tensor, a: float) -> Tensor:
    return ((p > 0) & (p < 6)).to(p.dtype)


def _hardswish_grad(p: Tensor, a: float) -> Tensor:
    mid = torch.where(p < 3, p / 3 + 0.5, torch.ones_like(p))
    return torch.where(p <= -3, torch.zeros_like(p), mid)


def _hardsigmoid(p: Tensor, a: float) -> Tensor:
    # relu6(p + 3)/6: the same values as F.hardsigmoid, and differentiable twice (PyTorch has no
    # derivative for hardsigmoid_backward, which the create_graph path would need)
    return F.relu6(p + 3) / 6


def _hardsigmoid_grad(p: Tensor, a: float) -> Tensor:
    return ((p > -3) & (p < 3)).to(p.dtype) / 6


def _sigmoid_grad(p: Tensor, a: float) -> Tensor:
    s = torch.sigmoid(p)
    return s * (1 - s)


def _tanh_grad(p: Tensor, a: float) -> Tensor:
    t = torch.tanh(p)
    return 1 - t * t


def _elu_grad(p: Tensor, a: float) -> Tensor:
    return torch.where(p > 0, torch.ones_like(p), a * torch.exp(p))


def _silu_grad(p: Tensor, a: float) -> Tensor:
    s = torch.sigmoid(p)
    return s * (1 + p * (1 - s))


def _gelu_grad(p: Tensor, a: float) -> Tensor:
    cdf = 0.5 * (1 + torch.erf(p * INV_SQRT2))
    return cdf + p * torch.exp(-0.5 * p * p) * INV_SQRT_2PI


def _gelu_tanh_grad(p: Tensor, a: float) -> Tensor:
    t = torch.tanh(SQRT_2_OVER_PI * (p + GELU_TANH_K * p * p * p))
    return 0.5 * (1 + t) + 0.5 * p * (1 - t * t) * SQRT_2_OVER_PI * (1 + 3 * GELU_TANH_K * p * p)


def _mish_grad(p: Tensor, a: float) -> Tensor:
    t = torch.tanh(F.softplus(p))
    return t + p * torch.sigmoid(p) * (1 - t * t)


def _leaky_inverse(y: Tensor, a: float) -> Tensor:
    return torch.where(y > 0, y, y / a)


def _elu_inverse(y: Tensor, a: float) -> Tensor:
    return torch.where(y > 0, y, torch.log1p(y / a))


def _leaky_output_grad(y: Tensor, a: float) -> Tensor:
    return torch.where(y > 0, torch.ones_like(y), torch.full_like(y, a))


def _elu_output_grad(y: Tensor, a: float) -> Tensor:
    return torch.where(y > 0, torch.ones_like(y), y + a)


def _positive(param: float) -> bool:
    return param > 0


def _always(param: float) -> bool:
    return True


_TIMM = "timm.layers.activations"  # timm's own activation classes (no parameter, exact)

_ENTRIES = (
    Activation("none", 0, lambda p, a: p, _ones, nn.Identity,
               inverse=lambda y, a: y, invertible=_always,
               output_grad=lambda y, a: torch.ones_like(y)),
    Activation("relu", 1, lambda p, a: F.relu(p), _step, nn.ReLU),
    Activation("leaky_relu", 2, F.leaky_relu, _leaky_grad, nn.LeakyReLU,
               param="negative_slope", default=0.01, inverse=_leaky_inverse,
               invertible=_positive, output_grad=_leaky_output_grad,
               needs="a negative slope > 0"),
    Activation("silu", 3, lambda p, a: F.silu(p), _silu_grad, nn.SiLU,
               foreign=(f"{_TIMM}.Swish",)),
    Activation("gelu", 4, lambda p, a: F.gelu(p), _gelu_grad, nn.GELU,
               fixed=(("approximate", "none"),), foreign=(f"{_TIMM}.GELU",)),
    Activation("relu6", 5, lambda p, a: F.relu6(p), _relu6_grad, nn.ReLU6),
    Activation("hardswish", 6, lambda p, a: F.hardswish(p), _hardswish_grad, nn.Hardswish,
               foreign=(f"{_TIMM}.HardSwish",)),
    Activation("hardsigmoid", 7, _hardsigmoid, _hardsigmoid_grad, nn.Hardsigmoid,
               foreign=(f"{_TIMM}.HardSigmoid",)),
    Activation("sigmoid", 8, lambda p, a: torch.sigmoid(p), _sigmoid_grad, nn.Sigmoid,
               inverse=lambda y, a: torch.logit(y), invertible=_always,
               output_grad=lambda y, a: y * (1 - y), foreign=(f"{_TIMM}.Sigmoid",)),
    Activation("tanh", 9, lambda p, a: torch.tanh(p), _tanh_grad, nn.Tanh,
               inverse=lambda y, a: torch.atanh(y), invertible=_always,
               output_grad=lambda y, a: 1 - y * y, foreign=(f"{_TIMM}.Tanh",)),
    Activation("elu", 10, lambda p, a: F.elu(p, a), _elu_grad, nn.ELU, param="alpha",
               default=1.0, inverse=_elu_inverse, invertible=_positive,
               output_grad=_elu_output_grad, needs="alpha > 0"),
    Activation("mish", 11, lambda p, a: F.mish(p), _mish_grad, nn.Mish,
               foreign=(f"{_TIMM}.Mish",)),
    Activation("gelu_tanh", 12, lambda p, a: F.gelu(p, approximate="tanh"), _gelu_tanh_grad,
               nn.GELU, fixed=(("approximate", "tanh"),), foreign=(f"{_TIMM}.GELUTanh",)),
)

TABLE: dict[str, Activation] = {e.name: e for e in _ENTRIES}
ACTIVATIONS = tuple(TABLE)
CODES: dict[str, int] = {e.name: e.code for e in _ENTRIES}
#: the activations ``save="output"`` can take (those with an inverse), in table order
INVERTIBLE = tuple(e.name for e in _ENTRIES if e.inverse is not None)
_WITH_PARAM = tuple(e.name for e in _ENTRIES if e.param is not None)


def _check_param(name: str, value: object) -> float:
    entry = TABLE[name]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"activation: {name} {entry.param} must be a real number, got "
                        f"{type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"activation: {name} {entry.param} must be finite, got {value}")
    return float(value)


def parse_activation(activation: ActivationSpec) -> tuple[str, float]:
    """Normalize what a user passes into ``(name, param)``; raise a clear error otherwise."""
    if activation is None:
        return "none", 0.0
    if isinstance(activation, nn.Module):
        return _from_module(activation)
    if isinstance(activation, str):
        name = activation.lower()
        if name == "identity":
            name = "none"
        if name not in TABLE:
            raise ValueError(
                f"activation: expected None or one of {ACTIVATIONS[1:]} (or (name, parameter) "
                f"for {_WITH_PARAM}), got {activation!r}"
            )
        return name, TABLE[name].default
    if isinstance(activation, tuple) and len(activation) == 2:
        name, param = activation
        if name not in _WITH_PARAM:
            raise ValueError(
                f"activation: only {_WITH_PARAM} take a parameter, got {activation!r}"
            )
        return name, _check_param(name, param)
    raise TypeError(
        "activation: expected None, a name such as 'relu', (name, parameter) such as "
        f"('leaky_relu', 0.2) or an activation module, got {type(activation).__name__}"
    )


def _from_module(module: nn.Module) -> tuple[str, float]:
    # The exact class, not isinstance: a subclass may compute something else.
    kind = type(module)
    qualified = f"{kind.__module__}.{kind.__qualname__}"
    for entry in _ENTRIES:
        if qualified in entry.foreign:
            return entry.name, entry.default
        if type(module) is entry.module and all(
                getattr(module, k, None) == v for k, v in entry.fixed):
            if entry.param is None:
                return entry.name, 0.0
            return entry.name, _check_param(entry.name, getattr(module, entry.param))
    names = ", ".join(sorted({f"nn.{e.module.__name__}" for e in _ENTRIES if e.module}))
    raise ValueError(
        f"activation: module must be one of {names} (nn.GELU with approximate 'none' or "
        f"'tanh'), got {module!r}"
    )


def spec_of(name: str, param: float) -> ActivationSpec:
    """The user-facing spec of ``(name, param)``: inverse of :func:`parse_activation`."""
    if name == "none":
        return None
    if TABLE[name].param is not None and param != TABLE[name].default:
        return (name, param)
    return name


def module_of(name: str, param: float) -> nn.Module | None:
    """An ``nn.Module`` computing the activation (used when converting to plain PyTorch)."""
    if name == "none":
        return None
    return TABLE[name].to_module(param)


def act_forward(pre: Tensor, name: str, param: float) -> Tensor:
    """Differentiable (twice) reference forward, in plain PyTorch ops."""
    return _entry(name).forward(pre, param)


def act_grad(pre: Tensor, name: str, param: float) -> Tensor:
    """Derivative of the activation at ``pre``; see the module docstring for the formulas."""
    return _entry(name).grad(pre, param)


def invertible(name: str, param: float) -> bool:
    """Whether ``act`` is a bijection onto its range, so ``pre`` can be recovered from ``y``."""
    return _entry(name).invertible(param)


def act_inverse(y: Tensor, name: str, param: float) -> Tensor:
    """``act⁻¹(y)``; raises for an activation that is not invertible (see :func:`invertible`)."""
    entry = _entry(name)
    if entry.inverse is None or not entry.invertible(param):
        raise ValueError(f"activation: {name} (parameter {param}) is not invertible")
    return entry.inverse(y, param)


def act_grad_from_output(y: Tensor, name: str, param: float) -> Tensor:
    """``act'(act⁻¹(y))`` as a function of ``y`` (plain PyTorch ops, any device); for an
    invertible activation (see :func:`refusal`)."""
    return _entry(name).output_grad(y, param)  # type: ignore[misc]


def refusal(name: str, param: float) -> str | None:
    """Why ``save="output"`` cannot take activation ``(name, param)``, or ``None`` when it can."""
    entry = TABLE.get(name)
    if entry is None or entry.inverse is None:
        return (f"activation {name!r} is not invertible, so the backward cannot recover the "
                "normalized input from the output; use activation='leaky_relu' (or "
                "('leaky_relu', slope) with slope > 0), which is, or save='input'")
    if not entry.invertible(param):
        return (f"activation {name!r} with parameter {param} is not invertible (it needs "
                f"{entry.needs}); use activation='leaky_relu' with a slope > 0, or "
                "save='input'")
    return None


def _entry(name: str) -> Activation:
    try:
        return TABLE[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}") from None
