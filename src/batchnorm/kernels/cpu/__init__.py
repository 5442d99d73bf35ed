"""The ``cpu`` backend: fused batch-norm kernels written in Numba (``pip install batchnorm[cpu]``).

Loaded lazily by :mod:`batchnorm.kernels` (importing ``batchnorm`` never imports Numba). This
module is the host code; the kernels compile on their first call and are cached on disk
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

import functools
import math
import os
import threading

import numba
import numpy as np
import torch
from torch import Tensor

from ... import stats as S
from ..base import Backend
from ._act_grad import nchw_act_grad, nhwc_act_grad
from ._activations import CODES, NONE, RELU
from ._lanes import lanes, nchw_backward_lanes, nchw_forward_lanes
from ._nchw import nchw_apply, nchw_backward, nchw_backward_apply, nchw_forward, nchw_partials
from ._nhwc import nhwc_apply, nhwc_forward, nhwc_partials
from ._nhwc_backward import nhwc_backward, nhwc_backward_apply
from ._running import running_blend

__all__ = ["CpuBackend", "BACKEND"]

_DTYPES = (torch.float32, torch.float64)
_NP_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_FUSED_CODES = (NONE, RELU)  # activations whose backward the lane blocks fuse
# Split a channel into chunks only when there are fewer than this many channels per thread.
_CHANNELS_PER_THREAD = 4
_MIN_CHUNK = 4096  # elements; smaller chunks cost more in bookkeeping than they gain
_BLOCK_ELEMENTS = 65536  # channels-last row block: 256 KB of float32, cache-resident per thread
# At least this many rows per block: a block's C-sized bookkeeping (accumulators, flushes, its
# partial's write) costs a few passes over C, a large share of the work of a short block; wide
# tensors gain from blocks past the L2 size, which the L3 then serves (docs/decisions.md,
# "Channels-last blocks of at least 128 rows" and "Channels-last blocks: a multiple of the
# thread count, at least 256 rows").
_MIN_BLOCK_ROWS = 256


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


def _threads(numel: int, serial_below: int) -> int:
    """Threads for a call on ``numel`` elements: PyTorch's count (Numba's is set to agree;
    oversubscription is slow), or 1 below ``serial_below`` elements (:data:`SERIAL_ELEMENTS`
    channels-first, :data:`SERIAL_ELEMENTS_LAST` channels-last), where forking and joining the
    pool costs more than the second core saves. Determined by the shape and
    ``torch.get_num_threads()`` alone, as are the work split and therefore the results.

    Numba's count is per Python thread; the last count this module set is remembered per
    thread, so ``numba.set_num_threads`` (as costly as a small kernel's bookkeeping, with its
    checks) runs only on a change (docs/decisions.md, "Per-call overhead pass (goal: (60, 100)
    and (256, 1024) fwd+bwd)")."""
    t = torch.get_num_threads()
    t = 1 if numel < serial_below or t <= 1 else min(t, _MAX_THREADS)
    if getattr(_TLS, "threads", 0) != t:
        numba.set_num_threads(t)
        _TLS.threads = t
    return t


_TLS = threading.local()
_MAX_THREADS = max(1, int(getattr(numba.config, "NUMBA_NUM_THREADS", 1)))
# Below this many elements a call runs on one thread (see _threads). Channels-first with one
# channel per item is one parallel region per call; channels-last is two (block partials, then
# the output or dx), so the fork/joins outweigh the second core up to larger tensors in a loop;
# inside a model's step, where the data comes from memory, the second core pays off sooner
# (docs/decisions.md, "Threads: all of PyTorch's, one below 4096 elements
# (`SERIAL_ELEMENTS`)" and "Channels-last threads from 16384 elements").
SERIAL_ELEMENTS = 1 << 12
SERIAL_ELEMENTS_LAST = 1 << 14


@functools.lru_cache(maxsize=256)
def nchw_chunks(c: int, ns: int, threads: int) -> int:
    """Chunks per channel for channels-first input (a function of the shape and threads only)."""
    if c >= _CHANNELS_PER_THREAD * threads or ns < 2 * _MIN_CHUNK:
        return 1
    return max(1, min(math.ceil(_CHANNELS_PER_THREAD * threads / c), ns // _MIN_CHUNK))


#: channels-last tensors narrower than this many channels run their backward ``g`` rows at a
#: time (:func:`super_rows`), from :data:`_SUPER_ROW_ELEMENTS` elements up
_SUPER_ROW_WIDTH = 64
_SUPER_ROW_ELEMENTS = 1 << 16


@functools.lru_cache(maxsize=256)
def super_rows(m: int, c: int) -> int:
    """Rows per super-row for a channels-last ``(m, c)`` backward: the smallest ``g`` with
    ``g·c >= 64`` that divides ``m`` (and no more than twice that), or 1 (a function of the
    shape only, as the results are)."""
    if c >= _SUPER_ROW_WIDTH or m * c < _SUPER_ROW_ELEMENTS:
        return 1
    least = -(-_SUPER_ROW_WIDTH // c)
    return next((g for g in range(least, 2 * least + 1) if m % g == 0), 1)


@functools.lru_cache(maxsize=256)
def nhwc_blocks(m: int, c: int, threads: int) -> int:
    """Row blocks for channels-last input (a function of the shape and threads only): blocks
    of about :data:`_BLOCK_ELEMENTS` (at least :data:`_MIN_BLOCK_ROWS` rows), a multiple of the
    thread count in number (``prange`` hands each thread an equal share of the blocks), and no
    more than that: every block costs a few passes over C in bookkeeping (see
    ``docs/decisions.md``)."""
    rows = max(_MIN_BLOCK_ROWS, _BLOCK_ELEMENTS // max(c, 1))
    p = threads * math.ceil(math.ceil(m / rows) / threads)
    return max(1, min(p, m))


def _np(t: Tensor) -> np.ndarray:
    """Flat NumPy view of a contiguous CPU tensor (a copy only if it is not contiguous).

    ``Tensor.numpy()`` then NumPy's ``reshape``: half the cost of
    ``t.detach().reshape(-1).numpy()``; ``detach`` only where autograd would refuse
    (docs/decisions.md, "Per-call overhead pass (goal: (60, 100) and (256, 1024)
    fwd+bwd)")."""
    a = (t.detach() if t.requires_grad else t).numpy()
    return a if a.ndim == 1 else a.reshape(-1)


def _acc(t: Tensor, dtype: np.dtype) -> np.ndarray:
    """A per-channel vector as a NumPy array of ``dtype`` (the accumulation dtype)."""
    a = _np(t)
    return a if a.dtype == dtype else a.astype(dtype)


class _Args:
    """The arrays and scalars every kernel call shares, prepared once per call."""

    __slots__ = ("x", "dt", "has_res", "r", "code", "slope", "c", "threads", "first", "n",
                 "s", "m", "p")

    def __init__(self, x: Tensor, residual: Tensor | None, act: str, slope: float) -> None:
        self.x = xf = _np(x)
        self.dt = dt = xf.dtype
        self.has_res = residual is not None
        self.r = _np(residual) if residual is not None else xf
        self.code = CODES[act]
        self.slope = dt.type(slope)
        shape = x.shape
        self.c = c = shape[1]
        self.first = first = len(shape) == 3
        self.threads = t = _threads(xf.size, SERIAL_ELEMENTS if first else SERIAL_ELEMENTS_LAST)
        if first:
            self.n, self.s = n, s = shape[0], shape[2]
            self.p = nchw_chunks(c, n * s, t)
        else:
            self.m = m = shape[0]
            self.p = nhwc_blocks(m, c, t)

    def vec(self, t: Tensor | None, default: float = 0.0) -> np.ndarray:
        """A per-channel vector in the accumulation dtype (``default`` where ``t`` is None)."""
        if t is None:
            return np.full(self.c, default, dtype=self.dt)
        return _acc(t, self.dt)

    def partials(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float64 partials: item ``c*P + p`` channels-first, ``p*C + c`` channels-last."""
        k = self.c * self.p
        cnt, mean, m2 = np.empty(k), np.empty(k), np.empty(k)
        if self.first:
            nchw_partials(self.x, self.n, self.c, self.s, self.p, cnt, mean, m2)
        else:
            nhwc_partials(self.x, self.m, self.c, self.p, cnt, mean, m2)
        return cnt, mean, m2

    def apply(self, y: np.ndarray, mean: np.ndarray, scale: np.ndarray,
              shift: np.ndarray) -> None:
        if self.first:
            nchw_apply(self.x, y, self.r, self.has_res, self.n, self.c, self.s, self.p, mean,
                         scale, shift, self.code, self.slope)
        else:
            nhwc_apply(self.x, y, self.r, self.has_res, self.m, self.c, self.p, mean, scale,
                         shift, self.code, self.slope)

    def act_grad(self, dy: np.ndarray, mean: np.ndarray, scale: np.ndarray, shift: np.ndarray,
                 g: np.ndarray) -> None:
        """``g = dy·act'(pre)`` (an activation other than none/ReLU), then the call goes on
        without the activation: the backward of the affine part on ``g`` (``dres = g``)."""
        if self.first:
            nchw_act_grad(dy, self.x, self.r, self.has_res, self.n, self.c, self.s, mean, scale,
                          shift, self.code, self.slope, g)
        else:
            nhwc_act_grad(dy, self.x, self.r, self.has_res, self.m, self.c, self.p, mean, scale,
                          shift, self.code, self.slope, g)
        self.code, self.has_res, self.r = NONE, False, self.x

    def backward(self, dy: np.ndarray, mean: np.ndarray, rstd: np.ndarray, scale: np.ndarray,
                 shift: np.ndarray, training: bool, need_sums: bool, need_dx: bool,
                 need_dres: bool, dx: np.ndarray, dres: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
        """One dispatch: ``(Σg, Σg·x̂)`` (returned) and ``dx``/``dres`` (written)."""
        c, p = self.c, self.p
        # separate buffers: they become dγ and dβ, op outputs that may not share storage
        sg, sgx = np.empty(c, dtype=self.dt), np.empty(c, dtype=self.dt)
        tmp = np.empty((2, c * p))
        tg, tgx = tmp[0], tmp[1]
        if self.first and lanes(self.n, self.s, p) and self.code in _FUSED_CODES:
            nchw_backward_lanes(dy, self.x, self.r, self.has_res, self.n, c, self.s,
                                  self.threads, mean, rstd, scale, shift, self.code, training,
                                  need_sums, need_dx, need_dres, dx, dres, sg, sgx)
        elif self.first:
            nchw_backward(dy, self.x, self.r, self.has_res, self.n, c, self.s, p, mean, rstd,
                            scale, shift, self.code, self.slope, training, need_sums, need_dx,
                            need_dres, dx, dres, sg, sgx, tg, tgx)
        elif (g := super_rows(self.m, c)) > 1:
            self._backward_super_rows(g, dy, mean, rstd, scale, shift, training, need_sums,
                                      need_dx, need_dres, dx, dres, sg, sgx)
        else:
            nhwc_backward(dy, self.x, self.r, self.has_res, self.m, c, p, mean, rstd, scale,
                            shift, self.code, self.slope, training, need_sums, need_dx,
                            need_dres, dx, dres, sg, sgx, tg, tgx)
        return sg, sgx

    def _backward_super_rows(self, g: int, dy: np.ndarray, mean: np.ndarray, rstd: np.ndarray,
                             scale: np.ndarray, shift: np.ndarray, training: bool,
                             need_sums: bool, need_dx: bool, need_dres: bool, dx: np.ndarray,
                             dres: np.ndarray, sg: np.ndarray, sgx: np.ndarray) -> None:
        """The channels-last backward of a narrow tensor, ``g`` rows at a time: ``(M, C)`` is
        viewed as ``(M/g, g·C)`` with the per-channel vectors repeated ``g`` times, so each
        row the kernels sweep is ``g·C`` long (a ``C = 16`` row is one vector: the per-row
        bookkeeping, not the arithmetic, set the speed). The ``g`` groups of a channel are
        summed in float64 in a fixed order between the sums pass and the ``dx`` pass (two
        dispatches instead of one)."""
        c, m, dt = self.c, self.m // g, self.dt
        cg = c * g
        p = nhwc_blocks(m, cg, self.threads)
        mt, rt, st, ht = (np.tile(v, g) for v in (mean, rstd, scale, shift))
        tot_g = tot_gx = np.zeros(c)
        if need_sums:
            tmp = np.empty((2, cg * p))
            nhwc_backward(dy, self.x, self.r, self.has_res, m, cg, p, mt, rt, st, ht,
                            self.code, self.slope, False, True, False, False, dx, dres,
                            np.empty(cg, dtype=dt), np.empty(cg, dtype=dt), tmp[0], tmp[1])
            tot_g = tmp[0].reshape(p * g, c).sum(axis=0)  # (block, group) rows, fixed order
            tot_gx = tmp[1].reshape(p * g, c).sum(axis=0)
            sg[:] = tot_g
            sgx[:] = tot_gx * rstd
        if need_dx or need_dres:
            a = np.zeros(c, dtype=dt)
            b = np.zeros(c, dtype=dt)
            if training:  # as nhwc_backward: a = Σg/M, b = (Σg·x̂)/M in the tensor's dtype
                a[:] = tot_g / self.m
                b[:] = sgx / self.m
            nhwc_backward_apply(dy, self.x, self.r, self.has_res, m, cg, p, mt, rt, st, ht,
                                  np.tile(a, g), np.tile(b, g), self.code, self.slope, need_dx,
                                  need_dres, dx, dres)


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
        args = _Args(x, residual, act, slope)
        c, p, dt = args.c, args.p, args.dt
        y = torch.empty_like(x)
        stat = np.empty((6, c), dtype=dt)
        part = np.empty((3, c * p))
        w = _acc(weight, dt) if weight is not None else stat[0]
        b = _acc(bias, dt) if bias is not None else stat[0]
        if args.first:
            if lanes(args.n, args.s, p):
                nchw_forward_lanes(args.x, _np(y), args.r, args.has_res, args.n, c, args.s,
                                     args.threads, w, b, weight is not None, bias is not None,
                                     dt.type(eps), args.code, args.slope, stat)
            else:
                nchw_forward(args.x, _np(y), args.r, args.has_res, args.n, c, args.s, p, w, b,
                               weight is not None, bias is not None, dt.type(eps), args.code,
                               args.slope, stat, part[0], part[1], part[2])
        else:
            nhwc_forward(args.x, _np(y), args.r, args.has_res, args.m, c, p, w, b,
                           weight is not None, bias is not None, dt.type(eps), args.code,
                           args.slope, stat, part[0], part[1], part[2])
        if running is not None and running.mean.dtype == dt and running.var.dtype == dt:
            # the update in the same call's wake: mean and var·bessel straight from the stat
            running.ok = bool(running_blend(running.mean, running.var, stat[0], stat[1],
                                              dt.type(running.bessel), running.factor))
        # three separate tensors: op outputs may not share storage
        return y, torch.from_numpy(stat[0].copy()), torch.from_numpy(stat[2].copy()), \
            torch.from_numpy(stat[1].copy())

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
        shf = args.vec(bias)
        need_sums = bool((training and need_dx) or need_dweight or need_dbias)
        dx = torch.empty_like(x) if need_dx else None
        dyf = _np(grad_y)
        if args.code not in _FUSED_CODES:  # g once, in its own pass; then no activation
            g = torch.empty_like(x)
            args.act_grad(dyf, mf, scf, shf, _np(g))
            dyf, dres, need_dres = _np(g), (g if need_dres else None), False
        else:
            dres = torch.empty_like(x) if need_dres else None
        dxf = _np(dx) if dx is not None else args.x
        drf = _np(dres) if need_dres and dres is not None else args.x
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


def _to(a: np.ndarray, dtype: torch.dtype) -> Tensor:
    t = torch.from_numpy(a)
    return t if t.dtype == dtype else t.to(dtype)


BACKEND = CpuBackend()
