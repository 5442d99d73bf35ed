"""Claim 7 — small batches: test accuracy against batch size for BN, Batch Renorm, ghost BN and
PyTorch's GroupNorm (which uses no batch statistics) on a small CNN."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from torch import nn

from ..result import ClaimResult, RunConfig, combine, figure_png, pyplot
from ..training import bn2d, cnn, seed_all, train

NAME = "small_batch"
TITLE = "7. Small batches"
CLAIM = ("Batch normalization degrades with small batches, where batch-independent "
         "normalization (GroupNorm) and Batch Renormalization hold up.")
CRITERION = ("Drop = test accuracy at the largest batch minus at the smallest (mean over seeds), "
             "same number of training examples seen at every batch size. Two checks: BN's drop "
             "exceeds GroupNorm's by >= 3 points; Batch Renorm beats BN at the smallest batch. "
             "Both pass: supported; neither: not supported; one: mixed.")
PARAMS: dict[str, dict[str, Any]] = {
    "tiny": {"batches": [2, 8], "examples": 64, "seeds": 1},
    "quick": {"batches": [2, 8, 32], "examples": 1200, "seeds": 1},
    "full": {"batches": [2, 4, 8, 16, 32, 64], "examples": 2400, "seeds": 2},
}
CHANNELS = 8
GHOST_VIRTUAL = 4  # ghost BN's virtual batch; at batch <= 4 it is plain BN by construction
BASE_LR = 0.02  # SGD momentum 0.9 at batch 8; scaled linearly with the batch size


def _factories() -> dict[str, Callable[[int], nn.Module]]:
    from ...nn.ghost import GhostBatchNorm2d
    from ...nn.renorm import BatchRenorm2d

    return {
        "BN": bn2d("ours"),
        # the warm-up lets r, d open up over the first steps, as the paper's schedule does
        "Batch Renorm": lambda c: BatchRenorm2d(c, rmax=3.0, dmax=5.0, warmup_steps=100),
        "ghost BN": lambda c: GhostBatchNorm2d(c, virtual_batch_size=GHOST_VIRTUAL),
        "GroupNorm": lambda c: nn.GroupNorm(4, c),
    }


def judge(m: dict[str, Any]) -> tuple[str, str]:
    acc = m["acc"]

    def drop(k: str) -> float:
        return acc[k][-1] - acc[k][0]

    small = m["batches"][0]
    checks = [drop("BN") - drop("GroupNorm") >= 0.03, acc["Batch Renorm"][0] > acc["BN"][0]]
    reason = (f"drop from batch {m['batches'][-1]} to {small}: BN {drop('BN'):.3f}, GroupNorm "
              f"{drop('GroupNorm'):.3f}, Batch Renorm {drop('Batch Renorm'):.3f}, ghost BN "
              f"{drop('ghost BN'):.3f}; at batch {small}: Batch Renorm "
              f"{acc['Batch Renorm'][0]:.3f} vs BN {acc['BN'][0]:.3f}")
    return combine(checks), reason


def run(cfg: RunConfig) -> ClaimResult:
    p = PARAMS[cfg.size]
    factories = _factories()  # ImportError here: reported as unavailable by the runner
    seeds, sizes, data = cfg.n_seeds(p["seeds"]), p["batches"], cfg.data
    raw: dict[str, list[list[float]]] = {k: [[] for _ in sizes] for k in factories}
    jobs = [(k, i, b, s) for s in range(seeds) for i, b in enumerate(sizes) for k in factories]
    for kind, i, bsz, seed in cfg.progress(jobs, desc=NAME):
        seed_all(seed)
        model = cnn(factories[kind], data.side, CHANNELS)
        hist = train(model, data, steps=max(1, p["examples"] // bsz), batch_size=bsz,
                     lr=BASE_LR * bsz / 8, momentum=0.9, seed=seed)
        raw[kind][i].append(hist.final)
    acc = {k: [float(np.mean(v)) for v in per] for k, per in raw.items()}
    metrics = {"batches": sizes, "examples": p["examples"], "acc": acc, "per_seed": raw,
               "ghost_virtual_batch": GHOST_VIRTUAL}
    verdict, reason = judge(metrics)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for kind, marker in zip(acc, "osd^", strict=True):
        ax.semilogx(sizes, acc[kind], marker + "-", label=kind, base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"small CNN, {p['examples']} training examples seen")
    ax.legend(loc="lower right")
    table = [["batch", *acc]] + [[str(b), *(f"{acc[k][i]:.3f}" for k in acc)]
                                 for i, b in enumerate(sizes)]
    return ClaimResult(NAME, TITLE, CLAIM, CRITERION, verdict, reason, metrics,
                       {"small_batch": figure_png(fig)}, table,
                       setup=f"{data.describe()}; CNN conv{CHANNELS}-conv{2 * CHANNELS} 3x3 + "
                             f"norm + ReLU, SGD momentum 0.9, lr {BASE_LR}·batch/8, "
                             f"{p['examples']} examples per run, {seeds} seed(s); ghost BN "
                             f"virtual batch {GHOST_VIRTUAL}; GroupNorm 4 groups")
