"""Export: torch.export and ONNX (run with onnxruntime) reproduce eval-mode outputs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = batchnorm.BatchNorm2d(c, activation="gelu", affine=False)

    def forward(self, x):
        return self.bn(self.conv(x), x)  # fused residual


def conv_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4, activation="relu"), Block(4),
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), batchnorm.BatchNorm2d(4, activation="silu"),
        batchnorm.BatchNorm2d(4, activation=("leaky_relu", 0.2), bias=False),
    )


def every_activation() -> nn.Module:
    """One layer per activation of the table, each translated to ONNX."""
    return nn.Sequential(*(batchnorm.BatchNorm2d(3, activation=spec) for spec in (
        "relu6", "hardswish", "hardsigmoid", "sigmoid", "tanh", ("elu", 0.7), "mish",
        "gelu_tanh", "gelu", "silu")))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), batchnorm.BatchNorm1d(6, activation="leaky_relu"),
                         nn.Unflatten(1, (2, 3)), batchnorm.BatchNorm1d(2))


def trained(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """A few training steps give every layer non-trivial running statistics."""
    model.train()
    with torch.no_grad():
        for i in range(3):
            model(x * (1 + i) + i)
        for m in model.modules():
            if getattr(m, "weight", None) is not None and isinstance(
                    m, nn.modules.batchnorm._BatchNorm):
                m.weight.normal_()
    return model.eval()


@pytest.mark.parametrize("make, shape", [(conv_model, (2, 3, 8, 8)), (mlp, (4, 5)),
                                         (every_activation, (2, 3, 4, 4))])
def test_torch_export_and_onnx_round_trip(make, shape, tmp_path):
    x = torch.randn(*shape)
    model = trained(make(), x)
    with torch.no_grad():
        expected = model(x)
    program = batchnorm.export_program(model, (x,))
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-6, atol=1e-6)
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batchnorm.export_onnx(model, x, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)
    x2 = torch.randn(*shape) * 3  # the graph holds the running statistics, not batch ones
    (got2,) = session.run(None, {session.get_inputs()[0].name: x2.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got2, model(x2).numpy(), rtol=1e-5, atol=1e-5)


def test_folded_model_exports():
    x = torch.randn(2, 3, 8, 8)
    folded = batchnorm.fold(trained(conv_model(), x))
    program = batchnorm.export_program(folded, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), folded(x), rtol=1e-6, atol=1e-6)


def test_training_mode_refused():
    model = conv_model().train()
    with pytest.raises(ValueError, match="training mode"):
        batchnorm.export_onnx(model, torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="eval"):
        batchnorm.export_program(model, torch.randn(2, 3, 8, 8))
