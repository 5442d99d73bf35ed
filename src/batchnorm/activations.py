"""Fused activations: the names users pass, and their reference forward and derivative.

An activation is given as ``None``, a name (``"relu"``, ``"leaky_relu"``, ``"silu"``,
``"gelu"``), a pair ``("leaky_relu", slope)``, or a module instance (``nn.ReLU()``,
``nn.LeakyReLU(0.2)``, ``nn.SiLU()``, ``nn.GELU()``), so a timm-style ``act_layer`` converts.
Internally it is the pair ``(name, slope)`` with ``name == "none"`` for no activation: the form
that crosses the op boundary (custom-op schemas take a ``str`` and a ``float``).

Derivatives, written as functions of the pre-activation ``p`` (recomputed in the backward
from ``x``, never stored):

- relu: ``1[p > 0]``; leaky_relu: ``1`` if ``p > 0`` else ``slope`` (PyTorch's convention at 0);
- silu: ``σ(p)·(1 + p·(1 - σ(p)))``;
- gelu (erf form): ``Φ(p) + p·φ(p)`` with ``Φ(p) = ½(1 + erf(p/√2))``, ``φ(p) = e^{-p²/2}/√(2π)``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "ActivationSpec", "parse_activation", "act_forward", "act_grad"]

ACTIVATIONS = ("none", "relu", "leaky_relu", "silu", "gelu")
DEFAULT_LEAKY_SLOPE = 0.01

ActivationSpec = Any  # None | str | tuple[str, float] | nn.Module, see parse_activation


def parse_activation(activation: ActivationSpec) -> tuple[str, float]:
    """Normalize what a user passes into ``(name, slope)``; raise a clear error otherwise."""
    if activation is None:
        return "none", 0.0
    if isinstance(activation, nn.Module):
        return _from_module(activation)
    if isinstance(activation, str):
        name = activation.lower()
        if name == "identity":
            name = "none"
        if name not in ACTIVATIONS:
            raise ValueError(
                f"activation: expected None or one of {ACTIVATIONS[1:]} (or ('leaky_relu', "
                f"slope)), got {activation!r}"
            )
        return name, (DEFAULT_LEAKY_SLOPE if name == "leaky_relu" else 0.0)
    if isinstance(activation, tuple) and len(activation) == 2:
        name, slope = activation
        if name != "leaky_relu":
            raise ValueError(
                f"activation: only 'leaky_relu' takes a parameter, got {activation!r}"
            )
        if isinstance(slope, bool) or not isinstance(slope, numbers.Real):
            raise TypeError(
                f"activation: leaky_relu slope must be a real number, got {type(slope).__name__}"
            )
        if not math.isfinite(float(slope)):
            raise ValueError(f"activation: leaky_relu slope must be finite, got {slope}")
        return "leaky_relu", float(slope)
    raise TypeError(
        "activation: expected None, a name such as 'relu', ('leaky_relu', slope) or an "
        f"activation module, got {type(activation).__name__}"
    )


def _from_module(module: nn.Module) -> tuple[str, float]:
    if isinstance(module, nn.Identity):
        return "none", 0.0
    if isinstance(module, nn.ReLU):
        return "relu", 0.0
    if isinstance(module, nn.LeakyReLU):
        return "leaky_relu", float(module.negative_slope)
    if isinstance(module, nn.SiLU):
        return "silu", 0.0
    if isinstance(module, nn.GELU) and module.approximate == "none":
        return "gelu", 0.0
    raise ValueError(
        "activation: module must be nn.ReLU, nn.LeakyReLU, nn.SiLU, nn.GELU() (erf form) or "
        f"nn.Identity, got {module!r}"
    )


def spec_of(name: str, slope: float) -> ActivationSpec:
    """The user-facing spec of ``(name, slope)``: inverse of :func:`parse_activation`."""
    if name == "none":
        return None
    if name == "leaky_relu" and slope != DEFAULT_LEAKY_SLOPE:
        return ("leaky_relu", slope)
    return name


def module_of(name: str, slope: float) -> nn.Module | None:
    """An ``nn.Module`` computing the activation (used when converting to plain PyTorch)."""
    return {
        "none": None,
        "relu": nn.ReLU(),
        "leaky_relu": nn.LeakyReLU(slope),
        "silu": nn.SiLU(),
        "gelu": nn.GELU(),
    }[name]


def act_forward(pre: Tensor, name: str, slope: float) -> Tensor:
    """Differentiable reference forward (plain PyTorch ops)."""
    if name == "none":
        return pre
    if name == "relu":
        return F.relu(pre)
    if name == "leaky_relu":
        return F.leaky_relu(pre, slope)
    if name == "silu":
        return F.silu(pre)
    if name == "gelu":
        return F.gelu(pre)
    raise ValueError(f"unknown activation {name!r}")


_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def act_grad(pre: Tensor, name: str, slope: float) -> Tensor:
    """Derivative of the activation at ``pre``; see the module docstring for the formulas."""
    if name == "relu":
        return (pre > 0).to(pre.dtype)
    if name == "leaky_relu":
        return torch.where(pre > 0, torch.ones_like(pre), torch.full_like(pre, slope))
    if name == "silu":
        s = torch.sigmoid(pre)
        return s * (1 + pre * (1 - s))
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(pre * _INV_SQRT2))
        return cdf + pre * torch.exp(-0.5 * pre * pre) * _INV_SQRT_2PI
    if name == "none":
        return torch.ones_like(pre)
    raise ValueError(f"unknown activation {name!r}")
