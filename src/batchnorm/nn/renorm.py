r"""Batch Renormalization (Ioffe, 2017): BN whose training output is corrected toward the running
statistics, so the network trains on what it will see at inference.

.. math::
    \hat x = \frac{x - \mu_B}{\sigma_B},\quad
    r = \mathrm{clip}_{[1/r_{max},\, r_{max}]}\Big(\frac{\sigma_B}{\sigma}\Big),\quad
    d = \mathrm{clip}_{[-d_{max},\, d_{max}]}\Big(\frac{\mu_B - \mu}{\sigma}\Big),\quad
    y = \gamma\,(\hat x\, r + d) + \beta

with ``σ_B = sqrt(Var_B + eps)`` and ``σ = sqrt(running_var + eps)``; ``r`` and ``d`` are
constants for the backward (``stop_gradient`` in the paper). Unclipped, ``x̂·r + d`` is exactly
``(x - μ)/σ``: the eval-mode output.

Implementation: because ``r`` and ``d`` are constants, ``γ(x̂ r + d) + β`` is plain BN with
weight ``γ·r`` and bias ``γ·d + β``. The batch statistics are computed once (detached) with
:mod:`batchnorm.stats` to get ``r`` and ``d``; the output, its gradient (through ``x̂``, the
standard BN backward) and the running-statistics update are then the package's own
:func:`batchnorm.functional.batch_norm_impl`, kernels and all.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import stats as S
from ..activations import ActivationSpec
from ..functional import batch_norm_impl, check_arguments
from ..layout import canonicalize
from ._common import check_int, check_real
from .batchnorm import _BatchNormBase

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]


class _BatchRenorm(_BatchNormBase):
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
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = 5000,
        bias: bool = True,
        activation: ActivationSpec = None,
    ) -> None:
        rmax_f = check_real("rmax", rmax, minimum=1.0)
        dmax_f = check_real("dmax", dmax, minimum=0.0)
        steps = check_int("warmup_steps", warmup_steps, minimum=0)
        if track_running_stats is not True:
            raise ValueError(
                "track_running_stats: Batch Renormalization corrects toward the running "
                f"statistics, so it needs them; expected True, got {track_running_stats!r}"
            )
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, activation=activation)
        self.rmax = rmax_f
        self.dmax = dmax_f
        self.warmup_steps = steps

    def _extra_config(self) -> dict[str, Any]:
        return {**super()._extra_config(), "rmax": self.rmax, "dmax": self.dmax,
                "warmup_steps": self.warmup_steps}

    def current_limits(self) -> tuple[Tensor, Tensor]:
        """``(r_max, d_max)`` in force at this step.

        Both ramp linearly with ``num_batches_tracked`` (the finite training batches seen so
        far) from ``(1, 0)`` — plain BN — to ``(rmax, dmax)`` over ``warmup_steps``.
        """
        t = self.num_batches_tracked
        assert t is not None
        acc = S.accumulation_dtype(self.running_mean.dtype)  # type: ignore[union-attr]
        if self.warmup_steps == 0:
            frac = torch.ones((), dtype=acc, device=t.device)
        else:
            frac = (t.to(acc) / self.warmup_steps).clamp(max=1.0)
        return 1.0 + (self.rmax - 1.0) * frac, self.dmax * frac

    def _correction(self, mean_b: Tensor, var_b: Tensor) -> tuple[Tensor, Tensor]:
        """``(r, d)`` per channel from the batch statistics (no gradient flows through them)."""
        assert self.running_mean is not None and self.running_var is not None
        rmax, dmax = self.current_limits()
        rmax, dmax = rmax.to(var_b.dtype), dmax.to(var_b.dtype)
        sigma_b = torch.sqrt(var_b + self.eps)
        sigma = torch.sqrt(self.running_var.to(var_b.dtype) + self.eps)
        r = torch.minimum(torch.maximum(sigma_b / sigma, 1.0 / rmax), rmax)
        d = (mean_b - self.running_mean.to(var_b.dtype)) / sigma
        d = torch.minimum(torch.maximum(d, -dmax), dmax)
        return r, d

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        self._check_input_dim(input)
        if not self.training:
            return super().forward(input, residual)
        # Checks first: nothing below may run on (or change state for) a rejected input.
        check_arguments(input, self.running_mean, self.running_var, self.weight, self.bias,
                        True, self.momentum, self.eps, residual, self.num_batches_tracked)
        with torch.no_grad():
            x, _ = canonicalize(input)
            mean_b, var_b, _ = S.finalize(S.channel_partials(x), self.eps)
            r, d = self._correction(mean_b, var_b)
        # γ(x̂ r + d) + β == x̂·(γ r) + (γ d + β): plain BN with a corrected affine.
        weight = r if self.weight is None else self.weight * r
        shift = d if self.weight is None else self.weight * d
        bias = shift if self.bias is None else shift + self.bias
        return batch_norm_impl(
            input, self.running_mean, self.running_var, weight, bias, True, self.momentum,
            self.eps, activation=self.activation, residual=residual,
            num_batches_tracked=self.num_batches_tracked,
            num_batches_skipped=self.num_batches_skipped, layer_name=self._name(),
        )

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rmax={self.rmax}, dmax={self.dmax}, "
                f"warmup_steps={self.warmup_steps}")


_DOC = r"""Batch Renormalization over a {rank} input (Ioffe, 2017, "Batch Renormalization: Towards
    Reducing Minibatch Dependence in Batch-Normalized Models").

    .. math::
        y = \gamma\,(\hat x\, r + d) + \beta,\quad \hat x = \frac{{x - \mu_B}}{{\sigma_B}},\quad
        r = \mathrm{{clip}}_{{[1/r_{{max}}, r_{{max}}]}}\frac{{\sigma_B}}{{\sigma}},\quad
        d = \mathrm{{clip}}_{{[-d_{{max}}, d_{{max}}]}}\frac{{\mu_B - \mu}}{{\sigma}}

    in training, where ``μ_B, σ_B² = Var_B + eps`` are the batch's statistics, ``μ, σ² =
    running_var + eps`` the running ones, and ``r``, ``d`` are treated as constants in the
    backward. In eval mode it is exactly ``BatchNorm`` with the running statistics. The running
    statistics are updated as BN updates them (momentum, unbiased variance; ``momentum=None`` is
    a cumulative average; a non-finite batch is skipped), so the ``state_dict`` is BN's.

    The limits are relaxed from ``r_max = 1, d_max = 0`` (plain BN, while the running
    statistics are still poor) linearly to ``rmax``/``dmax`` over ``warmup_steps`` training
    batches, counted by ``num_batches_tracked`` (see :meth:`current_limits`). The paper kept
    BN for 5k steps and reached ``rmax = 3`` at 40k and ``dmax = 5`` at 25k steps.
    With ``rmax=1, dmax=0`` the layer is BN.

    Args:
        num_features, eps, momentum, affine, device, dtype, bias, activation: as for
            :class:`batchnorm.{bn}`.
        track_running_stats: must be ``True`` (the correction is toward the running
            statistics). Default: True
        rmax: final upper clip of ``r`` (``>= 1``). Default: 3.0
        dmax: final clip of ``|d|`` (``>= 0``). Default: 5.0
        warmup_steps: batches over which the limits ramp up from ``(1, 0)``; 0 applies them
            from the first step. Default: 5000

    Shape:
        - Input: {shape}; output: the same shape.

    Examples::

        >>> m = batchnorm.{name}({c}, rmax=3.0, dmax=5.0, warmup_steps=1000)
        >>> y = m(torch.randn({example}))
"""


class BatchRenorm1d(_BatchRenorm, torch.nn.BatchNorm1d):
    __doc__ = _DOC.format(rank="2D or 3D", shape="``(N, C)`` or ``(N, C, L)``",
                          name="BatchRenorm1d", bn="BatchNorm1d", c="16", example="4, 16")
    _dims = (2, 3)
    _shape_doc = "(N, C) or (N, C, L)"


class BatchRenorm2d(_BatchRenorm, torch.nn.BatchNorm2d):
    __doc__ = _DOC.format(rank="4D", shape="``(N, C, H, W)``", name="BatchRenorm2d",
                          bn="BatchNorm2d", c="16", example="4, 16, 8, 8")
    _dims = (4,)
    _shape_doc = "(N, C, H, W)"


class BatchRenorm3d(_BatchRenorm, torch.nn.BatchNorm3d):
    __doc__ = _DOC.format(rank="5D", shape="``(N, C, D, H, W)``", name="BatchRenorm3d",
                          bn="BatchNorm3d", c="16", example="4, 16, 4, 8, 8")
    _dims = (5,)
    _shape_doc = "(N, C, D, H, W)"
