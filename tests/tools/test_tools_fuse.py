"""batchnorm.fuse: patterns found and rewritten, exactness in float64 training against the
original model, the fallback for a model that does not trace, and a report naming every layer."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import batchnorm
from batchnorm import kernels
from tests.vision import timm, torchvision


def _train(model: nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int = 3):
    """Losses, final gradients and state of ``steps`` SGD steps, then the eval output."""
    torch.manual_seed(123)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, target) if out.dim() == 2 else out.square().mean()
        loss.backward()
        losses.append(loss.detach())
        opt.step()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        evaluated = model(x)
    return torch.stack(losses), grads, state, evaluated


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """Relative to the tensor's scale (an entry near zero carries the rounding of its
    neighbours: a gradient is a sum of many products), with a floor far above float64's
    rounding for tensors that are zero in exact arithmetic (a bias whose layer feeds a
    batch norm has a gradient of 1e-18, not 0)."""
    err = float((actual.double() - expected.double()).abs().max()) if expected.numel() else 0.0
    scale = float(expected.double().abs().max()) if expected.numel() else 0.0
    assert err <= rtol * scale + 1e-12, f"{what}: max error {err:.3g}, scale {scale:.3g}"


def _assert_same_training(original: nn.Module, fused: nn.Module, x, target, steps=3,
                          rtol=1e-7):
    a = _train(original, x, target, steps)
    b = _train(fused, x, target, steps)
    _close(b[0], a[0], rtol, "losses")
    assert b[1].keys() == a[1].keys()
    for k in a[1]:
        _close(b[1][k], a[1][k], rtol, f"gradient of {k}")
    assert b[2].keys() == a[2].keys()
    for k in a[2]:
        _close(b[2][k], a[2][k], rtol, f"state {k}")
    _close(b[3], a[3], rtol, "eval output")


class Patterns(nn.Module):
    """One block per pattern; ``kind`` picks the activation and add forms."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.bn2 = nn.BatchNorm2d(6)
        self.bn3 = nn.BatchNorm2d(6)
        self.act = nn.ReLU(inplace=True) if kind == "module_inplace" else nn.ReLU()
        self.soft = nn.Softplus()

    def forward(self, x):
        x = self.conv(x)
        k = self.kind
        y = self.bn1(x)
        if k in ("module", "module_inplace"):
            y = self.act(y)
        elif k == "functional":
            y = F.relu(y)
        elif k == "functional_inplace":
            y = torch.relu_(y)
        elif k == "leaky":
            y = F.leaky_relu(y, 0.2)
        elif k == "method":
            y = y.relu()
        z = self.bn2(y)
        if k in ("module", "module_inplace", "functional"):
            z = z + x  # bn first
        elif k == "functional_inplace":
            z += x
        elif k == "leaky":
            z = x + z  # bn second
        elif k == "method":
            z = torch.add(x, z)
        z = self.act(z) if k != "leaky" else F.leaky_relu(z, 0.2, inplace=True)
        return self.soft(self.bn3(z))  # an activation we do not fuse


@pytest.mark.parametrize("kind", ["module", "module_inplace", "functional",
                                  "functional_inplace", "leaky", "method"])
def test_patterns_are_fused_and_exact(cpu_backend, kind):
    torch.manual_seed(0)
    model = Patterns(kind).double()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    fused, report = batchnorm.fuse(model, example_input=x)
    assert isinstance(fused, fx.GraphModule)
    act = "leaky_relu" if kind == "leaky" else "relu"
    if kernels.select(torch.empty(2, 1, dtype=x.dtype)).fuses_fast(act):
        assert report.fused == {"bn1": act, "bn2": f"add + {act}"}
        assert fused.get_submodule("bn2").activation is not None
    else:  # the cpu backend leaves leaky ReLU after the layer: only the add is fused
        assert report.fused == {"bn2": "add"} and "slower" in report.unfused["bn1"]
    assert "Softplus" in report.unfused["bn3"]
    assert report.layers == ["bn1", "bn2", "bn3"]
    # the rewritten graph calls no activation or add after bn1/bn2
    ops = [n.target for n in fused.graph.nodes if n.op == "call_function"]
    assert operator.add not in ops and operator.iadd not in ops and torch.add not in ops
    assert fused.state_dict().keys() == model.state_dict().keys()
    _assert_same_training(model, fused, x, torch.zeros(4, dtype=torch.long))
    # the original model is left as it was
    assert type(model.bn1) is nn.BatchNorm2d


def test_residual_needs_example_input_and_equal_shapes(cpu_backend):
    class Broadcast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.bn2 = nn.BatchNorm2d(4)
            self.bias = nn.Parameter(torch.randn(1, 4, 1, 1))

        def forward(self, x):
            return F.relu(self.bn(x) + self.bias) + F.relu(self.bn2(x) + x)

    model = Broadcast()
    x = torch.randn(3, 4, 2, 2)
    _, no_input = batchnorm.fuse(model)
    assert no_input.fused == {}
    assert "example_input" in no_input.unfused["bn2"]
    fused, report = batchnorm.fuse(model, example_input=x)
    assert report.fused == {"bn2": "add + relu"}
    assert "broadcasts" in report.unfused["bn"]
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


def test_in_place_add_into_a_tensor_read_elsewhere_is_not_fused(cpu_backend):
    class Aliasing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            idn = x * 2
            view = idn[:, :1]  # a view taken before the in-place add sees its write
            idn = idn.add_(self.bn(x))  # (torch.fx records ``+=`` as an out-of-place add)
            later = x * 3
            later = later.add_(self.bn2(x))  # read only through the add's result: fusable
            return F.relu(idn) + view + F.relu(later) + later

    model = Aliasing()
    x = torch.randn(3, 4, 2, 2)
    fused, report = batchnorm.fuse(model, example_input=x)
    assert "read elsewhere" in report.unfused["bn"]
    assert report.fused == {"bn2": "add"}
    torch.testing.assert_close(fused(x), model(x))


def test_shared_layer_and_reused_output_are_not_fused(cpu_backend):
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(4)
            self.bn2 = nn.BatchNorm1d(4)

        def forward(self, x):
            a = F.relu(self.bn(x))
            b = F.relu(self.bn(x + 1))
            c = self.bn2(x)
            return a + b + F.relu(c) * c

    model = Shared()
    x = torch.randn(8, 4)
    fused, report = batchnorm.fuse(model, example_input=x)
    assert "called 2 times" in report.unfused["bn"]
    assert "used 2 times" in report.unfused["bn2"]
    torch.testing.assert_close(fused(x), model(x))


def test_model_that_does_not_trace_falls_back_to_convert(cpu_backend):
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            y = self.bn(x)
            return F.relu(y) if y.sum() > 0 else y

    model = DataDependent()
    fused, report = batchnorm.fuse(model)
    assert report.method == "convert" and report.trace_error
    assert report.layers == ["bn"] and report.fused == {}
    assert isinstance(fused.bn, batchnorm.BatchNorm1d)
    assert "did not trace" not in str(report) or report.trace_error in str(report)


def test_mode_dependent_forward_falls_back(cpu_backend):
    class ModeBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            y = F.relu(self.bn(x))
            return y * 2 if self.training else y

    model = ModeBranch()
    fused, report = batchnorm.fuse(model)
    assert report.method == "convert"
    assert "training and eval" in (report.trace_error or "")
    x = torch.randn(5, 4)
    for mode in (True, False):
        model.train(mode)
        fused.train(mode)
        torch.testing.assert_close(fused(x), model(x))


def test_argument_errors():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        batchnorm.fuse("resnet")  # type: ignore[arg-type]


def _torchvision(name: str) -> nn.Module:
    return getattr(torchvision().models, name)(num_classes=5)


def _timm(name: str) -> nn.Module:
    return timm().create_model(name, num_classes=5)


REAL_MODELS = {
    "resnet18": (_torchvision, "relu", 8),
    "resnet50": (_torchvision, "relu", 16),
    "mobilenet_v3_small": (_torchvision, "relu", 0),
    "efficientnet_b0": (_torchvision, "silu", 0),
    "regnet_y_400mf": (_torchvision, "relu", 16),
    "timm/resnet18": (_timm, "relu", 8),
    "timm/efficientnet_b0": (_timm, "silu", 0),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_real_models_fuse_exactly(name):
    """torchvision's and timm's models: every batch-norm layer reported, the residual blocks
    fused, and float64 training identical to the original's (losses, gradients, running
    statistics, eval output)."""
    build, act, residual_blocks = REAL_MODELS[name]
    torch.manual_seed(0)
    model = build(name.split("/")[-1]).double()
    # batch 4 at 48x48: the last stage still sees 16 values per channel (2 values make batch
    # norm's gradient ill-conditioned enough that float64 rounding shows at 1e-6)
    x = torch.randn(4, 3, 48, 48, dtype=torch.float64)
    target = torch.tensor([1, 3, 0, 2])
    fused, report = batchnorm.fuse(model, example_input=x)
    assert report.method == "fx", report.trace_error
    names = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert report.layers == sorted(names)
    assert sum(v == f"add + {act}" for v in report.fused.values()) == residual_blocks
    if kernels.select(torch.empty(2, 1, dtype=x.dtype)).fuses_fast(act) or name.startswith("timm"):
        assert any(v.startswith(act) for v in report.fused.values())
    else:  # kept after the layer, where PyTorch's vectorized activation is faster
        assert any("slower" in v for v in report.unfused.values())
    assert fused.state_dict().keys() == model.state_dict().keys()
    _assert_same_training(copy.deepcopy(model), fused, x, target, steps=2)


def test_activations_slow_when_fused_stay_after_the_layer(monkeypatch):
    """The cpu backend keeps every activation but ReLU after the layer (its fused kernels are
    slower than the separate activation); a backend that fuses them fast gets them fused."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.SiLU(),
                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    x = torch.randn(2, 3, 4, 4)
    for name in ("cpu", "reference"):
        if kernels.get_backend(name) is None:
            continue
        monkeypatch.setenv(kernels.ENV_VAR, name)
        fused, report = batchnorm.fuse(model, example_input=x)
        assert report.fused["4"] == "relu"
        if name == "cpu":
            assert "1" not in report.fused and "slower on the cpu backend" in report.unfused["1"]
        else:
            assert report.fused["1"] == "silu"
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-6)
