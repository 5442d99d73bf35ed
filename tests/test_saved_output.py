"""The memory mode ``save="output"`` (in-place activated BN, issue 19): the backward recovers
``x̂`` from the output, so its gradients must be those of the stored-input path (float64 to
1e-10 away from γ ≈ 0), on every backend and layout, with and without a residual, in training
and with running statistics; it saves one tensor where the stored-input path saves two; the
in-place option is guarded by autograd's version counter; non-invertible activations are
refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm
from batchnorm.activations import INVERTIBLE
from batchnorm.kernels import get_backend
from batchnorm.kernels.saved_output_reference import backward_from_output as reference_bfo
from batchnorm.ops.saved_output import GAMMA_MIN, effective_weight
from tests.conftest import device_for

ACTS = [None, "leaky_relu", ("leaky_relu", 0.2)]


def _dtype(backend: str) -> torch.dtype:
    return torch.float32 if backend == "triton" else torch.float64


def _pair(c: int, act, dtype, device, training: bool):
    """A stored-input layer and a save='output' one with the same state (γ of both signs)."""
    a = batchnorm.BatchNorm2d(c, activation=act, dtype=dtype, device=device)
    with torch.no_grad():
        a.weight.uniform_(0.5, 2.0)
        a.weight[::2] *= -1
        a.bias.normal_()
        a.running_mean.normal_()
        a.running_var.uniform_(0.5, 2.0)
    b = batchnorm.BatchNorm2d(c, activation=act, dtype=dtype, device=device, save="output")
    b.load_state_dict(a.state_dict())
    return a.train(training), b.train(training)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_gradients_match_stored_input(backend, act, residual, training, fmt):
    dtype, device = _dtype(backend), device_for(backend)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    shape = (4, 5, 3, 3)
    x = torch.randn(shape, dtype=dtype, device=device).to(memory_format=fmt).requires_grad_()
    r = torch.randn(shape, dtype=dtype, device=device).requires_grad_() if residual else None
    g = torch.randn(shape, dtype=dtype, device=device)
    a, b = _pair(5, act, dtype, device, training)
    ya, yb = a(x, r), b(x, r)
    torch.testing.assert_close(yb, ya, rtol=0, atol=tol)
    assert yb.is_contiguous(memory_format=fmt)
    extra = [r] if residual else []
    ga = torch.autograd.grad(ya, [x, a.weight, a.bias, *extra], g)
    gb = torch.autograd.grad(yb, [x, b.weight, b.bias, *extra], g)
    for name, u, v in zip(("x", "weight", "bias", "residual"), ga, gb, strict=False):
        torch.testing.assert_close(v, u, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(b.running_mean, a.running_mean, rtol=0, atol=tol)
    torch.testing.assert_close(b.running_var, a.running_var, rtol=0, atol=tol)


# Shapes that take every work split of the Numba kernels: one channel per item, chunks of a
# channel (few channels, many elements: needs 2 threads), channels-last row blocks.
_SHAPES = [(4, 3, 7), (64, 2, 300), (6, 5), (5000, 3)]


@pytest.mark.parametrize("act", sorted(INVERTIBLE))
def test_backend_kernels_match_reference(backend, act):
    """Every invertible activation of the table (elu, sigmoid and tanh included: their layers
    arrive with the activation table, their kernels are here), against the float64 reference."""
    be = get_backend(backend)
    dtype, device = _dtype(backend), device_for(backend)
    a = {"leaky_relu": 0.1, "elu": 1.3}.get(act, 0.0)
    shapes = _SHAPES if backend != "triton" else [(4, 3, 7), (6, 5)]
    for shape in shapes:
        pre = torch.randn(shape, dtype=torch.float64)
        y = batchnorm.activations.act_forward(pre, act, a) if act in ("none", "leaky_relu") \
            else {"elu": lambda p: F.elu(p, a), "sigmoid": torch.sigmoid,
                  "tanh": torch.tanh}[act](pre)
        c = shape[1]
        w = (torch.rand(c, dtype=torch.float64) + 0.5) * torch.tensor([1.0, -1.0]).repeat(c)[:c]
        bias, rstd = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
        r, dy = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
        for training in (True, False):
            for res in (None, r):
                acc = torch.float32 if dtype == torch.float32 else torch.float64

                def cast(t, d=dtype):
                    return None if t is None else t.to(device, d)

                # the reference on the inputs as the backend sees them (rounded to its dtype)
                want = reference_bfo(*(t if t is None else cast(t).cpu().double()
                                       for t in (dy, y, w, bias, res, rstd)), training, act, a,
                                     True, True, True, res is not None)
                got = be.backward_from_output(cast(dy), cast(y), cast(w), cast(bias), cast(res),
                                              cast(rstd, acc), training, act, a, True, True,
                                              True, res is not None)
                tol = 1e-11 if dtype == torch.float64 else 2e-4
                for u, v in zip(want, got, strict=True):
                    if u is None:
                        assert v is None
                        continue
                    scale = max(1.0, float(u.abs().max()))
                    torch.testing.assert_close(v.cpu().double(), u, rtol=tol, atol=tol * scale)


def test_gradcheck(cpu_backend):
    """First derivatives of the mode's op (both activations, residual, training and eval)."""
    from batchnorm.functional import batch_norm_impl

    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    for act in ("leaky_relu", None):
        for training in (True, False):
            def f(x, r, w, b, act=act, training=training):
                return batch_norm_impl(x, None if training else rm, None if training else rv,
                                       w, b, training, 0.1, 1e-5, activation=act, residual=r,
                                       save="output")

            x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
            r = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
            w = torch.tensor([1.5, -0.7, 2.0], dtype=torch.float64, requires_grad=True)
            b = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64, requires_grad=True)
            assert torch.autograd.gradcheck(f, (x, r, w, b))


def test_gamma_near_zero():
    """|γ| < GAMMA_MIN is computed with as ±GAMMA_MIN, forward and backward alike, so the
    gradients are those of the stored-input path run with that weight (and finite at γ = 0);
    the weight's gradient passes straight through."""
    c = 6
    w = torch.tensor([0.0, -0.0, 1e-9, -3e-6, GAMMA_MIN, 1.0], dtype=torch.float64)
    x = torch.randn(8, c, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(8, c, 5, dtype=torch.float64)
    b = batchnorm.BatchNorm1d(c, activation="leaky_relu", dtype=torch.float64, save="output")
    a = batchnorm.BatchNorm1d(c, activation="leaky_relu", dtype=torch.float64)
    with torch.no_grad():
        b.weight.copy_(w)
        b.bias.normal_()
        a.bias.copy_(b.bias)
        a.weight.copy_(effective_weight(w))
    assert torch.equal(effective_weight(w).abs().clamp(max=GAMMA_MIN)[:5],
                       torch.full((5,), GAMMA_MIN, dtype=torch.float64))
    assert torch.equal(torch.sign(effective_weight(w)[:4]), torch.tensor([1.0, -1, 1, -1],
                                                                          dtype=torch.float64))
    ya, yb = a(x), b(x)
    torch.testing.assert_close(yb, ya, rtol=0, atol=1e-14)
    ga = torch.autograd.grad(ya, [x, a.weight, a.bias], g)
    gb = torch.autograd.grad(yb, [x, b.weight, b.bias], g)
    for u, v in zip(ga, gb, strict=True):
        assert torch.isfinite(v).all()
        torch.testing.assert_close(v, u, rtol=1e-6, atol=1e-8)


class _Block(nn.Module):
    """conv-BN-LReLU-conv-BN-(+x)-LReLU, with PyTorch's layers or ours (either save mode)."""

    def __init__(self, c: int, save: str | None) -> None:
        super().__init__()
        self.ours = save is not None
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        if save is None:
            self.bn1, self.bn2 = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        else:
            kw = dict(activation="leaky_relu", save=save)
            self.bn1, self.bn2 = batchnorm.BatchNorm2d(c, **kw), batchnorm.BatchNorm2d(c, **kw)

    def forward(self, x):
        if self.ours:
            return self.bn2(self.conv2(self.bn1(self.conv1(x))), residual=x)
        y = F.leaky_relu(self.bn1(self.conv1(x)))
        return F.leaky_relu(self.bn2(self.conv2(y)) + x)


def _net(save: str | None, c: int = 6) -> nn.Module:
    return nn.Sequential(_Block(c, save), _Block(c, save), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(c, 4))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_training_parity(cpu_backend, fmt):
    """Eight SGD steps of a small residual CNN in float64: PyTorch's BN + leaky ReLU, ours
    storing the input and ours storing the output follow the same trajectory."""
    torch.manual_seed(0)
    base = _net(None).double()
    nets = {"torch": base}
    for save in ("input", "output"):
        n = _net(save).double()
        n.load_state_dict(base.state_dict())
        nets[save] = n
    nets = {k: copy.deepcopy(v).to(memory_format=fmt) for k, v in nets.items()}
    opts = {k: torch.optim.SGD(v.parameters(), lr=0.1, momentum=0.9) for k, v in nets.items()}
    x = torch.randn(8, 6, 6, 6, dtype=torch.float64).to(memory_format=fmt)
    t = torch.randint(0, 4, (8,))
    losses: dict[str, list[float]] = {k: [] for k in nets}
    for _ in range(8):
        for k, n in nets.items():
            opts[k].zero_grad()
            loss = F.cross_entropy(n(x), t)
            loss.backward()
            opts[k].step()
            losses[k].append(loss.item())
    for k in ("input", "output"):
        assert losses[k] == pytest.approx(losses["torch"], rel=1e-10, abs=1e-12)
        theirs = nets["torch"].state_dict().values()
        for (name, p), q in zip(nets[k].state_dict().items(), theirs, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-10, msg=name)
    assert losses["torch"][-1] < losses["torch"][0]  # it trained


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_inplace_writes_input_storage(cpu_backend, fmt):
    conv = nn.Conv2d(3, 4, 3, padding=1).double().to(memory_format=fmt)
    a = batchnorm.BatchNorm2d(4, activation="leaky_relu", dtype=torch.float64)
    b = batchnorm.BatchNorm2d(4, activation="leaky_relu", dtype=torch.float64, save="output",
                              inplace=True)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64).to(memory_format=fmt).requires_grad_()
    g = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    ga = torch.autograd.grad(a(conv(x)), [x, conv.weight, a.weight], g)
    h = conv(x)
    assert h.is_contiguous(memory_format=fmt)
    ptr, version = h.data_ptr(), h._version
    y = b(h)
    assert y is h and y.data_ptr() == ptr and h._version > version
    gb = torch.autograd.grad(y, [x, conv.weight, b.weight], g)
    for u, v in zip(ga, gb, strict=True):
        torch.testing.assert_close(v, u, rtol=1e-10, atol=1e-12)


def test_inplace_version_counter_error(cpu_backend):
    """Something else still needs the input: autograd's version counter refuses the backward
    with its own clear error, instead of a silently wrong gradient."""
    bn = batchnorm.BatchNorm2d(4, activation="leaky_relu", save="output", inplace=True)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    h = x * 2
    other = h.sin()  # sin saves its input h
    y = bn(h)  # overwrites h
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (y.sum() + other.sum()).backward()
    # a leaf that requires grad cannot be overwritten at all
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        bn(torch.randn(2, 4, 3, 3, requires_grad=True))
    # and the saved output itself is guarded the same way
    bn2 = batchnorm.BatchNorm2d(4, activation="leaky_relu", save="output")
    y2 = bn2(x * 2)
    y2.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y2.sum().backward()


@pytest.mark.parametrize("act", ["relu", "silu", "gelu", nn.ReLU(), ("leaky_relu", 0.0),
                                 ("leaky_relu", -0.1)])
def test_refuses_non_invertible(act):
    with pytest.raises(ValueError, match="not invertible.*leaky_relu"):
        batchnorm.BatchNorm2d(4, activation=act, save="output")


def test_mode_argument_errors():
    with pytest.raises(ValueError, match="save: expected one of .*'inputs'"):
        batchnorm.BatchNorm2d(4, save="inputs")
    with pytest.raises(TypeError, match="inplace: expected a bool, got int"):
        batchnorm.BatchNorm2d(4, activation="leaky_relu", save="output", inplace=1)
    with pytest.raises(ValueError, match="inplace: True needs save='output'"):
        batchnorm.BatchNorm2d(4, inplace=True)
    # an activation set after construction is checked at the call, before any state changes
    m = batchnorm.BatchNorm2d(4, activation="leaky_relu", save="output")
    m.activation = "relu"
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match="'relu' is not invertible"):
        m(torch.randn(2, 4, 3, 3))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    r = repr(batchnorm.BatchNorm2d(4, activation="leaky_relu", save="output", inplace=True))
    assert "save='output'" in r and "inplace=True" in r


def _saved_storages(fn) -> dict[int, int]:
    """The unique storages (data pointer → bytes) autograd saves while ``fn`` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return seen


@pytest.mark.parametrize("residual", [False, True])
def test_saved_tensor_count(cpu_backend, residual):
    """conv → BN + leaky ReLU (+ residual) → conv: the full-size tensors kept for backward.

    PyTorch keeps the conv's output (BN's input), the BN output / activation output, and the
    convs' inputs; ours with save='output' keeps only what the convolutions keep anyway (its
    output is conv2's input; the residual is conv1's input): the block adds no storage."""
    c, shape = 8, (16, 8, 16, 16)
    conv1, conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
    x = torch.randn(shape, requires_grad=True)
    full = x.numel() * x.element_size()

    def run(bn, act=None):
        h = bn(conv1(x), x) if residual and act is None else bn(conv1(x))
        if act is not None:
            h = act(h + x if residual else h)
        return conv2(h)

    counts = {}
    for name, bn, act in (
            ("torch", nn.BatchNorm2d(c), nn.LeakyReLU(inplace=True)),
            ("input", batchnorm.BatchNorm2d(c, activation="leaky_relu"), None),
            ("output", batchnorm.BatchNorm2d(c, activation="leaky_relu", save="output"), None)):
        seen = _saved_storages(lambda bn=bn, act=act: run(bn, act))
        big = [b for b in seen.values() if b >= full]
        small = sum(b for b in seen.values() if b < full)
        assert all(b == full for b in big)
        assert small < 0.1 * full  # the convolutions' weights and (C,) vectors
        counts[name] = len(big)
    # x (conv1's input), conv1's output, [the add's output,] BN/leaky output (conv2's input)
    assert counts == {"torch": 3, "input": 3, "output": 2}


def _leaky_net() -> nn.Module:
    """conv-BN-LReLU(inplace), conv-BN(+x)-LReLU, a BN before an in-place ReLU, a variant."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
            self.act = nn.LeakyReLU(0.1, inplace=True)
            self.relu = nn.ReLU(inplace=True)
            self.ghost = batchnorm.GhostBatchNorm2d(4, virtual_batch_size=2)

        def forward(self, x):
            h = self.act(self.bn1(self.conv1(x)))
            h = self.act(self.bn2(self.conv2(h)) + x)
            return self.ghost(self.relu(self.bn3(h)))

    return Net()


def test_fuse_switches_eligible_layers_and_reports_the_rest(cpu_backend):
    torch.manual_seed(0)
    model = _leaky_net().double()
    x = torch.randn(4, 4, 5, 5, dtype=torch.float64)
    fused, report = batchnorm.fuse(model, x, save="output")
    assert report.save is not None
    assert report.save.switched == ["bn1", "bn2"]
    assert "not invertible" in report.save.kept["bn3"]  # its relu was fused in
    assert "GhostBatchNorm2d" in report.save.kept["ghost"]
    assert "save='output'" in str(report) and "bn3: keeps save='input'" in str(report)
    assert fused.bn1.save == "output" and fused.bn3.save == "input"
    # the switched model trains as the original does
    ref = copy.deepcopy(model)
    names = sorted(dict(ref.named_parameters()))
    assert names == sorted(dict(fused.named_parameters()))
    g1 = torch.autograd.grad(ref(x).square().sum(), [ref.get_parameter(n) for n in names])
    g2 = torch.autograd.grad(fused(x).square().sum(), [fused.get_parameter(n) for n in names])
    for name, u, v in zip(names, g1, g2, strict=True):
        torch.testing.assert_close(v, u, rtol=1e-9, atol=1e-11, msg=name)
    with pytest.raises(ValueError, match="save: expected 'input' or 'output'"):
        batchnorm.fuse(model, x, save="outputs")


def test_fuse_keeps_input_where_the_output_is_written_in_place():
    """A layer whose (unfused) output an in-place op overwrites keeps its input: the saved
    output would not survive (autograd would refuse the backward)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(x)
            z = y * 2  # a second use: nothing is fused into bn
            return y.mul_(3) + z

    _, report = batchnorm.fuse(Net(), torch.randn(2, 4, 3, 3), save="output")
    assert report.save is not None and report.save.switched == []
    assert "mul_() writes its output in place" in report.save.kept["bn"]


def test_convert_model_and_save_output_switch_fused_layers_only():
    model = nn.Sequential(batchnorm.BatchNorm2d(4, activation="leaky_relu"), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4), nn.ReLU(inplace=True))
    with pytest.warns(UserWarning, match="2: keeps save='input' \\(no fused activation"):
        out = batchnorm.convert_model(model, save="output")
    assert out[0].save == "output" and out[2].save == "input"
    out(torch.randn(2, 4, 3, 3)).sum().backward()  # trains: the in-place ReLU is not a problem
    report = batchnorm.save_output(out, "input")
    assert report.switched == ["0", "2"] and out[0].save == "input"
    with pytest.raises(ValueError, match="save: expected 'input', or 'output' with target"):
        batchnorm.convert_model(model, target="torch", save="output")


def test_compile_and_forward_ad_fall_back_with_the_same_values():
    """Under torch.compile and forward-mode AD the mode runs the ordinary op with the same
    effective weight: the same outputs and gradients (no memory saved there); double backward
    through the eager mode is refused, not silently wrong."""
    import torch.autograd.forward_ad as fwad

    m = batchnorm.BatchNorm2d(4, activation="leaky_relu", save="output", dtype=torch.float64)
    with torch.no_grad():
        m.weight[0] = 0.0  # clamped to GAMMA_MIN on every path
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    y1 = m(x)
    g1 = torch.autograd.grad(y1.square().sum(), [x, m.weight])
    y2 = torch.compile(m, backend="eager")(x)
    g2 = torch.autograd.grad(y2.square().sum(), [x, m.weight])
    torch.testing.assert_close(y2, y1, rtol=0, atol=1e-14)
    for u, v in zip(g1, g2, strict=True):
        torch.testing.assert_close(v, u, rtol=1e-9, atol=1e-11)
    with fwad.dual_level():
        out = m(fwad.make_dual(x.detach(), torch.ones_like(x)))
        torch.testing.assert_close(fwad.unpack_dual(out).primal, y1.detach(), rtol=0, atol=1e-14)
    (g,) = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_inplace_training_forward_creates_no_tensor_of_the_input_size(fmt, monkeypatch):
    """On the Numba backend the training forward of inplace=True writes into the input's
    storage: no output-sized tensor is created (the other backends copy, see
    Backend.forward_train_into)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    if get_backend("cpu") is None:
        pytest.skip("the Numba backend is not importable here")
    monkeypatch.setenv("BATCHNORM_BACKEND", "cpu")
    bn = batchnorm.BatchNorm2d(8, activation="leaky_relu", save="output", inplace=True)
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    h = (x * 1).contiguous(memory_format=fmt)
    created: list[str] = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor) and t.numel() == h.numel() \
                        and t.untyped_storage().data_ptr() != h.untyped_storage().data_ptr():
                    created.append(str(func))
            return out

    with Count():
        y = bn(h)
    assert y is h and created == []
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
