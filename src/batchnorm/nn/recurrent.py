r"""Recurrent batch normalization (Cooijmans, Ballas, Laurent, Gülçehre & Courville, 2016,
"Recurrent Batch Normalization"): an LSTM with BN on the input-to-hidden and hidden-to-hidden
projections and on the cell state, with statistics kept *per time step*.

.. math::
    \begin{pmatrix} i_t \\ f_t \\ g_t \\ o_t \end{pmatrix}
        = \mathrm{BN}_t(W_h h_{t-1};\, \gamma_h) + \mathrm{BN}_t(W_x x_t;\, \gamma_x) + b,\qquad
    c_t = \sigma(f_t) \odot c_{t-1} + \sigma(i_t) \odot \tanh(g_t),\qquad
    h_t = \sigma(o_t) \odot \tanh(\mathrm{BN}_t(c_t;\, \gamma_c, \beta_c))

``BN_t`` normalizes with the batch's statistics in training and with the running statistics of
step ``t`` in eval; steps ``t >= max_length`` share the statistics of step ``max_length - 1``.
The parameters ``γ`` and ``β`` are shared across time. The two projection BNs have no ``β``
(the bias ``b`` plays that role). ``γ`` starts at 0.1 (the paper: larger values saturate the
``tanh``/``σ`` and make gradients vanish) and ``β_c`` at 0, as the paper recommends; the
forget-gate bias starts at 1 and ``W_h`` orthogonal per gate (common LSTM practice).

Every BN call is :func:`batchnorm.functional.batch_norm_impl` on a view of the per-step running
statistics, so the statistics math, kernels and non-finite skip are the package's. These are
not subclasses of PyTorch's ``_BatchNorm``: their running statistics are ``(max_length, C)``
tables, which tools written for BN (folding, recalibration) must not mistake for BN's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import describe
from ..functional import batch_norm_impl, check_input
from ._common import check_int, check_real
from .batchnorm import check_constructor

__all__ = ["BNLSTMCell", "BNLSTM"]


class TimestepBatchNorm(nn.Module):
    """BN over ``(N, C)`` with running statistics per time step and affine shared across time.

    Buffers ``running_mean``/``running_var`` are ``(max_length, C)``, ``num_batches_tracked`` is
    ``(max_length,)``; ``forward(x, t)`` uses row ``min(t, max_length - 1)``.
    """

    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor

    def __init__(self, num_features: int, max_length: int, eps: float, momentum: float | None,
                 gamma: float, use_bias: bool, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.max_length = num_features, max_length
        self.eps, self.momentum, self.gamma_init = eps, momentum, gamma
        self.weight = nn.Parameter(torch.empty(num_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_features, **factory)) if use_bias else None
        self.register_buffer("running_mean", torch.zeros(max_length, num_features, **factory))
        self.register_buffer("running_var", torch.ones(max_length, num_features, **factory))
        self.register_buffer("num_batches_tracked",
                             torch.zeros(max_length, dtype=torch.long, device=device))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.constant_(self.weight, self.gamma_init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, t: int) -> Tensor:
        i = min(t, self.max_length - 1)
        return batch_norm_impl(
            x, self.running_mean[i], self.running_var[i], self.weight, self.bias, self.training,
            self.momentum, self.eps,
            num_batches_tracked=self.num_batches_tracked[i] if self.training else None,
        )

    def extra_repr(self) -> str:
        return (f"{self.num_features}, max_length={self.max_length}, eps={self.eps}, "
                f"momentum={self.momentum}, bias={self.bias is not None}")


class BNLSTMCell(nn.Module):
    r"""One step of the batch-normalized LSTM of Cooijmans et al. (2016).

    .. math::
        (i, f, g, o) = \mathrm{BN}_t(W_h h;\gamma_h) + \mathrm{BN}_t(W_x x;\gamma_x) + b,\quad
        c' = \sigma(f) c + \sigma(i)\tanh(g),\quad
        h' = \sigma(o)\tanh(\mathrm{BN}_t(c';\gamma_c,\beta_c))

    Gates are ordered ``i, f, g, o`` as in :class:`torch.nn.LSTMCell`.

    Args:
        input_size: features of ``x``.
        hidden_size: features of ``h`` and ``c``.
        bias: learnable ``b`` (forget-gate slice initialised to 1). Default: True
        max_length: time steps with their own statistics; later steps reuse the last.
            Default: 100
        eps, momentum: of the three BNs. Default: 1e-5, 0.1
        gamma_init: initial ``γ`` of the three BNs (the paper: 0.1). Default: 0.1
        device, dtype: factory arguments. Default: None

    Shape:
        ``forward(input, hx=None, time=0)``: ``input (N, input_size)``, ``hx = (h, c)`` each
        ``(N, hidden_size)`` (zeros when ``None``); returns ``(h', c')``.
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 max_length: int = 100, eps: float = 1e-5, momentum: float | None = 0.1,
                 gamma_init: float = 0.1, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        check_int("input_size", input_size, minimum=1)
        check_int("hidden_size", hidden_size, minimum=1)
        check_int("max_length", max_length, minimum=1)
        check_constructor(hidden_size, eps, momentum)
        check_real("gamma_init", gamma_init, minimum=-math.inf)
        factory = {"device": device, "dtype": dtype}
        self.input_size, self.hidden_size, self.max_length = input_size, hidden_size, max_length
        h4 = 4 * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(h4, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(h4, hidden_size, **factory))
        self.bias = nn.Parameter(torch.empty(h4, **factory)) if bias else None
        common = dict(max_length=max_length, eps=eps, momentum=momentum, gamma=gamma_init,
                      device=device, dtype=dtype)
        self.bn_ih = TimestepBatchNorm(h4, use_bias=False, **common)  # type: ignore[arg-type]
        self.bn_hh = TimestepBatchNorm(h4, use_bias=False, **common)  # type: ignore[arg-type]
        self.bn_c = TimestepBatchNorm(hidden_size, use_bias=True, **common)  # type: ignore[arg-type]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        h = self.hidden_size
        bound = 1.0 / math.sqrt(h)
        nn.init.uniform_(self.weight_ih, -bound, bound)
        with torch.no_grad():
            for k in range(4):
                nn.init.orthogonal_(self.weight_hh[k * h:(k + 1) * h])
        if self.bias is not None:
            nn.init.zeros_(self.bias)
            with torch.no_grad():
                self.bias[h:2 * h].fill_(1.0)
        for bn in (self.bn_ih, self.bn_hh, self.bn_c):
            bn.reset_parameters()

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None,
                time: int = 0) -> tuple[Tensor, Tensor]:
        x = check_input(input)
        if x.dim() != 2 or x.shape[1] != self.input_size:
            raise ValueError(f"input: expected shape (N, {self.input_size}), got "
                             f"{tuple(x.shape)}")
        check_int("time", time, minimum=0)
        n = x.shape[0]
        if hx is None:
            h = x.new_zeros(n, self.hidden_size)
            c = x.new_zeros(n, self.hidden_size)
        else:
            h, c = _check_state(hx, (n, self.hidden_size), x, "hx")
        gates = (self.bn_hh(h @ self.weight_hh.t(), time)
                 + self.bn_ih(x @ self.weight_ih.t(), time))
        if self.bias is not None:
            gates = gates + self.bias
        i, f, g, o = gates.chunk(4, 1)
        c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_next = torch.sigmoid(o) * torch.tanh(self.bn_c(c_next, time))
        return h_next, c_next

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, bias={self.bias is not None}, "
                f"max_length={self.max_length}")


def _check_state(hx: object, shape: tuple[int, ...], x: Tensor,
                 name: str) -> tuple[Tensor, Tensor]:
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise TypeError(f"{name}: expected a pair (h, c) of tensors or None, got "
                        f"{type(hx).__name__}")
    for part, t in zip(("h", "c"), hx, strict=True):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected {part} to be a torch.Tensor, got "
                            f"{type(t).__name__}")
        if tuple(t.shape) != shape or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name}: expected {part} of shape {shape}, dtype {x.dtype}, device "
                             f"{x.device}, got {describe(t)}")
    return hx[0], hx[1]


class BNLSTM(nn.Module):
    r"""A multi-layer batch-normalized LSTM (Cooijmans et al., 2016) with :class:`torch.nn.LSTM`'s
    inputs and outputs.

    Each layer is a :class:`BNLSTMCell` run over time (statistics per time step, see the
    module docstring); layer ``l > 0`` takes the hidden states of layer ``l - 1``.

    Args:
        input_size: features of the input.
        hidden_size: features of the hidden and cell states.
        num_layers: stacked layers. Default: 1
        bias: learnable gate bias. Default: True
        batch_first: input and output are ``(N, L, *)`` instead of ``(L, N, *)``.
            Default: False
        max_length: time steps with their own statistics; later steps reuse the last.
            Default: 100
        eps, momentum, gamma_init, device, dtype: as for :class:`BNLSTMCell`.

    Shape:
        ``forward(input, hx=None)``: ``input`` is ``(L, N, input_size)`` (``(N, L, ...)`` with
        ``batch_first``) or unbatched ``(L, input_size)``; ``hx = (h_0, c_0)`` each
        ``(num_layers, N, hidden_size)`` (``(num_layers, hidden_size)`` unbatched), zeros when
        ``None``. Returns ``output, (h_n, c_n)`` with ``output`` ``(L, N, hidden_size)``
        (batch-first if asked) and ``h_n, c_n`` like ``h_0``.

    Examples::

        >>> lstm = batchnorm.BNLSTM(28, 100, num_layers=1, batch_first=True, max_length=28)
        >>> out, (h, c) = lstm(torch.randn(32, 28, 28))
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, max_length: int = 100, eps: float = 1e-5,
                 momentum: float | None = 0.1, gamma_init: float = 0.1, device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__()
        check_int("num_layers", num_layers, minimum=1)
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first: expected a bool, got {type(batch_first).__name__}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.batch_first, self.max_length = batch_first, max_length
        self.cells = nn.ModuleList(
            BNLSTMCell(input_size if layer == 0 else hidden_size, hidden_size, bias, max_length,
                       eps, momentum, gamma_init, device, dtype)
            for layer in range(num_layers)
        )

    def forward(self, input: Tensor,
                hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        x = check_input(input)
        if x.dim() not in (2, 3) or x.shape[-1] != self.input_size:
            want = "(N, L, {0})" if self.batch_first else "(L, N, {0})"
            raise ValueError(f"input: expected shape {want.format(self.input_size)} or "
                             f"(L, {self.input_size}), got {tuple(x.shape)}")
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)
        elif self.batch_first:
            x = x.transpose(0, 1)
        steps, n = x.shape[0], x.shape[1]
        if hx is not None:
            shape = ((self.num_layers, self.hidden_size) if unbatched
                     else (self.num_layers, n, self.hidden_size))
            h0, c0 = _check_state(hx, shape, x, "hx")
            if unbatched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        h_n: list[Tensor] = []
        c_n: list[Tensor] = []
        layer_input = x
        for layer, cell in enumerate(self.cells):
            state = None if hx is None else (h0[layer], c0[layer])
            outputs = []
            for t in range(steps):
                state = cell(layer_input[t], state, t)
                outputs.append(state[0])
            layer_input = torch.stack(outputs, 0) if outputs else x.new_zeros(0, n,
                                                                               self.hidden_size)
            if state is None:  # a sequence of length 0
                state = (x.new_zeros(n, self.hidden_size), x.new_zeros(n, self.hidden_size))
            h_n.append(state[0])
            c_n.append(state[1])
        out, h, c = layer_input, torch.stack(h_n), torch.stack(c_n)
        if unbatched:
            return out.squeeze(1), (h.squeeze(1), c.squeeze(1))
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, (h, c)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"batch_first={self.batch_first}, max_length={self.max_length}")
