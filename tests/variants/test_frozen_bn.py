"""FrozenBatchNorm1d/2d/3d equal eval-mode BN; freeze/unfreeze keep (share) the state."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import batchnorm
from tests.conftest import device_for

SHAPES = {1: (4, 3, 5), 2: (4, 3, 2, 2), 3: (4, 3, 2, 2, 2)}
TORCH = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
FROZEN = {1: batchnorm.FrozenBatchNorm1d, 2: batchnorm.FrozenBatchNorm2d,
          3: batchnorm.FrozenBatchNorm3d}


def _trained(cls, c=3, **kw):
    m = cls(c, **kw)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        if m.bias is not None:
            m.bias.uniform_(-0.5, 0.5)
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
        m.num_batches_tracked.fill_(7)
    return m


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_equals_eval_batchnorm(rank, backend):
    dev = device_for(backend)
    bn = _trained(TORCH[rank]).to(dev).eval()
    frozen = FROZEN[rank](3).to(dev)
    frozen.load_state_dict(bn.state_dict())  # same keys, strict
    frozen.train()  # frozen whatever the mode
    x = torch.randn(SHAPES[rank], device=dev, requires_grad=True)
    y = frozen(x)
    torch.testing.assert_close(y, bn(x), rtol=1e-5, atol=2e-5)
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, gy)
    (want,) = torch.autograd.grad(bn(x), x, gy)
    torch.testing.assert_close(gx, want, rtol=1e-5, atol=2e-5)
    assert list(frozen.parameters()) == []
    assert torch.equal(frozen.running_mean, bn.running_mean)
    assert int(frozen.num_batches_tracked) == 7


def test_float64_definition_and_gradcheck():
    f = batchnorm.FrozenBatchNorm2d(3, activation="relu").double()
    with torch.no_grad():
        f.weight.uniform_(0.5, 1.5)
        f.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    shape = (1, 3, 1, 1)
    want = F.relu((x - f.running_mean.view(shape)) / torch.sqrt(f.running_var.view(shape) + 1e-5)
                  * f.weight.view(shape) + f.bias.view(shape))
    torch.testing.assert_close(f(x), want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: batchnorm.FrozenBatchNorm1d(3).double()(x),
                                    (torch.randn(4, 3, dtype=torch.float64, requires_grad=True),))


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        _trained(torch.nn.BatchNorm2d, 4),
        torch.nn.Sequential(_trained(batchnorm.BatchNorm2d, 4, activation="relu")),
        _trained(batchnorm.BatchRenorm2d, 4, rmax=2.0, dmax=1.0, warmup_steps=10),
        _trained(batchnorm.GhostBatchNorm2d, 4, virtual_batch_size=2),
        torch.nn.Flatten(),
        _trained(batchnorm.BatchNorm1d, 16, bias=False),
    )


def test_freeze_keeps_state_and_eval_outputs():
    model = _model().eval()
    x = torch.randn(2, 3, 4, 4)
    want = model(x)
    bn_tensors = {n: t for n, t in model.state_dict().items()}
    frozen = batchnorm.freeze(model.train())
    kinds = [type(m) for m in frozen.modules() if "Frozen" in type(m).__name__]
    assert kinds == [batchnorm.FrozenBatchNorm2d] * 4 + [batchnorm.FrozenBatchNorm1d]
    for name, t in frozen.state_dict().items():
        assert t.data_ptr() == bn_tensors[name].data_ptr(), name  # shared, not copied
    assert set(frozen.state_dict()) == set(bn_tensors)
    torch.testing.assert_close(frozen(x), want)  # in train mode: still the eval output
    assert frozen[2][0].activation == "relu" and frozen[6].bias is None
    assert all(not p.requires_grad or p.dim() == 4 or p.dim() == 1 and p.numel() == 4
               for p in frozen.parameters())
    assert len(list(frozen.parameters())) == 2  # only the conv's


def test_unfreeze_restores_classes_and_configuration():
    model = _model()
    originals = [type(m) for m in model.modules()]
    back = batchnorm.unfreeze(batchnorm.freeze(model))
    assert [type(m) for m in back.modules()] == originals
    renorm, ghost = back[3], back[4]
    assert (renorm.rmax, renorm.dmax, renorm.warmup_steps) == (2.0, 1.0, 10)
    assert ghost.virtual_batch_size == 2 and back[2][0].activation == "relu"
    assert back[6].bias is None and back[6].weight.requires_grad
    x = torch.randn(4, 3, 4, 4)
    back(x).sum().backward()  # trainable again; running statistics move
    assert back[1].weight.grad is not None and int(back[1].num_batches_tracked) == 8
    # A frozen layer built directly becomes our BatchNorm of its rank.
    plain = batchnorm.unfreeze(batchnorm.FrozenBatchNorm3d(3))
    assert type(plain) is batchnorm.BatchNorm3d


def test_freeze_refuses_what_it_would_break():
    for layer in (torch.nn.SyncBatchNorm(3), batchnorm.MaskedBatchNorm1d(3),
                  torch.nn.BatchNorm2d(3, track_running_stats=False)):
        model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), layer)
        with pytest.raises(ValueError, match="'1'"):
            batchnorm.freeze(model)
        assert type(model[0]) is torch.nn.BatchNorm2d  # left unchanged
    with pytest.raises(TypeError, match="model"):
        batchnorm.freeze("resnet")


def test_errors_and_repr():
    f = batchnorm.FrozenBatchNorm2d(3, activation="relu")
    with pytest.raises(ValueError, match="4D"):
        f(torch.randn(2, 3))
    with pytest.raises(ValueError, match="channels"):
        f(torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match="num_features"):
        batchnorm.FrozenBatchNorm1d(-1)
    assert "activation='relu'" in repr(f)


def test_digits_tiny_batches_keep_pretrained_statistics():
    """What it answers: fine-tuning with tiny batches makes BN normalize with 2-sample
    statistics (each feature becomes ±1) that the pretrained weights never saw. A digits MLP
    trained at batch 64, then run as fine-tuning runs it (train mode, batches of 2): BN's
    accuracy collapses, the frozen model's is its eval accuracy."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32),
                                torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, 1400, (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    def accuracy_in_pairs(m):
        with torch.no_grad():
            pred = torch.cat([m(x[i : i + 2]).argmax(1) for i in range(1400, 1796, 2)])
        return float((pred == y[1400:1796]).float().mean())

    eval_acc = accuracy_in_pairs(model.eval())
    bn_train_acc = accuracy_in_pairs(copy.deepcopy(model).train())  # (updates its own stats)
    frozen_acc = accuracy_in_pairs(batchnorm.freeze(model).train())
    assert frozen_acc == eval_acc > 0.8, (frozen_acc, eval_acc)
    assert bn_train_acc < eval_acc - 0.1, (bn_train_acc, eval_acc)
