"""fold: exact against the unfolded model (float64 1e-10, float32 1e-5), report, fallbacks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

import batchnorm
from batchnorm.tools.fold import FoldedEpilogue

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def randomize(model: nn.Module) -> nn.Module:
    """Non-trivial statistics and affine parameters everywhere (fresh ones fold to identity)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.normal_(0, 2)
                    m.running_var.uniform_(0.2, 3)
                if m.weight is not None:
                    m.weight.normal_()
                if m.bias is not None:
                    m.bias.normal_()
    return model


class Block(nn.Module):
    """Residual block: the second BN adds the residual and applies ReLU in its fused epilogue."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = batchnorm.BatchNorm2d(c, activation="relu")
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=2, bias=False)
        self.bn2 = batchnorm.BatchNorm2d(c, activation="relu")

    def forward(self, x):
        return self.bn2(self.conv2(self.bn1(self.conv1(x))), x)


def mixed_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),                  # PyTorch's BN
        Block(4),                                                          # ours, residual
        nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2),
        batchnorm.BatchNorm2d(6, activation="silu"),
        nn.Conv2d(6, 6, 3, groups=3, bias=False), batchnorm.BatchNorm2d(6, affine=False),
        nn.Flatten(), nn.Linear(6 * 15 * 15, 5), batchnorm.BatchNorm1d(5, bias=False),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mixed_model_exact_and_report(dtype):
    model = randomize(mixed_model().to(dtype)).eval()
    x = torch.randn(3, 3, 10, 10, dtype=dtype)
    folded, report = batchnorm.fold(model, x, return_report=True)
    assert isinstance(folded, fx.GraphModule) and report.method == "fx"
    assert [bn for _, bn in report.folded] == ["1", "3.bn1", "3.bn2", "5", "7", "10"]
    assert report.not_folded == []
    assert not any(batchnorm.tools.is_batch_norm(m) for m in folded.modules())
    # activations stay as activations, the residual add as an epilogue
    assert isinstance(folded.get_submodule("3.bn1"), nn.ReLU)
    assert isinstance(folded.get_submodule("3.bn2"), FoldedEpilogue)
    assert isinstance(folded.get_submodule("5"), nn.SiLU)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL[dtype])
        x2 = torch.randn(2, 3, 10, 10, dtype=dtype)
        torch.testing.assert_close(folded(x2), model(x2), **TOL[dtype])
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    assert folded.fold_report is report
    assert "folded '1' into '0'" in str(report)


@pytest.mark.parametrize("conv", [
    nn.Conv1d(4, 6, 3, groups=2), nn.Conv3d(4, 6, 3, bias=False),
    nn.ConvTranspose1d(4, 6, 3, groups=2, bias=False), nn.ConvTranspose3d(4, 6, 2, stride=2),
    nn.ConvTranspose2d(6, 6, 3, groups=3, dilation=2),
])
def test_every_conv_layout(conv):
    rank = {nn.Conv1d: 1, nn.ConvTranspose1d: 1, nn.Conv3d: 3, nn.ConvTranspose3d: 3}.get(
        type(conv), 2)
    bn = {1: nn.BatchNorm1d, 2: batchnorm.BatchNorm2d, 3: batchnorm.BatchNorm3d}[rank](6)
    model = randomize(nn.Sequential(conv, bn)).double().eval()
    x = torch.randn(2, conv.in_channels, *([5] * rank), dtype=torch.float64)
    folded, report = batchnorm.fold(model, return_report=True)
    assert len(report.folded) == 1
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL[torch.float64])


def test_linear_mlp_needs_example_input_and_checks_rank():
    mlp = randomize(nn.Sequential(nn.Linear(8, 16), batchnorm.BatchNorm1d(16, activation="relu"),
                                  nn.Linear(16, 4), nn.BatchNorm1d(4))).double().eval()
    x = torch.randn(5, 8, dtype=torch.float64)
    _, report = batchnorm.fold(mlp, return_report=True)
    assert report.folded == [] and "example_input" in report.not_folded[0][1]
    folded, report = batchnorm.fold(mlp, x, return_report=True)
    assert report.folded == [("0", "1"), ("2", "3")]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), mlp(x), **TOL[torch.float64])
    # (N, L, F) output: BatchNorm1d(L) normalizes dimension 1, not the features
    seq = randomize(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))).double().eval()
    _, report = batchnorm.fold(seq, torch.randn(2, 4, 4, dtype=torch.float64), return_report=True)
    assert report.folded == [] and "3-D output" in report.not_folded[0][1]


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.bn = nn.BatchNorm2d(2)
        self.conv_b = nn.Conv2d(2, 2, 1)
        self.bn_b = batchnorm.BatchNorm2d(2)
        self.bn_c = nn.BatchNorm2d(2, track_running_stats=False)
        self.conv_c = nn.Conv2d(2, 2, 1)
        self.conv_d = nn.Conv2d(2, 2, 1)
        self.bn_d = batchnorm.BatchNorm2d(2)

    def forward(self, x):
        h = self.conv(x)
        a = self.bn(h) + h                      # conv output also used by the add
        b = self.bn_b(self.conv_b(x) + a)       # residual added before the BN
        c = self.bn_c(self.conv_c(b))           # batch statistics in eval
        return self.bn_d(self.conv_d(c), b)     # fused residual: folds, residual stays


def test_reasons_for_not_folding():
    model = randomize(Shared()).double().eval()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    folded, report = batchnorm.fold(model, x, return_report=True)
    reasons = dict(report.not_folded)
    assert "also used by" in reasons["bn"]
    assert "not the output of a Conv" in reasons["bn_b"] and "add" in reasons["bn_b"]
    assert "running statistics" in reasons["bn_c"]
    assert report.folded == [("conv_d", "bn_d")]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL[torch.float64])


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4, activation="relu"),
                                  nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.bn(self.conv(self.body(x)))


def test_sequential_fallback_when_fx_fails():
    model = randomize(Untraceable()).eval()
    x = torch.randn(2, 3, 6, 6)
    folded, report = batchnorm.fold(model, x, return_report=True)
    assert report.method == "sequential" and report.trace_error
    assert [bn for _, bn in report.folded] == ["body.1", "body.3"]
    assert [bn for bn, _ in report.not_folded] == ["bn"]
    assert isinstance(folded.body[1], FoldedEpilogue)  # ours may be called with a residual
    assert isinstance(folded.body[3], nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL[torch.float32])
        torch.testing.assert_close(folded(-x), model(-x), **TOL[torch.float32])


def test_original_untouched_training_model_gives_inference_copy():
    model = randomize(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = batchnorm.fold(model)
    assert model.training and not folded.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), **TOL[torch.float64])


class FrozenBatchNorm2d(nn.Module):
    """Stand-in with torchvision's frozen layout: statistics and affine as buffers."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.eps = 1e-5
        for name, value in (("weight", torch.randn(c)), ("bias", torch.randn(c)),
                            ("running_mean", torch.randn(c)),
                            ("running_var", torch.rand(c) + 0.5)):
            self.register_buffer(name, value)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def test_frozen_layout_folds():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), FrozenBatchNorm2d(3)).double().eval()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    folded, report = batchnorm.fold(model, return_report=True)
    assert report.folded == [("0", "1")]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL[torch.float64])


def test_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        batchnorm.fold("resnet")


def test_our_frozen_layers_fold_with_activation_and_residual():
    from batchnorm.nn.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = FrozenBatchNorm2d(3, activation="gelu", dtype=torch.float64)
            self.fc = nn.Linear(3, 4)
            self.bn1 = FrozenBatchNorm1d(4, affine=False, dtype=torch.float64)

        def forward(self, x):
            return self.bn1(self.fc(self.bn(self.conv(x), x).mean((2, 3))))

    model = Net().double()
    for m in (model.bn, model.bn1):
        m.running_mean.normal_()
        m.running_var.uniform_(0.5, 2)
    model.bn.weight.normal_()
    model.bn.bias.normal_()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    folded, report = batchnorm.fold(model, x, return_report=True)
    assert report.folded == [("conv", "bn"), ("fc", "bn1")]
    assert isinstance(folded.bn, FoldedEpilogue) and isinstance(folded.bn.act, nn.GELU)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL[torch.float64])


@settings(max_examples=25, deadline=None)
@given(transposed=st.booleans(), rank=st.integers(1, 3), groups=st.integers(1, 3),
       cin=st.integers(1, 3), cout=st.integers(1, 3), k=st.integers(1, 3),
       stride=st.integers(1, 2), bias=st.booleans(), affine=st.booleans())
def test_conv_fold_hypothesis(transposed, rank, groups, cin, cout, k, stride, bias, affine):
    conv_cls = [[nn.Conv1d, nn.Conv2d, nn.Conv3d],
                [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d]][transposed][rank - 1]
    bn_cls = [batchnorm.BatchNorm1d, batchnorm.BatchNorm2d, batchnorm.BatchNorm3d][rank - 1]
    conv = conv_cls(cin * groups, cout * groups, k, stride=stride, groups=groups, bias=bias)
    model = randomize(nn.Sequential(conv, bn_cls(cout * groups, affine=affine))).double().eval()
    x = torch.randn(2, cin * groups, *([4] * rank), dtype=torch.float64)
    folded = batchnorm.fold(model)
    assert folded.fold_report.folded == [("0", "1")]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL[torch.float64])
