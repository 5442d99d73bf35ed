"""Swap batch-norm layers between PyTorch's classes and ours, keeping every bit of state.

Parameters and buffers are *shared* with the new layer (not copied), so an optimizer built on
the model before the conversion keeps working; train/eval mode, device and dtype follow.
A layer whose behaviour would be lost by the swap (a subclass we do not know, a fused activation
going to a PyTorch class) is refused with an error naming it, never silently dropped.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from torch import nn

from ..activations import module_of, parse_activation
from ..nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNormBase

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


def convert_model(model: nn.Module, target: str = "batchnorm", *,
                  unfuse_activations: bool = False) -> nn.Module:
    """Return ``model`` with every batch-norm layer swapped to ``target``'s classes.

    Args:
        model: any module; converted in place (the root too when it is a batch-norm layer, so use
            the return value).
        target: ``"batchnorm"`` (PyTorch's ``BatchNorm*d`` → ours) or ``"torch"`` (ours →
            PyTorch's).
        unfuse_activations: with ``target="torch"``, replace a layer with a fused activation by
            ``nn.Sequential(bn=..., act=...)`` instead of refusing (its state_dict keys gain a
            ``bn.`` level).
    """
    if target not in _CONVERTERS:
        raise ValueError(f"target: expected 'batchnorm' or 'torch', got {target!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")

    # Build every replacement first: a refusal leaves the model untouched, never half-converted.
    replacements: dict[str, nn.Module] = {}

    def visit(m: nn.Module, path: str) -> None:
        new = _convert_one(m, path, target, unfuse_activations)
        if new is not None:
            replacements[path] = new
            return
        for name, child in m.named_children():
            visit(child, f"{path}.{name}" if path else name)

    visit(model, "")
    if "" in replacements:
        return replacements[""]
    for path, new in replacements.items():
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, new)
    return model


def _convert_one(m: nn.Module, path: str, target: str,
                 unfuse_activations: bool) -> nn.Module | None:
    """The replacement for ``m``, ``None`` when ``m`` is not a layer to convert."""
    kind = type(m)
    if kind in _CONVERTERS[target]:
        return _CONVERTERS[target][kind](m, path)
    if target == "batchnorm" and kind in _TO_OURS:
        return _to_ours(m, path)
    if target == "torch" and kind in _TO_TORCH:
        return _to_torch(m, path, unfuse_activations)
    already = kind in (_TO_TORCH if target == "batchnorm" else _TO_OURS)
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and not already:
        raise ValueError(
            f"convert_model: layer {path or '<root>'!r} is a {kind.__module__}."
            f"{kind.__qualname__}, a batch-norm class this conversion does not know; "
            "converting it could drop its behaviour, so the model was left unchanged"
        )
    return None
