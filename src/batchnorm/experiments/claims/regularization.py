"""Claim 5 — regularization: the train/test gap with BN, dropout, both or neither, trained long
on a small training subset so that overfitting is possible."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..result import MIXED, NOT_SUPPORTED, SUPPORTED, ClaimResult, RunConfig, figure_png, pyplot
from ..training import accuracy, mlp, seed_all, train

NAME = "regularization"
TITLE = "5. Regularization"
CLAIM = ("Batch normalization regularizes: it narrows the gap between training and test "
         "accuracy, reducing the need for dropout.")
CRITERION = ("Gap = training-subset accuracy minus test accuracy (eval mode, mean over seeds). "
             "Supported if the gap with BN is at least 2 points below the gap with neither and "
             "BN's test accuracy is not lower than neither's; not supported if BN's gap is >= "
             "neither's; mixed otherwise. Dropout (p=0.5) is shown for comparison.")
PARAMS: dict[str, dict[str, Any]] = {
    "tiny": {"subset": 120, "steps": 20, "seeds": 1},
    "quick": {"subset": 200, "steps": 300, "seeds": 2},
    "full": {"subset": 200, "steps": 800, "seeds": 4},
}
CONFIGS = {"neither": ("none", 0.0), "BN": ("ours", 0.0), "dropout": ("none", 0.5),
           "BN + dropout": ("ours", 0.5)}


def judge(m: dict[str, Any]) -> tuple[str, str]:
    gap, test = m["gap"], m["test_acc"]
    reason = (f"gap with BN {gap['BN']:.3f} vs neither {gap['neither']:.3f} (dropout "
              f"{gap['dropout']:.3f}); test accuracy with BN {test['BN']:.3f} vs neither "
              f"{test['neither']:.3f}")
    if gap["BN"] <= gap["neither"] - 0.02 and test["BN"] >= test["neither"]:
        return SUPPORTED, reason
    return (NOT_SUPPORTED if gap["BN"] >= gap["neither"] else MIXED), reason


def run(cfg: RunConfig) -> ClaimResult:
    p = PARAMS[cfg.size]
    seeds = cfg.n_seeds(p["seeds"])
    small = cfg.data.train_subset(min(p["subset"], len(cfg.data.y_train)))
    train_acc: dict[str, list[float]] = {k: [] for k in CONFIGS}
    test_acc: dict[str, list[float]] = {k: [] for k in CONFIGS}
    jobs = [(name, seed) for seed in range(seeds) for name in CONFIGS]
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
    metrics = {"subset": len(small.y_train), "steps": p["steps"], "train_acc": mean_tr,
               "test_acc": mean_te, "gap": gap, "per_seed_train": train_acc,
               "per_seed_test": test_acc}
    verdict, reason = judge(metrics)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = np.arange(len(CONFIGS))
    ax.bar(xs - 0.2, [mean_tr[k] for k in CONFIGS], 0.4, label="train (subset)", color="C2")
    ax.bar(xs + 0.2, [mean_te[k] for k in CONFIGS], 0.4, label="test", color="C3")
    ax.set_xticks(xs, list(CONFIGS))
    ax.set_ylim(0.5, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title(f"MLP 2x256 ReLU on {len(small.y_train)} training images")
    ax.legend(loc="lower right")
    table = [["", "train acc", "test acc", "gap"]]
    table += [[k, f"{mean_tr[k]:.3f}", f"{mean_te[k]:.3f}", f"{gap[k]:.3f}"] for k in CONFIGS]
    return ClaimResult(NAME, TITLE, CLAIM, CRITERION, verdict, reason, metrics,
                       {"regularization_gap": figure_png(fig)}, table,
                       setup=f"{small.describe()}; MLP 2x256 ReLU, {p['steps']} SGD steps of "
                             f"batch 20, lr 0.05 momentum 0.9, {seeds} seed(s)")
