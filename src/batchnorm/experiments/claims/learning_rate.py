"""Claim 3 — higher learning rates: final accuracy over a log-spaced learning-rate sweep."""

from __future__ import annotations

from typing import Any

from ..result import MIXED, NOT_SUPPORTED, SUPPORTED, ClaimResult, RunConfig
from ..training import mlp
from .sweep import mean_acc, plot, sweep, table

NAME = "learning_rate"
TITLE = "3. Higher learning rates"
CLAIM = "Batch normalization lets a network train well at much higher learning rates."
CRITERION = ("A learning rate is usable if its final test accuracy (mean over seeds) is >= 90% "
             "of the best accuracy of either model. Supported if the largest usable rate with BN "
             "is >= 10x the largest without; not supported if it is <= the largest without (or "
             "BN has none); mixed in between.")
PARAMS: dict[str, dict[str, Any]] = {
    "tiny": {"lrs": [0.1, 3.0], "steps": 20, "seeds": 1},
    "quick": {"lrs": [0.01, 0.1, 1.0, 10.0], "steps": 250, "seeds": 1},
    "full": {"lrs": [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0], "steps": 300, "seeds": 2},
}


def judge(m: dict[str, Any]) -> tuple[str, str]:
    lrs, bn, plain = m["lrs"], m["acc_bn"], m["acc_plain"]
    bar = 0.9 * max(max(bn), max(plain))
    good_bn = [lr for lr, a in zip(lrs, bn, strict=True) if a >= bar]
    good_plain = [lr for lr, a in zip(lrs, plain, strict=True) if a >= bar]
    top_bn = max(good_bn) if good_bn else None
    top_plain = max(good_plain) if good_plain else None
    reason = (f"largest usable learning rate (acc >= {bar:.3f}): with BN {top_bn}, "
              f"without BN {top_plain}")
    if top_bn is None:
        return NOT_SUPPORTED, reason
    if top_plain is None or top_bn >= 10 * top_plain:
        return SUPPORTED, reason
    return (NOT_SUPPORTED if top_bn <= top_plain else MIXED), reason


def run(cfg: RunConfig) -> ClaimResult:
    p = PARAMS[cfg.size]
    lrs, seeds = p["lrs"], cfg.n_seeds(p["seeds"])
    data = cfg.data
    raw = sweep(cfg, NAME, lrs, seeds,
                lambda variant, lr: mlp(data.features, [100, 100, 100], activation="relu",
                                        norm="ours" if variant == "bn" else "none"),
                lambda lr: {"steps": p["steps"], "batch_size": 60, "lr": lr, "momentum": 0.9})
    acc = {k: mean_acc(v) for k, v in raw.items()}
    metrics = {"lrs": lrs, "acc_bn": acc["bn"], "acc_plain": acc["plain"],
               "per_seed_bn": raw["bn"], "per_seed_plain": raw["plain"], "steps": p["steps"]}
    verdict, reason = judge(metrics)
    fig = plot(lrs, acc, "learning rate (SGD, momentum 0.9)", "MLP 3x100 ReLU")
    return ClaimResult(NAME, TITLE, CLAIM, CRITERION, verdict, reason, metrics,
                       {"learning_rate_sweep": fig}, table(lrs, acc, "learning rate"),
                       setup=f"{data.describe()}; MLP 3x100 ReLU, PyTorch default init, "
                             f"{p['steps']} steps of batch 60, {seeds} seed(s)")
