"""Claim 4 — less sensitivity to initialization: final accuracy over initial weight scales."""

from __future__ import annotations

from typing import Any

from ..result import MIXED, NOT_SUPPORTED, SUPPORTED, ClaimResult, RunConfig
from ..training import mlp
from .sweep import mean_acc, plot, sweep, table

NAME = "initialization"
TITLE = "4. Less sensitivity to initialization"
CLAIM = "With batch normalization, training succeeds over a much wider range of initial weights."
CRITERION = ("Spread = best minus worst final test accuracy (mean over seeds) across the weight "
             "scales. Supported if the spread with BN is <= half the spread without and BN's "
             "worst accuracy is >= 90% of its best; not supported if the spread with BN is >= "
             "the spread without; mixed otherwise.")
PARAMS: dict[str, dict[str, Any]] = {
    "tiny": {"scales": [0.01, 1.0], "steps": 20, "seeds": 1},
    "quick": {"scales": [0.001, 0.01, 0.1, 1.0, 10.0], "steps": 250, "seeds": 1},
    "full": {"scales": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0], "steps": 300,
             "seeds": 2},
}
LR = 0.1


def judge(m: dict[str, Any]) -> tuple[str, str]:
    bn, plain = m["acc_bn"], m["acc_plain"]
    spread_bn, spread_plain = max(bn) - min(bn), max(plain) - min(plain)
    reason = (f"accuracy spread across scales: with BN {spread_bn:.3f} (worst {min(bn):.3f}), "
              f"without BN {spread_plain:.3f} (worst {min(plain):.3f})")
    if spread_bn <= 0.5 * spread_plain and min(bn) >= 0.9 * max(bn):
        return SUPPORTED, reason
    return (NOT_SUPPORTED if spread_bn >= spread_plain else MIXED), reason


def run(cfg: RunConfig) -> ClaimResult:
    p = PARAMS[cfg.size]
    scales, seeds = p["scales"], cfg.n_seeds(p["seeds"])
    data = cfg.data
    raw = sweep(cfg, NAME, scales, seeds,
                lambda variant, s: mlp(data.features, [100, 100, 100], activation="sigmoid",
                                       norm="ours" if variant == "bn" else "none", init_std=s),
                lambda s: {"steps": p["steps"], "batch_size": 60, "lr": LR, "momentum": 0.9})
    acc = {k: mean_acc(v) for k, v in raw.items()}
    metrics = {"scales": scales, "acc_bn": acc["bn"], "acc_plain": acc["plain"],
               "per_seed_bn": raw["bn"], "per_seed_plain": raw["plain"], "steps": p["steps"]}
    verdict, reason = judge(metrics)
    fig = plot(scales, acc, "std of the initial weights N(0, std²)", "MLP 3x100 sigmoid")
    return ClaimResult(NAME, TITLE, CLAIM, CRITERION, verdict, reason, metrics,
                       {"initialization_sweep": fig}, table(scales, acc, "init std"),
                       setup=f"{data.describe()}; MLP 3x100 sigmoid, lr {LR} momentum 0.9, "
                             f"{p['steps']} steps of batch 60, {seeds} seed(s)")
