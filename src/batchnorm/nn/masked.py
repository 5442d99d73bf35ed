r"""Masked batch normalization for padded sequences: BN whose statistics come from the valid
(unpadded) positions only.

.. math::
    \mu = \frac{1}{|V|}\sum_{(n,l)\in V} x_{n,:,l},\qquad
    \sigma^2 = \frac{1}{|V|}\sum_{(n,l)\in V} (x_{n,:,l} - \mu)^2,\qquad
    y_{n,:,l} = \begin{cases}
        \gamma\,\frac{x_{n,:,l} - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta & (n,l)\in V\\
        0 & \text{otherwise}\end{cases}

where ``V`` is the set of valid positions. Plain BN over a padded batch counts the padding as
data (its statistics shift with the amount of padding); this layer is *equal to BN over the
concatenation of the valid frames*, and the padded positions give zeros out and zero gradient
whatever they contain (NaN included).

Implementation: every position is a partial statistic ``(count = mask, mean = frame, m2 = 0)``
and :func:`batchnorm.stats.merge_many` merges them, so the masked statistics are the package's
own merge; there is no data-dependent shape anywhere (``torch.compile`` traces one graph). The
normalization is plain differentiable PyTorch ops (the backward differentiates through the
statistics). Without a mask, and in eval mode with running statistics, the layer calls the
package's BN (kernels of the active backend) and zeroes the padded positions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import stats as S
from .._errors import describe
from ..activations import ActivationSpec, act_forward, parse_activation
from ..functional import check_arguments
from ._common import update_from_batch
from .batchnorm import _BatchNormBase

__all__ = ["MaskedBatchNorm1d"]


class MaskedBatchNorm1d(_BatchNormBase, torch.nn.BatchNorm1d):
    r"""Batch normalization over the valid positions of a padded ``(N, C, L)`` batch.

    .. math::
        y_{n,:,l} = m_{n,l}\Big(\gamma\,\frac{x_{n,:,l} - \mu_V}{\sqrt{\sigma^2_V + \epsilon}}
            + \beta\Big)

    ``μ_V``, ``σ²_V`` (biased) are per channel over the positions with ``m_{n,l} = 1`` in
    training (the running statistics are updated from them as BN does, unbiased with the
    number of valid positions); in eval mode the running statistics are used. Padded positions
    output 0 (after the activation) and receive zero gradient. A batch with no valid position
    leaves the running statistics as they were (up to rounding) and counts as tracked, as BN
    counts an empty batch.

    Args:
        num_features: the number of channels ``C``; ``eps``, ``momentum``, ``affine``,
            ``track_running_stats``, ``device``, ``dtype``, ``bias`` and ``activation`` are
            as for :class:`batchnorm.BatchNorm1d`.

    Shape:
        ``forward(input, mask=None)``: ``input (N, C, L)``; ``mask`` is a boolean ``(N, L)``
        tensor (``True`` = valid) or an integer ``(N,)`` tensor of lengths (the first
        ``lengths[n]`` positions of sample ``n`` are valid). Without a mask every position is
        valid and the layer is :class:`batchnorm.BatchNorm1d` (``(N, C)`` input allowed).

    Examples::

        >>> m = batchnorm.MaskedBatchNorm1d(80)
        >>> x = torch.randn(8, 80, 100)
        >>> y = m(x, torch.tensor([100, 90, 75, 60, 60, 50, 40, 10]))
    """

    _dims = (2, 3)
    _shape_doc = "(N, C, L) (or (N, C) without a mask)"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device: Any = None,
                 dtype: Any = None, *, bias: bool = True,
                 activation: ActivationSpec = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, activation=activation)

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        self._check_input_dim(input)
        if mask is None:
            return super().forward(input)
        valid = _valid_positions(mask, input)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not use_batch_stats:
            y = super().forward(input)
            return torch.where(valid.unsqueeze(1), y, y.new_zeros(()))
        track = self.training and self.track_running_stats
        check_arguments(input, self.running_mean if track else None,
                        self.running_var if track else None, self.weight, self.bias, True,
                        self.momentum, self.eps, None, self.num_batches_tracked)
        n, c, length = input.shape
        acc = S.accumulation_dtype(input.dtype)
        keep = valid.unsqueeze(1)
        # Padded values never enter the arithmetic (a NaN there would poison 0·NaN).
        x = torch.where(keep, input, input.new_zeros(())).to(acc)
        frames = x.transpose(1, 2).reshape(n * length, c)
        count = valid.reshape(n * length).to(acc)
        no_m2 = frames.new_zeros(1, c).expand(n * length, c)  # one frame has no spread
        merged = S.merge_many(S.Partials(count, frames, no_m2))
        mean, var, rstd = S.finalize(merged, self.eps)
        scale = S.scale_of(rstd, self.weight)
        pre = (x - mean.view(1, c, 1)) * scale.view(1, c, 1)
        if self.bias is not None:
            pre = pre + self.bias.to(acc).view(1, c, 1)
        act, slope = parse_activation(self.activation)
        y = torch.where(keep, act_forward(pre, act, slope), pre.new_zeros(()))
        if track:
            assert self.running_mean is not None and self.running_var is not None
            total = count.sum()
            empty = total == 0
            # An all-padding batch has no statistics: blend the running ones into themselves.
            update_from_batch(self, torch.where(empty, self.running_mean.to(acc), mean),
                           torch.where(empty, self.running_var.to(acc),
                                       S.unbiased_var(var, total)))
        return y.to(input.dtype)


def _valid_positions(mask: object, input: Tensor) -> Tensor:
    """The boolean ``(N, L)`` mask from a mask or from lengths; checked, nothing changed yet."""
    if input.dim() != 3:
        raise ValueError(f"input: a mask needs input of shape (N, C, L), got shape "
                         f"{tuple(input.shape)}")
    n, _, length = input.shape
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask: expected a boolean (N, L) tensor or an integer (N,) tensor of "
                        f"lengths, got {type(mask).__name__}")
    if mask.device != input.device:
        raise ValueError(f"mask: expected a tensor on {input.device} like input, got "
                         f"{describe(mask)}")
    if mask.dtype == torch.bool:
        if tuple(mask.shape) != (n, length):
            raise ValueError(f"mask: expected a boolean mask of shape (N, L) = {(n, length)} for "
                             f"input of shape {tuple(input.shape)}, got {tuple(mask.shape)}")
        return mask
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"mask: expected a bool mask or integer lengths, got dtype {mask.dtype}")
    if tuple(mask.shape) != (n,):
        raise ValueError(f"mask: expected lengths of shape (N,) = ({n},) for input of shape "
                         f"{tuple(input.shape)}, got {tuple(mask.shape)}")
    if not torch.compiler.is_compiling() and mask.numel():
        lo, hi = int(mask.min()), int(mask.max())
        if lo < 0 or hi > length:
            raise ValueError(f"mask: lengths must lie in [0, L] = [0, {length}], got values in "
                             f"[{lo}, {hi}]")
    return torch.arange(length, device=input.device).unsqueeze(0) < mask.unsqueeze(1)
