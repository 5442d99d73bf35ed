r"""Ghost batch normalization (Hoffer, Hubara & Soudry, 2017, "Train longer, generalize better"):
BN statistics per *virtual* batch of ``virtual_batch_size`` samples inside a large batch, which
keeps the regularizing noise of small-batch BN while the hardware runs large batches.

.. math::
    y_i = \gamma\,\frac{x_i - \mu_{B(i)}}{\sqrt{\sigma^2_{B(i)} + \epsilon}} + \beta

where ``B(i)`` is the virtual batch of sample ``i``: consecutive slices of ``virtual_batch_size``
samples along dimension 0; when ``N`` does not divide evenly, the last virtual batch also takes
the remainder (so it has between ``v`` and ``2v - 1`` samples, never a lone sample).

Implementation: ``k`` virtual batches of equal size ``v`` are regrouped (one copy) from
``(k·v, C, *)`` to ``(v, k·C, S)``, so that *one* call of the package's BN op, with ``γ`` and
``β`` repeated ``k`` times, normalizes every (virtual batch, channel) pair with its own
statistics — kernels and backward of the active backend, no loop over virtual batches. The op
returns the per-(virtual batch, channel) mean and variance; they are merged with
:func:`batchnorm.stats.merge_many` into the statistics of the whole batch, which update the
running statistics once per step (so the running statistics and ``num_batches_tracked`` are
exactly those plain BN would have on the same batches).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import ops
from .. import stats as S
from ..activations import ActivationSpec, parse_activation
from ..functional import check_arguments
from ._common import check_int, update_from_batch
from .batchnorm import _BatchNormBase

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]


class _GhostBatchNorm(_BatchNormBase):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        virtual_batch_size: int = 32,
        bias: bool = True,
        activation: ActivationSpec = None,
    ) -> None:
        v = check_int("virtual_batch_size", virtual_batch_size, minimum=1)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, activation=activation)
        self.virtual_batch_size = v

    def _extra_config(self) -> dict[str, Any]:
        return {**super()._extra_config(), "virtual_batch_size": self.virtual_batch_size}

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        self._check_input_dim(input)
        n, v = input.shape[0], self.virtual_batch_size
        ghosts = max(1, n // v)
        if not self.training or ghosts == 1:
            # Eval: the running statistics (never ghost batches). One virtual batch: plain BN.
            return super().forward(input, residual)
        track = self.track_running_stats
        check_arguments(input, self.running_mean if track else None,
                        self.running_var if track else None, self.weight, self.bias, True,
                        self.momentum, self.eps, residual, self.num_batches_tracked)
        spatial = math.prod(input.shape[2:])
        if v * spatial == 1:
            raise ValueError(
                f"virtual_batch_size: a virtual batch of {v} sample(s) of input shape "
                f"{tuple(input.shape)} has 1 value per channel, which cannot be normalized; "
                "use virtual_batch_size >= 2"
            )
        # Equal-sized virtual batches go through one op call; a remainder joins the last one.
        even = ghosts if n == ghosts * v else ghosts - 1
        parts: list[Tensor] = []
        partials: list[S.Partials] = []
        cut = even * v
        if even:
            y, p = self._grouped(input[:cut], even, None if residual is None else residual[:cut])
            parts.append(y)
            partials.append(p)
        if cut < n:
            y, p = self._grouped(input[cut:], 1, None if residual is None else residual[cut:])
            parts.append(y)
            partials.append(p)
        out = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        if track:
            merged = S.merge_many(S.Partials(
                torch.cat([p.n for p in partials]),
                torch.cat([p.mean for p in partials]),
                torch.cat([p.m2 for p in partials]),
            ))
            mean, var, _ = S.finalize(merged, self.eps)
            update_from_batch(self, mean, S.unbiased_var(var, n * spatial))
        return out

    def _grouped(self, x: Tensor, k: int, residual: Tensor | None) -> tuple[Tensor, S.Partials]:
        """Normalize ``k`` equal virtual batches of ``x`` (``(k·v, C, *)``) in one op call.

        Returns the output in ``x``'s shape and the ``k`` per-channel partials ``(k, C)``.
        """
        shape = x.shape
        c, v = shape[1], shape[0] // k
        s = math.prod(shape[2:])

        def regroup(t: Tensor) -> Tensor:  # (k·v, C, *) -> (v, k·C, S)
            return t.reshape(k, v, c, s).transpose(0, 1).reshape(v, k * c, s)

        weight = None if self.weight is None else self.weight.repeat(k)
        bias = None if self.bias is None else self.bias.repeat(k)
        act, slope = parse_activation(self.activation)
        rg = None if residual is None else regroup(residual)
        y, mean, _rstd, var = ops.forward(regroup(x), weight, bias, rg, None, None, True,
                                          float(self.eps), act, slope)
        y = y.reshape(v, k, c, s).transpose(0, 1).reshape(shape)
        count = torch.full((k,), float(v * s), dtype=mean.dtype, device=mean.device)
        mean, var = mean.view(k, c), var.view(k, c)
        return y, S.Partials(count, mean, var * (v * s))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


_DOC = r"""Ghost batch normalization over a {rank} input (Hoffer, Hubara & Soudry, 2017, "Train
    longer, generalize better: closing the generalization gap in large batch training").

    .. math::
        y_i = \gamma\,\frac{{x_i - \mu_{{B(i)}}}}{{\sqrt{{\sigma^2_{{B(i)}} + \epsilon}}}} + \beta

    In training, mean and (biased) variance ``μ_B, σ²_B`` are per channel over the *virtual
    batch* ``B(i)`` of sample ``i``: consecutive slices of ``virtual_batch_size`` samples along
    dimension 0 (and all spatial positions). When the batch does not divide evenly the last
    virtual batch also takes the remainder; a batch of at most ``virtual_batch_size`` samples
    is one virtual batch, i.e. plain BN. The running statistics are updated once per step from
    the statistics of the *whole* batch (the merge of the virtual batches'), exactly as BN's
    would be; eval mode normalizes with them, never with ghost batches (without running
    statistics it uses the whole batch's, like BN).

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias,
            activation: as for :class:`batchnorm.{bn}`.
        virtual_batch_size: samples per virtual batch ``v`` (the paper used 128 within batches
            of up to 4096). Default: 32

    Shape:
        - Input: {shape}; output: the same shape (contiguous in training).

    Examples::

        >>> m = batchnorm.{name}({c}, virtual_batch_size=32)
        >>> y = m(torch.randn({example}))
"""


class GhostBatchNorm1d(_GhostBatchNorm, torch.nn.BatchNorm1d):
    __doc__ = _DOC.format(rank="2D or 3D", shape="``(N, C)`` or ``(N, C, L)``",
                          name="GhostBatchNorm1d", bn="BatchNorm1d", c="16", example="256, 16")
    _dims = (2, 3)
    _shape_doc = "(N, C) or (N, C, L)"


class GhostBatchNorm2d(_GhostBatchNorm, torch.nn.BatchNorm2d):
    __doc__ = _DOC.format(rank="4D", shape="``(N, C, H, W)``", name="GhostBatchNorm2d",
                          bn="BatchNorm2d", c="16", example="256, 16, 8, 8")
    _dims = (4,)
    _shape_doc = "(N, C, H, W)"


class GhostBatchNorm3d(_GhostBatchNorm, torch.nn.BatchNorm3d):
    __doc__ = _DOC.format(rank="5D", shape="``(N, C, D, H, W)``", name="GhostBatchNorm3d",
                          bn="BatchNorm3d", c="16", example="256, 16, 4, 8, 8")
    _dims = (5,)
    _shape_doc = "(N, C, D, H, W)"
