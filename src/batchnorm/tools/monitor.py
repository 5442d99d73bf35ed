"""Watch what batch normalization sees during training: Ioffe & Szegedy's Figure 1, and more.

:class:`ActivationMonitor` hooks any modules of a model (batch-norm layers by default; any module
given by name or instance, e.g. the ``nn.Sigmoid`` whose inputs Figure 1 plots) and records, every
``every``-th forward of the model:

- percentiles of the layer's input (all elements, or one channel with ``unit=``);
- for layers with running statistics, the gap between the batch's statistics (pooled with
  :mod:`batchnorm.stats`) and the running ones *before* this batch updates them — the train/eval
  drift: ``mean_gap = mean_c |μ_B − μ_run| / sqrt(σ²_run + eps)`` and
  ``var_log_ratio = mean_c |log((σ²_B + eps) / (σ²_run + eps))|``;
- the norm of the gradient reaching the layer's output (a tensor hook on the sampled output);
- the layer's ``skipped_updates`` (batches with non-finite statistics), where it has one.

Steps are forward calls of the root model. On the other steps each hook only tests a flag, so
sampling every k steps costs about 1/k of the recording work; a recorded step synchronizes with
the device once per value (``float(...)``), which is why sampling matters on a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import stats as S
from ..layout import canonicalize
from .fold import is_batch_norm

__all__ = ["ActivationMonitor"]


def percentiles_of(x: Tensor, qs: Sequence[float]) -> list[float]:
    """Linear-interpolation percentiles (NumPy's default) of all elements of ``x``.

    Sorting once serves every percentile and has no size limit (``torch.quantile`` refuses
    more than 2**24 elements).
    """
    v = x.detach().flatten()
    v = v.to(torch.float64 if v.dtype == torch.float64 else torch.float32).sort().values
    n = v.numel()
    out = []
    for q in qs:
        pos = q / 100.0 * (n - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        out.append(float(v[lo] + (v[hi] - v[lo]) * (pos - lo)))
    return out


class ActivationMonitor:
    """Record input percentiles, batch/running gaps, gradient norms and skipped updates.

    Args:
        model: the model; one forward of it is one step.
        every: record on steps ``0, every, 2·every, …``. Default: 1
        percentiles: the percentiles (0–100) of each layer's input to record.
            Default: (15, 50, 85)
        layers: names (as in ``model.named_modules()``) or module instances to watch; ``None``
            watches every batch-norm layer. Default: None
        unit: record the percentiles of one channel (index in dimension 1) instead of all
            elements, as Figure 1 follows one sigmoid. Default: None
        gradients: record the norm of the gradient w.r.t. each watched layer's output.
            Default: True

    Use as a context manager, or call :meth:`remove` to take the hooks off.
    """

    def __init__(
        self,
        model: nn.Module,
        every: int = 1,
        percentiles: Sequence[float] = (15, 50, 85),
        layers: Iterable[str | nn.Module] | None = None,
        *,
        unit: int | None = None,
        gradients: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every: expected a positive int, got {every!r}")
        qs = tuple(float(q) for q in percentiles)
        if not qs or not all(0.0 <= q <= 100.0 for q in qs):
            raise ValueError(f"percentiles: expected values in [0, 100], got {percentiles!r}")
        if unit is not None and (isinstance(unit, bool) or not isinstance(unit, int) or unit < 0):
            raise ValueError(f"unit: expected None or a channel index >= 0, got {unit!r}")
        self.model = model
        self.every = every
        self.percentiles = qs
        self.unit = unit
        self.gradients = gradients
        self.layers = self._resolve(model, layers)
        self.records: dict[str, dict[str, list[Any]]] = {
            name: {"step": [], "percentiles": [], "mean_gap": [], "var_log_ratio": [],
                   "skipped_updates": [], "grad_step": [], "grad_norm": []}
            for name in self.layers
        }
        self._step = -1
        self._active = False
        self._handles = [model.register_forward_pre_hook(self._on_step)]
        for name, m in self.layers.items():
            pre = m.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True)
            self._handles.append(pre)
            self._handles.append(m.register_forward_hook(self._post_hook(name)))

    @staticmethod
    def _resolve(model: nn.Module, layers: Iterable[str | nn.Module] | None) -> dict[str,
                                                                                     nn.Module]:
        named = dict(model.named_modules())
        if layers is None:
            chosen = {n: m for n, m in named.items() if is_batch_norm(m)}
            if not chosen:
                raise ValueError("layers: the model has no batch-norm layer; name the layers "
                                 "to watch")
            return chosen
        if isinstance(layers, (str, nn.Module)):
            layers = [layers]
        by_id = {id(m): n for n, m in named.items()}
        chosen = {}
        for item in layers:
            if isinstance(item, str):
                if item not in named:
                    raise ValueError(f"layers: {item!r} is not a module of the model (names "
                                     f"look like {list(named)[1:4]})")
                chosen[item] = named[item]
            elif isinstance(item, nn.Module):
                if id(item) not in by_id:
                    raise ValueError(f"layers: module {type(item).__name__} is not part of "
                                     "the model")
                chosen[by_id[id(item)]] = item
            else:
                raise TypeError(f"layers: expected names or modules, got "
                                f"{type(item).__name__}")
        if not chosen:
            raise ValueError("layers: expected at least one layer, got none")
        return chosen

    # ---------------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """Forward calls of the model seen so far."""
        return self._step + 1

    def _on_step(self, _m: nn.Module, _args: Any) -> None:
        self._step += 1
        self._active = self._step % self.every == 0

    def _pre_hook(self, name: str) -> Any:
        def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs.get("input")
            if not self._active or not isinstance(x, Tensor):
                return
            x = x.detach()
            rec = self.records[name]
            rec["step"].append(self._step)
            x_sel = x.select(1, self.unit) if self.unit is not None and x.dim() >= 2 else x
            rec["percentiles"].append(percentiles_of(x_sel, self.percentiles))
            gap = self._gap(m, x)
            rec["mean_gap"].append(gap[0])
            rec["var_log_ratio"].append(gap[1])
        return hook

    def _post_hook(self, name: str) -> Any:
        def hook(m: nn.Module, _args: Any, out: Any) -> None:
            if not self._active:
                return
            rec = self.records[name]
            skipped = getattr(m, "skipped_updates", None)
            rec["skipped_updates"].append(int(skipped) if isinstance(skipped, int) else None)
            if self.gradients and isinstance(out, Tensor) and out.requires_grad:
                step = self._step

                def grad_hook(g: Tensor) -> None:
                    rec["grad_step"].append(step)
                    rec["grad_norm"].append(float(g.detach().double().norm()))

                out.register_hook(grad_hook)
        return hook

    @staticmethod
    def _gap(m: nn.Module, x: Tensor) -> tuple[float | None, float | None]:
        rm = getattr(m, "running_mean", None)
        rv = getattr(m, "running_var", None)
        if not (isinstance(rm, Tensor) and isinstance(rv, Tensor)) or x.dim() < 2 \
                or x.shape[1] != rm.numel() or x.numel() == 0:
            return None, None
        mean, var, _ = S.finalize(S.channel_partials(canonicalize(x)[0]), 0.0)
        eps = float(getattr(m, "eps", 0.0))
        run_v = rv.to(var.dtype) + eps
        mean_gap = ((mean - rm.to(mean.dtype)).abs() / run_v.sqrt()).mean()
        ratio = torch.log((var + eps) / run_v).abs().mean()
        return float(mean_gap), float(ratio)

    # ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Everything recorded, as plain JSON-serializable Python values."""
        layers = {}
        for name, rec in self.records.items():
            cols = list(zip(*rec["percentiles"], strict=True)) if rec["percentiles"] else \
                [() for _ in self.percentiles]
            layers[name] = {
                "type": type(self.layers[name]).__name__,
                "step": list(rec["step"]),
                "percentiles": {_pkey(q): list(c) for q, c in
                                zip(self.percentiles, cols, strict=True)},
                "mean_gap": list(rec["mean_gap"]),
                "var_log_ratio": list(rec["var_log_ratio"]),
                "skipped_updates": list(rec["skipped_updates"]),
                "grad_step": list(rec["grad_step"]),
                "grad_norm": list(rec["grad_norm"]),
            }
        return {"every": self.every, "steps": self.step, "unit": self.unit,
                "percentiles": list(self.percentiles), "layers": layers}

    def plot(self, path: str | None = None, layers: Iterable[str] | None = None) -> Any:
        """A matplotlib ``Figure``: per layer, the input percentiles over steps, the
        batch/running gap and the gradient norm. Saved as an image when ``path`` is given.

        Uses matplotlib's object API with the Agg canvas (no GUI, no global backend change).
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        names = list(self.records) if layers is None else list(layers)
        for n in names:
            if n not in self.records:
                raise ValueError(f"layers: {n!r} is not monitored (monitored: "
                                 f"{list(self.records)})")
        fig = Figure(figsize=(12, 3 * max(len(names), 1)))
        FigureCanvasAgg(fig)
        axes = fig.subplots(max(len(names), 1), 3, squeeze=False)
        data = self.to_dict()["layers"]
        for row, name in enumerate(names):
            d = data[name]
            ax_p, ax_g, ax_n = axes[row]
            for q in self.percentiles:
                ax_p.plot(d["step"], d["percentiles"][_pkey(q)], label=f"{q:g}%")
            ax_p.set_title(f"{name}: input percentiles")
            ax_p.legend(fontsize="small")
            gap_steps = [s for s, g in zip(d["step"], d["mean_gap"], strict=True)
                         if g is not None]
            if gap_steps:
                ax_g.plot(gap_steps, [g for g in d["mean_gap"] if g is not None],
                          label="mean gap")
                ax_g.plot(gap_steps, [g for g in d["var_log_ratio"] if g is not None],
                          label="|log var ratio|")
                ax_g.legend(fontsize="small")
            ax_g.set_title("batch vs running statistics")
            ax_n.plot(d["grad_step"], d["grad_norm"])
            ax_n.set_title("‖grad of output‖")
            for ax in axes[row]:
                ax.set_xlabel("step")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
        return fig

    def remove(self) -> None:
        """Take every hook off the model (records are kept)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> ActivationMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _pkey(q: float) -> str:
    return f"{q:g}"
