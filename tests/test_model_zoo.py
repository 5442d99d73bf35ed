"""Real models: every torchvision classification model with a batch norm, and timm's families,
convert, train exactly as the original, and convert back.

The protocol (:func:`_check_training`), in float64 on a batch of 4 small images:

1. the original trains for a few SGD steps (seeded before the run, so dropout and stochastic
   depth draw their masks from the same generator state), then runs in eval mode;
2. its initial state is restored, it is converted (no layer refused, no PyTorch batch norm left,
   the same ``state_dict`` keys), and the same run is repeated with the same seed;
3. losses, final ``state_dict`` and eval output agree to 1e-7 relative to each tensor's largest
   magnitude (an absolute floor of 1e-9 for tensors that are zero in exact arithmetic and hold
   rounding noise only, such as the bias of a BN followed by another BN);
4. converting back restores every module's class and the ``state_dict`` keys, and the eval
   output.

Float64 grouped and depthwise convolutions run on PyTorch's slow reference path (one call per
group), which puts a training step of the larger models at tens of seconds on two cores. So
the whole protocol runs on the smallest model of each torchvision family, and the other members
of the family (same layer classes, more of them) get the structural part on the meta device:
conversion without refusal, parameters shared, keys, classes after the round trip.
``BATCHNORM_ZOO_FULL=1`` runs the training protocol on every model (docs/decisions.md).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import batchnorm
from batchnorm.nn.batchnorm import _BatchNormBase
from tests.vision import timm, torchvision

pytestmark = pytest.mark.slow

FULL = os.environ.get("BATCHNORM_ZOO_FULL", "") not in ("", "0")
STEPS = 2
RTOL, FLOOR = 1e-7, 1e-9

# torchvision: one trained model per kind of block -> the others (structural check). Trained:
# models whose float64 run takes seconds; those that take tens of seconds (their depthwise and
# grouped convolutions on PyTorch's float64 path, or VGG's 130M parameters, or MaxViT's
# 224-pixel minimum) get the structural check, grouped under the trained model closest to them.
# A torchvision
# release that adds a batch-norm model fails test_every_torchvision_model_is_listed until it is
# placed here.
TV_FAMILIES: dict[str, tuple[str, ...]] = {
    "resnet18": ("resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
                 "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d"),
    "densenet121": ("densenet161", "densenet169", "densenet201"),
    "mobilenet_v2": (),
    "mobilenet_v3_small": ("mobilenet_v3_large",),
    "efficientnet_b0": (*(f"efficientnet_b{i}" for i in range(1, 8)), "efficientnet_v2_s",
                        "efficientnet_v2_m", "efficientnet_v2_l"),
    "mnasnet0_5": ("mnasnet0_75", "mnasnet1_0", "mnasnet1_3"),
    "shufflenet_v2_x0_5": ("shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0"),
    "regnet_x_400mf": tuple(f"regnet_x_{s}" for s in ("800mf", "1_6gf", "3_2gf", "8gf", "16gf",
                                                       "32gf")),
    "regnet_y_400mf": tuple(f"regnet_y_{s}" for s in ("800mf", "1_6gf", "3_2gf", "8gf", "16gf",
                                                       "32gf", "128gf")),
    "googlenet": ("inception_v3",),
}
TV_UNTRAINED = ("vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn", "maxvit_t")
TV_TRAINED = tuple(TV_FAMILIES)
TV_STRUCTURAL = tuple(n for members in TV_FAMILIES.values() for n in members) + TV_UNTRAINED
# Model-specific arguments: the two Inception-style models skip scipy's slow truncated-normal
# init (any random init serves), and inception_v3's auxiliary head needs 299-pixel inputs, so it
# is left out (its main path takes 75 pixels).
TV_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": dict(init_weights=False),
    "inception_v3": dict(init_weights=False, aux_logits=False),
}
# 64 pixels: the last stage (stride 32) then has 2x2 positions, 16 values per channel in a batch
# of 4. At 32 pixels it has 4 values, whose variance can be tiny against their mean, and the
# relative rounding of the running variance grows by that ratio (1e-8 measured in DenseNet's
# last block), then through every later layer of the eval output.
SIZE = 64
TV_SIZE = {"inception_v3": 75, "maxvit_t": 224}

# A narrower, shorter Xception (timm's xception41p, pre-activation, with 1 middle block of 128
# channels instead of 8 of 728): the same module classes at a fraction of the float64 cost.
_SMALL_XCEPTION = [
    dict(in_chs=64, out_chs=64, stride=2),
    dict(in_chs=64, out_chs=128, stride=2),
    dict(in_chs=128, out_chs=128, stride=1),
    dict(in_chs=128, out_chs=(128, 256, 256), stride=2),
    dict(in_chs=256, out_chs=(256, 256, 512), no_skip=True, stride=1),
]

# timm: the smallest model of each family the issue names, Mish and hard-swish ones, and two that
# keep modules unfused (PReLU is not fused; a dropout between norm and activation).
TIMM_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet10t": ("resnet10t", {}),  # ResNet-D style: deep stem, average-pool downsampling
    "efficientnet": ("test_efficientnet", dict(drop_rate=0.2, drop_path_rate=0.2)),
    "mobilenetv3": ("mobilenetv3_small_050", dict(drop_rate=0.2)),  # hard-swish, hard-sigmoid
    "lcnet": ("lcnet_035", {}),  # hard-swish in every BatchNormAct2d
    "regnet": ("regnetx_002", {}),
    "cspnet": ("cs3darknet_focus_s", {}),
    "efficientnet_mish": ("test_efficientnet", dict(act_layer="mish")),
    "efficientnet_relu6": ("test_efficientnet", dict(act_layer="relu6")),
    "efficientnet_elu": ("test_efficientnet", dict(act_layer="elu")),
    "efficientnet_gelu_tanh": ("test_efficientnet", dict(act_layer="gelu_tanh")),  # timm's class
    "efficientnet_tanh": ("test_efficientnet", dict(act_layer="tanh")),
    "rexnet": ("rexnet_100", dict(width_mult=0.5)),  # half width: float64 depthwise cost
    "densenet": ("densenet121", {}),
    "dpn": ("dpn48b", {}),
    "xception": ("xception41p", dict(block_cfg=_SMALL_XCEPTION)),
    "kept_prelu": ("test_byobnet", dict(act_layer="prelu")),
    "kept_prelu_dropout": ("test_efficientnet", dict(act_layer="prelu", drop_rate=0.2,
                                                     drop_path_rate=0.1)),
}


@contextlib.contextmanager
def _on_meta() -> Iterator[None]:
    """Build modules with their parameters and buffers on the meta device (no memory, and the
    init functions do nothing). Not ``torch.device("meta")``: RegNet's builder computes its
    widths with tensors and reads them back, which a meta tensor cannot do."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(self: nn.Module, name: str, param: Any) -> None:
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(self, name, param)

    def buffer(self: nn.Module, name: str, tensor: Any, persistent: bool = True) -> None:
        register_buffer(self, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter = parameter  # type: ignore[method-assign]
    nn.Module.register_buffer = buffer  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
        nn.Module.register_buffer = register_buffer  # type: ignore[method-assign]


def _batchnorm_models() -> list[str]:
    tv = torchvision()
    names = []
    for name in tv.models.list_models(module=tv.models):
        with _on_meta():
            model = tv.models.get_model(name, **TV_KWARGS.get(name, {}))
        if any(isinstance(m, _BatchNorm) for m in model.modules()):
            names.append(name)
    return names


def test_every_torchvision_model_is_listed():
    assert sorted(_batchnorm_models()) == sorted(TV_TRAINED + TV_STRUCTURAL)


# -- the training protocol -----------------------------------------------------------------


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def _run(model: nn.Module, x: torch.Tensor, target: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``STEPS`` SGD steps in training mode from a fixed seed, then the eval output."""
    torch.manual_seed(1234)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    model.train()
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(_logits(model(x)), target)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    # Eval output with running statistics of this data and these weights: one no-grad training
    # forward with momentum 1. After a few steps the running averages are still near their
    # initial values, and a deep network's eval output then grows by orders of magnitude
    # (1e37 measured), amplifying rounding with it.
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 1.0
    with torch.no_grad():
        model(x)
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum
    model.eval()
    with torch.no_grad():
        y = _logits(model(x))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return torch.stack(losses), y, state


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if not want.is_floating_point():
        assert torch.equal(got, want), what
        return
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=RTOL, atol=max(FLOOR, RTOL * scale),
                               msg=lambda m: f"{what}: {m}")


def _classes(model: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(m)) for name, m in model.named_modules()]


def _check_training(build: Any, size: int) -> batchnorm.ConvertReport:
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # parameters are made in float64 directly
    try:
        model = build()
    finally:
        torch.set_default_dtype(previous)
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3])
    classes, keys = _classes(model), list(model.state_dict())
    initial = copy.deepcopy(model.state_dict())  # keeps the version metadata (MNASNet reads it)

    losses, y, state = _run(model, x, target)
    model.load_state_dict(initial)
    del initial
    ours, report = batchnorm.convert_model(model, return_report=True)
    assert not [n for n, m in ours.named_modules()
                if isinstance(m, _BatchNorm) and not isinstance(m, _BatchNormBase)]
    assert list(ours.state_dict()) == keys
    losses2, y2, state2 = _run(ours, x, target)
    _close(losses2, losses, "losses")
    _close(y2, y, "eval output")
    assert list(state2) == list(state)
    for k in state:
        _close(state2[k], state[k], k)

    back = batchnorm.convert_model(ours, "torch")
    assert _classes(back) == classes
    assert list(back.state_dict()) == keys
    with torch.no_grad():
        _close(_logits(back.eval()(x)), y, "eval output after converting back")
    return report


def _check_structure(build: Any) -> None:
    """Conversion and round trip on the meta device (no memory, no arithmetic)."""
    with _on_meta():
        model = build()
    classes, keys = _classes(model), list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    ours = batchnorm.convert_model(model)
    assert not [n for n, m in ours.named_modules()
                if isinstance(m, _BatchNorm) and not isinstance(m, _BatchNormBase)]
    assert list(ours.state_dict()) == keys
    assert [id(p) for p in ours.parameters()] == params
    back = batchnorm.convert_model(ours, "torch")
    assert _classes(back) == classes and list(back.state_dict()) == keys


def _tv_builder(name: str) -> Any:
    tv = torchvision()
    return lambda: tv.models.get_model(name, num_classes=10, **TV_KWARGS.get(name, {}))


@pytest.mark.parametrize("name", TV_TRAINED)
def test_torchvision_trains_exactly(name):
    _check_training(_tv_builder(name), TV_SIZE.get(name, SIZE))


@pytest.mark.parametrize("name", TV_STRUCTURAL)
def test_torchvision_larger_members_convert(name):
    if FULL:
        _check_training(_tv_builder(name), TV_SIZE.get(name, SIZE))
    else:
        _check_structure(_tv_builder(name))


@pytest.mark.parametrize("key", TIMM_MODELS)
def test_timm_trains_exactly(key):
    tm = timm()
    name, kwargs = TIMM_MODELS[key]
    report = _check_training(
        lambda: tm.create_model(name, pretrained=False, num_classes=10, **kwargs), SIZE)
    # the PReLU models keep it after the norm, unfused; every other activation here is fused
    assert bool(report.kept_unfused) == key.startswith("kept_"), str(report)
