r"""Frozen batch normalization: eval-mode BN whose statistics and affine are constants.

.. math::
    y = \mathrm{act}\Big(\frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta
        [+ \text{residual}]\Big)

with ``μ = running_mean``, ``σ² = running_var``, ``γ = weight``, ``β = bias`` all *buffers*:
never updated by a forward, never returned by ``parameters()``, whatever ``train()``/``eval()``
says. This is what fine-tuning with small batches (detection, segmentation: e.g. Detectron's
and torchvision's ``FrozenBatchNorm2d``) uses so that batch statistics of tiny batches never
replace the pre-trained ones. The forward is :func:`batchnorm.functional.batch_norm_impl` in
eval mode (kernels of the active backend, gradient with respect to the input only).

Buffer names are PyTorch BN's (``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``), so ``state_dict``s move between ``nn.BatchNorm*d`` and these
unchanged. :func:`freeze` and :func:`unfreeze` convert a whole model, sharing the tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._errors import BatchNormValueError, describe
from ..activations import ActivationSpec, parse_activation, spec_of
from ..functional import batch_norm_impl
from ._common import swap_modules, variant_config
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNormBase, check_constructor
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "freeze", "unfreeze"]


class _FrozenBatchNorm(nn.Module):
    _dims: tuple[int, ...] = ()
    _shape_doc = ""
    _rank = 0
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor
    weight: Tensor | None
    bias: Tensor | None

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True,
                 device: Any = None, dtype: Any = None, *, bias: bool = True,
                 activation: ActivationSpec = None) -> None:
        check_constructor(num_features, eps, None)
        act = parse_activation(activation)
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.affine = int(num_features), float(eps), affine
        self.activation: ActivationSpec = spec_of(*act)
        self.register_buffer("weight", torch.ones(num_features, **factory) if affine else None)
        self.register_buffer("bias", torch.zeros(num_features, **factory)
                             if affine and bias else None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked",
                             torch.zeros((), dtype=torch.long, device=device))
        # What :func:`unfreeze` rebuilds: set by :func:`freeze`, not part of the state_dict.
        self._unfreeze_as: tuple[type, dict[str, Any]] | None = None
        self.layer_name: str | None = None

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        if not isinstance(input, Tensor):
            raise TypeError(f"input: expected a torch.Tensor, got {type(input).__name__}")
        if input.dim() not in self._dims:
            want = " or ".join(f"{d}D" for d in self._dims)
            raise ValueError(f"expected {want} input (got {input.dim()}D input): "
                             f"{type(self).__name__} takes input of shape {self._shape_doc}, "
                             f"got shape {tuple(input.shape)}")
        if input.shape[1] != self.num_features:
            raise BatchNormValueError(
                f"input: expected {self.num_features} channels (dimension 1) for "
                f"{type(self).__name__}({self.num_features}), got {input.shape[1]} in "
                f"{describe(input)}")
        return batch_norm_impl(input, self.running_mean, self.running_var, self.weight,
                               self.bias, False, 0.0, self.eps, activation=self.activation,
                               residual=residual)

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}, affine={self.affine}"
        if self.affine and self.bias is None:
            text += ", bias=False"
        if self.activation is not None:
            text += f", activation={self.activation!r}"
        return text


_DOC = r"""Frozen batch normalization over a {rank} input: eval-mode BN with constant statistics
    and affine.

    .. math::
        y = \mathrm{{act}}\Big(\frac{{x - \mu}}{{\sqrt{{\sigma^2 + \epsilon}}}}\,\gamma + \beta
            [+ \text{{residual}}]\Big)

    ``running_mean``, ``running_var``, ``weight`` and ``bias`` are buffers, never updated (also
    in ``train()`` mode); the output equals ``torch.nn.{bn}`` in eval mode. Build one with
    :func:`batchnorm.freeze` from a trained model, or load a BN ``state_dict`` into it (same
    keys).

    Args:
        num_features: channels ``C``.
        eps: added to the variance. Default: 1e-5
        affine: keep ``weight`` and ``bias`` (else ``γ = 1``, ``β = 0``). Default: True
        device, dtype: factory arguments. Default: None
        bias: keep ``bias`` when ``affine``. Default: True
        activation: as for :class:`batchnorm.{bn}`, applied last. Default: None

    Shape:
        - Input: {shape}; output: the same shape and memory format.
"""


class FrozenBatchNorm1d(_FrozenBatchNorm):
    __doc__ = _DOC.format(rank="2D or 3D", shape="``(N, C)`` or ``(N, C, L)``", bn="BatchNorm1d")
    _dims = (2, 3)
    _shape_doc = "(N, C) or (N, C, L)"
    _rank = 1


class FrozenBatchNorm2d(_FrozenBatchNorm):
    __doc__ = _DOC.format(rank="4D", shape="``(N, C, H, W)``", bn="BatchNorm2d")
    _dims = (4,)
    _shape_doc = "(N, C, H, W)"
    _rank = 2


class FrozenBatchNorm3d(_FrozenBatchNorm):
    __doc__ = _DOC.format(rank="5D", shape="``(N, C, D, H, W)``", bn="BatchNorm3d")
    _dims = (5,)
    _shape_doc = "(N, C, D, H, W)"
    _rank = 3


_FROZEN: dict[int, type[_FrozenBatchNorm]] = {
    1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d,
}
_OURS: dict[int, type[_BatchNormBase]] = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}
# Layers whose eval mode *is* BN with running statistics, so freezing them loses nothing.
_FREEZABLE: dict[type, int] = {
    nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3,
    BatchNorm1d: 1, BatchNorm2d: 2, BatchNorm3d: 3,
    BatchRenorm1d: 1, BatchRenorm2d: 2, BatchRenorm3d: 3,
    GhostBatchNorm1d: 1, GhostBatchNorm2d: 2, GhostBatchNorm3d: 3,
}


def _freeze_one(m: nn.Module, path: str) -> nn.Module | None:
    if isinstance(m, _FrozenBatchNorm) or not isinstance(m, _BatchNorm):
        return None
    where = path or "<root>"
    rank = _FREEZABLE.get(type(m))
    if rank is None:
        kind = type(m)
        raise ValueError(
            f"freeze: layer {where!r} is a {kind.__module__}.{kind.__qualname__}, whose eval "
            "mode freeze does not know to be plain BN; the model was left unchanged")
    unfused: tuple[str, ...] = getattr(m, "_unfused", ())
    if unfused:
        raise ValueError(
            f"freeze: layer {where!r} ({type(m).__name__}) applies modules after the norm "
            f"({', '.join(unfused)}) that a frozen layer cannot hold; the model was left "
            "unchanged")
    if m.running_mean is None or m.running_var is None:
        raise ValueError(
            f"freeze: layer {where!r} ({type(m).__name__}) has no running statistics "
            "(track_running_stats=False) to freeze; the model was left unchanged")
    ref = m.running_mean
    frozen = _FROZEN[rank](m.num_features, m.eps, m.affine, device=ref.device, dtype=ref.dtype,
                           bias=m.bias is not None or not m.affine,
                           activation=getattr(m, "activation", None))
    # Share storage with the source (detach() does not copy): no state is lost or duplicated.
    if m.weight is not None:
        frozen.weight = m.weight.detach()
    if m.bias is not None:
        frozen.bias = m.bias.detach()
    frozen.running_mean, frozen.running_var = m.running_mean, m.running_var
    if m.num_batches_tracked is not None:
        frozen.num_batches_tracked = m.num_batches_tracked
    frozen._unfreeze_as = (type(m), variant_config(m))
    frozen.layer_name = getattr(m, "layer_name", None)
    return frozen.train(m.training)


def _unfreeze_one(m: nn.Module, path: str) -> nn.Module | None:
    if not isinstance(m, _FrozenBatchNorm):
        return None
    if m._unfreeze_as is not None:
        cls, kw = m._unfreeze_as
    else:
        cls = _OURS[m._rank]
        kw = dict(num_features=m.num_features, eps=m.eps, affine=m.affine,
                  bias=not m.affine or m.bias is not None, activation=m.activation)
    ref = m.running_mean
    new = cls(**kw, device=ref.device, dtype=ref.dtype)
    if m.weight is not None:
        new.weight = nn.Parameter(m.weight)
    if m.bias is not None:
        new.bias = nn.Parameter(m.bias)
    new.running_mean, new.running_var = m.running_mean, m.running_var
    new.num_batches_tracked = m.num_batches_tracked
    if isinstance(new, _BatchNormBase):
        new.layer_name = m.layer_name
    return new.train(m.training)  # type: ignore[no-any-return]


def _convert(model: nn.Module, one: Any) -> nn.Module:
    return swap_modules(model, one)


def freeze(model: nn.Module) -> nn.Module:
    """Replace every BN layer of ``model`` by the matching ``FrozenBatchNorm*d``, sharing state.

    Converts ``torch.nn.BatchNorm1d/2d/3d``, ``batchnorm.BatchNorm1d/2d/3d`` and the variants
    whose eval mode is BN (``BatchRenorm*d``, ``GhostBatchNorm*d``); a fused activation is kept.
    The frozen layer's buffers *are* the source's tensors (no copy), and the source's class and
    configuration are remembered for :func:`unfreeze`. Any other ``_BatchNorm`` subclass
    (``SyncBatchNorm``, ``MaskedBatchNorm1d``, unknown subclasses) or a layer without running
    statistics is refused with a ``ValueError`` naming it, before anything changes.
    The model is changed in place; use the return value (the root itself may be replaced).
    """
    return _convert(model, _freeze_one)


def unfreeze(model: nn.Module) -> nn.Module:
    """Replace every ``FrozenBatchNorm*d`` of ``model`` by a trainable BN layer, sharing state.

    A layer made by :func:`freeze` gets its original class and configuration back; any other
    becomes ``batchnorm.BatchNorm1d/2d/3d``. ``weight``/``bias`` become parameters over the
    same storage; the running statistics are the same tensors.
    """
    return _convert(model, _unfreeze_one)
