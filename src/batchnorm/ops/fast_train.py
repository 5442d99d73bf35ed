"""The common eager CPU training call of a layer, by the shortest path.

Most calls of a batch-norm layer are the same one: a CPU float tensor, training with running
statistics, a fused activation (or none), under plain eager autograd. For a small layer the
Python between the module and the kernel costs more than the kernel, and in a model, where each
large operation between two layers evicts that code from the caches, it costs more again
(docs/decisions.md, "The layer's training call skips the general chain").
The layers' forward (a training call with running statistics) and
:func:`batchnorm.functional.batch_norm_impl` (the functional API's entry) try it first.
:func:`train` recognises that call with a few cheap reads and runs it in one frame: the
backend's fused forward with the running-statistics blend folded in, and an autograd Function
with one output (the statistics stay inside it), or no Function at all where there is nothing to
differentiate (``no_grad``, a recalibration pass). Anything else returns ``None`` and takes the
general path (:func:`batchnorm.functional.batch_norm_impl`), which also raises every error: this
path never raises for bad arguments, it declines them.

The kernels and their arguments are those of the general path
(:class:`~batchnorm.ops.eager.EagerForwardCtx`); the statistics stay in the backend's own form
between forward and backward (:meth:`~batchnorm.kernels.base.Backend.train_forward_user`), so
the numbers are the same bit for bit (a test compares the two). The backend reads and writes
the user's tensors in their own shape (``train_forward_user``/``train_backward_user``): the CPU
backend through NumPy views, with no tensor views made and undone per call.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..kernels import select
from ..kernels.base import RunningUpdate
from ..layout import canonicalize
from ..running import finish_folded, update_running_statistics, warn_skipped
from ..stats import unbiased_var
from . import forward_ad
from .library import differentiable_backward

__all__ = ["train"]

_INLINE_ACTS = ("none", "relu")  # fused by every backend
_FLOATS = (torch.float32, torch.float64)


class _Train(torch.autograd.Function):
    """:class:`~batchnorm.ops.eager.EagerForwardCtx` with the output alone: the statistics
    stay in the backend's own form (:meth:`~batchnorm.kernels.base.Backend.train_forward_user`)
    between the forward and the backward, and reach the caller through ``rest[-1]`` (they never
    receive a gradient, so they need not be outputs)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, rest):  # type: ignore[override]
        backend, xc, lay, eps, act, slope, running, out = rest
        y, saved = backend.train_forward_user(x, lay, xc, weight, bias, residual, eps, act,
                                              slope, running)
        ctx.save_for_backward(x, weight, bias, residual if act != "none" else None)
        ctx.saved, ctx.eps, ctx.act, ctx.slope, ctx.backend, ctx.lay = \
            saved, eps, act, slope, backend, lay
        ctx.set_materialize_grads(False)
        out.append(saved)
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        if grad_y is None:
            return (None,) * 5
        x, weight, bias, residual = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        backend, lay = ctx.backend, ctx.lay
        if torch.is_grad_enabled():  # create_graph=True: the general formula's recomputation
            mean, rstd, _var = backend.train_stats(ctx.saved)
            return (*differentiable_backward(grad_y, x, weight, bias, residual, mean, rstd, True,
                                             ctx.eps, ctx.act, ctx.slope, needs), None)
        need_dx, need_dw, need_db, need_dr = needs
        dx, dw, db, dr = backend.train_backward_user(
            ctx.saved, lay, grad_y, x, weight, bias, residual, ctx.act, ctx.slope, need_dx,
            need_dw and weight is not None, need_db and bias is not None, need_dr)
        return dx, dw, db, dr, None


# ``_Train.apply`` without ``Function.apply``'s Python wrapper, whose other branches do not
# apply here: ``_Train`` has no ``setup_context`` (no argument binding) and :func:`train` has
# ruled out functorch transforms; dead functorch wrappers are unwrapped as the wrapper does
# (docs/decisions.md, "The short path calls the Function's C entry")
_apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, _Train)
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def _channel_ok(t: Tensor | None, c: int, dtype: torch.dtype) -> bool:
    return t is None or (type(t) is torch.nn.Parameter or type(t) is Tensor) and t.is_cpu \
        and t.dtype is dtype and t.dim() == 1 and t.shape[0] == c


def train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    num_batches_skipped: Tensor | None, momentum: object, eps: object, act: str, slope: float,
    layer_name: Callable[[], str | None],
) -> Tensor | None:
    """A layer's training call with running statistics (``momentum`` a float), or ``None``
    where it is not the common case (then nothing has changed and the caller takes the general
    path). ``layer_name`` gives the name warnings use (called only to warn)."""
    if type(x) is not Tensor or not x.is_cpu or x.dim() < 2 or type(momentum) is not float \
            or type(eps) is not float or not eps > 0.0 or not math.isfinite(momentum):
        return None
    dtype = x.dtype
    if dtype not in _FLOATS or torch._C._are_functorch_transforms_active() \
            or torch.compiler.is_compiling() or forward_ad.active() \
            or torch._C._get_tracing_state() is not None:
        return None
    if running_mean is None or running_var is None:
        return None
    c = x.shape[1]
    count = x.numel() // c if c else 0
    if count <= 1 or not (_channel_ok(weight, c, dtype) and _channel_ok(bias, c, dtype)
                          and _channel_ok(running_mean, c, dtype)
                          and _channel_ok(running_var, c, dtype)) \
            or running_mean.is_inference() or running_var.is_inference():
        return None
    if residual is not None and (type(residual) is not Tensor or residual.dtype is not dtype
                                 or not residual.is_cpu or residual.shape != x.shape):
        return None
    graph = torch.is_grad_enabled() and (
        x.requires_grad or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
        or (residual is not None and residual.requires_grad))
    if not graph and torch.is_inference_mode_enabled():
        return None  # inference tensors: the general path's rules
    # the canonical view of the detached input: no autograd view nodes to make and drop
    xc, lay = canonicalize(x.detach() if x.requires_grad else x)
    backend = select(xc)
    if act not in _INLINE_ACTS and not backend.fuses_fast(act):
        return None
    tracked = num_batches_tracked
    running = RunningUpdate(
        (running_mean.detach() if running_mean.requires_grad else running_mean).numpy(),
        (running_var.detach() if running_var.requires_grad else running_var).numpy(),
        momentum, count)
    saved: list[object] = []
    if graph:
        y = _apply(_unwrap_if_dead(x), None if weight is None else _unwrap_if_dead(weight),
                   None if bias is None else _unwrap_if_dead(bias),
                   None if residual is None else _unwrap_if_dead(residual),
                   (backend, xc, lay, eps, act, slope, running, saved))
    else:  # nothing to differentiate (no_grad, statistics recalibration): no node at all
        y, stat = backend.train_forward_user(x, lay, xc, weight, bias, residual, eps, act,
                                             slope, running)
        saved.append(stat)
    ok = finish_folded(running, running_mean, running_var, tracked, num_batches_skipped)
    if ok is None:  # the backend did not fold the update: it runs on its own
        mean, _rstd, var = backend.train_stats(saved[0])
        update_running_statistics(running_mean, running_var, mean,
                                  unbiased_var(var, count), momentum, count=count,
                                  num_batches_tracked=tracked,
                                  num_batches_skipped=num_batches_skipped,
                                  layer_name=layer_name())
    elif not ok:
        warn_skipped(layer_name(), num_batches_skipped)
    return y  # type: ignore[no-any-return]
