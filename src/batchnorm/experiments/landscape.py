"""How the loss and its gradient vary along the gradient step (Santurkar et al. 2018).

At weights ``w`` with gradient ``g`` on a fixed batch, step to ``w - η·g`` for each ``η`` in a
range and record the loss there and the distance of the new gradient from ``g``. A smooth
landscape gives a small loss range (the loss is predictable along the step) and a small gradient
change (the gradient stays predictive). Measured in training mode (batch statistics), as the
training step sees it; the model's weights and buffers are restored afterwards, and ``.grad`` is
never touched, so a probe inside a training loop leaves the run unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["variation_along_gradient"]


def _loss_grad(model: nn.Module, params: Sequence[Tensor], x: Tensor,
               y: Tensor) -> tuple[float, list[Tensor]]:
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params)
    return float(loss.detach()), [g.detach() for g in grads]


def variation_along_gradient(model: nn.Module, x: Tensor, y: Tensor,
                             etas: Sequence[float]) -> tuple[float, float]:
    """``(loss range, largest gradient change)`` over the steps ``w - η·g``, ``η`` in ``etas``.

    The loss range includes the starting point; the gradient change is the largest
    ``‖∇L(w - η·g) - g‖₂`` over ``etas``.
    """
    if not etas or any(not (isinstance(e, int | float) and e > 0) for e in etas):
        raise ValueError(f"etas: expected positive step sizes, got {list(etas)!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    was = model.training
    model.train()
    try:
        loss0, g0 = _loss_grad(model, params, x, y)
        w0 = [p.detach().clone() for p in params]
        losses, changes = [loss0], []
        for eta in etas:
            with torch.no_grad():
                for p, w, g in zip(params, w0, g0, strict=True):
                    p.copy_(w - eta * g)
            loss, grads = _loss_grad(model, params, x, y)
            losses.append(loss)
            sq = torch.stack([((a - b) ** 2).sum() for a, b in zip(grads, g0, strict=True)])
            changes.append(float(sq.sum().sqrt()))
    finally:
        model.load_state_dict(state)
        model.train(was)
    if not all(math.isfinite(v) for v in [*losses, *changes]):
        return math.inf, math.inf  # the step left the region where the loss is even defined
    return max(losses) - min(losses), max(changes)
