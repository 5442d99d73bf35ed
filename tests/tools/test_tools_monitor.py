"""ActivationMonitor: records match directly computed percentiles, gaps, gradient norms."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import NonFiniteBatchWarning


def sigmoid_mlp() -> nn.Sequential:
    """Ioffe & Szegedy's Figure 1 network in miniature: Linear → Sigmoid layers."""
    return nn.Sequential(nn.Linear(6, 8), nn.Sigmoid(), nn.Linear(8, 5), nn.Sigmoid(),
                         nn.Linear(5, 2))


def test_percentiles_of_any_module_every_k_steps():
    model = sigmoid_mlp()
    captured: list[torch.Tensor] = []
    model[3].register_forward_pre_hook(lambda _m, a: captured.append(a[0].detach().clone()))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with batchnorm.ActivationMonitor(model, every=3, layers=[model[3], "1"]) as mon:
        for _ in range(8):
            opt.zero_grad()
            model(torch.randn(32, 6)).square().mean().backward()
            opt.step()
    assert mon.step == 8
    rec = mon.to_dict()["layers"]
    assert set(rec) == {"1", "3"} and rec["3"]["type"] == "Sigmoid"
    assert rec["3"]["step"] == [0, 3, 6]
    for i, step in enumerate(rec["3"]["step"]):
        want = np.percentile(captured[step].numpy(), [15, 50, 85])
        got = [rec["3"]["percentiles"][k][i] for k in ("15", "50", "85")]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # not a batch-norm layer: no statistics gap, no skip counter
    assert rec["3"]["mean_gap"] == [None] * 3 and rec["3"]["skipped_updates"] == [None] * 3
    # hooks are gone after the with-block
    model(torch.randn(4, 6))
    assert mon.to_dict()["layers"]["3"]["step"] == [0, 3, 6]


def test_one_unit_like_figure_1():
    model = sigmoid_mlp()
    x = torch.randn(64, 6)
    with batchnorm.ActivationMonitor(model, layers=["3"], unit=2, percentiles=(10, 90)) as mon:
        model(x)
    pre = model[2](model[1](model[0](x))).detach()[:, 2].numpy()
    got = [mon.to_dict()["layers"]["3"]["percentiles"][k][0] for k in ("10", "90")]
    np.testing.assert_allclose(got, np.percentile(pre, [10, 90]), rtol=1e-6)


def test_gap_gradient_norm_and_skipped_updates():
    bn = batchnorm.BatchNorm2d(3, activation="relu")
    model = nn.Sequential(nn.Conv2d(2, 3, 1), bn, nn.Flatten(), nn.Linear(3 * 4 * 4, 1))
    mon = batchnorm.ActivationMonitor(model)  # default: the batch-norm layers
    assert list(mon.layers) == ["1"]
    x = torch.randn(8, 2, 4, 4)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    h = model[0](x).detach()
    grads = []

    def keep_grad(_m, _a, out):
        if out.requires_grad:
            out.register_hook(grads.append)

    model[1].register_forward_hook(keep_grad)
    model(x).sum().backward()
    rec = mon.to_dict()["layers"]["1"]
    mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
    gap = ((mean - rm).abs() / (rv + bn.eps).sqrt()).mean()
    ratio = torch.log((var + bn.eps) / (rv + bn.eps)).abs().mean()
    assert rec["mean_gap"][0] == pytest.approx(float(gap), rel=1e-5)
    assert rec["var_log_ratio"][0] == pytest.approx(float(ratio), rel=1e-5)
    assert rec["grad_step"] == [0]
    assert rec["grad_norm"][0] == pytest.approx(float(grads[0].norm()), rel=1e-6)
    assert rec["skipped_updates"] == [0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteBatchWarning)
        with torch.no_grad():
            model(torch.full_like(x, float("nan")))
    assert mon.to_dict()["layers"]["1"]["skipped_updates"] == [0, 1]
    mon.remove()


def test_to_dict_is_json_and_plot(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), batchnorm.BatchNorm1d(4), nn.Sigmoid())
    mon = batchnorm.ActivationMonitor(model, every=2, layers=["1", "2"])
    for _ in range(6):
        model(torch.randn(16, 4)).sum().backward()
    d = json.loads(json.dumps(mon.to_dict()))
    assert d["every"] == 2 and d["steps"] == 6 and d["layers"]["1"]["step"] == [0, 2, 4]
    path = tmp_path / "monitor.png"
    fig = mon.plot(path=str(path))
    from matplotlib.figure import Figure

    assert isinstance(fig, Figure) and len(fig.axes) == 6
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="not monitored"):
        mon.plot(layers=["0"])
    mon.remove()


def test_bad_arguments():
    model = sigmoid_mlp()
    with pytest.raises(ValueError, match="every"):
        batchnorm.ActivationMonitor(model, every=0, layers=["1"])
    with pytest.raises(ValueError, match="percentiles"):
        batchnorm.ActivationMonitor(model, percentiles=(50, 150), layers=["1"])
    with pytest.raises(ValueError, match="no batch-norm"):
        batchnorm.ActivationMonitor(model)
    with pytest.raises(ValueError, match="'9'"):
        batchnorm.ActivationMonitor(model, layers=["9"])
    with pytest.raises(ValueError, match="not part"):
        batchnorm.ActivationMonitor(model, layers=[nn.ReLU()])
    with pytest.raises(TypeError, match="model"):
        batchnorm.ActivationMonitor("model")
