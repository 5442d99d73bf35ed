"""Bad input: a clear error naming the argument, the same type PyTorch raises, no state change."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import batchnorm
import batchnorm.functional as BF


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _unchanged(m, snap):
    for k, v in m.state_dict().items():
        assert torch.equal(v, snap[k]), f"{k} changed on a rejected call"


CASES = [
    # (module, input, exception types that both we and PyTorch must be instances of, message part)
    (lambda: batchnorm.BatchNorm2d(3), torch.randn(2, 3, 4), ValueError, "expected 4D input"),
    (lambda: batchnorm.BatchNorm1d(3), torch.randn(2, 3, 4, 4), ValueError, "expected 2D or 3D"),
    (lambda: batchnorm.BatchNorm3d(3), torch.randn(2, 3, 4, 4), ValueError, "expected 5D input"),
    (lambda: batchnorm.BatchNorm2d(3), torch.randn(2, 4, 3, 3), RuntimeError, "channels"),
    (lambda: batchnorm.BatchNorm1d(3), torch.randn(1, 3), ValueError,
     "Expected more than 1 value per channel when training"),
    (lambda: batchnorm.BatchNorm2d(3), torch.randn(1, 3, 1, 1), ValueError,
     "Expected more than 1 value per channel when training"),
]


@pytest.mark.parametrize("make,x,exc,text", CASES)
def test_module_errors_match_torch_type_and_keep_state(make, x, exc, text):
    m = make()
    m(torch.randn(4, 3, *x.shape[2:]) if x.shape[1] == 3 and x.dim() == m._dims[0] else
      torch.randn(4, 3, *([2] * (m._dims[0] - 2))))
    snap = _snapshot(m)
    with pytest.raises(exc, match=text):
        m(x)
    _unchanged(m, snap)
    theirs = getattr(torch.nn, type(m).__name__)(3)
    with pytest.raises(exc):
        theirs(x)


def test_channel_mismatch_is_value_error_and_runtime_error():
    m = batchnorm.BatchNorm2d(3)
    with pytest.raises(ValueError, match="expected 3 channels"):
        m(torch.randn(2, 4, 3, 3))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_and_bool_input(dtype):
    m = batchnorm.BatchNorm1d(3)
    snap = _snapshot(m)
    with pytest.raises(TypeError, match="input: expected a floating-point tensor"):
        m(torch.ones(4, 3, dtype=dtype))
    _unchanged(m, snap)
    with pytest.raises(RuntimeError):  # PyTorch's own type for the same call
        BF.batch_norm(torch.ones(4, 3, dtype=dtype), None, None, training=True)


def test_eps():
    x = torch.randn(4, 3)
    for eps in (0.0, -1.0):
        with pytest.raises(ValueError, match="eps must be positive during training"):
            BF.batch_norm(x, None, None, training=True, eps=eps)
        with pytest.raises(ValueError, match="eps must be positive during training"):
            F.batch_norm(x, None, None, training=True, eps=eps)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        BF.batch_norm(x, torch.zeros(3), torch.ones(3), training=False, eps=-1.0)
    BF.batch_norm(x, torch.zeros(3), torch.ones(3), training=False, eps=0.0)  # allowed, as in torch
    with pytest.raises(ValueError, match="eps"):
        batchnorm.BatchNorm1d(3, eps=-1e-5)
    with pytest.raises(TypeError, match="eps"):
        batchnorm.BatchNorm1d(3, eps="small")


def test_constructor_arguments():
    with pytest.raises(TypeError, match="num_features"):
        batchnorm.BatchNorm2d(3.0)
    with pytest.raises(ValueError, match="num_features"):
        batchnorm.BatchNorm2d(0)
    with pytest.raises(TypeError, match="momentum"):
        batchnorm.BatchNorm2d(3, momentum="fast")
    with pytest.raises(ValueError, match="activation"):
        batchnorm.BatchNorm2d(3, activation="softplus")
    with pytest.raises(ValueError, match="activation"):
        batchnorm.BatchNorm2d(3, activation=torch.nn.Softplus())
    assert batchnorm.BatchNorm2d(3, activation=torch.nn.LeakyReLU(0.3)).activation == (
        "leaky_relu", 0.3)


@pytest.mark.parametrize("arg", ["running_mean", "running_var", "weight", "bias"])
def test_parameter_shape_device_dtype(arg):
    x = torch.randn(4, 3, 2)
    good = dict(running_mean=torch.zeros(3), running_var=torch.ones(3), weight=torch.ones(3),
                bias=torch.zeros(3))
    for bad, exc, text in (
        (torch.ones(4), RuntimeError, "should contain 3 elements not 4"),
        (torch.ones(3, dtype=torch.float64), TypeError, "expected dtype torch.float32"),
        (torch.ones(3, device="meta"), RuntimeError, "device"),
        ([1.0, 1.0, 1.0], TypeError, "torch.Tensor"),
    ):
        kw = dict(good)
        kw[arg] = bad
        rm_before = good["running_mean"].clone()
        with pytest.raises(exc, match=text) as info:
            BF.batch_norm(x, kw["running_mean"], kw["running_var"], kw["weight"], kw["bias"],
                          training=True)
        assert arg in str(info.value)
        assert torch.equal(good["running_mean"], rm_before)


def test_eval_requires_running_stats():
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        BF.batch_norm(torch.randn(4, 3), None, None, training=False)


def test_residual_checks():
    x = torch.randn(4, 3, 2)
    with pytest.raises(ValueError, match="residual: expected the shape"):
        BF.batch_norm(x, None, None, training=True, residual=torch.randn(4, 3, 3))
    with pytest.raises(TypeError, match="residual: expected dtype"):
        BF.batch_norm(x, None, None, training=True, residual=torch.randn(4, 3, 2).double())
    with pytest.raises(TypeError, match="residual"):
        BF.batch_norm(x, None, None, training=True, residual=1.0)


def test_input_not_a_tensor_and_momentum_type():
    with pytest.raises(TypeError, match="input: expected a torch.Tensor"):
        batchnorm.BatchNorm1d(3)([[1.0, 2.0, 3.0]])
    with pytest.raises(TypeError, match="momentum"):
        BF.batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True,
                      momentum=None)


def test_forced_unknown_backend(monkeypatch):
    monkeypatch.setenv("BATCHNORM_BACKEND", "opencl")
    with pytest.raises(ValueError, match="BATCHNORM_BACKEND"):
        BF.batch_norm(torch.randn(4, 3), None, None, training=True)
