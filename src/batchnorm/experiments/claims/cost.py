"""Claim 9 — computational cost: training-step time with and without BN (ours and PyTorch's), and
inference before and after folding BN into the preceding convolutions."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..result import ClaimResult, RunConfig, conclude, figure_png, per_seed_table, pyplot
from ..sources import SOURCES
from ..training import accuracy, batches, bn2d, cnn, seed_all, train
from ..verdict import Check

NAME = "cost"
TITLE = "9. Computational cost"
CLAIM = ("Batch normalization adds computation to every training step; at inference it can be "
         "folded into the preceding layer, removing that cost without changing the results.")
CRITERION = ("Per seed (its own weights and its own block of interleaved timings on this "
             "machine, medians): three checks: a training step with PyTorch's BN takes >= 5% "
             "longer than without normalization (overhead >= 0.05); the folded model's logits "
             "differ from the unfolded model's by < 1e-3 (max abs); folded inference takes <= "
             "95% of the unfolded time. Each is supported if its interval over seeds satisfies "
             "it throughout and not supported if it fails throughout; the claim is supported if "
             "all are, not supported if none is, inconclusive otherwise.")
PARAMS: dict[str, dict[str, Any]] = {
    "tiny": {"repeats": 3, "train_steps": 5, "infer_repeats": 3, "seeds": 2},
    "quick": {"repeats": 15, "train_steps": 40, "infer_repeats": 8, "seeds": 3},
    "full": {"repeats": 30, "train_steps": 100, "infer_repeats": 15, "seeds": 5},
}
SOURCE = SOURCES[NAME]
CHANNELS = 16
BATCH = 64


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds per call, the candidates interleaved in every repeat."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up: JIT compilation, allocator
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> object:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        return None

    return step


def judge(m: dict[str, Any]) -> list[Check]:
    overhead = tuple(b / n - 1 for b, n in zip(m["train_ms"]["torch BN"], m["train_ms"]["no norm"],
                                              strict=True))
    saved = tuple(f / u for f, u in zip(m["infer_ms_folded"], m["infer_ms_unfolded"],
                                        strict=True))
    return [Check("training-step overhead of PyTorch's BN", overhead, ">=", 0.05),
            Check("max |logit difference|, folded vs unfolded", tuple(m["max_abs_diff"]), "<",
                  1e-3, digits=-1),
            Check("folded / unfolded inference time", saved, "<=", 0.95)]


def agreement(m: dict[str, Any]) -> str:
    overhead = float(np.median(judge(m)[0].values))
    return (f"no source figure (not found); we measure a median training-step overhead of "
            f"{overhead:+.0%} for PyTorch's BN on this CPU")


def _one_seed(cfg: RunConfig, p: dict[str, Any], seed: int) -> dict[str, Any]:
    from ...tools.fold import fold  # ImportError here: reported as unavailable by the runner

    data = cfg.data
    g = torch.Generator().manual_seed(seed)
    idx = next(batches(len(data.y_train), min(BATCH, len(data.y_train)), g))
    x, y = data.x_train[idx], data.y_train[idx]
    models = {}
    for label, factory in (("no norm", None), ("torch BN", bn2d("torch")),
                           ("our BN", bn2d("ours"))):
        seed_all(seed)
        models[label] = cnn(factory, data.side, CHANNELS)
    train_ms = _interleaved({k: _step_fn(m, x, y) for k, m in models.items()}, p["repeats"])
    seed_all(seed)
    model = cnn(bn2d("ours"), data.side, CHANNELS)
    train(model, data, steps=p["train_steps"], batch_size=BATCH, lr=0.05, momentum=0.9,
          seed=seed)
    model.eval()
    folded, report = fold(model, data.x_test[:BATCH], return_report=True)
    folded.eval()
    xt = data.x_test

    def infer(m: nn.Module) -> Callable[[], object]:
        def go() -> object:
            with torch.no_grad():
                for s in range(0, len(xt), 256):
                    m(xt[s:s + 256])
            return None
        return go

    infer_ms = _interleaved({"unfolded": infer(model), "folded": infer(folded)},
                            p["infer_repeats"])
    with torch.no_grad():
        diff = float((model(xt) - folded(xt)).abs().max())
    return {"train_ms": train_ms, "infer_ms": infer_ms, "max_abs_diff": diff,
            "acc_unfolded": accuracy(model, xt, data.y_test),
            "acc_folded": accuracy(folded, xt, data.y_test), "folded_layers": len(report.folded)}


def run(cfg: RunConfig) -> ClaimResult:
    p = PARAMS[cfg.size]
    seeds, data = cfg.seed_list(p["seeds"]), cfg.data
    per = [_one_seed(cfg, p, s) for s in cfg.progress(seeds, desc=NAME)]
    labels = list(per[0]["train_ms"])
    metrics: dict[str, Any] = {
        "seeds": seeds, "batch": BATCH, "channels": CHANNELS,
        "train_ms": {k: [r["train_ms"][k] for r in per] for k in labels},
        "infer_ms_unfolded": [r["infer_ms"]["unfolded"] for r in per],
        "infer_ms_folded": [r["infer_ms"]["folded"] for r in per],
        "max_abs_diff": [r["max_abs_diff"] for r in per],
        "acc_unfolded": [r["acc_unfolded"] for r in per],
        "acc_folded": [r["acc_folded"] for r in per],
        "folded_layers": per[0]["folded_layers"], "threads": torch.get_num_threads()}
    checks = judge(metrics)
    verdict, lean, reason = conclude(checks)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    tm = {k: float(np.median(v)) for k, v in metrics["train_ms"].items()}
    axes[0].bar(list(tm), list(tm.values()), color=["C7", "C0", "C1"])
    axes[0].set_ylabel("ms per training step (median of seeds)")
    axes[0].set_title(f"training step, batch {BATCH}")
    axes[1].bar(["unfolded", "folded"], [float(np.median(metrics["infer_ms_unfolded"])),
                                         float(np.median(metrics["infer_ms_folded"]))],
                color=["C1", "C2"])
    axes[1].set_ylabel(f"ms per pass over {len(data.x_test)} test images")
    axes[1].set_title("inference")
    detail = [["measurement", *(f"seed {s}" for s in seeds)]]
    detail += [[f"train step, {k} (ms)", *(f"{v:.3f}" for v in metrics["train_ms"][k])]
               for k in labels]
    detail += [["inference, unfolded (ms)", *(f"{v:.3f}" for v in metrics["infer_ms_unfolded"])],
               ["inference, folded (ms)", *(f"{v:.3f}" for v in metrics["infer_ms_folded"])],
               ["test accuracy unfolded / folded",
                *(f"{a:.3f} / {b:.3f}" for a, b in zip(metrics["acc_unfolded"],
                                                       metrics["acc_folded"], strict=True))]]
    return ClaimResult(NAME, TITLE, CLAIM, CRITERION, verdict, reason, metrics,
                       {"cost": figure_png(fig)}, per_seed_table(checks, seeds),
                       setup=f"{data.describe()}; CNN conv{CHANNELS}-conv{2 * CHANNELS}, batch "
                             f"{BATCH}, CPU, {torch.get_num_threads()} torch thread(s); per seed "
                             f"medians of {p['repeats']} interleaved repeats; "
                             "batchnorm.tools.fold.fold for folding (times on a shared machine "
                             "are noisy)",
                       checks=checks, lean=lean, source=SOURCE, agreement=agreement(metrics),
                       detail=detail)
