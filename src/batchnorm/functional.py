"""Functional batch normalization: argument checks, layout canonicalization, running-stat policy.

This is the boundary: everything below it (ops, kernels, statistics) assumes valid arguments.
Every check runs before any state changes, so a rejected call leaves running statistics as
they were.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from . import ops
from . import stats as S
from ._errors import BatchNormTypeError, BatchNormValueError, describe
from .activations import ActivationSpec, parse_activation
from .ops import saved_output as ops_saved_output
from .ops.fast_train import train as fast_train
from .running import (
    NonFiniteBatchWarning,
    finish_folded,
    fold_request,
    update_running_statistics,
    warn_skipped,
)

__all__ = ["batch_norm", "NonFiniteBatchWarning"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF = (torch.float16, torch.bfloat16)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    activation: ActivationSpec = None,
    residual: Tensor | None = None,
) -> Tensor:
    r"""Batch normalization, with PyTorch's signature and semantics, plus fused add and activation.

    .. math::
        y = \mathrm{act}\Big(\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}
            \cdot \gamma + \beta + \text{residual}\Big)

    Statistics are per channel (dimension 1) over all other dimensions: the batch's own in
    training, ``running_mean``/``running_var`` otherwise. In training, given running statistics
    are updated in place as ``(1 - momentum)·running + momentum·batch`` with the unbiased batch
    variance; a batch whose statistics are not finite leaves them unchanged (and warns on the
    CPU).

    Args:
        input: ``(N, C, *)`` floating-point tensor, any memory format (the output keeps it).
        running_mean, running_var: ``(C,)`` or ``None`` (training only).
        weight, bias: ``(C,)`` affine parameters γ and β, or ``None``.
        training: use batch statistics (and update the running ones).
        momentum: factor of the running-statistics update. Default: 0.1
        eps: added to the variance. Default: 1e-5
        activation: ``None``, a name of :data:`batchnorm.activations.ACTIVATIONS`
            (``"relu"``, ``"leaky_relu"`` (slope 0.01), ``"silu"``, ``"gelu"``,
            ``"gelu_tanh"``, ``"relu6"``, ``"hardswish"``, ``"hardsigmoid"``, ``"sigmoid"``,
            ``"tanh"``, ``"elu"`` (alpha 1), ``"mish"``), ``("leaky_relu", s)``,
            ``("elu", alpha)`` or the matching ``nn`` module, applied last. Default: None
        residual: tensor of ``input``'s shape added after the affine transform, before the
            activation. Default: None
    """
    if isinstance(input, Tensor) and input.dim() == 1 and input.numel() == 0:
        return _empty_1d(input, running_mean, running_var, weight, bias, training, momentum, eps,
                         activation, residual)
    return batch_norm_impl(
        input, running_mean, running_var, weight, bias, training, momentum, eps,
        activation=activation, residual=residual,
    )


def _empty_1d(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
              weight: Tensor | None, bias: Tensor | None, training: bool,
              momentum: float | None, eps: float, activation: ActivationSpec,
              residual: Tensor | None) -> Tensor:
    """A 1-D input with no element: PyTorch returns an empty result (whatever the running
    statistics hold; a 1-D input has no channel dimension to match them against) and changes
    nothing, and so does this. The arguments still get their type and value checks."""
    check_input(input, min_dim=1)
    parse_activation(activation)
    check_eps(eps, bool(training))
    if momentum is not None and not math.isfinite(_real("momentum", momentum)):
        raise ValueError(f"momentum: expected a finite number, got {momentum}")
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
    if residual is not None and residual.shape != input.shape:
        raise BatchNormValueError(
            f"residual: expected the shape of input {tuple(input.shape)}, got "
            f"{tuple(residual.shape)}")
    return input.clone()


def batch_norm_impl(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    *,
    activation: ActivationSpec = None,
    residual: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
    num_batches_skipped: Tensor | None = None,
    layer_name: str | None = None,
    save: str = "input",
    inplace: bool = False,
) -> Tensor:
    """:func:`batch_norm` with the module's extras: the batch counters and ``momentum=None``.

    ``momentum=None`` means a cumulative average (factor ``1/num_batches_tracked``), which needs
    ``num_batches_tracked``. ``save="output"`` (``inplace``): the memory mode of
    :mod:`batchnorm.ops.saved_output`.
    """
    act, slope = parse_activation(activation)
    if training and save == "input" and inplace is False and running_mean is not None \
            and running_var is not None:
        # the common call by the shortest path (batchnorm.ops.fast_train); None: it declined
        # (anything it does not handle, bad arguments included) and nothing has changed
        y = fast_train(input, weight, bias, residual, running_mean, running_var,
                       num_batches_tracked, num_batches_skipped, momentum, eps, act, slope,
                       lambda: layer_name)
        if y is not None:
            return y
    if save != "input" or inplace is not False:
        ops_saved_output.check_mode(save, inplace, act, slope)
    check_arguments(input, running_mean, running_var, weight, bias, training, momentum, eps,
                    residual, num_batches_tracked)
    if torch.jit.is_tracing():
        raise TypeError(
            "torch.jit.trace cannot record batchnorm's layers: their kernels run outside "
            "TorchScript (the trace would keep their outputs as constants). Use "
            "torch.export.export (or batchnorm.export_program / batchnorm.export_onnx), or trace "
            "a copy with PyTorch's layers: batchnorm.convert_model(copy.deepcopy(model), "
            "target='torch', unfuse_activations=True)")
    update = training and running_mean is not None and running_var is not None
    if update and torch._C._are_functorch_transforms_active() and _vmapped(input) \
            and not _vmapped(running_mean):
        raise RuntimeError(
            "batch_norm: torch.func.vmap maps the input but not running_mean/running_var, "
            "which training updates in place; use track_running_stats=False, eval mode, or "
            "map the running statistics too")
    running = None
    count = input.numel() // input.shape[1] if input.shape[1] else 0
    if update:
        assert running_mean is not None and running_var is not None
        # eager CPU: the update rides on the forward's backend call (see running.py)
        running = fold_request(running_mean, running_var, num_batches_tracked,
                               0.0 if momentum is None else float(momentum),
                               momentum is None, count)
    args = (input, weight, bias, residual, None if training else running_mean,
            None if training else running_var, bool(training), float(eps), act, slope, running)
    if save == "input":
        y, mean, _rstd, var = ops.forward(*args)
    else:
        y, mean, _rstd, var = ops_saved_output.forward(*args, inplace=inplace)
    if update:
        assert running_mean is not None and running_var is not None
        ok = finish_folded(running, running_mean, running_var, num_batches_tracked,
                           num_batches_skipped)
        if ok is None:  # not folded: the update on its own
            update_running_statistics(
                running_mean, running_var, mean, S.unbiased_var(var, count), momentum,
                count=count, num_batches_tracked=num_batches_tracked,
                num_batches_skipped=num_batches_skipped, layer_name=layer_name,
            )
        elif not ok:
            warn_skipped(layer_name, num_batches_skipped)
    return y


def _vmapped(t: object) -> bool:
    """Whether ``t`` is mapped by an enclosing ``torch.func.vmap`` (at any transform level)."""
    from torch._C import _functorch

    while isinstance(t, Tensor) and _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.is_batchedtensor(t):
            return True
        t = _functorch.get_unwrapped(t)
    return False


# --------------------------------------------------------------------------------------------
# Checks


def _real(name: str, value: object) -> float:
    if type(value) is float:  # the common case, without the numbers.Real ABC check
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    return float(value)


def check_eps(eps: object, training: bool) -> float:
    e = _real("eps", eps)
    if math.isnan(e):
        raise ValueError("batch_norm eps must be a number, but got nan")
    if training and e <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {e}")
    if e < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {e}")
    return e


def check_input(input: object, *, min_dim: int = 2) -> Tensor:
    if not isinstance(input, Tensor):
        raise TypeError(f"input: expected a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in _FLOATS:
        raise BatchNormTypeError(
            "input: expected a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {input.dtype}"
        )
    if input.dim() < min_dim:
        raise ValueError(
            f"input: expected at least {min_dim} dimensions (N, C, ...), got a {input.dim()}-D "
            f"tensor of shape {tuple(input.shape)}"
        )
    return input


def check_channel_tensor(name: str, t: object, input: Tensor) -> None:
    """A per-channel tensor (weight, bias, running statistic) that must match ``input``."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
    c = input.shape[1]
    if t.dim() != 1 or t.shape[0] != c:
        raise BatchNormValueError(
            f"{name} should contain {c} elements not {t.numel()}: expected shape ({c},) for "
            f"input with {c} channels ({describe(input)}), got shape {tuple(t.shape)}"
        )
    if not (t.is_cpu and input.is_cpu) and t.device != input.device:  # is_cpu: no device object
        raise BatchNormValueError(
            f"{name}: expected a tensor on device {input.device} like input, got device {t.device}"
        )
    if t.dtype is not input.dtype and (input.dtype not in _HALF or t.dtype is not torch.float32):
        allowed = {input.dtype, torch.float32} if input.dtype in _HALF else {input.dtype}
        raise BatchNormTypeError(
            f"{name}: expected dtype {' or '.join(sorted(str(d) for d in allowed))} for "
            f"{input.dtype} input, got {t.dtype}"
        )


def check_arguments(
    input: object,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    residual: Tensor | None,
    num_batches_tracked: Tensor | None = None,
    *,
    local_count: bool = True,
) -> None:
    """Every argument check of :func:`batch_norm_impl`, before any state changes.

    ``local_count=False`` leaves out the training rule "more than one value per channel", for a
    caller whose statistics span more than this input (SyncBatchNorm checks the global count
    once the ranks have exchanged theirs).
    """
    x = check_input(input)
    check_eps(eps, bool(training))
    if momentum is None:
        if training and running_mean is not None and num_batches_tracked is None:
            raise TypeError("momentum: expected a float (None needs num_batches_tracked)")
    else:
        m = _real("momentum", momentum)
        if not math.isfinite(m):
            raise ValueError(f"momentum: expected a finite number, got {m}")
    if training:
        size = x.shape
        per_channel = size[0] * math.prod(size[2:])
        if per_channel == 1 and local_count:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {size}"
            )
    elif running_mean is None or running_var is None:
        missing = "running_mean" if running_mean is None else "running_var"
        raise BatchNormValueError(
            f"{missing} must be defined in evaluation mode (training=False): pass running "
            "statistics or use training=True"
        )
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "running_mean, running_var: expected both tensors or both None, got "
            f"{describe(running_mean)} and {describe(running_var)}"
        )
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        check_channel_tensor(name, t, x)
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"residual: expected a torch.Tensor or None, got "
                            f"{type(residual).__name__}")
        if residual.shape != x.shape:
            raise BatchNormValueError(
                f"residual: expected the shape of input {tuple(x.shape)}, got "
                f"{tuple(residual.shape)}"
            )
        if not (residual.is_cpu and x.is_cpu) and residual.device != x.device:
            raise BatchNormValueError(
                f"residual: expected a tensor on device {x.device} like input, got device "
                f"{residual.device}"
            )
        if residual.dtype != x.dtype:
            raise BatchNormTypeError(
                f"residual: expected dtype {x.dtype} like input, got {residual.dtype}"
            )
