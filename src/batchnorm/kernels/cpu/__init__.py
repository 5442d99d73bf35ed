"""The ``cpu`` backend: fused batch-norm kernels written in Numba (``pip install batchnorm[cpu]``).

Loaded lazily by :mod:`batchnorm.kernels` (importing ``batchnorm`` never imports Numba); the
kernels in :mod:`._kernels` compile on their first call and are cached on disk (``cache=True``).

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
:data:`SERIAL_ELEMENTS` run on one thread. Default selection keeps the base ``prefers`` (always):
against the backend that would otherwise run (the reference backend) this one was measured faster
on every shape tried, small ones included (see ``docs/notes/cpu.md``).

Supported: CPU float32 and float64 tensors. float16/bfloat16 are left to the reference backend
(``supports`` returns ``False``), which upcasts to float32: correct, not fast.
"""

from __future__ import annotations

import math
import os

import numba
import numpy as np
import torch
from torch import Tensor

from ... import stats as S
from ..base import Backend
from . import _kernels as K

__all__ = ["CpuBackend", "BACKEND"]

_DTYPES = (torch.float32, torch.float64)
# Split a channel into chunks only when there are fewer than this many channels per thread.
_CHANNELS_PER_THREAD = 4
_MIN_CHUNK = 4096  # elements; smaller chunks cost more in bookkeeping than they gain
_BLOCK_ELEMENTS = 65536  # channels-last row block: 256 KB of float32, cache-resident per thread


def _launch_quiet_pool() -> None:
    """Start Numba's thread pool with OpenMP threads that sleep, not spin, when idle.

    PyTorch and Numba each load their own OpenMP runtime; spinning workers of one steal the two
    cores from the other (measured on the 2-core machine: a small conv right after a Numba
    kernel 32 ms instead of 1.3 ms, the kernel itself 8 ms instead of 0.2 ms). GNU OpenMP reads
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


def _threads(numel: int) -> int:
    """Threads for a call on ``numel`` elements: PyTorch's count (Numba's is set to agree;
    oversubscription is slow), or 1 below :data:`SERIAL_ELEMENTS`, where forking and joining
    the pool costs more than the second core saves. Determined by the shape and
    ``torch.get_num_threads()`` alone, as are the work split and therefore the results."""
    t = torch.get_num_threads()
    t = 1 if numel < SERIAL_ELEMENTS or t <= 1 else min(t, _MAX_THREADS)
    if numba.get_num_threads() != t:
        numba.set_num_threads(t)
    return t


_MAX_THREADS = max(1, int(getattr(numba.config, "NUMBA_NUM_THREADS", 1)))
# Below this many elements a call runs on one thread (see _threads and docs/notes/cpu.md).
SERIAL_ELEMENTS = 1 << 12


def nchw_chunks(c: int, ns: int, threads: int) -> int:
    """Chunks per channel for channels-first input (a function of the shape and threads only)."""
    if c >= _CHANNELS_PER_THREAD * threads or ns < 2 * _MIN_CHUNK:
        return 1
    return max(1, min(math.ceil(_CHANNELS_PER_THREAD * threads / c), ns // _MIN_CHUNK))


def nhwc_blocks(m: int, c: int, threads: int) -> int:
    """Row blocks for channels-last input (a function of the shape and threads only)."""
    rows = max(16, _BLOCK_ELEMENTS // max(c, 1))
    p = max(math.ceil(m / rows), min(_CHANNELS_PER_THREAD * threads, m // 16))
    return max(1, min(p, m))


def _np(t: Tensor) -> np.ndarray:
    """Flat NumPy view of a contiguous CPU tensor (a copy only if it is not contiguous)."""
    return t.detach().reshape(-1).numpy()


def _acc(t: Tensor, x: np.ndarray) -> np.ndarray:
    """A per-channel vector as a NumPy array of ``x``'s dtype (the accumulation dtype)."""
    if t.dtype != _TORCH[x.dtype.type]:
        t = t.to(_TORCH[x.dtype.type])
    return _np(t)


_TORCH = {np.float32: torch.float32, np.float64: torch.float64}


class _Args:
    """The arrays and scalars every kernel call shares, prepared once per call."""

    def __init__(self, x: Tensor, residual: Tensor | None, act: str, slope: float) -> None:
        self.x = _np(x)
        self.dtype = self.x.dtype.type
        self.has_res = residual is not None
        self.r = _np(residual) if residual is not None else self.x
        self.code = K.CODES[act]
        self.slope = self.dtype(slope)
        self.c = x.shape[1]
        self.threads = _threads(x.numel())
        self.first = x.dim() == 3
        if self.first:
            self.n, self.s = x.shape[0], x.shape[2]
            self.p = nchw_chunks(self.c, self.n * self.s, self.threads)
        else:
            self.m = x.shape[0]
            self.p = nhwc_blocks(self.m, self.c, self.threads)

    def vec(self, t: Tensor | None, default: float = 0.0) -> np.ndarray:
        """A per-channel vector in the accumulation dtype (``default`` where ``t`` is None)."""
        if t is None:
            return np.full(self.c, default, dtype=self.x.dtype)
        return _acc(t, self.x)

    def partials(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-(channel, chunk) float64 partials, item ``c*P + p``."""
        k = self.c * self.p
        cnt, mean, m2 = np.empty(k), np.empty(k), np.empty(k)
        if self.first:
            K.nchw_partials(self.x, self.n, self.c, self.s, self.p, cnt, mean, m2)
        else:
            K.nhwc_partials(self.x, self.m, self.c, self.p, cnt, mean, m2)
        return cnt, mean, m2

    def apply(self, y: np.ndarray, mean: np.ndarray, scale: np.ndarray,
              shift: np.ndarray) -> None:
        if self.first:
            K.nchw_apply(self.x, y, self.r, self.has_res, self.n, self.c, self.s, self.p, mean,
                         scale, shift, self.code, self.slope)
        else:
            K.nhwc_apply(self.x, y, self.r, self.has_res, self.m, self.c, self.p, mean, scale,
                         shift, self.code, self.slope)

    def backward(self, dy: np.ndarray, mean: np.ndarray, rstd: np.ndarray, scale: np.ndarray,
                 shift: np.ndarray, training: bool, need_sums: bool, need_dx: bool,
                 need_dres: bool, dx: np.ndarray, dres: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
        """One dispatch: ``(Σg, Σg·x̂)`` (returned) and ``dx``/``dres`` (written)."""
        c, p = self.c, self.p
        sg, sgx = np.empty(c, dtype=self.x.dtype), np.empty(c, dtype=self.x.dtype)
        tg, tgx = np.empty(c * p), np.empty(c * p)
        if self.first:
            K.nchw_backward(dy, self.x, self.r, self.has_res, self.n, c, self.s, p, mean, rstd,
                            scale, shift, self.code, self.slope, training, need_sums, need_dx,
                            need_dres, dx, dres, sg, sgx, tg, tgx)
        else:
            K.nhwc_backward(dy, self.x, self.r, self.has_res, self.m, c, p, mean, rstd, scale,
                            shift, self.code, self.slope, training, need_sums, need_dx,
                            need_dres, dx, dres, sg, sgx, tg, tgx)
        return sg, sgx


class CpuBackend(Backend):
    name = "cpu"

    def supports(self, x: Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype in _DTYPES and x.dim() in (2, 3)

    # -- primitives (the distributed path) ---------------------------------------------------
    def stats(self, x: Tensor) -> S.Partials:
        args = _Args(x, None, "none", 0.0)
        cnt, mean, m2 = args.partials()
        p, c = args.p, args.c
        merged = S.merge_many(S.Partials(
            torch.from_numpy(cnt.reshape(c, p)[0].copy()),
            torch.from_numpy(mean.reshape(c, p).T.copy()),
            torch.from_numpy(m2.reshape(c, p).T.copy()),
        ))
        acc = S.accumulation_dtype(x.dtype)
        return S.Partials(merged.n.to(acc), merged.mean.to(acc), merged.m2.to(acc))

    def apply(self, x, mean, scale, shift, residual, act, slope):
        args = _Args(x, residual, act, slope)
        y = torch.empty_like(x)
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
            K.nchw_backward_apply(_np(grad_y), args.x, args.r, args.has_res, args.n, args.c,
                                  args.s, args.p, mf, rf, scf, shf, av, bv, args.code,
                                  args.slope, need_dx, need_dres, dxf, drf)
        else:
            K.nhwc_backward_apply(_np(grad_y), args.x, args.r, args.has_res, args.m, args.c,
                                  args.p, mf, rf, scf, shf, av, bv, args.code, args.slope,
                                  need_dx, need_dres, dxf, drf)
        return dx, dres

    # -- fused paths: one Numba dispatch per call -------------------------------------------
    def forward_train(self, x, weight, bias, residual, eps, act, slope):
        args = _Args(x, residual, act, slope)
        c, p = args.c, args.p
        y = torch.empty_like(x)
        stat = np.empty((6, c), dtype=args.x.dtype)
        cnt, dlt, m2 = np.empty(c * p), np.empty(c * p), np.empty(c * p)
        w = _acc(weight, args.x) if weight is not None else stat[0]
        b = _acc(bias, args.x) if bias is not None else stat[0]
        eps_ = args.dtype(eps)
        if args.first:
            K.nchw_forward(args.x, _np(y), args.r, args.has_res, args.n, c, args.s, p, w, b,
                           weight is not None, bias is not None, eps_, args.code, args.slope,
                           stat, cnt, dlt, m2)
        else:
            K.nhwc_forward(args.x, _np(y), args.r, args.has_res, args.m, c, p, w, b,
                           weight is not None, bias is not None, eps_, args.code, args.slope,
                           stat, cnt, dlt, m2)
        mean, var, rstd = (torch.from_numpy(stat[i].copy()) for i in range(3))
        return y, mean, rstd, var

    def forward_eval(self, x, weight, bias, residual, mean, rstd, act, slope):
        return self.apply(x, mean, S.scale_of(rstd, weight), bias, residual, act, slope)

    def backward(self, grad_y, x, weight, bias, residual, mean, rstd, training, act, slope,
                 need_dx, need_dweight, need_dbias, need_dres):
        args = _Args(x, residual, act, slope)
        mf, rf = args.vec(mean), args.vec(rstd)
        scf, shf = args.vec(S.scale_of(rstd, weight)), args.vec(bias)
        need_sums = bool((training and need_dx) or need_dweight or need_dbias)
        dx = torch.empty_like(x) if need_dx else None
        dres = torch.empty_like(x) if need_dres else None
        dxf = _np(dx) if dx is not None else args.x
        drf = _np(dres) if dres is not None else args.x
        sg, sgx = args.backward(_np(grad_y), mf, rf, scf, shf, bool(training and need_dx),
                                need_sums, need_dx, need_dres, dxf, drf)
        dweight = torch.from_numpy(sgx).to(weight.dtype) if need_dweight and weight is not None \
            else None
        dbias = torch.from_numpy(sg).to(bias.dtype) if need_dbias and bias is not None else None
        return dx, dweight, dbias, dres


BACKEND = CpuBackend()
