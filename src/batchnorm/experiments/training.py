"""Shared training code: seeding, the models the claims use, a minibatch SGD loop, accuracy.

Every experiment trains through :func:`train`, so "with BN" and "without BN" differ only in the
model. Divergence (a non-finite loss) stops a run and is recorded, never hidden: its accuracy is
then whatever the broken model scores (non-finite logits count as wrong).
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from .. import BatchNorm1d, BatchNorm2d
from ..running import NonFiniteBatchWarning
from .data import Dataset

__all__ = ["History", "accuracy", "batches", "cnn", "mlp", "seed_all", "train"]

NORMS = ("none", "ours", "torch")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _bn1d(kind: str, width: int) -> nn.Module:
    if kind == "ours":
        return BatchNorm1d(width)
    if kind == "torch":
        return nn.BatchNorm1d(width)
    raise ValueError(f"norm: expected one of {NORMS}, got {kind!r}")


def _act(name: str) -> nn.Module:
    table: dict[str, Callable[[], nn.Module]] = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
                                                 "relu": nn.ReLU}
    if name not in table:
        raise ValueError(f"activation: expected one of {sorted(table)}, got {name!r}")
    return table[name]()


def mlp(in_features: int, widths: list[int], num_classes: int = 10, *, norm: str = "none",
        activation: str = "sigmoid", dropout: float = 0.0,
        init_std: float | None = None) -> nn.Sequential:
    """``Flatten → [Linear → (BN) → act → (Dropout)] * len(widths) → Linear``.

    ``init_std`` draws every weight from N(0, init_std²) and zeroes biases (the paper's "small
    random Gaussian values"); ``None`` keeps PyTorch's default initialization. With BN the hidden
    Linear layers have no bias (BN's shift replaces it).
    """
    layers: list[nn.Module] = [nn.Flatten()]
    prev = in_features
    for width in widths:
        layers.append(nn.Linear(prev, width, bias=norm == "none"))
        if norm != "none":
            layers.append(_bn1d(norm, width))
        layers.append(_act(activation))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        prev = width
    layers.append(nn.Linear(prev, num_classes))
    if init_std is not None:
        for m in layers:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


def cnn(norm_factory: Callable[[int], nn.Module] | None, side: int, channels: int = 16,
        num_classes: int = 10) -> nn.Sequential:
    """A small CNN: two 3x3 conv blocks (conv → norm → ReLU), 2x2 max-pool, linear head.

    ``norm_factory(channels)`` builds the normalization layer; ``None`` means no normalization.
    """
    def block(cin: int, cout: int) -> list[nn.Module]:
        norm = norm_factory(cout) if norm_factory is not None else nn.Identity()
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=norm_factory is None), norm, nn.ReLU()]

    pooled = side // 2
    return nn.Sequential(*block(1, channels), *block(channels, 2 * channels), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(2 * channels * pooled * pooled, num_classes))


def bn2d(kind: str) -> Callable[[int], nn.Module]:
    if kind == "ours":
        return BatchNorm2d
    if kind == "torch":
        return nn.BatchNorm2d
    raise ValueError(f"norm: expected 'ours' or 'torch', got {kind!r}")


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless index minibatches: a fresh permutation per epoch, a short last batch dropped."""
    if batch_size > n:
        raise ValueError(f"batch_size: expected at most the {n} training examples, "
                         f"got {batch_size}")
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start:start + batch_size]


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, *, train_mode: bool = False,
             chunk: int = 1000) -> float:
    """Fraction classified correctly (eval mode unless ``train_mode``; no state changes)."""
    was = model.training
    model.train(train_mode)
    correct = 0
    try:
        for start in range(0, len(y), chunk):
            if train_mode:  # batch statistics without touching running statistics
                logits = _forward_frozen_stats(model, x[start:start + chunk])
            else:
                logits = model(x[start:start + chunk])
            target = y[start:start + chunk]
            ok = torch.isfinite(logits).all(dim=1) & (logits.argmax(dim=1) == target)
            correct += int(ok.sum())
    finally:
        model.train(was)
    return correct / max(len(y), 1)


def _forward_frozen_stats(model: nn.Module, x: Tensor) -> Tensor:
    saved = {k: v.clone() for k, v in model.state_dict().items() if "running" in k
             or "num_batches" in k}
    out: Tensor = model(x)
    state = model.state_dict()
    for k, v in saved.items():
        state[k].copy_(v)
    return out


@dataclass
class History:
    steps: list[int] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    diverged_at: int | None = None
    last_loss: float = float("nan")

    @property
    def final(self) -> float:
        return self.test_acc[-1] if self.test_acc else 0.0

    def steps_to(self, target: float) -> int | None:
        """First evaluated step whose test accuracy reaches ``target``; ``None`` if never."""
        for step, acc in zip(self.steps, self.test_acc, strict=True):
            if acc >= target:
                return step
        return None


def train(model: nn.Module, data: Dataset, *, steps: int, batch_size: int, lr: float,
          momentum: float = 0.0, seed: int = 0, eval_every: int | None = None,
          on_step: Callable[[int], None] | None = None,
          forward: Callable[[nn.Module, Tensor], Tensor] | None = None,
          optimizer: str = "sgd") -> History:
    """Minibatch SGD (or Adam) with cross-entropy for ``steps`` steps; test accuracy every
    ``eval_every`` steps (and at the end)."""
    g = torch.Generator().manual_seed(seed)
    opt: torch.optim.Optimizer
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        raise ValueError(f"optimizer: expected 'sgd' or 'adam', got {optimizer!r}")
    loss_fn = nn.CrossEntropyLoss()
    run = forward or (lambda m, xb: m(xb))
    hist = History()
    it = batches(len(data.y_train), batch_size, g)
    model.train()
    with warnings.catch_warnings():
        # a diverging run (a learning-rate sweep's top end) produces NaN batches; the divergence
        # is recorded below from the loss, so the per-layer warnings would only be noise
        warnings.simplefilter("ignore", NonFiniteBatchWarning)
        _loop(model, data, hist, it, opt, loss_fn, run, steps, eval_every, on_step, forward)
    if not eval_every or hist.diverged_at is not None:
        hist.steps.append(hist.diverged_at or steps)
        hist.test_acc.append(_eval(model, data, forward))
        hist.loss.append(float("nan") if hist.diverged_at else hist.last_loss)
    return hist


def _loop(model: nn.Module, data: Dataset, hist: History, it: Iterator[Tensor],
          opt: torch.optim.Optimizer, loss_fn: nn.Module,
          run: Callable[[nn.Module, Tensor], Tensor], steps: int, eval_every: int | None,
          on_step: Callable[[int], None] | None,
          forward: Callable[[nn.Module, Tensor], Tensor] | None) -> None:
    for step in range(1, steps + 1):
        idx = next(it)
        loss = loss_fn(run(model, data.x_train[idx]), data.y_train[idx])
        hist.last_loss = float(loss.detach())
        if not math.isfinite(hist.last_loss):
            hist.diverged_at = step
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step)
        if eval_every and (step % eval_every == 0 or step == steps):
            hist.steps.append(step)
            hist.test_acc.append(_eval(model, data, forward))
            hist.loss.append(float(loss.detach()))
            model.train()


def _eval(model: nn.Module, data: Dataset,
          forward: Callable[[nn.Module, Tensor], Tensor] | None) -> float:
    if forward is None:
        return accuracy(model, data.x_test, data.y_test)
    was = model.training
    model.eval()
    with torch.no_grad():
        logits = forward(model, data.x_test)
    model.train(was)
    ok = torch.isfinite(logits).all(dim=1) & (logits.argmax(dim=1) == data.y_test)
    return float(ok.float().mean())
