"""convert_model extensions: SyncBatchNorm, timm-style BatchNormAct subclasses, our variants."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.tools import convert as C


class BatchNormAct2d(nn.BatchNorm2d):
    """Stand-in for timm's ``BatchNormAct2d``: batch norm, then ``drop``, then ``act``."""

    def __init__(self, c: int, act: nn.Module | None = None, drop: nn.Module | None = None,
                 **kwargs) -> None:
        super().__init__(c, **kwargs)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.ReLU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class ScaledBatchNormAct2d(BatchNormAct2d):
    """Same attributes, different forward: converting it would change the model."""

    def forward(self, x):
        return 2 * super().forward(x)


def _trained(model: nn.Module, x: torch.Tensor) -> nn.Module:
    with torch.no_grad():
        model.train()(x)
    return model


@pytest.mark.parametrize("act", [nn.ReLU(), nn.LeakyReLU(0.3), nn.SiLU(), nn.GELU(),
                                 nn.Identity()])
def test_batchnorm_act_converted_with_fused_activation(act):
    x = torch.randn(4, 3, 5, 5)
    model = _trained(nn.Sequential(nn.Conv2d(3, 3, 1), BatchNormAct2d(3, act=act)), x)
    params = [id(p) for p in model.parameters()]
    model.eval()
    expected = model(x)
    out = batchnorm.convert_model(model)
    assert type(out[1]) is batchnorm.BatchNorm2d
    assert C.parse_activation(out[1].activation) == C.parse_activation(act)
    assert [id(p) for p in out.parameters()] == params
    torch.testing.assert_close(out(x), expected)
    # and the training step does the same thing too (output and running statistics)
    ref = _trained(nn.Sequential(nn.Conv2d(3, 3, 1), BatchNormAct2d(3, act=act)), x)
    ref.load_state_dict(out.state_dict())
    torch.testing.assert_close(out.train()(x), ref.train()(x))
    torch.testing.assert_close(out[1].running_var, ref[1].running_var)


@pytest.mark.parametrize("layer, kept, why", [
    (BatchNormAct2d(3, act=nn.Softplus()), ["act"], "not an activation we fuse"),
    (BatchNormAct2d(3, act=nn.PReLU()), ["act"], "not an activation we fuse"),
    (BatchNormAct2d(3, drop=nn.Dropout(0.2)), ["drop", "act"], "runs between"),
    (BatchNormAct2d(3, act=nn.Hardswish(), drop=nn.Dropout(0.2)), ["drop", "act"],
     "runs between"),
])
def test_batchnorm_act_keeps_what_it_cannot_fuse(layer, kept, why):
    """Never refused over an activation or a dropout: they stay after our norm, unfused, under
    the same names (same state_dict keys), the report names them, and the outputs (training
    with the same dropout masks, and eval) and gradients stay the original's; converting back
    gives the original class."""
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)  # float64: gradients compared tightly
    model = nn.Sequential(nn.Conv2d(3, 3, 1), layer).double()
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    out, report = batchnorm.convert_model(model, return_report=True)
    assert type(out[1]) is batchnorm.BatchNorm2d and out[1].activation is None
    assert list(out[1].unfused_modules()) == kept
    assert list(out.state_dict()) == keys
    assert [(p, list(k), w) for p, k, w in report.kept_unfused] == [("1", kept, mock.ANY)]
    assert why in report.kept_unfused[0][2] and "kept unfused" in str(report)
    for training in (True, False):
        ref.train(training)
        out.train(training)
        torch.manual_seed(3)
        want = ref(x)
        torch.manual_seed(3)
        got = out(x)
        torch.testing.assert_close(got, want)
        got.square().sum().backward()
        want.square().sum().backward()
        for a, b in zip(out.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(out[1].running_mean, ref[1].running_mean)
    back = batchnorm.convert_model(out, "torch")
    assert type(back[1]) is type(layer) and list(back.state_dict()) == keys
    assert [type(m) for m in back[1].children()] == [type(m) for m in layer.children()]
    torch.testing.assert_close(back(x), ref(x))


@pytest.mark.parametrize("layer, message", [
    (ScaledBatchNormAct2d(3), "does not reproduce"),
    (ScaledBatchNormAct2d(3, act=nn.PReLU()), "does not reproduce"),
])
def test_batchnorm_act_refused_and_model_unchanged(layer, message):
    model = nn.Sequential(nn.BatchNorm2d(3), layer)
    with pytest.raises(ValueError, match=message):
        batchnorm.convert_model(model)
    assert type(model[0]) is nn.BatchNorm2d and model[1] is layer


def test_round_trip_restores_classes_keys_and_outputs():
    x = torch.randn(4, 3, 5, 5)
    model = nn.Sequential(nn.BatchNorm2d(3), BatchNormAct2d(3, act=nn.GELU(approximate="tanh")),
                          BatchNormAct2d(3, act=nn.Identity()), nn.SyncBatchNorm(3))
    _trained(model, x)
    model.eval()
    expected, keys = model(x), list(model.state_dict())
    types = [type(m) for m in model.modules()]
    ours = batchnorm.convert_model(model, sync_to=batchnorm.BatchNorm2d)
    assert [type(m) for m in ours] == [batchnorm.BatchNorm2d] * 4
    assert ours[1].activation == "gelu_tanh"
    back = batchnorm.convert_model(ours, "torch")
    assert [type(m) for m in back.modules()] == types
    assert list(back.state_dict()) == keys
    torch.testing.assert_close(back(x), expected)
    # a change made on our layer in between is carried back
    again = batchnorm.convert_model(batchnorm.convert_model(back), "torch")
    assert [type(m) for m in again.modules()] == types
    # a layer that did not come from a conversion: PyTorch's class, or a Sequential
    plain = batchnorm.convert_model(batchnorm.BatchNorm2d(3, activation="mish"), "torch",
                                    unfuse_activations=True)
    assert type(plain) is nn.Sequential and type(plain.act) is nn.Mish


def test_round_trip_after_changing_our_layer_uses_the_generic_path():
    ours = batchnorm.convert_model(nn.Sequential(BatchNormAct2d(3)))
    ours[0].activation = "tanh"  # no longer what the original computed
    with pytest.raises(ValueError, match="fused activation"):
        batchnorm.convert_model(ours, "torch")
    back = batchnorm.convert_model(ours, "torch", unfuse_activations=True)
    assert type(back[0]) is nn.Sequential and type(back[0].act) is nn.Tanh


def test_batchnorm_act_with_extra_submodule_refused():
    layer = BatchNormAct2d(3)
    layer.attn = nn.Conv2d(3, 3, 1)
    with pytest.raises(ValueError, match="attn"):
        batchnorm.convert_model(layer)


def test_sync_batchnorm_to_explicit_class_or_ours():
    x = torch.randn(4, 3, 5, 5)
    sync = _trained(nn.SyncBatchNorm(3, momentum=0.2), x).eval()
    expected = sync(x)
    plain = batchnorm.convert_model(nn.Sequential(sync), sync_to=batchnorm.BatchNorm2d)
    assert type(plain[0]) is batchnorm.BatchNorm2d and plain[0].momentum == 0.2
    assert plain[0].running_mean is sync.running_mean
    torch.testing.assert_close(plain(x), expected)
    ours = batchnorm.convert_model(nn.SyncBatchNorm(3))
    assert isinstance(ours, batchnorm.SyncBatchNorm)


def test_sync_batchnorm_refused_without_registered_conversion(monkeypatch):
    monkeypatch.setattr(C, "_OPTIONAL_MODULES", ())
    monkeypatch.setitem(C._CONVERTERS, "batchnorm", {})
    model = nn.Sequential(nn.BatchNorm2d(3), nn.SyncBatchNorm(3))
    with pytest.raises(ValueError, match="sync_to"):
        batchnorm.convert_model(model)
    assert type(model[0]) is nn.BatchNorm2d


def test_our_variants():
    ghost = batchnorm.GhostBatchNorm2d(4, virtual_batch_size=2)
    model = nn.Sequential(nn.BatchNorm2d(4), ghost)
    out = batchnorm.convert_model(model)  # already ours: left as it is
    assert out[1] is ghost and type(out[0]) is batchnorm.BatchNorm2d
    with pytest.raises(ValueError, match="no PyTorch counterpart"):
        batchnorm.convert_model(out, "torch")
    assert type(out[0]) is batchnorm.BatchNorm2d


def test_bad_sync_to():
    with pytest.raises(TypeError, match="sync_to"):
        batchnorm.convert_model(nn.Identity(), sync_to=nn.BatchNorm2d)
    with pytest.raises(ValueError, match="sync_to"):
        batchnorm.convert_model(nn.Identity(), "torch", sync_to=batchnorm.BatchNorm2d)


def test_kept_modules_travel_with_sync_fold_and_are_refused_by_freeze():
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), BatchNormAct2d(3, act=nn.PReLU())).double()
    ours = batchnorm.convert_model(model)
    _trained(ours, x)
    ours.eval()
    expected = ours(x)
    sync = batchnorm.convert_sync_batchnorm(copy.deepcopy(ours))
    assert type(sync[1]) is batchnorm.SyncBatchNorm and list(sync[1].unfused_modules()) == ["act"]
    torch.testing.assert_close(sync.eval()(x), expected)
    folded = batchnorm.fold(copy.deepcopy(ours), x)
    torch.testing.assert_close(folded(x), expected)
    with pytest.raises(ValueError, match="applies modules after the norm"):
        batchnorm.freeze(ours)
    assert type(ours[1]) is batchnorm.BatchNorm2d
    with pytest.raises(TypeError, match="modules"):
        ours[1].keep_after({"act": "relu"})
