"""torchvision and timm for the tests and benchmarks that build real models: the one place that
works around the registry's torchvision wheel.

``torchvision==0.28.0`` (the release that matches ``torch==2.13.0``) is published as a CUDA
build. Imported next to the CPU ``torch`` its ``_meta_registrations`` module fails: it registers
fake kernels for C++ ops (``torchvision::nms`` and the other detection ops) that the CUDA
extension would have defined and that the CPU ``torch`` cannot load. The model definitions use
none of those ops, so that one module is replaced by an empty one before torchvision is imported.
``timm`` imports torchvision itself, so it goes through here too.
"""

from __future__ import annotations

import sys
import types
from typing import Any


def torchvision() -> Any:
    """The ``torchvision`` module (model definitions usable on the CPU ``torch``)."""
    if "torchvision" not in sys.modules:
        name = "torchvision._meta_registrations"
        sys.modules.setdefault(name, types.ModuleType(name))
    import torchvision as tv

    return tv


def timm() -> Any:
    """The ``timm`` module, imported after :func:`torchvision`."""
    torchvision()
    import timm as t

    return t
