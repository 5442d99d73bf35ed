"""BatchNorm1d/2d/3d against torch.nn.BatchNorm1d/2d/3d, step by step, then in eval."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batchnorm
from tests.conftest import device_for
from tests.oracle import GRAD_TOL, TOL, make_layout

PAIRS = [
    (batchnorm.BatchNorm1d, torch.nn.BatchNorm1d, (6, 4)),
    (batchnorm.BatchNorm1d, torch.nn.BatchNorm1d, (5, 4, 7)),
    (batchnorm.BatchNorm2d, torch.nn.BatchNorm2d, (4, 4, 5, 3)),
    (batchnorm.BatchNorm3d, torch.nn.BatchNorm3d, (2, 4, 3, 2, 3)),
]


def _twins(ours_cls, torch_cls, device, dtype, **kw):
    theirs = torch_cls(4, device=device, dtype=dtype, **kw)
    ours = ours_cls(4, device=device, dtype=dtype, **kw)
    if theirs.affine:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.uniform_(-1, 1)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _compare_steps(ours, theirs, shape, layout, dtype, device, steps=3):
    for step in range(steps):
        x0 = torch.randn(shape, dtype=dtype, device=device) * (step + 1) + step
        x1 = make_layout(x0, layout).detach().requires_grad_()
        x2 = x0.detach().clone().requires_grad_()
        y1, y2 = ours(x1), theirs(x2)
        torch.testing.assert_close(y1, y2, **TOL[dtype])
        gy = torch.randn_like(y2)
        y1.backward(gy)
        y2.backward(gy)
        torch.testing.assert_close(x1.grad, x2.grad, **GRAD_TOL[dtype])
        for (name, a), (_, b) in zip(ours.named_buffers(), theirs.named_buffers(), strict=False):
            if a is not None:
                torch.testing.assert_close(a, b, **TOL[dtype], msg=f"{name} step {step}")
    if theirs.affine:
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **GRAD_TOL[dtype])
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, **GRAD_TOL[dtype])


@pytest.mark.parametrize("ours_cls,torch_cls,shape", PAIRS)
@pytest.mark.parametrize("momentum", [0.1, None, 0.9])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_module_matches_torch(backend, ours_cls, torch_cls, shape, momentum, affine, track, layout):
    device = device_for(backend)
    dtype = torch.float32
    ours, theirs = _twins(ours_cls, torch_cls, device, dtype, momentum=momentum, affine=affine,
                          track_running_stats=track)
    _compare_steps(ours, theirs, shape, layout, dtype, device)
    ours.eval()
    theirs.eval()
    _compare_steps(ours, theirs, shape, layout, dtype, device, steps=1)
    assert ours.state_dict().keys() == theirs.state_dict().keys()


@pytest.mark.parametrize("ours_cls,torch_cls,shape", PAIRS[:3])
def test_module_float64(backend, ours_cls, torch_cls, shape):
    device = device_for(backend)
    ours, theirs = _twins(ours_cls, torch_cls, device, torch.float64, momentum=None)
    _compare_steps(ours, theirs, shape, "contiguous", torch.float64, device)
    ours.eval()
    theirs.eval()
    _compare_steps(ours, theirs, shape, "contiguous", torch.float64, device, steps=1)


def test_empty_batch_counts_like_torch(backend):
    device = device_for(backend)
    ours, theirs = _twins(batchnorm.BatchNorm2d, torch.nn.BatchNorm2d, device, torch.float32)
    x = torch.randn(0, 4, 3, 3, device=device)
    assert ours(x).shape == theirs(x).shape
    for a, b in zip(ours.buffers(), theirs.buffers(), strict=False):
        torch.testing.assert_close(a, b)
    _compare_steps(ours, theirs, (3, 4, 3, 3), "contiguous", torch.float32, device)


def test_state_dict_round_trip_with_torch():
    theirs = torch.nn.BatchNorm2d(5)
    theirs(torch.randn(8, 5, 3, 3) * 3 + 1)
    ours = batchnorm.BatchNorm2d(5, activation="relu")
    ours.load_state_dict(theirs.state_dict())
    back = torch.nn.BatchNorm2d(5)
    back.load_state_dict(ours.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    again = batchnorm.BatchNorm2d(5)
    again.load_state_dict(torch.load(buf))
    assert torch.equal(again.running_var, theirs.running_var)


def test_version_1_state_dict_gets_num_batches_tracked():
    ours = batchnorm.BatchNorm2d(3)
    sd = ours.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1  # type: ignore[attr-defined]
    fresh = batchnorm.BatchNorm2d(3)
    fresh.num_batches_tracked.fill_(7)
    fresh.load_state_dict(sd)
    assert fresh.num_batches_tracked.item() == 7  # kept, as PyTorch's migration does


def test_repr_reset_and_isinstance():
    m = batchnorm.BatchNorm2d(3, momentum=None, activation=("leaky_relu", 0.2))
    t = torch.nn.BatchNorm2d(3, momentum=None)
    assert repr(m) == repr(t)[:-1] + ", activation=('leaky_relu', 0.2))"
    assert isinstance(m, torch.nn.BatchNorm2d)
    m(torch.randn(4, 3, 2, 2) + 5)
    m.reset_running_stats()
    assert m.num_batches_tracked.item() == 0 and torch.all(m.running_mean == 0)
    with torch.no_grad():
        m.weight.fill_(3)
    m.reset_parameters()
    assert torch.all(m.weight == 1)
    assert repr(batchnorm.BatchNorm1d(4)) == repr(torch.nn.BatchNorm1d(4))


def test_bias_false_like_torch():
    ours = batchnorm.BatchNorm2d(3, bias=False)
    theirs = torch.nn.BatchNorm2d(3, bias=False)
    assert ours.bias is None and ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(ours(x), theirs(x))


def test_module_residual_and_activation(backend):
    device = device_for(backend)
    m = batchnorm.BatchNorm2d(4, activation="relu", device=device)
    t = torch.nn.BatchNorm2d(4, device=device)
    x, r = torch.randn(3, 4, 5, 5, device=device), torch.randn(3, 4, 5, 5, device=device)
    torch.testing.assert_close(m(x, r), torch.relu(t(x) + r))
    torch.testing.assert_close(m.running_var, t.running_var)


def test_deepcopy_and_pickle_keep_behaviour():
    m = batchnorm.BatchNorm1d(3, activation="silu")
    m2 = copy.deepcopy(m)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m3 = torch.load(buf, weights_only=False)
    x = torch.randn(5, 3)
    torch.testing.assert_close(m2(x), m3(x))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 5), c=st.integers(1, 5), s=st.integers(1, 6),
    scale=st.sampled_from([1e-3, 1.0, 1e3]), offset=st.sampled_from([0.0, 10.0, -1e3]),
    channels_last=st.booleans(), momentum=st.sampled_from([0.1, None]),
)
def test_hypothesis_module_vs_torch(backend, n, c, s, scale, offset, channels_last, momentum):
    if n * s == 1:
        return  # one value per channel is an error in training, covered in test_errors
    device = device_for(backend)
    ours = batchnorm.BatchNorm2d(c, momentum=momentum, device=device)
    theirs = torch.nn.BatchNorm2d(c, momentum=momentum, device=device)
    x0 = (torch.randn(n, c, s, 1, dtype=torch.float64).float() * scale + offset).to(device)
    x = x0.contiguous(memory_format=torch.channels_last) if channels_last else x0
    for _ in range(2):
        y1, y2 = ours(x), theirs(x0)
        xd = x0.double()
        ref = (xd - xd.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
            xd.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
        err_ours = (y1.double() - ref).abs().max().item()
        err_theirs = (y2.double() - ref).abs().max().item()
        assert err_ours <= 2 * err_theirs + 1e-5, (err_ours, err_theirs)
    spread = scale + abs(offset)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=0, atol=1e-6 * spread)
    # running variance: against float64 statistics of the same batches, no worse than PyTorch
    twin = torch.nn.BatchNorm2d(c, momentum=momentum, dtype=torch.float64, device=device)
    for _ in range(2):
        twin(x0.double())
    # (a batch of equal float32 values has variance 0 in float64 too: relative to a floor)
    floor = twin.running_var.clamp_min(1e-12 * spread**2)
    err_ours = ((ours.running_var.double() - twin.running_var) / floor).abs().max()
    err_theirs = ((theirs.running_var.double() - twin.running_var) / floor).abs().max()
    assert err_ours <= max(2 * err_theirs.item(), 1e-5), (err_ours, err_theirs)


def test_no_warning_on_ordinary_use():
    m = batchnorm.BatchNorm2d(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(torch.randn(4, 3, 2, 2))
        m.eval()
        m(torch.randn(4, 3, 2, 2))


def test_parametrized_weight_is_read_through_its_parametrization():
    """The forward reads parameters from their dict for speed; a parametrized weight (no
    longer in that dict) must still be read as the attribute, not taken as missing."""
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    ours = batchnorm.BatchNorm2d(3)
    parametrize.register_parametrization(ours, "weight", Double())
    theirs = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        theirs.weight.fill_(2.0)
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(ours(x), theirs(x))
