"""``batchnorm.functional.batch_norm`` and our modules over PyTorch's own sample inputs.

PyTorch's test suite describes the inputs of ``torch.nn.functional.batch_norm`` (the op_db entry
``nn.functional.batch_norm``) and of ``nn.BatchNorm1d/2d/3d`` (module_db). Every input PyTorch
accepts, ours accepts, with the same output (values in the dtype's tolerance, shape, dtype,
memory format), running statistics and gradients; an input PyTorch refuses may be refused too.
The deliberate differences (tests/test_torch_parity.py, README) do not arise on these inputs.
``torch.testing._internal`` needs the ``expecttest`` package (in the test extra).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import batchnorm
import batchnorm.functional as BF
from tests.oracle import GRAD_TOL, TOL

pytest.importorskip("expecttest", reason="torch.testing._internal imports it")
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import module_db  # noqa: E402

OP = next(op for op in op_db if op.name == "nn.functional.batch_norm")
OURS = {torch.nn.BatchNorm1d: batchnorm.BatchNorm1d, torch.nn.BatchNorm2d: batchnorm.BatchNorm2d,
        torch.nn.BatchNorm3d: batchnorm.BatchNorm3d}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _clone(v):
    return v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) \
        else v


def _call(fn, args, kwargs):
    try:
        return fn(*args, **kwargs), None
    except Exception as exc:  # noqa: BLE001 (both sides' exceptions are compared)
        return None, exc


def _same_output(ours: torch.Tensor, theirs: torch.Tensor, dtype: torch.dtype) -> None:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    if theirs.dim() >= 3 and theirs.numel() > 1:
        for fmt in (torch.channels_last, torch.channels_last_3d, torch.contiguous_format):
            try:
                keeps = theirs.is_contiguous(memory_format=fmt)
            except RuntimeError:
                continue
            if keeps:
                assert ours.is_contiguous(memory_format=fmt), fmt
                break
    torch.testing.assert_close(ours, theirs, **TOL[dtype], equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_functional_over_torch_sample_inputs(cpu_backend, dtype):
    samples = list(OP.sample_inputs("cpu", dtype, requires_grad=dtype in (torch.float32,
                                                                          torch.float64)))
    assert samples
    for sample in samples:
        what = f"{dtype} input {tuple(sample.input.shape)} args " \
            f"{[tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in sample.args]} " \
            f"{sample.kwargs}"
        theirs_in = [_clone(sample.input), *map(_clone, sample.args)]
        ours_in = [_clone(sample.input), *map(_clone, sample.args)]
        theirs, their_error = _call(F.batch_norm, theirs_in, sample.kwargs)
        ours, our_error = _call(BF.batch_norm, ours_in, sample.kwargs)
        if their_error is None:
            assert our_error is None, f"{what}: PyTorch accepts it, ours raised {our_error!r}"
        if ours is None or theirs is None:
            continue
        _same_output(ours, theirs, dtype)
        for got, want in zip(ours_in[1:3], theirs_in[1:3], strict=True):  # running statistics
            if isinstance(want, torch.Tensor):
                torch.testing.assert_close(got, want, **TOL[dtype], equal_nan=True)
        if theirs.requires_grad:
            grad = torch.randn_like(theirs)
            theirs.backward(grad)
            ours.backward(grad)
            for got, want in zip(ours_in, theirs_in, strict=True):
                if isinstance(want, torch.Tensor) and want.grad is not None:
                    torch.testing.assert_close(got.grad, want.grad, **GRAD_TOL[dtype])


@pytest.mark.parametrize("torch_cls", list(OURS), ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_modules_over_torch_module_inputs(cpu_backend, torch_cls, dtype, training):
    info = next(m for m in module_db if m.module_cls is torch_cls)
    inputs = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True,
                                     training=training)
    assert inputs
    for sample in inputs:
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        theirs = torch_cls(*args, **kwargs).to(dtype).train(training)
        ours = OURS[torch_cls](*args, **kwargs).to(dtype).train(training)
        ours.load_state_dict(theirs.state_dict())
        fin = sample.forward_input
        t_in, o_in = list(map(_clone, fin.args)), list(map(_clone, fin.args))
        want, their_error = _call(theirs, t_in, fin.kwargs)
        got, our_error = _call(ours, o_in, fin.kwargs)
        if their_error is None:
            assert our_error is None, f"{sample.desc}: PyTorch accepts it, ours raised " \
                f"{our_error!r}"
        if got is None or want is None:
            continue
        _same_output(got, want, dtype)
        for name, buf in theirs.named_buffers():
            torch.testing.assert_close(getattr(ours, name), buf, **TOL[dtype])
        grad = torch.randn_like(want)
        want.backward(grad)
        got.backward(grad)
        torch.testing.assert_close(o_in[0].grad, t_in[0].grad, **GRAD_TOL[dtype])
        for (name, p), q in zip(theirs.named_parameters(), ours.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, **GRAD_TOL[dtype], msg=name)


def test_empty_1d_input_like_torch():
    """The op_db case that used to differ: a 1-D input of shape (0,) with empty running
    statistics gives an empty result (training or not), differentiably, and changes nothing."""
    for training in (True, False):
        x = torch.randn(0, requires_grad=True)
        rm, rv = torch.zeros(0), torch.ones(0)
        y = BF.batch_norm(x, rm, rv, training=training)
        assert y.shape == (0,) and y.dtype == x.dtype
        y.sum().backward()
        assert x.grad is not None and x.grad.shape == (0,)
    with pytest.raises(ValueError, match="eps"):
        BF.batch_norm(torch.randn(0), None, None, training=True, eps=-1.0)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        BF.batch_norm(torch.randn(3), torch.zeros(3), torch.ones(3))  # PyTorch refuses it too
