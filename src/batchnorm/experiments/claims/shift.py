"""Claim 2 — internal covariate shift: the paper's Figure 1(b, c).

The network of claim 1 is trained with and without BN while the 15th/50th/85th percentiles of the
inputs of the last hidden layer's sigmoids (BN's output with BN, the Linear output without) are
recorded over training, per unit, on the training batches, by
:class:`batchnorm.tools.monitor.ActivationMonitor` hooked on the last ``nn.Sigmoid``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from ...tools.monitor import ActivationMonitor
from ..result import MIXED, NOT_SUPPORTED, SUPPORTED, ClaimResult, RunConfig, figure_png, pyplot
from ..training import mlp, seed_all, train
from .speed import INIT_STD, LR

NAME = "shift"
TITLE = "2. Internal covariate shift"
CLAIM = ("With batch normalization the distribution of a layer's inputs stays stable during "
         "training (less internal covariate shift).")
CRITERION = ("Drift of a unit = range over training of the median of its sigmoid input, divided "
             "by the mean 15-85 percentile width; averaged over the first 10 units, measured after "
             "the first recorded step. Supported if drift with BN <= half the drift without; not "
             "supported if it is >= the drift without; mixed in between.")
PARAMS: dict[str, dict[str, Any]] = {
    "tiny": {"steps": 40, "every": 5},
    "quick": {"steps": 1000, "every": 20},
    "full": {"steps": 2000, "every": 10},
}
PERCENTILES = (15, 50, 85)
UNITS = 10  # sigmoids followed (Figure 1 follows one; the drift averages over these)


def drift(trace: np.ndarray) -> float:
    """``trace``: (time, 3 percentiles, units) → mean over units of median range / mean width."""
    median = trace[:, 1, :]
    width = (trace[:, 2, :] - trace[:, 0, :]).mean(axis=0)
    rng = median.max(axis=0) - median.min(axis=0)
    return float(np.mean(rng / np.maximum(width, 1e-12)))


def judge(m: dict[str, Any]) -> tuple[str, str]:
    bn, plain = m["drift_bn"], m["drift_plain"]
    reason = f"drift with BN = {bn:.3f}, without BN = {plain:.3f}"
    if bn <= 0.5 * plain:
        return SUPPORTED, reason
    return (NOT_SUPPORTED if bn >= plain else MIXED), reason


def run(cfg: RunConfig) -> ClaimResult:
    p = PARAMS[cfg.size]
    data = cfg.data
    traces: dict[str, np.ndarray] = {}
    steps: dict[str, list[int]] = {}
    for variant in cfg.progress(["plain", "bn"], desc=NAME):
        seed_all(0)
        model = mlp(data.features, [100, 100, 100], norm="ours" if variant == "bn" else "none",
                    activation="sigmoid", init_std=INIT_STD)
        last_sigmoid = [m for m in model if isinstance(m, nn.Sigmoid)][-1]
        monitors = [ActivationMonitor(model, every=p["every"], percentiles=PERCENTILES,
                                      layers=[last_sigmoid], unit=u, gradients=False)
                    for u in range(UNITS)]
        train(model, data, steps=p["steps"], batch_size=60, lr=LR, seed=0)
        per_unit = []
        for mon in monitors:
            mon.remove()
            (rec,) = mon.to_dict()["layers"].values()
            keep = [i for i, s in enumerate(rec["step"]) if s < p["steps"]]  # training only
            per_unit.append([[rec["percentiles"][f"{q:g}"][i] for q in PERCENTILES]
                             for i in keep])
            steps[variant] = [rec["step"][i] for i in keep]
        traces[variant] = np.array(per_unit).transpose(1, 2, 0)  # (time, percentile, unit)
    metrics: dict[str, Any] = {
        "drift_bn": drift(traces["bn"][1:]), "drift_plain": drift(traces["plain"][1:]),
        "percentiles": list(PERCENTILES), "record_steps": steps["bn"],
        "unit0_bn": traces["bn"][:, :, 0].tolist(),
        "unit0_plain": traces["plain"][:, :, 0].tolist(),
    }
    verdict, reason = judge(metrics)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), sharex=True)
    panels = ((axes[0], "plain", "(b) without BN"), (axes[1], "bn", "(c) with BN"))
    for ax, variant, title in panels:
        tr = traces[variant]
        for j, pct in enumerate(PERCENTILES):
            ax.plot(steps[variant], tr[:, j, 0], color="C0", lw=1.5 if pct == 50 else 0.9,
                    ls="-" if pct == 50 else "--", label=f"{pct}th pct")
        ax.set_title(title)
        ax.set_xlabel("training step")
    axes[0].set_ylabel("sigmoid input, unit 0 of last hidden layer")
    axes[0].legend(fontsize=8)
    table = [["", "drift (lower is more stable)"], ["without BN", f"{metrics['drift_plain']:.3f}"],
             ["with BN", f"{metrics['drift_bn']:.3f}"]]
    return ClaimResult(NAME, TITLE, CLAIM, CRITERION, verdict, reason, metrics,
                       {"shift_percentiles": figure_png(fig)}, table,
                       setup=f"{data.describe()}; network and training of claim 1, "
                             f"{p['steps']} steps, percentiles every {p['every']} steps "
                             "(ActivationMonitor)")
