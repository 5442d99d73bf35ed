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
    from batchnorm import running

    mean, var = torch.randn(7), torch.rand(7) + 0.1
    if bad:
        var[3] = float("inf")
    states = []
    for update in (running._update_cpu, running._update_impl):
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


@pytest.mark.parametrize("name", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("running_dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("stat_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [None, "nan", "inf"])
def test_backend_blend_running_equals_the_traced_op(name, running_dtype, stat_dtype, bad):
    """Every backend's eager CPU blend writes, bit for bit, what the graph-safe op writes, and
    nothing at all for a non-finite batch (the check comes before any write)."""
    from batchnorm import kernels, running

    backend = kernels.get_backend(name)
    if backend is None:
        pytest.skip(f"backend {name!r} is not importable here")
    mean = torch.randn(37, dtype=stat_dtype) * 100
    var = torch.rand(37, dtype=stat_dtype) * 10 + 1e-3
    if bad is not None:
        (var if bad == "inf" else mean)[36] = float(bad)
    rm0 = torch.randn(37).to(running_dtype)
    rv0 = (torch.rand(37) + 0.5).to(running_dtype)
    rm, rv = rm0.clone(), rv0.clone()
    ok = backend.blend_running(rm.numpy(), rv.numpy(), mean.numpy(), var.numpy(), 0.3)
    em, ev = rm0.clone(), rv0.clone()
    expected = running._update_impl(em, ev, None, None, mean, var, 0.3, False)
    assert ok == bool(expected) == (bad is None)
    assert torch.equal(rm, em) and torch.equal(rv, ev)
    if bad is not None:
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_eager_update_moves_version_counters():
    """The running statistics are written in place through NumPy views; their version counters
    still move, so autograd refuses a stale saved copy instead of using the updated values.
    (PyTorch 2.13's own CPU update leaves the counter alone: there the same backward silently
    uses the new values.)"""
    rm, rv = torch.zeros(3), torch.ones(3)
    w = torch.ones(3, requires_grad=True)
    z = (w * rm).sum()  # saves rm for w's gradient
    versions = rm._version, rv._version
    batchnorm.functional.batch_norm(torch.randn(5, 3), rm, rv, training=True)
    assert rm._version > versions[0] and rv._version > versions[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()


def test_inference_tensor_running_stats_raise_like_pytorch():
    """Running statistics created under ``torch.inference_mode`` cannot be updated outside it:
    the same RuntimeError as PyTorch's, and the buffers keep their values."""
    with torch.inference_mode():
        ours, theirs = batchnorm.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    x = torch.randn(6, 3)
    for m in (theirs, ours):
        with pytest.raises(RuntimeError, match="[Ii]nference"):
            m(x)
    assert torch.equal(ours.running_mean, torch.zeros(3))
    with torch.inference_mode():  # inside the mode the update is allowed, as for PyTorch
        theirs(x)
        ours(x)
    assert torch.allclose(ours.running_mean, theirs.running_mean, rtol=1e-6, atol=1e-7)


def test_skip_warning_names_the_callers_line(backend):
    """The report points at the user's call (module or function), not at a line inside the
    package or torch.nn, whichever path ran the update."""
    device = device_for(backend)
    x = torch.randn(4, 3, 2, 2, device=device)
    x[0, 1, 0, 0] = float("nan")
    m = batchnorm.BatchNorm2d(3, device=device)
    with pytest.warns(NonFiniteBatchWarning) as module_call:
        m(x)
    with pytest.warns(NonFiniteBatchWarning) as function_call:
        batchnorm.functional.batch_norm(x, m.running_mean.clone(), m.running_var.clone(),
                                        training=True)
    for record in (module_call[0], function_call[0]):
        assert record.filename == __file__


_FOLD_CASES = {
    "2-D": ((6, 5), torch.contiguous_format),
    "channels-first": ((4, 3, 5, 5), torch.contiguous_format),
    "channels-last": ((4, 3, 5, 5), torch.channels_last),
    "lane blocks": ((16, 5, 7, 7), torch.contiguous_format),
}


@pytest.mark.parametrize("case", sorted(_FOLD_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("bad", [False, True])
def test_folded_update_equals_the_update_on_its_own(backend, monkeypatch, case, dtype,
                                                     momentum, bad):
    """Eager CPU training folds the running-statistics update into the forward's backend call
    (``running.fold_request``); the state it leaves is, bit for bit, what the update run on its
    own leaves: running statistics, both counters, the output and the gradients."""
    from batchnorm import functional, running

    device = device_for(backend)
    shape, fmt = _FOLD_CASES[case]
    batches = [torch.randn(shape, dtype=dtype) * 3 + 5 for _ in range(3)]
    if bad:
        batches[1].view(-1)[7] = float("nan")
    dy = torch.randn(shape, dtype=dtype)
    cls = batchnorm.BatchNorm1d if len(shape) == 2 else batchnorm.BatchNorm2d
    requests = []
    real = running.fold_request

    def spy(*args):
        requests.append(real(*args))
        return requests[-1]

    # the general path's fold (the layers' short path is compared with the general path in
    # tests/test_fast_train.py)
    monkeypatch.setattr(functional, "fast_train", lambda *args: None)
    monkeypatch.setattr(batchnorm.nn.batchnorm, "fast_train", lambda *args: None)
    results = []
    for fold in (True, False):
        monkeypatch.setattr(functional, "fold_request", spy if fold else lambda *args: None)
        m = cls(shape[1], momentum=momentum, activation="relu", device=device, dtype=dtype)
        outs = []
        for i, b in enumerate(batches):
            x = b.to(device).to(memory_format=fmt).requires_grad_(i == 2)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NonFiniteBatchWarning)
                y = m(x)
            if i == 2:
                y.backward(dy.to(device))
                outs += [x.grad, m.weight.grad, m.bias.grad]
            outs.append(y.detach())
        state = [m.running_mean, m.running_var, m.num_batches_tracked, m.num_batches_skipped]
        results.append((outs, state))
    (outs_a, state_a), (outs_b, state_b) = results
    if backend == "cpu":  # the Numba backend folds every one of these updates
        assert len(requests) == 3 and all(r is not None and r.ok is not None for r in requests)
    for a, b in zip(state_a + outs_a, state_b + outs_b, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # bitwise
    assert int(state_a[3]) == int(bad) and int(state_a[2]) == 3 - int(bad)


def test_folded_update_waits_for_a_valid_call(monkeypatch):
    """A call rejected by the checks folds nothing: the running statistics stay as they were."""
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="residual"):
        batchnorm.functional.batch_norm(torch.randn(4, 3), rm, rv, training=True,
                                        residual=torch.randn(4, 2))
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
