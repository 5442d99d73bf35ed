"""The op boundary: one training (or eval) call of batch norm, from the functional layer down
to a kernel backend, by the path that fits how it is called.

- :mod:`.library` — the ``torch.library`` ops ``batchnorm::forward``/``batchnorm::backward``,
  their fake kernels, their bodies and the one backward formula;
- :mod:`.eager` — the same bodies and formula as ``autograd.Function`` s (no dispatcher);
- :mod:`.forward_ad` — forward-mode AD (dual tensors);
- :mod:`.triton_op` — the Triton backend as ``triton_op`` operators that ``torch.compile``
  traces into (CUDA only; imports Triton).

The running statistics are not updated here: see :mod:`batchnorm.running`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..activations import act_forward
from ..kernels import select
from ..kernels.base import RunningUpdate
from ..layout import canonicalize
from . import forward_ad
from .eager import EagerForward, EagerForwardCtx
from .library import backends_loaded, forward_op, run_forward

__all__ = ["forward"]

_INLINE_ACTS = ("none", "relu")  # fused by every backend (no backend lookup for them)


def forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None, training: bool, eps: float,
    act: str, slope: float, running: RunningUpdate | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, rstd, var)`` of ``batchnorm::forward`` by the path that fits the call.

    ``running`` (eager CPU, from :func:`batchnorm.running.fold_request`): a running-statistics
    update the backend may fold into its call."""
    args = (x, weight, bias, residual, running_mean, running_var, training, eps, act, slope)
    if torch.compiler.is_compiling():
        if x.device.type == "cuda" and backends_loaded("cuda") \
                and select(canonicalize(x)[0]).name == "triton":
            from .triton_op import forward as triton_forward  # Inductor sees the kernels

            return triton_forward(*args)
        return forward_op(*args)  # type: ignore[no-any-return]  # one opaque node
    if forward_ad.active():
        return forward_ad.forward(*args)  # dual tensors
    if act not in _INLINE_ACTS and x.is_cpu and not select(canonicalize(x)[0]).fuses_fast(act):
        # an activation this backend computes slower than PyTorch's own op after our layer
        # (docs/decisions.md, "Activations in the CPU kernels"): the layer, then that op
        y, mean, rstd, var = forward(x, weight, bias, residual, running_mean, running_var,
                                     training, eps, "none", 0.0, running)
        return act_forward(y, act, slope), mean, rstd, var
    if torch._C._are_functorch_transforms_active():
        return EagerForward.apply(*args)  # type: ignore[no-any-return]  # vmap, grad, jvp…
    if not torch.is_grad_enabled() or not any(
            t is not None and t.requires_grad for t in (x, weight, bias, residual)):
        return run_forward(*args, running)[:4]  # nothing to differentiate: no node
    return EagerForwardCtx.apply(  # type: ignore[no-any-return]  # eager autograd
        x, weight, bias, residual, (*args[4:], running))
