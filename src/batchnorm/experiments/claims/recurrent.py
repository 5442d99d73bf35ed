"""Claim 8 — recurrent networks: BN-LSTM (Cooijmans et al.) against LSTM on sequential digits,
one image row per time step."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor, nn

from ..result import ClaimResult, RunConfig, conclude, figure_png, per_seed_table, pyplot
from ..sources import SOURCES
from ..training import seed_all, train
from ..verdict import Check

NAME = "recurrent"
TITLE = "8. Recurrent networks"
CLAIM = ("Batch-normalized LSTMs (statistics per time step) train faster and generalize at least "
         "as well as plain LSTMs.")
TARGET = 0.80
CRITERION = (f"Two checks per seed: steps to {TARGET:.0%} test accuracy, LSTM / BN-LSTM, >= 1.2 "
             "(an LSTM that never gets there counts as the whole budget, a BN-LSTM that never "
             "does as ratio 0); BN-LSTM's final test accuracy minus LSTM's >= 0. Each is "
             "supported if its interval over seeds satisfies it throughout and not supported if "
             "it fails throughout; the claim is supported if both are, not supported if both "
             "are not, inconclusive otherwise.")
PARAMS: dict[str, dict[str, Any]] = {
    "tiny": {"steps": 6, "eval_every": 3, "seeds": 2, "hidden": 16},
    "quick": {"steps": 150, "eval_every": 15, "seeds": 3, "hidden": 32},
    "full": {"steps": 400, "eval_every": 20, "seeds": 5, "hidden": 48},
}
SOURCE = SOURCES[NAME]
LR = 3e-3  # Adam


class RowClassifier(nn.Module):
    """Reads an image ``(N, 1, H, W)`` as a sequence of ``H`` rows; classifies the last state."""

    def __init__(self, rnn: nn.Module, hidden: int, num_classes: int = 10) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x.flatten(1, 2) if x.dim() == 4 else x)
        return self.head(out[:, -1])  # type: ignore[no-any-return]


def build(kind: str, side: int, hidden: int) -> RowClassifier:
    if kind == "LSTM":
        return RowClassifier(nn.LSTM(side, hidden, batch_first=True), hidden)
    from ...nn.recurrent import BNLSTM

    return RowClassifier(BNLSTM(side, hidden, batch_first=True, max_length=side), hidden)


def judge(m: dict[str, Any]) -> list[Check]:
    total = m["steps"]
    ratios = tuple(0.0 if b is None else (total if p is None else p) / b
                   for b, p in zip(m["steps_to_target"]["BN-LSTM"], m["steps_to_target"]["LSTM"],
                                   strict=True))
    diff = tuple(b - p for b, p in zip(m["final"]["BN-LSTM"], m["final"]["LSTM"], strict=True))
    return [Check("steps to target, LSTM / BN-LSTM", ratios, ">=", 1.2, digits=2),
            Check("final test accuracy, BN-LSTM - LSTM", diff, ">=", 0.0)]


def agreement(m: dict[str, Any]) -> str:
    ratio, diff = (float(np.median(c.values)) for c in judge(m))
    faster = "same direction" if ratio > 1 else "opposite direction"
    better = "same direction" if diff >= 0 else "opposite direction"
    return (f"convergence: {faster} (median steps ratio {ratio:.2f}); generalization: {better} "
            f"(median accuracy difference {diff:+.3f}); the source's LSTM baseline figures were "
            "not found, so sizes cannot be compared")


def run(cfg: RunConfig) -> ClaimResult:
    p = PARAMS[cfg.size]
    build("BN-LSTM", 2, 2)  # ImportError here: reported as unavailable by the runner
    seeds, data = cfg.seed_list(p["seeds"]), cfg.data
    kinds = ("LSTM", "BN-LSTM")
    curves: dict[str, list[list[float]]] = {k: [] for k in kinds}
    reached: dict[str, list[int | None]] = {k: [] for k in kinds}
    axis: list[int] = []
    for kind, seed in cfg.progress([(k, s) for s in seeds for k in kinds], desc=NAME):
        seed_all(seed)
        model = build(kind, data.side, p["hidden"])
        hist = train(model, data, steps=p["steps"], batch_size=32, lr=LR, optimizer="adam",
                     seed=seed, eval_every=p["eval_every"])
        curves[kind].append(hist.test_acc)
        reached[kind].append(hist.steps_to(TARGET))
        axis = hist.steps
    metrics = {"seeds": seeds, "steps": p["steps"], "target": TARGET, "hidden": p["hidden"],
               "steps_to_target": reached, "final": {k: [c[-1] for c in v] for k, v in
                                                      curves.items()},
               "eval_steps": axis, "curves": curves}
    checks = judge(metrics)
    verdict, lean, reason = conclude(checks)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for kind, color in zip(kinds, ("C0", "C1"), strict=True):
        for i, c in enumerate(curves[kind]):
            ax.plot(axis[:len(c)], c, color=color, alpha=0.9 if i == 0 else 0.4,
                    label=kind if i == 0 else None)
    ax.axhline(TARGET, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"sequential digits ({data.side} rows), hidden {p['hidden']}")
    ax.legend(loc="lower right")
    detail = [["", "steps to target (per seed)", "final test accuracy (mean)"]]
    detail += [[k, ", ".join("never" if s is None else str(s) for s in reached[k]),
                f"{np.mean([c[-1] for c in curves[k]]):.3f}"] for k in kinds]
    return ClaimResult(NAME, TITLE, CLAIM, CRITERION, verdict, reason, metrics,
                       {"recurrent_accuracy": figure_png(fig)}, per_seed_table(checks, seeds),
                       setup=f"{data.describe()}; one row per time step, 1-layer LSTM vs "
                             f"BNLSTM (hidden {p['hidden']}), Adam lr {LR}, batch 32, "
                             f"{p['steps']} steps, seeds {', '.join(map(str, seeds))}",
                       checks=checks, lean=lean, source=SOURCE, agreement=agreement(metrics),
                       detail=detail)
