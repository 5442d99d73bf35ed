"""The backend contract: what every kernel backend implements.

Kernels see two canonical shapes only (see :mod:`batchnorm.layout`):

- channels-first ``x: (N, C, S)``, contiguous;
- channels-last ``x: (M, C)``, contiguous (``M = N·prod(spatial)``; a 2-D ``(N, C)`` input is this).

Per-channel vectors (``mean``, ``rstd``, ``scale``, ``shift``, sums) are ``(C,)`` in the
accumulation dtype (:func:`batchnorm.stats.accumulation_dtype`). ``residual`` has the canonical
shape of ``x``. ``act`` is a name from :data:`batchnorm.activations.ACTIVATIONS` and ``slope``
the activation's parameter (leaky-ReLU slope, ELU alpha; 0 for the others): the one activation
table, :mod:`batchnorm.activations`, gives each backend its codes and formulas.
Arguments are valid: the functional layer checked them.

The math (see :mod:`batchnorm.stats`)::

    pre = (x - mean)·scale + shift [+ residual];  y = act(pre)
    g = dy·act'(pre);  x̂ = (x - mean)·rstd
    sum_g = Σ g;  sum_gx = Σ g·x̂           (per channel)
    dx = scale·(g - a - x̂·b)                with a = sum_g/n, b = sum_gx/n in training, 0 in eval
    dresidual = g;  dγ = sum_gx;  dβ = sum_g

A backend implements the four primitives; the two fused entry points below compose them and a
fast backend overrides them with single-pass kernels. The distributed path calls the primitives
with an all-gather between ``stats`` and ``apply`` and an all-reduce between ``backward_reduce``
and ``backward_apply``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from .. import stats as S
from . import saved_output_reference

if TYPE_CHECKING:
    from ..layout import Layout


class RunningUpdate:
    """A running-statistics update that a backend may fold into an eager CPU training forward
    (the ``running`` argument of :meth:`Backend.forward_train`), where a separate update cost
    more torch dispatches than a small layer's kernel.

    ``mean``/``var`` are NumPy views of the running buffers, ``factor`` the blend factor and
    ``bessel`` the factor that turns the batch's biased variance into the unbiased one
    (:func:`batchnorm.stats.bessel`). A backend that folds the update blends by the rule
    of :meth:`Backend.blend_running` and sets ``ok``: whether the batch was finite (and so
    written). ``ok`` stays ``None`` where nothing was folded; the caller then runs the update on
    its own.
    """

    __slots__ = ("mean", "var", "factor", "bessel", "ok")

    def __init__(self, mean: np.ndarray, var: np.ndarray, factor: float, count: int) -> None:
        self.mean, self.var, self.factor = mean, var, factor
        self.bessel = S.bessel(count)
        self.ok: bool | None = None


#: ``(Σg, Σg·x̂) -> (their sums over every process, the global count)`` (SyncBatchNorm)
AllReduce = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, float]]


class Backend(ABC):
    """Base class; subclasses override the primitives and, for speed, the fused paths."""

    name = "base"

    # -- capability -------------------------------------------------------------------------
    def available(self) -> bool:
        """Whether the backend's dependencies import on this machine."""
        return True

    def supports(self, x: Tensor) -> bool:
        """Whether this backend handles a canonical tensor ``x`` (device, dtype, layout)."""
        return True

    def fuses_fast(self, act: str) -> bool:
        """Whether this backend's fused ``act`` is measured faster than our layer followed by
        PyTorch's own activation (what :func:`batchnorm.fuse` fuses)."""
        return True

    def prefers(self, x: Tensor) -> bool:
        """Whether default selection should pick this backend for ``x`` (it is measured to be
        faster than the reference there). Forcing a backend ignores this."""
        return True

    # -- primitives ----------------------------------------------------------------------------
    @abstractmethod
    def stats(self, x: Tensor) -> S.Partials:
        """Per-channel partials ``(count, mean, m2)`` of ``x``."""

    @abstractmethod
    def apply(
        self, x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor | None,
        residual: Tensor | None, act: str, slope: float, out: Tensor | None = None,
    ) -> Tensor:
        """``act((x - mean)·scale + shift + residual)`` in the dtype and canonical shape of x,
        written into ``out`` when given (which may be ``x`` itself) and returned."""

    @abstractmethod
    def backward_reduce(
        self, grad_y: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor,
        shift: Tensor | None, residual: Tensor | None, act: str, slope: float,
    ) -> tuple[Tensor, Tensor]:
        """``(Σ g, Σ g·x̂)`` per channel, with ``g = dy·act'(pre)``."""

    @abstractmethod
    def backward_apply(
        self, grad_y: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor,
        shift: Tensor | None, residual: Tensor | None, act: str, slope: float,
        a: Tensor | None, b: Tensor | None, need_dx: bool, need_dres: bool,
    ) -> tuple[Tensor | None, Tensor | None]:
        """``(dx, dresidual)``; ``a``/``b`` are ``None`` with running statistics (eval)."""

    # -- running statistics (eager CPU) -------------------------------------------------------
    def blend_running(
        self, running_mean: np.ndarray, running_var: np.ndarray, mean: np.ndarray,
        var_unbiased: np.ndarray, factor: float,
    ) -> bool:
        """The eager CPU running-statistics update, on NumPy views of ``(C,)`` tensors: when
        every value of ``mean`` and ``var_unbiased`` is finite, ``running = factor·batch +
        (1 - factor)·running`` (:func:`batchnorm.stats.blend`, in float64, rounded once to the
        running dtype) is written in place and the result is True; otherwise nothing is
        written and the result is False."""
        if not (np.isfinite(mean).all() and np.isfinite(var_unbiased).all()):
            return False
        for running, batch in ((running_mean, mean), (running_var, var_unbiased)):
            running[...] = S.blend(running.astype(np.float64), batch.astype(np.float64), factor)
        return True

    # -- fused entry points (override for speed) ----------------------------------------------
    def forward_train(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
        eps: float, act: str, slope: float, running: RunningUpdate | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Batch statistics and output: ``(y, mean, rstd, biased var)``. A backend may also
        apply the ``running`` update (see :class:`RunningUpdate`); this one leaves it."""
        mean, var, rstd = S.finalize(self.stats(x), eps)
        scale = S.scale_of(rstd, weight)
        shift = None if bias is None else bias.to(mean.dtype)
        return self.apply(x, mean, scale, shift, residual, act, slope), mean, rstd, var

    # -- the short path's training call (batchnorm.ops.fast_train) -----------------------------
    def train_forward(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
        eps: float, act: str, slope: float, running: RunningUpdate | None = None,
    ) -> tuple[Tensor, Any]:
        """:meth:`forward_train` as ``(y, saved)``: ``saved`` holds the batch statistics in the
        backend's own form until :meth:`train_backward` (and :meth:`train_stats`) read them, so
        a call whose statistics are never outputs makes no tensors of them. This default keeps
        the tensors ``(mean, rstd, biased var)``."""
        y, mean, rstd, var = self.forward_train(x, weight, bias, residual, eps, act, slope,
                                                running)
        return y, (mean, rstd, var)

    def train_stats(self, saved: Any) -> tuple[Tensor, Tensor, Tensor]:
        """``(mean, rstd, biased var)`` of a :meth:`train_forward`, as separate tensors in the
        accumulation dtype."""
        return saved  # type: ignore[no-any-return]

    def train_backward(
        self, saved: Any, grad_y: Tensor, x: Tensor, weight: Tensor | None,
        bias: Tensor | None, residual: Tensor | None, act: str, slope: float, need_dx: bool,
        need_dweight: bool, need_dbias: bool, need_dres: bool,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """:meth:`backward` (training) of a :meth:`train_forward` on the same canonical
        tensors, from its ``saved`` statistics."""
        mean, rstd, _var = self.train_stats(saved)
        return self.backward(grad_y, x, weight, bias, residual, mean, rstd, True, act, slope,
                             need_dx, need_dweight, need_dbias, need_dres)

    def train_forward_user(
        self, x: Tensor, lay: Layout, xc: Tensor, weight: Tensor | None, bias: Tensor | None,
        residual: Tensor | None, eps: float, act: str, slope: float,
        running: RunningUpdate | None = None,
    ) -> tuple[Tensor, Any]:
        """:meth:`train_forward` on the user's tensors: ``x`` and ``residual`` in the user's
        shape, ``lay`` their :class:`~batchnorm.layout.Layout` and ``xc`` the canonical view
        of ``x``; ``y`` in the user's shape and in :meth:`Layout.restore`'s memory format. A
        backend may read the user's tensors directly instead of through canonical views."""
        rc = None if residual is None else lay.canonical(residual)
        y, saved = self.train_forward(xc, weight, bias, rc, eps, act, slope, running)
        return lay.restore(y), saved

    def train_backward_user(
        self, saved: Any, lay: Layout, grad_y: Tensor, x: Tensor, weight: Tensor | None,
        bias: Tensor | None, residual: Tensor | None, act: str, slope: float, need_dx: bool,
        need_dweight: bool, need_dbias: bool, need_dres: bool,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """:meth:`train_backward` on the user's tensors (as :meth:`train_forward_user`): the
        gradients of ``x`` and ``residual`` in the user's shape."""
        dx, dw, db, dr = self.train_backward(
            saved, lay.canonical(grad_y), lay.canonical(x), weight, bias,
            None if residual is None else lay.canonical(residual), act, slope, need_dx,
            need_dweight, need_dbias, need_dres)
        return (None if dx is None else lay.restore(dx), dw, db,
                None if dr is None else lay.restore(dr))

    def forward_eval(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
        mean: Tensor, rstd: Tensor, act: str, slope: float,
    ) -> Tensor:
        """Output with given statistics (running ones): ``act((x-mean)·γ·rstd + β + r)``."""
        scale = S.scale_of(rstd, weight)
        shift = None if bias is None else bias.to(mean.dtype)
        return self.apply(x, mean, scale, shift, residual, act, slope)

    def backward(
        self, grad_y: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
        residual: Tensor | None, mean: Tensor, rstd: Tensor, training: bool, act: str,
        slope: float, need_dx: bool, need_dweight: bool, need_dbias: bool, need_dres: bool,
        allreduce: AllReduce | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """``(dx, dweight, dbias, dresidual)``; entries not needed may be ``None``.

        ``allreduce`` (SyncBatchNorm): the statistics span several processes, so ``dx`` needs
        the sums of all of them: ``allreduce(Σg, Σg·x̂)`` returns them with the global count.
        ``dweight``/``dbias`` stay the local sums (data parallelism reduces parameter gradients
        itself). A fast backend's single-pass override hands such calls to this one."""
        scale = S.scale_of(rstd, weight)
        shift = None if bias is None else bias.to(mean.dtype)
        c = x.shape[1]
        n: float = x.numel() // c if c else 0
        need_sums = training and need_dx or need_dweight or need_dbias
        sum_g = sum_gx = None
        if need_sums:
            sum_g, sum_gx = self.backward_reduce(
                grad_y, x, mean, rstd, scale, shift, residual, act, slope
            )
        a = b = None
        if training and need_dx:
            assert sum_g is not None and sum_gx is not None
            total_g, total_gx = sum_g, sum_gx
            if allreduce is not None:
                total_g, total_gx, n = allreduce(sum_g, sum_gx)
            a, b = total_g / max(n, 1), total_gx / max(n, 1)
        dx, dres = (None, None)
        if need_dx or need_dres:
            dx, dres = self.backward_apply(
                grad_y, x, mean, rstd, scale, shift, residual, act, slope, a, b, need_dx, need_dres
            )
        dweight = dbias = None
        if need_dweight and weight is not None and sum_gx is not None:
            dweight = sum_gx.to(weight.dtype)
        if need_dbias and bias is not None and sum_g is not None:
            dbias = sum_g.to(bias.dtype)
        return dx, dweight, dbias, dres

    # -- memory mode save="output" (batchnorm.ops.saved_output) --------------------------------
    def backward_from_output(
        self, grad_y: Tensor, y: Tensor, weight: Tensor | None, bias: Tensor | None,
        residual: Tensor | None, rstd: Tensor, training: bool, act: str, slope: float,
        need_dx: bool, need_dweight: bool, need_dbias: bool, need_dres: bool,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """:meth:`backward` from the layer's output ``y`` instead of its input: ``x̂`` is
        recovered as ``(act⁻¹(y) - β [- residual]) / γ`` (``act`` invertible, ``|γ|`` kept away
        from 0 by the caller); the math is in :mod:`.saved_output_reference`, which this
        default runs in PyTorch ops."""
        return saved_output_reference.backward_from_output(
            grad_y, y, weight, bias, residual, rstd, training, act, slope, need_dx,
            need_dweight, need_dbias, need_dres)

    def forward_train_into(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
        eps: float, act: str, slope: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`forward_train` writing the output into ``x`` itself; returns ``(mean, rstd,
        biased var)``: the statistics first (a read-only pass), then :meth:`apply` with
        ``out=x`` (a backend whose apply reads each element before it writes it creates no
        second buffer of ``x``'s size). The output is ``act((x - mean)·scale + β [+ r])``, not
        the centered form of :meth:`forward_train`: the two agree to rounding except when
        ``|mean| ≫ std``, where this one cancels as the eval forward does."""
        mean, var, rstd = S.finalize(self.stats(x), eps)
        self.apply(x, mean, S.scale_of(rstd, weight), bias, residual, act, slope, out=x)
        return mean, rstd, var
