"""Claim 6 — gradient flow: per-layer gradient norms of a deep sigmoid network."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..result import ClaimResult, RunConfig, conclude, figure_png, per_seed_table, pyplot
from ..sources import SOURCES
from ..training import batches, mlp, seed_all, train
from ..verdict import Check

NAME = "gradients"
TITLE = "6. Gradient flow"
CLAIM = ("Batch normalization keeps gradients from vanishing or exploding through a deep "
         "saturating network.")
CRITERION = ("Spread = log10(largest / smallest) of the Linear layers' weight-gradient norms "
             "(median over batches). Two checks per seed, at initialization and after training: "
             "spread without BN minus spread with BN >= 1 decade. Each is supported if its "
             "interval over seeds satisfies it throughout and not supported if it fails "
             "throughout; the claim is supported if both are, not supported if both are not, "
             "inconclusive otherwise.")
PARAMS: dict[str, dict[str, Any]] = {
    "tiny": {"depth": 20, "batches": 2, "steps": 5, "seeds": 2},
    "quick": {"depth": 20, "batches": 3, "steps": 60, "seeds": 3},
    "full": {"depth": 24, "batches": 6, "steps": 200, "seeds": 5},
}
WIDTH = 64
SOURCE = SOURCES[NAME]


def grad_norms(model: nn.Module, data: Any, n_batches: int, seed: int = 0) -> list[float]:
    """Median over ``n_batches`` training batches of each Linear weight's gradient norm."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    it = batches(len(data.y_train), 64, g)
    norms = []
    model.train()
    for _ in range(n_batches):
        idx = next(it)
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
        norms.append([float(m.weight.grad.norm()) for m in linears])  # type: ignore[union-attr]
    model.zero_grad(set_to_none=True)
    model.load_state_dict(saved)  # measuring must not move the running statistics
    return [float(v) for v in np.median(np.array(norms), axis=0)]


def spread(norms: list[float]) -> float:
    positive = [n for n in norms if n > 0 and math.isfinite(n)]
    if len(positive) < len(norms):
        return math.inf  # a layer got no gradient at all (or a non-finite one)
    return math.log10(max(positive) / min(positive))


def judge(m: dict[str, Any]) -> list[Check]:
    checks = []
    for when, label in (("init", "at initialization"), ("trained", "after training")):
        # both infinite (a layer got no gradient either way): no difference to claim
        diff = tuple(0.0 if math.isinf(p) and math.isinf(b) else p - b
                     for p, b in zip(m[f"spread_{when}_plain"], m[f"spread_{when}_bn"],
                                     strict=True))
        checks.append(Check(f"spread without - with BN, {label} (decades)", diff, ">=", 1.0,
                            digits=2))
    return checks


def agreement(m: dict[str, Any]) -> str:
    d = float(np.median(judge(m)[0].values))
    way = "same direction" if d > 0 else "opposite direction"
    return (f"{way}: at initialization BN narrows the gradient-norm spread by {d:.1f} decades "
            "(median); no figure from the source to compare sizes against")


def run(cfg: RunConfig) -> ClaimResult:
    p = PARAMS[cfg.size]
    seeds, data = cfg.seed_list(p["seeds"]), cfg.data
    norms: dict[str, list[list[float]]] = {}
    jobs = [(s, v) for s in seeds for v in ("plain", "bn")]
    for seed, variant in cfg.progress(jobs, desc=NAME):
        seed_all(seed)
        model = mlp(data.features, [WIDTH] * (p["depth"] - 1), activation="sigmoid",
                    norm="ours" if variant == "bn" else "none")
        norms.setdefault(f"init_{variant}", []).append(grad_norms(model, data, p["batches"],
                                                                  seed))
        train(model, data, steps=p["steps"], batch_size=64, lr=0.1, momentum=0.9, seed=seed)
        norms.setdefault(f"trained_{variant}", []).append(grad_norms(model, data, p["batches"],
                                                                     seed))
    metrics: dict[str, Any] = {"seeds": seeds, "depth": p["depth"], "width": WIDTH,
                               "steps": p["steps"], "grad_norms": norms}
    for key, per_seed in norms.items():
        metrics[f"spread_{key}"] = [spread(v) for v in per_seed]
    checks = judge(metrics)
    verdict, lean, reason = conclude(checks)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), sharey=True)
    for ax, when in zip(axes, ("init", "trained"), strict=True):
        layers = np.arange(1, p["depth"] + 1)
        for variant, label, color in (("plain", "without BN", "C0"), ("bn", "with BN", "C1")):
            for i, v in enumerate(norms[f"{when}_{variant}"]):
                ax.semilogy(layers, v, "o-" if variant == "plain" else "s-", ms=2, color=color,
                            alpha=0.9 if i == 0 else 0.35, label=label if i == 0 else None)
        ax.set_xlabel("layer (input → output)")
        ax.set_title("at initialization" if when == "init" else f"after {p['steps']} steps")
    axes[0].set_ylabel("weight-gradient norm")
    axes[0].legend(fontsize=8)
    detail = [["spread (decades)", *(f"seed {s}" for s in seeds)]]
    for key in ("init_plain", "init_bn", "trained_plain", "trained_bn"):
        detail.append([key.replace("_", ", ").replace("plain", "without BN")
                       .replace(", bn", ", with BN"),
                       *(f"{v:.2f}" for v in metrics[f"spread_{key}"])])
    return ClaimResult(NAME, TITLE, CLAIM, CRITERION, verdict, reason, metrics,
                       {"gradient_norms": figure_png(fig)}, per_seed_table(checks, seeds),
                       setup=f"{data.describe()}; {p['depth']}-layer sigmoid MLP of width {WIDTH}, "
                             "PyTorch default init, batch 64, SGD lr 0.1 momentum 0.9, "
                             f"{p['steps']} steps, seeds {', '.join(map(str, seeds))}",
                       checks=checks, lean=lean, source=SOURCE, agreement=agreement(metrics),
                       detail=detail)
