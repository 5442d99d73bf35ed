"""Test configuration: seeding, and the one switch that runs tests on every backend.

A test that takes the ``backend`` fixture runs once per available backend (reference, cpu,
triton), with ``BATCHNORM_BACKEND`` set for its duration. ``BATCHNORM_BACKEND=cpu pytest`` (or
``pytest --backend cpu``) restricts the whole suite to one backend. Triton kernels run on CPU
tensors through Triton's interpreter when no GPU is present.
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


@pytest.fixture
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The backend a test runs on; forced through the environment variable."""
    name: str = request.param
    if kernels.get_backend(name) is None:
        pytest.skip(f"backend {name!r} is not importable here")
    monkeypatch.setenv(kernels.ENV_VAR, name)
    return name


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
