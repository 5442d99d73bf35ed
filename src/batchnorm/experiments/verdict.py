"""The verdict rule: an interval over seeds set against a claim's threshold.

A claim is measured as one or more :class:`Check` s. A check holds one number per seed (a speed-up,
an accuracy difference, a drift ratio), the comparison the claim predicts (``">="``, ``">"``,
``"<="``, ``"<"``) and a threshold. The interval behind it is:

* with fewer than :data:`BOOTSTRAP_FROM` seeds, the smallest and largest per-seed value: every
  seed must agree before the check is decided;
* from :data:`BOOTSTRAP_FROM` seeds on, a percentile bootstrap interval (:data:`LEVEL`) of the
  median over seeds, resampled with a fixed generator so the same values give the same interval.

A check is **supported** only if the whole interval satisfies the comparison, **not supported**
only if none of it does, and **inconclusive** otherwise; it *leans* the way the median over seeds
falls. A check may carry an indifference zone (``fail_at``): then "not supported" needs the whole
interval beyond that second bar, and the lean is taken halfway between the two. The comparisons
are monotone, so "the whole interval" is "both ends". Several checks combine as: all supported →
supported; all not supported → not supported; otherwise inconclusive, leaning supported only if
every check leans supported (the claim is their conjunction).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["BOOTSTRAP_FROM", "Check", "LEVEL", "decide", "interval", "summary"]

SUPPORTED = "supported"
NOT_SUPPORTED = "not supported"
INCONCLUSIVE = "inconclusive"

# Below this many seeds a bootstrap of the median only reshuffles a handful of values, and its
# interval is narrower than the spread that a reseed actually shows; min/max is the honest one.
BOOTSTRAP_FROM = 10
LEVEL = 0.90
RESAMPLES = 4000

_OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, ">": operator.gt,
                                                   "<=": operator.le, "<": operator.lt}


def interval(values: Sequence[float]) -> tuple[float, float, str]:
    """``(low, high, method)`` over per-seed ``values`` (see the module docstring)."""
    vals = _validated(values, "values")
    if len(vals) < BOOTSTRAP_FROM:
        return min(vals), max(vals), f"min-max of {len(vals)} seeds"
    arr = np.asarray(vals, dtype=np.float64)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(arr), size=(RESAMPLES, len(arr)))
    # "inverted_cdf" picks an observed value: no interpolation, so infinite values stay usable
    meds = np.quantile(arr[idx], 0.5, axis=1, method="inverted_cdf")
    tail = (1 - LEVEL) / 2
    lo = float(np.quantile(meds, tail, method="inverted_cdf"))
    hi = float(np.quantile(meds, 1 - tail, method="inverted_cdf"))
    return lo, hi, f"{LEVEL:.0%} bootstrap interval of the median of {len(vals)} seeds"


def _validated(values: Sequence[float], name: str) -> list[float]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(f"{name}: expected a sequence of numbers, got {type(values).__name__}")
    if len(values) == 0:
        raise ValueError(f"{name}: expected at least one per-seed value, got none")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int | float | np.floating | np.integer):
            raise TypeError(f"{name}: expected numbers, got {type(v).__name__} at seed {i}")
        if math.isnan(v):
            raise ValueError(f"{name}: NaN at seed {i}; a failed run must be given a value")
        out.append(float(v))
    return out


@dataclass(frozen=True)
class Check:
    """One measured quantity, per seed, against the threshold the claim predicts it passes."""

    label: str
    values: tuple[float, ...]
    op: str
    threshold: float
    digits: int = 3  # decimals in the report; negative: scientific notation
    # Optional indifference zone: "not supported" needs the whole interval to fail against
    # ``fail_at`` (a bar beyond ``threshold``), and the lean is taken at their midpoint. For a
    # measure where the claim and its rival predict opposite ends and the middle backs neither.
    fail_at: float | None = None

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"op: expected one of {sorted(_OPS)}, got {self.op!r}")
        for name in ("threshold", "fail_at"):
            v = getattr(self, name)
            if (v is not None or name == "threshold") and (
                    isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)):
                raise ValueError(f"{name}: expected a finite number, got {v!r}")
        if self.fail_at is not None and self.passes(self.fail_at):
            raise ValueError(f"fail_at: expected a value that fails {self.op} {self.threshold}, "
                             f"got {self.fail_at!r}")
        object.__setattr__(self, "values", tuple(_validated(self.values, "values")))

    def passes(self, x: float) -> bool:
        return _OPS[self.op](x, self.threshold)

    def _fails(self, x: float) -> bool:
        """Fails decisively: against ``fail_at`` where there is one, else against the threshold."""
        if self.fail_at is None:
            return not self.passes(x)
        # at or beyond the far bar, whichever way the comparison points
        return x >= self.fail_at if self.op in ("<=", "<") else x <= self.fail_at

    @property
    def interval(self) -> tuple[float, float, str]:
        return interval(self.values)

    @property
    def verdict(self) -> str:
        lo, hi, _ = self.interval
        if self.passes(lo) and self.passes(hi):
            return SUPPORTED
        return NOT_SUPPORTED if self._fails(lo) and self._fails(hi) else INCONCLUSIVE

    @property
    def median(self) -> float:
        return float(np.median(np.asarray(self.values)))

    @property
    def lean(self) -> str:
        bar = self.threshold if self.fail_at is None else (self.threshold + self.fail_at) / 2
        return SUPPORTED if _OPS[self.op](self.median, bar) else NOT_SUPPORTED

    def fmt(self, x: float) -> str:
        if not math.isfinite(x):
            return "inf" if x > 0 else "-inf"
        return f"{x:.1e}" if self.digits < 0 else f"{x:.{self.digits}f}"

    def describe(self) -> str:
        lo, hi, _ = self.interval
        zone = "" if self.fail_at is None else f" (fails beyond {self.fmt(self.fail_at)})"
        return (f"{self.label}: [{self.fmt(lo)}, {self.fmt(hi)}] vs {self.op} "
                f"{self.fmt(self.threshold)}{zone} → {self.verdict}")

    def to_json(self) -> dict[str, object]:
        lo, hi, method = self.interval
        return {"label": self.label, "values": list(self.values), "op": self.op,
                "threshold": self.threshold, "fail_at": self.fail_at, "interval": [lo, hi],
                "method": method,
                "verdict": self.verdict, "lean": self.lean}


def decide(checks: Sequence[Check]) -> tuple[str, str]:
    """``(verdict, lean)`` of a claim measured by ``checks``; lean equals a decided verdict."""
    if not checks:
        raise ValueError("checks: expected at least one check, got none")
    verdicts = {c.verdict for c in checks}
    if verdicts == {SUPPORTED}:
        return SUPPORTED, SUPPORTED
    if verdicts == {NOT_SUPPORTED}:
        return NOT_SUPPORTED, NOT_SUPPORTED
    lean = SUPPORTED if all(c.lean == SUPPORTED for c in checks) else NOT_SUPPORTED
    return INCONCLUSIVE, lean


def summary(checks: Sequence[Check]) -> str:
    """One line: every check's interval, threshold and verdict."""
    return "; ".join(c.describe() for c in checks)
