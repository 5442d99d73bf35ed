"""The memory mode ``save="output"``: keep the layer's output for the backward, not its input.

In-place activated batch norm (Rota Bulò et al., 2018). The ordinary op
(:mod:`batchnorm.ops`) saves the input ``x`` (and the residual) and recomputes everything else;
this one saves the output ``y = act(x̂·γ + β [+ residual])`` and recovers
``x̂ = (act⁻¹(y) - β [- residual]) / γ`` in the backward
(:meth:`batchnorm.kernels.base.Backend.backward_from_output`). The next layer (a convolution)
saves ``y`` as its own input anyway, so the layer's saved activation memory becomes the
storage it shares with its neighbour; a block's residual is the block's input, which its first
convolution saves too.

Saved per call: ``y``, the residual when there is one, the effective weight and bias (``(C,)``)
and ``rstd`` (``(C,)``); the mean is not needed (it cancels in ``x̂ = u/γ``).

γ near zero. ``x̂ = u/γ`` loses what ``u = x̂·γ`` could not hold: with ``γ = 0`` nothing of ``x̂``
is left in ``y`` at all. As the paper does, the weight the op computes with is
``γ' = sign(γ)·max(|γ|, GAMMA_MIN)`` (``sign(±0) = ±1``), in the forward and the backward
alike, so the backward always inverts exactly the function the forward computed; the gradient
reaches ``γ`` unchanged (straight through), so a weight inside the band can still leave it.
The forward differs from the stored-input path only for ``|γ| < GAMMA_MIN``, by at most
``GAMMA_MIN·|x̂|`` per element. The measured error against the stored-input path, by ``|γ|``
and dtype, is in ``docs/saved_output.md``.

``inplace=True``: the output is written into the input's storage and the input tensor is
returned (``mark_dirty``): autograd's version counter then refuses any backward that still
needs the old input, and refuses a leaf that requires grad, with its own error. In training on
an input whose canonical view is its own storage, the backend writes there directly
(:meth:`~batchnorm.kernels.base.Backend.forward_train_into`: the Numba and Triton backends
create no second tensor of the input's size); otherwise (the reference backend, eval mode, an
input that canonicalization copies) the output is computed in a fresh buffer, copied into the
input and released at once.

Eager autograd only: under ``torch.compile``, ``torch.func`` transforms and forward-mode AD the
mode falls back to the ordinary op with the same effective weight (same values; the memory
saving is then not made).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import ops
from ..activations import refusal
from ..kernels import select
from ..kernels.base import RunningUpdate
from ..layout import canonicalize
from .library import run_forward

__all__ = ["GAMMA_MIN", "SAVE_MODES", "check_mode", "effective_weight", "forward"]

SAVE_MODES = ("input", "output")
# |γ| below this is computed with as ±GAMMA_MIN (see the module docstring and
# docs/decisions.md: the measured gradient error at and above it, in float32 and float64).
GAMMA_MIN = 1e-5


def check_mode(save: object, inplace: object, act: str, slope: float) -> None:
    """The checks of ``save``/``inplace`` against the activation ``(act, slope)``: a clear
    ``ValueError``/``TypeError`` naming the argument, before any state changes."""
    if not isinstance(save, str) or save not in SAVE_MODES:
        raise ValueError(f"save: expected one of {SAVE_MODES}, got {save!r}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace: expected a bool, got {type(inplace).__name__}")
    if inplace and save != "output":
        raise ValueError(
            "inplace: True needs save='output' (the stored-input backward reads the input "
            "that the in-place output would overwrite), got save='input'")
    if save == "output":
        why = refusal(act, slope)
        if why is not None:
            raise ValueError(f"save='output': {why}")


def effective_weight(weight: Tensor | None) -> Tensor | None:
    """``sign(γ)·max(|γ|, GAMMA_MIN)`` (``sign(±0) = ±1``), no graph."""
    if weight is None:
        return None
    w = weight.detach()
    small = w.abs() < GAMMA_MIN
    return torch.where(small, torch.copysign(torch.full_like(w, GAMMA_MIN), w), w)


class _SavedOutput(torch.autograd.Function):
    """The forward of :func:`batchnorm.ops.forward` with the effective weight; saves the output
    and runs the backend's :meth:`~batchnorm.kernels.base.Backend.backward_from_output`."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var,  # type: ignore[override]
                training, eps, act, slope, running, inplace):
        w = effective_weight(weight)
        xc, lay = canonicalize(x) if inplace and training else (x, None)
        if lay is not None and xc.data_ptr() == x.data_ptr() and xc.numel():
            # the canonical view is x's own storage: the backend writes the output into it
            ctx.backend = select(xc)
            rc = None if residual is None else lay.canonical(residual)
            mean, rstd, var = ctx.backend.forward_train_into(xc, w, bias, rc, eps, act, slope)
            y = x
        else:
            y, mean, rstd, var, ctx.backend = run_forward(
                x, w, bias, residual, running_mean, running_var, training, eps, act, slope,
                running)
            if inplace:
                y = x.copy_(y)  # the kernels' buffer goes as soon as this returns
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(y, w, bias, residual, rstd)
        ctx.training, ctx.act, ctx.slope = training, act, slope
        ctx.mark_non_differentiable(mean, rstd, var)
        ctx.set_materialize_grads(False)
        return y, mean, rstd, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, *_stats):  # type: ignore[override]
        if grad_y is None:
            return (None,) * 12
        y, w, bias, residual, rstd = ctx.saved_tensors
        need_dx, need_dw, need_db, need_dr = ctx.needs_input_grad[:4]
        yc, lay = canonicalize(y)
        rc = None if residual is None else lay.canonical(residual)
        dx, dw, db, dr = ctx.backend.backward_from_output(
            lay.canonical(grad_y), yc, w, bias, rc, rstd, ctx.training, ctx.act, ctx.slope,
            need_dx, need_dw and w is not None, need_db and bias is not None, need_dr)
        return (None if dx is None or not need_dx else lay.restore(dx),
                dw if need_dw else None, db if need_db else None,
                None if dr is None or not need_dr else lay.restore(dr),
                *(None,) * 8)


def forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None, training: bool, eps: float,
    act: str, slope: float, running: RunningUpdate | None = None, *, inplace: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`batchnorm.ops.forward` in the memory mode (arguments checked by the caller, the
    activation invertible: :func:`check_mode`)."""
    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, residual))
    special = torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() \
        or torch.autograd.forward_ad.__dict__.get("_current_level", -1) >= 0
    if differentiable and not special:
        return _SavedOutput.apply(x, weight, bias, residual, running_mean,  # type: ignore[no-any-return]
                                  running_var, training, eps, act, slope, running, inplace)
    w = effective_weight(weight)
    if w is not None and weight is not None and weight.requires_grad:
        w = weight + (w - weight).detach()  # γ' in value, the gradient straight through to γ
    y, mean, rstd, var = ops.forward(x, w, bias, residual, running_mean, running_var, training,
                                     eps, act, slope, running)
    if inplace:
        y = x.copy_(y)
    return y, mean, rstd, var
