"""``SyncBatchNorm``: batch statistics over the global batch of a process group, on any device.

It is our ``BatchNorm*d`` (same base class: constructor checks, buffers, ``state_dict`` keys, the
skip counter, ``repr``) whose training forward goes through
:func:`batchnorm.distributed.sync_batch_norm`. Outside training, with a world size of 1 or when
``torch.distributed`` is not initialized, the forward is exactly ``batchnorm.BatchNorm*d``'s.

It is deliberately not a subclass of ``torch.nn.SyncBatchNorm``: ``DistributedDataParallel``
refuses those in CPU modules ("SyncBatchNorm layers only work with GPU modules"), and this one
runs on the CPU (Gloo). ``SyncBatchNorm.convert_sync_batchnorm`` is there, as in PyTorch.

Importing this module also teaches :func:`batchnorm.convert_model` about SyncBatchNorm layers:
``target="torch"`` turns ours into ``torch.nn.SyncBatchNorm`` and ``target="batchnorm"`` turns
``torch.nn.SyncBatchNorm`` into ours.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._errors import BatchNormValueError, describe
from ..activations import ActivationSpec
from ..distributed import is_distributed, sync_batch_norm
from ..functional import check_input
from ._common import layer_config, move_state, register_conversion, swap_modules
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNormBase

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


class SyncBatchNorm(_BatchNormBase):
    r"""Batch normalization over the batch of every rank of a process group (Ioffe & Szegedy,
    2015), a replacement for :class:`torch.nn.SyncBatchNorm` that runs on the CPU (Gloo) as well
    as the GPU (NCCL), with an optional fused residual add and activation.

    .. math::
        y = \mathrm{act}\Big(\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}
            \cdot \gamma + \beta + \text{residual}\Big)

    In training, mean and variance are per channel over the concatenation of every rank's batch
    (ranks may hold different batch sizes, including none): each rank computes its partial
    statistics, one all-gather exchanges them (``2C + 1`` values per rank) and they are merged
    exactly; the backward all-reduces ``(Σg, Σg·x̂)`` (``2C`` values). The running statistics are
    updated from the global statistics, so they are the same on every rank and equal those of
    one-process batch normalization on the global batch. Every rank of the group must call the
    layer in the same order (as with any collective).

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance for stability. Default: 1e-5
        momentum: running-statistics factor, or ``None`` for a cumulative average. Default: 0.1
        affine: learnable γ and β. Default: True
        track_running_stats: keep running estimates for eval. Default: True
        process_group: the group whose batches are normalized together; ``None`` is the world.
            Default: None
        device, dtype: factory arguments for parameters and buffers. Default: None
        bias: learnable β when ``affine``. Default: True
        activation: ``None``, a name of :data:`batchnorm.activations.ACTIVATIONS`
            (``"relu"``, ``"leaky_relu"``, ``"silu"``, ``"gelu"``, ``"gelu_tanh"``,
            ``"relu6"``, ``"hardswish"``, ``"hardsigmoid"``, ``"sigmoid"``, ``"tanh"``,
            ``"elu"``, ``"mish"``), ``("leaky_relu", slope)``, ``("elu", alpha)`` or the
            matching ``nn`` module, applied last. Default: None

    Shape:
        - Input: ``(N, C, *)`` (any rank ≥ 2, any memory format); output: the same.
        - ``forward(input, residual=None)``: ``residual`` has the input's shape.

    Examples::

        >>> # torchrun --nproc-per-node 2 train.py, after dist.init_process_group("gloo")
        >>> m = batchnorm.SyncBatchNorm(100, activation="relu")
        >>> y = m(torch.randn(20, 100, 35, 45))
        >>> model = batchnorm.convert_sync_batchnorm(model)
    """

    _shape_doc = "(N, C, ...)"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        activation: ActivationSpec = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, activation=activation)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        check_input(input)  # a floating-point tensor of at least 2 dimensions (N, C, ...)
        if input.shape[1] != self.num_features:
            raise BatchNormValueError(
                f"input: expected {self.num_features} channels (dimension 1) for "
                f"{type(self).__name__}({self.num_features}), got {input.shape[1]} in "
                f"{describe(input)}"
            )

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """:func:`convert_sync_batchnorm` (to this class), where
        ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` is called."""
        return convert_sync_batchnorm(module, process_group)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        traced = self._fx_leaf(input, residual)
        if traced is not None:
            return traced  # type: ignore[no-any-return]
        if not (self.training and is_distributed(self.process_group)):
            return super().forward(input, residual)
        track = self.track_running_stats
        y = sync_batch_norm(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            self.momentum,
            self.eps,
            activation=self.activation,
            residual=residual,
            num_batches_tracked=self.num_batches_tracked if track else None,
            num_batches_skipped=self.num_batches_skipped if track else None,
            layer_name=self._name(),
            process_group=self.process_group,
            extra_check=lambda: self._check_input_dim(input),
        )
        return self._after(y) if self._unfused else y


# --------------------------------------------------------------------------------------------
# Conversion

_TO_SYNC: tuple[type, ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    BatchNorm1d, BatchNorm2d, BatchNorm3d,
)


def _to_sync(m: nn.Module, path: str, process_group: Any) -> SyncBatchNorm:
    assert isinstance(m, _BatchNorm)
    group = process_group if process_group is not None else getattr(m, "process_group", None)
    new = SyncBatchNorm(**layer_config(m), process_group=group,
                        activation=getattr(m, "activation", None))
    new.layer_name = getattr(m, "layer_name", None) or path or None
    move_state(m, new)
    if isinstance(m, _BatchNormBase) and m._unfused:
        new.keep_after(m.unfused_modules())
    if hasattr(m, "qconfig"):
        new.qconfig = m.qconfig
    return new


def convert_sync_batchnorm(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Return ``model`` with every batch-norm layer replaced by :class:`SyncBatchNorm`.

    Converts ``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm`` and
    ``batchnorm.BatchNorm1d/2d/3d``, keeping the fused activation, the parameters (the same
    objects, so an optimizer built before still works), the buffers and train/eval mode. Our
    ``SyncBatchNorm`` layers stay (their group is set to ``process_group`` when one is given).
    A batch-norm subclass it does not know is refused and the model is left unchanged.

    Args:
        model: any module; converted in place (use the return value: the root may be replaced).
        process_group: the group for the new layers; ``None`` keeps a converted
            ``torch.nn.SyncBatchNorm``'s group and otherwise means the world. Default: None
    """
    regroup: list[SyncBatchNorm] = []

    def one(m: nn.Module, path: str) -> nn.Module | None:
        kind = type(m)
        if kind is SyncBatchNorm:
            regroup.append(m)  # type: ignore[arg-type]
            return None
        if kind in _TO_SYNC:
            return _to_sync(m, path, process_group)
        if isinstance(m, _BatchNorm):
            raise ValueError(
                f"convert_sync_batchnorm: layer {path or '<root>'!r} is a {kind.__module__}."
                f"{kind.__qualname__}, a batch-norm class this conversion does not know; "
                "converting it could drop its behaviour, so the model was left unchanged"
            )
        return None

    converted = swap_modules(model, one)
    if process_group is not None:
        for layer in regroup:
            layer.process_group = process_group
    return converted


def _sync_to_torch(m: nn.Module, path: str) -> nn.Module:
    assert isinstance(m, SyncBatchNorm)
    if m.activation is not None:
        raise ValueError(
            f"convert_model: layer {path or '<root>'!r} (SyncBatchNorm) has a fused activation "
            f"{m.activation!r} that torch.nn.SyncBatchNorm cannot hold; set its activation to "
            "None and add the activation module after it before converting"
        )
    new = nn.SyncBatchNorm(**layer_config(m), process_group=m.process_group)
    return move_state(m, new)


def _torch_sync_to_ours(m: nn.Module, path: str) -> nn.Module:
    return _to_sync(m, path, None)


def _unchanged(m: nn.Module, path: str) -> nn.Module:
    return m


register_conversion("torch", SyncBatchNorm, _sync_to_torch)
register_conversion("torch", torch.nn.SyncBatchNorm, _unchanged)
register_conversion("batchnorm", torch.nn.SyncBatchNorm, _torch_sync_to_ours)
register_conversion("batchnorm", SyncBatchNorm, _unchanged)
