"""The network of Ioffe & Szegedy's MNIST experiment, trained once per variant and seed and shared
by claims 1 (speed), 2 (internal covariate shift) and 11 (the mechanism).

Fully connected, 3 hidden layers of 100 sigmoid units, batch 60, weights from N(0, 0.1²) (the
paper's "small random Gaussian values"), plain SGD at :data:`LR`. Variants: ``plain`` (no BN),
``bn`` (BN before every sigmoid) and ``noisy`` (BN followed by per-step noise,
:mod:`batchnorm.experiments.noisy`). One run records:

* test accuracy every ``eval_every`` steps (eval mode, running statistics, no noise);
* the 15th/50th/85th percentiles of the inputs of the last hidden layer's sigmoids (BN's output,
  noise included, with BN; the Linear output without), per unit for the first :data:`UNITS`
  units, on the training batch of every ``every``-th step — the paper's Figure 1(b, c);
* for ``plain`` and ``bn``, at :data:`PROBES` evenly spaced steps, the loss and gradient variation
  along the gradient step on a fixed batch (:mod:`batchnorm.experiments.landscape`).

The percentiles are taken by a forward pre-hook that records only training steps' forwards, so
the evaluations and probes inside the same run do not count as steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import Dataset
from ..landscape import variation_along_gradient
from ..noisy import add_noise_after_bn
from ..result import RunConfig
from ..training import mlp, seed_all, train

__all__ = ["LR", "PARAMS", "drift", "runs"]

LR = 0.5
INIT_STD = 0.1
BATCH = 60
TARGET = 0.90  # test accuracy the speed claims count steps to
PERCENTILES = (15, 50, 85)
UNITS = 10  # sigmoids followed (Figure 1 follows one; the drift averages over these)
PROBES = 8
ETAS = tuple(LR * f for f in (0.25, 0.5, 1.0, 2.0, 4.0))  # a quarter to four training steps
# Noise after BN: large enough that the sigmoid inputs drift more than without BN at all (the
# claim-11 precondition, checked per seed), as Santurkar et al. require. The drift of noisy BN
# grows with the mean range (about 0.5x it here) and hardly with the run's length, while the
# drift without BN shrinks as its inputs widen over a longer run; 12 is the smallest round value
# that cleared no BN's drift on every calibration seed at both sizes (docs/decisions.md).
NOISE_MEAN = 12.0
NOISE_STD = 0.5
VARIANTS = ("plain", "bn", "noisy")

PARAMS: dict[str, dict[str, Any]] = {
    "tiny": {"steps": 40, "every": 5, "eval_every": 10, "seeds": 2},
    "quick": {"steps": 800, "every": 10, "eval_every": 10, "seeds": 3},
    "full": {"steps": 1500, "every": 10, "eval_every": 10, "seeds": 5},
}


def drift(trace: np.ndarray) -> float:
    """``trace``: (time, 3 percentiles, units) → mean over units of the range over time of the
    median, divided by the mean 15–85 percentile width."""
    median = trace[:, 1, :]
    width = (trace[:, 2, :] - trace[:, 0, :]).mean(axis=0)
    rng = median.max(axis=0) - median.min(axis=0)
    return float(np.mean(rng / np.maximum(width, 1e-12)))


def build(variant: str, data: Dataset, seed: int) -> nn.Sequential:
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    seed_all(seed)
    model = mlp(data.features, [100, 100, 100], norm="none" if variant == "plain" else "ours",
                activation="sigmoid", init_std=INIT_STD)
    if variant == "noisy":
        add_noise_after_bn(model, NOISE_MEAN, NOISE_STD, seed)
    return model


def _run(variant: str, data: Dataset, seed: int, p: dict[str, Any]) -> dict[str, Any]:
    model = build(variant, data, seed)
    last_sigmoid = [m for m in model if isinstance(m, nn.Sigmoid)][-1]
    q = torch.tensor([v / 100 for v in PERCENTILES], dtype=torch.float32)
    state = {"armed": True, "step": 0}
    trace: list[list[list[float]]] = []  # (time, percentile, unit)
    rec_steps: list[int] = []

    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if model.training and state["armed"]:
            x = args[0].detach()[:, :UNITS].float()
            trace.append(torch.quantile(x, q, dim=0).tolist())
            rec_steps.append(state["step"])
            state["armed"] = False

    handle = last_sigmoid.register_forward_pre_hook(hook)
    g = torch.Generator().manual_seed(10_000 + seed)
    probe_idx = torch.randperm(len(data.y_train), generator=g)[:BATCH]
    px, py = data.x_train[probe_idx], data.y_train[probe_idx]
    probe_at = set(np.linspace(1, p["steps"], PROBES).round().astype(int).tolist())
    probes: list[tuple[float, float]] = []

    def on_step(step: int) -> None:
        if variant != "noisy" and step in probe_at:
            probes.append(variation_along_gradient(model, px, py, ETAS))
        state["step"] = step
        state["armed"] = step % p["every"] == 0

    try:
        hist = train(model, data, steps=p["steps"], batch_size=BATCH, lr=LR, seed=seed,
                     eval_every=p["eval_every"], on_step=on_step)
    finally:
        handle.remove()
    arr = np.array(trace, dtype=np.float64)  # (time, percentile, unit)
    return {"eval_steps": hist.steps, "test_acc": hist.test_acc,
            "steps_to_target": hist.steps_to(TARGET), "final": hist.final,
            "diverged_at": hist.diverged_at, "record_steps": rec_steps,
            # the first record is the untrained network; drift is measured over training
            "drift": drift(arr[1:]) if len(arr) > 2 else float("nan"),
            "unit0": arr[:, :, 0].tolist(),
            "loss_variation": float(np.mean([a for a, _ in probes])) if probes else None,
            "grad_variation": float(np.mean([b for _, b in probes])) if probes else None}


def runs(cfg: RunConfig, variants: tuple[str, ...], desc: str) -> tuple[list[int],
                                                                        dict[str, list[Any]]]:
    """``(seeds, {variant: [run record per seed]})``, training only what ``cfg.cache`` lacks."""
    p = PARAMS[cfg.size]
    seeds = cfg.seed_list(p["seeds"])
    jobs = [(v, s) for s in seeds for v in variants]
    todo = [(v, s) for v, s in jobs if ("paper_net", v, s, cfg.size) not in cfg.cache]
    for v, s in cfg.progress(todo, desc=desc):
        cfg.cache[("paper_net", v, s, cfg.size)] = _run(v, cfg.data, s, p)
    return seeds, {v: [cfg.cache[("paper_net", v, s, cfg.size)] for s in seeds]
                   for v in variants}


def steps_or_budget(rec: dict[str, Any], budget: int) -> float:
    """Steps to the target; a run that never got there counts as the whole budget."""
    s = rec["steps_to_target"]
    return float(budget if s is None else s)


def speedup(slow: dict[str, Any], fast: dict[str, Any], budget: int) -> float:
    """Steps of ``slow`` / steps of ``fast`` to the target; 0 if ``fast`` never got there (no
    speed-up can be claimed), and a lower bound when only ``slow`` never got there."""
    if fast["steps_to_target"] is None:
        return 0.0
    return steps_or_budget(slow, budget) / fast["steps_to_target"]
