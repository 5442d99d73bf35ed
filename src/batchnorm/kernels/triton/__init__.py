"""The Triton backend: fused batch-norm kernels for CUDA tensors (CPU tensors in the interpreter).

One kernel family covers both canonical layouts by viewing every input as ``(R, C, S)``:
channels-first ``(N, C, S)`` is itself, channels-last ``(M, C)`` is ``(M, C, 1)``. A program
works on a tile ``(BLOCK_R, BLOCK_C, BLOCK_S)``; for channels-last ``BLOCK_S = 1`` and the tile
reads ``BLOCK_C`` contiguous channels of ``BLOCK_R`` rows (a column reduction in row blocks),
for channels-first it reads contiguous runs of ``S``. Per-channel results reduce axes 0 and 2.

Two strategies, chosen by size (``persistent_max``, overridable per instance):

- **persistent** — the whole channel slab ``R x S`` (padded to powers of two) fits one tile:
  one program per channel block reads ``x`` once, computes the statistics in registers and
  writes ``y`` once (backward: reads ``x``, ``dy`` once, writes ``dx`` once).
- **split** — each tile writes its partials ``(n, mean, m2)`` (backward: ``(Σg, Σg·x̂)``) into a
  ``(K, C)`` buffer; a merge kernel combines them with the formula of
  :func:`batchnorm.stats.merge_many` in a fixed order (no synchronization) and an elementwise
  kernel applies the result.

The math is that of :mod:`batchnorm.stats` and :mod:`batchnorm.kernels.base`::

    tile partials:  n = #valid, δ_k = Σ(x - K)/n, m2 = Σ((x - K) - δ_k)²
                    (K: the channel's first sample, the same for every tile of the channel)
    merge:          δ = Σ n_k·δ_k / n, m2 = Σ m2_k + Σ n_k·(δ_k - δ)², mean = K + δ
    finalize:       var = m2/n, rstd = 1/sqrt(var + eps), scale = γ·rstd
    forward:        y = act(((x - K) - δ)·scale + β [+ residual])  (training, as
                    stats.centered_partials: exact to one rounding when |mean| ≫ std)
                    y = act((x - mean)·scale + β [+ residual])     (eval, apply)
    backward:       g = dy·act'(pre), x̂ = (x - mean)·rstd, Σg, Σg·x̂,
                    dx = scale·(g - Σg/n - x̂·Σg·x̂/n) (training), dx = scale·g (eval), dres = g

Accumulation is float32 for float32/float16/bfloat16 input; float64 input is left to the
reference backend (``supports`` returns False). No float atomics and no autotuning: block sizes
are a function of the shape alone, so a given input gives bitwise the same result on every
run. Nothing here synchronizes with the host (CUDA-graph safe), and no kernel has a side
effect beyond its outputs (the running statistics are updated by a separate op).

This module is the host side (tiling plans and the :class:`TritonBackend`); the kernels are in
:mod:`._forward` and :mod:`._backward`, their device helpers in :mod:`._tiles` and
:mod:`._activations`, the memory mode's kernels in :mod:`._saved_output`.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from batchnorm import activations as A
from batchnorm import stats as S
from batchnorm.kernels.base import Backend

from ._backward import (
    _bwd_apply_kernel,
    _bwd_persistent_kernel,
    _bwd_reduce_kernel,
    _bwd_sum_kernel,
)
from ._forward import _apply_kernel, _fwd_persistent_kernel, _merge_kernel, _partials_kernel

__all__ = ["TritonBackend", "BACKEND"]

_ACT = A.CODES  # name -> the integer code the kernels specialise on (the one activation table)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreted() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (decided at decoration)."""
    return not isinstance(_apply_kernel, triton.runtime.jit.JITFunction)


# A tile row should hold at least this many contiguous elements (channels-last: BLOCK_C
# channels; channels-first with a small S: several channels of S each) for coalesced access.
_ROW = 32


class _Plan:
    """How a canonical tensor is cut into tiles: block sizes, 1-D grid, chunks per channel."""

    __slots__ = ("R", "C", "S", "stride_r", "stride_c", "blocks", "grid", "K", "num_warps")

    def __init__(self, x: Tensor, block_r: int, block_c: int, block_s: int) -> None:
        self.R, self.C, self.S = _rcs(x)
        self.stride_r, self.stride_c = self.C * self.S, self.S
        self.K = triton.cdiv(self.R, block_r) * triton.cdiv(self.S, block_s)
        self.grid = (triton.cdiv(self.C, block_c) * self.K,)
        tile = block_r * block_c * block_s
        self.num_warps = 4 if tile <= 2048 else 8 if tile <= 8192 else 16
        self.blocks = {
            "BLOCK_R": block_r, "BLOCK_C": block_c, "BLOCK_S": block_s,
            "INT64": x.numel() >= 2**31,
        }

    def dims(self) -> tuple[int, int, int, int, int]:
        return self.R, self.C, self.S, self.stride_r, self.stride_c

    @property
    def n(self) -> float:
        """Elements per channel (a float: kernels divide by it in float32, as stats.py does)."""
        return float(self.R * self.S)


def _rcs(x: Tensor) -> tuple[int, int, int]:
    """``(R, C, S)`` of a canonical tensor; channels-last ``(M, C)`` is ``(M, C, 1)``."""
    if x.dim() == 3:
        return x.shape[0], x.shape[1], x.shape[2]
    return x.shape[0], x.shape[1], 1


def _pow2_at_most(v: int) -> int:
    return 1 << (max(v, 1).bit_length() - 1)


class TritonBackend(Backend):
    """Fused Triton kernels; see the module docstring for the two strategies.

    Args:
        persistent_max: largest padded slab tile ``BLOCK_R·BLOCK_C·BLOCK_S`` (elements) that
            one program holds on chip; larger slabs take the split strategy. 0 forces split.
        tile: target elements per tile of the split and elementwise kernels (a power of two).
    """

    name = "triton"

    def __init__(self, persistent_max: int | None = None, tile: int | None = None) -> None:
        interp = _interpreted()
        # On a GPU a tile of 8192 fp32 values is 32 per thread at 8 warps (backward holds x,
        # dy and g: still inside the register file). The interpreter runs each program as
        # numpy calls, so there fewer, larger programs are faster.
        self.persistent_max = (1 << 16 if interp else 8192) if persistent_max is None \
            else persistent_max
        self.tile = (1 << 14 if interp else 4096) if tile is None else tile

    # -- capability ---------------------------------------------------------------------------
    def available(self) -> bool:
        return _interpreted() or torch.cuda.is_available()

    def supports(self, x: Tensor) -> bool:
        if x.dtype not in _DTYPES or x.dim() not in (2, 3) or not x.is_contiguous():
            return False
        if x.device.type == "cuda":
            return True
        return x.device.type == "cpu" and _interpreted()

    # -- launching ------------------------------------------------------------------------------
    def _launch(self, kernel):
        """What a launch indexes with its grid: ``self._launch(kernel)[grid](...)``.

        The kernel itself here. The ``torch.library.triton_op`` wrappers
        (:mod:`batchnorm.ops.triton_op`) run a subclass that returns
        ``torch.library.wrap_triton(kernel)`` so that ``torch.compile`` sees every launch."""
        return kernel

    # -- plans ----------------------------------------------------------------------------------
    def _persistent(self, x: Tensor) -> _Plan | None:
        """One program per channel block holding the whole slab, or None if it does not fit."""
        r, c, s = _rcs(x)
        br, bs = triton.next_power_of_2(r), triton.next_power_of_2(s)
        if br * bs > self.persistent_max:
            return None
        bc = min(triton.next_power_of_2(c), max(1, _ROW // bs),
                 _pow2_at_most(self.persistent_max // (br * bs)))
        return _Plan(x, br, bc, bs)

    def _split(self, x: Tensor) -> _Plan:
        r, c, s = _rcs(x)
        tile = max(self.tile, 1)
        bs = min(triton.next_power_of_2(s), _pow2_at_most(tile))
        bc = min(triton.next_power_of_2(c), max(1, _ROW // bs))
        br = min(triton.next_power_of_2(r), max(1, _pow2_at_most(tile // (bs * bc))))
        return _Plan(x, br, bc, bs)

    def _reduction(self, k: int, c: int) -> tuple[tuple[int], dict[str, int], int]:
        """Grid and blocks of the kernels that reduce (K, C) partials to (C,)."""
        bc = min(triton.next_power_of_2(c), _ROW)
        bk = min(triton.next_power_of_2(k), max(1, _pow2_at_most(max(self.tile, 1) // bc)))
        return (triton.cdiv(c, bc),), {"BLOCK_K": bk, "BLOCK_C": bc}, 4

    def _partials(self, x: Tensor, plan: _Plan, shifted: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(K, C) tile partials; ``shifted``: means of ``x - K`` (δ_k), else of ``x``."""
        n, mean, m2 = (x.new_empty((plan.K, plan.C), dtype=torch.float32) for _ in range(3))
        self._launch(_partials_kernel)[plan.grid](
            x, n, mean, m2, *plan.dims(), SHIFTED=shifted, **plan.blocks,
            num_warps=plan.num_warps,
        )
        return n, mean, m2

    # -- primitives -----------------------------------------------------------------------------
    def stats(self, x: Tensor) -> S.Partials:
        plan = self._persistent(x) or self._split(x)
        return S.merge_many(S.Partials(*self._partials(x, plan, False)))

    def apply(self, x, mean, scale, shift, residual, act, slope, out=None):
        return self._apply(x, mean, scale.contiguous(), None, None, shift, residual, act, slope,
                           out=out)

    def _apply(self, x, mean, scale, rstd, weight, bias, residual, act, slope,
               shifted: bool = False, out: Tensor | None = None) -> Tensor:
        """y = act((x - mean)·scale + β + r); ``scale`` given, or γ·rstd computed in-kernel.
        ``shifted``: ``mean`` is δ and ``x - mean`` is computed as ``(x - K) - δ``. ``out``:
        where ``y`` goes (``x`` itself for the in-place forward: each program loads its tile
        before it stores it, and the tiles are disjoint)."""
        plan = self._split(x)
        y = torch.empty_like(x) if out is None else out
        self._launch(_apply_kernel)[plan.grid](
            x, mean.contiguous(), scale, _opt(rstd), _opt(weight), _opt(bias), _opt(residual),
            y, *plan.dims(), float(slope), HAS_SCALE=scale is not None,
            HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=residual is not None,
            ACT=_ACT[act], SHIFTED=shifted, **plan.blocks, num_warps=plan.num_warps,
        )
        return y

    def _reduce_sums(self, grad_y, x, mean, rstd, scale, weight, bias, residual, act, slope,
                     need_scale: bool, dweight: Tensor | None, dbias: Tensor | None,
                     ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per-tile (Σg, Σg·x̂), then their fixed-order sums (and γ·rstd, dγ, dβ if asked)."""
        plan = self._persistent(x) or self._split(x)
        pg, pgx = (x.new_empty((plan.K, plan.C), dtype=torch.float32) for _ in range(2))
        self._launch(_bwd_reduce_kernel)[plan.grid](
            x, grad_y, mean.contiguous(), rstd.contiguous(), scale, _opt(weight), _opt(bias),
            _opt(residual), pg, pgx, *plan.dims(), float(slope), HAS_SCALE=scale is not None,
            HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=residual is not None,
            ACT=_ACT[act], **plan.blocks, num_warps=plan.num_warps,
        )
        sum_g, sum_gx = (x.new_empty((plan.C,), dtype=torch.float32) for _ in range(2))
        new_scale = x.new_empty((plan.C,), dtype=torch.float32) if need_scale else None
        grid, blocks, warps = self._reduction(plan.K, plan.C)
        self._launch(_bwd_sum_kernel)[grid](
            pg, pgx, rstd.contiguous(), _opt(weight), sum_g, sum_gx, new_scale, dweight, dbias,
            plan.K, plan.C, HAS_W=weight is not None, NEED_SCALE=need_scale,
            NEED_DW=dweight is not None, NEED_DB=dbias is not None, **blocks, num_warps=warps,
        )
        return sum_g, sum_gx, new_scale

    def backward_reduce(self, grad_y, x, mean, rstd, scale, shift, residual, act, slope):
        sum_g, sum_gx, _ = self._reduce_sums(
            grad_y.contiguous(), x, mean, rstd, scale.contiguous(), None, shift, residual, act,
            slope, False, None, None)
        return sum_g, sum_gx

    def backward_apply(self, grad_y, x, mean, rstd, scale, shift, residual, act, slope,
                       a, b, need_dx, need_dres):
        return self._backward_apply(grad_y.contiguous(), x, mean, rstd, scale.contiguous(),
                                    shift, residual, act, slope, a, b, 1.0, need_dx, need_dres)

    def _backward_apply(self, grad_y, x, mean, rstd, scale, bias, residual, act, slope,
                        a, b, n_div, need_dx, need_dres):
        plan = self._split(x)
        dx = torch.empty_like(x) if need_dx else None
        dres = torch.empty_like(grad_y) if need_dres else None
        training = a is not None and b is not None
        self._launch(_bwd_apply_kernel)[plan.grid](
            x, grad_y, mean.contiguous(), rstd.contiguous(), scale, _opt(bias),
            _opt(residual), _opt(a), _opt(b), dx, dres, *plan.dims(), float(n_div),
            float(slope), HAS_B=bias is not None, HAS_RES=residual is not None,
            ACT=_ACT[act], TRAINING=training, NEED_X=training or act != "none",
            NEED_DX=need_dx, NEED_DRES=need_dres, **plan.blocks, num_warps=plan.num_warps,
        )
        return dx, dres

    # -- fused paths ----------------------------------------------------------------------------
    def forward_train(self, x, weight, bias, residual, eps, act, slope, running=None):
        acc = S.accumulation_dtype(x.dtype)
        plan = self._persistent(x)
        if plan is None:  # split: tile partials -> merge + finalize -> apply (3 launches)
            plan = self._split(x)
            # The partials and the apply shift by K = x[0, c, 0], the merge yields δ and
            # mean = K + δ, and the apply normalizes (x - K) - δ (stats.centered_partials).
            n, pdelta, pm2 = self._partials(x, plan, True)
            mean, delta, rstd, var, scale = (x.new_empty((plan.C,), dtype=acc) for _ in range(5))
            grid, blocks, warps = self._reduction(plan.K, plan.C)
            self._launch(_merge_kernel)[grid](
                n, pdelta, pm2, _opt(weight), x, mean, delta, rstd, var, scale, plan.K,
                plan.C, plan.stride_c, float(eps), HAS_W=weight is not None, SHIFTED=True,
                **blocks, INT64=plan.blocks["INT64"], num_warps=warps,
            )
            y = self._apply(x, delta, scale, None, None, bias, residual, act, slope, True)
            return y, mean, rstd, var
        y = torch.empty_like(x)
        mean, rstd, var = (x.new_empty((plan.C,), dtype=acc) for _ in range(3))
        self._launch(_fwd_persistent_kernel)[plan.grid](
            x, _opt(weight), _opt(bias), _opt(residual), y, mean, rstd, var, *plan.dims(),
            plan.n, float(eps), float(slope), HAS_W=weight is not None,
            HAS_B=bias is not None, HAS_RES=residual is not None, ACT=_ACT[act],
            **plan.blocks, num_warps=plan.num_warps,
        )
        return y, mean, rstd, var

    def forward_eval(self, x, weight, bias, residual, mean, rstd, act, slope):
        return self._apply(x, mean, None, rstd, weight, bias, residual, act, slope)

    def backward(self, grad_y, x, weight, bias, residual, mean, rstd, training, act, slope,
                 need_dx, need_dweight, need_dbias, need_dres, allreduce=None):
        if allreduce is not None:  # the sums leave the process between the two passes
            return super().backward(grad_y, x, weight, bias, residual, mean, rstd, training, act,
                                    slope, need_dx, need_dweight, need_dbias, need_dres,
                                    allreduce)
        grad_y = grad_y.contiguous()
        dweight = torch.empty_like(weight) if need_dweight and weight is not None else None
        dbias = torch.empty_like(bias) if need_dbias and bias is not None else None
        plan = self._persistent(x)
        if plan is not None:  # one launch
            dx = torch.empty_like(x) if need_dx else None
            dres = torch.empty_like(grad_y) if need_dres else None
            self._launch(_bwd_persistent_kernel)[plan.grid](
                x, grad_y, mean.contiguous(), rstd.contiguous(), _opt(weight), _opt(bias),
                _opt(residual), dx, dres, dweight, dbias, *plan.dims(), plan.n, float(slope),
                HAS_W=weight is not None, HAS_B=bias is not None,
                HAS_RES=residual is not None, ACT=_ACT[act], TRAINING=bool(training),
                NEED_DX=need_dx, NEED_DRES=need_dres, NEED_DW=dweight is not None,
                NEED_DB=dbias is not None, **plan.blocks, num_warps=plan.num_warps,
            )
            return dx, dweight, dbias, dres
        # split: tile sums -> fixed-order sums (+ γ·rstd, dγ, dβ) -> elementwise dx, dres
        a = b = None
        if training and need_dx or dweight is not None or dbias is not None:
            a, b, scale = self._reduce_sums(grad_y, x, mean, rstd, None, weight, bias,
                                            residual, act, slope, True, dweight, dbias)
        else:
            scale = S.scale_of(rstd, weight).contiguous()
        dx = dres = None
        if need_dx or need_dres:
            n = float(x.numel() // x.shape[1])
            dx, dres = self._backward_apply(
                grad_y, x, mean, rstd, scale, bias, residual, act, slope,
                a if training else None, b if training else None, n, need_dx, need_dres)
        return dx, dweight, dbias, dres

    def backward_from_output(self, grad_y, y, weight, bias, residual, rstd, training, act, slope,
                             need_dx, need_dweight, need_dbias, need_dres):
        from ._saved_output import backward_from_output  # the memory mode's kernels
        return backward_from_output(self, grad_y, y, weight, bias, residual, rstd, training, act,
                                    slope, need_dx, need_dweight, need_dbias, need_dres)


def _opt(t: Tensor | None) -> Tensor | None:
    """An optional kernel argument: contiguous, or None (the kernel's flag keeps it unread)."""
    return None if t is None else t.contiguous()


BACKEND = TritonBackend()
