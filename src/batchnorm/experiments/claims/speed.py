"""Claim 1 — faster training: Ioffe & Szegedy's MNIST network with and without BN.

Fully connected, 3 hidden layers of 100 sigmoid units, batch 60, weights from N(0, 0.1²) (the
paper's "small random Gaussian values"), plain SGD. Test accuracy is logged every few steps; the
speed-up is the ratio of steps needed to reach a target test accuracy.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

from ..result import MIXED, NOT_SUPPORTED, SUPPORTED, ClaimResult, RunConfig, figure_png, pyplot
from ..training import mlp, seed_all, train

NAME = "speed"
TITLE = "1. Faster training"
CLAIM = "Batch normalization makes a network reach a given accuracy in fewer training steps."
TARGET = 0.90
CRITERION = (f"Steps to reach {TARGET:.0%} test accuracy, without BN / with BN, median over seeds "
             "(a run that never reaches the target counts as the full step budget, so the ratio "
             "is then a lower bound). Supported if the ratio is >= 2; not supported if it is <= 1 "
             "or BN never reaches the target; mixed in between.")
PARAMS: dict[str, dict[str, Any]] = {
    "tiny": {"steps": 40, "eval_every": 10, "seeds": 1},
    "quick": {"steps": 1000, "eval_every": 20, "seeds": 1},
    "full": {"steps": 2000, "eval_every": 20, "seeds": 3},
}
LR = 0.5
INIT_STD = 0.1


def judge(m: dict[str, Any]) -> tuple[str, str]:
    total = m["steps"]
    bn, plain = m["steps_to_target_bn"], m["steps_to_target_plain"]
    if all(s is None for s in bn):
        return NOT_SUPPORTED, (f"with BN the {m['target']:.0%} target was never reached in "
                               f"{total} steps")
    ratios = [(p if p is not None else total) / (b if b is not None else float("inf"))
              for b, p in zip(bn, plain, strict=True)]
    ratio = statistics.median(ratios)
    bound = " (lower bound: without BN the target was not reached)" if None in plain else ""
    reason = f"median steps ratio without/with BN = {ratio:.2f}{bound}"
    if ratio >= 2:
        return SUPPORTED, reason
    return (NOT_SUPPORTED if ratio <= 1 else MIXED), reason


def run(cfg: RunConfig) -> ClaimResult:
    p = PARAMS[cfg.size]
    seeds = range(cfg.n_seeds(p["seeds"]))
    data = cfg.data
    curves: dict[str, list[list[float]]] = {"bn": [], "plain": []}
    reached: dict[str, list[int | None]] = {"bn": [], "plain": []}
    steps_axis: list[int] = []
    jobs = [(variant, seed) for seed in seeds for variant in ("bn", "plain")]
    for variant, seed in cfg.progress(jobs, desc=NAME):
        seed_all(seed)
        model = mlp(data.features, [100, 100, 100], norm="ours" if variant == "bn" else "none",
                    activation="sigmoid", init_std=INIT_STD)
        hist = train(model, data, steps=p["steps"], batch_size=60, lr=LR, seed=seed,
                     eval_every=p["eval_every"])
        curves[variant].append(hist.test_acc)
        reached[variant].append(hist.steps_to(TARGET))
        steps_axis = hist.steps
    metrics = {"target": TARGET, "steps": p["steps"], "lr": LR, "init_std": INIT_STD,
               "steps_to_target_bn": reached["bn"], "steps_to_target_plain": reached["plain"],
               "final_acc_bn": [c[-1] for c in curves["bn"]],
               "final_acc_plain": [c[-1] for c in curves["plain"]],
               "eval_steps": steps_axis,
               "acc_curve_bn_mean": _mean_curve(curves["bn"]),
               "acc_curve_plain_mean": _mean_curve(curves["plain"])}
    verdict, reason = judge(metrics)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for variant, label in (("plain", "without BN"), ("bn", "with BN")):
        for i, c in enumerate(curves[variant]):
            ax.plot(steps_axis[:len(c)], c, color="C0" if variant == "plain" else "C1",
                    alpha=0.9 if i == 0 else 0.4, label=label if i == 0 else None)
    ax.axhline(TARGET, color="grey", ls="--", lw=0.8, label=f"target {TARGET:.0%}")
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    ax.set_title("MLP 3x100 sigmoid, batch 60")
    ax.legend(loc="lower right")
    table = [["", "steps to target (per seed)", "final test accuracy (mean)"],
             ["without BN", _steps(reached["plain"]), f"{np.mean(metrics['final_acc_plain']):.3f}"],
             ["with BN", _steps(reached["bn"]), f"{np.mean(metrics['final_acc_bn']):.3f}"]]
    return ClaimResult(NAME, TITLE, CLAIM, CRITERION, verdict, reason, metrics,
                       {"speed_accuracy": figure_png(fig)}, table,
                       setup=f"{data.describe()}; {p['steps']} SGD steps, lr {LR}, "
                             f"{len(seeds)} seed(s)")


def _mean_curve(curves: list[list[float]]) -> list[float]:
    n = min(len(c) for c in curves)
    return [float(np.mean([c[i] for c in curves])) for i in range(n)]


def _steps(values: list[int | None]) -> str:
    return ", ".join("never" if v is None else str(v) for v in values)


