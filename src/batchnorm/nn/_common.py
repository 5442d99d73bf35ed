"""Small pieces the modules share: running-statistics update from given batch statistics, the
checks of the variants' extra constructor arguments, and the all-or-nothing module swap that the
converters (convert_model, convert_sync_batchnorm, freeze/unfreeze) walk models with.

The variants that compute their own batch statistics (ghost, masked) hand them here; the update
itself is :func:`batchnorm.running.update_running_statistics` (with its non-finite skip): no
statistics math lives in this file.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..running import update_running_statistics

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


def layer_config(m: _BatchNorm) -> dict[str, Any]:
    """The constructor arguments shared by every batch-norm class (PyTorch's and ours) that
    rebuild ``m``'s configuration; state is moved separately (:func:`move_state`). Our
    variants add their own through ``_extra_config`` (:func:`variant_config`)."""
    return dict(num_features=m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                track_running_stats=m.track_running_stats)


def variant_config(m: _BatchNorm) -> dict[str, Any]:
    """:func:`layer_config` plus what our classes add (bias, activation, a variant's own
    arguments): everything that rebuilds ``m`` as its own class."""
    kw = layer_config(m)
    extra = getattr(m, "_extra_config", None)
    if extra is not None:
        kw.update(extra())
    return kw


def swap_modules(model: nn.Module,
                 replacement: Callable[[nn.Module, str], nn.Module | None]) -> nn.Module:
    """Replace each submodule for which ``replacement(module, path)`` returns a module.

    Replaced modules are not descended into. Every replacement is built before any is installed,
    so a refusal (an exception from ``replacement``) leaves the model unchanged, never
    half-converted. Returns ``model``, or the root's replacement.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    replacements: dict[str, nn.Module] = {}

    def visit(m: nn.Module, path: str) -> None:
        new = replacement(m, path)
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


def update_from_batch(module: _BatchNorm, mean: Tensor, var_unbiased: Tensor) -> None:
    """Blend a batch's ``mean`` and unbiased variance into ``module``'s running statistics, as
    :func:`batchnorm.functional.batch_norm_impl` does for plain BN."""
    running_mean, running_var = module.running_mean, module.running_var
    if running_mean is None or running_var is None:
        return
    update_running_statistics(
        running_mean, running_var, mean, var_unbiased, module.momentum,
        num_batches_tracked=module.num_batches_tracked,
        num_batches_skipped=getattr(module, "num_batches_skipped", None),
        layer_name=getattr(module, "layer_name", None) or type(module).__name__,
    )


def check_real(name: str, value: object, *, minimum: float, inclusive: bool = True) -> float:
    """A finite real number ``>= minimum`` (``> minimum`` when not ``inclusive``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    bad = v < minimum if inclusive else v <= minimum
    if not math.isfinite(v) or bad:
        rel = ">=" if inclusive else ">"
        raise ValueError(f"{name}: expected a finite number {rel} {minimum}, got {value!r}")
    return v


def check_int(name: str, value: object, *, minimum: int) -> int:
    """An ``int`` (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)
