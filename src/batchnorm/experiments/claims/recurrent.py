"""Claim 8 — recurrent networks: BN-LSTM (Cooijmans et al.) against LSTM on sequential digits,
one image row per time step."""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np
from torch import Tensor, nn

from ..result import ClaimResult, RunConfig, combine, figure_png, pyplot
from ..training import seed_all, train

NAME = "recurrent"
TITLE = "8. Recurrent networks"
CLAIM = ("Batch-normalized LSTMs (statistics per time step) train faster and generalize at least "
         "as well as plain LSTMs.")
TARGET = 0.80
CRITERION = (f"Two checks, medians over seeds: steps to {TARGET:.0%} test accuracy, LSTM / "
             "BN-LSTM, is >= 1.2 (a run that never gets there counts as the full budget); "
             "BN-LSTM's final test accuracy is >= LSTM's. Both pass: supported; neither: not "
             "supported; one: mixed.")
PARAMS: dict[str, dict[str, Any]] = {
    "tiny": {"steps": 6, "eval_every": 3, "seeds": 1, "hidden": 16},
    "quick": {"steps": 200, "eval_every": 20, "seeds": 1, "hidden": 48},
    "full": {"steps": 500, "eval_every": 25, "seeds": 2, "hidden": 64},
}
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


def judge(m: dict[str, Any]) -> tuple[str, str]:
    total = m["steps"]
    ratios = [(p if p is not None else total) / (b if b is not None else float("inf"))
              for b, p in zip(m["steps_to_target"]["BN-LSTM"], m["steps_to_target"]["LSTM"],
                              strict=True)]
    ratio = statistics.median(ratios)
    bn, plain = statistics.median(m["final"]["BN-LSTM"]), statistics.median(m["final"]["LSTM"])
    reason = (f"steps-to-target ratio LSTM/BN-LSTM = {ratio:.2f}; final test accuracy BN-LSTM "
              f"{bn:.3f} vs LSTM {plain:.3f}")
    return combine([ratio >= 1.2, bn >= plain]), reason


def run(cfg: RunConfig) -> ClaimResult:
    p = PARAMS[cfg.size]
    build("BN-LSTM", 2, 2)  # ImportError here: reported as unavailable by the runner
    seeds, data = cfg.n_seeds(p["seeds"]), cfg.data
    kinds = ("LSTM", "BN-LSTM")
    curves: dict[str, list[list[float]]] = {k: [] for k in kinds}
    reached: dict[str, list[int | None]] = {k: [] for k in kinds}
    axis: list[int] = []
    for kind, seed in cfg.progress([(k, s) for s in range(seeds) for k in kinds], desc=NAME):
        seed_all(seed)
        model = build(kind, data.side, p["hidden"])
        hist = train(model, data, steps=p["steps"], batch_size=32, lr=LR, optimizer="adam",
                     seed=seed, eval_every=p["eval_every"])
        curves[kind].append(hist.test_acc)
        reached[kind].append(hist.steps_to(TARGET))
        axis = hist.steps
    metrics = {"steps": p["steps"], "target": TARGET, "hidden": p["hidden"],
               "steps_to_target": reached, "final": {k: [c[-1] for c in v] for k, v in
                                                      curves.items()},
               "eval_steps": axis, "curves": curves}
    verdict, reason = judge(metrics)
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
    table = [["", "steps to target", "final test accuracy (mean)"]]
    table += [[k, ", ".join("never" if s is None else str(s) for s in reached[k]),
               f"{np.mean([c[-1] for c in curves[k]]):.3f}"] for k in kinds]
    return ClaimResult(NAME, TITLE, CLAIM, CRITERION, verdict, reason, metrics,
                       {"recurrent_accuracy": figure_png(fig)}, table,
                       setup=f"{data.describe()}; one row per time step, 1-layer LSTM vs "
                             f"BNLSTM (hidden {p['hidden']}), Adam lr {LR}, batch 32, "
                             f"{p['steps']} steps, {seeds} seed(s)")
