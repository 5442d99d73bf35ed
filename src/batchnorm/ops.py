"""The op boundary: ``torch.library`` custom ops, their fake kernels and their autograd.

``torch.compile`` sees each op as one opaque node (no graph break); eager calls dispatch to the
backend chosen by :func:`batchnorm.kernels.select` for the (canonical) input.

- ``batchnorm::forward`` — functional: ``(y, mean, rstd, var)``; in eval the statistics are the
  running ones it was given. Differentiable in ``x``, ``weight``, ``bias``, ``residual``.
- ``batchnorm::backward`` — the single-pass backward of a backend. Under ``create_graph=True``
  (double backward) the registered formula instead recomputes the forward with plain
  differentiable PyTorch ops and differentiates that, so every higher derivative is exact.
- ``batchnorm::update_running_stats`` — mutates the running statistics in place, skipping (and
  counting) a batch whose statistics are not finite, with no host synchronization.
  Eager CPU training folds the same update into the forward's backend call instead
  (:func:`running_update`, :func:`finish_running_update`); every other path runs this op.

Custom ops may not return ``None``: gradients that were not asked for come back as empty
tensors and are turned into ``None`` here.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor
from torch.autograd.graph import increment_version

from . import stats as S
from .activations import act_forward
from .kernels import Backend, running_backend, select
from .kernels.base import RunningUpdate
from .layout import canonicalize, empty_output

__all__ = ["forward", "forward_op", "backward_op", "update_running_stats",
           "update_running_stats_op", "running_update", "finish_running_update"]

_NONE = torch.empty(0)


def _stat_dtype(x: Tensor) -> torch.dtype:
    return S.accumulation_dtype(x.dtype)


def _forward_impl(
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
    return _run_forward(x, weight, bias, residual, running_mean, running_var, training, eps,
                        act, slope)[:4]


def _run_forward(
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
    y, mean, rstd, var = run_forward(backend, xc, weight, bias, rc, running_mean, running_var,
                                     training, eps, act, slope, running)
    return lay.restore(y), mean, rstd, var, backend


def run_forward(
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


forward_op = torch.library.custom_op("batchnorm::forward", mutates_args=())(_forward_impl)


@forward_op.register_fake
def _forward_fake(x, weight, bias, residual, running_mean, running_var, training, eps, act, slope):
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
def _backward_fake(grad_y, x, weight, bias, residual, mean, rstd, training, act, slope,
                   need_dx, need_dweight, need_dbias, need_dres):
    def like(t: Tensor | None, need: bool) -> Tensor:
        if need and t is not None:
            return empty_output(x) if t is x else torch.empty_like(t)
        return x.new_empty((0,))

    return (like(x, need_dx), like(weight, need_dweight), like(bias, need_dbias),
            like(x, need_dres))


def _setup_forward(ctx, inputs, output):
    x, weight, bias, residual, _rm, _rv, training, eps, act, slope = inputs
    _y, mean, rstd, var = output
    # The residual is needed again only to recompute a non-linear activation's argument.
    keep_residual = residual if act != "none" else None
    ctx.save_for_backward(x, weight, bias, keep_residual, mean, rstd)
    ctx.training, ctx.eps, ctx.act, ctx.slope = training, eps, act, slope
    ctx.mark_non_differentiable(mean, rstd, var)


def _composite_forward(x, weight, bias, residual, mean, rstd, training, eps, act, slope):
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


def _backward_formula(ctx, grad_y, _gmean, _grstd, _gvar, single_pass=None):
    x, weight, bias, residual, mean, rstd = ctx.saved_tensors
    need_dx, need_dw, need_db, need_dr = ctx.needs_input_grad[:4]
    rest = (None,) * 6
    if torch.is_grad_enabled():
        # create_graph=True: differentiate a differentiable recomputation.
        wanted = [(i, t) for i, t in enumerate((x, weight, bias)) if t is not None
                  and ctx.needs_input_grad[i]]
        y = _composite_forward(x, weight, bias, residual, mean, rstd, ctx.training, ctx.eps,
                               ctx.act, ctx.slope)
        out: list[Tensor | None] = [None, None, None, None]
        targets = [t for _, t in wanted]
        if need_dr:
            if residual is None:  # linear in the residual: dres = dy
                out[3] = grad_y
            else:
                residual_leaf = residual
                targets.append(residual_leaf)
        if targets:
            grads = torch.autograd.grad(y, targets, grad_y, create_graph=True, allow_unused=True)
            for (i, _), g in zip(wanted, grads[: len(wanted)], strict=True):
                out[i] = g
            if need_dr and residual is not None:
                out[3] = grads[-1]
        return (*out, *rest)
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


torch.library.register_autograd(
    "batchnorm::forward", _backward_formula, setup_context=_setup_forward
)


def _backends_loaded(device_type: str) -> bool:
    """Load the backends ``select`` may pick on ``device_type``; Dynamo runs this at trace time
    instead of tracing it: a backend's first load imports its module through ``importlib``,
    which Dynamo cannot trace (a graph break; an error under ``fullgraph=True``)."""
    from . import kernels

    for name in ("reference", kernels.forced(), *kernels.PREFERENCE.get(device_type, ())):
        if name is not None:
            kernels.get_backend(name)
    return True


# The mark ``torch.compiler.assume_constant_result`` sets (torch/_dynamo/decorators.py), set
# here without calling it: the decorator imports Dynamo, and Dynamo imports Triton, which took
# ``import batchnorm`` from 0.9 to 1.9 s (a test checks that the mark is still torch's).
_backends_loaded._dynamo_marked_constant = True  # type: ignore[attr-defined]


class _EagerForward(torch.autograd.Function):
    """The same forward and backward as the custom op, without the dispatcher.

    Outside ``torch.compile``/``torch.export`` the custom-op machinery (schema checks, default
    filling, redispatch) cost more than the whole kernel for small tensors (measured: ~170 µs
    per layer call against PyTorch's ~10 µs on a (4, 8) batch), so eager calls come here.
    """

    @staticmethod
    def forward(*inputs):  # type: ignore[override]
        return _forward_impl(*inputs)

    setup_context = staticmethod(_setup_forward)

    @staticmethod
    def backward(ctx, grad_y, gmean, grstd, gvar):  # type: ignore[override]
        return _backward_formula(ctx, grad_y, gmean, grstd, gvar,
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

        y, mean, rstd, var = _EagerForward.apply(
            stacked(x, dx), channels(weight, dw), channels(bias, db),
            None if residual is None else stacked(residual, dr), channels(rm, dm),
            channels(rv, dv), training, eps, act, slope)
        c = mean.shape[0] // b
        y = y.reshape(y.shape[0], b, c, *y.shape[2:]).movedim(1, 0)
        return (y, mean.view(b, c), rstd.view(b, c), var.view(b, c)), (0, 0, 0, 0)


class _EagerForwardCtx(torch.autograd.Function):
    """:class:`_EagerForward` in the ``forward(ctx, ...)`` style, used when no ``torch.func``
    transform is active: ``Function.apply`` binds a ``setup_context``-style forward's arguments
    through ``inspect.signature`` on every call (~12 µs, as much as a small kernel). Its inputs
    are the four differentiable ones and one tuple of the rest, ending with the
    :class:`RunningUpdate` to fold in (or ``None``): ``apply`` inspects every argument.

    The per-call work is kept to what the math needs (a small layer's kernels take less time
    than the autograd machinery around them): the backend chosen in the forward is kept for the
    backward, and the three statistics outputs, which never receive a gradient, get no zero
    tensors (``set_materialize_grads(False)``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, rest):  # type: ignore[override]
        inputs = (x, weight, bias, residual, *rest)
        y, mean, rstd, var, ctx.backend = _run_forward(*inputs)
        out = (y, mean, rstd, var)
        _setup_forward(ctx, inputs[:-1], out)
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, grad_y, *_stats):  # type: ignore[override]
        if grad_y is None:  # nothing reached y (the statistics outputs carry no gradient)
            return (None,) * 5
        grads = _backward_formula(ctx, grad_y, None, None, None,
                                  single_pass=functools.partial(run_backward, ctx.backend))
        return (*grads[:4], None)


def forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None, training: bool, eps: float,
    act: str, slope: float, running: RunningUpdate | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``batchnorm::forward``: the custom op when tracing, the same code directly in eager.

    ``running`` (eager CPU, from :func:`running_update`): a running-statistics update that the
    backend may fold into its call; see :func:`finish_running_update` for what follows."""
    args = (x, weight, bias, residual, running_mean, running_var, training, eps, act, slope)
    if torch.compiler.is_compiling():
        xc, lay = canonicalize(x)
        if x.device.type == "cuda" and _backends_loaded("cuda") and select(xc).name == "triton":
            # Inductor sees the Triton kernels themselves, not an opaque op (and Triton is
            # imported only here). On CPU tensors they run in Triton's interpreter, which
            # Inductor cannot compile: those keep batchnorm::forward. The Triton ops take
            # canonical tensors; under tracing a view back is functionalized like any other.
            from .kernels.triton_ops import triton_forward_op
            rc = None if residual is None else lay.canonical(residual)
            y, *stats = triton_forward_op(xc, weight, bias, rc, *args[4:])
            return (lay.restore_view(y), *stats)  # type: ignore[return-value]
        return forward_op(*args)  # type: ignore[no-any-return]
    if _forward_ad.__dict__.get("_current_level", -1) >= 0:
        # Forward-mode AD (dual tensors): plain differentiable ops carry the tangents; the
        # statistics for the running update still come from the backend. Running statistics
        # are not differentiable, as in PyTorch: their tangents are an error next to a tangent
        # of a differentiable input, and are dropped otherwise.
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
            args = (x, weight, bias, residual, running_mean, running_var, training, eps, act,
                    slope)
        with torch.no_grad():
            _y, mean, rstd, var = _forward_impl(*args)
        y = _composite_forward(x, weight, bias, residual, mean, rstd, training, eps, act, slope)
        return y, mean, rstd, var
    if torch._C._are_functorch_transforms_active():  # torch.func: vmap, grad, jvp...
        return _EagerForward.apply(*args)  # type: ignore[no-any-return]
    if not torch.is_grad_enabled() or not any(
            t is not None and t.requires_grad for t in (x, weight, bias, residual)):
        return _run_forward(*args, running)[:4]  # nothing to differentiate: no node
    return _EagerForwardCtx.apply(  # type: ignore[no-any-return]
        x, weight, bias, residual, (*args[4:], running))


def _update_impl(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    num_batches_skipped: Tensor | None,
    mean: Tensor,
    var_unbiased: Tensor,
    momentum: float,
    cumulative: bool,
) -> Tensor:
    """Blend batch statistics into the running ones; returns whether the batch was finite.

    ``cumulative`` (``momentum=None`` in the modules) uses ``1 / num_batches_tracked`` as the
    factor, counting only the batches that were applied.
    """
    work = torch.float64 if running_mean.device.type != "mps" else torch.float32
    batch = torch.stack((mean, var_unbiased)).to(work)  # (2, C): one pass for both statistics
    ok = torch.isfinite(batch).all()
    factor: Tensor | float = momentum
    if num_batches_tracked is not None:
        tracked = num_batches_tracked + ok
        if cumulative:
            factor = 1.0 / tracked.clamp(min=1).to(work)
        num_batches_tracked.copy_(tracked)
    if num_batches_skipped is not None:
        num_batches_skipped.add_(~ok)
    running = torch.stack((running_mean, running_var))
    new = S.update_running(running, batch, factor, ok)
    running_mean.copy_(new[0])
    running_var.copy_(new[1])
    return ok


update_running_stats_op = torch.library.custom_op(
    "batchnorm::update_running_stats",
    mutates_args=("running_mean", "running_var", "num_batches_tracked", "num_batches_skipped"),
)(_update_impl)


def update_running_stats(
    running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None,
    num_batches_skipped: Tensor | None, mean: Tensor, var_unbiased: Tensor, momentum: float,
    cumulative: bool,
) -> Tensor:
    """``batchnorm::update_running_stats``: the op when tracing, its body directly in eager."""
    args = (running_mean, running_var, num_batches_tracked, num_batches_skipped, mean,
            var_unbiased, momentum, cumulative)
    if torch.compiler.is_compiling():
        return update_running_stats_op(*args)  # type: ignore[no-any-return]
    if running_mean.device.type == "cpu" and running_mean.dtype in _NUMPY_FLOATS \
            and running_var.dtype in _NUMPY_FLOATS and mean.dtype in _NUMPY_FLOATS \
            and not torch._C._are_functorch_transforms_active():
        return _update_cpu(*args)  # NumPy views: no autograd involved
    with torch.no_grad():
        return _update_impl(*args)


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def _update_cpu(
    running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None,
    num_batches_skipped: Tensor | None, mean: Tensor, var_unbiased: Tensor, momentum: float,
    cumulative: bool,
) -> Tensor:
    """:func:`_update_impl` for eager CPU tensors: the same float64 blend, done by the backend's
    :meth:`~batchnorm.kernels.base.Backend.blend_running` on NumPy views (a dozen torch
    dispatches cost ~45 µs per call, more than the rest of a small layer); on the CPU the
    finiteness flag can be read for free, so the skip is a plain branch."""
    if running_mean.is_inference() or running_var.is_inference():
        with torch.no_grad():  # torch's own in-place rules and errors for inference tensors
            return _update_impl(running_mean, running_var, num_batches_tracked,
                                num_batches_skipped, mean, var_unbiased, momentum, cumulative)
    ok = running_backend().blend_running(
        _numpy(running_mean), _numpy(running_var), _numpy(mean), _numpy(var_unbiased),
        _factor(momentum, cumulative, num_batches_tracked))
    return _TRUE if _count(ok, running_mean, running_var, num_batches_tracked,
                           num_batches_skipped) else _FALSE


def _factor(momentum: float, cumulative: bool, num_batches_tracked: Tensor | None) -> float:
    """The blend factor of :func:`_update_impl`, read on the host (CPU tensors)."""
    if cumulative and num_batches_tracked is not None:
        return 1.0 / max(int(num_batches_tracked) + 1, 1)  # the count once this batch is in
    return momentum


def _count(ok: bool, running_mean: Tensor, running_var: Tensor,
           num_batches_tracked: Tensor | None, num_batches_skipped: Tensor | None) -> bool:
    """The counters after a blend done through NumPy views (``ok``: whether it was done)."""
    if not ok:
        if num_batches_skipped is not None:
            num_batches_skipped.add_(1)
        return False
    # written through NumPy views: move the version counters as torch's in-place ops would, so
    # that a tensor saved for backward before the update is refused, not silently read anew
    # (PyTorch 2.13's own CPU update leaves the counters alone)
    increment_version((running_mean, running_var))
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return True


def running_update(
    running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None,
    momentum: float, cumulative: bool, count: int,
) -> RunningUpdate | None:
    """The update of :func:`update_running_stats` as a request for :func:`forward` to fold into
    the backend's call (eager CPU; ``count`` elements per channel), or ``None`` where it must run
    on its own: under tracing, off the CPU, for an empty batch, for dtypes NumPy lacks
    (bfloat16) and for inference tensors (torch's error)."""
    if count <= 0 or not running_mean.is_cpu or torch.compiler.is_compiling() \
            or running_mean.dtype not in _NUMPY_FLOATS or running_var.dtype not in _NUMPY_FLOATS \
            or running_mean.is_inference() or running_var.is_inference() \
            or torch._C._are_functorch_transforms_active():
        return None
    return RunningUpdate(_numpy(running_mean), _numpy(running_var),
                         _factor(momentum, cumulative, num_batches_tracked), count)


def finish_running_update(
    running: RunningUpdate | None, running_mean: Tensor, running_var: Tensor,
    num_batches_tracked: Tensor | None, num_batches_skipped: Tensor | None,
) -> bool | None:
    """After :func:`forward`: the counters of a folded update, and whether the batch was finite;
    ``None`` when nothing was folded (then :func:`update_running_stats` must run)."""
    if running is None or running.ok is None:
        return None
    return _count(running.ok, running_mean, running_var, num_batches_tracked,
                  num_batches_skipped)


def _plain(t: Tensor) -> Tensor:
    """``t``, or a detached alias (same storage and version counter) if it requires grad."""
    return t.detach() if t.requires_grad else t


def _numpy(t: Tensor) -> np.ndarray:
    """A NumPy view sharing ``t``'s memory (``detach`` only where autograd would refuse)."""
    return _plain(t).numpy()


# The eager CPU update's result; callers read it, never write it.
_TRUE, _FALSE = torch.tensor(True), torch.tensor(False)


@update_running_stats_op.register_fake
def _update_fake(running_mean, running_var, num_batches_tracked, num_batches_skipped, mean,
                 var_unbiased, momentum, cumulative):
    return torch.empty((), dtype=torch.bool, device=mean.device)
