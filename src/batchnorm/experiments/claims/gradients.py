"""Claim 6 — gradient flow: per-layer gradient norms of a deep sigmoid network."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..result import ClaimResult, RunConfig, combine, figure_png, pyplot
from ..training import batches, mlp, seed_all, train

NAME = "gradients"
TITLE = "6. Gradient flow"
CLAIM = ("Batch normalization keeps gradients from vanishing or exploding through a deep "
         "saturating network.")
CRITERION = ("Spread = log10(largest / smallest) of the Linear layers' weight-gradient norms "
             "(median over batches). Two checks, at initialization and after training: the "
             "spread with BN is at least one decade smaller than without. Both pass: supported; "
             "neither: not supported; one: mixed.")
PARAMS: dict[str, dict[str, Any]] = {
    "tiny": {"depth": 20, "batches": 2, "steps": 5},
    "quick": {"depth": 20, "batches": 4, "steps": 100},
    "full": {"depth": 24, "batches": 10, "steps": 400},
}
WIDTH = 64


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


def judge(m: dict[str, Any]) -> tuple[str, str]:
    checks = [m[f"spread_{when}_bn"] <= m[f"spread_{when}_plain"] - 1
              for when in ("init", "trained")]
    reason = (f"spread at init: with BN {m['spread_init_bn']:.2f} vs without "
              f"{m['spread_init_plain']:.2f} decades; after {m['steps']} steps: with BN "
              f"{m['spread_trained_bn']:.2f} vs without {m['spread_trained_plain']:.2f}")
    return combine(checks), reason


def run(cfg: RunConfig) -> ClaimResult:
    p = PARAMS[cfg.size]
    data = cfg.data
    norms: dict[str, list[float]] = {}
    for variant in cfg.progress(["plain", "bn"], desc=NAME):
        seed_all(0)
        model = mlp(data.features, [WIDTH] * (p["depth"] - 1), activation="sigmoid",
                    norm="ours" if variant == "bn" else "none")
        norms[f"init_{variant}"] = grad_norms(model, data, p["batches"])
        train(model, data, steps=p["steps"], batch_size=64, lr=0.1, momentum=0.9)
        norms[f"trained_{variant}"] = grad_norms(model, data, p["batches"])
    metrics: dict[str, Any] = {"depth": p["depth"], "width": WIDTH, "steps": p["steps"],
                               "grad_norms": norms}
    for key, vals in norms.items():
        metrics[f"spread_{key}"] = spread(vals)
    verdict, reason = judge(metrics)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), sharey=True)
    for ax, when in zip(axes, ("init", "trained"), strict=True):
        layers = np.arange(1, p["depth"] + 1)
        ax.semilogy(layers, norms[f"{when}_plain"], "o-", ms=3, label="without BN")
        ax.semilogy(layers, norms[f"{when}_bn"], "s-", ms=3, label="with BN")
        ax.set_xlabel("layer (input → output)")
        ax.set_title("at initialization" if when == "init" else f"after {p['steps']} steps")
    axes[0].set_ylabel("weight-gradient norm")
    axes[0].legend(fontsize=8)
    table = [["", "spread at init (decades)", "spread after training"],
             ["without BN", f"{metrics['spread_init_plain']:.2f}",
              f"{metrics['spread_trained_plain']:.2f}"],
             ["with BN", f"{metrics['spread_init_bn']:.2f}", f"{metrics['spread_trained_bn']:.2f}"]]
    return ClaimResult(NAME, TITLE, CLAIM, CRITERION, verdict, reason, metrics,
                       {"gradient_norms": figure_png(fig)}, table,
                       setup=f"{data.describe()}; {p['depth']}-layer sigmoid MLP of width {WIDTH}, "
                             "PyTorch default init, batch 64, SGD lr 0.1 momentum 0.9")
