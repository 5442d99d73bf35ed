"""Double backward, torch.compile without graph breaks, bitwise determinism."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import batchnorm
import batchnorm.functional as BF
from tests.conftest import device_for
from tests.oracle import ACTIVATIONS


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_and_gradgradcheck(backend, training, activation, channels_last):
    kw = dict(dtype=torch.float64)
    x = torch.randn(3, 2, 2, 3, **kw)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = (torch.rand(2, **kw) + 0.5).requires_grad_()
    b = torch.randn(2, **kw).requires_grad_()
    r = torch.randn(3, 2, 2, 3, **kw).requires_grad_()
    rm, rv = torch.randn(2, **kw), torch.rand(2, **kw) + 0.5

    def f(x, w, b, r):
        return BF.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5,
                             activation=activation, residual=r)

    assert gradcheck(f, (x, w, b, r))
    assert gradgradcheck(f, (x, w, b, r))


def _net(**kw):
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        batchnorm.BatchNorm2d(8, activation="relu", **kw),
        torch.nn.Conv2d(8, 4, 3),
        batchnorm.BatchNorm2d(4, momentum=None),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 5),
        batchnorm.BatchNorm1d(5, activation="silu"),
    )


def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    model = _net()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 8, 8)
    for _ in range(2):
        y1, y2 = compiled(x), eager(x)
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
        y1.square().sum().backward()
        y2.square().sum().backward()
    for (n, a), (_, b) in zip(model.named_parameters(), eager.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=n)
    for (n, a), (_, b) in zip(model.named_buffers(), eager.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=n)
    model.eval()
    eager.eval()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)


def test_compile_has_no_graph_break():
    torch._dynamo.reset()
    model = _net()
    explanation = torch._dynamo.explain(model)(torch.randn(4, 3, 8, 8))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compile_channels_last_and_residual():
    torch._dynamo.reset()
    m = batchnorm.BatchNorm2d(4, activation="gelu")
    f = torch.compile(lambda x, r: m(x, r), fullgraph=True)
    x = torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    r = torch.randn(2, 4, 3, 3)
    y = f(x, r)
    ref = torch.nn.functional.gelu(
        torch.nn.functional.batch_norm(x, None, None, m.weight, m.bias, True) + r)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_bitwise_deterministic(backend):
    device = device_for(backend)
    for shape, cl in (((8, 16, 9, 7), False), ((8, 16, 9, 7), True), ((64, 33), False)):
        x = torch.randn(shape, device=device) * 3 + 1
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        r = torch.randn(shape, device=device)
        gy = torch.randn(shape, device=device)
        outs = []
        for _ in range(2):
            m = batchnorm.BatchNorm1d(shape[1], activation="relu") if len(shape) == 2 else \
                batchnorm.BatchNorm2d(shape[1], activation="relu")
            m.to(device)
            xx = x.detach().clone().requires_grad_()
            y = m(xx, r)
            y.backward(gy)
            outs.append((y, xx.grad, m.weight.grad, m.bias.grad, m.running_mean, m.running_var))
        for a, b in zip(*outs, strict=True):
            assert torch.equal(a, b)
