"""Fold eval-mode batch normalization into the convolution or linear layer that feeds it.

In eval mode a batch-norm layer is a per-channel affine map ``y = x·scale + shift`` with
``scale = γ·rstd`` and ``shift = β - running_mean·scale`` (``rstd`` from :mod:`batchnorm.stats`).
When ``x`` is the output of a ``Conv*d``/``ConvTranspose*d``/``Linear`` that nothing else reads,
the map moves into that layer's weight and bias and the batch-norm layer disappears:

    W'[o] = W[o]·scale[o]            (output channel o; see _scale_weight for the layouts)
    b'[o] = b[o]·scale[o] + shift[o]  (b = 0 for a layer without bias)

The arithmetic is done in float64 and cast once to the layer's dtype. What the batch-norm layer
did after its affine map stays: a fused residual add and activation become a small module
(``nn.ReLU`` …, or :class:`FoldedEpilogue` for ``act(x + residual)``).

Pairs are found through ``torch.fx`` when the model traces (batch-norm layers are kept as leaf
modules), otherwise through ``nn.Sequential`` order (child ``i`` feeds child ``i + 1``). Every
batch-norm layer that is not folded is listed in the :class:`FoldReport` with the reason.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch
from torch import Tensor, fx, nn

from .. import stats as S
from ..activations import module_of, parse_activation

__all__ = ["fold", "FoldReport", "FoldedEpilogue", "is_batch_norm"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PRODUCERS = (*_CONV, *_CONV_T, nn.Linear)


def is_batch_norm(m: nn.Module) -> bool:
    """PyTorch's ``_BatchNorm`` (and so ours), or a frozen batch norm (by its buffers).

    Frozen layers (ours in ``batchnorm.nn.frozen``, torchvision's, detectron2's) keep
    ``weight``, ``bias``, ``running_mean`` and ``running_var`` as buffers and have ``eps``; they
    are recognised by that shape so that this module does not depend on any of them.
    """
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return True
    return _is_frozen(m)


def _is_frozen(m: nn.Module) -> bool:
    return ("FrozenBatchNorm" in type(m).__name__ and hasattr(m, "eps")
            and isinstance(getattr(m, "running_mean", None), Tensor)
            and isinstance(getattr(m, "running_var", None), Tensor))


@dataclass
class FoldReport:
    """What :func:`fold` did: ``folded`` pairs ``(producer, batch_norm)`` by qualified name, and
    ``not_folded`` pairs ``(batch_norm, reason)``; ``method`` is ``"fx"`` or ``"sequential"``
    (``trace_error`` says why tracing failed)."""

    method: str = "fx"
    folded: list[tuple[str, str]] = field(default_factory=list)
    not_folded: list[tuple[str, str]] = field(default_factory=list)
    trace_error: str | None = None
    max_abs_diff: float | None = None

    def __str__(self) -> str:
        lines = [f"fold ({self.method}): {len(self.folded)} folded, "
                 f"{len(self.not_folded)} not folded"]
        if self.trace_error:
            lines.append(f"  torch.fx could not trace the model: {self.trace_error}")
        lines += [f"  folded {bn!r} into {prod!r}" for prod, bn in self.folded]
        lines += [f"  kept {bn!r}: {why}" for bn, why in self.not_folded]
        if self.max_abs_diff is not None:
            lines.append(f"  max |folded - original| on the example input: {self.max_abs_diff:.3g}")
        return "\n".join(lines)


class FoldedEpilogue(nn.Module):
    """What remains of a folded batch-norm layer with a fused residual: ``act(x + residual)``,
    then the modules the layer kept unfused after it, if any (``after``)."""

    def __init__(self, activation: nn.Module | None, after: tuple[nn.Module, ...] = ()) -> None:
        super().__init__()
        self.act = activation if activation is not None else nn.Identity()
        self.after = nn.Sequential(*after) if after else None

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        y = self.act(input if residual is None else input + residual)
        return y if self.after is None else self.after(y)


class _LeafTracer(fx.Tracer):
    """Keeps every batch-norm layer (and producer) a single ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_batch_norm(m) or isinstance(m, _PRODUCERS) or super().is_leaf_module(
            m, module_qualified_name)


@overload
def fold(model: nn.Module, example_input: Any = ..., *,
         return_report: Literal[False] = ...) -> nn.Module: ...
@overload
def fold(model: nn.Module, example_input: Any = ..., *,
         return_report: Literal[True]) -> tuple[nn.Module, FoldReport]: ...


def fold(model: nn.Module, example_input: Any = None, *,
         return_report: bool = False) -> nn.Module | tuple[nn.Module, FoldReport]:
    """Return an inference copy of ``model`` with batch norm folded into the layers before it.

    Args:
        model: any module; it is not modified (a deep copy, put in eval mode, is folded).
        example_input: a tensor (or tuple of positional inputs) the model accepts. With it, the
            output rank of every ``Linear`` is checked (folding into a ``Linear`` is only right
            when its output is ``(N, C)``, so ``Linear`` pairs are folded only when it is
            given), and the largest difference between the folded and the original model's
            outputs on it is recorded as ``max_abs_diff`` in the report.
        return_report: also return the :class:`FoldReport` (it is always available as the
            returned model's ``fold_report`` attribute).

    Returns:
        The folded model: an ``fx.GraphModule`` when the model traced, else the copy with
        ``nn.Sequential`` pairs folded in place.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    args: tuple[Any, ...] | None = None
    if example_input is not None:
        args = example_input if isinstance(example_input, tuple) else (example_input,)
    work = copy.deepcopy(model).eval()
    ranks, expected = _output_ranks(work, args) if args is not None else (None, None)
    report = FoldReport()
    try:
        graph = _LeafTracer().trace(work)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "use Sequential order"
        report.method, report.trace_error = "sequential", f"{type(exc).__name__}: {exc}"
        result: nn.Module = _fold_sequential(work, ranks, report)
    else:
        name = type(work).__name__
        gm = fx.GraphModule(work, graph, class_name=name)
        result = _fold_fx(gm, ranks, report)
        seen = {name for _, name in report.folded} | {name for name, _ in report.not_folded}
        for name, m in work.named_modules():
            if is_batch_norm(m) and name not in seen:
                report.not_folded.append((name or "<root>", "torch.fx traced through it (it is "
                                          "not called as a module in the graph)"))
    if args is not None:
        with torch.no_grad():
            report.max_abs_diff = _max_diff(result(*args), expected)
    result.fold_report = report  # type: ignore[assignment]
    return (result, report) if return_report else result


def _max_diff(a: Any, b: Any) -> float:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return max((_max_diff(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return max((_max_diff(a[k], b[k]) for k in a), default=0.0)
    return float("nan")


def _output_ranks(model: nn.Module, args: tuple[Any, ...]) -> tuple[dict[str, int], Any]:
    """Output rank of every producer layer on the example input, and the model's output."""
    ranks: dict[str, int] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, _PRODUCERS):
            def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
                ranks[name] = out.dim() if isinstance(out, Tensor) else -1
            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(*args)
    finally:
        for h in handles:
            h.remove()
    return ranks, out


def _why_not(bn: Any, producer: nn.Module | None, pname: str | None,
             ranks: dict[str, int] | None, source: str | None = None) -> str | None:
    """The reason ``bn`` cannot fold into ``producer``, ``None`` when it can."""
    if producer is None or not isinstance(producer, _PRODUCERS):
        kind = source or ("nothing" if producer is None else type(producer).__name__)
        return (f"its input is not the output of a Conv/ConvTranspose/Linear layer "
                f"(it comes from {kind})")
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        return "it has no running statistics (track_running_stats=False uses batch statistics)"
    out_channels = producer.out_features if isinstance(producer, nn.Linear) \
        else producer.out_channels
    if bn.running_mean.numel() != out_channels:
        return (f"it has {bn.running_mean.numel()} channels but {pname!r} produces "
                f"{out_channels}")
    if isinstance(producer, nn.Linear):
        if ranks is None:
            return ("folding into a Linear is only right for (N, C) outputs; pass "
                    "example_input so that the output rank can be checked")
        if ranks.get(pname or "", -1) != 2:
            return (f"{pname!r} produces a {ranks.get(pname or '', -1)}-D output; batch norm "
                    "then normalizes dimension 1, which is not the Linear's feature dimension")
    return None


def _epilogue(bn: Any, with_residual: bool) -> nn.Module | None:
    """The module that replaces ``bn`` once folded (``None``: nothing remains)."""
    act = module_of(*parse_activation(getattr(bn, "activation", None)))
    after = tuple(bn.unfused_modules().values()) if hasattr(bn, "unfused_modules") else ()
    if with_residual:
        return FoldedEpilogue(act, after)
    if after:
        return nn.Sequential(*((act,) if act is not None else ()), *after)
    return act


@torch.no_grad()
def _fold_pair(producer: Any, bn: Any) -> None:
    """Rewrite ``producer``'s weight and bias so that it also computes ``bn`` (eval mode)."""
    weight: Tensor = producer.weight  # type: ignore[assignment]
    f64 = torch.float64
    mean = bn.running_mean.to(f64)
    rstd = S.rstd_from_var(bn.running_var.to(f64), float(bn.eps))
    gamma = getattr(bn, "weight", None)
    beta = getattr(bn, "bias", None)
    scale = S.scale_of(rstd, None if gamma is None else gamma.to(f64))
    shift = -mean * scale if beta is None else beta.to(f64) - mean * scale
    new_w = _scale_weight(producer, weight.to(f64), scale)
    old_b = producer.bias
    b = torch.zeros_like(scale) if old_b is None else old_b.to(f64)
    new_b = b * scale + shift
    producer.weight = nn.Parameter(new_w.to(weight.dtype), requires_grad=weight.requires_grad)
    producer.bias = nn.Parameter(new_b.to(weight.dtype).to(weight.device),
                                 requires_grad=weight.requires_grad)


def _scale_weight(producer: nn.Module, w: Tensor, scale: Tensor) -> Tensor:
    """Multiply output channel ``o`` of the weight by ``scale[o]``.

    Conv and Linear weights are ``(out, in/groups, *k)``: output channels lead. ConvTranspose
    weights are ``(in, out/groups, *k)``: output channel ``o = g·(out/groups) + j`` of group
    ``g`` lives at ``[g·(in/groups):(g+1)·(in/groups), j]``, so the weight is viewed as
    ``(groups, in/groups, out/groups, *k)`` and scaled along its third dimension.
    """
    if isinstance(producer, _CONV_T):
        g = producer.groups
        cin, per_group = w.shape[0], w.shape[1]
        k = w.shape[2:]
        wv = w.reshape(g, cin // g, per_group, *k)
        sv = scale.reshape(g, 1, per_group, *([1] * len(k)))
        return (wv * sv).reshape(w.shape)
    return w * scale.reshape(-1, *([1] * (w.dim() - 1)))


# --------------------------------------------------------------------------------------------
# torch.fx


def _fold_fx(gm: fx.GraphModule, ranks: dict[str, int] | None,
             report: FoldReport) -> fx.GraphModule:
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not is_batch_norm(modules[node.target]):
            continue
        bn_name = str(node.target)
        bn = modules[bn_name]
        src = node.args[0] if node.args else node.kwargs.get("input")
        residual = node.args[1] if len(node.args) > 1 else node.kwargs.get("residual")
        producer = pname = None
        if isinstance(src, fx.Node) and src.op == "call_module":
            pname = str(src.target)
            producer = modules[pname]
        reason = _why_not(bn, producer, pname, ranks, _describe(src, producer))
        if reason is None and calls[bn_name] > 1:
            reason = f"the layer is called {calls[bn_name]} times in forward (shared module)"
        if reason is None and pname is not None and calls[pname] > 1:
            reason = f"{pname!r} is called {calls[pname]} times in forward (shared module)"
        if reason is None and isinstance(src, fx.Node) and len(src.users) > 1:
            others = sorted(str(u) for u in src.users if u is not node)
            reason = (f"the output of {pname!r} is also used by {', '.join(others)}; folding "
                      "would change what they see")
        if reason is not None:
            report.not_folded.append((bn_name, reason))
            continue
        assert producer is not None and pname is not None
        _fold_pair(producer, bn)
        rest = _epilogue(bn, residual is not None)
        if rest is None:
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            gm.delete_submodule(bn_name)
        else:
            _set_submodule(gm, bn_name, rest)
            node.args = (src,) if residual is None else (src, residual)
            node.kwargs = {}
        report.folded.append((pname, bn_name))
    gm.graph.lint()
    gm.recompile()
    return gm


def _describe(src: Any, producer: nn.Module | None) -> str:
    if not isinstance(src, fx.Node):
        return f"a constant {src!r}"
    if src.op == "call_module":
        return f"{type(producer).__name__} {src.target!r}"
    if src.op in ("call_function", "call_method"):
        name = getattr(src.target, "__name__", str(src.target))
        return f"{src.op} {name!r}"
    return f"{src.op} {src.target!r}"


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent), name, new)


# --------------------------------------------------------------------------------------------
# nn.Sequential order


def _fold_sequential(model: nn.Module, ranks: dict[str, int] | None,
                     report: FoldReport) -> nn.Module:
    done: set[str] = set()
    replacements: list[tuple[str, nn.Module]] = []
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for i, (name, child) in enumerate(children):
            if not is_batch_norm(child) or i == 0:
                continue
            pname_local, prev = children[i - 1]
            pname = f"{seq_name}.{pname_local}" if seq_name else pname_local
            bn_name = f"{seq_name}.{name}" if seq_name else name
            reason = _why_not(child, prev, pname, ranks)
            if reason is not None:
                report.not_folded.append((bn_name, reason))
                done.add(bn_name)
                continue
            _fold_pair(prev, child)
            # a layer taking a residual may be called with one by a custom forward
            takes_residual = "residual" in inspect.signature(child.forward).parameters
            rest = _epilogue(child, with_residual=takes_residual)
            replacements.append((bn_name, rest if rest is not None else nn.Identity()))
            report.folded.append((pname, bn_name))
            done.add(bn_name)
    for name, m in model.named_modules():
        if name not in done and is_batch_norm(m):
            report.not_folded.append(
                (name or "<root>", "not directly after a Conv/ConvTranspose/Linear inside an "
                 "nn.Sequential, and the model did not trace with torch.fx"))
    for path, new in replacements:
        if path:
            _set_submodule(model, path, new)
    return model
