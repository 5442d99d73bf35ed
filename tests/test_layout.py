"""Our output is an ordinary tensor in the input's memory format: a separate activation module
after the layer (in place or not) runs as it does after PyTorch's layer, and its backward hands
our backward a gradient in the input's memory format.

Before, the output was a view of the op's canonical result; an in-place op on it made autograd
rebuild the gradient of the whole base (``CopySlices``/``AsStridedBackward0``): the unfused
path of every real model was slower than PyTorch's. These tests assert the graph and the
layouts, not times.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.layout import canonicalize, empty_output

FORMATS = {
    "nchw": torch.contiguous_format,
    "channels_last": torch.channels_last,
}


def _graph_names(fn: torch.autograd.graph.Node | None) -> set[str]:
    seen: set[str] = set()
    stack = [fn]
    visited: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        seen.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return seen


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("inplace", [False, True])
def test_separate_relu_gets_gradient_in_input_format(cpu_backend, fmt, inplace):
    memory_format = FORMATS[fmt]
    torch.manual_seed(0)
    bn = batchnorm.BatchNorm2d(8)
    ref = nn.BatchNorm2d(8)
    conv = nn.Conv2d(8, 4, 3).to(memory_format=memory_format)
    x0 = torch.randn(4, 8, 6, 5).to(memory_format=memory_format)
    x, xr = x0.clone().requires_grad_(), x0.clone().requires_grad_()

    y = bn(x)
    assert not y._is_view()
    assert y.is_contiguous(memory_format=memory_format)
    a = nn.ReLU(inplace=inplace)(y)
    seen: list[torch.Tensor] = []
    # the gradient our backward receives is the one the ReLU's backward produced
    a.grad_fn.register_hook(lambda grad_inputs, grad_outputs: seen.append(grad_inputs[0]))
    names = _graph_names(a.grad_fn)
    assert not names & {"CopySlices", "AsStridedBackward0", "AsStridedBackward1"}, names
    conv(a).square().sum().backward()

    yr = nn.ReLU(inplace=inplace)(ref(xr))
    conv(yr).square().sum().backward()
    assert seen and seen[0].is_contiguous(memory_format=memory_format)
    assert x.grad is not None and xr.grad is not None
    assert x.grad.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_inplace_add_then_relu_matches_torch(cpu_backend, fmt):
    """torchvision's block: ``out = bn(..); out += identity; out = relu_(out)``."""
    memory_format = FORMATS[fmt]
    torch.manual_seed(1)
    x0 = torch.randn(3, 4, 5, 5).to(memory_format=memory_format)
    idn0 = torch.randn(3, 4, 5, 5).to(memory_format=memory_format)
    results = []
    for bn in (batchnorm.BatchNorm2d(4), nn.BatchNorm2d(4)):
        x, idn = x0.clone().requires_grad_(), idn0.clone().requires_grad_()
        out = bn(x)
        out += idn
        out = torch.relu_(out)
        out.mul(torch.arange(out.numel()).view_as(out).sin()).sum().backward()
        results.append((out.detach(), x.grad, idn.grad, bn.running_var.clone()))
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, fmt", [
    ((4, 3), None), ((4, 3, 1, 1), None), ((2, 3, 4), None), ((2, 3, 4, 5), "cl"),
    ((2, 3, 2, 4, 5), "cl3d"), ((2, 3, 4, 5), "sliced"), ((0, 3, 4, 5), "cl"),
])
def test_restore_is_owning_and_keeps_format(shape, fmt):
    x = torch.randn(shape)
    if fmt == "cl":
        x = x.to(memory_format=torch.channels_last)
    elif fmt == "cl3d":
        x = x.to(memory_format=torch.channels_last_3d)
    elif fmt == "sliced":
        x = torch.randn(shape[0], shape[1], shape[2], 2 * shape[3])[..., ::2]
    xc, lay = canonicalize(x)
    assert xc.dim() in (2, 3) and xc.is_contiguous()
    y = lay.restore(xc * 2)
    assert not y._is_view()
    assert y.shape == x.shape and y.stride() == empty_output(x).stride()
    torch.testing.assert_close(y, x * 2)
    torch.testing.assert_close(lay.canonical(y.contiguous()), xc * 2)
