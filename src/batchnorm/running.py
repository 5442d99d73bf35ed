"""The running statistics: where and how batch norm updates them, in one place.

The policy (every layer shares it: plain, distributed, the variants):

- blend: ``running = (1 - f)·running + f·batch`` with the *unbiased* batch variance (Bessel's
  factor :func:`batchnorm.stats.bessel`), ``f = momentum``, or ``1/num_batches_tracked`` when
  ``momentum`` is ``None`` (a cumulative average counting only the batches applied);
- a batch whose statistics are not finite changes nothing but ``num_batches_skipped`` (no
  poisoned running statistics), and is reported with a :class:`NonFiniteBatchWarning` on the
  CPU, where reading the flag costs no device synchronization;
- an empty batch carries no statistics: the running ones stay, and it counts as tracked, as
  PyTorch counts it.

Where it runs: eager CPU training folds the blend into the forward's backend call
(:func:`fold_request`, then :func:`finish_folded`: the backend blends NumPy views of the buffers
in the same call as its statistics); every other call runs :func:`update_running_statistics`,
whose update is the ``batchnorm::update_running_stats`` op under tracing and, on eager CPU
tensors, the backend's :meth:`~batchnorm.kernels.base.Backend.blend_running`. The arithmetic
itself is :func:`batchnorm.stats.blend` (and the kernels' copy of it, tested against it).
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from . import stats as S
from .kernels import running_backend
from .kernels.base import RunningUpdate

__all__ = ["NonFiniteBatchWarning", "update_running_statistics", "fold_request",
           "finish_folded", "update_op", "warn_skipped"]


class NonFiniteBatchWarning(RuntimeWarning):
    """A batch's statistics were NaN or Inf, so the running statistics were left unchanged."""


def update_running_statistics(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var_unbiased: Tensor,
    momentum: float | None,
    *,
    count: int | None = None,
    num_batches_tracked: Tensor | None = None,
    num_batches_skipped: Tensor | None = None,
    layer_name: str | None = None,
) -> None:
    """The running-statistics policy every layer shares (plain, distributed, variants).

    Blends a batch's ``mean`` and unbiased variance in with ``momentum`` (``None``: cumulative
    average over ``num_batches_tracked``); a batch whose statistics are not finite changes
    nothing but ``num_batches_skipped``, and is reported right away on the CPU (where reading
    the flag costs no device synchronization). An empty batch (``count == 0``) carries no
    statistics: the running ones stay, and it is counted as tracked, as PyTorch counts it.
    """
    if count == 0:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return
    ok = _update(
        running_mean, running_var, num_batches_tracked, num_batches_skipped, mean, var_unbiased,
        0.0 if momentum is None else float(momentum), momentum is None,
    )
    if running_mean.device.type == "cpu" and not torch.compiler.is_compiling() \
            and not torch._C._are_functorch_transforms_active() and not ok:
        warn_skipped(layer_name, num_batches_skipped)


def warn_skipped(layer_name: str | None, skipped: Tensor | None) -> None:
    so_far = "" if skipped is None else f" ({int(skipped)} skipped so far)"
    warnings.warn(
        f"{layer_name or 'batch_norm'}: batch statistics are not finite (NaN or Inf in the "
        f"input); running statistics and num_batches_tracked were left unchanged{so_far}",
        NonFiniteBatchWarning,
        stacklevel=_caller_level(),
    )


_INTERNAL = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
             os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def _caller_level() -> int:
    """The ``stacklevel`` that makes a warning raised by the caller of this function name the
    first frame outside this package and torch (the user's call of a layer or function, however
    deep the layers in between)."""
    frame = sys._getframe(1)  # the frame that calls warnings.warn: stacklevel 1
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


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


update_op = torch.library.custom_op(
    "batchnorm::update_running_stats",
    mutates_args=("running_mean", "running_var", "num_batches_tracked", "num_batches_skipped"),
)(_update_impl)


def _update(
    running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None,
    num_batches_skipped: Tensor | None, mean: Tensor, var_unbiased: Tensor, momentum: float,
    cumulative: bool,
) -> Tensor:
    """``batchnorm::update_running_stats``: the op when tracing, its body directly in eager;
    returns whether the batch was finite (and so applied)."""
    args = (running_mean, running_var, num_batches_tracked, num_batches_skipped, mean,
            var_unbiased, momentum, cumulative)
    if torch.compiler.is_compiling():
        return update_op(*args)  # type: ignore[no-any-return]
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
    dispatches cost more than the rest of a small layer; docs/decisions.md, "Host-side
    micro-costs"); on the CPU the
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


def fold_request(
    running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None,
    momentum: float, cumulative: bool, count: int,
) -> RunningUpdate | None:
    """The update of :func:`update_running_statistics` as a request for
    :func:`batchnorm.ops.forward` to fold into the backend's call (eager CPU; ``count`` elements
    per channel), or ``None`` where it must run on its own: under tracing, off the CPU, for an
    empty batch, for dtypes NumPy lacks (bfloat16) and for inference tensors (torch's error)."""
    if count <= 0 or not running_mean.is_cpu or torch.compiler.is_compiling() \
            or running_mean.dtype not in _NUMPY_FLOATS or running_var.dtype not in _NUMPY_FLOATS \
            or running_mean.is_inference() or running_var.is_inference() \
            or torch._C._are_functorch_transforms_active():
        return None
    return RunningUpdate(_numpy(running_mean), _numpy(running_var),
                         _factor(momentum, cumulative, num_batches_tracked), count)


def finish_folded(
    running: RunningUpdate | None, running_mean: Tensor, running_var: Tensor,
    num_batches_tracked: Tensor | None, num_batches_skipped: Tensor | None,
) -> bool | None:
    """After :func:`batchnorm.ops.forward`: the counters of a folded update, and whether the
    batch was finite; ``None`` when nothing was folded (then :func:`update_running_statistics`
    must run)."""
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


@update_op.register_fake
def _update_fake(running_mean, running_var, num_batches_tracked, num_batches_skipped, mean,
                 var_unbiased, momentum, cumulative):
    return torch.empty((), dtype=torch.bool, device=mean.device)
