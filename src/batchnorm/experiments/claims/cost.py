"""Claim 9 — computational cost: training-step time with and without BN (ours and PyTorch's), and
inference before and after folding BN into the preceding convolutions."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..result import ClaimResult, RunConfig, combine, figure_png, pyplot
from ..training import accuracy, batches, bn2d, cnn, seed_all, train

NAME = "cost"
TITLE = "9. Computational cost"
CLAIM = ("Batch normalization adds computation to every training step; at inference it can be "
         "folded into the preceding layer, removing that cost without changing the results.")
CRITERION = ("Medians of interleaved timings on this machine. Three checks: a training step with "
             "PyTorch's BN takes >= 5% longer than without normalization; the folded model "
             "gives the same test accuracy (max |logit difference| < 1e-3); folded inference "
             "takes <= 95% of the unfolded time. All pass: supported; none: not supported; "
             "otherwise mixed.")
PARAMS: dict[str, dict[str, Any]] = {
    "tiny": {"repeats": 3, "train_steps": 5, "infer_repeats": 3},
    "quick": {"repeats": 30, "train_steps": 100, "infer_repeats": 20},
    "full": {"repeats": 60, "train_steps": 300, "infer_repeats": 40},
}
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


def judge(m: dict[str, Any]) -> tuple[str, str]:
    t = m["train_ms"]
    overhead = t["torch BN"] / t["no norm"] - 1
    same = m["acc_folded"] == m["acc_unfolded"] and m["max_abs_diff"] < 1e-3
    saved = m["infer_ms_folded"] / m["infer_ms_unfolded"]
    reason = (f"training step: no norm {t['no norm']:.2f} ms, torch BN {t['torch BN']:.2f} ms "
              f"(+{overhead:.0%}), ours {t['our BN']:.2f} ms; folded inference "
              f"{m['infer_ms_folded']:.2f} ms vs {m['infer_ms_unfolded']:.2f} ms "
              f"({saved:.0%}), accuracy {m['acc_folded']:.3f} vs {m['acc_unfolded']:.3f}, max "
              f"|diff| {m['max_abs_diff']:.1e}")
    return combine([overhead >= 0.05, same, saved <= 0.95]), reason


def run(cfg: RunConfig) -> ClaimResult:
    from ...tools.fold import fold  # ImportError here: reported as unavailable by the runner

    p = PARAMS[cfg.size]
    data = cfg.data
    g = torch.Generator().manual_seed(0)
    idx = next(batches(len(data.y_train), min(BATCH, len(data.y_train)), g))
    x, y = data.x_train[idx], data.y_train[idx]
    models = {}
    for label, factory in (("no norm", None), ("torch BN", bn2d("torch")),
                           ("our BN", bn2d("ours"))):
        seed_all(0)
        models[label] = cnn(factory, data.side, CHANNELS)
    train_ms = _interleaved({k: _step_fn(m, x, y) for k, m in cfg.progress(
        models.items(), desc=f"{NAME} (train)")}, p["repeats"])
    seed_all(0)
    model = cnn(bn2d("ours"), data.side, CHANNELS)
    train(model, data, steps=p["train_steps"], batch_size=BATCH, lr=0.05, momentum=0.9)
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
    metrics = {"train_ms": train_ms, "batch": BATCH, "channels": CHANNELS,
               "infer_ms_unfolded": infer_ms["unfolded"], "infer_ms_folded": infer_ms["folded"],
               "acc_unfolded": accuracy(model, xt, data.y_test),
               "acc_folded": accuracy(folded, xt, data.y_test), "max_abs_diff": diff,
               "folded_layers": len(report.folded), "threads": torch.get_num_threads()}
    verdict, reason = judge(metrics)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    axes[0].bar(list(train_ms), list(train_ms.values()), color=["C7", "C0", "C1"])
    axes[0].set_ylabel("ms per training step")
    axes[0].set_title(f"training step, batch {BATCH}")
    axes[1].bar(["unfolded", "folded"], [infer_ms["unfolded"], infer_ms["folded"]],
                color=["C1", "C2"])
    axes[1].set_ylabel(f"ms per pass over {len(xt)} test images")
    axes[1].set_title("inference")
    table = [["measurement", "value"]] + [[f"train step, {k}", f"{v:.3f} ms"]
                                          for k, v in train_ms.items()]
    table += [["inference, unfolded", f"{infer_ms['unfolded']:.3f} ms"],
              ["inference, folded", f"{infer_ms['folded']:.3f} ms"],
              ["test accuracy unfolded / folded",
               f"{metrics['acc_unfolded']:.3f} / {metrics['acc_folded']:.3f}"],
              ["max abs logit difference", f"{diff:.2e}"]]
    return ClaimResult(NAME, TITLE, CLAIM, CRITERION, verdict, reason, metrics,
                       {"cost": figure_png(fig)}, table,
                       setup=f"{data.describe()}; CNN conv{CHANNELS}-conv{2 * CHANNELS}, batch "
                             f"{BATCH}, CPU, {torch.get_num_threads()} torch thread(s); medians "
                             f"of {p['repeats']} interleaved repeats; "
                             "batchnorm.tools.fold.fold for folding (times on a shared machine "
                             "are noisy)")
