"""Recompute batch-norm running statistics from data, parameters untouched.

``method="precise"`` (Wu & Johnson's *precise BN*): every batch-norm layer's running mean and
variance become the true population statistics of its inputs over all the batches seen. A
forward pre-hook takes each batch's per-channel partials ``(n, mean, m2)`` with
:func:`batchnorm.stats.channel_partials` on the canonical view of the input, and the partials of
all batches are merged with :func:`batchnorm.stats.merge_many` — exact pooling, not an average
of per-batch variances (which misses the spread of the batch means). ``running_var`` gets the
unbiased population variance, as PyTorch keeps it.

``method="ema"``: the statistics are reset, then each batch updates them as training would,
with each layer's own ``momentum`` (or the ``momentum`` argument).

During the passes the batch-norm layers are in training mode (they normalize with batch
statistics, as when the statistics were first gathered) and every other module is in eval mode
(no dropout noise); gradients are off. Afterwards every module's mode is restored, and
``num_batches_tracked`` too (it counts training steps, which recalibration is not). This is also
AdaBN (Li et al. 2016): recalibrate on target-domain data to adapt to a domain shift.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import stats as S
from ..layout import canonicalize
from ..running import NonFiniteBatchWarning

__all__ = ["recalibrate"]

_METHODS = ("precise", "ema")


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    if isinstance(batch, dict):
        return model(**batch)
    raise TypeError(
        "data: expected batches that are tensors, (inputs, ...) tuples/lists or dicts of "
        f"keyword inputs, got {type(batch).__name__}; pass forward_fn=(model, batch) -> output"
    )


def recalibrate(
    model: nn.Module,
    data: Iterable[Any],
    num_batches: int = 200,
    method: str = "precise",
    *,
    momentum: float | None = None,
    progress: bool = True,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> nn.Module:
    """Recompute the running statistics of every batch-norm layer of ``model`` from ``data``.

    Args:
        model: the model (modified in place and returned); its batch-norm layers are PyTorch's
            ``_BatchNorm`` subclasses (ours included) that track running statistics.
        data: an iterable of batches: tensors, ``(inputs, targets, ...)`` or keyword dicts.
        num_batches: the most batches to use (fewer if ``data`` ends first). Default: 200
        method: ``"precise"`` (exact population statistics over the batches) or ``"ema"``
            (reset, then the usual exponential moving average). Default: ``"precise"``
        momentum: ``"ema"`` only: the factor to use instead of each layer's own ``momentum``
            (``None`` keeps theirs). Default: None
        progress: show a ``tqdm`` progress bar. Default: True
        forward_fn: ``(model, batch) -> output`` for batches of another form. Default: None

    Returns:
        ``model``, with new running statistics and its modes as before.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if method not in _METHODS:
        raise ValueError(f"method: expected one of {_METHODS}, got {method!r}")
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches: expected a positive int, got {num_batches!r}")
    if momentum is not None:
        if method != "ema":
            raise ValueError(f"momentum: only used with method='ema', got method={method!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) \
                or not 0.0 < float(momentum) <= 1.0:
            raise ValueError(f"momentum: expected a float in (0, 1], got {momentum!r}")
    if not isinstance(data, Iterable):
        raise TypeError(f"data: expected an iterable of batches, got {type(data).__name__}")
    layers: list[Any] = [m for m in model.modules()
              if isinstance(m, _BatchNorm) and m.running_mean is not None
              and m.running_var is not None]
    if not layers:
        raise ValueError("model: found no batch-norm layer with running statistics to "
                         "recalibrate")
    run = forward_fn or _default_forward

    modes = {m: m.training for m in model.modules()}
    saved = {m: {k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None}
             for m in layers}
    momenta = {m: m.momentum for m in layers}
    partials: dict[nn.Module, list[S.Partials]] = {m: [] for m in layers}
    skipped = {m: 0 for m in layers}
    handles = []
    ok = False
    try:
        model.eval()
        for m in layers:
            m.train()
            if method == "ema":
                m.reset_running_stats()
                if momentum is not None:
                    m.momentum = float(momentum)
            else:
                handles.append(m.register_forward_pre_hook(_collector(partials[m], skipped, m),
                                                           with_kwargs=True))
        seen = 0
        with torch.no_grad():
            for batch in _progress(islice(data, num_batches), num_batches, data, progress):
                run(model, batch)
                seen += 1
        if seen == 0:
            raise ValueError("data: yielded no batch")
        if method == "precise":
            for m in layers:
                _set_population(m, partials[m], skipped[m], saved[m])
        ok = True
    finally:
        for h in handles:
            h.remove()
        for m in layers:
            m.momentum = momenta[m]
            # success: only the counters come back; failure: everything does
            _restore(m, saved[m], ("num_batches_tracked", "num_batches_skipped") if ok else None)
        for mod, mode in modes.items():
            mod.train(mode)
    return model


def _progress(batches: Iterable[Any], num_batches: int, data: Any, enabled: bool) -> Iterable:
    if not enabled:
        return batches
    from tqdm.auto import tqdm

    total = min(num_batches, len(data)) if hasattr(data, "__len__") else num_batches
    return tqdm(batches, total=total, desc="recalibrate", unit="batch")


def _collector(store: list[S.Partials], skipped: dict[Any, int],
               layer: Any) -> Callable[..., None]:
    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, Tensor):
            return
        p = S.channel_partials(canonicalize(x)[0])
        if not (torch.isfinite(p.mean).all() and torch.isfinite(p.m2).all()):
            skipped[layer] += 1  # a bad batch must not poison the population statistics
            return
        store.append(p)
    return hook


def _restore(m: nn.Module, saved: dict[str, Tensor], names: Iterable[str] | None = None) -> None:
    for k in saved if names is None else names:
        if k in saved:
            getattr(m, k).copy_(saved[k])


def _set_population(m: Any, parts: list[S.Partials], skipped: int,
                    saved: dict[str, Tensor]) -> None:
    """Write the merged population statistics of ``parts`` into ``m``'s running buffers.

    A layer that no finite batch reached keeps its statistics (with a warning).
    """
    name = f"{type(m).__name__}({m.num_features})"
    if skipped:
        warnings.warn(f"recalibrate: {name} skipped {skipped} batch(es) with non-finite "
                      "statistics", NonFiniteBatchWarning, stacklevel=3)
    if not parts:
        warnings.warn(f"recalibrate: no finite batch reached {name}; its running statistics "
                      "were left unchanged", RuntimeWarning, stacklevel=3)
        _restore(m, saved)
        return
    stacked = S.Partials(torch.stack([p.n for p in parts]), torch.stack([p.mean for p in parts]),
                         torch.stack([p.m2 for p in parts]))
    total = S.merge_many(stacked)
    mean, var, _ = S.finalize(total, float(m.eps))
    count = total.n.reshape(-1)[0]
    running_mean: Tensor = m.running_mean  # type: ignore[assignment]
    running_var: Tensor = m.running_var  # type: ignore[assignment]
    running_mean.copy_(mean.to(running_mean.dtype))
    running_var.copy_(S.unbiased_var(var, count).to(running_var.dtype))
