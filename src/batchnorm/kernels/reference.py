"""The reference backend: plain PyTorch ops on any device, the executable specification.

Readable first; every fast backend is tested against it. Computation is in the accumulation
dtype (float32 for half and float32 input, float64 for float64) and cast once at the end.
"""

from __future__ import annotations

from torch import Tensor

from .. import stats as S
from ..activations import act_forward, act_grad
from .base import Backend


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    """View a per-channel vector ``(C,)`` against a canonical tensor."""
    return v.view(1, -1, 1) if x.dim() == 3 else v.view(1, -1)


def _dims(x: Tensor) -> tuple[int, ...]:
    return (0, 2) if x.dim() == 3 else (0,)


class ReferenceBackend(Backend):
    name = "reference"

    def _pre(self, x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor | None,
             residual: Tensor | None) -> Tensor:
        acc = mean.dtype
        pre = (x.to(acc) - _bcast(mean, x)) * _bcast(scale, x)
        if shift is not None:
            pre = pre + _bcast(shift, x)
        if residual is not None:
            pre = pre + residual.to(acc)
        return pre

    def stats(self, x: Tensor) -> S.Partials:
        return S.channel_partials(x)

    def forward_train(self, x, weight, bias, residual, eps, act, slope, running=None):
        # Normalize the centered tensor itself rather than x - round(mean): see
        # stats.centered_partials (exact to one rounding when |mean| >> std).
        partials, centered = S.centered_partials(x)
        mean, var, rstd = S.finalize(partials, eps)
        pre = centered * _bcast(S.scale_of(rstd, weight), x)
        if bias is not None:
            pre = pre + _bcast(bias.to(mean.dtype), x)
        if residual is not None:
            pre = pre + residual.to(mean.dtype)
        return act_forward(pre, act, slope).to(x.dtype), mean, rstd, var

    def apply(self, x, mean, scale, shift, residual, act, slope, out=None):
        pre = self._pre(x, mean, scale, shift, residual)
        y = act_forward(pre, act, slope).to(x.dtype)
        return y if out is None else out.copy_(y)

    def forward_train_into(self, x, weight, bias, residual, eps, act, slope):
        # the oracle keeps its centered forward: computed in a fresh buffer, then copied
        y, mean, rstd, var = self.forward_train(x, weight, bias, residual, eps, act, slope)
        x.copy_(y)
        return mean, rstd, var

    def _g(self, grad_y, x, mean, scale, shift, residual, act, slope) -> Tensor:
        g = grad_y.to(mean.dtype)
        if act != "none":
            g = g * act_grad(self._pre(x, mean, scale, shift, residual), act, slope)
        return g

    def backward_reduce(self, grad_y, x, mean, rstd, scale, shift, residual, act, slope):
        g = self._g(grad_y, x, mean, scale, shift, residual, act, slope)
        xhat = (x.to(mean.dtype) - _bcast(mean, x)) * _bcast(rstd, x)
        return g.sum(_dims(x)), (g * xhat).sum(_dims(x))

    def backward_apply(self, grad_y, x, mean, rstd, scale, shift, residual, act, slope,
                       a, b, need_dx, need_dres):
        g = self._g(grad_y, x, mean, scale, shift, residual, act, slope)
        dx = None
        if need_dx:
            if a is None or b is None:
                dx = g * _bcast(scale, x)
            else:
                xhat = (x.to(mean.dtype) - _bcast(mean, x)) * _bcast(rstd, x)
                dx = (g - _bcast(a, x) - xhat * _bcast(b, x)) * _bcast(scale, x)
            dx = dx.to(x.dtype)
        dres = g.to(grad_y.dtype) if need_dres else None
        return dx, dres


BACKEND = ReferenceBackend()
