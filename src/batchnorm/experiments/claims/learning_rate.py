"""Claim 3 — higher learning rates: final accuracy over a learning-rate sweep in half-decades."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..result import ClaimResult, RunConfig, conclude, per_seed_table
from ..sources import SOURCES
from ..training import mlp
from ..verdict import Check
from .sweep import HALF_DECADES, mean_acc, plot, sweep, table

NAME = "learning_rate"
TITLE = "3. Higher learning rates"
CLAIM = "Batch normalization lets a network train well at much higher learning rates."
MULTIPLE = 5.0  # Ioffe & Szegedy's smallest learning-rate multiple (BN-x5)
CRITERION = ("Per seed: a learning rate is usable if its final test accuracy is >= 90% of the "
             "best accuracy of either model in that seed; the measure is the largest usable rate "
             "with BN / the largest without (infinite if only BN has one, 0 if BN has none). "
             f"Supported if the interval over seeds is >= {MULTIPLE:g} (BN-x5's multiple; on a "
             "half-decade grid, two steps) throughout, not supported if it is < "
             f"{MULTIPLE:g} throughout, inconclusive otherwise.")
PARAMS: dict[str, dict[str, Any]] = {
    "tiny": {"lrs": [0.1, 3.0], "steps": 20, "seeds": 2},
    "quick": {"lrs": HALF_DECADES, "steps": 100, "seeds": 3},
    "full": {"lrs": HALF_DECADES, "steps": 250, "seeds": 5},
}
SOURCE = SOURCES[NAME]


def largest_usable(lrs: list[float], bn: list[float], plain: list[float]) -> tuple[float | None,
                                                                                   float | None]:
    bar = 0.9 * max(max(bn), max(plain))
    good_bn = [lr for lr, a in zip(lrs, bn, strict=True) if a >= bar]
    good_plain = [lr for lr, a in zip(lrs, plain, strict=True) if a >= bar]
    return (max(good_bn) if good_bn else None), (max(good_plain) if good_plain else None)


def ratio(top_bn: float | None, top_plain: float | None) -> float:
    if top_bn is None:
        return 0.0
    return math.inf if top_plain is None else top_bn / top_plain


def judge(m: dict[str, Any]) -> list[Check]:
    ratios = tuple(ratio(*largest_usable(m["lrs"], bn, pl))
                   for bn, pl in zip(m["per_seed_bn"], m["per_seed_plain"], strict=True))
    return [Check("largest usable lr, with BN / without", ratios, ">=", MULTIPLE, digits=2)]


def agreement(m: dict[str, Any]) -> str:
    med = float(np.median(judge(m)[0].values))
    way = "same direction" if med > 1 else ("no difference" if med == 1 else
                                            "opposite direction")
    return (f"{way}; median multiple {med:.3g} against the paper's 5x (BN-x5) and 30x (BN-x30) "
            "on ImageNet, where 5x without BN diverged")


def run(cfg: RunConfig) -> ClaimResult:
    p = PARAMS[cfg.size]
    lrs, seeds = p["lrs"], cfg.seed_list(p["seeds"])
    data = cfg.data
    raw = sweep(cfg, NAME, lrs, seeds,
                lambda variant, lr: mlp(data.features, [100, 100, 100], activation="relu",
                                        norm="ours" if variant == "bn" else "none"),
                lambda lr: {"steps": p["steps"], "batch_size": 60, "lr": lr, "momentum": 0.9})
    metrics: dict[str, Any] = {"seeds": seeds, "lrs": lrs, "steps": p["steps"],
                               "per_seed_bn": raw["bn"], "per_seed_plain": raw["plain"],
                               "acc_bn": mean_acc(raw["bn"]), "acc_plain": mean_acc(raw["plain"])}
    tops = [largest_usable(lrs, bn, pl) for bn, pl in zip(raw["bn"], raw["plain"], strict=True)]
    metrics["largest_usable_bn"] = [t[0] for t in tops]
    metrics["largest_usable_plain"] = [t[1] for t in tops]
    checks = judge(metrics)
    verdict, lean, reason = conclude(checks)
    rows = per_seed_table(checks, seeds)
    rows += [["largest usable lr, with BN", *(f"{t[0]:g}" if t[0] else "none" for t in tops),
              "", "", ""],
             ["largest usable lr, without", *(f"{t[1]:g}" if t[1] else "none" for t in tops),
              "", "", ""]]
    return ClaimResult(NAME, TITLE, CLAIM, CRITERION, verdict, reason, metrics,
                       {"learning_rate_sweep": plot(lrs, raw, "learning rate (SGD, momentum 0.9)",
                                                    "MLP 3x100 ReLU")},
                       rows,
                       setup=f"{data.describe()}; MLP 3x100 ReLU, PyTorch default init, "
                             f"{p['steps']} steps of batch 60, learning rates "
                             f"{', '.join(f'{v:g}' for v in lrs)}, seeds "
                             f"{', '.join(map(str, seeds))}",
                       checks=checks, lean=lean, source=SOURCE, agreement=agreement(metrics),
                       detail=table(lrs, raw, "learning rate"))
