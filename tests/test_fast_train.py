"""The layer's common training call (``batchnorm.ops.fast_train``) against the general path.

The short path must give the same numbers bit for bit (output, every gradient, running
statistics, counters), must be the path the common call takes, and must decline (leaving
everything unchanged) whatever it does not handle, so that the general path runs and raises.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import batchnorm
from batchnorm import functional
from batchnorm.functional import batch_norm_impl
from batchnorm.ops import fast_train
from batchnorm.running import NonFiniteBatchWarning

CASES = [
    (batchnorm.BatchNorm1d, (9, 5), None),
    (batchnorm.BatchNorm1d, (4, 5, 7), None),
    (batchnorm.BatchNorm2d, (4, 5, 6, 3), None),
    (batchnorm.BatchNorm2d, (4, 5, 6, 3), torch.channels_last),
    (batchnorm.BatchNorm3d, (2, 5, 3, 4, 2), torch.channels_last_3d),
]


def _general(layer, x, residual=None):
    """What the layer's forward computes through the general chain (the short path declining)."""
    short = functional.fast_train
    functional.fast_train = lambda *args: None
    try:
        return batch_norm_impl(
            x, layer.running_mean, layer.running_var, layer.weight, layer.bias, True,
            layer.momentum, layer.eps, activation=layer.activation, residual=residual,
            num_batches_tracked=layer.num_batches_tracked,
            num_batches_skipped=layer.num_batches_skipped, layer_name=layer._name())
    finally:
        functional.fast_train = short


def _count_fast(monkeypatch):
    """Count the calls that the short path ran (not declined), from the layers (which call it
    first) and from the functional API."""
    taken = []
    real = functional.fast_train

    def counting(*args, **kwargs):
        y = real(*args, **kwargs)
        taken.append(y is not None)
        return y

    monkeypatch.setattr(functional, "fast_train", counting)
    monkeypatch.setattr(batchnorm.nn.batchnorm, "fast_train", counting)
    return taken


@pytest.mark.parametrize("cls,shape,fmt", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", [None, "relu", ("leaky_relu", 0.2), "hardswish"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_same_numbers_as_the_general_path(cpu_backend, monkeypatch, cls, shape, fmt, dtype,
                                          activation, with_residual):
    taken = _count_fast(monkeypatch)
    fast = cls(shape[1], dtype=dtype, activation=activation)
    with torch.no_grad():
        fast.weight.uniform_(0.5, 1.5)
        fast.bias.uniform_(-1, 1)
    slow = cls(shape[1], dtype=dtype, activation=activation)
    slow.load_state_dict(fast.state_dict())
    for step in range(3):
        x0 = torch.randn(shape, dtype=dtype) * (step + 2) + 3 * step
        if fmt is not None:
            x0 = x0.to(memory_format=fmt)
        r0 = torch.randn(shape, dtype=dtype) if with_residual else None
        xs = [x0.clone().requires_grad_() for _ in range(2)]
        rs = [None if r0 is None else r0.clone().requires_grad_() for _ in range(2)]
        y_fast = fast(xs[0], rs[0])
        y_slow = _general(slow, xs[1], rs[1])
        assert torch.equal(y_fast, y_slow)
        assert y_fast.stride() == y_slow.stride()
        g = torch.randn(shape, dtype=dtype)
        y_fast.backward(g)
        y_slow.backward(g)
        assert torch.equal(xs[0].grad, xs[1].grad)
        assert torch.equal(fast.weight.grad, slow.weight.grad)
        assert torch.equal(fast.bias.grad, slow.bias.grad)
        if with_residual:
            assert torch.equal(rs[0].grad, rs[1].grad)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(fast, name), getattr(slow, name)), name
    # the common call took the short path (the reference backend folds nothing: its update
    # runs on its own, still on the short path)
    assert taken == [True] * 3


def test_the_functional_api_takes_it_too(cpu_backend, monkeypatch):
    taken = _count_fast(monkeypatch)
    rm, rv = torch.zeros(3), torch.ones(3)
    w = torch.ones(3, requires_grad=True)
    y = batchnorm.functional.batch_norm(torch.randn(4, 3, 5), rm, rv, w, None, training=True)
    assert taken == [True] and y.requires_grad and not torch.equal(rm, torch.zeros(3))


def test_double_backward_matches_the_general_path(cpu_backend):
    fast = batchnorm.BatchNorm2d(3, dtype=torch.float64, activation="relu")
    slow = batchnorm.BatchNorm2d(3, dtype=torch.float64, activation="relu")
    slow.load_state_dict(fast.state_dict())
    x0 = torch.randn(4, 3, 2, 5, dtype=torch.float64)
    grads = []
    for run in (lambda x: fast(x), lambda x: _general(slow, x)):
        x = x0.clone().requires_grad_()
        (gx,) = torch.autograd.grad(run(x).pow(2).sum(), x, create_graph=True)
        (ggx,) = torch.autograd.grad(gx.sin().sum(), x)
        grads.append((gx.detach(), ggx))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grad_fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("input_kind", ["channels_last", "contiguous", "strided_slice"])
def test_gradients_in_any_memory_format(cpu_backend, monkeypatch, grad_fmt, input_kind):
    """The backend reads the user's tensors directly where their memory is in the layout's
    order, and through a copy where not (a gradient in the other memory format, an input the
    forward had to make dense): the same numbers and strides as the general path either way."""
    taken = _count_fast(monkeypatch)
    fast = batchnorm.BatchNorm2d(6, activation="hardswish")
    slow = batchnorm.BatchNorm2d(6, activation="hardswish")
    slow.load_state_dict(fast.state_dict())
    base = torch.randn(4, 6, 5, 8) * 3 + 1
    if input_kind == "channels_last":
        base = base.contiguous(memory_format=torch.channels_last)
    xs = [base.clone(memory_format=torch.preserve_format).requires_grad_() for _ in range(2)]
    inputs = [x[:, :, :, ::2] if input_kind == "strided_slice" else x for x in xs]
    y_fast, y_slow = fast(inputs[0]), _general(slow, inputs[1])
    assert torch.equal(y_fast, y_slow) and y_fast.stride() == y_slow.stride()
    g = torch.randn(y_fast.shape).contiguous(memory_format=grad_fmt)
    y_fast.backward(g)
    y_slow.backward(g)
    assert torch.equal(xs[0].grad, xs[1].grad)
    assert xs[0].grad.stride() == xs[1].grad.stride()
    assert torch.equal(fast.weight.grad, slow.weight.grad)
    assert torch.equal(fast.bias.grad, slow.bias.grad)
    assert taken == [True]


@pytest.mark.parametrize("cls,shape,fmt", CASES)
@pytest.mark.parametrize("activation", [None, "relu", "hardswish"])
@pytest.mark.parametrize("how", ["no_grad", "no_leaf_needs_grad"])
def test_without_a_graph_same_numbers_and_no_node(cpu_backend, monkeypatch, cls, shape, fmt,
                                                  activation, how):
    """Nothing to differentiate (``no_grad``, or no input needing a gradient, as in a
    recalibration pass): the short path runs the kernels with no autograd Function, and gives
    the general path's output (values and strides), running statistics and counters."""
    taken = _count_fast(monkeypatch)
    fast = cls(shape[1], activation=activation, affine=how == "no_grad")
    slow = cls(shape[1], activation=activation, affine=how == "no_grad")
    slow.load_state_dict(fast.state_dict())
    for step in range(3):
        x = torch.randn(shape) * (step + 2) + 3 * step
        if fmt is not None:
            x = x.to(memory_format=fmt)
        if how == "no_grad":
            x.requires_grad_()
            with torch.no_grad():
                y_fast, y_slow = fast(x), _general(slow, x)
        else:
            y_fast, y_slow = fast(x), _general(slow, x)
        assert torch.equal(y_fast, y_slow)
        assert y_fast.stride() == y_slow.stride()
        assert not y_fast.requires_grad and y_fast.grad_fn is None
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(fast, name), getattr(slow, name)), name
    assert taken == [True] * 3


def _declined(layer, x, **kw):
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    rm, rv = layer.running_mean, layer.running_var
    y = fast_train.train(x, layer.weight, layer.bias, kw.get("residual"), rm, rv,
                         layer.num_batches_tracked, layer.num_batches_skipped,
                         kw.get("momentum", layer.momentum), kw.get("eps", layer.eps),
                         kw.get("act", "none"), 0.0, lambda: "layer")
    after = layer.state_dict()
    unchanged = all(torch.equal(before[k], after[k]) for k in before)
    return y is None and unchanged


def test_declines_what_it_does_not_handle(cpu_backend):
    layer = batchnorm.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    assert _declined(layer, x, momentum=None)  # cumulative average
    assert _declined(layer, x, momentum=float("nan"))
    assert _declined(layer, x, eps=0.0)
    assert _declined(layer, x, eps=1)  # not a float: the general path's checks
    assert _declined(layer, torch.randn(1, 3, 1, 1, requires_grad=True))  # one value per channel
    assert _declined(layer, torch.randn(0, 3, 2, 2, requires_grad=True))  # empty
    assert _declined(layer, x.double())  # parameters of another dtype: the general path's error
    assert _declined(layer, torch.randn(4, 5, 2, 2, requires_grad=True))  # wrong channels
    assert _declined(layer, x.bfloat16())
    assert _declined(layer, x, residual=torch.randn(4, 3, 2, 1))
    if cpu_backend == "cpu":  # SiLU is not fused by the Numba kernels: layer, then the op
        assert _declined(layer, x, act="silu")
    with torch.inference_mode():  # inference tensors: the general path's rules
        assert _declined(layer, x)


def test_bad_input_still_gets_the_general_paths_errors(cpu_backend):
    rm, rv = torch.zeros(5), torch.ones(5)
    for x in (torch.randn(5, requires_grad=True), torch.tensor(3.0, requires_grad=True)):
        assert fast_train.train(x, None, None, None, rm, rv, None, None, 0.1, 1e-5, "none", 0.0,
                                lambda: None) is None
        with pytest.raises(ValueError, match="at least 2 dimensions"):
            functional.batch_norm(x, rm, rv, training=True)
    layer = batchnorm.BatchNorm2d(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3, 1, 1, requires_grad=True))
    layer.weight.data = torch.ones(4)
    with pytest.raises(ValueError, match="weight"):
        layer(torch.randn(4, 3, 2, 2, requires_grad=True))
    assert layer.num_batches_tracked.item() == 0


def test_non_finite_batch_is_skipped_and_reported(cpu_backend, monkeypatch):
    taken = _count_fast(monkeypatch)
    layer = batchnorm.BatchNorm2d(3)
    layer(torch.randn(4, 3, 2, 2, requires_grad=True))
    mean, var = layer.running_mean.clone(), layer.running_var.clone()
    x = torch.randn(4, 3, 2, 2)
    x[0, 1, 0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(x.requires_grad_())
    assert any(issubclass(w.category, NonFiniteBatchWarning) for w in caught)
    assert torch.equal(layer.running_mean, mean) and torch.equal(layer.running_var, var)
    assert layer.num_batches_tracked.item() == 1 and layer.skipped_updates == 1
    assert taken == [True, True]


def test_a_memory_mode_set_after_construction_takes_the_general_path(cpu_backend):
    """``inplace``/``save`` changed on a built layer: the general path's mode check still runs
    (the short path handles only ``save="input"`` without ``inplace``)."""
    layer = batchnorm.BatchNorm2d(3)
    layer.inplace = True
    with pytest.raises(ValueError, match="inplace: True needs save='output'"):
        layer(torch.randn(4, 3, 2, 2, requires_grad=True))
    assert layer.num_batches_tracked.item() == 0


def test_the_layer_reads_a_changed_activation(cpu_backend):
    """The layer keeps its parsed activation while the spec is the same object; a new spec
    (or a module, parsed on every call) takes effect on the next call."""
    layer = batchnorm.BatchNorm1d(5, activation="relu")
    x = torch.randn(16, 5, requires_grad=True)
    assert (layer(x) >= 0).all()
    layer.activation = None
    assert (layer(x) < 0).any()
    slope = torch.nn.LeakyReLU(0.5)
    layer.activation = slope
    y1 = layer(x)
    slope.negative_slope = 0.25
    y2 = layer(x)
    neg = y1 < 0
    assert neg.any() and torch.allclose(y2[neg] * 2, y1[neg], rtol=1e-3, atol=1e-3)


def test_the_folded_update_counts_the_batch_and_moves_the_versions(cpu_backend):
    """The short path counts the batch and moves every buffer's version counter, as torch's
    in-place ops would (the blend writes through NumPy views)."""
    layer = batchnorm.BatchNorm2d(3)
    buffers = (layer.running_mean, layer.running_var, layer.num_batches_tracked)
    before = [t._version for t in buffers]
    for step in range(1, 4):
        layer(torch.randn(4, 3, 2, 2, requires_grad=True))
        assert layer.num_batches_tracked.item() == step
        after = [t._version for t in buffers]
        assert all(a > b for a, b in zip(after, before, strict=True))
        before = after
    assert layer.num_batches_skipped.item() == 0
