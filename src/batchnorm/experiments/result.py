"""What an experiment hands back, how a verdict is computed, and the run settings it receives.

A verdict is never written by hand: each claim module has a ``judge(metrics)`` function that maps
measured numbers to one of :data:`VERDICTS` plus a sentence quoting the numbers, under a criterion
stated in words (``CRITERION``) that the report prints next to it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ClaimResult", "RunConfig", "SUPPORTED", "NOT_SUPPORTED", "MIXED", "UNAVAILABLE",
           "VERDICTS", "combine", "figure_png"]

SUPPORTED = "supported"
NOT_SUPPORTED = "not supported"
MIXED = "mixed"
# a component the experiment needs (a variant, a tool) is not installed in this tree
UNAVAILABLE = "unavailable"
VERDICTS = (SUPPORTED, NOT_SUPPORTED, MIXED, UNAVAILABLE)

SIZES = ("tiny", "quick", "full")


@dataclass
class RunConfig:
    """Settings every experiment receives.

    ``size`` picks the experiment's own parameter set (``tiny`` for tests, ``quick`` for
    ``--quick``, ``full``); ``seeds`` overrides the number of seeds of experiments whose variance
    matters (``None``: the size's default). ``progress(iterable, desc, total)`` wraps loops.
    """

    data: Any  # data.Dataset (typed loosely to keep this module free of torch)
    size: str = "full"
    seeds: int | None = None
    progress: Callable[..., Iterable[Any]] = field(default=lambda it, **_: it)

    def n_seeds(self, default: int) -> int:
        return self.seeds if self.seeds is not None else default


@dataclass
class ClaimResult:
    name: str
    title: str
    claim: str
    criterion: str
    verdict: str
    reason: str
    metrics: dict[str, Any]
    figures: dict[str, bytes] = field(default_factory=dict)  # figure name -> PNG bytes
    table: list[list[str]] = field(default_factory=list)  # first row is the header
    setup: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "claim": self.claim,
                "criterion": self.criterion, "verdict": self.verdict, "reason": self.reason,
                "setup": self.setup, "metrics": self.metrics, "table": self.table,
                "figures": [f"{name}.png" for name in self.figures],
                "seconds": round(self.seconds, 3)}


def combine(checks: Sequence[bool]) -> str:
    """All checks pass → supported; none → not supported; some → mixed."""
    if not checks:
        raise ValueError("checks: expected at least one check, got none")
    passed = sum(bool(c) for c in checks)
    if passed == len(checks):
        return SUPPORTED
    return NOT_SUPPORTED if passed == 0 else MIXED


def figure_png(fig: Any) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    return f"{x:.{digits}f}"
