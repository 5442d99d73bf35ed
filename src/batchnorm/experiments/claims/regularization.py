"""Claim 5 — regularization: the train/test gap with BN, dropout, both or neither, trained long
on a small training subset so that overfitting is possible."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..result import ClaimResult, RunConfig, conclude, figure_png, per_seed_table, pyplot
from ..sources import SOURCES
from ..training import accuracy, mlp, seed_all, train
from ..verdict import Check

NAME = "regularization"
TITLE = "5. Regularization"
CLAIM = ("Batch normalization regularizes: it narrows the gap between training and test "
         "accuracy, reducing the need for dropout.")
CRITERION = ("Gap = training-subset accuracy minus test accuracy (eval mode). Two checks per "
             "seed: gap without BN minus gap with BN >= 0.02 (BN narrows the gap by at least 2 "
             "points), and test accuracy with BN minus without >= 0. Each is supported if its "
             "interval over seeds satisfies it throughout and not supported if it fails "
             "throughout; the claim is supported if both are, not supported if both are not, "
             "inconclusive otherwise. Dropout (p=0.5) is shown for comparison.")
PARAMS: dict[str, dict[str, Any]] = {
    "tiny": {"subset": 120, "steps": 20, "seeds": 2},
    "quick": {"subset": 200, "steps": 200, "seeds": 3},
    "full": {"subset": 200, "steps": 500, "seeds": 5},
}
CONFIGS = {"neither": ("none", 0.0), "BN": ("ours", 0.0), "dropout": ("none", 0.5),
           "BN + dropout": ("ours", 0.5)}
SOURCE = SOURCES[NAME]


def judge(m: dict[str, Any]) -> list[Check]:
    tr, te = m["per_seed_train"], m["per_seed_test"]
    gap = {k: [a - b for a, b in zip(tr[k], te[k], strict=True)] for k in ("BN", "neither")}
    narrower = tuple(n - b for n, b in zip(gap["neither"], gap["BN"], strict=True))
    better = tuple(b - n for b, n in zip(te["BN"], te["neither"], strict=True))
    return [Check("gap without BN - gap with BN", narrower, ">=", 0.02),
            Check("test accuracy with BN - without", better, ">=", 0.0)]


def agreement(m: dict[str, Any]) -> str:
    narrower = float(np.median(judge(m)[0].values))
    way = "same direction" if narrower > 0 else "opposite direction"
    return (f"{way}: BN changes the train/test gap by {-narrower:+.3f} (median); the paper "
            "reports dropout becoming unnecessary in some cases, with no gap figure to compare "
            "sizes against")


def run(cfg: RunConfig) -> ClaimResult:
    p = PARAMS[cfg.size]
    seeds = cfg.seed_list(p["seeds"])
    small = cfg.data.train_subset(min(p["subset"], len(cfg.data.y_train)))
    train_acc: dict[str, list[float]] = {k: [] for k in CONFIGS}
    test_acc: dict[str, list[float]] = {k: [] for k in CONFIGS}
    jobs = [(name, seed) for seed in seeds for name in CONFIGS]
    for name, seed in cfg.progress(jobs, desc=NAME):
        norm, dropout = CONFIGS[name]
        seed_all(seed)
        model = mlp(small.features, [256, 256], activation="relu", norm=norm, dropout=dropout)
        hist = train(model, small, steps=p["steps"], batch_size=20, lr=0.05, momentum=0.9,
                     seed=seed)
        train_acc[name].append(accuracy(model, small.x_train, small.y_train))
        test_acc[name].append(hist.final)
    mean_tr = {k: float(np.mean(v)) for k, v in train_acc.items()}
    mean_te = {k: float(np.mean(v)) for k, v in test_acc.items()}
    gap = {k: mean_tr[k] - mean_te[k] for k in CONFIGS}
    metrics = {"seeds": seeds, "subset": len(small.y_train), "steps": p["steps"],
               "train_acc": mean_tr, "test_acc": mean_te, "gap": gap,
               "per_seed_train": train_acc, "per_seed_test": test_acc}
    checks = judge(metrics)
    verdict, lean, reason = conclude(checks)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = np.arange(len(CONFIGS))
    for off, acc, label, color in ((-0.2, train_acc, "train (subset)", "C2"),
                                   (0.2, test_acc, "test", "C3")):
        means = [float(np.mean(acc[k])) for k in CONFIGS]
        err = [[m - min(acc[k]) for m, k in zip(means, CONFIGS, strict=True)],
               [max(acc[k]) - m for m, k in zip(means, CONFIGS, strict=True)]]
        ax.bar(xs + off, means, 0.4, yerr=err, capsize=3, label=label, color=color)
    ax.set_xticks(xs, list(CONFIGS))
    ax.set_ylim(0.5, 1.02)
    ax.set_ylabel("accuracy (mean, min-max over seeds)")
    ax.set_title(f"MLP 2x256 ReLU on {len(small.y_train)} training images")
    ax.legend(loc="lower right")
    detail = [["", "train acc (mean)", "test acc (mean)", "gap (mean)"]]
    detail += [[k, f"{mean_tr[k]:.3f}", f"{mean_te[k]:.3f}", f"{gap[k]:.3f}"] for k in CONFIGS]
    return ClaimResult(NAME, TITLE, CLAIM, CRITERION, verdict, reason, metrics,
                       {"regularization_gap": figure_png(fig)}, per_seed_table(checks, seeds),
                       setup=f"{small.describe()}; MLP 2x256 ReLU, {p['steps']} SGD steps of "
                             f"batch 20, lr 0.05 momentum 0.9, seeds "
                             f"{', '.join(map(str, seeds))}",
                       checks=checks, lean=lean, source=SOURCE, agreement=agreement(metrics),
                       detail=detail)
