"""BatchRenorm1d/2d/3d against the paper's definition (float64), BN, and on the digits data."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import batchnorm
from tests.conftest import device_for

CLASSES = {2: batchnorm.BatchRenorm1d, 3: batchnorm.BatchRenorm1d, 4: batchnorm.BatchRenorm2d,
           5: batchnorm.BatchRenorm3d}


def renorm_definition(x, rm, rv, w, b, eps, rmax, dmax):
    """Ioffe (2017), Algorithm 1, written directly in float64; r and d are detached."""
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mu_b = x.mean(dims)
    sigma_b = torch.sqrt(x.var(dims, unbiased=False) + eps)
    sigma = torch.sqrt(rv + eps)
    r = (sigma_b / sigma).clamp(1 / rmax, rmax).detach()
    d = ((mu_b - rm) / sigma).clamp(-dmax, dmax).detach()
    xhat = (x - mu_b.view(shape)) / sigma_b.view(shape)
    return w.view(shape) * (xhat * r.view(shape) + d.view(shape)) + b.view(shape)


def _layer(dim, c, **kw):
    m = CLASSES[dim](c, **kw).double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
        # Running statistics far enough from the batch's that some channels clip.
        m.running_mean.copy_(torch.linspace(-2.0, 2.0, c))
        m.running_var.copy_(torch.linspace(0.05, 4.0, c))
    return m


@settings(max_examples=20, deadline=None)
@given(dim=st.sampled_from([2, 3, 4, 5]), n=st.integers(2, 5), c=st.integers(1, 4),
       rmax=st.floats(1.0, 4.0), dmax=st.floats(0.0, 6.0), seed=st.integers(0, 2**16))
def test_matches_paper_definition_float64(dim, n, c, rmax, dmax, seed):
    g = torch.Generator().manual_seed(seed)
    spatial = [2, 3, 2][: dim - 2]
    x = (torch.randn(n, c, *spatial, generator=g, dtype=torch.float64) * 1.7 + 0.3)
    m = _layer(dim, c, rmax=rmax, dmax=dmax, warmup_steps=0)
    rm0, rv0 = m.running_mean.clone(), m.running_var.clone()
    xa = x.clone().requires_grad_()
    y = m(xa)
    xb = x.clone().requires_grad_()
    w, b = m.weight.detach().clone().requires_grad_(), m.bias.detach().clone().requires_grad_()
    ref = renorm_definition(xb, rm0, rv0, w, b, m.eps, rmax, dmax)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(y, (xa, m.weight, m.bias), gy)
    want = torch.autograd.grad(ref, (xb, w, b), gy)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)
    # Running statistics: updated exactly as BN updates them.
    rm, rv = rm0.clone(), rv0.clone()
    F.batch_norm(x, rm, rv, training=True, momentum=0.1)
    torch.testing.assert_close(m.running_mean, rm)
    torch.testing.assert_close(m.running_var, rv)
    assert int(m.num_batches_tracked) == 1


def test_gradcheck():
    """Finite differences see r and d move with x unless they are clipped, so gradcheck x where
    every channel clips both (then the paper's gradient is the true one); γ and β anywhere."""
    m = _layer(4, 3, rmax=1.5, dmax=0.5, warmup_steps=0)
    with torch.no_grad():
        m.running_mean.fill_(5.0)
        m.running_var.fill_(1e-3)
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    w = m.weight.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()
    state = copy.deepcopy(m.state_dict())

    def f(x, w, b):
        m.load_state_dict(state)  # the running statistics r and d are measured against
        return torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_reduces_to_batchnorm(backend):
    """rmax=1, dmax=0: r = 1, d = 0 whatever the running statistics, i.e. BN, step after step."""
    dev = device_for(backend)
    m = batchnorm.BatchRenorm2d(4, rmax=1.0, dmax=0.0, warmup_steps=0).to(dev)
    bn = batchnorm.BatchNorm2d(4).to(dev)
    bn.load_state_dict(m.state_dict())
    for _ in range(3):
        x = torch.randn(5, 4, 3, 3, device=dev) * 2 + 1
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = m(x1), bn(x2)
        assert torch.equal(y1, y2)
        gy = torch.randn_like(y1)
        y1.backward(gy)
        y2.backward(gy)
        assert torch.equal(x1.grad, x2.grad)
        torch.testing.assert_close(m.weight.grad, bn.weight.grad)
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(m, k), getattr(bn, k)), k


def test_schedule_ramps_from_batchnorm():
    m = batchnorm.BatchRenorm1d(3, rmax=3.0, dmax=5.0, warmup_steps=10)
    r, d = m.current_limits()
    assert (float(r), float(d)) == (1.0, 0.0)
    m.num_batches_tracked.fill_(5)
    r, d = m.current_limits()
    assert (float(r), float(d)) == pytest.approx((2.0, 2.5))
    m.num_batches_tracked.fill_(50)
    r, d = m.current_limits()
    assert (float(r), float(d)) == (3.0, 5.0)
    # At step 0 the training output is BN's, whatever the running statistics say.
    m.num_batches_tracked.zero_()
    m.running_mean.fill_(10.0)
    x = torch.randn(6, 3)
    torch.testing.assert_close(m(x), F.batch_norm(x, None, None, m.weight, m.bias, True))


def test_eval_is_batchnorm_and_state_dict_is_torchs():
    m = _layer(4, 3).float()
    m.train()
    for _ in range(3):
        m(torch.randn(4, 3, 2, 2))
    bn = torch.nn.BatchNorm2d(3)
    assert set(bn.state_dict()) == set(m.state_dict())
    bn.load_state_dict(m.state_dict())
    m.eval()
    bn.eval()
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(m(x), bn(x))
    again = batchnorm.BatchRenorm2d(3, rmax=3.0, dmax=5.0)
    again.load_state_dict(m.state_dict())
    again.eval()
    assert torch.equal(again(x), m(x))
    assert "rmax=3.0" in repr(m) and "warmup_steps=5000" in repr(m)


def test_constructor_and_input_errors():
    with pytest.raises(ValueError, match="rmax"):
        batchnorm.BatchRenorm2d(3, rmax=0.5)
    with pytest.raises(ValueError, match="dmax"):
        batchnorm.BatchRenorm2d(3, dmax=-1.0)
    with pytest.raises(TypeError, match="warmup_steps"):
        batchnorm.BatchRenorm2d(3, warmup_steps=1.5)
    with pytest.raises(ValueError, match="track_running_stats"):
        batchnorm.BatchRenorm2d(3, track_running_stats=False)
    m = batchnorm.BatchRenorm2d(3)
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match="more than 1 value"):
        m(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match="residual"):
        m(torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 1))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def _digits(n_train=1000):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def _train_and_gap(norm, steps=150, batch=4):
    torch.manual_seed(0)
    xtr, ytr, xte, _ = _digits()
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), norm, torch.nn.ReLU(),
                                torch.nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (batch,), generator=g)
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    # The gap: what the network computes in training (batch-of-4 statistics) vs at inference.
    with torch.no_grad():
        train_mode = copy.deepcopy(model).train()
        model.eval()
        gaps = []
        for i in range(0, 200, batch):
            xb = xte[i:i + batch]
            p_train = F.log_softmax(train_mode(xb), 1)
            p_eval = F.log_softmax(model(xb), 1)
            gaps.append((p_train.exp() * (p_train - p_eval)).sum(1).mean())
    return float(torch.stack(gaps).mean())


def test_digits_train_eval_gap_smaller_than_batchnorm():
    """The weakness it answers: at batch size 4, BN trains on statistics that eval never sees."""
    gap_bn = _train_and_gap(torch.nn.BatchNorm1d(32))
    gap_renorm = _train_and_gap(batchnorm.BatchRenorm1d(32, warmup_steps=50))
    assert gap_renorm < 0.5 * gap_bn, (gap_renorm, gap_bn)
