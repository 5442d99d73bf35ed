"""SyncBatchNorm in one process: the local fallback, the shared module behaviour, conversions."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from torch import nn

import batchnorm
from batchnorm import functional as F
from tests.distributed._sync_workers import free_port


def _pair(c: int, **kwargs) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(1)
    ref = batchnorm.BatchNorm2d(c, **kwargs)
    sync = batchnorm.SyncBatchNorm(c, **kwargs)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    sync.load_state_dict(ref.state_dict())
    return ref, sync


def _same_step(ref: nn.Module, sync: nn.Module, x: torch.Tensor) -> None:
    xr = x.clone().requires_grad_()
    xs = x.clone().requires_grad_()
    w = torch.randn_like(x)
    (ref(xr) * w).sum().backward()
    (sync(xs) * w).sum().backward()
    # the fallback is the same code path: bitwise equal
    assert torch.equal(xr.grad, xs.grad)
    assert torch.equal(ref.weight.grad, sync.weight.grad)
    assert torch.equal(ref.bias.grad, sync.bias.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(ref, name), getattr(sync, name)), name


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_without_distributed_it_is_batchnorm(mode):
    assert not dist.is_initialized()
    ref, sync = _pair(4, activation="silu")
    ref.train(mode == "train")
    sync.train(mode == "train")
    x = torch.randn(6, 4, 3, 5).contiguous(memory_format=torch.channels_last)
    _same_step(ref, sync, x)


def test_world_size_one_is_local():
    """A group of one rank takes the local path (no collective) and equals BatchNorm2d."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=20))
    try:
        assert not batchnorm.distributed.is_distributed()
        ref, sync = _pair(3)
        _same_step(ref, sync, torch.randn(5, 3, 4, 4, dtype=torch.float32))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("ndim", [2, 3, 4, 5, 6])
def test_any_rank_from_two(ndim):
    m = batchnorm.SyncBatchNorm(3, dtype=torch.float64)
    x = torch.randn(4, 3, *([2] * (ndim - 2)), dtype=torch.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    want = F.batch_norm(x, rm, rv, m.weight, m.bias, training=True)
    torch.testing.assert_close(m(x), want, rtol=0, atol=0)
    torch.testing.assert_close(m.running_var, rv, rtol=0, atol=0)


def test_input_errors_name_the_problem():
    m = batchnorm.SyncBatchNorm(3)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        m(torch.randn(3))
    with pytest.raises(ValueError, match="expected 3 channels"):
        m(torch.randn(4, 5, 2))
    with pytest.raises(TypeError, match="input: expected a torch.Tensor"):
        m([1.0, 2.0])


def test_constructor_checks_repr_and_state_dict_are_shared():
    with pytest.raises(ValueError, match="num_features"):
        batchnorm.SyncBatchNorm(0)
    with pytest.raises(TypeError, match="eps"):
        batchnorm.SyncBatchNorm(3, eps="small")
    with pytest.raises(ValueError, match="activation"):
        batchnorm.SyncBatchNorm(3, activation="softplus")
    m = batchnorm.SyncBatchNorm(5, momentum=None, activation=("leaky_relu", 0.2))
    assert "SyncBatchNorm(5" in repr(m) and "activation=('leaky_relu', 0.2)" in repr(m)
    theirs = nn.SyncBatchNorm(5)
    assert list(m.state_dict()) == list(theirs.state_dict())
    m.load_state_dict(theirs.state_dict())
    assert m.skipped_updates == 0


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Sequential(batchnorm.BatchNorm1d(4, activation="relu", momentum=None, eps=1e-3)),
        nn.SyncBatchNorm(4, affine=False),
        batchnorm.BatchNorm3d(4, track_running_stats=False),
        batchnorm.SyncBatchNorm(4),
    )


def test_convert_sync_batchnorm_keeps_everything():
    model = _model().double().eval()
    before = {name: m for name, m in model.named_modules()}
    params = {name: p for name, p in model.named_parameters()}
    buffers = {name: b for name, b in model.named_buffers() if "skipped" not in name}
    kept = before["5"]
    out = batchnorm.convert_sync_batchnorm(model, process_group="group-token")
    assert out is model
    for name in ("1", "2.0", "3", "4"):
        new = out.get_submodule(name)
        assert type(new) is batchnorm.SyncBatchNorm, name
        assert not new.training and new.process_group == "group-token"
        old = before[name]
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            assert getattr(new, attr) == getattr(old, attr), (name, attr)
    assert out.get_submodule("2.0").activation == "relu"
    assert out.get_submodule("2.0").layer_name == "2.0"
    assert out.get_submodule("5") is kept and kept.process_group == "group-token"
    for name, p in out.named_parameters():
        assert p is params[name], name
    for name, b in out.named_buffers():
        if "skipped" not in name:
            assert b is buffers[name], name
    assert out.get_submodule("5").num_batches_skipped.dtype == torch.long


def test_convert_sync_batchnorm_root_and_group_of_torch_sync():
    root = batchnorm.convert_sync_batchnorm(nn.BatchNorm1d(3))
    assert type(root) is batchnorm.SyncBatchNorm and root.process_group is None
    theirs = nn.SyncBatchNorm(3, process_group="theirs")
    assert batchnorm.convert_sync_batchnorm(theirs).process_group == "theirs"


def test_convert_sync_batchnorm_refuses_unknown_subclass():
    class Custom(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.BatchNorm2d(3), Custom(3))
    with pytest.raises(ValueError, match="does not know"):
        batchnorm.convert_sync_batchnorm(model)
    assert type(model[0]) is nn.BatchNorm2d  # unchanged, not half converted
    with pytest.raises(TypeError, match="model"):
        batchnorm.convert_sync_batchnorm("resnet")


def test_convert_model_to_torch_and_back():
    ours = batchnorm.SyncBatchNorm(3, process_group="g", momentum=0.3)
    weight = ours.weight
    model = batchnorm.convert_model(nn.Sequential(ours), "torch")
    assert type(model[0]) is nn.SyncBatchNorm
    assert model[0].weight is weight and model[0].process_group == "g"
    assert model[0].momentum == 0.3
    back = batchnorm.convert_model(model, "batchnorm")
    assert type(back[0]) is batchnorm.SyncBatchNorm
    assert back[0].weight is weight and back[0].process_group == "g"
    with pytest.raises(ValueError, match="fused activation"):
        batchnorm.convert_model(nn.Sequential(batchnorm.SyncBatchNorm(3, activation="gelu")),
                                "torch")
