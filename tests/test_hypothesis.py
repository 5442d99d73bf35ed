"""Property tests: shapes, layouts, dtypes and nasty values, on every backend."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batchnorm.functional as BF
from tests.conftest import device_for
from tests.oracle import ACTIVATIONS, float64_bn, make_layout, torch_bn

SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def cases(draw):
    rank = draw(st.integers(2, 5))
    shape = [draw(st.integers(1, 5)), draw(st.integers(1, 6))]
    shape += [draw(st.integers(1, 4)) for _ in range(rank - 2)]
    layout = draw(st.sampled_from(["contiguous", "channels_last", "strided"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    offset = draw(st.sampled_from([0.0, 1.0, -50.0, 1e3]))
    scale = draw(st.sampled_from([1e-2, 1.0, 30.0]))
    training = draw(st.booleans())
    activation = draw(st.sampled_from(ACTIVATIONS))
    residual = draw(st.booleans())
    return shape, layout, dtype, offset, scale, training, activation, residual


@SETTINGS
@given(case=cases())
def test_against_float64_and_torch(backend, case):
    shape, layout, dtype, offset, scale, training, activation, use_residual = case
    n_per_channel = shape[0] * math.prod(shape[2:])
    device = device_for(backend)
    x0 = (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype).to(device)
    x = make_layout(x0, layout)
    c = shape[1]
    w = torch.rand(c, dtype=dtype, device=device) + 0.5
    b = torch.randn(c, dtype=dtype, device=device)
    rm = torch.randn(c, dtype=dtype, device=device) * scale + offset
    rv = (torch.rand(c, dtype=dtype, device=device) + 0.5) * scale * scale
    r = torch.randn(shape, dtype=dtype, device=device) if use_residual else None
    if training and n_per_channel == 1:
        return  # an error, covered in test_errors
    rm1, rv1 = rm.clone(), rv.clone()
    y = BF.batch_norm(x, rm1, rv1, w, b, training, 0.2, 1e-5, activation=activation,
                      residual=r)
    ref, mean, var = float64_bn(x0, rm, rv, w, b, training, 1e-5, activation, r)
    eps32 = 2.0 ** -23
    # float32: error bounded by the rounding of the input relative to its spread
    tol = 1e-9 if dtype == torch.float64 else 50 * eps32 * (1 + abs(offset) / scale)
    assert (y.double() - ref).abs().max().item() <= tol * 10, "output"
    theirs = torch_bn(x0, rm.clone(), rv.clone(), w, b, training, 0.2, 1e-5, activation, r)
    err_ours = (y.double() - ref).abs().max().item()
    err_theirs = (theirs.double() - ref).abs().max().item()
    assert err_ours <= 2 * err_theirs + tol, (err_ours, err_theirs)
    if training:
        unbiased = var * n_per_channel / (n_per_channel - 1)
        exp_rm = 0.8 * rm.double() + 0.2 * mean
        exp_rv = 0.8 * rv.double() + 0.2 * unbiased
        torch.testing.assert_close(rm1.double(), exp_rm, rtol=tol * 10, atol=tol * 10 * scale)
        torch.testing.assert_close(rv1.double(), exp_rv, rtol=1e-4 if dtype == torch.float32
                                   else 1e-9, atol=tol * 10 * scale * scale)
    else:
        assert torch.equal(rm1, rm) and torch.equal(rv1, rv)


@SETTINGS
@given(n=st.integers(2, 6), c=st.integers(1, 4), bad=st.sampled_from(
    [float("nan"), float("inf"), -float("inf")]), channels_last=st.booleans())
def test_nonfinite_never_poisons(backend, n, c, bad, channels_last):
    device = device_for(backend)
    x = torch.randn(n, c, 3, 2, device=device)
    x[n - 1, c - 1, 0, 0] = bad
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rm, rv = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = BF.batch_norm(x, rm, rv, training=True)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    assert y.shape == x.shape
    # channels without the bad value are finite and correct
    if c > 1:
        good = x[:, : c - 1]
        torch.testing.assert_close(y[:, : c - 1],
                                   torch.nn.functional.batch_norm(good, None, None, training=True))
