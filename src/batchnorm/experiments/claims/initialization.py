"""Claim 4 — less sensitivity to initialization: final accuracy over initial weight scales in
half-decades."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..result import ClaimResult, RunConfig, conclude, per_seed_table
from ..sources import SOURCES
from ..training import mlp
from ..verdict import Check
from .sweep import HALF_DECADES, mean_acc, plot, sweep, table

NAME = "initialization"
TITLE = "4. Less sensitivity to initialization"
CLAIM = "With batch normalization, training succeeds over a much wider range of initial weights."
CRITERION = ("Per seed: spread = best minus worst final test accuracy across the weight scales. "
             "Two checks: spread with BN / spread without <= 0.5, and BN's worst accuracy / its "
             "best >= 0.9. Each is supported if its interval over seeds satisfies it throughout "
             "and not supported if it fails throughout; the claim is supported if both are, not "
             "supported if both are not, inconclusive otherwise.")
PARAMS: dict[str, dict[str, Any]] = {
    "tiny": {"scales": [0.01, 1.0], "steps": 20, "seeds": 2},
    "quick": {"scales": HALF_DECADES, "steps": 100, "seeds": 3},
    "full": {"scales": HALF_DECADES, "steps": 250, "seeds": 5},
}
LR = 0.1
SOURCE = SOURCES[NAME]


def _spread(acc: list[float]) -> float:
    return max(acc) - min(acc)


def _ratio(bn: float, plain: float) -> float:
    if plain > 0:
        return bn / plain
    # without BN equally good at every scale: nothing to halve; equal spreads count as ratio 1
    return 1.0 if bn == 0 else float("inf")


def judge(m: dict[str, Any]) -> list[Check]:
    bn, plain = m["per_seed_bn"], m["per_seed_plain"]
    ratio = tuple(_ratio(_spread(b), _spread(p)) for b, p in zip(bn, plain, strict=True))
    worst = tuple(min(b) / max(b) if max(b) > 0 else 0.0 for b in bn)
    return [Check("accuracy spread, with BN / without", ratio, "<=", 0.5),
            Check("BN's worst / best accuracy", worst, ">=", 0.9)]


def agreement(m: dict[str, Any]) -> str:
    ratio = float(np.median(judge(m)[0].values))
    way = "same direction" if ratio < 1 else "opposite direction"
    return (f"{way}: with BN the accuracy spread over {len(m['scales'])} scales is {ratio:.2f} "
            "of the spread without; the paper states this in words, with no figure to compare "
            "sizes against")


def run(cfg: RunConfig) -> ClaimResult:
    p = PARAMS[cfg.size]
    scales, seeds = p["scales"], cfg.seed_list(p["seeds"])
    data = cfg.data
    raw = sweep(cfg, NAME, scales, seeds,
                lambda variant, s: mlp(data.features, [100, 100, 100], activation="sigmoid",
                                       norm="ours" if variant == "bn" else "none", init_std=s),
                lambda s: {"steps": p["steps"], "batch_size": 60, "lr": LR, "momentum": 0.9})
    metrics: dict[str, Any] = {"seeds": seeds, "scales": scales, "steps": p["steps"],
                               "per_seed_bn": raw["bn"], "per_seed_plain": raw["plain"],
                               "acc_bn": mean_acc(raw["bn"]), "acc_plain": mean_acc(raw["plain"])}
    checks = judge(metrics)
    verdict, lean, reason = conclude(checks)
    return ClaimResult(NAME, TITLE, CLAIM, CRITERION, verdict, reason, metrics,
                       {"initialization_sweep": plot(scales, raw,
                                                     "std of the initial weights N(0, std²)",
                                                     "MLP 3x100 sigmoid")},
                       per_seed_table(checks, seeds),
                       setup=f"{data.describe()}; MLP 3x100 sigmoid, lr {LR} momentum 0.9, "
                             f"{p['steps']} steps of batch 60, weight scales "
                             f"{', '.join(f'{v:g}' for v in scales)}, seeds "
                             f"{', '.join(map(str, seeds))}",
                       checks=checks, lean=lean, source=SOURCE, agreement=agreement(metrics),
                       detail=table(scales, raw, "init std"))
