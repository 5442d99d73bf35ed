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
  and optionally a ``.drop`` (timm's ``BatchNormAct2d``) becomes our class. Its activation is
  fused when it is in the table (:mod:`batchnorm.activations`) and nothing runs between the
  norm and it (``drop`` an identity); otherwise ``drop`` and ``act`` are kept after our norm,
  unfused, as children of the same names (``keep_after`` of our layers), so the
  ``state_dict`` keys stay the original's. The report names every layer that keeps
  modules. The subclass is refused only where the swap could change behaviour: it has other
  submodules, parameters or buffers, or the converted layer does not reproduce the original's
  output and running-statistics update on a probe input, in eval and in training mode (dropout
  drawing the same masks), so a subclass whose ``forward`` does something else is refused.
- Converting back (``target="torch"``) restores the class the layer came from: the layer
  remembers a stateless copy of the original (its class, configuration and stateless
  submodules; ``_Origin``), and the state is moved back into a copy of it. A layer of ours that
  did not come from a conversion becomes PyTorch's plain class (``unfuse_activations=True``:
  ``nn.Sequential(bn, act)`` where it fuses an activation).
- Our layers that are already of the target's family are left alone; one of ours that has no
  PyTorch counterpart (a variant) is refused for ``target="torch"``.
"""

from __future__ import annotations

import copy
import importlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch
from torch import nn

from ..activations import module_of, parse_activation, spec_of
from ..nn._common import _CONVERTERS, layer_config, move_state, register_conversion, swap_modules
from ..nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNormBase
from .fold import is_batch_norm
from .save_output import save_output

__all__ = ["ConvertReport", "convert_model", "register_conversion"]

_TO_OURS: dict[type, type] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}
_TO_TORCH: dict[type, type] = {ours: theirs for theirs, ours in _TO_OURS.items()}

@dataclass
class ConvertReport:
    """What :func:`convert_model` did.

    ``converted``: ``(path, from class, to class)`` per swapped layer; ``kept_unfused``:
    ``(path, {name: module repr}, why)`` per layer that keeps modules after the norm, unfused.
    """

    converted: list[tuple[str, str, str]] = field(default_factory=list)
    kept_unfused: list[tuple[str, dict[str, str], str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} layer(s)"]
        for path, kept, why in self.kept_unfused:
            mods = ", ".join(f"{k}={v}" for k, v in kept.items())
            lines.append(f"  {path}: kept unfused after the norm: {mods} ({why})")
        return "\n".join(lines)


def _qualname(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


class _Origin:
    """What converting back needs to rebuild the user's layer: ``shell``, a copy of the
    original module without parameters or buffers (its class, attributes and stateless
    submodules; ``None`` in place of the submodules our layer keeps, which are taken from it),
    and ``activation``, the activation our layer was given (a later change of it means the
    shell no longer describes the layer). A plain object, not a module: it adds no
    ``state_dict`` key, and ``.to()`` has nothing to move in it."""

    __slots__ = ("shell", "activation")

    def __init__(self, original: nn.Module, kept: tuple[str, ...], activation: Any) -> None:
        shell = copy.copy(original)  # a new object whose __dict__ is a shallow copy
        shell._parameters = {k: None for k in original._parameters}
        shell._buffers = {k: None for k in original._buffers}
        shell._non_persistent_buffers_set = set(original._non_persistent_buffers_set)
        shell._modules = {k: None if k in kept else copy.deepcopy(v)
                          for k, v in original._modules.items()}
        self.shell, self.activation = shell, activation

    def rebuild(self, ours: _BatchNormBase) -> nn.Module | None:
        """The original class with ``ours``'s state, or ``None`` when ``ours`` has changed
        since (another activation, other kept modules): the generic path converts it then."""
        shell = self.shell
        kept = tuple(k for k, v in shell._modules.items() if v is None)
        if ours.activation != self.activation or kept != ours._unfused:
            return None
        new = copy.copy(shell)
        new._parameters = dict(shell._parameters)
        new._buffers = dict(shell._buffers)
        new._non_persistent_buffers_set = set(shell._non_persistent_buffers_set)
        new._modules = {k: ours._modules[k] if v is None else copy.deepcopy(v)
                        for k, v in shell._modules.items()}
        for key, value in layer_config(ours).items():  # a later change on our layer wins
            setattr(new, key, value)
        return move_state(ours, new)


def _remember(new: nn.Module, original: nn.Module) -> None:
    """Record ``original``'s class on ``new`` for the way back (see :class:`_Origin`)."""
    if isinstance(new, _BatchNormBase):
        new._convert_origin = _Origin(  # type: ignore[assignment]
            original, new._unfused, new.activation)


def _to_ours(m: nn.Module, path: str) -> nn.Module:
    new = _TO_OURS[type(m)](**layer_config(m))  # type: ignore[arg-type]
    new.layer_name = path or None
    return move_state(m, new)


def _to_torch(m: nn.Module, path: str, unfuse_activations: bool) -> nn.Module:
    assert isinstance(m, _BatchNormBase)
    new = move_state(m, _TO_TORCH[type(m)](**layer_config(m)))
    if m.activation is None and not m._unfused:
        return new
    if not unfuse_activations:
        what = f"a fused activation {m.activation!r}" if m.activation is not None else \
            f"modules after the norm ({', '.join(m._unfused)})"
        raise ValueError(
            f"convert_model: layer {path or '<root>'!r} ({type(m).__name__}) has {what} that "
            f"torch.nn.{type(new).__name__} cannot hold; pass unfuse_activations=True to get "
            "nn.Sequential(bn, activation, ...) instead"
        )
    parts: OrderedDict[str, nn.Module] = OrderedDict(bn=new)
    act = module_of(*parse_activation(m.activation))
    if act is not None:
        parts["act"] = act.train(m.training)
    for name, module in m.unfused_modules().items():
        parts[name if name not in parts else f"{name}_"] = module
    return nn.Sequential(parts)


_OPTIONAL_MODULES = ("batchnorm.nn.sync", "batchnorm.nn.frozen")


def _import_optional() -> None:
    """Import the modules that register their own conversions, where they exist."""
    for name in _OPTIONAL_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


@overload
def convert_model(model: nn.Module, target: str = ..., *, unfuse_activations: bool = ...,
                  sync_to: type | None = ..., save: str = ...,
                  return_report: Literal[False] = ...) -> nn.Module: ...
@overload
def convert_model(model: nn.Module, target: str = ..., *, unfuse_activations: bool = ...,
                  sync_to: type | None = ..., save: str = ...,
                  return_report: Literal[True]) -> tuple[nn.Module, ConvertReport]: ...


def convert_model(model: nn.Module, target: str = "batchnorm", *,
                  unfuse_activations: bool = False,
                  sync_to: type | None = None, save: str = "input",
                  return_report: bool = False) -> nn.Module | tuple[nn.Module, ConvertReport]:
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
        return_report: also return a :class:`ConvertReport` (the layers converted, and those
            that keep modules after the norm unfused, with the reason). Default: False

    A layer that came from a conversion goes back to its original class (timm's
    ``BatchNormAct2d``, ``torch.nn.SyncBatchNorm``, ...) with the same ``state_dict`` keys.
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
    report = ConvertReport()

    def one(m: nn.Module, path: str) -> nn.Module | None:
        new = _convert_one(m, path, target, unfuse_activations, sync_to, report)
        if new is not None and new is not m:
            report.converted.append((path or "<root>", _qualname(type(m)), _qualname(type(new))))
        return new

    result = swap_modules(model, one)
    if save != "input":
        save_output(result, save, warn=True)
    return (result, report) if return_report else result


def _convert_one(m: nn.Module, path: str, target: str, unfuse_activations: bool,
                 sync_to: type | None = None,
                 report: ConvertReport | None = None) -> nn.Module | None:
    """The replacement for ``m``, ``None`` when ``m`` is not a layer to convert."""
    kind = type(m)
    where = path or "<root>"
    if target == "batchnorm" and kind is nn.SyncBatchNorm and sync_to is not None:
        new = _to_class(m, path, sync_to)
        _remember(new, m)
        return new
    origin = getattr(m, "_convert_origin", None)
    if target == "torch" and isinstance(origin, _Origin) and isinstance(m, _BatchNormBase):
        restored = origin.rebuild(m)
        if restored is not None:
            return restored
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
        return _bn_act_to_ours(m, path, report)
    raise ValueError(
        f"convert_model: layer {where!r} is a {kind.__module__}.{kind.__qualname__}, a "
        "batch-norm class this conversion does not know; converting it could drop its "
        "behaviour, so the model was left unchanged"
    )


def _is_ours(kind: type) -> bool:
    return kind.__module__.split(".")[0] == __name__.split(".")[0]


def _to_class(m: nn.Module, path: str, cls: type) -> nn.Module:
    new = cls(**layer_config(m))  # type: ignore[arg-type]
    new.layer_name = path or None
    return move_state(m, new)


_STANDARD_STATE = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def _is_identity(m: nn.Module | None) -> bool:
    return m is None or isinstance(m, nn.Identity) or (
        type(m) in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
        and float(getattr(m, "p", 1.0)) == 0)


def _bn_act_to_ours(m: nn.Module, path: str, report: ConvertReport | None = None) -> nn.Module:
    """A timm-style ``BatchNormAct`` (PyTorch BN subclass with ``.act``, ``.drop``) → ours:
    the activation fused where it can be, ``drop``/``act`` kept after the norm otherwise."""
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
    children = dict(m.named_children())
    extra = sorted(set(children) - {"act", "drop"})
    if extra:
        raise refuse(f"it has submodules {extra} besides act/drop, and where they run in its "
                     "forward is unknown")
    state = {n for n, _ in m.named_parameters(recurse=False)} | \
        {n for n, _ in m.named_buffers(recurse=False)}
    if state - _STANDARD_STATE:
        raise refuse(f"it has parameters/buffers {sorted(state - _STANDARD_STATE)} that would "
                     "be lost")
    drop, act = children.get("drop"), children["act"]
    why = None
    try:
        name, param = parse_activation(act)
    except (ValueError, TypeError):
        why = f"{type(act).__qualname__} is not an activation we fuse"
    if why is None and not _is_identity(drop):
        why = f"{type(drop).__qualname__} runs between the norm and the activation"
    new = _TO_OURS[base](**layer_config(m))  # type: ignore[arg-type]
    if why is None:
        new.activation = spec_of(name, param)
    else:
        new.keep_after({k: v for k, v in children.items() if not _is_identity(v)})
    new.layer_name = path or None
    move_state(m, new)
    mismatch = _probe_mismatch(m, new, base)
    if mismatch:
        raise refuse(f"the converted layer does not reproduce its {mismatch} on a probe input "
                     "(its forward does something else)")
    _remember(new, m)
    if why is not None and report is not None:
        report.kept_unfused.append((where, {k: repr(v) for k, v in new.unfused_modules().items()},
                                    why))
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
        ya, yb = _seeded(a, x), _seeded(b, x)
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


def _seeded(module: nn.Module, x: torch.Tensor) -> Any:
    """``module(x)`` with the random generators forked and seeded, so that two modules with
    dropout draw the same masks (and the caller's generators are untouched)."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(0)
        return module(x)
