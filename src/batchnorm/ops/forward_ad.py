"""Forward-mode AD (dual tensors, ``torch.autograd.forward_ad``): plain differentiable ops carry
the tangents; the statistics (and so the running update) still come from the backend."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from .library import composite_forward, forward_impl

__all__ = ["active", "forward"]


def active() -> bool:
    """Whether a forward-mode AD level is open (read without entering the module's API)."""
    return _forward_ad.__dict__.get("_current_level", -1) >= 0  # type: ignore[no-any-return]


def forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None, training: bool, eps: float,
    act: str, slope: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``batchnorm::forward`` for dual tensors. Running statistics are not differentiable, as
    in PyTorch: their tangents are an error next to a tangent of a differentiable input, and
    are dropped otherwise."""
    if any(t is not None and _forward_ad.unpack_dual(t).tangent is not None
           for t in (running_mean, running_var)):
        if any(t is not None and _forward_ad.unpack_dual(t).tangent is not None
               for t in (x, weight, bias, residual)):
            raise RuntimeError(
                "batch_norm is not differentiable wrt running_mean and running_var: they "
                "carry forward-mode tangents (pass their primal values)")
        running_mean, running_var = (
            None if t is None else _forward_ad.unpack_dual(t).primal
            for t in (running_mean, running_var))
    with torch.no_grad():
        _y, mean, rstd, var = forward_impl(x, weight, bias, residual, running_mean, running_var,
                                           training, eps, act, slope)
    y = composite_forward(x, weight, bias, residual, mean, rstd, training, eps, act, slope)
    return y, mean, rstd, var
