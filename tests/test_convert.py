"""convert_model: torch <-> ours, state kept and shared, refusal leaves the model unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm


def _model():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Identity(),
        nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2, momentum=None, affine=False),
        nn.Flatten(), nn.Linear(2 * 4 * 4, 3), nn.BatchNorm1d(3),
    )


def test_round_trip_keeps_state_mode_and_outputs():
    model = _model()
    x = torch.randn(5, 3, 6, 6)
    model(x)
    model.eval()
    expected = model(x)
    params_before = [id(p) for p in model.parameters()]
    ours = batchnorm.convert_model(model)
    assert isinstance(ours[1], batchnorm.BatchNorm2d) and isinstance(ours[8], batchnorm.BatchNorm1d)
    assert not ours.training and not ours[1].training
    assert [id(p) for p in ours.parameters()] == params_before  # shared: optimizers stay valid
    torch.testing.assert_close(ours(x), expected)
    assert ours[5].momentum is None and not ours[5].affine
    back = batchnorm.convert_model(ours, "torch")
    assert type(back[1]) is nn.BatchNorm2d
    torch.testing.assert_close(back(x), expected)


def test_root_layer_and_dtype_device():
    bn = nn.BatchNorm1d(3, dtype=torch.float64)
    bn.train(False)
    ours = batchnorm.convert_model(bn)
    assert isinstance(ours, batchnorm.BatchNorm1d) and ours.running_mean.dtype == torch.float64
    assert not ours.training and ours.num_batches_skipped.device == bn.running_mean.device


def test_fused_activation_to_torch_refused_or_unfused():
    model = nn.Sequential(batchnorm.BatchNorm1d(3, activation="relu"))
    with pytest.raises(ValueError, match="fused activation"):
        batchnorm.convert_model(model, "torch")
    assert isinstance(model[0], batchnorm.BatchNorm1d)
    x = torch.randn(4, 3)
    expected = model(x)
    unfused = batchnorm.convert_model(model, "torch", unfuse_activations=True)
    assert isinstance(unfused[0], nn.Sequential)
    torch.testing.assert_close(unfused(x), expected)


def test_unknown_subclass_refused_and_nothing_converted():
    class Custom(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.BatchNorm2d(2), Custom(2))
    with pytest.raises(ValueError, match="Custom"):
        batchnorm.convert_model(model)
    assert type(model[0]) is nn.BatchNorm2d  # not half-converted


def test_bad_arguments():
    with pytest.raises(ValueError, match="target"):
        batchnorm.convert_model(nn.Identity(), "jax")
    with pytest.raises(TypeError, match="model"):
        batchnorm.convert_model("resnet")
