"""Claim 11 — the mechanism: does BN speed training up *because* it reduces internal covariate
shift? Santurkar et al. 2018's test, on the network of claims 1 and 2.

A third variant of :mod:`.paper_net`, *noisy BN*, adds noise after every BN layer whose mean and
spread change at every step (:mod:`batchnorm.experiments.noisy`), so that the inputs of the
sigmoids shift more than without BN at all. If BN helped by keeping those inputs stable, noisy BN
would lose BN's speed-up. The shift is measured exactly as in claim 2 (same runs for BN and no
BN); the speed as the area under the test-accuracy curve. Beside it, the smoothness of the loss
along the gradient step (:mod:`batchnorm.experiments.landscape`) for BN and no BN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..result import ClaimResult, RunConfig, figure_png, per_seed_table, pyplot
from ..sources import SOURCES
from ..verdict import INCONCLUSIVE, SUPPORTED, Check, summary
from . import paper_net
from .paper_net import ETAS, LR, NOISE_MEAN, NOISE_STD

NAME = "mechanism"
TITLE = "11. The mechanism"
CLAIM = ("BN's speed-up comes from reducing internal covariate shift (Ioffe & Szegedy's "
         "explanation, put to Santurkar et al.'s test).")
# The explanation predicts a share near 0 (noisy BN trains like no BN), Santurkar et al.'s
# finding a share near 1; the middle third backs neither, so it is an indifference zone.
LOST, KEPT = 1 / 3, 2 / 3
CRITERION = ("Per seed, speed = mean test accuracy over training (area under the curve); share of "
             "BN's speed-up that noisy BN keeps = (speed noisy - speed without BN) / (speed BN - "
             "speed without BN). The explanation predicts noisy BN, whose inputs shift more than "
             "without BN, loses the speed-up (share near 0); Santurkar et al. found it keeps it "
             "(share near 1). Supported if the share is <= 1/3 throughout the interval over "
             "seeds, not supported if it is >= 2/3 throughout, inconclusive otherwise (leaning "
             "by the median against 1/2). Precondition, checked the same way: noisy BN's drift "
             "(claim 2's measure) / the drift without BN >= 1; where it is not supported the "
             "verdict is inconclusive (the noise did not raise the shift enough to test "
             "anything). The loss and gradient variation along the step are reported beside it, "
             "not judged.")
PARAMS = paper_net.PARAMS
SOURCE = SOURCES[NAME]


def _speed(rec: dict[str, Any]) -> float:
    return float(np.mean(rec["test_acc"]))


def retained(noisy: float, bn: float, plain: float) -> float:
    """Share of BN's advantage over no BN that noisy BN keeps (1: all of it, 0: none)."""
    if bn <= plain:
        return 1.0  # BN has no speed-up here, so adding shift back cannot take one away
    return (noisy - plain) / (bn - plain)


def judge(m: dict[str, Any]) -> list[Check]:
    shift = tuple(n / p for n, p in zip(m["drift_noisy"], m["drift_plain"], strict=True))
    share = tuple(retained(n, b, p) for n, b, p in zip(m["speed_noisy"], m["speed_bn"],
                                                         m["speed_plain"], strict=True))
    return [Check("precondition: drift noisy BN / without BN", shift, ">=", 1.0, digits=2),
            Check("share of BN's speed-up noisy BN keeps", share, "<=", LOST, digits=2,
                  fail_at=KEPT)]


def conclude(checks: Sequence[Check]) -> tuple[str, str, str]:
    """The speed check decides, if the precondition holds; otherwise inconclusive."""
    pre, speed = checks
    if pre.verdict == SUPPORTED:
        return speed.verdict, speed.lean, summary(checks)
    return INCONCLUSIVE, speed.lean, summary(checks)


def agreement(m: dict[str, Any]) -> str:
    share = float(np.median(judge(m)[1].values))
    ours = "keeps most" if share >= KEPT else ("loses most" if share <= LOST else
                                               "keeps between a third and two thirds")
    same = "agrees with" if share >= KEPT else ("disagrees with" if share <= LOST else
                                                "neither confirms nor refutes")
    loss = float(np.median([p / b for p, b in zip(m["loss_variation_plain"],
                                                  m["loss_variation_bn"], strict=True)]))
    return (f"noisy BN {ours} of BN's speed-up (median share kept {share:.2f}), which "
            f"{same} Santurkar et al.'s finding that it still trains well; the loss varies "
            f"{loss:.2f}x as much along the step without BN as with it (median), "
            f"{'the same' if loss > 1 else 'the opposite'} direction as their smoother "
            "landscape with BN")


def run(cfg: RunConfig) -> ClaimResult:
    p = PARAMS[cfg.size]
    seeds, recs = paper_net.runs(cfg, ("plain", "bn", "noisy"), NAME)
    metrics: dict[str, Any] = {"seeds": seeds, "steps": p["steps"], "lr": LR,
                               "noise_mean_range": NOISE_MEAN, "noise_std_range": NOISE_STD,
                               "etas": list(ETAS)}
    for v in ("plain", "bn", "noisy"):
        metrics[f"drift_{v}"] = [r["drift"] for r in recs[v]]
        metrics[f"speed_{v}"] = [_speed(r) for r in recs[v]]
        metrics[f"final_{v}"] = [r["final"] for r in recs[v]]
        metrics[f"steps_to_target_{v}"] = [r["steps_to_target"] for r in recs[v]]
    for v in ("plain", "bn"):
        metrics[f"loss_variation_{v}"] = [r["loss_variation"] for r in recs[v]]
        metrics[f"grad_variation_{v}"] = [r["grad_variation"] for r in recs[v]]
    checks = judge(metrics)
    verdict, lean, reason = conclude(checks)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    names = {"plain": "without BN", "bn": "BN", "noisy": "noisy BN"}
    for v, color in (("plain", "C0"), ("bn", "C1"), ("noisy", "C2")):
        for i, r in enumerate(recs[v]):
            axes[0].plot(r["eval_steps"], r["test_acc"], color=color,
                         alpha=0.9 if i == 0 else 0.35, label=names[v] if i == 0 else None)
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel("test accuracy")
    axes[0].set_title("training speed")
    axes[0].legend(loc="lower right", fontsize=8)
    xs = np.arange(3)
    drifts = [metrics[f"drift_{v}"] for v in ("plain", "bn", "noisy")]
    axes[1].bar(xs, [float(np.median(d)) for d in drifts], color=["C0", "C1", "C2"],
                yerr=[[float(np.median(d)) - min(d) for d in drifts],
                      [max(d) - float(np.median(d)) for d in drifts]], capsize=3)
    axes[1].set_xticks(xs, [names[v] for v in ("plain", "bn", "noisy")])
    axes[1].set_yscale("log")
    axes[1].set_ylabel("drift of the sigmoid inputs (claim 2)")
    axes[1].set_title("internal covariate shift (median, min-max)")
    detail = [["per seed", *(f"seed {s}" for s in seeds)]]
    for key, label in (("drift", "drift (claim 2's measure)"),
                       ("speed", "mean test accuracy over training"),
                       ("final", "final test accuracy")):
        for v in ("plain", "bn", "noisy"):
            detail.append([f"{label}, {names[v]}",
                           *(f"{x:.3f}" for x in metrics[f"{key}_{v}"])])
    for key, label in (("loss_variation", "loss range along the step"),
                       ("grad_variation", "largest gradient change along the step")):
        for v in ("plain", "bn"):
            detail.append([f"{label}, {names[v]}", *(f"{x:.3f}" for x in metrics[f"{key}_{v}"])])
    return ClaimResult(NAME, TITLE, CLAIM, CRITERION, verdict, reason, metrics,
                       {"mechanism": figure_png(fig)}, per_seed_table(checks, seeds),
                       setup=f"{cfg.data.describe()}; the runs of claims 1 and 2 plus noisy BN: "
                             f"after every BN, per step and unit a mean ~ U(-{NOISE_MEAN:g}, "
                             f"{NOISE_MEAN:g}) and a std ~ U(0, {NOISE_STD:g}), per activation "
                             f"mean + std·N(0, 1) added (training only); {p['steps']} steps, lr "
                             f"{LR}; loss and gradient variation at {paper_net.PROBES} points of "
                             f"training, steps of {', '.join(f'{e:g}' for e in ETAS)} times the "
                             f"gradient on a fixed batch of 60; seeds "
                             f"{', '.join(map(str, seeds))}",
                       checks=checks, lean=lean, source=SOURCE, agreement=agreement(metrics),
                       detail=detail)
