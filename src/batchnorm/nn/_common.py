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

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..running import update_running_statistics


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
