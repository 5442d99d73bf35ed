"""Claim 2 — internal covariate shift: the paper's Figure 1(b, c).

The network of claim 1 (:mod:`.paper_net`, the same runs) is trained with and without BN while
the 15th/50th/85th percentiles of the inputs of the last hidden layer's sigmoids (BN's output
with BN, the Linear output without) are recorded over training, per unit, on the training
batches.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..result import ClaimResult, RunConfig, conclude, figure_png, per_seed_table, pyplot
from ..sources import SOURCES
from ..verdict import Check
from . import paper_net
from .paper_net import PERCENTILES, UNITS, drift

__all__ = ["drift"]

NAME = "shift"
TITLE = "2. Internal covariate shift"
CLAIM = ("With batch normalization the distribution of a layer's inputs stays stable during "
         "training (less internal covariate shift).")
CRITERION = (f"Drift of a unit = range over training of the median of its sigmoid input, divided "
             f"by the mean 15-85 percentile width; averaged over the first {UNITS} units, "
             "measured after the first recorded step. Per seed: drift with BN / drift without. "
             "Supported if the interval over seeds is <= 0.5 throughout, not supported if it is "
             "> 0.5 throughout, inconclusive otherwise.")
PARAMS = paper_net.PARAMS
SOURCE = SOURCES[NAME]


def judge(m: dict[str, Any]) -> list[Check]:
    ratio = tuple(b / p for b, p in zip(m["drift_bn"], m["drift_plain"], strict=True))
    return [Check("drift with BN / without", ratio, "<=", 0.5)]


def agreement(m: dict[str, Any]) -> str:
    ratio = float(np.median([b / p for b, p in zip(m["drift_bn"], m["drift_plain"],
                                                   strict=True)]))
    way = "same direction" if ratio < 1 else "opposite direction"
    return (f"{way}: with BN the median drift is {ratio:.2f} of the drift without; the paper "
            "shows this as curves (Figure 1), with no number to compare sizes against")


def run(cfg: RunConfig) -> ClaimResult:
    p = PARAMS[cfg.size]
    seeds, recs = paper_net.runs(cfg, ("plain", "bn"), NAME)
    metrics: dict[str, Any] = {
        "seeds": seeds, "steps": p["steps"], "every": p["every"],
        "drift_bn": [r["drift"] for r in recs["bn"]],
        "drift_plain": [r["drift"] for r in recs["plain"]],
        "percentiles": list(PERCENTILES), "record_steps": recs["bn"][0]["record_steps"],
        "unit0_bn": recs["bn"][0]["unit0"], "unit0_plain": recs["plain"][0]["unit0"]}
    checks = judge(metrics)
    verdict, lean, reason = conclude(checks)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), sharex=True)
    panels = ((axes[0], "plain", "(b) without BN"), (axes[1], "bn", "(c) with BN"))
    for ax, variant, title in panels:
        rec = recs[variant][0]
        tr = np.array(rec["unit0"])  # (time, percentile)
        for j, pct in enumerate(PERCENTILES):
            ax.plot(rec["record_steps"], tr[:, j], color="C0", lw=1.5 if pct == 50 else 0.9,
                    ls="-" if pct == 50 else "--", label=f"{pct}th pct")
        ax.set_title(f"{title}, seed {seeds[0]}")
        ax.set_xlabel("training step")
    axes[0].set_ylabel("sigmoid input, unit 0 of last hidden layer")
    axes[0].legend(fontsize=8)
    table = per_seed_table(checks, seeds)
    table += [["drift without BN", *(f"{v:.3f}" for v in metrics["drift_plain"]), "", "", ""],
              ["drift with BN", *(f"{v:.3f}" for v in metrics["drift_bn"]), "", "", ""]]
    return ClaimResult(NAME, TITLE, CLAIM, CRITERION, verdict, reason, metrics,
                       {"shift_percentiles": figure_png(fig)}, table,
                       setup=f"{cfg.data.describe()}; network and runs of claim 1, "
                             f"{p['steps']} steps, percentiles every {p['every']} steps, "
                             f"seeds {', '.join(map(str, seeds))}",
                       checks=checks, lean=lean, source=SOURCE, agreement=agreement(metrics))
