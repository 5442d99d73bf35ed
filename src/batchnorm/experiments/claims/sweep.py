"""Shared by claims 3 and 4: final test accuracy over a one-parameter sweep, with and without BN."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..result import RunConfig, figure_png, pyplot
from ..training import seed_all, train


def sweep(cfg: RunConfig, name: str, values: list[float], seeds: int,
          build: Callable[[str, float], Any], train_kw: Callable[[float], dict[str, Any]]
          ) -> dict[str, list[list[float]]]:
    """``{"bn"|"plain": [[acc per seed] per value]}``; ``build(variant, value)`` makes the model,
    ``train_kw(value)`` the keyword arguments of :func:`train` for that value."""
    out: dict[str, list[list[float]]] = {"bn": [[] for _ in values], "plain": [[] for _ in values]}
    jobs = [(i, v, variant, s) for s in range(seeds) for i, v in enumerate(values)
            for variant in ("plain", "bn")]
    for i, value, variant, seed in cfg.progress(jobs, desc=name):
        seed_all(seed)
        model = build(variant, value)
        hist = train(model, cfg.data, seed=seed, **train_kw(value))
        out[variant][i].append(hist.final)
    return out


def mean_acc(per_value: list[list[float]]) -> list[float]:
    return [float(np.mean(v)) for v in per_value]


def plot(values: list[float], acc: dict[str, list[float]], xlabel: str, title: str) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.semilogx(values, acc["plain"], "o-", color="C0", label="without BN")
    ax.semilogx(values, acc["bn"], "s-", color="C1", label="with BN")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(loc="lower left")
    return figure_png(fig)


def table(values: list[float], acc: dict[str, list[float]], head: str) -> list[list[str]]:
    rows = [[head, "without BN", "with BN"]]
    rows += [[f"{v:g}", f"{a:.3f}", f"{b:.3f}"]
             for v, a, b in zip(values, acc["plain"], acc["bn"], strict=True)]
    return rows
