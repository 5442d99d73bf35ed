"""The claims harness behind ``batchnorm reproduce``: one module per claim, run and reported.

Each claim module (``experiments/claims/<name>.py``) defines ``NAME``, ``TITLE``,
``CLAIM``, ``CRITERION``, ``PARAMS`` (per size: ``tiny`` for tests, ``quick``, ``full``),
``SOURCE`` (what the original work reported, :mod:`.sources`), ``run(cfg)`` returning a
:class:`~batchnorm.experiments.result.ClaimResult`, and ``judge(metrics)`` — the per-seed
:class:`~batchnorm.experiments.verdict.Check` s, from the measured numbers only. The verdict is
:func:`~batchnorm.experiments.result.conclude` of those checks, or the module's own ``conclude``
where it has one.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["CLAIMS", "claim_module"]

# in report order
CLAIMS = ("speed", "shift", "learning_rate", "initialization", "regularization", "gradients",
          "small_batch", "recurrent", "cost", "consistency", "mechanism")


def claim_module(name: str) -> ModuleType:
    if name not in CLAIMS:
        raise ValueError(f"--claims: expected names from {', '.join(CLAIMS)}, got {name!r}")
    return importlib.import_module(f"{__name__}.claims.{name}")
