"""Noisy batch normalization: BN followed by noise whose distribution changes every step.

Santurkar et al. 2018 ("How Does Batch Normalization Help Optimization?") test whether BN
helps by reducing internal covariate shift: they perturb each activation of each sample after BN
with i.i.d. noise drawn from a distribution of non-zero mean and non-unit variance that changes at
every training step, so that every unit's input distribution keeps moving. Here, at each training
forward, every unit ``j`` draws a mean ``m_j ~ U(-mean_range, mean_range)`` and a standard
deviation ``s_j ~ U(0, std_range)``, and every activation becomes ``y_ij + m_j + s_j · e_ij`` with
``e_ij ~ N(0, 1)``. The noise has its own generator (the model's seed), so a noisy run draws the
same minibatches and initial weights as the plain BN run of that seed. In eval mode the layer is
plain BN.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["NoisyBatchNorm1d", "add_noise_after_bn"]


class NoisyBatchNorm1d(nn.Module):
    """``bn`` (any batch-norm module on ``(N, C)``) plus per-step noise in training mode."""

    def __init__(self, bn: nn.Module, mean_range: float, std_range: float, seed: int) -> None:
        super().__init__()
        for name, v in (("mean_range", mean_range), ("std_range", std_range)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0:
                raise ValueError(f"{name}: expected a number >= 0, got {v!r}")
        self.bn = bn
        self.mean_range = float(mean_range)
        self.std_range = float(std_range)
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.bn(x)
        if not self.training:
            return y
        c = y.shape[1]
        g = self.generator
        mean = (torch.rand(c, generator=g) * 2 - 1) * self.mean_range
        std = torch.rand(c, generator=g) * self.std_range
        noise = torch.randn(y.shape, generator=g) * std + mean
        return y + noise.to(dtype=y.dtype, device=y.device)

    def extra_repr(self) -> str:
        return f"mean_range={self.mean_range}, std_range={self.std_range}"


def add_noise_after_bn(model: nn.Sequential, mean_range: float, std_range: float,
                       seed: int) -> nn.Sequential:
    """Wrap every ``BatchNorm1d`` child of ``model`` in :class:`NoisyBatchNorm1d` (in place).

    Each layer gets its own generator (``seed`` plus its position) so layers draw different noise.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model: expected an nn.Sequential, got {type(model).__name__}")
    wrapped = 0
    for i, m in enumerate(model):
        if isinstance(m, nn.BatchNorm1d):
            model[i] = NoisyBatchNorm1d(m, mean_range, std_range, seed * 1000 + i)
            wrapped += 1
    if not wrapped:
        raise ValueError("model: has no BatchNorm1d child to add noise after")
    return model
