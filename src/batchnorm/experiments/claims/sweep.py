"""Shared by claims 3 and 4: final test accuracy over a one-parameter sweep, with and without BN,
for every seed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..result import RunConfig, figure_png, pyplot
from ..training import seed_all, train

# half-decade steps from 1e-2 to 10: fine enough that "the largest usable value" moves by a factor
# of about 3, not 10, between neighbours
HALF_DECADES = [round(10 ** (k / 2), 4) for k in range(-4, 3)]


def sweep(cfg: RunConfig, name: str, values: Sequence[float], seeds: Sequence[int],
          build: Callable[[str, float], Any], train_kw: Callable[[float], dict[str, Any]]
          ) -> dict[str, list[list[float]]]:
    """``{"bn"|"plain": [[acc per value] per seed]}``; ``build(variant, value)`` makes the model,
    ``train_kw(value)`` the keyword arguments of :func:`train` for that value."""
    out: dict[str, list[list[float]]] = {"bn": [[] for _ in seeds], "plain": [[] for _ in seeds]}
    jobs = [(j, s, v, variant) for j, s in enumerate(seeds) for v in values
            for variant in ("plain", "bn")]
    for j, seed, value, variant in cfg.progress(jobs, desc=name):
        seed_all(seed)
        model = build(variant, value)
        hist = train(model, cfg.data, seed=seed, **train_kw(value))
        out[variant][j].append(hist.final)
    return out


def mean_acc(per_seed: list[list[float]]) -> list[float]:
    """Mean over seeds, per swept value."""
    return [float(v) for v in np.mean(np.asarray(per_seed), axis=0)]


def plot(values: Sequence[float], raw: dict[str, list[list[float]]], xlabel: str,
         title: str) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for variant, label, color, marker in (("plain", "without BN", "C0", "o"),
                                          ("bn", "with BN", "C1", "s")):
        arr = np.asarray(raw[variant])
        ax.fill_between(values, arr.min(axis=0), arr.max(axis=0), color=color, alpha=0.2)
        ax.semilogx(values, arr.mean(axis=0), marker + "-", color=color,
                    label=f"{label} (mean, min-max band)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8)
    return figure_png(fig)


def table(values: Sequence[float], raw: dict[str, list[list[float]]],
          head: str) -> list[list[str]]:
    """Mean and per-seed accuracies at every swept value."""
    rows = [[head, "without BN: mean (per seed)", "with BN: mean (per seed)"]]
    for i, v in enumerate(values):
        cells = []
        for variant in ("plain", "bn"):
            accs = [run[i] for run in raw[variant]]
            cells.append(f"{np.mean(accs):.3f} ({', '.join(f'{a:.2f}' for a in accs)})")
        rows.append([f"{v:g}", *cells])
    return rows
