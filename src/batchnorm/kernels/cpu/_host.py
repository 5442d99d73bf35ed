"""Host code of the ``cpu`` backend shared by its entry points: thread counts, work splits
(chunks, row blocks, super rows), NumPy views of tensors and :class:`_Args`, the arrays and
scalars of one kernel call."""

from __future__ import annotations

import functools
import math
import threading
from typing import TYPE_CHECKING

import numba
import numpy as np
import torch
from torch import Tensor

from ...layout import last_order
from ._act_grad import nchw_act_grad, nhwc_act_grad
from ._activations import CODES, NONE, RELU
from ._jit import _FLUSH_ROWS
from ._lanes import lanes, nchw_backward_lanes
from ._nchw import nchw_apply, nchw_backward, nchw_partials
from ._nhwc import nhwc_apply, nhwc_partials
from ._nhwc_backward import nhwc_backward, nhwc_backward_apply

if TYPE_CHECKING:
    from ...layout import Layout

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


#: channels-last tensors of at most this many channels run their backward ``g`` rows at a
#: time (:func:`super_rows`), from :data:`_SUPER_ROW_ELEMENTS` elements up; a super row is at
#: least :data:`_SUPER_ROW_WIDTH` elements. Wider or smaller tensors lose more to the second
#: dispatch and the tiled vectors than the kernel gains (docs/decisions.md, "Super rows only
#: for the narrowest tensors")
_SUPER_ROW_MAX_C = 16
_SUPER_ROW_WIDTH = 64
_SUPER_ROW_ELEMENTS = 1 << 18


@functools.lru_cache(maxsize=256)
def super_rows(m: int, c: int) -> int:
    """Rows per super-row for a channels-last ``(m, c)`` backward: the smallest ``g`` with
    ``g·c >= 64`` that divides ``m`` (and no more than twice that), or 1 (a function of the
    shape only, as the results are)."""
    if c > _SUPER_ROW_MAX_C or m * c < _SUPER_ROW_ELEMENTS:
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


#: channels-last block partials are taken in runs of :func:`sub_rows` rows: for at most this
#: many channels runs of :data:`_SUB_BYTES`, whose second pass reads L1 (the whole block's reads
#: L2); wider tensors gain nothing from short runs and lose to their merges, and take runs of
#: ``_FLUSH_ROWS`` (docs/decisions.md, "Channels-last block partials in runs of rows")
_SUB_MAX_C = 96
_SUB_BYTES = 16384  # a run: 16 KB, L1-resident with the per-channel vectors


@functools.lru_cache(maxsize=256)
def sub_rows(c: int, itemsize: int) -> int:
    """Rows per run of the channels-last block partials: a multiple of 4, at most
    ``_FLUSH_ROWS`` (a run is summed in the tensor's dtype); a function of the shape and dtype
    only, as the results are."""
    if c > _SUB_MAX_C:
        return _FLUSH_ROWS
    return max(4, min(_FLUSH_ROWS, _SUB_BYTES // (itemsize * max(c, 1)) // 4 * 4))


def _np(t: Tensor) -> np.ndarray:
    """Flat NumPy view of a contiguous CPU tensor (a copy only if it is not contiguous).

    ``Tensor.numpy()`` then NumPy's ``reshape``: half the cost of
    ``t.detach().reshape(-1).numpy()``; ``detach`` only where autograd would refuse
    (docs/decisions.md, "Per-call overhead pass (goal: (60, 100) and (256, 1024)
    fwd+bwd)")."""
    a = (t.detach() if t.requires_grad else t).numpy()
    return a if a.ndim == 1 else a.reshape(-1)


def _in_order(a: np.ndarray, last: bool) -> np.ndarray:
    """``a`` (a user-shaped array) with its axes in canonical order: channels innermost when
    ``last``."""
    return a.transpose(last_order(a.ndim)) if last else a


def flat_in(t: Tensor, lay: Layout) -> np.ndarray:
    """Flat NumPy array of a user-shaped tensor in ``lay``'s canonical order: a view where the
    memory is in that order, else :meth:`~batchnorm.layout.Layout.canonical`'s one copy.

    The same elements ``Layout.canonical`` then :func:`_np` give, without the two tensor views
    (each a dispatch, and costly once a model's large ops have evicted that code:
    docs/decisions.md, "The CPU short path views the user's tensors in NumPy")."""
    a = _in_order((t.detach() if t.requires_grad else t).numpy(), lay.kind == "last")
    return a.reshape(-1) if a.flags.c_contiguous else _np(lay.canonical(t))


def empty_user(lay: Layout, dtype: torch.dtype) -> tuple[Tensor, np.ndarray]:
    """A new tensor of ``lay``'s user shape with its dense strides (what
    :meth:`~batchnorm.layout.Layout.restore` gives) and its flat NumPy view in canonical
    order."""
    t = torch.empty_strided(lay.shape, lay.strides, dtype=dtype)
    return t, _in_order(t.numpy(), lay.kind == "last").reshape(-1)


def _acc(t: Tensor, dtype: np.dtype) -> np.ndarray:
    """A per-channel vector as a NumPy array of ``dtype`` (the accumulation dtype)."""
    a = _np(t)
    return a if a.dtype == dtype else a.astype(dtype)


class _Args:
    """The arrays and scalars every kernel call shares, prepared once per call."""

    __slots__ = ("x", "dt", "has_res", "r", "code", "slope", "c", "threads", "first", "n",
                 "s", "m", "p")

    def __init__(self, x: Tensor, residual: Tensor | None, act: str, slope: float) -> None:
        self._setup(_np(x), None if residual is None else _np(residual), x.shape, act, slope)

    @classmethod
    def of(cls, xf: np.ndarray, rf: np.ndarray | None, shape: tuple[int, ...], act: str,
           slope: float) -> _Args:
        """From flat arrays already in the canonical order of ``shape`` (``(N, C, S)`` or
        ``(M, C)``): the caller that made them from the user's tensors (:func:`flat_in`)."""
        args = cls.__new__(cls)
        args._setup(xf, rf, shape, act, slope)
        return args

    def _setup(self, xf: np.ndarray, rf: np.ndarray | None, shape: tuple[int, ...] | torch.Size,
               act: str, slope: float) -> None:
        self.x = xf
        self.dt = dt = xf.dtype
        self.has_res = rf is not None
        self.r = rf if rf is not None else xf
        self.code = CODES[act]
        self.slope = dt.type(slope)
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
            nhwc_partials(self.x, self.m, self.c, self.p, sub_rows(self.c, self.dt.itemsize),
                          cnt, mean, m2)
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
