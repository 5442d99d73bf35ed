"""The eager autograd Functions: the library ops' bodies and formula without the dispatcher.

Outside ``torch.compile``/``torch.export`` the custom-op machinery (schema checks, default
filling, redispatch) costs more than a small layer's kernels, so eager calls run the same
bodies (:func:`~batchnorm.ops.library.run_forward`, :func:`~batchnorm.ops.library.run_backward`)
and the same backward formula through an ``autograd.Function``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .library import backward_formula, forward_impl, run_backward, run_forward, setup_forward

__all__ = ["EagerForward", "EagerForwardCtx"]


class EagerForward(torch.autograd.Function):
    """The same forward and backward as the custom op, without the dispatcher.

    Outside ``torch.compile``/``torch.export`` the custom-op machinery (schema checks, default
    filling, redispatch) cost more than the whole kernel for small tensors (docs/decisions.md,
    "Eager calls skip the dispatcher"), so eager calls come here.
    """

    @staticmethod
    def forward(*inputs):  # type: ignore[override]
        return forward_impl(*inputs)

    setup_context = staticmethod(setup_forward)

    @staticmethod
    def backward(ctx, grad_y, gmean, grstd, gvar):  # type: ignore[override]
        return backward_formula(ctx, grad_y, gmean, grstd, gvar,
                                 single_pass=functools.partial(run_backward, None))

    @staticmethod
    def vmap(info, in_dims, *inputs):  # type: ignore[no-untyped-def]
        """``torch.func.vmap``: each of the ``B`` mapped calls normalizes its own channels, so
        the ``B`` calls are one call on ``B·C`` channels. ``x``/``residual`` ``(B, N, C, *S)``
        become ``(N, B·C, *S)``; per-channel tensors ``(B, C)`` (or an unmapped ``(C,)``,
        repeated) become ``(B·C,)``; the outputs are split back along a leading ``B``."""
        x, weight, bias, residual, rm, rv, training, eps, act, slope = inputs
        dx, dw, db, dr, dm, dv = in_dims[:6]
        b = info.batch_size

        def stacked(t: Tensor, d: int | None) -> Tensor:  # (B, N, C, *S) -> (N, B*C, *S)
            t = t.movedim(d, 0) if d is not None else t.expand(b, *t.shape)
            return t.movedim(0, 1).reshape(t.shape[1], b * t.shape[2], *t.shape[3:])

        def channels(t: Tensor | None, d: int | None) -> Tensor | None:  # -> (B*C,)
            if t is None:
                return None
            return t.movedim(d, 0).reshape(-1) if d is not None else t.repeat(b)

        y, mean, rstd, var = EagerForward.apply(
            stacked(x, dx), channels(weight, dw), channels(bias, db),
            None if residual is None else stacked(residual, dr), channels(rm, dm),
            channels(rv, dv), training, eps, act, slope)
        c = mean.shape[0] // b
        y = y.reshape(y.shape[0], b, c, *y.shape[2:]).movedim(1, 0)
        return (y, mean.view(b, c), rstd.view(b, c), var.view(b, c)), (0, 0, 0, 0)


class EagerForwardCtx(torch.autograd.Function):
    """:class:`EagerForward` in the ``forward(ctx, ...)`` style, used when no ``torch.func``
    transform is active: ``Function.apply`` binds a ``setup_context``-style forward's arguments
    through ``inspect.signature`` on every call, as costly as a small kernel (docs/decisions.md,
    "Eager per-call overhead: `autograd.Function` without `setup_context`"). Its inputs
    are the four differentiable ones and one tuple of the rest, ending with the
    :class:`RunningUpdate` to fold in (or ``None``): ``apply`` inspects every argument.

    The per-call work is kept to what the math needs (a small layer's kernels take less time
    than the autograd machinery around them): the backend chosen in the forward is kept for the
    backward, and the three statistics outputs, which never receive a gradient, get no zero
    tensors (``set_materialize_grads(False)``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, rest):  # type: ignore[override]
        inputs = (x, weight, bias, residual, *rest)
        y, mean, rstd, var, ctx.backend = run_forward(*inputs)
        out = (y, mean, rstd, var)
        setup_forward(ctx, inputs[:-1], out)
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, grad_y, *_stats):  # type: ignore[override]
        if grad_y is None:  # nothing reached y (the statistics outputs carry no gradient)
            return (None,) * 5
        grads = backward_formula(ctx, grad_y, None, None, None,
                                  single_pass=functools.partial(run_backward, ctx.backend))
        return (*grads[:4], None)


