"""Every fused activation, on every backend, against PyTorch's own module after PyTorch's BN.

The oracle is ``torch.nn.functional.batch_norm`` followed by the add and PyTorch's activation
module (``tests.oracle.torch_module``, written without the library's table); the reference
backend is also checked with ``gradcheck``/``gradgradcheck``. The table itself (parsing,
modules, inverses) is checked at the end.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm
import batchnorm.functional as BF
from batchnorm import activations as A
from tests.conftest import device_for
from tests.oracle import GRAD_TOL, TOL, make_layout, torch_bn, torch_module

# every activation of the table, with a non-default parameter where it takes one
SPECS = [None if n == "none" else (n, 0.3) if n == "leaky_relu" else (n, 0.7) if n == "elu"
         else n for n in A.ACTIVATIONS]
NEW = ["relu6", "hardswish", "hardsigmoid", "sigmoid", "tanh", ("elu", 0.7), "mish",
       "gelu_tanh"]


class _ExactHardsigmoid(nn.Module):
    """PyTorch's float64 ``hardsigmoid_backward`` multiplies by the float32 rounding of 1/6
    (3e-8 off); ours by 1/6, so the float64 oracle is the definition in PyTorch ops."""

    def forward(self, y):
        return torch.nn.functional.relu6(y + 3) / 6


def _id(spec) -> str:
    return "none" if spec is None else spec if isinstance(spec, str) else spec[0]


def test_every_requested_activation_is_in_the_table():
    assert {_id(s) for s in NEW} <= set(A.ACTIVATIONS)
    assert len({e.code for e in A.TABLE.values()}) == len(A.TABLE)  # codes are distinct


@pytest.mark.parametrize("spec", SPECS, ids=_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_matches_torch_module(backend, spec, dtype, layout, residual):
    device = device_for(backend)
    x0 = torch.randn(4, 5, 3, 3, dtype=dtype, device=device) * 2
    r0 = torch.randn_like(x0) if residual else None
    w0 = torch.rand(5, dtype=dtype, device=device) + 0.5
    b0 = torch.randn(5, dtype=dtype, device=device)
    for training in (True, False):
        rm0 = torch.randn(5, dtype=dtype, device=device)
        rv0 = torch.rand(5, dtype=dtype, device=device) + 0.5
        x1 = make_layout(x0.clone(), layout).detach().requires_grad_()
        r1 = None if r0 is None else make_layout(r0.clone(), layout).detach().requires_grad_()
        w1, b1 = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        rm1, rv1 = rm0.clone(), rv0.clone()
        y1 = BF.batch_norm(x1, rm1, rv1, w1, b1, training, 0.1, 1e-5, activation=spec,
                           residual=r1)
        x2 = x0.clone().requires_grad_()
        r2 = None if r0 is None else r0.clone().requires_grad_()
        w2, b2 = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        rm2, rv2 = rm0.clone(), rv0.clone()
        oracle = _ExactHardsigmoid() if spec == "hardsigmoid" and dtype == torch.float64 \
            else spec
        y2 = torch_bn(x2, rm2, rv2, w2, b2, training, 0.1, 1e-5, oracle, r2)
        torch.testing.assert_close(y1, y2, **TOL[dtype])
        torch.testing.assert_close(rm1, rm2, **TOL[dtype])
        gy = torch.randn_like(y2)
        y1.backward(gy)
        y2.backward(gy)
        pairs = [(x1.grad, x2.grad), (w1.grad, w2.grad), (b1.grad, b2.grad)]
        if residual:
            pairs.append((r1.grad, r2.grad))
        for got, want in pairs:
            torch.testing.assert_close(got, want, **GRAD_TOL[dtype])


@pytest.mark.parametrize("spec", SPECS, ids=_id)
def test_module_takes_the_pytorch_module(backend, spec):
    """``activation=nn.X()`` on our layer equals ``nn.Sequential(nn.BatchNorm2d, nn.X())``."""
    device = device_for(backend)
    module = torch_module(spec)
    ours = batchnorm.BatchNorm2d(3, activation=module).to(device)
    theirs = nn.Sequential(nn.BatchNorm2d(3), torch_module(spec)).to(device)
    x = torch.randn(2, 3, 4, 4, device=device)
    torch.testing.assert_close(ours(x), theirs(x), **TOL[torch.float32])
    assert A.parse_activation(ours.activation) == A.parse_activation(module)


@pytest.mark.parametrize("spec", SPECS, ids=_id)
def test_derivative_at_the_kinks_is_pytorchs(backend, spec):
    """At the points where an activation has a kink (0, 6, ±3) the gradient is PyTorch's
    choice: eval mode with mean 0, var 1 and eps 0 makes the pre-activation exactly ``x``."""
    device = device_for(backend)
    pts = torch.tensor([-3.0, 0.0, 3.0, 6.0, -1.0, 1.5, -10.0, 25.0], device=device)
    x1 = pts.view(2, 1, 4).repeat(1, 2, 1).requires_grad_()
    rm, rv = torch.zeros(2, device=device), torch.ones(2, device=device)
    y1 = BF.batch_norm(x1, rm, rv, None, None, False, 0.1, 0.0, activation=spec)
    x2 = x1.detach().clone().requires_grad_()
    y2 = torch_module(spec)(x2)
    torch.testing.assert_close(y1, y2, **TOL[torch.float32])
    gy = torch.ones_like(y2)
    y1.backward(gy)
    y2.backward(gy)
    torch.testing.assert_close(x1.grad, x2.grad, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("spec", SPECS, ids=_id)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_and_gradgradcheck_reference(monkeypatch, spec, training):
    monkeypatch.setenv("BATCHNORM_BACKEND", "reference")
    x = (torch.randn(4, 2, 3, dtype=torch.float64) * 1.5).requires_grad_()
    r = torch.randn_like(x).requires_grad_()
    w = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64).requires_grad_()
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)

    def f(x, w, b, r):
        return BF.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5,
                             activation=spec, residual=r)

    assert torch.autograd.gradcheck(f, (x, w, b, r))
    assert torch.autograd.gradgradcheck(f, (x, w, b, r))


# -- the table -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", A.ACTIVATIONS)
def test_table_round_trips_names_specs_and_modules(name):
    entry = A.TABLE[name]
    param = 0.25 if entry.param is not None else 0.0
    spec = A.spec_of(name, param)
    assert A.parse_activation(spec) == (name, param)
    module = A.module_of(name, param)
    if name == "none":
        assert module is None
        return
    assert A.parse_activation(module) == (name, param)
    p = torch.linspace(-8, 8, 101, dtype=torch.float64)
    torch.testing.assert_close(A.act_forward(p, name, param), module(p), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", A.ACTIVATIONS)
def test_reference_derivative_is_autograds(name):
    param = 0.3 if A.TABLE[name].param is not None else 0.0
    p = torch.linspace(-7.9, 7.9, 157, dtype=torch.float64).requires_grad_()  # avoids kinks
    (want,) = torch.autograd.grad(A.act_forward(p, name, param).sum(), p)
    torch.testing.assert_close(A.act_grad(p.detach(), name, param), want, rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("name", A.ACTIVATIONS)
def test_inverse_where_invertible(name):
    param = 0.3 if A.TABLE[name].param is not None else 0.0
    if name in ("none", "leaky_relu", "sigmoid", "tanh", "elu"):
        assert A.invertible(name, param)
        p = torch.linspace(-6, 6, 49, dtype=torch.float64)
        y = A.act_forward(p, name, param)
        torch.testing.assert_close(A.act_inverse(y, name, param), p, rtol=1e-9, atol=1e-9)
    else:
        assert not A.invertible(name, param)
        with pytest.raises(ValueError, match=name):
            A.act_inverse(torch.zeros(3), name, param)
    if name in ("leaky_relu", "elu"):  # a zero or negative parameter folds the negative side
        assert not A.invertible(name, 0.0) and not A.invertible(name, -0.5)


@pytest.mark.parametrize("name", A.ACTIVATIONS)
def test_derivative_from_output_is_the_derivative(name):
    """A row with an inverse also gives ``act'`` as a function of the output (the memory mode
    reads it), equal to the derivative at the pre-activation; the others are refused."""
    param = 0.3 if A.TABLE[name].param is not None else 0.0
    assert (name in A.INVERTIBLE) == (A.refusal(name, param) is None)
    if name not in A.INVERTIBLE:
        assert "not invertible" in A.refusal(name, param)
        return
    p = torch.linspace(-6, 6, 49, dtype=torch.float64)
    y = A.act_forward(p, name, param)
    torch.testing.assert_close(A.act_grad_from_output(y, name, param), A.act_grad(p, name, param),
                               rtol=1e-9, atol=1e-9)
    if A.TABLE[name].param is not None:
        assert f"needs {A.TABLE[name].needs}" in A.refusal(name, 0.0)


def test_parameter_forms_and_errors():
    assert A.parse_activation(("elu", 2)) == ("elu", 2.0)
    assert A.parse_activation(nn.ELU(alpha=0.5)) == ("elu", 0.5)
    assert A.parse_activation("elu") == ("elu", 1.0)
    assert A.spec_of("elu", 1.0) == "elu" and A.spec_of("elu", 0.5) == ("elu", 0.5)
    assert A.parse_activation(nn.GELU(approximate="tanh")) == ("gelu_tanh", 0.0)
    with pytest.raises(ValueError, match="only .* take a parameter"):
        A.parse_activation(("relu6", 1.0))
    with pytest.raises(TypeError, match="alpha must be a real number"):
        A.parse_activation(("elu", "big"))
    with pytest.raises(ValueError, match="alpha must be finite"):
        A.parse_activation(("elu", float("inf")))
    with pytest.raises(ValueError, match="expected None or one of"):
        A.parse_activation("swish")

    class MyReLU(nn.ReLU):  # a subclass may compute something else: not parsed as relu
        pass

    with pytest.raises(ValueError, match="module must be one of"):
        A.parse_activation(MyReLU())


def test_other_libraries_classes_parse_by_qualified_name():
    """timm's own activation classes (e.g. timm.layers.activations.GELUTanh) compute exactly the
    table's activation; they parse by qualified name, so this module imports no timm."""

    def fake(qualname: str) -> nn.Module:
        kind = type(qualname, (nn.Module,), {"__module__": "timm.layers.activations"})
        kind.__qualname__ = qualname
        return kind()

    assert A.parse_activation(fake("GELUTanh")) == ("gelu_tanh", 0.0)
    assert A.parse_activation(fake("HardSwish")) == ("hardswish", 0.0)
    assert A.parse_activation(fake("Tanh")) == ("tanh", 0.0)
    with pytest.raises(ValueError, match="module must be one of"):
        A.parse_activation(fake("PReLU"))


@pytest.mark.parametrize("spec", SPECS, ids=_id)
def test_cpu_layer_fuses_only_what_the_backend_fuses_fast(monkeypatch, spec):
    """On the cpu backend an activation whose fused kernels are slower than PyTorch's own op
    (``fuses_fast``) runs as our layer followed by that op: the output's autograd node is
    PyTorch's activation, not ours; a fast one stays inside our node."""
    pytest.importorskip("numba", reason="the cpu backend is written in Numba")
    monkeypatch.setenv("BATCHNORM_BACKEND", "cpu")
    from batchnorm.kernels import get_backend

    cpu = get_backend("cpu")
    assert cpu is not None
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    y = batchnorm.BatchNorm2d(3, activation=spec)(x)
    ours = type(y.grad_fn).__name__ in ("EagerForwardCtxBackward", "_TrainBackward")
    assert ours == cpu.fuses_fast(A.parse_activation(spec)[0])
