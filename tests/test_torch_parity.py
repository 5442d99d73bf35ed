"""PyTorch's own BatchNorm tests, ported to run against batchnorm's modules and functional.

Sources (pytorch/pytorch): ``test/test_nn.py`` (``test_batchnorm_*``, ``_test_batchnorm_*``,
``test_BatchNorm_empty``, ``test_convert_sync_batchnorm``), ``test/test_modules.py`` (the generic
ModuleInfo tests, driven by ``module_inputs_torch_nn_BatchNorm{1,2,3}d`` and
``module_error_inputs_torch_nn_BatchNorm1d_2d_3d`` of ``torch/testing/_internal/
common_modules.py``), ``test/nn/test_load_state_dict.py`` and ``test/test_stateless.py``.
Only the CPU-relevant assertions are kept. Where PyTorch's test compares against a reference,
the reference here is PyTorch's own module on identical inputs and state.

Where batchnorm differs on purpose (a negative ``eps`` refused in the constructor, the extra
non-persistent ``num_batches_skipped`` buffer, ``SyncBatchNorm`` not subclassing PyTorch's, a
clear error from ``torch.jit.script``/``torch.jit.trace``), the test asserts batchnorm's
behaviour and its docstring says why.
"""

from __future__ import annotations

import copy
import io
import pickle
from functools import partial
from itertools import chain, product

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import batchnorm
import batchnorm.functional as BF

# --------------------------------------------------------------------------------------------
# Backends and pairs

OURS = {
    nn.BatchNorm1d: batchnorm.BatchNorm1d,
    nn.BatchNorm2d: batchnorm.BatchNorm2d,
    nn.BatchNorm3d: batchnorm.BatchNorm3d,
    nn.SyncBatchNorm: batchnorm.SyncBatchNorm,
}


def _randomize(m: nn.Module) -> None:
    if getattr(m, "weight", None) is not None:
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
    if getattr(m, "bias", None) is not None:
        with torch.no_grad():
            m.bias.uniform_(-1.0, 1.0)


def _twins(torch_cls, *args, dtype=torch.float32, **kwargs):
    """(ours, theirs) built with the same arguments and holding the same state."""
    theirs = torch_cls(*args, **kwargs).to(dtype)
    _randomize(theirs)
    ours = OURS[torch_cls](*args, **kwargs).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _assert_same_state(ours: nn.Module, theirs: nn.Module, **tol) -> None:
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert sd_ours.keys() == sd_theirs.keys()
    for k, v in sd_theirs.items():
        assert sd_ours[k].dtype == v.dtype, k
        torch.testing.assert_close(sd_ours[k], v, msg=k, **tol)


# --------------------------------------------------------------------------------------------
# torch/testing/_internal/common_modules.py: module_inputs_torch_nn_BatchNorm{1,2,3}d
# (torch class, constructor args, constructor kwargs, input shape, desc)

MODULE_INPUTS = [
    (nn.BatchNorm1d, (10,), {}, (4, 10), "1d_affine"),
    (nn.BatchNorm1d, (5,), {}, (4, 5, 3), "1d_3d_input"),
    (nn.BatchNorm1d, (10, 1e-3, None), {}, (4, 10), "1d_affine_simple_average"),
    (nn.BatchNorm1d, (10, 1e-3, 0.3, False), {}, (4, 10), "1d_not_affine"),
    (nn.BatchNorm1d, (10, 1e-3, 0.3, True, False), {}, (4, 10), "1d_not_tracking_stats"),
    (nn.BatchNorm1d, (5, 1e-3, 0.3, False), {}, (4, 5, 3), "1d_3d_input_not_affine"),
    (nn.BatchNorm1d, (5, 1e-3, 0.3, False), {}, (0, 5, 9), "1d_zero_batch"),
    (nn.BatchNorm1d, (10,), {"bias": False}, (4, 10), "1d_affine_not_bias"),
    (nn.BatchNorm2d, (3,), {}, (2, 3, 6, 6), "2d"),
    (nn.BatchNorm2d, (3, 1e-3, None), {}, (2, 3, 6, 6), "2d_simple_average"),
    (nn.BatchNorm2d, (3, 1e-3, 0.8), {}, (2, 3, 6, 6), "2d_momentum"),
    (nn.BatchNorm2d, (3, 1e-3, 0.8, False), {}, (2, 3, 6, 6), "2d_not_affine"),
    (nn.BatchNorm2d, (3, 1e-3, 0.8, True, False), {}, (2, 3, 6, 6), "2d_not_tracking_stats"),
    (nn.BatchNorm2d, (5, 1e-3, 0.3, False), {}, (0, 5, 2, 2), "2d_zero_batch"),
    (nn.BatchNorm2d, (3,), {"bias": False}, (2, 3, 6, 6), "2d_affine_not_bias"),
    (nn.BatchNorm3d, (3,), {}, (2, 3, 4, 4, 4), "3d"),
    (nn.BatchNorm3d, (3, 1e-3, None), {}, (2, 3, 4, 4, 4), "3d_simple_average"),
    (nn.BatchNorm3d, (3, 1e-3, 0.7), {}, (2, 3, 4, 4, 4), "3d_momentum"),
    (nn.BatchNorm3d, (3, 1e-3, 0.7, False), {}, (2, 3, 4, 4, 4), "3d_not_affine"),
    (nn.BatchNorm3d, (3, 1e-3, 0.7, True, False), {}, (2, 3, 4, 4, 4), "3d_not_tracking_stats"),
    (nn.BatchNorm3d, (5, 1e-3, 0.3, False), {}, (0, 5, 2, 2, 2), "3d_zero_batch"),
    (nn.BatchNorm3d, (3,), {"bias": False}, (2, 3, 4, 4, 4), "3d_affine_not_bias"),
]
MI_IDS = [case[-1] for case in MODULE_INPUTS]
# the small ones (and one 4D), for the slower double-backward checks
GRAD_INPUTS = [c for c in MODULE_INPUTS
               if c[-1] in ("1d_affine", "1d_3d_input", "1d_affine_simple_average",
                            "1d_not_tracking_stats", "1d_zero_batch", "1d_affine_not_bias",
                            "2d_not_affine")]


def _make_input(shape, dtype=torch.float32, requires_grad=False):
    # make_tensor's default range for floats is [-9, 9]
    x = torch.empty(shape, dtype=dtype).uniform_(-9, 9)
    return x.requires_grad_(requires_grad)


@pytest.mark.parametrize("torch_cls,args,kwargs,shape,desc", MODULE_INPUTS, ids=MI_IDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_modules_forward_matches_torch(cpu_backend, torch_cls, args, kwargs, shape, desc, training,
                                       dtype):
    """test_modules.py::test_forward, with PyTorch's module as the reference: outputs, input
    and parameter gradients and every state_dict entry, over two steps; then the
    ``.float()``/``.double()`` method call keeps parameters and floating buffers in the dtype."""
    ours, theirs = _twins(torch_cls, *args, dtype=dtype, **kwargs)
    ours.train(training)
    theirs.train(training)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    for _ in range(2):
        x0 = _make_input(shape, dtype)
        x1, x2 = x0.clone().requires_grad_(), x0.clone().requires_grad_()
        y1, y2 = ours(x1), theirs(x2)
        torch.testing.assert_close(y1, y2, **tol)
        g = torch.randn_like(y2)
        y1.backward(g)
        y2.backward(g)
        torch.testing.assert_close(x1.grad, x2.grad, **tol)
        for p1, p2 in zip(ours.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(p1.grad, p2.grad, **tol)
        _assert_same_state(ours, theirs, **tol)
    method = "float" if dtype == torch.float32 else "double"
    getattr(ours, method)()
    ours(_make_input(shape, dtype))
    for name, t in chain(ours.named_parameters(), ours.named_buffers()):
        assert t.device.type == "cpu", name
        if t.dtype.is_floating_point:
            assert t.dtype == dtype, name


@pytest.mark.parametrize("torch_cls,args,kwargs,shape,desc", MODULE_INPUTS, ids=MI_IDS)
@pytest.mark.parametrize("device,dtype", [("cpu", torch.float64), ("meta", torch.float32),
                                          ("cpu", torch.bfloat16)])
def test_modules_factory_kwargs(torch_cls, args, kwargs, shape, desc, device, dtype):
    """test_modules.py::test_factory_kwargs: device/dtype reach every parameter and floating
    buffer; the parameters and state_dict entries are PyTorch's (names, shapes, dtypes)."""
    ours = OURS[torch_cls](*args, **kwargs, device=device, dtype=dtype)
    theirs = torch_cls(*args, **kwargs, device=device, dtype=dtype)
    for name, t in chain(ours.named_parameters(), ours.named_buffers()):
        assert t.device.type == device, name
        if t.dtype.is_floating_point:
            assert t.dtype == dtype, name
    meta = lambda items: [(n, t.shape, t.dtype, t.requires_grad, t.device) for n, t in items]
    assert meta(ours.named_parameters()) == meta(theirs.named_parameters())
    assert meta(ours.state_dict(keep_vars=True).items()) == meta(
        theirs.state_dict(keep_vars=True).items())


@pytest.mark.parametrize("torch_cls,args,kwargs,shape,desc", MODULE_INPUTS, ids=MI_IDS)
def test_modules_device_ctx_init(torch_cls, args, kwargs, shape, desc):
    """test_modules.py::test_device_ctx_init: built under ``torch.device('meta')`` every
    parameter and buffer is a meta tensor with the metadata of the CPU-built one."""
    from torch._subclasses.meta_utils import assert_metadata_eq

    cls = OURS[torch_cls]
    m_cpu = cls(*args, **kwargs)
    with torch.device("meta"):
        m = cls(*args, **kwargs)
    for p_meta, p_cpu in chain(zip(m.parameters(), m_cpu.parameters(), strict=True),
                               zip(m.buffers(), m_cpu.buffers(), strict=True)):
        assert p_meta.is_meta

        def assert_equal(a, b, msg=None):
            assert a == b, msg

        assert_metadata_eq(assert_equal, p_meta, p_cpu)


@pytest.mark.parametrize("torch_cls,args,kwargs,shape,desc", MODULE_INPUTS, ids=MI_IDS)
def test_modules_repr(torch_cls, args, kwargs, shape, desc):
    """test_modules.py::test_repr, stricter: ``repr``/``str``/``extra_repr`` are PyTorch's."""
    ours, theirs = OURS[torch_cls](*args, **kwargs), torch_cls(*args, **kwargs)
    assert repr(ours) == repr(theirs)
    assert str(ours) == str(theirs)
    assert ours.extra_repr() == theirs.extra_repr()


def test_sync_batchnorm_repr_and_constructor():
    for kw in ({}, {"momentum": None, "affine": False},
               {"track_running_stats": False, "eps": 1e-3}):
        ours, theirs = batchnorm.SyncBatchNorm(4, **kw), nn.SyncBatchNorm(4, **kw)
        assert repr(ours) == repr(theirs)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        assert ours.process_group is None and theirs.process_group is None


@pytest.mark.parametrize("torch_cls,args,kwargs,shape,desc", MODULE_INPUTS, ids=MI_IDS)
@pytest.mark.parametrize("training", [True, False])
def test_modules_pickle(torch_cls, args, kwargs, shape, desc, training):
    """test_modules.py::test_pickle: the unpickled module gives the same output (torch.save,
    plain pickle and deepcopy), and carries the same state."""
    m = OURS[torch_cls](*args, **kwargs)
    _randomize(m)
    m.train(training)
    x = _make_input(shape)
    out = m(x)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    copies = [torch.load(buf, weights_only=False), pickle.loads(pickle.dumps(m)),
              copy.deepcopy(m)]
    expected_state = {k: v.clone() for k, v in m.state_dict().items()}
    for c in copies:
        assert type(c) is type(m) and c.training == training
        for k, v in expected_state.items():
            assert torch.equal(c.state_dict()[k], v), k
        torch.testing.assert_close(c(x), out)


def _make_non_contiguous(t: torch.Tensor) -> torch.Tensor:
    out = torch.repeat_interleave(t, 2, dim=-1)
    out = out[..., ::2].detach()
    out.requires_grad = t.requires_grad
    return out


@pytest.mark.parametrize("torch_cls,args,kwargs,shape,desc", MODULE_INPUTS, ids=MI_IDS)
@pytest.mark.parametrize("training", [True, False])
def test_modules_non_contiguous_tensors(cpu_backend, torch_cls, args, kwargs, shape, desc,
                                        training):
    """test_modules.py::test_non_contiguous_tensors: contiguous and non-contiguous inputs and
    output gradients (all four combinations) give the same output and gradients."""
    m = OURS[torch_cls](*args, **kwargs)
    _randomize(m)
    m.train(training)
    x = _make_input(shape, requires_grad=True)
    default_output = m(x)
    grad_output = default_output.clone().detach_().normal_()
    default_output.backward(grad_output, retain_graph=True)
    default_input_grad = x.grad.clone()
    default_param_grad = [p.grad.clone() for p in m.parameters()]

    nc_x = _make_non_contiguous(x)
    nc_grad = _make_non_contiguous(grad_output)
    if x.numel():
        assert not nc_x.is_contiguous()
    for in_x, g_out in product([x, nc_x], [grad_output, nc_grad]):
        in_x.grad = None
        m.zero_grad()
        out = m(in_x)
        out.backward(g_out.clone(), retain_graph=True)
        torch.testing.assert_close(out, default_output)
        torch.testing.assert_close(in_x.grad, default_input_grad, atol=1e-4, rtol=0)
        for p, g in zip(m.parameters(), default_param_grad, strict=True):
            torch.testing.assert_close(p.grad, g)


def _gradients_helper(torch_cls, args, kwargs, shape, training, check):
    """test_modules.py::_test_gradients_helper: total derivative over input and parameters,
    then the partial derivative for each parameter alone."""
    m = OURS[torch_cls](*args, **kwargs).to(torch.float64)
    _randomize(m)
    m.train(training)
    x = _make_input(shape, torch.float64, requires_grad=True)
    params = tuple(m.parameters())

    def fn(*inputs):
        return m(inputs[0])

    assert check(fn, (x, *params))
    for p in params:
        p.requires_grad = False
    for p in params:
        p.requires_grad = True
        assert check(fn, (x, *params))
        p.requires_grad = False


@pytest.mark.parametrize("torch_cls,args,kwargs,shape,desc", MODULE_INPUTS, ids=MI_IDS)
@pytest.mark.parametrize("training", [True, False])
def test_modules_grad(torch_cls, args, kwargs, shape, desc, training):
    """test_modules.py::test_grad (gradcheck, float64), default backend selection."""
    _gradients_helper(torch_cls, args, kwargs, shape, training, gradcheck)


@pytest.mark.parametrize("torch_cls,args,kwargs,shape,desc", GRAD_INPUTS,
                         ids=[c[-1] for c in GRAD_INPUTS])
@pytest.mark.parametrize("training", [True, False])
def test_modules_grad_per_backend(cpu_backend, torch_cls, args, kwargs, shape, desc, training):
    """test_modules.py::test_grad on each forced CPU backend (the smaller inputs)."""
    _gradients_helper(torch_cls, args, kwargs, shape, training, gradcheck)


@pytest.mark.parametrize("torch_cls,args,kwargs,shape,desc", GRAD_INPUTS,
                         ids=[c[-1] for c in GRAD_INPUTS])
@pytest.mark.parametrize("training", [True, False])
def test_modules_gradgrad(torch_cls, args, kwargs, shape, desc, training):
    """test_modules.py::test_gradgrad (gradgradcheck, float64)."""
    _gradients_helper(torch_cls, args, kwargs, shape, training, gradgradcheck)


def _mem_formats(x: torch.Tensor):
    if x.dim() == 4:
        return ([torch.contiguous_format, torch.channels_last],
                [torch.preserve_format, torch.contiguous_format, torch.channels_last])
    if x.dim() == 5:
        return ([torch.contiguous_format, torch.channels_last_3d],
                [torch.preserve_format, torch.contiguous_format, torch.channels_last_3d])
    return [torch.contiguous_format], [torch.preserve_format, torch.contiguous_format]


def _check_out_mem_format(t: torch.Tensor, input_mem_format) -> None:
    if t.dim() == 4 and input_mem_format == torch.channels_last:
        assert t.is_contiguous(memory_format=torch.channels_last)
    elif t.dim() == 5 and input_mem_format == torch.channels_last_3d:
        assert t.is_contiguous(memory_format=torch.channels_last_3d)
    else:
        assert t.is_contiguous()


@pytest.mark.parametrize("torch_cls,args,kwargs,shape,desc", MODULE_INPUTS, ids=MI_IDS)
@pytest.mark.parametrize("training", [True, False])
def test_modules_memory_format(cpu_backend, torch_cls, args, kwargs, shape, desc, training):
    """test_modules.py::test_memory_format: every (input format, module format) pair gives the
    contiguous output and gradients, and output and input gradient keep the input's format."""
    m = OURS[torch_cls](*args, **kwargs)
    _randomize(m)
    m.train(training)
    x0 = _make_input(shape, requires_grad=True)
    desired = m(x0)
    params = tuple(m.parameters())
    ref_grad_out = torch.rand_like(desired)
    if training:
        ref_grads = torch.autograd.grad(desired, (x0, *params), ref_grad_out)
    input_formats, module_formats = _mem_formats(x0)
    for in_fmt in input_formats:
        x = x0.detach().clone().to(memory_format=in_fmt).requires_grad_()
        for mod_fmt in module_formats:
            m.to(memory_format=mod_fmt)
            out = m(x)
            torch.testing.assert_close(out, desired)
            _check_out_mem_format(out, in_fmt)
            if training:
                g = torch.empty_like(out).copy_(ref_grad_out)
                grads = torch.autograd.grad(out, (x, *params), g)
                # float32 sums over up to 128 values per channel in another order: PyTorch's
                # own CPU kernels differ by ~1e-5 here between formats as well
                torch.testing.assert_close(grads, ref_grads, rtol=1e-5, atol=1e-4)
                for gi in grads:
                    _check_out_mem_format(gi, in_fmt)


@pytest.mark.parametrize("torch_cls,args,kwargs,shape,desc", MODULE_INPUTS[:2] + MODULE_INPUTS[8:9],
                         ids=MI_IDS[:2] + MI_IDS[8:9])
def test_modules_train_and_eval_modes_differ(torch_cls, args, kwargs, shape, desc):
    """test_modules.py::test_if_train_and_eval_modes_differ (``train_and_eval_differ=True``):
    without the ``training`` attribute the forward fails on exactly that attribute."""
    m = OURS[torch_cls](*args, **kwargs)
    delattr(m, "training")
    with pytest.raises(AttributeError, match="'training'"):
        m(_make_input(shape))


ERROR_SHAPES = {nn.BatchNorm1d: (2, 10), nn.BatchNorm2d: (2, 10, 5, 5),
                nn.BatchNorm3d: (2, 10, 4, 4, 4)}


@pytest.mark.parametrize("torch_cls", list(ERROR_SHAPES), ids=lambda c: c.__name__)
def test_modules_errors_eps_zero_is_a_forward_error(torch_cls):
    """module_error_inputs_torch_nn_BatchNorm1d_2d_3d, eps=0.0: constructs, then the training
    forward raises ValueError 'eps must be positive' (and so does PyTorch's)."""
    x = _make_input(ERROR_SHAPES[torch_cls])
    for cls in (torch_cls, OURS[torch_cls]):
        m = cls(10, eps=0.0)
        with pytest.raises(ValueError, match="eps must be positive"):
            m(x)


@pytest.mark.parametrize("torch_cls", list(ERROR_SHAPES), ids=lambda c: c.__name__)
def test_modules_errors_negative_eps(torch_cls):
    """module_error_inputs_torch_nn_BatchNorm1d_2d_3d, eps=-1.0: PyTorch constructs the layer
    and its training forward raises. Ours refuses it in the constructor, on purpose: a negative
    eps is never valid (eval mode would take the square root of var - 1), and the error then
    points at the line that set it."""
    x = _make_input(ERROR_SHAPES[torch_cls])
    with pytest.raises(ValueError, match="eps must be positive"):
        torch_cls(10, eps=-1.0)(x)
    with pytest.raises(ValueError, match="eps: expected a non-negative float, got -1.0"):
        OURS[torch_cls](10, eps=-1.0)


# --------------------------------------------------------------------------------------------
# test/test_nn.py, TestNNDeviceType


def test_batchnorm_grad(cpu_backend):
    """_test_batchnorm_grad: gradcheck and gradgradcheck of F.batch_norm in float64, eval and
    training, on arange data with a zero running variance in channel 0 (eps=1e-4)."""
    bs, n_feat, size_feat = 4, 5, 6
    dtype = torch.double
    x = torch.arange(bs * n_feat * size_feat, requires_grad=True, dtype=dtype).view(
        bs, n_feat, size_feat)
    weight = torch.arange(1, n_feat + 1, requires_grad=True, dtype=dtype)
    bias = torch.arange(n_feat, requires_grad=True, dtype=dtype)
    running_mean = 1 - torch.arange(n_feat, dtype=dtype)
    running_var = 2 * torch.arange(n_feat, dtype=dtype)
    for training in [False, True]:
        def fn(x, w, b, training=training):
            return BF.batch_norm(x, running_mean, running_var, w, b, training, 0.1, 0.0001)

        assert gradcheck(fn, (x, weight, bias))
        assert gradgradcheck(fn, (x, weight, bias))


def _same_output_and_input_grad(first, second, data, grad, between=None):
    """``first(data)`` and ``second(data)`` agree in output and input gradient (``between``
    runs after the first call: a mode switch); returns the first output."""
    res1 = first(data)
    res1.backward(grad)
    grad1 = data.grad.clone()
    if between is not None:
        between()
    data.grad.zero_()
    res2 = second(data)
    res2.backward(grad)
    torch.testing.assert_close(res1, res2)
    torch.testing.assert_close(grad1, data.grad)
    return res1


def _test_batchnorm_eval(ndim, dtype, module_dtype=None):
    module_dtype = module_dtype or dtype
    module = batchnorm.BatchNorm1d(3).to(module_dtype)
    module.eval()
    data = torch.rand([3] * ndim, dtype=dtype, requires_grad=True)
    grad = torch.rand([3] * ndim, dtype=dtype)
    assert _same_output_and_input_grad(module, module, data, grad).dtype == dtype

    # track_running_stats=False: eval also uses the batch statistics
    module = batchnorm.BatchNorm1d(3, track_running_stats=False).to(module_dtype)
    data = torch.rand(4, 3, dtype=dtype, requires_grad=True)
    grad = torch.rand(4, 3, dtype=dtype)
    _same_output_and_input_grad(module, module, data, grad, between=module.eval)


# (input dtype, module dtype): PyTorch's float tests and its *_mixed variants (onlyCUDA there;
# the CPU supports the mix as well)
DTYPE_PAIRS = [(torch.float, torch.float), (torch.bfloat16, torch.float), (torch.half, torch.float)]
DTYPE_IDS = ["float", "bfloat16_mixed", "half_mixed"]


@pytest.mark.parametrize("dtype,module_dtype", DTYPE_PAIRS, ids=DTYPE_IDS)
def test_batchnorm_eval(cpu_backend, dtype, module_dtype):
    """test_batchnorm_eval and test_batchnorm_eval_mixed."""
    _test_batchnorm_eval(2, dtype, module_dtype)
    _test_batchnorm_eval(3, dtype, module_dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.half])
def test_batchnorm_nonaffine_half_input(dtype):
    """test_batchnorm_nonaffine_cuda_half_input (accelerators in PyTorch): reduced-precision
    input, float32 running statistics, no affine: the output keeps the input's dtype in
    training and eval, and matches PyTorch's CPU result."""
    x = torch.randn(16, 3, 24, 24).to(dtype)
    ours, theirs = _twins(nn.BatchNorm2d, 3, affine=False)
    for training in (True, False):
        ours.train(training)
        theirs.train(training)
        y = ours(x)
        assert y.dtype == dtype
        torch.testing.assert_close(y, theirs(x))
    _assert_same_state(ours, theirs)


def _test_batchnorm_affine(ndim, dtype, module_dtype=None):
    module_dtype = module_dtype or dtype
    module = batchnorm.BatchNorm1d(3, affine=False).to(module_dtype)
    module_affine = batchnorm.BatchNorm1d(3, affine=True).to(module_dtype)
    with torch.no_grad():
        module_affine.weight.fill_(1.0)
        module_affine.bias.zero_()
    data = torch.rand([3] * ndim, dtype=dtype, requires_grad=True)
    _same_output_and_input_grad(module_affine, module, data, torch.ones_like(data))


@pytest.mark.parametrize("dtype,module_dtype", DTYPE_PAIRS, ids=DTYPE_IDS)
def test_batchnorm_affine(cpu_backend, dtype, module_dtype):
    """test_batchnorm_affine and test_batchnorm_affine_mixed."""
    _test_batchnorm_affine(2, dtype, module_dtype)
    _test_batchnorm_affine(3, dtype, module_dtype)


def _test_batchnorm_simple_average(dtype, module_dtype=None):
    module_dtype = module_dtype or dtype
    module = batchnorm.BatchNorm1d(3, momentum=None).to(dtype=module_dtype)
    zeros = torch.zeros(3, dtype=module_dtype)
    ones = torch.ones(3, dtype=module_dtype)
    torch.testing.assert_close(module.running_mean, zeros)
    torch.testing.assert_close(module.running_var, ones)
    data1 = torch.rand(4, 3, dtype=dtype)
    data2 = torch.rand(4, 3, dtype=dtype)

    res1 = module(data1)
    running_mean1 = module.running_mean.clone()
    running_var1 = module.running_var.clone()
    assert not torch.equal(running_mean1, zeros)
    assert not torch.equal(running_var1, ones)
    module.reset_running_stats()
    torch.testing.assert_close(module.running_mean, zeros)
    torch.testing.assert_close(module.running_var, ones)

    res2 = module(data2)
    running_mean2 = module.running_mean.clone()
    running_var2 = module.running_var.clone()
    assert not torch.equal(running_mean2, zeros)
    assert not torch.equal(running_var2, ones)
    module.reset_running_stats()
    torch.testing.assert_close(module.running_mean, zeros)
    torch.testing.assert_close(module.running_var, ones)

    res3 = module(data1)
    res4 = module(data2)
    torch.testing.assert_close(res3, res1)
    torch.testing.assert_close(res4, res2)
    torch.testing.assert_close(module.running_mean, (running_mean1 + running_mean2) / 2)
    torch.testing.assert_close(module.running_var, (running_var1 + running_var2) / 2)
    assert module.num_batches_tracked.item() == 2


@pytest.mark.parametrize("dtype", [torch.float, torch.double])
def test_batchnorm_simple_average(cpu_backend, dtype):
    _test_batchnorm_simple_average(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.half])
def test_batchnorm_simple_average_mixed(dtype):
    _test_batchnorm_simple_average(dtype, torch.float)


@pytest.mark.parametrize("dtype", [torch.float, torch.double])
def test_batchnorm_update_stats(cpu_backend, dtype):
    """_test_batchnorm_update_stats: training moves the statistics and counts the batch; eval
    changes nothing. Checked against PyTorch's values too."""
    module, theirs = _twins(nn.BatchNorm1d, 3, dtype=dtype)
    data = torch.rand(4, 3, dtype=dtype)
    old = {k: v.clone() for k, v in module.state_dict().items()}
    module(data)
    theirs(data)
    assert not torch.equal(old["running_mean"], module.running_mean)
    assert not torch.equal(old["running_var"], module.running_var)
    assert module.num_batches_tracked.item() == old["num_batches_tracked"].item() + 1
    _assert_same_state(module, theirs)

    module.eval()
    old = {k: v.clone() for k, v in module.state_dict().items()}
    module(data)
    for k, v in old.items():
        assert torch.equal(module.state_dict()[k], v), k


@pytest.mark.parametrize("dtype", [torch.float, torch.double])
def test_batchnorm_large_batch(cpu_backend, dtype):
    """test_batchnorm_large_batch: 880801 values in one channel, forward and backward."""
    bn, theirs = _twins(nn.BatchNorm2d, 1, dtype=dtype)
    data = torch.rand(880801, 1, 1, 1, dtype=dtype)
    x1, x2 = data.clone().requires_grad_(), data.clone().requires_grad_()
    y1, y2 = bn(x1), theirs(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-4)
    y1.sum().backward()
    y2.sum().backward()
    # d(sum y)/dx is 0 analytically; both are rounding noise around it
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-3)
    _assert_same_state(bn, theirs, rtol=1e-4, atol=1e-6)


def test_batchnorm_empty(cpu_backend):
    """test_BatchNorm_empty via common_nn._test_module_empty_input: N=0 forward+backward gives
    zero gradients everywhere and leaves the running statistics alone."""
    mod, theirs = _twins(nn.BatchNorm2d, 3)
    mod.reset_parameters()
    theirs.reset_parameters()
    for m in (mod, theirs):
        inp = torch.randn(0, 3, 2, 2, requires_grad=True)
        out = m(inp)
        out.backward(torch.rand_like(out))
        assert out.size() == inp.size()
        for p in m.parameters():
            torch.testing.assert_close(p.grad, torch.zeros_like(p.grad))
        torch.testing.assert_close(inp.grad, torch.zeros_like(inp))
        torch.testing.assert_close(m.running_mean, torch.tensor([0.0, 0, 0]))
        torch.testing.assert_close(m.running_var, torch.tensor([1.0, 1, 1]))
    _assert_same_state(mod, theirs)


@pytest.mark.parametrize("shape", [(4, 3, 0), (0, 3), (0, 3, 0)])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_empty_other_shapes(cpu_backend, shape, training):
    """Other empty inputs (empty length, empty batch of a 2D input): output shape, zero
    gradients, running statistics and num_batches_tracked as in PyTorch."""
    ours, theirs = _twins(nn.BatchNorm1d, 3)
    ours.train(training)
    theirs.train(training)
    grads = []
    for m in (ours, theirs):
        x = torch.randn(shape, requires_grad=True)
        y = m(x)
        assert y.shape == x.shape
        y.sum().backward()
        grads.append((x.grad, m.weight.grad, m.bias.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    _assert_same_state(ours, theirs)


def test_batchnorm_buffer_update_when_stats_are_not_tracked():
    """Buffers present but ``track_running_stats`` switched off after construction: training
    normalizes with batch statistics and updates no buffer (PyTorch passes the buffers only
    outside training)."""
    input_size = (32, 4)
    bn = batchnorm.BatchNorm1d(input_size[1], track_running_stats=True)
    bn.track_running_stats = False
    snap = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.rand(input_size)
    y = bn(x)
    for k, v in snap.items():
        assert torch.equal(bn.state_dict()[k], v), k
    theirs = nn.BatchNorm1d(4)
    theirs.track_running_stats = False
    torch.testing.assert_close(y, theirs(x))
    # eval: PyTorch then normalizes with the (unchanged) buffers
    bn.eval()
    theirs.eval()
    x = torch.rand(input_size) * 3 + 2
    torch.testing.assert_close(bn(x), theirs(x))


def test_batchnorm_raises_error_if_less_than_one_value_per_channel():
    x = torch.rand(10)[None, :, None]
    with pytest.raises(ValueError):
        batchnorm.BatchNorm1d(10)(x)
    with pytest.raises(ValueError):
        BF.batch_norm(x, torch.zeros(10), torch.ones(10), training=True)
    # eval mode has no such restriction, as in PyTorch
    torch.testing.assert_close(batchnorm.BatchNorm1d(10).eval()(x), nn.BatchNorm1d(10).eval()(x))


@pytest.mark.parametrize("which", ["running_mean", "running_var", "weight", "bias"])
def test_batchnorm_raises_error_if_tensor_is_not_same_size_as_input(which):
    """test_batchnorm_raises_error_if_{running_mean,running_var,weight,bias}_is_not_same_size_
    as_input: RuntimeError for sizes 9 and 11 with 10 channels."""
    x = torch.rand(2, 10)
    for size in (9, 11):
        kw = {"running_mean": torch.rand(10), "running_var": torch.rand(10)}
        bad = torch.rand(size)
        kw[which] = nn.Parameter(bad) if which in ("weight", "bias") else bad
        with pytest.raises(RuntimeError):
            F.batch_norm(x, **kw)
        with pytest.raises(RuntimeError):
            BF.batch_norm(x, **kw)


def _forward_ad_outputs(dual_indices):
    """(PyTorch's, ours) output duals of eval-mode batch norm with tangents on the arguments
    named by ``dual_indices`` (0: input, 1: running_mean, 2: running_var)."""
    args = (torch.randn(3, 2, 5), torch.randn(2), torch.randn(2).abs() + 0.5)
    tangents = tuple(torch.rand_like(x) for x in args)
    outs = []
    for fn in (F.batch_norm, BF.batch_norm):
        f = partial(fn, training=False, momentum=-1.2)
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) if i in dual_indices else p
                     for i, (p, t) in enumerate(zip(args, tangents, strict=True))]
            outs.append(fwAD.unpack_dual(f(*duals)))
    return outs


def test_batchnorm_forward_grad_on_input_only():
    """test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad, case (0,):
    no error, and the same primal and tangent as PyTorch."""
    theirs, ours = _forward_ad_outputs((0,))
    torch.testing.assert_close(ours.primal, theirs.primal)
    assert theirs.tangent is not None
    torch.testing.assert_close(ours.tangent, theirs.tangent)


@pytest.mark.parametrize("dual_indices", [(1,), (1, 2)])
def test_batchnorm_forward_grad_on_running_stats_only(dual_indices):
    """test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad, cases
    (1,) and (1, 2): no error, and no tangent on the output."""
    theirs, ours = _forward_ad_outputs(dual_indices)
    torch.testing.assert_close(ours.primal, theirs.primal)
    assert theirs.tangent is None
    assert ours.tangent is None


@pytest.mark.parametrize("dual_indices", [(0, 1), (0, 1, 2)])
def test_batchnorm_raises_error_if_running_stats_have_forward_grad(dual_indices):
    args = (torch.randn(3, 2, 5), torch.randn(2), torch.randn(2).abs() + 0.5)
    msg = "batch_norm is not differentiable wrt running_mean and running_var"
    for fn in (F.batch_norm, BF.batch_norm):
        f = partial(fn, training=False, momentum=-1.2)
        tangents = tuple(torch.rand_like(x) for x in args)
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) if i in dual_indices else p
                     for i, (p, t) in enumerate(zip(args, tangents, strict=True))]
            with pytest.raises(RuntimeError, match=msg):
                f(*duals)


# --------------------------------------------------------------------------------------------
# test/test_nn.py, TestNN (CPU)


def _exact_bn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5):
    """Training-mode batch norm of ``x`` in float64, from the definition."""
    xd = x.double()
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = xd.mean(dims, keepdim=True)
    var = xd.var(dims, unbiased=False, keepdim=True)
    return ((xd - mean) / torch.sqrt(var + eps) * weight.double().view(shape)
            + bias.double().view(shape))


def _nhwc_helper(mod, size, dtype, mixed_dtype, fmt, precision=None):
    """test_batchnorm_nhwc_cpu's helper: channels_last against contiguous on the same module
    class (ours), as the original does with PyTorch's; then against PyTorch: the output is no
    further from the float64 definition than PyTorch's is."""
    channels = size[1]
    x = torch.randn(size, dtype=torch.float32).to(dtype)
    x = x.contiguous(memory_format=fmt).requires_grad_()
    grad = torch.randn(size, dtype=torch.float32).to(dtype).contiguous(memory_format=fmt)
    bn = OURS[mod](channels).to(dtype)
    bn.weight.data.uniform_()
    bn.bias.data.uniform_()
    ref_input = x.detach().clone().contiguous().requires_grad_(True)
    ref_grad = grad.detach().clone().contiguous()
    ref_bn = OURS[mod](channels).to(dtype)
    ref_bn.load_state_dict(bn.state_dict())
    theirs = mod(channels).to(dtype)
    theirs.load_state_dict(bn.state_dict())
    if mixed_dtype:
        bn.float()
        ref_bn.float()
        theirs.float()
    out = bn(x)
    out.backward(grad)
    ref_out = ref_bn(ref_input)
    ref_out.backward(ref_grad)
    assert out.is_contiguous(memory_format=fmt)
    assert ref_out.is_contiguous()
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(bn.weight.grad, ref_bn.weight.grad, atol=precision, rtol=precision)
    torch.testing.assert_close(bn.bias.grad, ref_bn.bias.grad)
    torch.testing.assert_close(x.grad, ref_input.grad)
    assert x.grad.is_contiguous(memory_format=fmt)

    exact = _exact_bn(x.detach(), theirs.weight.detach(), theirs.bias.detach())
    their_out = theirs(x.detach().contiguous())
    assert their_out.dtype == dtype
    err_ours = (out.detach().double() - exact).abs().max().item()
    err_theirs = (their_out.double() - exact).abs().max().item()
    assert err_ours <= err_theirs + 1e-6, (err_ours, err_theirs)


@pytest.mark.parametrize("shape", [(4, 8, 10, 10), (4, 1, 9, 9), (4, 9, 1, 1)])
def test_batchnorm_nhwc_cpu_float(cpu_backend, shape):
    _nhwc_helper(nn.BatchNorm2d, shape, torch.float, False, torch.channels_last)
    shape3d = (shape[0], shape[1], 2, *shape[2:])
    _nhwc_helper(nn.BatchNorm3d, shape3d, torch.float, False, torch.channels_last_3d, 1e-4)


@pytest.mark.parametrize("shape", [(4, 8, 10, 10), (4, 1, 9, 9), (4, 9, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mixed_dtype", [False, True])
def test_batchnorm_nhwc_cpu_reduced_precision(shape, dtype, mixed_dtype):
    """test_batchnorm_nhwc_cpu: bfloat16/float16 modules, and reduced-precision input with a
    float32 module (mixed), channels_last and channels_last_3d, against PyTorch's contiguous
    run with PyTorch's default tolerances for the dtype."""
    _nhwc_helper(nn.BatchNorm2d, shape, dtype, mixed_dtype, torch.channels_last)
    precision = {torch.bfloat16: 1e-4, torch.float16: None}[dtype]
    shape3d = (shape[0], shape[1], 2, *shape[2:])
    _nhwc_helper(nn.BatchNorm3d, shape3d, dtype, mixed_dtype, torch.channels_last_3d, precision)


@pytest.mark.parametrize("bn_module", [nn.BatchNorm2d, nn.SyncBatchNorm],
                         ids=["BatchNorm2d", "SyncBatchNorm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_batchnorm_non_contig_cpu(bn_module, dtype):
    """test_batchnorm_non_contig_cpu: an input that is channels_last only by its size-1 width
    gives a channels_last output equal to the contiguous one; reduced-precision input with a
    float module matches the float32 computation."""
    x = torch.arange(6, dtype=torch.float).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)
    bn = OURS[bn_module](2).float().eval()
    bn.weight.data.uniform_()
    bn.bias.data.uniform_()
    ref_bn = nn.BatchNorm2d(2).float().eval()
    ref_bn.load_state_dict(bn.state_dict())
    out = bn(x)
    ref_out = ref_bn(x.detach().clone().contiguous())
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref_out)

    input_bf = torch.arange(24, dtype=dtype).reshape(1, 3, 2, 4).permute(0, 2, 1, 3)
    input_f = input_bf.float()
    bn_mix = OURS[bn_module](2).float().eval()
    ref_bn_f = copy.deepcopy(bn_mix)
    out_bf = bn_mix(input_bf)
    assert out_bf.dtype == dtype
    torch.testing.assert_close(ref_bn_f(input_f), out_bf.float(), atol=0.05, rtol=0.05)
    theirs = bn_module(2).float().eval()
    torch.testing.assert_close(out_bf, theirs(input_bf))


def test_convert_sync_batchnorm():
    """test_convert_sync_batchnorm (CUDA in PyTorch; the conversion itself is device-free):
    BatchNorm becomes SyncBatchNorm, other norms stay, state (device and values) is kept."""
    module = nn.Sequential(nn.BatchNorm1d(100), nn.InstanceNorm1d(100))
    module(torch.randn(8, 100, 3))
    comp_module = nn.Sequential(nn.BatchNorm1d(100), nn.InstanceNorm1d(100))
    comp_module.load_state_dict(module.state_dict())
    weight = module[0].weight
    sync_bn_module = batchnorm.convert_sync_batchnorm(module)
    children = list(sync_bn_module.children())
    assert children[0].__class__ is batchnorm.SyncBatchNorm
    assert children[1].__class__ is nn.InstanceNorm1d
    assert children[0].weight is weight  # the same Parameter, as PyTorch's conversion
    for layer, converted in zip(comp_module.children(), sync_bn_module.children(), strict=True):
        assert layer.state_dict().keys() == converted.state_dict().keys()
        for key in layer.state_dict():
            assert layer.state_dict()[key].device == converted.state_dict()[key].device
            assert torch.equal(layer.state_dict()[key], converted.state_dict()[key])
    # single process: SyncBatchNorm is plain batch norm, like PyTorch's on the CPU
    x = torch.randn(6, 100, 3)
    torch.testing.assert_close(sync_bn_module(x), comp_module(x))
    _assert_same_state(sync_bn_module, comp_module)


def test_convert_sync_batchnorm_shares_state_like_torch():
    """torch.nn.SyncBatchNorm.convert_sync_batchnorm hands over the same Parameter and buffer
    objects, the training flag, requires_grad and qconfig; so does ours."""
    for convert in (nn.SyncBatchNorm.convert_sync_batchnorm, batchnorm.convert_sync_batchnorm):
        model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, momentum=None))
        model(torch.randn(4, 3, 2, 2))
        model.eval()
        bn = model[1]
        bn.weight.requires_grad_(False)
        bn.qconfig = "qconfig"
        before = dict(chain(bn.named_parameters(), bn.named_buffers()))
        converted = convert(model)[1]
        assert isinstance(converted, (nn.SyncBatchNorm, batchnorm.SyncBatchNorm))
        for name, t in before.items():
            assert getattr(converted, name) is t, (convert, name)
        assert not converted.training
        assert not converted.weight.requires_grad and converted.bias.requires_grad
        assert converted.qconfig == "qconfig"
        assert converted.momentum is None and converted.eps == bn.eps


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (2, 3, 4, 4), (2, 3, 2, 2, 3)])
@pytest.mark.parametrize("track", [True, False])
def test_sync_batchnorm_single_process_matches_torch(cpu_backend, shape, track):
    """Without an initialized process group PyTorch's SyncBatchNorm is plain batch norm on
    any input of rank >= 2 (training and eval); so is ours."""
    ours, theirs = _twins(nn.SyncBatchNorm, 3, momentum=0.3, track_running_stats=track)
    for training in (True, True, False):
        ours.train(training)
        theirs.train(training)
        x = torch.randn(shape) * 2 + 1
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1), theirs(x2)
        torch.testing.assert_close(y1, y2)
        g = torch.randn_like(y2)
        y1.backward(g)
        y2.backward(g)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
        _assert_same_state(ours, theirs)


def test_sync_batchnorm_convert_classmethod():
    """SyncBatchNorm.convert_sync_batchnorm as a classmethod, like torch.nn.SyncBatchNorm's.
    Deliberately not a torch.nn.SyncBatchNorm: DistributedDataParallel refuses those on CPU
    modules, and ours runs on the CPU (tests/distributed run it under DDP with Gloo)."""
    module = nn.Sequential(nn.BatchNorm2d(3))
    converted = batchnorm.SyncBatchNorm.convert_sync_batchnorm(module)
    assert type(converted[0]) is batchnorm.SyncBatchNorm
    assert not isinstance(converted[0], nn.SyncBatchNorm)


def test_sync_batchnorm_single_process_errors_like_torch():
    """SyncBatchNorm._check_input_dim: fewer than 2 dimensions is a ValueError."""
    for cls in (nn.SyncBatchNorm, batchnorm.SyncBatchNorm):
        with pytest.raises(ValueError):
            cls(3)(torch.randn(3))


# --------------------------------------------------------------------------------------------
# test/nn/test_load_state_dict.py


def test_load_state_dict_BC():
    """test_load_state_dict_BC: a version-1 or unversioned state_dict without
    num_batches_tracked loads, and the counter is a long 0 (old checkpoints)."""
    bn = batchnorm.BatchNorm2d(3)
    state_dict = bn.state_dict()
    del state_dict["num_batches_tracked"]
    state_dict._metadata[""]["version"] = 1
    bn.load_state_dict(state_dict)
    assert bn.num_batches_tracked.dtype == torch.long
    assert bn.num_batches_tracked.item() == 0
    del state_dict._metadata[""]["version"]
    bn.load_state_dict(state_dict)
    assert bn.num_batches_tracked.dtype == torch.long
    assert bn.num_batches_tracked.item() == 0
    # a current (version 2) state_dict without it is a missing key, in both
    sd = batchnorm.BatchNorm2d(3).state_dict()
    del sd["num_batches_tracked"]
    for cls in (nn.BatchNorm2d, batchnorm.BatchNorm2d):
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            cls(3).load_state_dict(sd)
        assert cls(3).load_state_dict(sd, strict=False).missing_keys == ["num_batches_tracked"]


def test_state_dict_version_is_torchs():
    """The ``_version`` (2) saved in the metadata is what PyTorch's migration keys on."""
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
        assert OURS[cls](3).state_dict()._metadata[""] == cls(3).state_dict()._metadata[""]


@pytest.mark.parametrize("training", [True, False])
def test_module_dtype_mismatch_is_a_runtime_error(training):
    """A float64 module on float32 input, or a float16 module on float32 input, is a
    RuntimeError in PyTorch ('mixed dtype (CPU)'); ours raises a RuntimeError subclass. (PyTorch
    has already counted the batch in num_batches_tracked when it raises; ours changes nothing,
    which is not asserted against PyTorch.)"""
    x = torch.randn(4, 3)
    for conv in (torch.float64, torch.float16):
        for cls in (nn.BatchNorm1d, batchnorm.BatchNorm1d):
            m = cls(3).to(conv).train(training)
            with pytest.raises(RuntimeError):
                m(x)
    # float64 input on a float32 module as well
    for cls in (nn.BatchNorm1d, batchnorm.BatchNorm1d):
        with pytest.raises(RuntimeError):
            cls(3).train(training)(x.double())


def test_load_state_dict_bn_entries():
    """test_load_state_dict, the BatchNorm parts: running_mean loads by value into the same
    tensor; a wrong-size running_mean is an error even with strict=False."""
    net = nn.Module()
    net.bn = batchnorm.BatchNorm2d(2)
    rm = net.bn.running_mean
    state_dict = net.state_dict()
    state_dict["bn.running_mean"] = torch.randn(2)
    incompatible = net.load_state_dict(state_dict)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    assert net.bn.running_mean is rm
    assert torch.equal(net.bn.running_mean, state_dict["bn.running_mean"])
    state_dict = net.state_dict()
    state_dict["bn.running_mean"] = torch.rand(14, 4)
    with pytest.raises(RuntimeError):
        net.load_state_dict(state_dict)
    with pytest.raises(RuntimeError):
        net.load_state_dict(state_dict, strict=False)


class _FcBn(nn.Module):
    def __init__(self, bn_cls):
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.bn = bn_cls(5)

    def forward(self, x):
        return self.bn(self.fc1(x))


def test_load_state_dict_assign_meta():
    """test_load_state_dict_assign_meta: a meta-built model loaded with assign=True takes the
    checkpoint's tensors (the same objects) and computes what the original computes."""
    net = _FcBn(batchnorm.BatchNorm1d)
    state_dict = net.state_dict()
    with torch.device("meta"):
        net_meta = _FcBn(batchnorm.BatchNorm1d)
    net_meta.load_state_dict(state_dict, assign=True)
    sd_meta = net_meta.state_dict(keep_vars=True)
    for key in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert state_dict[key] is sd_meta[key]
    for (n1, _), (n2, _) in zip(net.named_buffers(), net_meta.named_buffers(), strict=True):
        assert n1 == n2
    t = torch.randn(4, 3)
    torch.testing.assert_close(net(t), net_meta(t.clone()))


def test_load_state_dict_assign_meta_then_to():
    for cls in (nn.BatchNorm1d, batchnorm.BatchNorm1d):
        state_dict = _FcBn(cls).state_dict()
        with torch.device("meta"):
            net_meta = _FcBn(cls)
        net_meta.load_state_dict(state_dict, assign=True)
        assert not any(t.is_meta for t in chain(net_meta.parameters(), net_meta.buffers()))
        net_meta.to("cpu")
        net_meta(torch.randn(4, 3))


def test_load_state_dict_assign_with_optimizer():
    """test_load_state_dict_assign_with_optimizer with our BatchNorm1d."""
    net = _FcBn(batchnorm.BatchNorm1d)
    opt = torch.optim.Adam(net.parameters(), lr=1000)
    x = torch.randn(4, 3)
    for _ in range(3):
        opt.zero_grad()
        net(x).sum().backward()
        opt.step()
    opt_state_dict = copy.deepcopy(opt.state_dict())
    net_state_dict = copy.deepcopy(net.state_dict())
    with torch.device("meta"):
        net_meta = _FcBn(batchnorm.BatchNorm1d)
    net_meta.load_state_dict(net_state_dict, assign=True)
    opt2 = torch.optim.Adam(net_meta.parameters(), lr=1000)
    opt2.load_state_dict(opt_state_dict)
    y = x.clone()
    for _ in range(3):
        opt.zero_grad()
        net(x).sum().backward()
        opt.step()
        opt2.zero_grad()
        net_meta(y).sum().backward()
        opt2.step()
    for k, v in net.state_dict().items():
        torch.testing.assert_close(net_meta.state_dict()[k], v, msg=k)


# --------------------------------------------------------------------------------------------
# test/test_stateless.py and torch.func


def test_functional_call_batch_norm(cpu_backend):
    """test_stateless.py::test_functional_batch_norm: a running_mean passed through
    functional_call is the one updated; the module's own is left alone until called plainly."""
    from torch.func import functional_call

    module = batchnorm.BatchNorm1d(10)
    module.train()
    x = torch.full((20, 10), 128.0)
    rm = torch.zeros(10)
    prev_rm = module.running_mean.clone()
    functional_call(module, {"running_mean": rm}, x)
    torch.testing.assert_close(module.running_mean, prev_rm)
    torch.testing.assert_close(rm, torch.full((10,), 12.8))
    functional_call(module, {}, x)
    torch.testing.assert_close(module.running_mean, torch.full((10,), 12.8))


def test_vmap_over_module():
    """torch.func.vmap over the module (eval, and training without running statistics), over
    stacked parameters (model ensembling) and over per-sample gradients, against PyTorch's."""
    from torch.func import functional_call, grad, vmap

    for cls, shape in ((nn.BatchNorm1d, (5, 4, 3)), (nn.BatchNorm2d, (5, 4, 3, 2, 2))):
        x = torch.randn(shape)
        for kw, training in (({}, False), ({"track_running_stats": False}, True)):
            ours, theirs = _twins(cls, 3, **kw)
            ours.train(training)
            theirs.train(training)
            torch.testing.assert_close(vmap(ours)(x), vmap(theirs)(x))
            moved = x.movedim(0, 1).contiguous()
            torch.testing.assert_close(vmap(ours, in_dims=1)(moved),
                                       vmap(theirs, in_dims=1)(moved))

            def call(p, xx, m):
                return functional_call(m, p, (xx,))

            def loss(p, xx, m):
                return call(p, xx, m).pow(2).sum()

            got, want = (vmap(call, in_dims=(0, None, None))(
                {k: torch.stack([v, 2 * v]) for k, v in m.named_parameters()}, x[0], m)
                for m in (ours, theirs))
            torch.testing.assert_close(got, want)
            got, want = (vmap(grad(loss), in_dims=(None, 0, None))(
                dict(m.named_parameters()), x, m) for m in (ours, theirs))
            torch.testing.assert_close(got, want)


def test_vmap_training_with_running_stats():
    """Training under vmap updates running statistics only when they are mapped too (each
    slice its own, a non-finite slice skipped alone); unmapped ones are a RuntimeError, as in
    PyTorch, and nothing changes."""
    from torch.func import vmap

    x = torch.randn(5, 4, 3)
    m = batchnorm.BatchNorm1d(3)
    with pytest.raises(RuntimeError, match="vmap maps the input but not running_mean"):
        vmap(m)(x)
    assert int(m.num_batches_tracked) == 0 and torch.equal(m.running_mean, torch.zeros(3))
    x[2, 0, 0] = float("nan")
    finite = torch.ones(5, dtype=torch.bool)
    finite[2] = False
    state = {}
    for lib, fn in (("torch", F.batch_norm), ("ours", BF.batch_norm)):
        rm, rv = torch.zeros(5, 3), torch.ones(5, 3)
        vmap(lambda xx, a, b, fn=fn: fn(xx, a, b, training=True))(x, rm, rv)
        state[lib] = rm, rv
    for a, b in zip(state["ours"], state["torch"], strict=True):
        torch.testing.assert_close(a[finite], b[finite])
    assert torch.equal(state["ours"][0][2], torch.zeros(3))  # the NaN slice kept its state
    assert torch.equal(state["ours"][1][2], torch.ones(3))


def test_torchscript_is_refused_clearly_and_the_converted_copy_scripts():
    """PyTorch's BatchNorm scripts and traces; ours cannot (its forward runs Numba/Triton
    kernels outside TorchScript; a trace would keep their outputs as constants). Both entry
    points raise a TypeError saying what to use instead, and the route it names works: a
    deep copy converted to PyTorch's layers scripts and gives the same eval output."""
    model = nn.Sequential(nn.Conv2d(3, 3, 1), batchnorm.BatchNorm2d(3, activation="relu"))
    _randomize(model[1])
    model.eval()
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(TypeError, match="torch.jit.script cannot compile.*convert_model"):
        torch.jit.script(model)
    with pytest.raises(TypeError, match="torch.jit.trace cannot record.*convert_model"):
        torch.jit.trace(model, x)
    assert type(model[1]) is batchnorm.BatchNorm2d  # nothing was swapped in the user's model
    scripted = torch.jit.script(
        batchnorm.convert_model(copy.deepcopy(model), target="torch", unfuse_activations=True))
    torch.testing.assert_close(scripted(x), model(x))


def test_fx_symbolic_trace():
    """torch.fx.symbolic_trace records each layer as one call_module node, as it does
    PyTorch's (a leaf), so the traced module follows train()/eval() and keeps the residual."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = batchnorm.BatchNorm2d(3, activation="relu")
            self.sync = batchnorm.SyncBatchNorm(3)

        def forward(self, x):
            return self.sync(self.bn(self.conv(x), x))

    model = Net()
    gm = torch.fx.symbolic_trace(model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv", "bn", "sync"]
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(gm(x), model(x))
    assert int(model.bn.num_batches_tracked) == 2  # the traced module updates the same buffers
    model.eval()
    gm.eval()
    torch.testing.assert_close(gm(x), model(x))  # eval mode reached the layers at run time
    with pytest.raises(ValueError, match="expected 4D input"):
        gm.bn(torch.randn(4, 3, 2))


def test_fuse_conv_bn_eval():
    """torch.nn.utils.fusion.fuse_conv_bn_eval (test_nn.py::test_fuse_module_eval_numerics):
    only reads the module's attributes, so ours fuses exactly like PyTorch's."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    conv = nn.Conv2d(3, 4, 3).eval()
    ours, theirs = _twins(nn.BatchNorm2d, 4)
    warm = conv(torch.randn(8, 3, 6, 6) * 2 + 1).detach()
    for m in (ours, theirs):
        m(warm)
        m.eval()
    x = torch.randn(2, 3, 6, 6)
    fused_ours = fuse_conv_bn_eval(conv, ours)
    fused_theirs = fuse_conv_bn_eval(conv, theirs)
    torch.testing.assert_close(fused_ours(x), fused_theirs(x))
    torch.testing.assert_close(fused_ours(x), ours(conv(x)), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# The _BatchNorm contract the tests above rely on


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_updated_in_place(cpu_backend, momentum):
    """PyTorch updates running_mean/running_var/num_batches_tracked in place: the same tensor
    objects, the same storage, a version bump (so an optimizer or a reference holding them sees
    the update), and reset_running_stats/reset_parameters work in place too."""
    ours, theirs = _twins(nn.BatchNorm2d, 3, momentum=momentum)
    bufs = {k: (v, v.data_ptr(), v._version) for k, v in ours.named_buffers()
            if k in theirs.state_dict()}
    weight, bias = ours.weight, ours.bias
    for step in range(3):
        x = torch.randn(4, 3, 2, 2) * (step + 1) + step
        ours(x)
        theirs(x)
    for k, (t, ptr, version) in bufs.items():
        assert getattr(ours, k) is t and t.data_ptr() == ptr, k
        assert t._version > version, k
    _assert_same_state(ours, theirs)
    assert ours.num_batches_tracked.item() == 3
    ours.reset_running_stats()
    for k, (t, ptr, _) in bufs.items():
        assert getattr(ours, k) is t and t.data_ptr() == ptr, k
    assert torch.equal(ours.running_mean, torch.zeros(3))
    assert torch.equal(ours.running_var, torch.ones(3))
    assert ours.num_batches_tracked.item() == 0
    ours.reset_parameters()
    assert ours.weight is weight and ours.bias is bias
    assert torch.equal(weight, torch.ones(3)) and torch.equal(bias, torch.zeros(3))


def test_cumulative_average_equals_mean_of_batches(cpu_backend):
    """momentum=None: after k batches the running statistics are the plain average of the k
    batch means and unbiased variances (factor 1/num_batches_tracked), as in PyTorch."""
    ours, theirs = _twins(nn.BatchNorm1d, 4, momentum=None, dtype=torch.float64)
    means, variances = [], []
    for step in range(5):
        x = torch.randn(6, 4, 3, dtype=torch.float64) * (step + 1) + 2 * step
        ours(x)
        theirs(x)
        means.append(x.mean((0, 2)))
        variances.append(x.var((0, 2), unbiased=True))
        torch.testing.assert_close(ours.running_mean, torch.stack(means).mean(0))
        torch.testing.assert_close(ours.running_var, torch.stack(variances).mean(0))
        assert ours.num_batches_tracked.item() == step + 1
    _assert_same_state(ours, theirs)


def test_track_running_stats_false_has_no_buffers(cpu_backend):
    """track_running_stats=False: running buffers are None, nothing in the state_dict but the
    affine parameters, eval mode keeps using batch statistics."""
    ours, theirs = _twins(nn.BatchNorm2d, 3, track_running_stats=False)
    assert ours.running_mean is None and ours.running_var is None
    assert ours.num_batches_tracked is None
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias"]
    x = torch.randn(4, 3, 2, 2) * 2 + 1
    for training in (True, False):
        ours.train(training)
        theirs.train(training)
        torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_module_on_cpu(dtype):
    """A module converted with .half()/.bfloat16() (parameters and running statistics in the
    reduced dtype) on CPU: outputs in the dtype and no further from the float64 definition than
    PyTorch's; running statistics equal to PyTorch's within the dtype's default tolerance; eval
    against PyTorch on the same state."""
    ours, theirs = _twins(nn.BatchNorm2d, 4)
    ours.to(dtype)
    theirs.to(dtype)
    for _ in range(2):
        x = (torch.randn(8, 4, 3, 3) * 2 + 1).to(dtype)
        y, their_y = ours(x), theirs(x)
        assert y.dtype == their_y.dtype == dtype
        exact = _exact_bn(x, theirs.weight.detach(), theirs.bias.detach())
        err_ours = (y.double() - exact).abs().max().item()
        err_theirs = (their_y.double() - exact).abs().max().item()
        assert err_ours <= err_theirs + 1e-6, (err_ours, err_theirs)
    _assert_same_state(ours, theirs)
    ours.eval()
    theirs.eval()
    x = (torch.randn(8, 4, 3, 3) * 2 + 1).to(dtype)
    y = ours(x)
    assert y.dtype == dtype
    # eval: one affine map per channel; allow one rounding of the output on either side
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y, theirs(x), rtol=2 * eps, atol=2 * eps)


def test_buffers_are_torchs_plus_the_skip_counter():
    """named_buffers() is PyTorch's plus num_batches_skipped (batches kept out of the running
    statistics), which is non-persistent: state_dict keys stay PyTorch's."""
    ours, theirs = batchnorm.BatchNorm2d(3), nn.BatchNorm2d(3)
    names = [n for n, _ in theirs.named_buffers()]
    assert [n for n, _ in ours.named_buffers()] == [*names, "num_batches_skipped"]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    untracked = batchnorm.BatchNorm2d(3, track_running_stats=False)
    assert list(untracked.named_buffers()) == list(
        nn.BatchNorm2d(3, track_running_stats=False).named_buffers()) == []
