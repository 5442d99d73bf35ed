"""The library ops: ``batchnorm::forward`` and ``batchnorm::backward``, their fake kernels, and the
one backward formula every path differentiates with.

``torch.compile`` sees each op as one opaque node (no graph break). Their bodies are also what
eager calls run (:mod:`batchnorm.ops.eager`), on tensors of the user's shape:

- ``batchnorm::forward`` — ``(y, mean, rstd, var)``; in eval the statistics are the running
  ones it was given. Differentiable in ``x``, ``weight``, ``bias``, ``residual``.
- ``batchnorm::backward`` — the single-pass backward of a backend. Under ``create_graph=True``
  (double backward) the registered formula instead recomputes the forward with plain
  differentiable PyTorch ops and differentiates that, so every higher derivative is exact.

The bodies view their inputs in a canonical layout (:mod:`batchnorm.layout`), run the backend
:func:`batchnorm.kernels.select` picks, and return results in the user's shape and memory
format. Custom ops may not return ``None``: gradients that were not asked for come back as
empty tensors and are turned into ``None`` by the formula.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import stats as S
from ..activations import act_forward
from ..kernels import Backend, select
from ..kernels.base import RunningUpdate
from ..layout import canonicalize, empty_output

__all__ = ["forward_impl", "forward_op", "backward_op", "run_forward", "run_backward",
           "forward_canonical", "composite_forward", "backward_formula", "setup_forward",
           "backends_loaded"]


def _stat_dtype(x: Tensor) -> torch.dtype:
    return S.accumulation_dtype(x.dtype)


def forward_impl(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    eps: float,
    act: str,
    slope: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return run_forward(x, weight, bias, residual, running_mean, running_var, training, eps,
                        act, slope)[:4]


def run_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None, training: bool, eps: float,
    act: str, slope: float, running: RunningUpdate | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Backend]:
    """The forward on tensors of the user's shape: canonical views in, the backend chosen for
    them, the output back in the user's shape and memory format (not an autograd view: see
    :mod:`batchnorm.layout`); also returns the backend, which the eager backward reuses."""
    xc, lay = canonicalize(x)
    backend = select(xc)
    rc = None if residual is None else lay.canonical(residual)
    y, mean, rstd, var = forward_canonical(backend, xc, weight, bias, rc, running_mean, running_var,
                                     training, eps, act, slope, running)
    return lay.restore(y), mean, rstd, var, backend


def forward_canonical(
    backend: Backend,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    eps: float,
    act: str,
    slope: float,
    running: RunningUpdate | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward on canonical tensors and a given backend: batch statistics in training,
    copies of the running ones otherwise (shared by ``batchnorm::forward`` and the Triton ops).
    ``running``: an eager CPU running-statistics update the backend may fold in (training
    only)."""
    if training:
        y, mean, rstd, var = backend.forward_train(x, weight, bias, residual, eps, act, slope,
                                                   running)
        return y, mean, rstd, var
    assert running_mean is not None and running_var is not None
    acc = _stat_dtype(x)
    mean = running_mean.to(acc, copy=True)
    var = running_var.to(acc, copy=True)
    rstd = S.rstd_from_var(var, eps)
    y = backend.forward_eval(x, weight, bias, residual, mean, rstd, act, slope)
    return y, mean, rstd, var


forward_op = torch.library.custom_op("batchnorm::forward", mutates_args=())(forward_impl)


@forward_op.register_fake
def forward_fake(x, weight, bias, residual, running_mean, running_var, training, eps, act, slope):
    c = x.shape[1]
    acc = _stat_dtype(x)
    stat = lambda: x.new_empty((c,), dtype=acc)  # noqa: E731
    return empty_output(x), stat(), stat(), stat()


def run_backward(
    backend: Backend | None, grad_y: Tensor, x: Tensor, weight: Tensor | None,
    bias: Tensor | None, residual: Tensor | None, mean: Tensor, rstd: Tensor, training: bool,
    act: str, slope: float, need_dx: bool, need_dweight: bool, need_dbias: bool,
    need_dres: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """The single-pass backward on tensors of the user's shape: ``grad_y`` (any memory format)
    brought into ``x``'s canonical layout, the backend's backward (``None``: the one
    :func:`select` picks), the input gradients back in ``x``'s shape and format; ``None`` where
    a gradient is not needed."""
    xc, lay = canonicalize(x)
    be = backend if backend is not None else select(xc)
    rc = None if residual is None else lay.canonical(residual)
    dx, dw, db, dr = be.backward(
        lay.canonical(grad_y), xc, weight, bias, rc, mean, rstd, training, act, slope,
        need_dx, need_dweight and weight is not None, need_dbias and bias is not None, need_dres,
    )
    return (None if dx is None else lay.restore(dx), dw, db,
            None if dr is None else lay.restore(dr))


@torch.library.custom_op("batchnorm::backward", mutates_args=())
def backward_op(
    grad_y: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
    residual: Tensor | None, mean: Tensor, rstd: Tensor, training: bool, act: str, slope: float,
    need_dx: bool, need_dweight: bool, need_dbias: bool, need_dres: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = run_backward(None, grad_y, x, weight, bias, residual, mean, rstd, training, act,
                         slope, need_dx, need_dweight, need_dbias, need_dres)
    inputs = [t for t in (grad_y, x, weight, bias, residual, mean, rstd) if t is not None]
    # one fresh empty tensor per missing gradient: op outputs may not alias each other
    return tuple(x.new_empty((0,)) if t is None else _fresh(t, inputs)  # type: ignore[return-value]
                 for t in grads)


def _fresh(t: Tensor, inputs: list[Tensor]) -> Tensor:
    """An op output that aliases no input (a backend may return ``dy`` itself as ``dres``);
    custom ops forbid aliasing, the eager autograd.Function does not need the check."""
    ptr = t.untyped_storage().data_ptr()
    if t.numel() and any(i.numel() and i.untyped_storage().data_ptr() == ptr for i in inputs):
        return t.clone()
    return t


@backward_op.register_fake
def backward_fake(grad_y, x, weight, bias, residual, mean, rstd, training, act, slope,
                   need_dx, need_dweight, need_dbias, need_dres):
    def like(t: Tensor | None, need: bool) -> Tensor:
        if need and t is not None:
            return empty_output(x) if t is x else torch.empty_like(t)
        return x.new_empty((0,))

    return (like(x, need_dx), like(weight, need_dweight), like(bias, need_dbias),
            like(x, need_dres))


def setup_forward(ctx, inputs, output):
    x, weight, bias, residual, _rm, _rv, training, eps, act, slope = inputs
    _y, mean, rstd, var = output
    # The residual is needed again only to recompute a non-linear activation's argument.
    keep_residual = residual if act != "none" else None
    ctx.save_for_backward(x, weight, bias, keep_residual, mean, rstd)
    ctx.training, ctx.eps, ctx.act, ctx.slope = training, eps, act, slope
    ctx.mark_non_differentiable(mean, rstd, var)


def composite_forward(x, weight, bias, residual, mean, rstd, training, eps, act, slope):
    """The forward in plain differentiable ops (batch statistics recomputed from ``x``)."""
    acc = mean.dtype
    xf = x.to(acc)
    shape = (1, -1) + (1,) * (x.dim() - 2)  # a (C,) vector against x
    if training:
        m, var = S.differentiable_moments(xf)
        r = S.rstd_from_var(var, eps)
    else:
        m, r = mean.view(shape), rstd.view(shape)
    pre = (xf - m) * r
    if weight is not None:
        pre = pre * weight.to(acc).view(shape)
    if bias is not None:
        pre = pre + bias.to(acc).view(shape)
    if residual is not None:
        pre = pre + residual.to(acc)
    return act_forward(pre, act, slope).to(x.dtype)


def backward_formula(ctx, grad_y, _gmean, _grstd, _gvar, single_pass=None):
    x, weight, bias, residual, mean, rstd = ctx.saved_tensors
    need_dx, need_dw, need_db, need_dr = ctx.needs_input_grad[:4]
    rest = (None,) * 6
    if torch.is_grad_enabled():
        return (*differentiable_backward(grad_y, x, weight, bias, residual, mean, rstd,
                                         ctx.training, ctx.eps, ctx.act, ctx.slope,
                                         ctx.needs_input_grad[:4]), *rest)
    dx, dw, db, dr = (single_pass or backward_op)(
        grad_y, x, weight, bias, residual, mean, rstd, ctx.training, ctx.act,
        ctx.slope, need_dx, need_dw, need_db, need_dr,
    )
    return (
        dx if need_dx else None,
        dw if need_dw and weight is not None else None,
        db if need_db and bias is not None else None,
        dr if need_dr else None,
        *rest,
    )


def differentiable_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
    residual: Tensor | None, mean: Tensor, rstd: Tensor, training: bool, eps: float, act: str,
    slope: float, needs: tuple[bool, ...],
) -> list[Tensor | None]:
    """The backward under ``create_graph=True``: the gradients of a differentiable
    recomputation (:func:`composite_forward`), so that they can be differentiated again;
    ``needs``: whether ``(x, weight, bias, residual)`` want a gradient."""
    wanted = [(i, t) for i, t in enumerate((x, weight, bias)) if t is not None and needs[i]]
    y = composite_forward(x, weight, bias, residual, mean, rstd, training, eps, act, slope)
    out: list[Tensor | None] = [None, None, None, None]
    targets = [t for _, t in wanted]
    if needs[3]:
        if residual is None:  # linear in the residual: dres = dy
            out[3] = grad_y
        else:
            targets.append(residual)
    if targets:
        grads = torch.autograd.grad(y, targets, grad_y, create_graph=True, allow_unused=True)
        for (i, _), g in zip(wanted, grads[: len(wanted)], strict=True):
            out[i] = g
        if needs[3] and residual is not None:
            out[3] = grads[-1]
    return out


torch.library.register_autograd(
    "batchnorm::forward", backward_formula, setup_context=setup_forward
)


def backends_loaded(device_type: str) -> bool:
    """Load the backends ``select`` may pick on ``device_type``; Dynamo runs this at trace time
    instead of tracing it: a backend's first load imports its module through ``importlib``,
    which Dynamo cannot trace (a graph break; an error under ``fullgraph=True``)."""
    from .. import kernels

    for name in ("reference", kernels.forced(), *kernels.PREFERENCE.get(device_type, ())):
        if name is not None:
            kernels.get_backend(name)
    return True


# The mark ``torch.compiler.assume_constant_result`` sets (torch/_dynamo/decorators.py), set
# here without calling it: the decorator imports Dynamo, and Dynamo imports Triton, which would
# double the time of ``import batchnorm`` (docs/decisions.md, "`torch.compile` traces into the
# kernels: `torch.library.triton_op`"; a test checks that the mark is still torch's).
backends_loaded._dynamo_marked_constant = True  # type: ignore[attr-defined]


