"""The two oracles: PyTorch itself, and a float64 reference written from the definition."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=2e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=4e-2, atol=4e-2),
}
GRAD_TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=2e-2, atol=2e-2),
    torch.bfloat16: dict(rtol=8e-2, atol=8e-2),
}


_MODULES = {
    "relu": torch.nn.ReLU, "silu": torch.nn.SiLU, "gelu": torch.nn.GELU,
    "relu6": torch.nn.ReLU6, "hardswish": torch.nn.Hardswish, "hardsigmoid": torch.nn.Hardsigmoid,
    "sigmoid": torch.nn.Sigmoid, "tanh": torch.nn.Tanh, "mish": torch.nn.Mish,
    "elu": torch.nn.ELU, "leaky_relu": lambda: torch.nn.LeakyReLU(0.01),
    "gelu_tanh": lambda: torch.nn.GELU(approximate="tanh"),
}


def torch_module(activation) -> torch.nn.Module:
    """PyTorch's own module for an activation spec (independent of batchnorm's table)."""
    if activation is None:
        return torch.nn.Identity()
    if isinstance(activation, torch.nn.Module):
        return activation
    if isinstance(activation, tuple):
        name, param = activation
        return {"leaky_relu": torch.nn.LeakyReLU, "elu": torch.nn.ELU}[name](param)
    return _MODULES[activation]()


def torch_act(y: Tensor, activation) -> Tensor:
    return torch_module(activation)(y)


def torch_bn(x, rm, rv, w, b, training, momentum, eps, activation=None, residual=None):
    """PyTorch's batch norm followed by the add and the activation, as users write it."""
    y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return torch_act(y, activation)


def float64_bn(x, rm, rv, w, b, training, eps, activation=None, residual=None):
    """Definition in float64: returns (y, batch mean, biased batch var)."""
    xd = x.double()
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    if training:
        mean = xd.mean(dims)
        var = (xd - mean.view(shape)).square().mean(dims)
    else:
        mean, var = rm.double(), rv.double()
    y = (xd - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    if w is not None:
        y = y * w.double().view(shape)
    if b is not None:
        y = y + b.double().view(shape)
    if residual is not None:
        y = y + residual.double()
    return torch_act(y, activation), mean, var


def make_layout(x: Tensor, layout: str) -> Tensor:
    """Return ``x`` (values unchanged) in the named memory layout."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        if x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        if x.dim() == 5:
            return x.contiguous(memory_format=torch.channels_last_3d)
        perm = (0, *range(2, x.dim()), 1)
        inv = tuple(perm.index(i) for i in range(x.dim()))
        return x.permute(perm).contiguous().permute(inv)
    if layout == "strided":  # neither: every other element along the last dim
        big = torch.repeat_interleave(x, 2, dim=-1)
        return big[..., ::2]
    raise ValueError(layout)


ACTIVATIONS = [None, "relu", ("leaky_relu", 0.2), "silu", "gelu"]
