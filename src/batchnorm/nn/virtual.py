r"""Virtual batch normalization (Salimans, Goodfellow, Zaremba, Cheung, Radford & Chen, 2016,
"Improved Techniques for Training GANs"): each example is normalized with the statistics of a
fixed *reference batch* together with the example itself, so an example's output does not
depend on the other examples of its batch (BN's batch coupling makes GAN generators produce
correlated samples).

.. math::
    \mu_i = \mathrm{mean}(R \cup x_i),\quad
    \sigma_i^2 = \mathrm{var}(R \cup x_i),\quad
    y_i = \gamma\,\frac{x_i - \mu_i}{\sqrt{\sigma_i^2 + \epsilon}} + \beta

per channel, the union taken over the values of the reference batch ``R`` (all its samples and
positions) and of example ``x_i`` (its positions). With ``|R| = B`` samples this is the paper's
weighting ``1/(B+1)`` for the example and ``B/(B+1)`` for the reference.

Implementation: the reference's partial statistics and each example's own (``(N·C)`` partials
from :func:`batchnorm.stats.channel_partials` on an ``(1, N·C, S)`` view) are merged with
:func:`batchnorm.stats.merge_many`, giving per-example, per-channel mean and variance; the
normalization is differentiable PyTorch ops. These modules are not ``_BatchNorm`` subclasses:
they have no running statistics (train and eval behave the same), and tools for BN must not
treat them as BN.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .. import stats as S
from .._errors import BatchNormValueError, describe
from ..functional import check_channel_tensor, check_eps, check_input
from ..layout import canonicalize
from .batchnorm import check_constructor

__all__ = ["VirtualBatchNorm1d", "VirtualBatchNorm2d"]


class _VirtualBatchNorm(nn.Module):
    _dims: tuple[int, ...] = ()
    _shape_doc = ""
    ref_mean: Tensor
    ref_m2: Tensor
    ref_count: Tensor

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True,
                 device: Any = None, dtype: Any = None) -> None:
        check_constructor(num_features, eps, None)
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.affine = int(num_features), float(eps), affine
        self.weight: nn.Parameter | None = None
        self.bias: nn.Parameter | None = None
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        # The reference batch's partials (count, mean, m2): persistent, so a checkpoint keeps it.
        self.register_buffer("ref_mean", torch.zeros(num_features, **factory))
        self.register_buffer("ref_m2", torch.zeros(num_features, **factory))
        self.register_buffer("ref_count", torch.zeros((), **factory))
        self._has_reference = False

    @property
    def has_reference(self) -> bool:
        """Whether a reference batch is set (by :meth:`set_reference`, a first call or a load)."""
        return self._has_reference

    def _check(self, input: object, name: str) -> Tensor:
        x = check_input(input)
        if x.dim() not in self._dims:
            want = " or ".join(f"{d}D" for d in self._dims)
            raise ValueError(f"{name}: expected {want} input {self._shape_doc}, got shape "
                             f"{tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise BatchNormValueError(f"{name}: expected {self.num_features} channels "
                                      f"(dimension 1), got {x.shape[1]} in {describe(x)}")
        check_channel_tensor("weight", self.weight, x)
        return x

    def _reference_partials(self, reference: Tensor) -> S.Partials:
        return S.channel_partials(canonicalize(reference)[0])

    def set_reference(self, reference: Tensor) -> None:
        """Fix the reference batch ``R``: its statistics are kept (not the tensor itself)."""
        ref = self._check(reference, "reference")
        if ref.numel() == 0:
            raise ValueError(f"reference: expected a non-empty batch, got {describe(ref)}")
        with torch.no_grad():
            self._store(self._reference_partials(ref))

    @torch.no_grad()
    def _store(self, p: S.Partials) -> None:
        self.ref_count.copy_(p.n)
        self.ref_mean.copy_(p.mean)
        self.ref_m2.copy_(p.m2)
        self._has_reference = True

    def forward(self, input: Tensor, reference: Tensor | None = None) -> Tensor:
        """Normalize ``input`` with the reference statistics.

        ``reference``: a reference batch for this call, differentiated through (the paper's use,
        where ``R`` is propagated through the network at every step); its statistics are also
        stored, detached. Without it the stored reference is used; on the very first call
        without one, ``input`` itself becomes the reference.
        """
        x = self._check(input, "input")
        check_eps(self.eps, True)
        acc = S.accumulation_dtype(x.dtype)
        if reference is not None:
            ref_in = self._check(reference, "reference")
            if ref_in.numel() == 0:
                raise ValueError(f"reference: expected a non-empty batch, got {describe(ref_in)}")
            ref = self._reference_partials(ref_in)
            self._store(ref)
        else:
            if not self._has_reference:
                self.set_reference(x)
            ref = S.Partials(self.ref_count.to(acc), self.ref_mean.to(acc), self.ref_m2.to(acc))
        n, c = x.shape[0], x.shape[1]
        s = math.prod(x.shape[2:])
        own = S.channel_partials(x.reshape(1, n * c, s))  # each example's own, per channel
        ref_n = ref.n.to(acc).reshape(())
        merged = S.merge_many(S.Partials(
            torch.stack([ref_n, own.n.to(acc).reshape(())]),
            torch.stack([ref.mean.to(acc).expand(n, c), own.mean.view(n, c)]),
            torch.stack([ref.m2.to(acc).expand(n, c), own.m2.view(n, c)]),
        ))
        mean, _var, rstd = S.finalize(merged, self.eps)  # (N, C)
        view = (n, c) + (1,) * (x.dim() - 2)
        scale = S.scale_of(rstd, self.weight)
        y = (x.to(acc) - mean.view(view)) * scale.view(view)
        if self.bias is not None:
            y = y + self.bias.to(acc).view((1, c) + (1,) * (x.dim() - 2))
        return y.to(x.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + "ref_count" in state_dict:
            self._has_reference = bool(self.ref_count > 0)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


_DOC = r"""Virtual batch normalization over a {rank} input (Salimans et al., 2016, "Improved
    Techniques for Training GANs").

    .. math::
        y_i = \gamma\,\frac{{x_i - \mu(R \cup x_i)}}{{\sqrt{{\sigma^2(R \cup x_i) + \epsilon}}}}
            + \beta

    Mean and (biased) variance per channel over the values of the fixed reference batch ``R``
    together with those of example ``x_i`` alone. ``R`` is set with :meth:`set_reference`,
    passed per call as ``forward(input, reference=R)`` (differentiated through), or taken from
    the first call's input. Train and eval mode behave the same; there are no running
    statistics. The reference's statistics are buffers (``ref_count``, ``ref_mean``,
    ``ref_m2``), saved in the ``state_dict``.

    Args:
        num_features: channels ``C``.
        eps: added to the variance. Default: 1e-5
        affine: learnable ``γ`` (ones) and ``β`` (zeros). Default: True
        device, dtype: factory arguments. Default: None

    Shape:
        - Input and reference: {shape}; output: the input's shape.

    Examples::

        >>> vbn = batchnorm.{name}(64)
        >>> vbn.set_reference(reference_features)
        >>> y = vbn(features)
"""


class VirtualBatchNorm1d(_VirtualBatchNorm):
    __doc__ = _DOC.format(rank="2D or 3D", shape="``(N, C)`` or ``(N, C, L)``",
                          name="VirtualBatchNorm1d")
    _dims = (2, 3)
    _shape_doc = "(N, C) or (N, C, L)"


class VirtualBatchNorm2d(_VirtualBatchNorm):
    __doc__ = _DOC.format(rank="4D", shape="``(N, C, H, W)``", name="VirtualBatchNorm2d")
    _dims = (4,)
    _shape_doc = "(N, C, H, W)"
