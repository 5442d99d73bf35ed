"""The one statement of batch-normalization statistics.

Every backend, the distributed path and every variant use these functions; no other module
merges or finalizes statistics.

Per channel a *partial* is ``(count n, mean m, m2 = Σ (x - m)²)``. We never accumulate raw
``Σx²``: with ``|mean| ≫ std`` it cancels catastrophically.

Merge (Chan et al. 1979), written for K partials at once so that the reduction order is fixed
by the shape alone (deterministic)::

    n  = Σ n_k
    m  = Σ n_k m_k / n
    m2 = Σ m2_k + Σ n_k (m_k - m)²

The second sum is the pairwise ``d²·na·nb/n`` term of the two-partial form generalised to K
partials; it is exact in real arithmetic and well conditioned because ``m_k - m`` is small.

Finalize::

    var  = m2 / n              (used to normalize)
    var_unbiased = m2 / (n-1)  (running variance, as PyTorch does)
    rstd = 1 / sqrt(var + eps)
    scale = γ·rstd; the output is ``(x - m)·scale + β``.

Accumulation is float32 for half types and float32 input, float64 for float64 input.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Partials",
    "accumulation_dtype",
    "channel_partials",
    "centered_partials",
    "differentiable_moments",
    "merge",
    "merge_many",
    "finalize",
    "unbiased_var",
    "rstd_from_var",
    "scale_of",
    "update_running",
    "blend",
]


class Partials(NamedTuple):
    """Per-channel partial statistics. ``n`` (the count) broadcasts against ``mean``, ``m2``."""

    n: Tensor
    mean: Tensor
    m2: Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating type accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def centered_partials(x: Tensor) -> tuple[Partials, Tensor]:
    """Partials of a canonical tensor, and ``x - mean`` computed without cancellation.

    ``x`` is channels-first ``(N, C, S)`` or channels-last ``(M, C)``. The sum is taken of
    ``x - K`` where ``K`` is one sample of the channel (a *shifted* sum): ``x - K`` is exact when
    ``|mean| ≫ std`` (Sterbenz) and of the order of the standard deviation, so
    ``δ = Σ(x - K)/n`` is accurate and ``(x - K) - δ`` is ``x - mean`` to one rounding at the
    scale of the deviation — better than ``x - round(mean)``, whose error is half an ulp of
    ``|mean|``. ``mean = K + δ``; ``m2 = Σ((x - K) - δ)²``. The centered tensor is returned in
    the accumulation dtype, in ``x``'s canonical shape.
    """
    acc = accumulation_dtype(x.dtype)
    dims: tuple[int, ...] = (0, 2) if x.dim() == 3 else (0,)
    c = x.shape[1]
    n = x.numel() // c if c > 0 else 0
    count = torch.tensor(float(n), dtype=acc, device=x.device)
    if n == 0:
        zeros = torch.zeros(c, dtype=acc, device=x.device)
        return Partials(count, zeros, zeros.clone()), x.to(acc)
    xf = x.to(acc)
    shift = xf[0, :, 0] if x.dim() == 3 else xf[0, :]
    shape = (1, c, 1) if x.dim() == 3 else (1, c)
    shifted = xf - shift.view(shape)
    delta = shifted.sum(dims) / n
    centered = shifted - delta.view(shape)
    m2 = centered.square().sum(dims)
    return Partials(count, shift + delta, m2), centered


def differentiable_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (dimension 1) mean and biased variance of ``x`` as plain differentiable ops,
    shaped to broadcast against ``x`` (the double-backward and forward-mode AD paths use it)."""
    dims = (0, *range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    return mean, (x - mean).square().mean(dims, keepdim=True)


def channel_partials(x: Tensor) -> Partials:
    """Per-channel partials ``(n, mean, m2)`` of a canonical tensor (see centered_partials)."""
    return centered_partials(x)[0]


def merge(a: Partials, b: Partials) -> Partials:
    """Merge two partials (Chan et al.). Empty partials (n = 0) are neutral."""
    return merge_many(
        Partials(
            torch.stack(torch.broadcast_tensors(a.n, b.n)),
            torch.stack([a.mean, b.mean]),
            torch.stack([a.m2, b.m2]),
        )
    )


def merge_many(p: Partials) -> Partials:
    """Merge K partials stacked along dimension 0 (``n`` of shape ``(K,)`` or ``(K, C)``)."""
    count = p.n
    if count.dim() < p.mean.dim():
        count = count.reshape(count.shape + (1,) * (p.mean.dim() - count.dim()))
    n = count.sum(0)
    safe_n = torch.where(n > 0, n, torch.ones_like(n))
    mean = (count * p.mean).sum(0) / safe_n
    m2 = p.m2.sum(0) + (count * (p.mean - mean).square()).sum(0)
    mean = torch.where(n > 0, mean, torch.zeros_like(mean))
    return Partials(n.expand_as(mean) if n.dim() else n, mean, m2)


def finalize(p: Partials, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, biased var, rstd)`` of a partial. An empty partial gives var 0."""
    safe_n = torch.where(p.n > 0, p.n, torch.ones_like(p.n))
    var = p.m2 / safe_n
    return p.mean, var, rstd_from_var(var, eps)


def rstd_from_var(var: Tensor, eps: float) -> Tensor:
    return torch.rsqrt(var + eps)


def unbiased_var(var: Tensor, count: int | float | Tensor) -> Tensor:
    """Bessel-corrected variance from the biased one (what PyTorch keeps as running_var)."""
    if isinstance(count, Tensor):
        return var * (count / (count - 1).clamp(min=1))
    return var * bessel(count)


def bessel(count: int | float) -> float:
    """Bessel's factor ``n / (n - 1)`` for ``count`` values (1 and fewer: ``count`` itself)."""
    return count / max(count - 1, 1)


def scale_of(rstd: Tensor, weight: Tensor | None) -> Tensor:
    """``γ·rstd`` in the accumulation dtype (``rstd`` alone without an affine weight)."""
    return rstd if weight is None else weight.to(rstd.dtype) * rstd


def update_running(
    running: Tensor, batch: Tensor, factor: Tensor | float, ok: Tensor
) -> Tensor:
    """``(1 - f)·running + f·batch`` where ``ok``, ``running`` unchanged elsewhere.

    Written as PyTorch writes it (``momentum·batch + (1 - momentum)·running``) so that float32
    running statistics agree with ``torch.nn.BatchNorm`` to the last bits.
    """
    old = running.to(batch.dtype)
    return torch.where(ok, blend(old, batch, factor), old).to(running.dtype)


def blend(running: Any, batch: Any, factor: Any) -> Any:
    """``factor·batch + (1 − factor)·running``, in PyTorch's order of operations (tensors or
    NumPy arrays: the eager CPU path blends C-sized float64 arrays without torch dispatch)."""
    return factor * batch + (1 - factor) * running
