"""Exception types raised at the boundary.

Where PyTorch raises a ``RuntimeError`` for the same mistake (a channel count that does not
match, tensors on different devices, mixed dtypes, integer input), we raise a class that is
*both* the clear Python type (``ValueError``/``TypeError``) and ``RuntimeError``, so code written
against either PyTorch or this library catches it.
"""

from __future__ import annotations


class BatchNormValueError(ValueError, RuntimeError):
    """A value or shape that cannot be normalized (PyTorch raises RuntimeError here)."""


class BatchNormTypeError(TypeError, RuntimeError):
    """A dtype or argument type that is not supported (PyTorch raises RuntimeError here)."""


def describe(t: object) -> str:
    """Short description of a tensor for messages: shape, dtype, device."""
    shape = getattr(t, "shape", None)
    if shape is None:
        return type(t).__name__
    return f"tensor of shape {tuple(shape)}, dtype {t.dtype}, device {t.device}"  # type: ignore[attr-defined]
