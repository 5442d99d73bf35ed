"""Small pieces the variant modules share: running-statistics update from given batch statistics,
and the checks of their extra constructor arguments.

The variants that compute their own batch statistics (ghost, masked) hand them here; the update
itself is :func:`batchnorm.ops.update_running_stats` (with its non-finite skip): no statistics
math lives in this file.
"""

from __future__ import annotations

import math
import numbers

from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ..functional import update_running_statistics


def update_running(module: _BatchNorm, mean: Tensor, var_unbiased: Tensor) -> None:
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
