"""Fixtures of the claims-harness tests: one digits data set, one thread for torch and Numba."""

from __future__ import annotations

import pytest

from batchnorm.experiments.data import Dataset, load_digits
from batchnorm.experiments.runner import set_threads


@pytest.fixture(scope="session")
def digits() -> Dataset:
    set_threads(1)  # the models are tiny; Numba's default pool spin-waits on a shared machine
    return load_digits()
