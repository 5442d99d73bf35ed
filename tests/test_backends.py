"""Backend selection: preference order, prefers(), forcing, empty tensors, unknown names."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from batchnorm import kernels
from batchnorm.kernels.reference import ReferenceBackend


class _Picky(ReferenceBackend):
    name = "picky"

    def supports(self, x):
        return x.dtype == torch.float32

    def prefers(self, x):
        return x.shape[1] >= 4


@pytest.fixture
def picky(monkeypatch):
    backend = _Picky()
    kernels.register_backend("picky", lambda: backend)
    monkeypatch.setitem(kernels.PREFERENCE, "cpu", ("picky",))
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    yield backend
    kernels._LOADERS.pop("picky")
    kernels._CACHE.pop("picky", None)


def test_default_selection_asks_supports_and_prefers(picky):
    assert kernels.select(torch.zeros(2, 4)) is picky
    assert kernels.select(torch.zeros(2, 2)).name == "reference"  # not preferred
    assert kernels.select(torch.zeros(2, 4, dtype=torch.float64)).name == "reference"
    assert kernels.select(torch.zeros(0, 4)).name == "reference"  # kernels never see empty


def test_forcing_ignores_prefers_but_not_supports(picky, monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "picky")
    assert kernels.select(torch.zeros(2, 2)) is picky
    assert kernels.select(torch.zeros(2, 2, dtype=torch.float64)).name == "reference"


def test_unknown_or_unavailable_backend(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "nonesuch")
    with pytest.raises(ValueError, match="BATCHNORM_BACKEND"):
        kernels.select(torch.zeros(2, 2))
    kernels.register_backend("broken", lambda: (_ for _ in ()).throw(ImportError("no lib")))
    try:
        monkeypatch.setenv(kernels.ENV_VAR, "broken")
        with pytest.raises(RuntimeError, match="not importable"):
            kernels.select(torch.zeros(2, 2))
        assert "broken" not in kernels.available_backends()
    finally:
        kernels._LOADERS.pop("broken")
        kernels._CACHE.pop("broken", None)


def test_importing_batchnorm_imports_neither_dynamo_nor_the_kernel_libraries():
    """``import batchnorm`` stays light: Numba and Triton load on first use, and Dynamo (which
    imports Triton) only when the user compiles."""
    code = ("import sys, batchnorm, batchnorm.nn, batchnorm.functional, batchnorm.ops\n"
            "print(sorted(m for m in ('torch._dynamo', 'triton', 'numba') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_forced_follows_the_environment(monkeypatch):
    """``forced`` reads os.environ's store directly; every change made through ``os.environ``
    (set, changed, deleted) is seen on the next call."""
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert kernels.forced() is None
    monkeypatch.setenv(kernels.ENV_VAR, " Reference ")
    assert kernels.forced() == "reference"
    monkeypatch.setenv(kernels.ENV_VAR, "cpu")
    assert kernels.forced() == "cpu"
    monkeypatch.delenv(kernels.ENV_VAR)
    assert kernels.forced() is None
