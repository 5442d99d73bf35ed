"""The claims harness behind ``batchnorm reproduce``: one module per claim, run and reported.

Each claim module (``experiments/claims/<name>.py``) defines ``NAME``, ``TITLE``,
``CLAIM``, ``CRITERION``, ``PARAMS`` (per size: ``tiny`` for tests, ``quick``, ``full``),
``run(cfg)`` returning
a :class:`~batchnorm.experiments.result.ClaimResult`, and ``judge(metrics)`` — the verdict as a
function of the measured numbers only.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["CLAIMS", "claim_module"]

# in report order
CLAIMS = ("speed", "shift", "learning_rate", "initialization", "regularization", "gradients",
          "small_batch", "recurrent", "cost", "consistency")


def claim_module(name: str) -> ModuleType:
    if name not in CLAIMS:
        raise ValueError(f"--claims: expected names from {', '.join(CLAIMS)}, got {name!r}")
    return importlib.import_module(f"{__name__}.claims.{name}")
