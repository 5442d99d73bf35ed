"""GhostBatchNorm1d/2d/3d against the definition (float64), BN, and on uneven batches."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import batchnorm
from tests.conftest import device_for

CLASSES = {2: batchnorm.GhostBatchNorm1d, 3: batchnorm.GhostBatchNorm1d,
           4: batchnorm.GhostBatchNorm2d, 5: batchnorm.GhostBatchNorm3d}


def ghost_definition(x, w, b, eps, v):
    """Hoffer et al. (2017): BN per consecutive slice of v samples; the last takes the rest."""
    n = x.shape[0]
    k = max(1, n // v)
    bounds = [i * v for i in range(k)] + [n]
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        xc = x[lo:hi]
        mean = xc.mean(dims)
        var = xc.var(dims, unbiased=False)
        out.append((xc - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * w.view(shape)
                   + b.view(shape))
    return torch.cat(out)


def _layer(dim, c, v, **kw):
    m = CLASSES[dim](c, virtual_batch_size=v, **kw).double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    return m


@settings(max_examples=25, deadline=None)
@given(dim=st.sampled_from([2, 3, 4, 5]), n=st.integers(2, 13), v=st.integers(2, 5),
       c=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_matches_definition_float64(dim, n, v, c, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, *[2, 3, 2][: dim - 2], generator=g, dtype=torch.float64) * 3 - 1
    m = _layer(dim, c, v)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    w, b = m.weight.detach().clone().requires_grad_(), m.bias.detach().clone().requires_grad_()
    y = m(xa)
    ref = ghost_definition(xb, w, b, m.eps, v)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(y, (xa, m.weight, m.bias), gy)
    want = torch.autograd.grad(ref, (xb, w, b), gy)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)
    # Running statistics: those of BN on the whole batch (one coherent update per step).
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    F.batch_norm(x, rm, rv, training=True, momentum=0.1)
    torch.testing.assert_close(m.running_mean, rm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.running_var, rv, rtol=1e-12, atol=1e-12)
    assert int(m.num_batches_tracked) == 1


def test_on_every_backend(backend):
    dev = device_for(backend)
    m = batchnorm.GhostBatchNorm2d(3, virtual_batch_size=4, activation="relu").to(dev)
    x = torch.randn(11, 3, 4, 4, device=dev)  # virtual batches of 4, 4 and 3 + ... -> 4, 7
    res = torch.randn_like(x)
    y = m(x, res)
    ref = F.relu(ghost_definition(x.double(), m.weight.double(), m.bias.double(), m.eps, 4)
                 + res.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=2e-5)
    y.sum().backward()


def test_gradcheck_uneven():
    m = _layer(3, 2, 3)
    x = torch.randn(7, 2, 2, dtype=torch.float64, requires_grad=True)  # virtual batches 3 and 4
    w = m.weight.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()

    def f(x, w, b):
        return torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("n", [4, 6, 7])
def test_one_virtual_batch_is_batchnorm(n):
    """``virtual_batch_size >= N`` (or ``N < 2v``): one virtual batch, i.e. BN exactly."""
    m = batchnorm.GhostBatchNorm2d(3, virtual_batch_size=4)
    bn = batchnorm.BatchNorm2d(3)
    x = torch.randn(n, 3, 3, 3)
    assert torch.equal(m(x), bn(x))
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(m, k), getattr(bn, k)), k


def test_uneven_batches_never_crash_and_never_leave_a_lone_sample():
    m = batchnorm.GhostBatchNorm1d(3, virtual_batch_size=4)
    x = torch.randn(9, 3)  # 4 + 5, not 4 + 4 + 1
    y = m(x)
    torch.testing.assert_close(y, ghost_definition(x, m.weight, m.bias, m.eps, 4))
    assert torch.isfinite(y).all() and (y[4:].std(0) > 0.5).all()
    # A virtual batch of one sample is fine when it has several values per channel.
    inst = batchnorm.GhostBatchNorm1d(2, virtual_batch_size=1)
    z = torch.randn(3, 2, 5)
    torch.testing.assert_close(inst(z), ghost_definition(z, inst.weight, inst.bias, 1e-5, 1))
    with pytest.raises(ValueError, match="virtual_batch_size"):
        inst(torch.randn(3, 2))


def test_eval_uses_running_statistics_never_ghost_batches():
    m = batchnorm.GhostBatchNorm2d(3, virtual_batch_size=2)
    for _ in range(3):
        m(torch.randn(8, 3, 2, 2) + 1)
    m.eval()
    x = torch.randn(8, 3, 2, 2)
    y = m(x)
    want = F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(m(x[:1]), y[:1])  # independent of the batch
    # Without running statistics eval falls back to the whole batch, as BN does.
    free = batchnorm.GhostBatchNorm2d(3, virtual_batch_size=2, track_running_stats=False).eval()
    torch.testing.assert_close(free(x), F.batch_norm(x, None, None, free.weight, free.bias, True))


def test_no_running_stats_training():
    m = batchnorm.GhostBatchNorm1d(3, virtual_batch_size=2, track_running_stats=False)
    x = torch.randn(6, 3)
    torch.testing.assert_close(m(x), ghost_definition(x, m.weight, m.bias, m.eps, 2))
    assert m.running_mean is None


def test_state_dict_round_trip_and_errors():
    m = batchnorm.GhostBatchNorm2d(3, virtual_batch_size=2, momentum=None)
    for _ in range(2):
        m(torch.randn(6, 3, 2, 2))
    bn = torch.nn.BatchNorm2d(3)
    assert set(bn.state_dict()) == set(m.state_dict())
    bn.load_state_dict(m.state_dict())
    again = batchnorm.GhostBatchNorm2d(3, virtual_batch_size=2)
    again.load_state_dict(bn.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert "virtual_batch_size=2" in repr(m)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        batchnorm.GhostBatchNorm2d(3, virtual_batch_size=0)
    with pytest.raises(TypeError, match="virtual_batch_size"):
        batchnorm.GhostBatchNorm2d(3, virtual_batch_size=2.0)
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(6, 4, 2, 2))
    with pytest.raises(ValueError, match="residual"):
        m(torch.randn(6, 3, 2, 2), torch.randn(6, 3, 2, 3))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_nonfinite_batch_skipped():
    m = batchnorm.GhostBatchNorm1d(2, virtual_batch_size=2)
    x = torch.randn(6, 2)
    x[0, 0] = float("nan")
    with pytest.warns(batchnorm.NonFiniteBatchWarning):
        m(x)
    assert torch.equal(m.running_mean, torch.zeros(2))
    assert int(m.num_batches_tracked) == 0 and m.skipped_updates == 1


def test_digits_large_batch_keeps_small_batch_noise():
    """What it answers: a large batch normalizes with nearly exact statistics, losing the
    regularizing noise of small-batch BN. With ghost batches of 16 inside a batch of 512, the
    per-sample normalization noise on real data is that of BN at batch 16, not at 512."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data[:1536], dtype=torch.float32)
    x = x[:, x.std(0) > 1]  # drop the constant border pixels

    def noise(layer, batch):
        # Spread of a fixed sample's normalized value over the batches it could share.
        outs = []
        for s in range(8):
            g = torch.Generator().manual_seed(s)
            idx = torch.cat([torch.zeros(1, dtype=torch.long),
                             torch.randperm(len(x) - 1, generator=g)[: batch - 1] + 1])
            with torch.no_grad():
                outs.append(layer(x[idx])[0])
        return float(torch.stack(outs).std(0).mean())

    big = noise(torch.nn.BatchNorm1d(x.shape[1]), 512)
    small = noise(torch.nn.BatchNorm1d(x.shape[1]), 16)
    ghost = noise(batchnorm.GhostBatchNorm1d(x.shape[1], virtual_batch_size=16), 512)
    assert big < 0.3 * small
    assert 0.5 * small < ghost < 2 * small
