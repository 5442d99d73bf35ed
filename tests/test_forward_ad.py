"""Forward-mode AD (dual tensors) through our layers matches PyTorch's."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import batchnorm
from tests.conftest import device_for


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_ad_matches_torch(backend, training, channels_last):
    device = device_for(backend)
    ours = batchnorm.BatchNorm2d(3, activation="silu", device=device).double().train(training)
    theirs = torch.nn.BatchNorm2d(3, device=device).double().train(training)
    x = torch.randn(4, 3, 2, 5, dtype=torch.double, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    v = torch.randn_like(x)
    with fwAD.dual_level():
        y = ours(fwAD.make_dual(x, v))
        y_ref = F.silu(theirs(fwAD.make_dual(x, v)))
        primal, tangent = fwAD.unpack_dual(y)
        primal_ref, tangent_ref = fwAD.unpack_dual(y_ref)
    torch.testing.assert_close(primal, primal_ref)
    torch.testing.assert_close(tangent, tangent_ref)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item()
