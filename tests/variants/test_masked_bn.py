"""MaskedBatchNorm1d: equal to BN over the concatenated valid frames; padding inert."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import batchnorm
from tests.conftest import device_for


def _mask(lengths, length):
    return torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)


def _layer(c, **kw):
    m = batchnorm.MaskedBatchNorm1d(c, **kw).double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    return m


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 5), c=st.integers(1, 3), length=st.integers(2, 7),
       seed=st.integers(0, 2**16))
def test_equals_batchnorm_over_valid_frames_float64(n, c, length, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, length + 1, (n,), generator=g)
    lengths[0] = length  # at least 2 valid frames
    mask = _mask(lengths, length)
    x = torch.randn(n, c, length, generator=g, dtype=torch.float64) * 2 + 3
    x[~mask.unsqueeze(1).expand_as(x)] = 1e6  # padding must not matter
    m = _layer(c)
    xa = x.clone().requires_grad_()
    y = m(xa, mask)
    # The oracle: PyTorch's BN on the valid frames, concatenated.
    frames = x.transpose(1, 2)[mask].clone().requires_grad_()
    w, b = m.weight.detach().clone().requires_grad_(), m.bias.detach().clone().requires_grad_()
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    ref = F.batch_norm(frames, rm, rv, w, b, True, 0.1, m.eps)
    torch.testing.assert_close(y.transpose(1, 2)[mask], ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(y.transpose(1, 2)[~mask], torch.zeros_like(y.transpose(1, 2)[~mask]))
    torch.testing.assert_close(m.running_mean, rm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.running_var, rv, rtol=1e-12, atol=1e-12)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    gx, gw, gb = torch.autograd.grad(y, (xa, m.weight, m.bias), gy)
    want = torch.autograd.grad(ref, (frames, w, b), gy.transpose(1, 2)[mask])
    torch.testing.assert_close(gx.transpose(1, 2)[mask], want[0], rtol=1e-9, atol=1e-9)
    assert torch.equal(gx.transpose(1, 2)[~mask], torch.zeros_like(gx.transpose(1, 2)[~mask]))
    torch.testing.assert_close(gw, want[1], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gb, want[2], rtol=1e-9, atol=1e-9)


def test_nan_padding_gives_zero_output_and_zero_gradient():
    m = batchnorm.MaskedBatchNorm1d(3, activation="relu")
    x = torch.randn(3, 3, 5)
    lengths = torch.tensor([5, 2, 3])
    mask = _mask(lengths, 5)
    x[~mask.unsqueeze(1).expand_as(x)] = float("nan")
    x.requires_grad_()
    y = m(x, lengths)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad.transpose(1, 2)[~mask], torch.zeros(int((~mask).sum()), 3))
    assert torch.isfinite(m.running_mean).all() and int(m.num_batches_tracked) == 1


def test_all_true_mask_is_batchnorm(backend):
    dev = device_for(backend)
    m = batchnorm.MaskedBatchNorm1d(4).to(dev)
    bn = batchnorm.BatchNorm1d(4).to(dev)
    x = torch.randn(3, 4, 6, device=dev)
    y = m(x, torch.ones(3, 6, dtype=torch.bool, device=dev))
    torch.testing.assert_close(y, bn(x), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(m.running_mean, bn.running_mean)
    torch.testing.assert_close(m.running_var, bn.running_var)
    assert torch.equal(m(x), bn(x))  # no mask: plain BN, same kernels
    m.eval()
    bn.eval()
    lengths = torch.tensor([6, 4, 1], device=dev)
    y = m(x, lengths)
    keep = _mask(lengths.cpu(), 6).to(dev).unsqueeze(1)
    torch.testing.assert_close(y, torch.where(keep, bn(x), 0.0))


def test_gradcheck():
    m = _layer(2)
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 1, 2])
    w = m.weight.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()

    def f(x, w, b):
        return torch.func.functional_call(m, {"weight": w, "bias": b}, (x, lengths))

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_lengths_equal_mask_and_all_padding_batch():
    x = torch.randn(3, 2, 4)
    lengths = torch.tensor([4, 0, 2])
    a, b = batchnorm.MaskedBatchNorm1d(2), batchnorm.MaskedBatchNorm1d(2)
    assert torch.equal(a(x, lengths), b(x, _mask(lengths, 4)))
    empty = batchnorm.MaskedBatchNorm1d(2, momentum=0.5)
    empty.running_mean.fill_(0.25)
    y = empty(x, torch.zeros(3, dtype=torch.long))
    assert torch.equal(y, torch.zeros_like(y))
    torch.testing.assert_close(empty.running_mean, torch.full((2,), 0.25))
    torch.testing.assert_close(empty.running_var, torch.ones(2))
    assert int(empty.num_batches_tracked) == 1  # counted as tracked, as BN counts an empty batch


def test_errors_leave_state_unchanged():
    m = batchnorm.MaskedBatchNorm1d(2)
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match="mask"):
        m(x, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        m(x, torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, L\]"):
        m(x, torch.tensor([4, 5, 1]))
    with pytest.raises(ValueError, match="mask"):
        m(x, torch.tensor([4, 1]))
    with pytest.raises(ValueError, match="mask needs input"):
        m(torch.randn(3, 2), torch.ones(3, 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        m(x, [4, 1, 2])
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_state_dict_round_trip():
    m = batchnorm.MaskedBatchNorm1d(3)
    m(torch.randn(4, 3, 5), torch.tensor([5, 3, 2, 1]))
    bn = torch.nn.BatchNorm1d(3)
    assert set(bn.state_dict()) == set(m.state_dict())
    again = batchnorm.MaskedBatchNorm1d(3)
    again.load_state_dict(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_digits_padding_changes_batchnorm_not_masked():
    """What it answers: BN counts padding as data. Digit images as sequences of 8 rows of 8
    pixels, padded to 16 steps: BN's output on the real rows moves with the padding; masked
    BN's is that of the unpadded batch."""
    from sklearn.datasets import load_digits

    img = torch.tensor(load_digits().data[:32], dtype=torch.float32).view(32, 8, 8)
    seq = img.transpose(1, 2)  # (N, C=8 pixels, L=8 rows)
    padded = torch.cat([seq, torch.zeros(32, 8, 8)], 2)
    lengths = torch.full((32,), 8)
    bn, masked = torch.nn.BatchNorm1d(8), batchnorm.MaskedBatchNorm1d(8)
    y_bn = bn(seq)
    y_bn_padded = bn(padded)[..., :8]
    y_masked = masked(padded, lengths)[..., :8]
    assert (y_bn - y_bn_padded).abs().max() > 0.2
    torch.testing.assert_close(y_masked, y_bn, rtol=1e-4, atol=1e-4)
