"""batchnorm.functional.batch_norm against torch.nn.functional.batch_norm and float64."""

from __future__ import annotations

import pytest
import torch

import batchnorm.functional as BF
from tests.conftest import device_for
from tests.oracle import ACTIVATIONS, GRAD_TOL, TOL, float64_bn, make_layout, torch_bn

SHAPES = [(6, 3), (4, 3, 7), (3, 4, 5, 6), (2, 3, 2, 3, 4)]


def _params(c, dtype, device, affine=True):
    if not affine:
        return None, None
    w = (torch.rand(c, dtype=dtype, device=device) + 0.5).requires_grad_()
    b = torch.randn(c, dtype=dtype, device=device).requires_grad_()
    return w, b


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_forward_backward(backend, shape, layout, training, dtype):
    device = device_for(backend)
    c = shape[1]
    x0 = torch.randn(shape, dtype=dtype, device=device) * 2 + 0.5
    w, b = _params(c, dtype, device)
    rm0 = torch.randn(c, dtype=dtype, device=device)
    rv0 = torch.rand(c, dtype=dtype, device=device) + 0.5
    rm1, rv1, rm2, rv2 = rm0.clone(), rv0.clone(), rm0.clone(), rv0.clone()

    x1 = make_layout(x0, layout).detach().requires_grad_()
    y1 = BF.batch_norm(x1, rm1, rv1, w, b, training, 0.3, 1e-5)
    x2 = x0.detach().clone().requires_grad_()
    w2, b2 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    y2 = torch_bn(x2, rm2, rv2, w2, b2, training, 0.3, 1e-5)
    torch.testing.assert_close(y1, y2, **TOL[dtype])
    torch.testing.assert_close(rm1, rm2, **TOL[dtype])
    torch.testing.assert_close(rv1, rv2, **TOL[dtype])
    if layout == "channels_last" and x0.dim() > 2:
        perm = (0, *range(2, x0.dim()), 1)
        assert y1.permute(perm).is_contiguous(), "output must keep the input's memory format"

    gy = torch.randn_like(y2)
    y1.backward(gy)
    y2.backward(gy)
    torch.testing.assert_close(x1.grad, x2.grad, **GRAD_TOL[dtype])
    torch.testing.assert_close(w.grad, w2.grad, **GRAD_TOL[dtype])
    torch.testing.assert_close(b.grad, b2.grad, **GRAD_TOL[dtype])


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fused_residual_and_activation(backend, activation, training, layout):
    device = device_for(backend)
    dtype = torch.float32
    x0 = torch.randn(4, 5, 3, 3, dtype=dtype, device=device)
    r0 = torch.randn_like(x0)
    w, b = _params(5, dtype, device)
    rm, rv = torch.zeros(5, device=device), torch.ones(5, device=device) * 1.5

    x1 = make_layout(x0, layout).detach().requires_grad_()
    r1 = make_layout(r0, layout).detach().requires_grad_()
    y1 = BF.batch_norm(x1, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5,
                       activation=activation, residual=r1)
    x2, r2 = x0.detach().clone().requires_grad_(), r0.detach().clone().requires_grad_()
    w2, b2 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    y2 = torch_bn(x2, rm.clone(), rv.clone(), w2, b2, training, 0.1, 1e-5, activation, r2)
    torch.testing.assert_close(y1, y2, **TOL[dtype])
    gy = torch.randn_like(y2)
    y1.backward(gy)
    y2.backward(gy)
    for a, bb in ((x1.grad, x2.grad), (r1.grad, r2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(a, bb, **GRAD_TOL[dtype])


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5, 1.0, 1.7])
def test_any_float_momentum(backend, momentum):
    device = device_for(backend)
    x = torch.randn(8, 3, 4, device=device)
    rm1, rv1 = torch.randn(3, device=device), torch.rand(3, device=device) + 0.1
    rm2, rv2 = rm1.clone(), rv1.clone()
    BF.batch_norm(x, rm1, rv1, training=True, momentum=momentum)
    torch.nn.functional.batch_norm(x, rm2, rv2, training=True, momentum=momentum)
    torch.testing.assert_close(rm1, rm2)
    torch.testing.assert_close(rv1, rv2)


def test_training_without_running_stats(backend):
    device = device_for(backend)
    x = torch.randn(5, 4, 3, device=device)
    y = BF.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))


def test_better_conditioned_than_torch_when_mean_dominates(backend):
    """|mean|/std = 1e4 in float32: error against float64 no worse than PyTorch's."""
    device = device_for(backend)
    for layout in ("contiguous", "channels_last"):
        base = torch.randn(16, 3, 12, 12, dtype=torch.float64, device=device)
        x = make_layout((base + 1e4).float(), layout)
        ref, mean_ref, var_ref = float64_bn(x, None, None, None, None, True, 1e-5)
        rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
        ours = BF.batch_norm(x, rm, rv, training=True, momentum=1.0)
        rm_t, rv_t = torch.zeros(3, device=device), torch.ones(3, device=device)
        theirs = torch.nn.functional.batch_norm(x, rm_t, rv_t, training=True, momentum=1.0)
        err_ours = (ours.double() - ref).abs().max().item()
        err_theirs = (theirs.double() - ref).abs().max().item()
        assert err_ours <= err_theirs and err_ours < 1e-5, (layout, err_ours, err_theirs)
        n = x.numel() // 3
        unbiased = var_ref * n / (n - 1)
        for ours_stat, theirs_stat, exact in ((rm, rm_t, mean_ref), (rv, rv_t, unbiased)):
            err_ours = (ours_stat.double() - exact).abs().max()
            err_theirs = (theirs_stat.double() - exact).abs().max()
            assert err_ours <= err_theirs * 1.5 + 1e-6


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch(backend, training):
    device = device_for(backend)
    x = torch.empty(0, 3, 4, device=device, requires_grad=True)
    w, b = _params(3, torch.float32, device)
    rm, rv = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y = BF.batch_norm(x, rm, rv, w, b, training=training)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    torch.testing.assert_close(w.grad, torch.zeros(3, device=device))
    torch.testing.assert_close(b.grad, torch.zeros(3, device=device))
    torch.testing.assert_close(rm, rm0)
    torch.testing.assert_close(rv, rv0)


def test_half_input_with_float_parameters(backend):
    device = device_for(backend)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(8, 4, 5, device=device).to(dtype)
        w, b = _params(4, torch.float32, device)
        rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
        y = BF.batch_norm(x, rm, rv, w, b, training=True)
        assert y.dtype == dtype
        ref, mean, _ = float64_bn(x, None, None, w.detach(), b.detach(), True, 1e-5)
        torch.testing.assert_close(y.double(), ref, **TOL[dtype])
        torch.testing.assert_close(rm.double(), 0.1 * mean, rtol=1e-3, atol=1e-3)
        y.float().sum().backward()
        assert w.grad is not None and w.grad.dtype == torch.float32
