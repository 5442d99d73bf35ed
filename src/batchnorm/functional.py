"""Functional batch normalization: argument checks, layout canonicalization, running-stat policy.

This is the boundary: everything below it (ops, kernels, statistics) assumes valid arguments.
Every check runs before any state changes, so a rejected call leaves running statistics as
they were.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from . import ops
from . import stats as S
from ._errors import BatchNormTypeError, BatchNormValueError, describe
from .activations import ActivationSpec, parse_activation

__all__ = ["batch_norm", "NonFiniteBatchWarning"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF = (torch.float16, torch.bfloat16)


class NonFiniteBatchWarning(RuntimeWarning):
    """A batch's statistics were NaN or Inf, so the running statistics were left unchanged."""


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
) -> Tensor:
    """:func:`batch_norm` with the module's extras: the batch counters and ``momentum=None``.

    ``momentum=None`` means a cumulative average (factor ``1/num_batches_tracked``), which needs
    ``num_batches_tracked``.
    """
    act, slope = parse_activation(activation)
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
    x, restore, layout = canonicalize(input)
    r = None if residual is None else to_layout(residual, layout)
    running = None
    count = x.numel() // x.shape[1] if x.shape[1] else 0
    if update:
        assert running_mean is not None and running_var is not None
        # eager CPU: the update rides on the forward's backend call (see ops.running_update)
        running = ops.running_update(running_mean, running_var, num_batches_tracked,
                                     0.0 if momentum is None else float(momentum),
                                     momentum is None, count)
    y, mean, _rstd, var = ops.forward(
        x, weight, bias, r,
        None if training else running_mean, None if training else running_var,
        bool(training), float(eps), act, slope, running,
    )
    if update:
        assert running_mean is not None and running_var is not None
        ok = ops.finish_running_update(running, running_mean, running_var, num_batches_tracked,
                                       num_batches_skipped)
        if ok is None:  # not folded: the update on its own
            update_running_statistics(
                running_mean, running_var, mean, S.unbiased_var(var, count), momentum,
                count=count, num_batches_tracked=num_batches_tracked,
                num_batches_skipped=num_batches_skipped, layer_name=layer_name,
            )
        elif not ok:
            _warn_skipped(layer_name, num_batches_skipped)
    return restore(y)


def _vmapped(t: object) -> bool:
    """Whether ``t`` is mapped by an enclosing ``torch.func.vmap`` (at any transform level)."""
    from torch._C import _functorch

    while isinstance(t, Tensor) and _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.is_batchedtensor(t):
            return True
        t = _functorch.get_unwrapped(t)
    return False


def update_running_statistics(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var_unbiased: Tensor,
    momentum: float | None,
    *,
    count: int | None = None,
    num_batches_tracked: Tensor | None = None,
    num_batches_skipped: Tensor | None = None,
    layer_name: str | None = None,
) -> None:
    """The running-statistics policy every layer shares (plain, distributed, variants).

    Blends a batch's ``mean`` and unbiased variance in with ``momentum`` (``None``: cumulative
    average over ``num_batches_tracked``); a batch whose statistics are not finite changes
    nothing but ``num_batches_skipped``, and is reported right away on the CPU (where reading
    the flag costs no device synchronization). An empty batch (``count == 0``) carries no
    statistics: the running ones stay, and it is counted as tracked, as PyTorch counts it.
    """
    if count == 0:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return
    ok = ops.update_running_stats(
        running_mean, running_var, num_batches_tracked, num_batches_skipped, mean, var_unbiased,
        0.0 if momentum is None else float(momentum), momentum is None,
    )
    if running_mean.device.type == "cpu" and not torch.compiler.is_compiling() \
            and not torch._C._are_functorch_transforms_active() and not ok:
        _warn_skipped(layer_name, num_batches_skipped)


def _warn_skipped(layer_name: str | None, skipped: Tensor | None) -> None:
    so_far = "" if skipped is None else f" ({int(skipped)} skipped so far)"
    warnings.warn(
        f"{layer_name or 'batch_norm'}: batch statistics are not finite (NaN or Inf in the "
        f"input); running statistics and num_batches_tracked were left unchanged{so_far}",
        NonFiniteBatchWarning,
        stacklevel=_caller_level(),
    )


_INTERNAL = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
             os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def _caller_level() -> int:
    """The ``stacklevel`` that makes a warning raised by the caller of this function name the
    first frame outside this package and torch (the user's call of a layer or function, however
    deep the layers in between)."""
    frame = sys._getframe(1)  # the frame that calls warnings.warn: stacklevel 1
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


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


# --------------------------------------------------------------------------------------------
# Canonical layouts (see kernels/base.py)

Layout = tuple[str, tuple[int, ...]]


def canonicalize(x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor], Layout]:
    """View ``x`` as channels-first ``(N, C, S)`` or channels-last ``(M, C)`` without copying.

    Returns the canonical tensor, the function that views a canonical output back in ``x``'s
    shape and memory format, and the layout (to bring a residual into the same form).
    Inputs that are neither are made contiguous once.
    """
    if x.dim() == 2 and x.is_contiguous():  # already (M, C): no view, no copy
        return x, _identity, ("nc", tuple(x.shape))
    shape = tuple(x.shape)
    n, c, spatial = shape[0], shape[1], shape[2:]
    s = math.prod(spatial)
    if x.dim() == 2 or (s == 1 and x.is_contiguous()):
        return x.contiguous().view(n, c), lambda y: y.view(shape), ("nc", shape)
    if not x.is_contiguous() or (x.numel() == 0 and _empty_channels_last(x)):
        perm = (0, *range(2, x.dim()), 1)
        xp = x.permute(perm)
        if xp.is_contiguous():
            inverse = tuple(perm.index(i) for i in range(x.dim()))
            permuted_shape = (n, *spatial, c)
            return (
                xp.view(n * s, c),
                lambda y: y.view(permuted_shape).permute(inverse),
                ("last", shape),
            )
        x = x.contiguous()
    return x.view(n, c, s), lambda y: y.view(shape), ("first", shape)


def _identity(y: Tensor) -> Tensor:
    return y


def _empty_channels_last(x: Tensor) -> bool:
    """An empty 4-D/5-D tensor with channels-last strides: every empty tensor counts as
    contiguous, so only its strides say which format the output should keep (as PyTorch's)."""
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    return x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)


def to_layout(t: Tensor, layout: Layout) -> Tensor:
    """Bring ``t`` (same shape as the input) into the input's canonical layout."""
    kind, shape = layout
    n, c = shape[0], shape[1]
    if kind == "nc":
        return t.contiguous().view(n, c)
    if kind == "last":
        perm = (0, *range(2, t.dim()), 1)
        return t.permute(perm).contiguous().view(-1, c)
    return t.contiguous().view(n, c, math.prod(shape[2:]))
