"""Reduced-precision inputs: each variant against its own float64 run, with the dtype's tolerance.

Parameters and buffers stay float32 (mixed precision, as autocast leaves them); statistics
accumulate in float32 whatever the input dtype.
"""

from __future__ import annotations

import copy

import pytest
import torch

import batchnorm
from tests.oracle import TOL


def _layers():
    return {
        "renorm": (batchnorm.BatchRenorm2d(3, warmup_steps=0), (6, 3, 4, 4), ()),
        "ghost": (batchnorm.GhostBatchNorm2d(3, virtual_batch_size=2), (7, 3, 4, 4), ()),
        "masked": (batchnorm.MaskedBatchNorm1d(3), (4, 3, 8),
                   (torch.tensor([8, 5, 3, 1]),)),
        "virtual": (batchnorm.VirtualBatchNorm2d(3), (6, 3, 4, 4), ()),
        "frozen": (batchnorm.FrozenBatchNorm2d(3), (6, 3, 4, 4), ()),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["renorm", "ghost", "masked", "virtual", "frozen"])
def test_low_precision_matches_float64(name, dtype):
    layer, shape, extra = _layers()[name]
    if hasattr(layer, "running_mean"):
        with torch.no_grad():
            layer.running_mean.uniform_(-0.5, 0.5)
    if name == "virtual":
        layer.set_reference(torch.randn(shape))
    ref_layer = copy.deepcopy(layer).double()
    x = torch.randn(shape) * 2 + 1
    xl = x.to(dtype).detach().clone().requires_grad_()
    xd = x.to(dtype).double().detach().requires_grad_()
    y = layer(xl, *extra)
    want = ref_layer(xd, *extra)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), want, **TOL[dtype])
    gy = torch.randn(shape)
    y.backward(gy.to(dtype))
    want.backward(gy.double())
    scale = max(1.0, float(xd.grad.abs().max()))
    tol = {k: v * scale for k, v in TOL[dtype].items()} if dtype != torch.float32 else \
        dict(rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(xl.grad.double(), xd.grad, **tol)
    if hasattr(layer, "running_var") and name != "frozen":
        torch.testing.assert_close(layer.running_var.double(), ref_layer.running_var,
                                   rtol=1e-4, atol=1e-4)
