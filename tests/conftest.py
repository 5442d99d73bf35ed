"""Test configuration: seeding, and the one switch that runs tests on every backend.

A test that takes the ``backend`` fixture runs once per available backend (reference, cpu,
triton), with ``BATCHNORM_BACKEND`` set for its duration; one that takes ``cpu_backend`` runs on
the CPU backends only (reference, cpu), for work too long for Triton's interpreter.
``BATCHNORM_BACKEND=cpu pytest`` (or ``pytest --backend cpu``) restricts the whole suite to one
backend. Triton kernels run on CPU tensors through Triton's interpreter when no GPU is present.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from batchnorm import kernels  # noqa: E402

ALL_BACKENDS = ("reference", "cpu", "triton")
CPU_BACKENDS = ("reference", "cpu")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--backend", default=None,
                     help="run backend-parametrized tests on one backend")


def _chosen(config: pytest.Config) -> list[str]:
    name = config.getoption("--backend") or os.environ.get(kernels.ENV_VAR) or None
    if name:
        return [name]
    return [b for b in ALL_BACKENDS if kernels.get_backend(b) is not None]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", _chosen(metafunc.config), indirect=True)
    if "cpu_backend" in metafunc.fixturenames:
        metafunc.parametrize("cpu_backend", [b for b in _chosen(metafunc.config)
                                             if b in CPU_BACKENDS], indirect=True)


def _force(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    name: str = request.param
    if kernels.get_backend(name) is None:
        pytest.skip(f"backend {name!r} is not importable here")
    monkeypatch.setenv(kernels.ENV_VAR, name)
    return name


@pytest.fixture
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The backend a test runs on; forced through the environment variable."""
    return _force(request, monkeypatch)


@pytest.fixture
def cpu_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A CPU backend (reference or cpu) a test runs on, forced like ``backend``."""
    return _force(request, monkeypatch)


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def device_for(backend: str) -> torch.device:
    """Tensors for the triton backend live on the GPU when there is one, else on the CPU."""
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
