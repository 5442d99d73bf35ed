"""``BatchNorm1d/2d/3d``: drop-in replacements for PyTorch's, with a fused residual add and
activation.

The classes subclass PyTorch's own (``isinstance(m, torch.nn.BatchNorm2d)`` holds), so
parameters, buffers, ``state_dict`` keys, the ``_version`` migration, ``reset_parameters`` and
initialization code written for PyTorch's layers carry over unchanged. Only the forward differs:
a training call with running statistics tries :func:`batchnorm.ops.fast_train.train` first;
everything else (and whatever that declines) goes through
:func:`batchnorm.functional.batch_norm_impl`.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .._errors import BatchNormValueError, describe
from ..activations import ActivationSpec, parse_activation, spec_of
from ..functional import batch_norm_impl
from ..ops.fast_train import train as fast_train
from ..ops.saved_output import check_mode
from ..running import NonFiniteBatchWarning

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


def check_constructor(num_features: object, eps: object, momentum: object) -> None:
    """Constructor checks shared by every batch-norm module of the package."""
    if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
        raise TypeError(f"num_features: expected an int, got {type(num_features).__name__}")
    if int(num_features) <= 0:
        raise ValueError(f"num_features: expected a positive int, got {num_features}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a float, got {type(eps).__name__}")
    if not float(eps) >= 0:
        raise ValueError(f"eps: expected a non-negative float, got {eps}")
    if momentum is not None and (isinstance(momentum, bool)
                                 or not isinstance(momentum, numbers.Real)):
        raise TypeError(f"momentum: expected a float or None, got {type(momentum).__name__}")


class _BatchNormBase(_BatchNorm):
    """What every batch-norm module here shares; subclasses set ``_dims`` (accepted ranks)."""

    _dims: tuple[int, ...] = ()
    save: str = "input"  # instance attributes; class defaults for subclasses that never set them
    inplace: bool = False
    _unfused: tuple[str, ...] = ()  # class default too: layers pickled before it existed

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        activation: ActivationSpec = None,
        save: str = "input",
        inplace: bool = False,
    ) -> None:
        check_constructor(num_features, eps, momentum)
        act = parse_activation(activation)
        check_mode(save, inplace, *act)
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        if affine and not bias:
            self.register_parameter("bias", None)
        self.activation: ActivationSpec = spec_of(*act)
        self.save, self.inplace = save, inplace  # the memory mode (batchnorm.ops.saved_output)
        self.layer_name: str | None = None
        # names of child modules applied after the fused part, in order (see keep_after)
        self._unfused: tuple[str, ...] = ()
        self._reported_skips = 0
        self.num_batches_skipped: Tensor | None
        if track_running_stats:
            self.register_buffer(
                "num_batches_skipped",
                torch.zeros((), dtype=torch.long, device=device),
                persistent=False,
            )
        else:
            self.register_buffer("num_batches_skipped", None, persistent=False)

    def keep_after(self, modules: dict[str, torch.nn.Module]) -> None:
        """Apply ``modules`` (name → module, in order) after the fused batch norm and
        activation, unfused, as children under those names (so ``state_dict`` keys are
        ``<layer>.<name>.*``). :func:`batchnorm.convert_model` uses it for what a converted
        layer carried that we do not fuse (a timm ``BatchNormAct2d``'s dropout, an activation
        outside the table)."""
        for name in self._unfused:
            delattr(self, name)
        for name, module in modules.items():
            if not isinstance(module, torch.nn.Module):
                raise TypeError(f"modules: expected torch.nn.Module values, got "
                                f"{type(module).__name__} for {name!r}")
            self.add_module(name, module)
        self._unfused = tuple(modules)

    def unfused_modules(self) -> dict[str, torch.nn.Module]:
        """The modules applied after the fused part (see :meth:`keep_after`), in order."""
        return {name: self._modules[name] for name in self._unfused}  # type: ignore[misc]

    def _after(self, y: Tensor) -> Tensor:
        for name in self._unfused:
            y = self._modules[name](y)  # type: ignore[misc]
        return y

    def _extra_config(self) -> dict[str, Any]:
        """Constructor arguments beyond PyTorch's (:func:`batchnorm.nn._common.variant_config`)."""
        return dict(bias=not self.affine or self.bias is not None, activation=self.activation)

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        skipped = getattr(self, "num_batches_skipped", None)
        if skipped is not None:
            skipped.zero_()
            self._reported_skips = 0

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        # num_batches_skipped is not saved (non-persistent): after load_state_dict(assign=True)
        # into a module built on the meta device it would be the only tensor left there
        skipped, anchor = getattr(self, "num_batches_skipped", None), self.running_mean
        if skipped is not None and anchor is not None and skipped.device != anchor.device:
            self.num_batches_skipped = torch.zeros((), dtype=torch.long, device=anchor.device)
            self._reported_skips = 0

    def _check_input_dim(self, input: Tensor) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(f"input: expected a torch.Tensor, got {type(input).__name__}")
        if input.dim() not in self._dims:
            want = " or ".join(f"{d}D" for d in self._dims)
            raise ValueError(
                f"expected {want} input (got {input.dim()}D input): {type(self).__name__} "
                f"takes input of shape {self._shape_doc}, got shape {tuple(input.shape)}"
            )
        if input.shape[1] != self.num_features:
            raise BatchNormValueError(
                f"input: expected {self.num_features} channels (dimension 1) for "
                f"{type(self).__name__}({self.num_features}), got {input.shape[1]} in "
                f"{describe(input)}"
            )

    _shape_doc = "(N, C, ...)"

    def _name(self) -> str:
        return self.layer_name or f"{type(self).__name__}({self.num_features})"

    def _fx_leaf(self, input: Any, residual: Any) -> Any:
        """Under ``torch.fx.symbolic_trace``, record this layer as one ``call_module`` node, as
        the tracer does for PyTorch's own layers (it treats only classes under ``torch.nn`` as
        leaves and would trace into this forward, baking in the train/eval branch); ``None``
        otherwise."""
        if not isinstance(input, torch.fx.Proxy) or not isinstance(input.tracer, torch.fx.Tracer):
            return None
        tracer = input.tracer
        args = (input,) if residual is None else (input, residual)
        return tracer.create_proxy("call_module", tracer.path_of_module(self), args, {})

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        if type(input) is not Tensor:  # a Proxy under torch.fx tracing, or not a tensor
            traced = self._fx_leaf(input, residual)
            if traced is not None:
                return traced  # type: ignore[no-any-return]
        self._check_input_dim(input)
        # parameters and buffers read from their dicts, not through Module.__getattr__
        # (docs/decisions.md, "Host-side micro-costs")
        # (a name missing from its dict, e.g. a parametrized weight, is read as an attribute;
        # not dict.get(name, default): the default would be computed on every call)
        buffers, params = self._buffers, self._parameters
        rm = buffers["running_mean"] if "running_mean" in buffers else self.running_mean  # noqa: SIM401
        rv = buffers["running_var"] if "running_var" in buffers else self.running_var  # noqa: SIM401
        weight = params["weight"] if "weight" in params else self.weight  # noqa: SIM401
        bias = params["bias"] if "bias" in params else self.bias  # noqa: SIM401
        track = self.training and self.track_running_stats
        nbt = self.num_batches_tracked if track else None
        nbs = self.num_batches_skipped if track else None
        if track and self.save == "input" and self.inplace is False \
                and not torch.compiler.is_compiling():
            # the common training call straight to the short path: no functional frame, the
            # activation parsed once (docs/decisions.md, "The layer calls the short path")
            act, slope = self._parsed_activation()
            y = fast_train(input, weight, bias, residual, rm, rv, nbt, nbs, self.momentum,
                           self.eps, act, slope, self._name)
            if y is not None:
                return self._after(y) if self._unfused else y
        use_batch_stats = self.training or (rm is None and rv is None)
        pass_buffers = not self.training or self.track_running_stats
        y = batch_norm_impl(
            input,
            rm if pass_buffers else None,
            rv if pass_buffers else None,
            weight,
            bias,
            use_batch_stats,
            self.momentum,
            self.eps,
            activation=self.activation,
            residual=residual,
            num_batches_tracked=nbt,
            num_batches_skipped=nbs,
            layer_name=self._name(),
            save=self.save,
            inplace=self.inplace,
        )
        return self._after(y) if self._unfused else y

    def _parsed_activation(self) -> tuple[str, float]:
        """``parse_activation(self.activation)``, kept while ``self.activation`` is the same
        immutable spec (a name, ``(name, parameter)`` or None; a module is parsed anew, as its
        attributes may change)."""
        spec = self.activation
        cached = self.__dict__.get("_activation_parsed")
        if cached is not None and cached[0] is spec:
            return cached[1]  # type: ignore[no-any-return]
        parsed = parse_activation(spec)
        if spec is None or type(spec) in (str, tuple):
            self.__dict__["_activation_parsed"] = (spec, parsed)
        return parsed

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """Called by ``torch.jit.script`` before it compiles a model: our forward is Python
        calling Numba or Triton, which TorchScript cannot compile, so this says so and what
        to do instead (rather than a TorchScript error about an inner helper)."""
        raise TypeError(
            f"torch.jit.script cannot compile {type(self).__module__}.{type(self).__name__}: "
            "its forward runs Python kernels. Use torch.export.export (or "
            "batchnorm.export_program / batchnorm.export_onnx), torch.compile, or script a copy "
            "with PyTorch's layers: batchnorm.convert_model(copy.deepcopy(model), "
            "target='torch', unfuse_activations=True)"
        )

    @property
    def skipped_updates(self) -> int:
        """Batches whose non-finite statistics were kept out of the running statistics.

        Reading it synchronizes with the device (on a GPU the count is kept on the device so the
        forward never waits); newly skipped batches are reported with a warning here.
        """
        if self.num_batches_skipped is None:
            return 0
        count = int(self.num_batches_skipped)
        if count > self._reported_skips and self.num_batches_skipped.device.type != "cpu":
            warnings.warn(
                f"{self._name()}: {count - self._reported_skips} batch(es) with non-finite "
                "statistics were kept out of the running statistics",
                NonFiniteBatchWarning,
                stacklevel=2,
            )
        self._reported_skips = count
        return count

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.activation is not None:
            text += f", activation={self.activation!r}"
        if self.save != "input":
            text += f", save={self.save!r}"
        if self.inplace:
            text += ", inplace=True"
        return text


_DOC = r"""Batch normalization over a {rank} input (Ioffe & Szegedy, 2015), a drop-in
    replacement for :class:`torch.nn.{name}` with an optional fused residual add and activation.

    .. math::
        y = \mathrm{{act}}\Big(\frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}}
            \cdot \gamma + \beta + \text{{residual}}\Big)

    Mean and variance are per channel over the batch{over}; in training the running estimates
    are updated with ``momentum`` (``None``: cumulative average), using the unbiased variance;
    a batch with non-finite statistics never updates them (see :attr:`skipped_updates`).

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance for stability. Default: 1e-5
        momentum: running-statistics factor, or ``None`` for a cumulative average. Default: 0.1
        affine: learnable γ and β. Default: True
        track_running_stats: keep running estimates for eval. Default: True
        device, dtype: factory arguments for parameters and buffers. Default: None
        bias: learnable β when ``affine``. Default: True
        activation: ``None``, a name of :data:`batchnorm.activations.ACTIVATIONS`
            (``"relu"``, ``"leaky_relu"``, ``"silu"``, ``"gelu"``, ``"gelu_tanh"``,
            ``"relu6"``, ``"hardswish"``, ``"hardsigmoid"``, ``"sigmoid"``, ``"tanh"``,
            ``"elu"``, ``"mish"``), ``("leaky_relu", slope)``, ``("elu", alpha)`` or the
            matching ``nn`` module, applied last. Default: None
        save: what training keeps for the backward: ``"input"``, or ``"output"`` (in-place
            activated BN: only the output, from which the backward recovers the normalized
            input; needs an invertible activation; see the memory-saving page of the
            documentation). Default: ``"input"``
        inplace: with ``save="output"``, write the output into the input's storage and return
            the input tensor. Default: False

    Shape:
        - Input: {shape}; output: the same shape and memory format.
        - ``forward(input, residual=None)``: ``residual`` has the input's shape.

    Examples::

        >>> m = batchnorm.{name}({example_c}, activation="relu")
        >>> y = m(torch.randn({example_shape}))
"""


def _doc(name: str, rank: str, over: str, shape: str, example_shape: str) -> str:
    channels = example_shape.split(", ")[1]
    return _DOC.format(name=name, rank=rank, over=over, shape=shape, example_c=channels,
                       example_shape=example_shape)


class BatchNorm1d(_BatchNormBase, torch.nn.BatchNorm1d):
    __doc__ = _doc("BatchNorm1d", "2D or 3D", " (and length)", "``(N, C)`` or ``(N, C, L)``",
                   "20, 100, 35")
    _dims = (2, 3)
    _shape_doc = "(N, C) or (N, C, L)"


class BatchNorm2d(_BatchNormBase, torch.nn.BatchNorm2d):
    __doc__ = _doc("BatchNorm2d", "4D", " and spatial dimensions", "``(N, C, H, W)``",
                   "20, 100, 35, 45")
    _dims = (4,)
    _shape_doc = "(N, C, H, W)"


class BatchNorm3d(_BatchNormBase, torch.nn.BatchNorm3d):
    __doc__ = _doc("BatchNorm3d", "5D", " and spatial dimensions", "``(N, C, D, H, W)``",
                   "20, 100, 35, 45, 10")
    _dims = (5,)
    _shape_doc = "(N, C, D, H, W)"
