"""The ``cpu`` backend: fused batch-norm kernels written in Numba (``pip install batchnorm[cpu]``).

Loaded lazily by :mod:`batchnorm.kernels` (importing ``batchnorm`` never imports Numba). This
module is the backend class, :mod:`._host` the host code it shares between its entry points
(threads, work splits, the arrays of a call); the kernels compile on their first call and are
cached on disk
(``cache=True``): :mod:`._nchw` (channels-first), :mod:`._lanes` (channels-first, short
samples), :mod:`._nhwc` and :mod:`._nhwc_backward` (channels-last), :mod:`._running` (the
running-statistics blend), from the helpers of :mod:`._segments`, :mod:`._activations` and the
compile flags of :mod:`._jit`; :mod:`._saved_output` holds the memory mode's kernels.

Passes over memory (channels-first ``(N, C, S)``, one channel per parallel item):

- training forward: shifted sum, ``Σ(x - mean)²`` and the output are three passes over the
  channel's slab, which stays in the L2 cache between them, so ``x`` is read from memory once;
- backward: ``(Σg, Σg·x̂)`` then ``dx``/``dresidual`` from the same cache-resident slab.

With fewer channels than ``4 × threads`` a channel is split into ``P`` chunks, whose partials are
merged with the Chan formula of :func:`batchnorm.stats.merge_many`. Channels-last ``(M, C)`` splits
rows into blocks (partials, merge, then an output pass: ``x`` is read twice). The split depends
only on the shape and ``torch.get_num_threads()``, and each item writes its own slot: results are
bitwise reproducible.

Every backend call is one Numba dispatch (statistics, merge and output in one kernel, with one
parallel region per pass that must wait for the previous one); tensors under
:data:`SERIAL_ELEMENTS` (channels-last: :data:`SERIAL_ELEMENTS_LAST`) run on one thread.
Default selection keeps the base ``prefers`` (always): against the backend that would otherwise
run (the reference backend) this one was measured faster on every shape tried, small ones
included (see ``docs/decisions.md``).

Supported: CPU float32 and float64 tensors. float16/bfloat16 are left to the reference backend
(``supports`` returns ``False``), which upcasts to float32: correct, not fast.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ... import stats as S
from ..base import Backend, RunningUpdate
from ._host import (
    _FUSED_CODES,
    SERIAL_ELEMENTS,
    SERIAL_ELEMENTS_LAST,
    _acc,
    _Args,
    _np,
    empty_user,
    flat_in,
    nchw_chunks,
    nhwc_blocks,
    sub_rows,
    super_rows,
)
from ._lanes import lanes, nchw_forward_lanes
from ._nchw import nchw_backward_apply, nchw_forward
from ._nhwc import nhwc_forward
from ._nhwc_backward import nhwc_backward_apply
from ._running import running_blend

__all__ = ["CpuBackend", "BACKEND", "SERIAL_ELEMENTS", "SERIAL_ELEMENTS_LAST", "nchw_chunks",
           "nhwc_blocks", "sub_rows", "super_rows"]

_DTYPES = (torch.float32, torch.float64)
_NP_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _launch_quiet_pool() -> None:
    """Start Numba's thread pool with OpenMP threads that sleep, not spin, when idle.

    PyTorch and Numba each load their own OpenMP runtime; spinning workers of one steal the two
    cores from the other, slowing both many times over (docs/decisions.md, "Numba's OpenMP pool
    starts passive"). GNU OpenMP reads
    ``OMP_WAIT_POLICY`` when it loads, which for Numba's runtime is here, so the setting is
    scoped to Numba's pool and the environment is restored. A user's own
    ``OMP_WAIT_POLICY`` or ``NUMBA_THREADING_LAYER`` is left alone.
    """
    try:
        from numba.np.ufunc import parallel
    except ImportError:  # pragma: no cover - layout of a future Numba
        return
    if getattr(parallel, "_is_initialized", True) or "OMP_WAIT_POLICY" in os.environ \
            or os.environ.get("NUMBA_THREADING_LAYER"):
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        parallel._launch_threads()
    finally:
        del os.environ["OMP_WAIT_POLICY"]


_launch_quiet_pool()

#: activations whose fused kernels beat our layer followed by PyTorch's own activation: ReLU
#: and identity (inlined in the kernels) and the piecewise-linear ones (a vectorised loop of
#: their own, no ``exp``). SiLU, sigmoid and the ``erf``/``tanh`` ones cost more inside our
#: kernels than PyTorch's separate vectorised pass (docs/decisions.md, "Activations in the CPU
#: kernels")
_FAST_FUSED = frozenset({"none", "relu", "leaky_relu", "relu6", "hardswish", "hardsigmoid"})


class CpuBackend(Backend):
    name = "cpu"

    def fuses_fast(self, act: str) -> bool:
        return act in _FAST_FUSED

    def supports(self, x: Tensor) -> bool:
        return x.is_cpu and x.dtype in _DTYPES and x.dim() in (2, 3)

    # -- primitives (the distributed path) ---------------------------------------------------
    def stats(self, x: Tensor) -> S.Partials:
        args = _Args(x, None, "none", 0.0)
        cnt, mean, m2 = args.partials()
        p, c = args.p, args.c

        def by_chunk(a: np.ndarray) -> np.ndarray:  # (P, C)
            return a.reshape(c, p).T.copy() if args.first else a.reshape(p, c)

        merged = S.merge_many(S.Partials(
            torch.from_numpy(by_chunk(cnt)[:, 0].copy()),
            torch.from_numpy(by_chunk(mean)),
            torch.from_numpy(by_chunk(m2)),
        ))
        acc = S.accumulation_dtype(x.dtype)
        return S.Partials(merged.n.to(acc), merged.mean.to(acc), merged.m2.to(acc))

    def apply(self, x, mean, scale, shift, residual, act, slope, out=None):
        # out may be x: the apply kernels read each element before they write it
        args = _Args(x, residual, act, slope)
        y = torch.empty_like(x) if out is None else out
        args.apply(_np(y), args.vec(mean), args.vec(scale), args.vec(shift))
        return y

    def backward_reduce(self, grad_y, x, mean, rstd, scale, shift, residual, act, slope):
        args = _Args(x, residual, act, slope)
        sg, sgx = args.backward(_np(grad_y), args.vec(mean), args.vec(rstd), args.vec(scale),
                                args.vec(shift), False, True, False, False, args.x, args.x)
        return torch.from_numpy(sg), torch.from_numpy(sgx)

    def backward_apply(self, grad_y, x, mean, rstd, scale, shift, residual, act, slope,
                       a, b, need_dx, need_dres):
        args = _Args(x, residual, act, slope)
        dx = torch.empty_like(x) if need_dx else None
        dres = torch.empty_like(x) if need_dres else None
        dxf = _np(dx) if dx is not None else args.x
        drf = _np(dres) if dres is not None else args.x
        zero = np.zeros(args.c, dtype=args.x.dtype)
        av = zero if a is None else args.vec(a)
        bv = zero if b is None else args.vec(b)
        mf, rf, scf, shf = args.vec(mean), args.vec(rstd), args.vec(scale), args.vec(shift)
        if args.first:
            nchw_backward_apply(_np(grad_y), args.x, args.r, args.has_res, args.n, args.c,
                                  args.s, args.p, mf, rf, scf, shf, av, bv, args.code,
                                  args.slope, need_dx, need_dres, dxf, drf)
        else:
            nhwc_backward_apply(_np(grad_y), args.x, args.r, args.has_res, args.m, args.c,
                                  args.p, mf, rf, scf, shf, av, bv, args.code, args.slope,
                                  need_dx, need_dres, dxf, drf)
        return dx, dres

    def blend_running(self, running_mean, running_var, mean, var_unbiased, factor):
        # one Numba call instead of a dozen NumPy calls (docs/decisions.md, "Eager
        # running-statistics update: one Numba call, version counters moved explicitly")
        if all(a.dtype in _NP_DTYPES for a in (running_mean, running_var, mean, var_unbiased)):
            return bool(running_blend(running_mean, running_var, mean, var_unbiased,
                                        var_unbiased.dtype.type(1.0), float(factor)))
        return super().blend_running(running_mean, running_var, mean, var_unbiased, factor)

    # -- fused paths: one Numba dispatch per call -------------------------------------------
    def forward_train(self, x, weight, bias, residual, eps, act, slope, running=None):
        y, stat = self.train_forward(x, weight, bias, residual, eps, act, slope, running)
        # three separate tensors: op outputs may not share storage
        return (y, *self.train_stats(stat))

    def train_forward(self, x, weight, bias, residual, eps, act, slope, running=None):
        # the saved form is the kernel's (6, C) stat array itself: no tensors made per call
        args = _Args(x, residual, act, slope)
        y = torch.empty_like(x)
        return y, self._train_forward(args, _np(y), weight, bias, eps, running)

    def train_forward_user(self, x, lay, xc, weight, bias, residual, eps, act, slope,
                           running=None):
        # NumPy views of the user's tensors in canonical order: no tensor views made or undone
        # (docs/decisions.md, "The CPU short path views the user's tensors in NumPy")
        rf = None if residual is None else flat_in(residual, lay)
        args = _Args.of(_np(xc), rf, xc.shape, act, slope)
        y, yf = empty_user(lay, x.dtype)
        return y, self._train_forward(args, yf, weight, bias, eps, running)

    @staticmethod
    def _train_forward(args: _Args, yf: np.ndarray, weight: Tensor | None, bias: Tensor | None,
                       eps: float, running: RunningUpdate | None) -> np.ndarray:
        """The fused forward into ``yf`` (and the running blend); returns the ``(6, C)`` stat
        array (mean, biased var, rstd, γ·rstd, β, δ)."""
        c, p, dt = args.c, args.p, args.dt
        stat = np.empty((6, c), dtype=dt)
        w = _acc(weight, dt) if weight is not None else stat[0]
        b = _acc(bias, dt) if bias is not None else stat[0]
        if args.first and lanes(args.n, args.s, p):
            nchw_forward_lanes(args.x, yf, args.r, args.has_res, args.n, c, args.s,
                               args.threads, w, b, weight is not None, bias is not None,
                               dt.type(eps), args.code, args.slope, stat)
        else:
            part = np.empty((3, c * p))
            if args.first:
                nchw_forward(args.x, yf, args.r, args.has_res, args.n, c, args.s, p, w, b,
                             weight is not None, bias is not None, dt.type(eps), args.code,
                             args.slope, stat, part[0], part[1], part[2])
            else:
                nhwc_forward(args.x, yf, args.r, args.has_res, args.m, c, p,
                             sub_rows(c, dt.itemsize), w, b, weight is not None,
                             bias is not None, dt.type(eps), args.code, args.slope, stat,
                             part[0], part[1], part[2])
        if running is not None and running.mean.dtype == dt and running.var.dtype == dt:
            # the update in the same call's wake: mean and var·bessel straight from the stat
            running.ok = bool(running_blend(running.mean, running.var, stat[0], stat[1],
                                            dt.type(running.bessel), running.factor))
        return stat

    def train_stats(self, saved):
        return (torch.from_numpy(saved[0].copy()), torch.from_numpy(saved[2].copy()),
                torch.from_numpy(saved[1].copy()))

    def train_backward(self, saved, grad_y, x, weight, bias, residual, act, slope, need_dx,
                       need_dweight, need_dbias, need_dres):
        # mean, rstd, γ·rstd and β straight from the forward's stat rows (the same values the
        # general path converts back from tensors)
        args = _Args(x, residual, act, slope)
        return self._backward(args, _np(grad_y), _like(x), weight, bias, saved[0], saved[2],
                              saved[3], saved[4], True, need_dx, need_dweight, need_dbias,
                              need_dres)

    def train_backward_user(self, saved, lay, grad_y, x, weight, bias, residual, act, slope,
                            need_dx, need_dweight, need_dbias, need_dres):
        # a copy only for a tensor not in the layout's order: a gradient in another memory
        # format, an input the forward had to make dense
        rf = None if residual is None else flat_in(residual, lay)
        args = _Args.of(flat_in(x, lay), rf, lay.canonical_shape, act, slope)
        dtype = x.dtype
        return self._backward(args, flat_in(grad_y, lay), lambda: empty_user(lay, dtype), weight,
                              bias, saved[0], saved[2], saved[3], saved[4], True, need_dx,
                              need_dweight, need_dbias, need_dres)

    def forward_eval(self, x, weight, bias, residual, mean, rstd, act, slope):
        return self.apply(x, mean, S.scale_of(rstd, weight), bias, residual, act, slope)

    def backward(self, grad_y, x, weight, bias, residual, mean, rstd, training, act, slope,
                 need_dx, need_dweight, need_dbias, need_dres, allreduce=None):
        if allreduce is not None:  # the sums leave the process between the two passes
            return super().backward(grad_y, x, weight, bias, residual, mean, rstd, training, act,
                                    slope, need_dx, need_dweight, need_dbias, need_dres,
                                    allreduce)
        args = _Args(x, residual, act, slope)
        dt = args.dt
        mf, rf = _acc(mean, dt), _acc(rstd, dt)
        # stats.scale_of (γ·rstd in the accumulation dtype), on the NumPy views: the same
        # IEEE product as the torch op without a tensor dispatch
        scf = rf if weight is None else _acc(weight, dt) * rf
        return self._backward(args, _np(grad_y), _like(x), weight, bias, mf, rf, scf,
                              args.vec(bias), training, need_dx, need_dweight, need_dbias,
                              need_dres)

    @staticmethod
    def _backward(args: _Args, dyf: np.ndarray, alloc: Callable[[], tuple[Tensor, np.ndarray]],
                  weight: Tensor | None, bias: Tensor | None, mf: np.ndarray, rf: np.ndarray,
                  scf: np.ndarray, shf: np.ndarray, training: bool, need_dx: bool,
                  need_dweight: bool, need_dbias: bool, need_dres: bool,
                  ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """:meth:`backward` from the per-channel arrays (mean, rstd, scale (γ·rstd), shift),
        the flat incoming gradient ``dyf`` and ``alloc``, which makes an output gradient and
        its flat view."""
        need_sums = bool((training and need_dx) or need_dweight or need_dbias)
        dx, dxf = alloc() if need_dx else (None, args.x)
        if args.code not in _FUSED_CODES:  # g once, in its own pass; then no activation
            g, gf = alloc()
            args.act_grad(dyf, mf, scf, shf, gf)
            dyf, dres, need_dres, drf = gf, (g if need_dres else None), False, args.x
        else:
            dres, drf = alloc() if need_dres else (None, args.x)
        sg, sgx = args.backward(dyf, mf, rf, scf, shf, bool(training and need_dx),
                                need_sums, need_dx, need_dres, dxf, drf)
        dweight = _to(sgx, weight.dtype) if need_dweight and weight is not None else None
        dbias = _to(sg, bias.dtype) if need_dbias and bias is not None else None
        return dx, dweight, dbias, dres

    def backward_from_output(self, grad_y, y, weight, bias, residual, rstd, training, act, slope,
                             need_dx, need_dweight, need_dbias, need_dres):
        # imported on the mode's first backward: its kernels compile only for models using it
        from ._saved_output import backward_from_output
        return backward_from_output(grad_y, y, weight, bias, residual, rstd, training, act,
                                    slope, need_dx, need_dweight, need_dbias, need_dres)


def _like(x: Tensor) -> Callable[[], tuple[Tensor, np.ndarray]]:
    """An allocator of tensors like canonical ``x`` with their flat views."""
    def alloc() -> tuple[Tensor, np.ndarray]:
        t = torch.empty_like(x)
        return t, _np(t)
    return alloc


def _to(a: np.ndarray, dtype: torch.dtype) -> Tensor:
    t = torch.from_numpy(a)
    return t if t.dtype == dtype else t.to(dtype)


BACKEND = CpuBackend()
