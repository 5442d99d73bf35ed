"""Fuse the activation and the residual add that follow a batch-norm layer into the layer.

Real models call their activation as a separate module (very often ``nn.ReLU(inplace=True)``)
and add a block's shortcut outside the norm layer, as torchvision's ``BasicBlock``::

    out = self.bn2(self.conv2(out))
    out += identity
    out = self.relu(out)

Each of those is one more pass over memory forward and backward. :func:`fuse` finds them with
``torch.fx`` and moves them into our layer (``activation=…`` and the ``residual`` argument), whose
kernels apply them in the same pass and recompute the activation's argument in the backward
instead of storing it. Patterns, with ``bn`` a batch-norm layer called once and its output used
once:

- ``act(bn(x))`` — ``act`` a module (``nn.ReLU()``, in place or not, …), a function
  (``F.relu``, ``torch.relu_``, ``F.leaky_relu(·, s)``, …) or a method (``.relu()``, ``.relu_()``);
- ``act(bn(x) + other)`` and ``act(other + bn(x))`` — ``+``, ``+=``, ``torch.add``, ``.add``,
  ``.add_``; with ``act`` absent too (the residual alone is fused). A residual is fused only
  where ``example_input`` showed both operands with the same shape and dtype (an add that
  broadcasts is not a residual), and never where fusing would skip an in-place write that
  something else reads.

Every other batch-norm layer is converted as :func:`~batchnorm.tools.convert.convert_model`
converts it. A model that does not trace is converted the same way, with the reason in the
report. The result computes what the model computed: the same outputs, gradients and running
statistics (to the rounding of a different summation order).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..activations import parse_activation, spec_of
from ..kernels import Backend, select
from ..nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .convert import convert_model
from .fold import is_batch_norm
from .save_output import SaveReport, save_output, switch_graph

__all__ = ["fuse", "FuseReport"]

_PLAIN = (BatchNorm1d, BatchNorm2d, BatchNorm3d)

# functions and methods that are activations, as the module that computes the same
# (parse_activation then says whether our kernels fuse it)
_FUNCTIONS: dict[Any, Any] = {
    F.relu: lambda a, k: nn.ReLU(), torch.relu: lambda a, k: nn.ReLU(),
    torch.relu_: lambda a, k: nn.ReLU(), F.relu_: lambda a, k: nn.ReLU(),
    F.silu: lambda a, k: nn.SiLU(), F.gelu: lambda a, k: nn.GELU(k.get("approximate", "none")),
    F.leaky_relu: lambda a, k: nn.LeakyReLU(_arg(a, k, 1, "negative_slope", 0.01)),
    F.leaky_relu_: lambda a, k: nn.LeakyReLU(_arg(a, k, 1, "negative_slope", 0.01)),
    torch.sigmoid: lambda a, k: nn.Sigmoid(), torch.tanh: lambda a, k: nn.Tanh(),
    F.sigmoid: lambda a, k: nn.Sigmoid(), F.tanh: lambda a, k: nn.Tanh(),
    F.relu6: lambda a, k: nn.ReLU6(), F.hardswish: lambda a, k: nn.Hardswish(),
    F.hardsigmoid: lambda a, k: nn.Hardsigmoid(), F.mish: lambda a, k: nn.Mish(),
    F.elu: lambda a, k: nn.ELU(_arg(a, k, 1, "alpha", 1.0)),
}
_METHODS: dict[str, Any] = {
    "relu": lambda a, k: nn.ReLU(), "relu_": lambda a, k: nn.ReLU(),
    "sigmoid": lambda a, k: nn.Sigmoid(), "sigmoid_": lambda a, k: nn.Sigmoid(),
    "tanh": lambda a, k: nn.Tanh(), "tanh_": lambda a, k: nn.Tanh(),
}
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
# an add that writes into its first operand
_IN_PLACE_ADDS = (operator.iadd, "add_")


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


@dataclass
class FuseReport:
    """What :func:`fuse` did with every batch-norm layer, by qualified name: ``fused`` maps a
    layer to what it now computes (``"relu"``, ``"add + relu"``, ``"add"``), ``unfused`` to the
    reason nothing was fused into it (it is still converted); ``method`` is ``"fx"`` or
    ``"convert"`` (the model did not trace: ``trace_error`` says why)."""

    method: str = "fx"
    fused: dict[str, str] = field(default_factory=dict)
    unfused: dict[str, str] = field(default_factory=dict)
    trace_error: str | None = None
    save: SaveReport | None = None  # with fuse(..., save="output"): the layers that switched

    @property
    def layers(self) -> list[str]:
        """Every batch-norm layer of the model."""
        return sorted({*self.fused, *self.unfused})

    def __str__(self) -> str:
        lines = [f"fuse ({self.method}): {len(self.fused)} layers fused, "
                 f"{len(self.unfused)} not"]
        if self.trace_error:
            lines.append(f"  torch.fx could not trace the model: {self.trace_error}")
        lines += [f"  {name}: fused {what}" for name, what in self.fused.items()]
        lines += [f"  {name}: not fused ({why})" for name, why in self.unfused.items()]
        if self.save is not None:
            lines.append(str(self.save))
        return "\n".join(lines)


class _Tracer(fx.Tracer):
    """Traces only through the modules that hold a batch-norm layer: every batch-norm layer
    and every module without one stays a single ``call_module`` node. Those modules keep their
    own forward, so a ``self.training`` branch in them (dropout, stochastic depth) still
    follows the mode instead of being frozen into the graph at trace time."""

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self._holders = {id(m) for m in root.modules()
                         if any(is_batch_norm(s) for s in m.modules())}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_batch_norm(m) or id(m) not in self._holders


def _trace(model: nn.Module) -> fx.Graph:
    """The model's graph, the same in training and in eval mode (else a ``ValueError``: the
    graph would keep the branch of one mode)."""
    training = model.training
    try:
        graphs = []
        for mode in (True, False):
            model.train(mode)
            graphs.append(_Tracer(model).trace(model))
    finally:
        model.train(training)
    if _signature(graphs[0]) != _signature(graphs[1]):
        raise ValueError("its forward traces to different graphs in training and eval mode")
    return graphs[0] if training else graphs[1]


def _signature(graph: fx.Graph) -> list[tuple[str, str, str]]:
    return [(n.op, str(n.target), str(n.args)) for n in graph.nodes]


def fuse(model: nn.Module, example_input: Any = None, *,
         save: str = "input") -> tuple[nn.Module, FuseReport]:
    """Return a copy of ``model`` with its batch-norm layers converted to ours and the
    activations and residual adds that follow them fused in, and a :class:`FuseReport`.

    Args:
        model: any module; it is not modified.
        example_input: a tensor (or tuple of positional inputs) the model accepts. With it the
            shapes of the operands of every add are known, and residual adds are fused;
            without it only activations are.
        save: ``"output"`` switches every layer that can take it to the memory mode
            ``save="output"`` once fused (:mod:`batchnorm.tools.save_output`; the report's
            ``save`` says which did and why the others did not). Default: ``"input"``

    Returns:
        ``(fused_model, report)``: an ``fx.GraphModule`` with the model's submodules (same
        ``state_dict`` keys), or, when the model does not trace, the converted copy.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if save not in ("input", "output"):
        raise ValueError(f"save: expected 'input' or 'output', got {save!r}")
    args: tuple[Any, ...] | None = None
    if example_input is not None:
        args = example_input if isinstance(example_input, tuple) else (example_input,)
    work = convert_model(copy.deepcopy(model))
    report = FuseReport()
    names = [name or "<root>" for name, m in work.named_modules() if is_batch_norm(m)]
    try:
        gm = fx.GraphModule(work, _trace(work), class_name=type(work).__name__)
        lost = sorted(set(work.state_dict()) - set(gm.state_dict()))
        if lost:
            raise ValueError(f"the traced graph does not use {len(lost)} of its parameters or "
                             f"buffers ({', '.join(lost[:3])}{', ...' if len(lost) > 3 else ''})")
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "convert only"
        report.method, report.trace_error = "convert", f"{type(exc).__name__}: {exc}"
        report.unfused = dict.fromkeys(names, "the model was converted without fusion (see "
                                       "trace_error)")
        if save != "input":
            report.save = save_output(work, save)
        return work, report
    if args is not None:
        _propagate_shapes(gm, args, work.training)
    # the memory mode needs the activation inside the layer, whatever the speed of the fusion
    _fuse_graph(gm, report, speed_rule=save == "input")
    for name in names:
        if name not in report.fused and name not in report.unfused:
            report.unfused[name] = "torch.fx traced through it (not called as a module)"
    gm.graph.eliminate_dead_code()
    if save != "input":
        report.save = switch_graph(gm, save)
    gm.graph.lint()
    gm.recompile()
    return gm, report


def _propagate_shapes(gm: fx.GraphModule, args: tuple[Any, ...], training: bool) -> None:
    """Record every node's output shape and dtype (``meta['tensor_meta']``) from one run on
    ``args`` in eval mode, leaving no trace: running statistics, counters and the random
    number generators are as they were."""
    from torch.fx.passes.shape_prop import ShapeProp

    saved = {k: v.clone() for k, v in gm.state_dict().items()}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            ShapeProp(gm.eval()).propagate(*args)
    finally:
        gm.load_state_dict(saved)
        gm.train(training)


def _backend_of(model: nn.Module) -> Backend | None:
    """The backend our layers will run on, judged from the model's first floating parameter
    (``None`` without one: then every activation we fuse is fused)."""
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    return None if p is None else select(torch.empty((2, 1), dtype=p.dtype, device=p.device))


def _fuse_graph(gm: fx.GraphModule, report: FuseReport, speed_rule: bool = True) -> None:
    backend = _backend_of(gm) if speed_rule else None
    for node in list(gm.graph.nodes):  # nn.Identity placeholders (timm's drop_block, aa, …)
        if node.op == "call_module" and type(gm.get_submodule(str(node.target))) is nn.Identity \
                and len(node.args) == 1 and not node.kwargs:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not is_batch_norm(gm.get_submodule(str(node.target))):
            continue
        name = str(node.target)
        bn = gm.get_submodule(name)
        if type(bn) in _PLAIN and bn.activation is not None:  # type: ignore[attr-defined]
            act_name = parse_activation(bn.activation)[0]  # type: ignore[attr-defined]
            report.fused[name] = f"{act_name} (its own, kept by convert_model)"
            continue
        why = _why_not(bn, node, calls[name])
        if why is not None:
            report.unfused[name] = why
            continue
        users = list(node.users)
        residual, tail = None, node
        if _is_add(users[0]):
            residual, why = _residual_of(users[0], node)
            if residual is None:
                report.unfused[name] = why or "its output goes to an add that is not fused"
                continue
            tail = users[0]
        act, act_node, why = None, None, None
        if len(tail.users) == 1:
            act, why = _activation_of(gm, next(iter(tail.users)), tail, backend)
            if act is not None:
                act_node = next(iter(tail.users))
        if residual is None and act_node is None:
            report.unfused[name] = why or "no activation or residual add follows it"
            continue
        if act is not None:
            bn.activation = spec_of(*parse_activation(act))
        if residual is not None:
            node.args = (node.args[0], residual)
            tail.prepend(node)  # after the residual's producer (the add came after both)
        last = act_node if act_node is not None else tail
        if last is not node:
            last.replace_all_uses_with(node)
            for dead in (act_node, tail if tail is not node else None):
                if dead is not None:
                    gm.graph.erase_node(dead)
        done = [w for w, on in (("add", residual is not None), (_act_name(act), act is not None))
                if on]
        report.fused[name] = " + ".join(done)


def _why_not(bn: nn.Module, node: fx.Node, calls: int) -> str | None:
    if type(bn) not in _PLAIN:
        return f"{type(bn).__name__} is not a plain batch-norm layer"
    kept = getattr(bn, "_unfused", ())
    if kept:  # they run after the layer's own activation: nothing can be fused behind them
        return f"it keeps {', '.join(kept)} after it unfused (convert_model)"
    if len(node.args) != 1 or node.kwargs:
        return "it is already called with a residual"
    if calls != 1:
        return f"the layer is called {calls} times (one fused activation would apply to all)"
    if len(node.users) != 1:
        return f"its output is used {len(node.users)} times"
    return None


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return node.target is not torch.add or ("alpha" not in node.kwargs
                                                and len(node.args) == 2)
    return node.op == "call_method" and node.target in _ADD_METHODS and len(node.args) == 2 \
        and not node.kwargs


def _residual_of(add: fx.Node, bn_node: fx.Node) -> tuple[fx.Node | None, str | None]:
    """The other operand of ``add`` when it can become the residual of ``bn_node``."""
    if len(add.args) != 2 or not all(isinstance(a, fx.Node) for a in add.args):
        return None, "its output is added to something that is not a tensor"
    first, second = add.args
    other = second if first is bn_node else first
    assert isinstance(other, fx.Node)
    if other is bn_node:
        return None, "its output is added to itself"
    in_place = add.target in _IN_PLACE_ADDS
    if in_place and first is other and len(other.users) > 1:
        # ``other += bn(x)`` writes into ``other``, which something else reads
        return None, "its output is added in place into a tensor that is read elsewhere"
    meta_a, meta_b = bn_node.meta.get("tensor_meta"), other.meta.get("tensor_meta")
    if meta_a is None or meta_b is None:
        return None, "a residual add is fused only with example_input (to check its shapes)"
    if getattr(meta_b, "shape", None) != meta_a.shape or \
            getattr(meta_b, "dtype", None) != meta_a.dtype:
        return None, "the add's operands differ in shape or dtype (it broadcasts)"
    return other, None


def _activation_of(gm: fx.GraphModule, node: fx.Node, source: fx.Node,
                   backend: Backend | None) -> tuple[nn.Module | None, str | None]:
    """The activation ``node`` applies to ``source``, as a module we fuse, or why not."""
    make = None
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if len(node.args) != 1 or node.kwargs or not _is_activation_module(m):
            return None, None
        make = lambda a, k: m  # noqa: E731
    elif node.op == "call_function" and node.target in _FUNCTIONS:
        make = _FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in _METHODS:
        make = _METHODS[node.target]
    if make is None or not node.args or node.args[0] is not source:
        return None, None
    rest, kwargs = tuple(node.args[1:]), dict(node.kwargs)
    kwargs.pop("inplace", None)
    if any(isinstance(a, fx.Node) for a in (*rest, *kwargs.values())):
        return None, None
    module = make((source, *rest), kwargs)
    try:
        name = parse_activation(module)[0]
    except (TypeError, ValueError):
        return None, f"the activation after it ({module!r}) is not one we fuse"
    if backend is not None and not backend.fuses_fast(name):
        return None, (f"{name} fused is slower on the {backend.name} backend than after the "
                      "layer (see the performance page)")
    return module, None


def _is_activation_module(m: nn.Module) -> bool:
    """A module of ``torch.nn``'s activations (or one our activation table knows)."""
    if type(m).__module__ == "torch.nn.modules.activation":
        return True
    try:
        parse_activation(m)
    except (TypeError, ValueError):
        return False
    return True


def _act_name(act: nn.Module | None) -> str:
    return "" if act is None else parse_activation(act)[0]
