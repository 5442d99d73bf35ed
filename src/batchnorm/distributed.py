"""Batch statistics over a batch split across processes (``torch.distributed``).

The statistics math is not here: each rank computes its partials with the active backend
(:func:`batchnorm.kernels.select`), the partials of all ranks are gathered, and
:func:`batchnorm.stats.merge_many` merges them. Per layer per training step:

- forward, one header all-gather: ``(C, dtype code, local count, argument-check status)`` as 4
  int64 per rank. Every rank sees every header, so a channel-count or dtype mismatch, or a rank
  whose arguments were rejected, becomes the same error on every rank instead of a collective on
  tensors of different sizes (which Gloo answers with garbage on one rank and an abort on the
  other, measured) or a hang;
- forward, one all-gather of the packed partials ``[n, mean (C), m2 (C)]``: ``2C + 1`` values per
  rank in the accumulation dtype (float32, or float64 for float64 input);
- backward, one all-reduce (sum) of ``[Σg, Σg·x̂]``: ``2C`` values, only when ``x`` needs a
  gradient. ``dγ`` and ``dβ`` stay local (the sums before the all-reduce): they are gradients of
  this rank's loss, which ``DistributedDataParallel`` then reduces like any other parameter.

Ranks with an empty batch take part in every collective with ``n = 0``, a neutral partial.
The backward is once-differentiable (no double backward through the collective).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import stats as S
from ._errors import BatchNormValueError
from .activations import ActivationSpec, parse_activation
from .functional import check_arguments
from .kernels import select
from .layout import Layout, canonicalize
from .running import update_running_statistics

__all__ = ["is_distributed", "sync_batch_norm"]

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
_CODE_NAMES = {code: str(dtype) for dtype, code in _DTYPE_CODES.items()}


def is_distributed(process_group: Any = None) -> bool:
    """Whether a collective over ``process_group`` (default: the world) has more than one rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return bool(dist.get_world_size(process_group) > 1)


def sync_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
    *,
    activation: ActivationSpec = None,
    residual: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
    num_batches_skipped: Tensor | None = None,
    layer_name: str | None = None,
    process_group: Any = None,
    extra_check: Callable[[], None] | None = None,
) -> Tensor:
    """Training-mode batch normalization with statistics over every rank of ``process_group``.

    The same arguments and running-statistics policy as
    :func:`batchnorm.functional.batch_norm_impl` with ``training=True``; every rank of the group
    must call it (collectively), with the same channel count and dtype. Running statistics are
    updated with the global mean and the global unbiased variance, so they are identical on
    every rank. Any argument error, on any rank, is raised on every rank (``extra_check``, a
    caller's own check such as a module's channel count, is run as one of them).
    """
    act, slope = parse_activation(activation)
    group = process_group if process_group is not None else dist.group.WORLD
    local_error: Exception | None = None
    try:
        if extra_check is not None:
            extra_check()
        # one value per channel is allowed locally: the rule is the global count's, checked
        # after the header exchange
        check_arguments(input, running_mean, running_var, weight, bias, True, momentum, eps,
                        residual, num_batches_tracked, local_count=False)
    except (TypeError, ValueError, RuntimeError) as error:
        local_error = error
    headers = _exchange_headers(input, local_error is not None, group)
    if local_error is not None:
        raise local_error
    _check_headers(headers, dist.get_rank(group))
    total = int(headers[:, 2].sum())
    if total == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got 1 value per channel "
            f"over all {headers.shape[0]} ranks (local input size {tuple(input.shape)})"
        )

    x, layout = canonicalize(input)
    r = None if residual is None else layout.canonical(residual)
    with torch.no_grad():
        local = select(x).stats(x)
        merged = _gather_and_merge(local, group)
        mean, var, rstd = S.finalize(merged, eps)
    y = _SyncNorm.apply(x, weight, bias, r, mean, rstd, float(total), act, slope, group, layout)

    update = running_mean is not None and running_var is not None
    if update:
        assert running_mean is not None and running_var is not None
        update_running_statistics(
            running_mean, running_var, mean, S.unbiased_var(var, total), momentum,
            count=total, num_batches_tracked=num_batches_tracked,
            num_batches_skipped=num_batches_skipped, layer_name=layer_name,
        )
    return y


def _exchange_headers(input: object, failed: bool, group: Any) -> Tensor:
    """All-gather ``(C, dtype code, local count, failed)`` of every rank: ``(world, 4)`` int64."""
    world = dist.get_world_size(group)
    device = _collective_device(input, group)
    if failed or not isinstance(input, Tensor) or input.dim() < 2:
        mine = [-1, -1, 0, 1]
    else:
        c = input.shape[1]
        mine = [c, _DTYPE_CODES.get(input.dtype, -1), input.numel() // c if c else 0, 0]
    header = torch.tensor(mine, dtype=torch.int64, device=device)
    out = torch.empty(world * 4, dtype=torch.int64, device=device)
    _all_gather_single(out, header, group)
    return out.view(world, 4).cpu()


def _check_headers(headers: Tensor, rank: int) -> None:
    failed = [i for i, row in enumerate(headers.tolist()) if row[3]]
    if failed:
        raise BatchNormValueError(
            f"sync_batch_norm: rank(s) {failed} rejected their arguments (the error is raised "
            f"there); rank {rank} stops too so that no rank waits in a collective"
        )
    channels = headers[:, 0].tolist()
    if len(set(channels)) > 1:
        raise BatchNormValueError(
            f"input: expected the same number of channels on every rank, got {channels} "
            f"(rank i has channels[i]; this is rank {rank})"
        )
    codes = headers[:, 1].tolist()
    if len(set(codes)) > 1:
        names = [_CODE_NAMES.get(c, "?") for c in codes]
        raise BatchNormValueError(
            f"input: expected the same dtype on every rank, got {names} (this is rank {rank})"
        )


def _all_gather_single(out: Tensor, t: Tensor, group: Any) -> None:
    # ``all_gather_single`` is the newer name (torch 2.13 deprecates ``all_gather_into_tensor``)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t, group=group)


def _collective_device(t: object, group: Any) -> torch.device:
    """Gloo takes CPU tensors; NCCL (and other device backends) take the input's device."""
    if isinstance(t, Tensor) and t.device.type != "cpu" \
            and dist.get_backend(group) != dist.Backend.GLOO:
        return t.device
    return torch.device("cpu")


def _gather_and_merge(local: S.Partials, group: Any) -> S.Partials:
    """All-gather the packed ``[n, mean, m2]`` of every rank and merge them (rank order)."""
    world = dist.get_world_size(group)
    c = local.mean.numel()
    # A backend may give the count per channel (``(C,)``) or once (``()``); in batch norm it is
    # the same for every channel, so one value travels.
    n = local.n.reshape(-1)[:1].to(local.mean.dtype)
    packed = torch.cat([n, local.mean, local.m2])
    device = _collective_device(packed, group)
    out = torch.empty(world * (2 * c + 1), dtype=packed.dtype, device=device)
    _all_gather_single(out, packed.to(device), group)
    rows = out.view(world, 2 * c + 1).to(packed.device)
    return S.merge_many(S.Partials(rows[:, 0], rows[:, 1:c + 1], rows[:, c + 1:]))


class _SyncNorm(torch.autograd.Function):
    """``y = act((x - mean)·γ·rstd + β [+ r])`` with global statistics; backward all-reduces."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                residual: Tensor | None, mean: Tensor, rstd: Tensor, total: float, act: str,
                slope: float, group: Any, layout: Layout) -> Tensor:
        scale = S.scale_of(rstd, weight)
        shift = None if bias is None else bias.to(mean.dtype)
        y = select(x).apply(x, mean, scale, shift, residual, act, slope)
        keep_residual = residual if act != "none" else None
        ctx.save_for_backward(x, weight, bias, keep_residual, mean, rstd)
        ctx.total, ctx.act, ctx.slope, ctx.group = total, act, slope, group
        ctx.has_residual = residual is not None
        ctx.layout = layout
        return layout.restore(y)  # the user's shape, not a view (see batchnorm.layout)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, residual, mean, rstd = ctx.saved_tensors
        need_dx, need_dw, need_db, need_dr = ctx.needs_input_grad[:4]
        grad_y = ctx.layout.canonical(grad_y)
        group, total = ctx.group, ctx.total

        def allreduce(sum_g: Tensor, sum_gx: Tensor) -> tuple[Tensor, Tensor, float]:
            c = sum_g.numel()
            packed = torch.cat([sum_g, sum_gx])
            reduced = packed.to(_collective_device(packed, group), copy=True)
            dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
            reduced = reduced.to(packed.device)
            return reduced[:c], reduced[c:], total

        dx, dw, db, dres = select(x).backward(
            grad_y, x, weight, bias, residual, mean, rstd, True, ctx.act, ctx.slope,
            bool(need_dx), bool(need_dw), bool(need_db), bool(need_dr), allreduce)
        if dres is not None and dres.data_ptr() == grad_y.data_ptr() and dres.numel():
            dres = dres.clone()
        return dx, dw, db, dres, None, None, None, None, None, None, None
