"""Tools around batch normalization."""

from .convert import convert_model

__all__ = ["convert_model"]
