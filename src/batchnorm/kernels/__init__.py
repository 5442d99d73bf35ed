"""Backend selection: which kernels run a given canonical tensor.

Backends register a loader here; nothing above ``kernels/`` names a backend. Selection, in order:

1. ``BATCHNORM_BACKEND=reference|cpu|triton`` forces a backend for every tensor it supports
   (the reference backend takes the rest, so a forced run never fails on a dtype a fast backend
   leaves out). Forcing a backend that cannot be imported is an error, not a silent fallback.
2. Otherwise the first backend in :data:`PREFERENCE` for the tensor's device type that is
   importable, supports the tensor and *prefers* it (where it was measured faster than the
   reference); the reference backend last.

Loaders import lazily: importing ``batchnorm`` never imports Numba or Triton.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

from torch import Tensor

from .base import Backend

__all__ = ["Backend", "get_backend", "select", "available_backends", "register_backend",
           "running_backend"]

ENV_VAR = "BATCHNORM_BACKEND"

_LOADERS: dict[str, Callable[[], Backend]] = {}
_CACHE: dict[str, Backend | None] = {}

# device type -> backend names tried in order before the reference backend
PREFERENCE: dict[str, tuple[str, ...]] = {"cpu": ("cpu",), "cuda": ("triton",)}


def register_backend(name: str, loader: Callable[[], Backend]) -> None:
    """Register a backend by name; ``loader`` imports it and returns the instance."""
    _LOADERS[name] = loader
    _CACHE.pop(name, None)


def _module_loader(module: str) -> Callable[[], Backend]:
    def load() -> Backend:
        return importlib.import_module(module, __name__).BACKEND  # type: ignore[no-any-return]

    return load


register_backend("reference", _module_loader(".reference"))
register_backend("cpu", _module_loader(".cpu"))
register_backend("triton", _module_loader(".triton"))


def get_backend(name: str) -> Backend | None:
    """The backend called ``name``, or ``None`` when its dependencies do not import."""
    if name not in _LOADERS:
        raise ValueError(
            f"{ENV_VAR}: expected one of {sorted(_LOADERS)}, got {name!r}"
        )
    if name not in _CACHE:
        try:
            backend: Backend | None = _LOADERS[name]()
        except ImportError:
            backend = None
        if backend is not None and not backend.available():
            backend = None
        _CACHE[name] = backend
    return _CACHE[name]


def available_backends() -> list[str]:
    return [name for name in _LOADERS if get_backend(name) is not None]


# ``os.environ``'s own store (``os._Environ._data``: the encoded keys and values that its
# ``__setitem__``/``__delitem__`` keep in step with the process environment) read with one dict
# lookup; ``os.environ.get`` runs the mapping's Python methods and encoders, which cost more than
# a small layer's checks once a model's large ops have evicted them from the caches
# (docs/decisions.md, "The forced backend read from the environment's store"). ``os.environ.get``
# where a Python lays it out otherwise.
_ENV_STORE: dict | None = getattr(os.environ, "_data", None)
_ENV_KEY: object = None
if type(_ENV_STORE) is dict and hasattr(os.environ, "encodekey"):
    _ENV_KEY = os.environ.encodekey(ENV_VAR)
else:  # pragma: no cover - not CPython's os.environ
    _ENV_STORE = None

# (the raw value last read, the backend name it gives)
_forced_cache: tuple[object, str | None] = (None, None)


def forced() -> str | None:
    """The backend named by ``BATCHNORM_BACKEND`` (parsed once per distinct value)."""
    global _forced_cache
    raw = _ENV_STORE.get(_ENV_KEY) if _ENV_STORE is not None else os.environ.get(ENV_VAR)
    if raw != _forced_cache[0]:
        text = os.environ.get(ENV_VAR)
        _forced_cache = (raw, (text or "").strip().lower() or None)
    return _forced_cache[1]


def select(x: Tensor) -> Backend:
    """The backend that runs canonical tensor ``x``."""
    if x.numel() == 0:  # kernels never see empty tensors
        return _reference()
    name = forced()
    if name is not None:
        backend = get_backend(name)
        if backend is None:
            raise RuntimeError(
                f"{ENV_VAR}={name}: that backend is not importable on this machine "
                f"(available: {available_backends()})"
            )
        return backend if backend.supports(x) else _reference()
    # ``is_cpu`` is a flag read; ``device.type`` builds a device object on every call
    # (docs/decisions.md, "Host-side micro-costs")
    for candidate in PREFERENCE.get("cpu" if x.is_cpu else x.device.type, ()):
        backend = get_backend(candidate)
        if backend is not None and backend.supports(x) and backend.prefers(x):
            return backend
    return _reference()


def _reference() -> Backend:
    reference = get_backend("reference")
    assert reference is not None
    return reference


def running_backend() -> Backend:
    """The backend whose :meth:`~Backend.blend_running` updates eager CPU running statistics:
    the forced one, else the first importable backend of ``PREFERENCE["cpu"]``, else the
    reference backend."""
    name = forced()
    for candidate in (name,) if name is not None else PREFERENCE.get("cpu", ()):
        backend = get_backend(candidate)
        if backend is not None:
            return backend
    reference = get_backend("reference")
    assert reference is not None
    return reference
