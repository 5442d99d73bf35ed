"""recalibrate: precise = pooled population statistics (merge of partials), ema, AdaBN."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import NonFiniteBatchWarning

F64 = dict(rtol=1e-10, atol=1e-10)


def shifted_batches(k=12, n=16, c=3, dtype=torch.float64):
    """Batches from N(μ, σ²) with a different offset per batch: the population variance then
    exceeds the average of the batch variances (the spread of the batch means counts)."""
    mu = torch.tensor([2.0, -1.0, 50.0], dtype=dtype)[:c]
    sigma = torch.tensor([0.5, 3.0, 1.0], dtype=dtype)[:c]
    return [(torch.randn(n, c, 4, dtype=dtype) * sigma.view(1, -1, 1) + mu.view(1, -1, 1)
             + 0.7 * i) for i in range(k)]


@pytest.mark.parametrize("cls", [batchnorm.BatchNorm1d, nn.BatchNorm1d])
def test_precise_is_the_population_statistics(cls):
    bn = cls(3, dtype=torch.float64).eval()
    data = shifted_batches()
    batchnorm.recalibrate(bn, data, progress=False)
    allx = torch.cat(data).transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(bn.running_mean, allx.mean(1), **F64)
    torch.testing.assert_close(bn.running_var, allx.var(1, unbiased=True), **F64)
    avg_of_batch_vars = torch.stack([d.transpose(0, 1).reshape(3, -1).var(1) for d in data]).mean(0)
    assert (bn.running_var - avg_of_batch_vars).abs().min() > 1.0  # not what precise BN is
    assert not bn.training


def test_known_distribution_recovered():
    bn = batchnorm.BatchNorm2d(2)
    mu, sigma = torch.tensor([3.0, -2.0]), torch.tensor([0.5, 4.0])
    data = [torch.randn(64, 2, 8, 8) * sigma.view(1, -1, 1, 1) + mu.view(1, -1, 1, 1)
            for _ in range(40)]
    batchnorm.recalibrate(bn, data, progress=False)
    n = 40 * 64 * 8 * 8  # five standard errors of the estimators
    assert ((bn.running_mean - mu).abs() < 5 * sigma / n**0.5).all()
    assert ((bn.running_var / sigma**2 - 1).abs() < 5 * (2 / n) ** 0.5).all()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn1 = batchnorm.BatchNorm2d(4, activation="relu")
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(4, 5, 1)
        self.bn2 = nn.BatchNorm2d(5, momentum=None)
        self.fc = nn.Linear(5, 2)
        self.bn3 = batchnorm.BatchNorm1d(2)

    def forward(self, x):
        h = self.bn2(self.conv2(self.drop(self.bn1(self.conv1(x)))))
        return self.bn3(self.fc(h.mean((2, 3))))


def reference_inputs(model, data):
    """Inputs of every BN layer, gathered with BN in training mode and the rest in eval."""
    m = copy.deepcopy(model).eval()
    seen: dict[str, list[torch.Tensor]] = {}
    for name, mod in m.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.train()
            mod.register_forward_pre_hook(
                lambda _m, a, name=name: seen.setdefault(name, []).append(a[0].detach()))
    with torch.no_grad():
        for x in data:
            m(x)
    return seen


@pytest.mark.parametrize("start_training", [True, False])
def test_network_precise_params_untouched_modes_restored(start_training):
    model = Net().double().train(start_training)
    model.drop.train(not start_training)  # an unusual mix of modes must come back as it was
    modes = {n: m.training for n, m in model.named_modules()}
    params = {n: p.clone() for n, p in model.named_parameters()}
    tracked = {n: int(m.num_batches_tracked) for n, m in model.named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    data = [(torch.randn(8, 3, 6, 6, dtype=torch.float64) + i, torch.zeros(8)) for i in range(6)]
    expected = reference_inputs(model, [d[0] for d in data])
    batchnorm.recalibrate(model, data, num_batches=5, progress=False)
    for name, xs in expected.items():
        layer = model.get_submodule(name)
        x = torch.cat(xs[:5]).transpose(0, 1).reshape(layer.num_features, -1)
        torch.testing.assert_close(layer.running_mean, x.mean(1), **F64)
        torch.testing.assert_close(layer.running_var, x.var(1), **F64)
        assert int(layer.num_batches_tracked) == tracked[name]
    assert {n: m.training for n, m in model.named_modules()} == modes
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n])


def test_ema_matches_manual_moving_average():
    bn = batchnorm.BatchNorm1d(3, dtype=torch.float64, momentum=0.3)
    data = shifted_batches(k=5)
    batchnorm.recalibrate(bn, data, method="ema", progress=False)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for d in data:
        x = d.transpose(0, 1).reshape(3, -1)
        rm = 0.7 * rm + 0.3 * x.mean(1)
        rv = 0.7 * rv + 0.3 * x.var(1)
    torch.testing.assert_close(bn.running_mean, rm, **F64)
    torch.testing.assert_close(bn.running_var, rv, **F64)
    assert bn.momentum == 0.3
    batchnorm.recalibrate(bn, data, method="ema", momentum=1.0, progress=False)
    last = data[-1].transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(bn.running_var, last.var(1), **F64)
    assert bn.momentum == 0.3


def test_adabn_adapts_to_a_shifted_domain():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), batchnorm.BatchNorm2d(3)).eval()
    source = [torch.randn(32, 2, 5, 5) for _ in range(10)]
    batchnorm.recalibrate(model, source, progress=False)
    target = [torch.randn(32, 2, 5, 5) * 3 + 5 for _ in range(10)]
    y = torch.cat([model(t) for t in target]).detach()
    assert y.mean((0, 2, 3)).abs().max() > 1  # source statistics do not fit the target
    batchnorm.recalibrate(model, target, progress=False)
    y = torch.cat([model(t) for t in target]).detach()
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.var((0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)


def test_non_finite_batch_is_skipped_and_failure_restores():
    bn = batchnorm.BatchNorm1d(3, dtype=torch.float64)
    data = shifted_batches(k=4)
    bad = data[:2] + [torch.full_like(data[0], float("nan"))] + data[2:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteBatchWarning)
        with pytest.warns(NonFiniteBatchWarning, match="skipped 1"):
            batchnorm.recalibrate(bn, bad, progress=False)
    allx = torch.cat(data).transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(bn.running_mean, allx.mean(1), **F64)

    model = nn.Sequential(batchnorm.BatchNorm1d(3))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def exploding():
        yield torch.randn(4, 3)
        raise RuntimeError("loader failed")

    with pytest.raises(RuntimeError, match="loader failed"):
        batchnorm.recalibrate(model, exploding(), progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training


def test_batch_forms_and_progress(capsys):
    bn = batchnorm.BatchNorm1d(3)
    x = torch.randn(10, 3)
    batchnorm.recalibrate(bn, [{"input": x}], progress=False)
    torch.testing.assert_close(bn.running_mean, x.mean(0))
    assert capsys.readouterr().err == ""
    batchnorm.recalibrate(bn, [x * 2], progress=True)
    assert "recalibrate" in capsys.readouterr().err
    batchnorm.recalibrate(bn, [("ignored", x)], forward_fn=lambda m, b: m(b[1]), progress=False)
    torch.testing.assert_close(bn.running_mean, x.mean(0))


def test_bad_arguments():
    bn = batchnorm.BatchNorm1d(3)
    data = [torch.randn(4, 3)]
    with pytest.raises(ValueError, match="method"):
        batchnorm.recalibrate(bn, data, method="mean")
    with pytest.raises(ValueError, match="num_batches"):
        batchnorm.recalibrate(bn, data, num_batches=0)
    with pytest.raises(ValueError, match="momentum"):
        batchnorm.recalibrate(bn, data, momentum=0.5)
    with pytest.raises(ValueError, match="no batch"):
        batchnorm.recalibrate(bn, [], progress=False)
    with pytest.raises(ValueError, match="no batch-norm"):
        batchnorm.recalibrate(nn.Linear(2, 2), data)
    with pytest.raises(TypeError, match="data"):
        batchnorm.recalibrate(bn, 3)
    with pytest.raises(TypeError, match="model"):
        batchnorm.recalibrate("net", data)
