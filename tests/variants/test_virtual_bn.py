"""VirtualBatchNorm1d/2d against the direct formula of Salimans et al. (2016) in float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import batchnorm

CLASSES = {2: batchnorm.VirtualBatchNorm1d, 3: batchnorm.VirtualBatchNorm1d,
           4: batchnorm.VirtualBatchNorm2d}


def vbn_definition(x, ref, w, b, eps):
    """Per example: statistics of (all values of the reference batch) ∪ (the example's values)."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        c = x.shape[1]
        pool = torch.cat([ref.transpose(0, 1).reshape(c, -1), xi.transpose(0, 1).reshape(c, -1)],
                         1)
        mean = pool.mean(1)
        var = pool.var(1, unbiased=False)
        shape = [1, c] + [1] * (x.dim() - 2)
        out.append((xi - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * w.view(shape)
                   + b.view(shape))
    return torch.cat(out)


def _layer(dim, c):
    m = CLASSES[dim](c).double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    return m


@settings(max_examples=20, deadline=None)
@given(dim=st.sampled_from([2, 3, 4]), n=st.integers(1, 4), r=st.integers(1, 5),
       c=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_matches_direct_formula_float64(dim, n, r, c, seed):
    g = torch.Generator().manual_seed(seed)
    spatial = [3, 2][: dim - 2]
    ref = torch.randn(r, c, *spatial, generator=g, dtype=torch.float64) * 2 + 1
    x = torch.randn(n, c, *spatial, generator=g, dtype=torch.float64) * 3 - 1
    m = _layer(dim, c)
    m.set_reference(ref)
    torch.testing.assert_close(m(x), vbn_definition(x, ref, m.weight, m.bias, m.eps),
                               rtol=1e-10, atol=1e-10)
    # Passed per call, the reference is differentiated through (the paper's use).
    xa, ra = x.clone().requires_grad_(), ref.clone().requires_grad_()
    y = m(xa, reference=ra)
    xb, rb = x.clone().requires_grad_(), ref.clone().requires_grad_()
    want = vbn_definition(xb, rb, m.weight, m.bias, m.eps)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    for a, e in zip(torch.autograd.grad(y, (xa, ra, m.weight), gy),
                    torch.autograd.grad(want, (xb, rb, m.weight), gy), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


def test_gradcheck():
    m = _layer(4, 2)
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(4, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, r: m(x, reference=r), (x, ref))
    m.set_reference(ref.detach())
    assert torch.autograd.gradcheck(lambda x: m(x), (x,))


def test_first_call_sets_reference_and_outputs_do_not_depend_on_the_batch():
    m = batchnorm.VirtualBatchNorm1d(3)
    assert not m.has_reference
    ref = torch.randn(16, 3)
    y_ref = m(ref)
    assert m.has_reference
    torch.testing.assert_close(y_ref, vbn_definition(ref, ref, m.weight, m.bias, m.eps))
    x = torch.randn(8, 3)
    y = m(x)
    # An example's output is the same alone, or in any batch (BN couples them).
    torch.testing.assert_close(m(x[2:3]), y[2:3])
    torch.testing.assert_close(m(torch.cat([x[2:3], torch.randn(5, 3) * 9]))[:1], y[2:3])
    m.eval()
    torch.testing.assert_close(m(x), y)  # no train/eval difference


def test_state_dict_round_trip():
    m = batchnorm.VirtualBatchNorm2d(3)
    m.set_reference(torch.randn(8, 3, 2, 2))
    again = batchnorm.VirtualBatchNorm2d(3)
    again.load_state_dict(m.state_dict())
    assert again.has_reference
    assert set(m.state_dict()) == {"weight", "bias", "ref_mean", "ref_m2", "ref_count"}
    x = torch.randn(4, 3, 2, 2)
    assert torch.equal(again(x), m(x))
    plain = batchnorm.VirtualBatchNorm2d(3, affine=False)
    assert plain.weight is None and "weight" not in plain.state_dict()


def test_errors():
    m = batchnorm.VirtualBatchNorm2d(3)
    with pytest.raises(ValueError, match="input"):
        m(torch.randn(4, 3, 2))
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(4, 2, 2, 2))
    with pytest.raises(ValueError, match="reference"):
        m.set_reference(torch.randn(4, 2, 2, 2))
    with pytest.raises(ValueError, match="reference"):
        m.set_reference(torch.randn(0, 3, 2, 2))
    assert not m.has_reference
    with pytest.raises(TypeError, match="input"):
        m(torch.ones(4, 3, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="num_features"):
        batchnorm.VirtualBatchNorm1d(0)


def test_digits_batch_dependence_removed():
    """What it answers: with BN an example's output depends on the rest of its batch (GAN
    generators then produce correlated samples). On digits: the same image in two batches."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data[:200], dtype=torch.float32)
    x = x[:, x.std(0) > 1]
    c = x.shape[1]
    bn, vbn = torch.nn.BatchNorm1d(c), batchnorm.VirtualBatchNorm1d(c)
    vbn.set_reference(x[100:164])
    zeros, ones = x[:16], x[16:32]  # two different companions for image 0
    with torch.no_grad():
        a, b = bn(torch.cat([x[:1], zeros[1:]])), bn(torch.cat([x[:1], ones[1:]]))
        assert (a[0] - b[0]).abs().max() > 0.1
        a, b = vbn(torch.cat([x[:1], zeros[1:]])), vbn(torch.cat([x[:1], ones[1:]]))
        torch.testing.assert_close(a[0], b[0])
