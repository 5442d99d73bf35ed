"""Canonical layouts: the two shapes kernels see, and the way back to the user's.

Any input ``(N, C, *spatial)`` is viewed, without copying, as

- channels-first ``(N, C, S)`` with ``S = prod(spatial)`` (kind ``"first"``), or
- channels-last ``(M, C)`` with ``M = N·prod(spatial)`` (kind ``"last"``) when its strides are
  those of ``channels_last``/``channels_last_3d`` (or any order with the channels innermost);
- a 2-D ``(N, C)`` input (or one whose spatial size is 1) is ``(N, C)`` as it is (kind ``"nc"``).

An input that is none of these is made contiguous once. The output keeps the input's memory
format.

Why :meth:`Layout.restore` returns a tensor that owns its view of the storage (``detach`` of the
view): the op layer returns it from an autograd Function, and autograd treats a *view* created
inside a Function as something an in-place op may not touch (and, outside one, rebuilds the
gradient of the whole base through ``CopySlices``). The activation a model applies after a norm
layer is very often ``nn.ReLU(inplace=True)``; with a plain tensor it is an ordinary in-place op
on an ordinary output.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = ["Layout", "canonicalize", "empty_output", "last_order"]


class Layout:
    """How a user tensor of ``shape`` maps to its canonical form (``kind``: ``"nc"``,
    ``"first"`` or ``"last"``); tensors of the same shape go back and forth through it."""

    __slots__ = ("kind", "shape")

    def __init__(self, kind: str, shape: tuple[int, ...]) -> None:
        self.kind, self.shape = kind, shape

    @property
    def strides(self) -> tuple[int, ...]:
        """The strides of a dense tensor of the user's shape in this layout's memory order."""
        return _strides(self.kind, self.shape)  # cached: a layer sees few shapes

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        """The shape of the canonical form: ``(M, C)``, ``(N, C)`` or ``(N, C, S)``."""
        return _canonical_shape(self.kind, self.shape)  # cached, as the strides

    def canonical(self, t: Tensor) -> Tensor:
        """``t`` (the user's shape, any memory format) in this canonical form; a copy only when
        its memory order is not this layout's."""
        shape = self.canonical_shape
        if self.kind == "last":
            return t.permute(last_order(t.dim())).reshape(shape)
        if not t.is_contiguous():
            t = t.contiguous()
        return t.view(shape)

    def restore(self, y: Tensor) -> Tensor:
        """A canonical result ``y`` in the user's shape and memory format, as a tensor that is
        not an autograd view (see the module docstring)."""
        if y.shape == self.shape:
            return y
        return y.as_strided(self.shape, self.strides, y.storage_offset()).detach()

    def restore_view(self, y: Tensor) -> Tensor:
        """:meth:`restore` as a plain view (where the caller is not an autograd Function)."""
        if y.shape == self.shape:
            return y
        return y.as_strided(self.shape, self.strides, y.storage_offset())


@functools.lru_cache(maxsize=16)
def last_order(ndim: int) -> tuple[int, ...]:
    """The dimensions of an ``ndim``-D ``(N, C, *spatial)`` tensor with the channels innermost:
    the order of a ``"last"`` layout's memory, outermost first."""
    return (0, *range(2, ndim), 1)


@functools.lru_cache(maxsize=1024)
def _canonical_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    n, c, s = shape[0], shape[1], math.prod(shape[2:])
    return (n * s, c) if kind == "last" else (n, c) if kind == "nc" else (n, c, s)


@functools.lru_cache(maxsize=1024)
def _strides(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a dense tensor of ``shape`` in the layout's memory order."""
    if kind != "last":
        return _contiguous_strides(shape)
    order = last_order(len(shape))  # outermost to innermost
    strides = [0] * len(shape)
    step = 1
    for d in reversed(order):
        strides[d] = step
        step *= max(shape[d], 1)
    return tuple(strides)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = [0] * len(shape)
    step = 1
    for d in range(len(shape) - 1, -1, -1):
        strides[d] = step
        step *= max(shape[d], 1)
    return tuple(strides)


def canonicalize(x: Tensor) -> tuple[Tensor, Layout]:
    """View ``x`` as channels-first ``(N, C, S)`` or channels-last ``(M, C)`` without copying
    (inputs that are neither are made contiguous once); returns the canonical tensor and its
    :class:`Layout`."""
    d = x.dim()
    if d == 2 and x.is_contiguous():  # already (M, C): the common 2-D case, no view
        return x, Layout("nc", tuple(x.shape))
    if d == 4 and not x.is_contiguous() \
            and x.is_contiguous(memory_format=torch.channels_last):
        # the common channels-last case (layout_of's "last", read from two stride flags)
        n, c, h, w = x.shape
        return x.permute(0, 2, 3, 1).view(n * h * w, c), Layout("last", (n, c, h, w))
    lay = layout_of(x)
    return lay.canonical(x), lay


def _empty_channels_last(x: Tensor) -> bool:
    """An empty 4-D/5-D tensor with channels-last strides: every empty tensor counts as
    contiguous, so only its strides say which format the output should keep (as PyTorch's)."""
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    return x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)


def layout_of(x: Tensor) -> Layout:
    """The :class:`Layout` :func:`canonicalize` gives ``x``, without touching its data."""
    shape = tuple(x.shape)
    if x.dim() == 2 or (math.prod(shape[2:]) == 1 and x.is_contiguous()):
        return Layout("nc", shape)
    channels_last = not x.is_contiguous() or (x.numel() == 0 and _empty_channels_last(x))
    if channels_last and x.permute(last_order(x.dim())).is_contiguous():
        return Layout("last", shape)
    return Layout("first", shape)


def empty_output(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialized tensor of ``x``'s shape in the memory format a result for ``x`` has
    (what :meth:`Layout.restore` gives): the fake kernels' output metadata."""
    lay = layout_of(x)
    return torch.empty_strided(lay.shape, lay.strides, dtype=dtype or x.dtype, device=x.device)
