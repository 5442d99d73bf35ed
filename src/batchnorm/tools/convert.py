"""Swap batch-norm layers between PyTorch's classes and ours, keeping every bit of state.

Parameters and buffers are *shared* with the new layer (not copied), so an optimizer built on
the model before the conversion keeps working; train/eval mode, device and dtype follow.
A layer whose behaviour would be lost by the swap (a subclass we do not know, a fused activation
going to a PyTorch class) is refused with an error naming it, never silently dropped.

Beyond the plain classes:

- ``torch.nn.SyncBatchNorm`` → our ``SyncBatchNorm`` when ``batchnorm.nn.sync`` registers that
  conversion (:func:`register_conversion`). A SyncBatchNorm layer accepts any input rank, so the
  rank of a non-synchronized replacement cannot be known statically: ``sync_to=BatchNorm2d``
  (or 1d/3d) asks for that class explicitly, dropping the synchronization knowingly. Without
  either, the layer is refused.
- A subclass of PyTorch's ``BatchNorm1d/2d/3d`` that carries an activation module as ``.act``
  (and optionally a ``.drop`` that is an identity), as timm's ``BatchNormAct2d``, becomes our
  class with that activation fused — when the activation is one we fuse, the subclass has no
  other submodule, parameter or buffer, and the converted layer reproduces the original's
  output and running-statistics update on a probe input in eval and in training mode (so a
  subclass whose ``forward`` does something else is refused, not silently changed).
- Our layers that are already of the target's family are left alone; one of ours that has no
  PyTorch counterpart (a variant) is refused for ``target="torch"``.
"""

from __future__ import annotations

import copy
import importlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..activations import module_of, parse_activation
from ..nn._common import swap_modules
from ..nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNormBase
from .fold import is_batch_norm
from .save_output import save_output

__all__ = ["convert_model", "register_conversion"]

_TO_OURS: dict[type, type] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}
_TO_TORCH: dict[type, type] = {ours: theirs for theirs, ours in _TO_OURS.items()}

# target -> {exact source type -> converter(module, path) -> new module}
_CONVERTERS: dict[str, dict[type, Callable[[nn.Module, str], nn.Module]]] = {
    "batchnorm": {},
    "torch": {},
}


def register_conversion(target: str, source: type,
                        converter: Callable[[nn.Module, str], nn.Module]) -> None:
    """Teach :func:`convert_model` to convert layers of exactly type ``source`` for ``target``."""
    _CONVERTERS[target][source] = converter


def move_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Share ``src``'s parameters and buffers with ``dst`` and copy its mode."""
    src_params = dict(src.named_parameters(recurse=False))
    for name, p in src_params.items():
        setattr(dst, name, p)
    for name in [n for n, _ in dst.named_parameters(recurse=False) if n not in src_params]:
        dst.register_parameter(name, None)
    for name, b in src.named_buffers(recurse=False):
        if name in dst._buffers:
            dst._buffers[name] = b
    dst.train(src.training)
    ref = next(iter(list(src.parameters(recurse=False)) + list(src.buffers(recurse=False))), None)
    if ref is not None:
        # buffers that only one side has (our skip counter) follow the device
        for name, b in dst.named_buffers(recurse=False):
            if b is not None and b.device != ref.device:
                dst._buffers[name] = b.to(ref.device)
    return dst


def _config(m: nn.modules.batchnorm._BatchNorm) -> dict:
    return dict(num_features=m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                track_running_stats=m.track_running_stats)


def _to_ours(m: nn.Module, path: str) -> nn.Module:
    new = _TO_OURS[type(m)](**_config(m))  # type: ignore[arg-type]
    new.layer_name = path or None
    return move_state(m, new)


def _to_torch(m: nn.Module, path: str, unfuse_activations: bool) -> nn.Module:
    assert isinstance(m, _BatchNormBase)
    new = move_state(m, _TO_TORCH[type(m)](**_config(m)))
    if m.activation is None:
        return new
    if not unfuse_activations:
        raise ValueError(
            f"convert_model: layer {path or '<root>'!r} ({type(m).__name__}) has a fused "
            f"activation {m.activation!r} that torch.nn.{type(new).__name__} cannot hold; pass "
            "unfuse_activations=True to get nn.Sequential(bn, activation) instead"
        )
    act = module_of(*parse_activation(m.activation))
    assert act is not None
    return nn.Sequential(OrderedDict(bn=new, act=act.train(m.training)))


_OPTIONAL_MODULES = ("batchnorm.nn.sync", "batchnorm.nn.frozen")


def _import_optional() -> None:
    """Import the modules that register their own conversions, where they exist."""
    for name in _OPTIONAL_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


def convert_model(model: nn.Module, target: str = "batchnorm", *,
                  unfuse_activations: bool = False,
                  sync_to: type | None = None, save: str = "input") -> nn.Module:
    """Return ``model`` with every batch-norm layer swapped to ``target``'s classes.

    Args:
        model: any module; converted in place (the root too when it is a batch-norm layer, so use
            the return value).
        target: ``"batchnorm"`` (PyTorch's ``BatchNorm*d`` → ours) or ``"torch"`` (ours →
            PyTorch's).
        unfuse_activations: with ``target="torch"``, replace a layer with a fused activation by
            ``nn.Sequential(bn=..., act=...)`` instead of refusing (its state_dict keys gain a
            ``bn.`` level).
        sync_to: with ``target="batchnorm"``, convert every ``torch.nn.SyncBatchNorm`` to this
            class (``batchnorm.BatchNorm1d``, ``2d`` or ``3d``), dropping the cross-process
            synchronization on purpose. Default: None (to our SyncBatchNorm where registered,
            else refuse)
        save: with ``target="batchnorm"``, ``"output"`` switches the converted layers that can
            take it to the memory mode (:func:`batchnorm.tools.save_output.save_output`: only
            those with a fused invertible activation; a warning lists the others and why).
            Default: ``"input"``
    """
    if target not in _CONVERTERS:
        raise ValueError(f"target: expected 'batchnorm' or 'torch', got {target!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if sync_to is not None:
        if target != "batchnorm":
            raise ValueError(f"sync_to: only used with target='batchnorm', got target={target!r}")
        if sync_to not in _TO_TORCH:
            raise TypeError(f"sync_to: expected batchnorm.BatchNorm1d, BatchNorm2d or "
                            f"BatchNorm3d, got {sync_to!r}")
    if save not in ("input", "output") or (save != "input" and target != "batchnorm"):
        raise ValueError(f"save: expected 'input', or 'output' with target='batchnorm', got "
                         f"save={save!r}, target={target!r}")
    _import_optional()

    out = swap_modules(
        model, lambda m, path: _convert_one(m, path, target, unfuse_activations, sync_to))
    if save != "input":
        save_output(out, save, warn=True)
    return out


def _convert_one(m: nn.Module, path: str, target: str, unfuse_activations: bool,
                 sync_to: type | None = None) -> nn.Module | None:
    """The replacement for ``m``, ``None`` when ``m`` is not a layer to convert."""
    kind = type(m)
    where = path or "<root>"
    if target == "batchnorm" and kind is nn.SyncBatchNorm and sync_to is not None:
        return _to_class(m, path, sync_to)
    if kind in _CONVERTERS[target]:
        return _CONVERTERS[target][kind](m, path)
    if target == "torch":
        if kind in _TO_TORCH:
            return _to_torch(m, path, unfuse_activations)
        if _is_ours(kind) and is_batch_norm(m):
            raise ValueError(
                f"convert_model: layer {where!r} is a {kind.__qualname__}, which has no PyTorch "
                "counterpart (its behaviour would be lost), so the model was left unchanged"
            )
        return None
    if kind in _TO_OURS:
        return _to_ours(m, path)
    if _is_ours(kind) or not isinstance(m, nn.modules.batchnorm._BatchNorm):
        return None
    if kind is nn.SyncBatchNorm:
        raise ValueError(
            f"convert_model: layer {where!r} is a torch.nn.SyncBatchNorm and no conversion to "
            "our SyncBatchNorm is registered; pass sync_to=batchnorm.BatchNorm2d (or 1d/3d, "
            "matching the input rank) to convert it to a non-synchronized layer, so the model "
            "was left unchanged"
        )
    if isinstance(getattr(m, "act", None), nn.Module):
        return _bn_act_to_ours(m, path)
    raise ValueError(
        f"convert_model: layer {where!r} is a {kind.__module__}.{kind.__qualname__}, a "
        "batch-norm class this conversion does not know; converting it could drop its "
        "behaviour, so the model was left unchanged"
    )


def _is_ours(kind: type) -> bool:
    return kind.__module__.split(".")[0] == __name__.split(".")[0]


def _to_class(m: nn.Module, path: str, cls: type) -> nn.Module:
    new = cls(**_config(m))  # type: ignore[arg-type]
    new.layer_name = path or None
    return move_state(m, new)


_STANDARD_STATE = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def _bn_act_to_ours(m: nn.Module, path: str) -> nn.Module:
    """A timm-style ``BatchNormAct`` (PyTorch BN subclass with ``.act``, ``.drop``) → ours."""
    kind = type(m)
    where = path or "<root>"

    def refuse(why: str) -> ValueError:
        return ValueError(
            f"convert_model: layer {where!r} ({kind.__qualname__}, a batch norm with an "
            f"activation) cannot be converted: {why}; the model was left unchanged"
        )

    base = next((b for b in _TO_OURS if isinstance(m, b)), None)
    if base is None:
        raise refuse("it does not derive from torch.nn.BatchNorm1d/2d/3d")
    extra = sorted(set(dict(m.named_children())) - {"act", "drop"})
    if extra:
        raise refuse(f"it has submodules {extra} besides act/drop that would be lost")
    drop = getattr(m, "drop", None)
    if drop is not None and not isinstance(drop, nn.Identity) \
            and not (isinstance(drop, nn.Dropout) and drop.p == 0):
        raise refuse(f"its drop module {drop!r} is not an identity and would be lost")
    state = {n for n, _ in m.named_parameters(recurse=False)} | \
        {n for n, _ in m.named_buffers(recurse=False)}
    if state - _STANDARD_STATE:
        raise refuse(f"it has parameters/buffers {sorted(state - _STANDARD_STATE)} that would "
                     "be lost")
    try:
        act = parse_activation(m.act)
    except (ValueError, TypeError) as exc:
        raise refuse(f"its activation {m.act!r} is not one we fuse ({exc})") from None
    new = _TO_OURS[base](**_config(m), activation=m.act if act[0] != "none" else None)  # type: ignore[arg-type]
    new.layer_name = path or None
    move_state(m, new)
    mismatch = _probe_mismatch(m, new, base)
    if mismatch:
        raise refuse(f"the converted layer does not reproduce its {mismatch} on a probe input "
                     "(its forward does something else)")
    return new


def _probe_mismatch(old: nn.Module, new: nn.Module, base: Any) -> str | None:
    """Compare ``old`` and ``new`` on a random input, on copies (state is not touched)."""
    ref = next(iter(list(old.parameters()) + list(old.buffers())), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")
    spatial: tuple[int, ...] = {nn.BatchNorm1d: (5,), nn.BatchNorm2d: (3, 3)}.get(base, (2, 2, 2))
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn((4, old.num_features, *spatial), generator=gen).to(device, dtype)  # type: ignore[arg-type]
    rtol, atol = (1e-9, 1e-9) if dtype == torch.float64 else (1e-4, 1e-5)
    for training in (False, True):
        a, b = copy.deepcopy(old).train(training), copy.deepcopy(new).train(training)
        with torch.no_grad():
            ya, yb = a(x), b(x)
        if not (isinstance(ya, torch.Tensor) and ya.shape == yb.shape
                and torch.allclose(ya, yb, rtol=rtol, atol=atol)):
            return f"output in {'training' if training else 'eval'} mode"
        for name in ("running_mean", "running_var"):
            ra, rb = getattr(a, name, None), getattr(b, name, None)
            same = (ra is None and rb is None) or (
                ra is not None and rb is not None and torch.allclose(ra, rb, rtol=rtol, atol=atol))
            if not same:
                return f"{name} update"
    return None
