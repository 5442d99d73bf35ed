"""What an experiment hands back, how its verdict is computed, and the run settings it receives.

A verdict is never written by hand: each claim module has a ``judge(metrics)`` function that maps
the measured per-seed numbers to :class:`~batchnorm.experiments.verdict.Check` s, and
:func:`conclude` turns those into one of :data:`VERDICTS`, the way it leans, and a sentence
quoting every interval, under a criterion stated in words (``CRITERION``) that the report prints
next to it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .verdict import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Check, decide, summary

__all__ = ["ClaimResult", "RunConfig", "SUPPORTED", "NOT_SUPPORTED", "INCONCLUSIVE",
           "UNAVAILABLE", "VERDICTS", "conclude", "figure_png"]

# a component the experiment needs (a variant, a tool) is not installed in this tree
UNAVAILABLE = "unavailable"
VERDICTS = (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE, UNAVAILABLE)

SIZES = ("tiny", "quick", "full")


@dataclass
class RunConfig:
    """Settings every experiment receives.

    ``size`` picks the experiment's own parameter set (``tiny`` for tests, ``quick`` for
    ``--quick``, ``full``); ``seeds`` overrides the number of seeds (``None``: the size's
    default); ``base_seed`` is the first seed (``--seed``), the others follow it.
    ``progress(iterable, desc, total)`` wraps loops. ``cache`` holds training runs that several
    claims share (claims 1, 2 and 11 train the same network), keyed by what defines the run.
    """

    data: Any  # data.Dataset (typed loosely to keep this module free of torch)
    size: str = "full"
    seeds: int | None = None
    progress: Callable[..., Iterable[Any]] = field(default=lambda it, **_: it)
    base_seed: int = 0
    cache: dict[Any, Any] = field(default_factory=dict)

    def n_seeds(self, default: int) -> int:
        return self.seeds if self.seeds is not None else default

    def seed_list(self, default: int) -> list[int]:
        """The seeds a claim runs: ``base_seed``, ``base_seed + 1``, ..."""
        return [self.base_seed + i for i in range(self.n_seeds(default))]


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
    checks: list[Check] = field(default_factory=list)
    lean: str = ""  # the verdict the median over seeds points to (equals a decided verdict)
    source: dict[str, str] = field(default_factory=dict)  # what the original work reported
    agreement: str = ""  # our measurement against the source's, in direction and size
    detail: list[list[str]] = field(default_factory=list)  # a second table (first row: header)

    @property
    def shown_verdict(self) -> str:
        if self.verdict == INCONCLUSIVE:
            return f"{INCONCLUSIVE} (leans {self.lean})"
        return self.verdict

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "claim": self.claim,
                "criterion": self.criterion, "verdict": self.verdict, "lean": self.lean,
                "reason": self.reason, "checks": [c.to_json() for c in self.checks],
                "source": self.source, "agreement": self.agreement,
                "setup": self.setup, "metrics": self.metrics, "table": self.table,
                "detail": self.detail,
                "figures": [f"{name}.png" for name in self.figures],
                "seconds": round(self.seconds, 3)}


def conclude(checks: Sequence[Check]) -> tuple[str, str, str]:
    """``(verdict, lean, reason)`` of a claim measured by ``checks``."""
    verdict, lean = decide(checks)
    return verdict, lean, summary(checks)


def per_seed_table(checks: Sequence[Check], seeds: Sequence[int]) -> list[list[str]]:
    """One row per check: the per-seed values, the interval, the threshold, the verdict."""
    rows = [["check", *(f"seed {s}" for s in seeds), "interval", "threshold", "verdict"]]
    for c in checks:
        if len(c.values) != len(seeds):
            raise ValueError(f"seeds: {len(seeds)} given for a check with {len(c.values)} "
                             "values")
        lo, hi, _ = c.interval
        rows.append([c.label, *(c.fmt(v) for v in c.values), f"[{c.fmt(lo)}, {c.fmt(hi)}]",
                     f"{c.op} {c.fmt(c.threshold)}", c.verdict])
    return rows


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
