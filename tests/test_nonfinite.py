"""A batch whose statistics are not finite never touches the running statistics."""

from __future__ import annotations

import warnings

import pytest
import torch

import batchnorm
from batchnorm import NonFiniteBatchWarning
from tests.conftest import device_for


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_bad_batch_is_skipped_counted_and_reported(backend, bad, momentum):
    device = device_for(backend)
    m = batchnorm.BatchNorm2d(3, momentum=momentum, device=device)
    m.layer_name = "encoder.bn1"
    m(torch.randn(4, 3, 2, 2, device=device))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(4, 3, 2, 2, device=device)
    x[1, 2, 0, 1] = bad
    with pytest.warns(NonFiniteBatchWarning, match=r"encoder\.bn1.*not finite"):
        m(x)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert m.skipped_updates == 1
    # the next good batch continues exactly as if the bad one never happened
    ref = torch.nn.BatchNorm2d(3, momentum=momentum, device=device)
    ref.load_state_dict(before)
    x2 = torch.randn(4, 3, 2, 2, device=device)
    torch.testing.assert_close(m(x2), ref(x2))
    torch.testing.assert_close(m.running_var, ref.running_var)
    assert m.num_batches_tracked.item() == ref.num_batches_tracked.item() == 2


def test_overflowing_variance_is_skipped(backend):
    m = batchnorm.BatchNorm1d(2)
    x = torch.tensor([[3e38, 0.0], [-3e38, 1.0], [3e38, 2.0]])
    with pytest.warns(NonFiniteBatchWarning):
        m(x)
    assert torch.equal(m.running_var, torch.ones(2))
    assert m.num_batches_tracked.item() == 0


def test_default_name_and_functional_warning(backend):
    m = batchnorm.BatchNorm1d(2)
    with pytest.warns(NonFiniteBatchWarning, match=r"BatchNorm1d\(2\)"):
        m(torch.tensor([[float("nan"), 0.0], [1.0, 1.0]]))
    rm, rv = torch.zeros(2), torch.ones(2)
    with pytest.warns(NonFiniteBatchWarning, match="batch_norm"):
        batchnorm.functional.batch_norm(torch.tensor([[float("nan"), 0.0], [1.0, 1.0]]), rm, rv,
                                        training=True)
    assert torch.equal(rm, torch.zeros(2)) and torch.equal(rv, torch.ones(2))


def test_eval_mode_nan_input_touches_nothing():
    m = batchnorm.BatchNorm1d(2).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = m(torch.tensor([[float("nan"), 0.0], [1.0, 1.0]]))
    assert torch.isnan(y[0, 0]) and m.skipped_updates == 0


@pytest.mark.parametrize("cumulative", [False, True])
@pytest.mark.parametrize("bad", [False, True])
def test_eager_cpu_update_equals_the_traced_op(cumulative, bad):
    """The NumPy fast path for eager CPU updates and the graph-safe op give identical state."""
    from batchnorm import ops

    mean, var = torch.randn(7), torch.rand(7) + 0.1
    if bad:
        var[3] = float("inf")
    states = []
    for update in (ops._update_cpu, ops._update_impl):
        rm, rv = torch.randn(7), torch.rand(7) + 0.5
        rm.copy_(torch.arange(7.0))
        rv.fill_(2.0)
        nbt, skipped = torch.tensor(4), torch.tensor(1)
        ok = update(rm, rv, nbt, skipped, mean, var, 0.3, cumulative)
        states.append((bool(ok), rm, rv, nbt, skipped))
    (ok_a, *a), (ok_b, *b) = states
    assert ok_a == ok_b == (not bad)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
