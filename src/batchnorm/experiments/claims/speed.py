"""Claim 1 — faster training: Ioffe & Szegedy's MNIST network with and without BN.

The runs are :mod:`.paper_net`'s (shared with claims 2 and 11). Test accuracy is logged every few
steps; the speed-up of a seed is the ratio of steps needed to reach a target test accuracy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..result import ClaimResult, RunConfig, conclude, figure_png, per_seed_table, pyplot
from ..sources import SOURCES
from ..verdict import Check
from . import paper_net
from .paper_net import LR, TARGET

NAME = "speed"
TITLE = "1. Faster training"
CLAIM = "Batch normalization makes a network reach a given accuracy in fewer training steps."
CRITERION = (f"Per seed: steps to reach {TARGET:.0%} test accuracy without BN / with BN (a run "
             "without BN that never gets there counts as the whole step budget, so the ratio is "
             "then a lower bound; BN never getting there counts as ratio 0). Supported if the "
             "interval over seeds is >= 2 throughout, not supported if it is < 2 throughout, "
             "inconclusive otherwise.")
PARAMS = paper_net.PARAMS
SOURCE = SOURCES[NAME]


def judge(m: dict[str, Any]) -> list[Check]:
    return [Check("steps ratio without/with BN", tuple(m["ratio"]), ">=", 2.0, digits=1)]


def agreement(m: dict[str, Any]) -> str:
    med = float(np.median(m["ratio"]))
    way = "same direction" if med > 1 else "opposite direction"
    bound = " (a lower bound: without BN the target was not reached)" \
        if None in m["steps_to_target_plain"] else ""
    return (f"{way}; median speed-up {med:.1f}x{bound} against the paper's 14x on ImageNet "
            "(a different network, data set and target, so only the direction is comparable)")


def run(cfg: RunConfig) -> ClaimResult:
    p = PARAMS[cfg.size]
    seeds, recs = paper_net.runs(cfg, ("plain", "bn"), NAME)
    budget = p["steps"]
    ratio = [paper_net.speedup(pl, bn, budget) for pl, bn in zip(recs["plain"], recs["bn"],
                                                                  strict=True)]
    metrics: dict[str, Any] = {
        "seeds": seeds, "target": TARGET, "steps": budget, "lr": LR, "ratio": ratio,
        "steps_to_target_bn": [r["steps_to_target"] for r in recs["bn"]],
        "steps_to_target_plain": [r["steps_to_target"] for r in recs["plain"]],
        "final_acc_bn": [r["final"] for r in recs["bn"]],
        "final_acc_plain": [r["final"] for r in recs["plain"]],
        "eval_steps": recs["bn"][0]["eval_steps"]}
    checks = judge(metrics)
    verdict, lean, reason = conclude(checks)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for variant, label, color in (("plain", "without BN", "C0"), ("bn", "with BN", "C1")):
        for i, r in enumerate(recs[variant]):
            ax.plot(r["eval_steps"], r["test_acc"], color=color, alpha=0.9 if i == 0 else 0.35,
                    label=label if i == 0 else None)
    ax.axhline(TARGET, color="grey", ls="--", lw=0.8, label=f"target {TARGET:.0%}")
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"MLP 3x100 sigmoid, batch 60, {len(seeds)} seeds")
    ax.legend(loc="lower right")
    table = per_seed_table(checks, seeds)
    table += [["steps to target, without BN", *_steps(metrics["steps_to_target_plain"]),
               "", "", ""],
              ["steps to target, with BN", *_steps(metrics["steps_to_target_bn"]), "", "", ""]]
    return ClaimResult(NAME, TITLE, CLAIM, CRITERION, verdict, reason, metrics,
                       {"speed_accuracy": figure_png(fig)}, table,
                       setup=f"{cfg.data.describe()}; MLP 3x100 sigmoid, weights N(0, 0.1²), "
                             f"{budget} SGD steps of batch 60, lr {LR}, seeds {_list(seeds)}",
                       checks=checks, lean=lean, source=SOURCE, agreement=agreement(metrics))


def _steps(values: list[int | None]) -> list[str]:
    return ["never" if v is None else str(v) for v in values]


def _list(seeds: list[int]) -> str:
    return ", ".join(map(str, seeds))
