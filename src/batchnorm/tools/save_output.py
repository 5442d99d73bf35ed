"""Switch a model's batch-norm layers to the memory mode ``save="output"``, with a report.

A layer can switch when it is one of the plain layers (``BatchNorm1d/2d/3d``), its activation is
invertible (``None`` or leaky ReLU with a positive slope; see
:func:`batchnorm.activations.refusal`), and
nothing writes its output in place afterwards (the backward reads the saved output: autograd
would refuse an overwritten one). :func:`batchnorm.fuse` knows the graph and checks the last
rule on it (``fuse(model, example, save="output")``); :func:`batchnorm.convert_model` and
:func:`save_output` do not see the code that uses a layer's output, so they switch only layers
whose activation is fused into them (nothing else touches the output before the next layer reads
it; a layer without one usually feeds an ``nn.ReLU(inplace=True)``).
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field

from torch import fx, nn

from ..activations import parse_activation, refusal
from ..nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ..ops.saved_output import SAVE_MODES
from .fold import is_batch_norm

__all__ = ["SaveReport", "save_output"]

_PLAIN = (BatchNorm1d, BatchNorm2d, BatchNorm3d)


@dataclass
class SaveReport:
    """Which batch-norm layers now keep their output (``switched``) and why the others keep
    their input (``kept``: layer name → reason)."""

    switched: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        return ([f"  {name}: save='output'" for name in self.switched]
                + [f"  {name}: keeps save='input' ({why})" for name, why in self.kept.items()])

    def __str__(self) -> str:
        head = f"save='output': {len(self.switched)} layers switched, {len(self.kept)} not"
        return "\n".join([head, *self.lines()])


def _why_not(m: nn.Module) -> str | None:
    if type(m) not in _PLAIN:
        return f"{type(m).__name__} has no save='output' mode"
    return refusal(*parse_activation(m.activation))  # type: ignore[attr-defined]


def _check(save: object) -> None:
    if save not in SAVE_MODES:
        raise ValueError(f"save: expected one of {SAVE_MODES}, got {save!r}")


def save_output(model: nn.Module, save: str = "output", *, warn: bool = False) -> SaveReport:
    """Set ``save`` on every batch-norm layer of ``model`` that can take it (in place);
    ``save="output"`` switches only layers with a fused invertible activation (see the module
    docstring), ``save="input"`` switches every plain layer back. ``warn``: also warn with the
    layers that could not switch."""
    _check(save)
    report = SaveReport()
    for name, m in model.named_modules():
        if not is_batch_norm(m):
            continue
        name = name or "<root>"
        why = _why_not(m)
        if why is None and save == "output" and m.activation is None:  # type: ignore[attr-defined]
            why = ("no fused activation: its output goes to code this cannot see, where an "
                   "in-place activation would overwrite the saved output; use "
                   "batchnorm.fuse(model, example_input, save='output')")
        if why is not None and save == "output":
            report.kept[name] = why
            continue
        if type(m) in _PLAIN:
            m.save = save  # type: ignore[assignment]
            report.switched.append(name)
    if warn and report.kept:
        warnings.warn(str(report), UserWarning, stacklevel=3)
    return report


def _in_place_user(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """A user of ``node`` that writes into it, described, or ``None``."""
    for user in node.users:
        if not user.args or user.args[0] is not node:
            continue
        if user.op == "call_module" and getattr(gm.get_submodule(str(user.target)), "inplace",
                                                False):
            return f"{user.target} writes its output in place"
        if user.op == "call_method" and str(user.target).endswith("_"):
            return f".{user.target}() writes its output in place"
        if user.op == "call_function" and (
                user.target is operator.iadd or user.kwargs.get("inplace", False)
                or getattr(user.target, "__name__", "").endswith("_")):
            return f"{getattr(user.target, '__name__', user.target)} writes its output in place"
    return None


def switch_graph(gm: fx.GraphModule, save: str) -> SaveReport:
    """:func:`save_output` for a traced model (:func:`batchnorm.fuse`): a layer switches when
    it can and no user of its output writes into it."""
    _check(save)
    report = SaveReport()
    targets: dict[str, str | None] = {}  # layer -> why not (a layer called twice: every call)
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        name = str(node.target)
        m = gm.get_submodule(name)
        if not is_batch_norm(m):
            continue
        why = _why_not(m) if save == "output" else None
        if why is None and save == "output":
            why = _in_place_user(gm, node)
        if targets.get(name) is None:
            targets[name] = why
    for name, why in targets.items():
        m = gm.get_submodule(name)
        if why is not None:
            report.kept[name] = why
        elif type(m) in _PLAIN:
            m.save = save  # type: ignore[assignment]
            report.switched.append(name)
    return report
