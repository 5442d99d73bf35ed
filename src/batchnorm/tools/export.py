"""Export eval-mode models built from our modules: ``torch.export`` and ONNX.

``torch.export.export`` needs nothing from us: the custom op ``batchnorm::forward`` has a fake
kernel, so it appears in the exported graph as one node, and the ``ExportedProgram`` runs it.

ONNX has no such op. Rather than rewriting the model (converting to PyTorch's layers would lose
a fused residual, whose ``forward(x, residual)`` signature ``nn.BatchNorm2d`` lacks), we give the
dynamo ONNX exporter a *translation* of the op (:func:`onnx_translations`), written with
onnxscript: in eval mode the op is exactly ``act(BatchNormalization(x; γ, β, μ, σ²) + residual)``,
so it maps onto the standard ONNX ``BatchNormalization`` node that every runtime implements (and
fuses into a preceding ``Conv``), followed by ``Add`` and the activation. Training-mode layers
are refused: an exported inference graph must not depend on batch statistics.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .fold import is_batch_norm

__all__ = ["export_onnx", "export_program", "onnx_translations"]


def _check_eval(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    training = [n or "<root>" for n, m in model.named_modules() if is_batch_norm(m) and m.training]
    if training:
        raise ValueError(
            f"model: batch-norm layers {training[:5]} are in training mode; exported graphs are "
            "for inference, call model.eval() first"
        )


def _onnx_forward(x: Any, weight: Any, bias: Any, residual: Any, running_mean: Any,
                  running_var: Any, training: bool, eps: float, act: str, slope: float) -> Any:
    """onnxscript (trace-only) translation of ``batchnorm::forward`` in eval mode."""
    from onnxscript import opset18

    op: Any = opset18  # the opset's stubs type every op; traced values are untyped here

    if training:
        raise ValueError("batchnorm::forward: only eval mode (running statistics) exports to "
                         "ONNX; call model.eval() first")
    if running_mean is None or running_var is None:
        raise ValueError("batchnorm::forward: eval mode needs running statistics")

    def const(value: float, like: Any) -> Any:
        return op.CastLike(op.Constant(value_float=value), like)

    mean = op.CastLike(running_mean, x)
    var = op.CastLike(running_var, x)
    channels = op.Shape(mean)
    gamma = op.Expand(const(1.0, x), channels) if weight is None else op.CastLike(weight, x)
    beta = op.Expand(const(0.0, x), channels) if bias is None else op.CastLike(bias, x)
    y = op.BatchNormalization(x, gamma, beta, mean, var, epsilon=eps)
    if residual is not None:
        y = op.Add(y, residual)
    if act == "relu":
        y = op.Relu(y)
    elif act == "leaky_relu":
        y = op.LeakyRelu(y, alpha=slope)
    elif act == "silu":
        y = op.Mul(y, op.Sigmoid(y))
    elif act == "gelu":  # erf form, as nn.GELU()
        y = op.Mul(op.Mul(y, const(0.5, y)),
                   op.Add(const(1.0, y), op.Erf(op.Mul(y, const(1 / math.sqrt(2.0), y)))))
    elif act == "relu6":
        y = op.Clip(y, const(0.0, y), const(6.0, y))
    elif act == "hardswish":
        y = op.HardSwish(y)
    elif act == "hardsigmoid":  # PyTorch's: relu6(y + 3)/6
        y = op.HardSigmoid(y, alpha=1.0 / 6.0, beta=0.5)
    elif act == "sigmoid":
        y = op.Sigmoid(y)
    elif act == "tanh":
        y = op.Tanh(y)
    elif act == "elu":
        y = op.Elu(y, alpha=slope)
    elif act == "mish":
        y = op.Mish(y)
    elif act == "gelu_tanh":  # ½y(1 + tanh(√(2/π)(y + 0.044715y³))): opset 18 has no approximate
        inner = op.Mul(const(math.sqrt(2.0 / math.pi), y),
                       op.Add(y, op.Mul(const(0.044715, y), op.Mul(y, op.Mul(y, y)))))
        y = op.Mul(op.Mul(y, const(0.5, y)), op.Add(const(1.0, y), op.Tanh(inner)))
    elif act != "none":
        raise ValueError(f"batchnorm::forward: activation {act!r} has no ONNX translation")
    rstd = op.Reciprocal(op.Sqrt(op.Add(running_var, op.CastLike(
        op.Constant(value_float=eps), running_var))))
    return y, op.Identity(running_mean), rstd, op.Identity(running_var)


def onnx_translations() -> dict[Any, Any]:
    """The ``custom_translation_table`` entries for ``torch.onnx.export(..., dynamo=True)``."""
    return {torch.ops.batchnorm.forward.default: _onnx_forward}


def _args(args: Any) -> tuple[Any, ...]:
    return args if isinstance(args, tuple) else (args,)


def export_program(model: nn.Module, args: Any, **kwargs: Any) -> Any:
    """``torch.export.export(model, args, **kwargs)`` after checking the model is in eval mode
    (``args``: a tuple of positional inputs, or one tensor)."""
    _check_eval(model)
    return torch.export.export(model, _args(args), **kwargs)


def export_onnx(model: nn.Module, args: Any, f: Any = None, **kwargs: Any) -> Any:
    """Export an eval-mode model to ONNX with the dynamo exporter; returns the ``ONNXProgram``.

    ``f`` (a path) saves the model. Other keyword arguments go to ``torch.onnx.export``; a
    ``custom_translation_table`` given there is merged with ours. Needs ``onnxscript``.
    """
    _check_eval(model)
    table = {**onnx_translations(), **kwargs.pop("custom_translation_table", {})}
    kwargs.setdefault("verbose", False)
    return torch.onnx.export(model, _args(args), f, dynamo=True, custom_translation_table=table,
                             **kwargs)
