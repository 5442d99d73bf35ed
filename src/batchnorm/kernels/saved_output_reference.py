"""The backward of the memory mode ``save="output"`` in plain PyTorch ops: the executable
specification that :meth:`batchnorm.kernels.base.Backend.backward_from_output` runs unless a
backend overrides it (the reference backend does not; the Numba and Triton ones do).

Only the output ``y = act(pre)`` was kept, ``pre = x̂·γ + β [+ residual]``. With ``u = pre - β
[- residual]``, recovered from ``y`` through the activation's inverse, ``x̂ = u / γ`` and the
usual backward follows (``γ`` here is the layer's effective weight, whose magnitude the op layer
keeps at least :data:`batchnorm.ops.saved_output.GAMMA_MIN`)::

    g = dy·act'(pre)            act' read from y (batchnorm.activations)
    dβ = Σ g;  dγ = Σ g·x̂ = (Σ g·u)/γ
    dx = γ·rstd·(g - Σg/n - x̂·Σg·x̂/n)      (training: batch statistics)
    dx = γ·rstd·g                            (running statistics)
    dresidual = g

The mean is not needed: it cancels in ``x̂ = u/γ``. Computation is in the accumulation dtype
(``rstd``'s) and cast once at the end.
"""

from __future__ import annotations

from torch import Tensor

from ..activations import act_grad_from_output, act_inverse


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    return v.view(1, -1, 1) if x.dim() == 3 else v.view(1, -1)


def _dims(x: Tensor) -> tuple[int, ...]:
    return (0, 2) if x.dim() == 3 else (0,)


def backward_from_output(
    grad_y: Tensor, y: Tensor, weight: Tensor | None, bias: Tensor | None,
    residual: Tensor | None, rstd: Tensor, training: bool, act: str, slope: float,
    need_dx: bool, need_dweight: bool, need_dbias: bool, need_dres: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dweight, dbias, dresidual)`` from the output ``y`` (canonical tensors)."""
    acc = rstd.dtype
    yf = y.to(acc)
    g = grad_y.to(acc)
    if act != "none":
        g = g * act_grad_from_output(yf, act, slope)
    sum_g = g.sum(_dims(y))
    u = act_inverse(yf, act, slope)
    if bias is not None:
        u = u - _bcast(bias.to(acc), y)
    if residual is not None:
        u = u - residual.to(acc)
    w = None if weight is None else weight.to(acc)
    xhat = u if w is None else u / _bcast(w, y)
    sum_gx = (g * xhat).sum(_dims(y))
    dx = None
    if need_dx:
        scale = rstd if w is None else w * rstd
        if training:
            c = y.shape[1]
            n = max(y.numel() // c, 1)
            dx = (g - _bcast(sum_g / n, y) - xhat * _bcast(sum_gx / n, y)) * _bcast(scale, y)
        else:
            dx = g * _bcast(scale, y)
        dx = dx.to(y.dtype)
    dw = sum_gx.to(weight.dtype) if need_dweight and weight is not None else None
    db = sum_g.to(bias.dtype) if need_dbias and bias is not None else None
    dres = g.to(grad_y.dtype) if need_dres else None
    return dx, dw, db, dres
