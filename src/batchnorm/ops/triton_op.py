"""The Triton backend as ``torch.library.triton_op`` operators: ``torch.compile`` traces into them.

``batchnorm::forward``/``batchnorm::backward`` (:mod:`batchnorm.ops`) are ``custom_op`` nodes,
opaque to the compiler. The two ops here have exactly their signatures and outputs but are
``triton_op`` operators whose every kernel launch goes through ``torch.library.wrap_triton``:
under ``torch.compile`` AOTAutograd decomposes them into ``triton_kernel_wrapper_functional``
nodes (one per launch, next to the ``empty`` allocations), which Inductor compiles and
schedules with the rest of the graph; in eager they run the kernels directly.

- ``batchnorm::triton_forward`` — ``(y, mean, rstd, var)`` as ``batchnorm::forward``,
  differentiable with the same formula (``library.backward_formula``: single pass through
  ``batchnorm::triton_backward``, or the differentiable recomputation under ``create_graph``).
- ``batchnorm::triton_backward`` — as ``batchnorm::backward``.

Use: ``ops.forward``, under ``torch.compiler.is_compiling()``, calls :func:`forward`
instead of ``batchnorm::forward`` for a CUDA tensor :func:`batchnorm.kernels.select` gives the
Triton backend; its autograd formula then calls ``triton_backward_op``. This module imports
Triton, so it is imported only there (``import batchnorm`` never imports it).

Under Triton's CPU interpreter (``TRITON_INTERPRET=1``) ``@triton.jit`` makes
``InterpretedFunction`` objects, which ``wrap_triton`` returns unwrapped (nothing to trace);
each is then presented to ``wrap_triton`` as a ``JITFunction`` whose launches run the
interpreter, so that the graph has the same kernel nodes as on a GPU. Two limits there, both
from the missing GPU driver: torch cannot build a kernel's TTIR to see which arguments it
writes, so it assumes all (the graph clones the inputs); and Inductor cannot compile the
kernel nodes (``aot_eager`` runs them).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from ..kernels import get_backend
from ..kernels import triton as _tb
from ..kernels.triton import _backward as _tbb
from ..kernels.triton import _forward as _tbf
from ..layout import canonicalize
from . import library as L

__all__ = ["forward", "triton_forward_op", "triton_backward_op", "KERNELS"]

#: Every kernel the ops launch (for ``torch.compile``'s cache key, see the end of the module).
KERNELS = (
    _tbf._fwd_persistent_kernel, _tbf._partials_kernel, _tbf._merge_kernel, _tbf._apply_kernel,
    _tbb._bwd_persistent_kernel, _tbb._bwd_reduce_kernel, _tbb._bwd_sum_kernel,
    _tbb._bwd_apply_kernel,
)


class _InterpretedJIT(JITFunction):
    """A ``JITFunction`` over the Python source of an interpreter kernel: ``wrap_triton``
    traces it like a compiled kernel; a launch (eager, or the kernel node executing) runs the
    interpreter."""

    def __init__(self, kernel: Any) -> None:
        super().__init__(kernel.fn)
        self._interpreted = kernel

    # identity, not triton's hash of the kernel and its compiled dependencies (here
    # interpreter functions, which JITFunction cannot hash)
    __hash__ = object.__hash__
    __eq__ = object.__eq__

    @property
    def cache_key(self) -> str:
        return hashlib.sha256(self.src.encode()).hexdigest()

    def __getitem__(self, grid: Any) -> Any:
        return self._interpreted[grid]

    def run(self, *args: Any, **kwargs: Any) -> Any:
        return self._interpreted.run(*args, **kwargs)


_LAUNCHABLE: dict[int, Any] = {}


def _launchable(kernel: Any) -> Any:
    """``kernel`` as ``wrap_triton`` traces it: itself when compiled, else (interpreter) one
    cached :class:`_InterpretedJIT` per kernel (the kernel side table keys on identity)."""
    if isinstance(kernel, (JITFunction, Autotuner)):
        return kernel
    wrapped = _LAUNCHABLE.get(id(kernel))
    if wrapped is None:
        wrapped = _LAUNCHABLE[id(kernel)] = _InterpretedJIT(kernel)
    return wrapped


class _WrappedTritonBackend(_tb.TritonBackend):
    """The Triton backend with every launch through ``torch.library.wrap_triton``."""

    def _launch(self, kernel):
        return torch.library.wrap_triton(_launchable(kernel))


def _backend(x: Tensor) -> _WrappedTritonBackend:
    """The registered Triton backend's strategy (its size thresholds), launching through
    ``wrap_triton``; an error for a tensor that backend does not run."""
    base = get_backend("triton")
    if not isinstance(base, _tb.TritonBackend) or x.numel() == 0 or not base.supports(x):
        raise ValueError(
            f"batchnorm::triton_* ops: the Triton backend does not run a {tuple(x.shape)} "
            f"{x.dtype} tensor on {x.device} (contiguous: {x.is_contiguous()}); "
            "use batchnorm::forward"
        )
    return _WrappedTritonBackend(base.persistent_max, base.tile)


@torch.library.triton_op("batchnorm::triton_forward", mutates_args=())
def triton_forward_op(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    eps: float,
    act: str,
    slope: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``batchnorm::forward`` on canonical tensors with the Triton kernels traceable."""
    return L.forward_canonical(_backend(x), x, weight, bias, residual, running_mean, running_var,
                           training, eps, act, slope)


@torch.library.triton_op("batchnorm::triton_backward", mutates_args=())
def triton_backward_op(
    grad_y: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
    residual: Tensor | None, mean: Tensor, rstd: Tensor, training: bool, act: str, slope: float,
    need_dx: bool, need_dweight: bool, need_dbias: bool, need_dres: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``batchnorm::backward`` with the Triton kernels traceable. Every output is a fresh
    tensor (the Triton backward allocates each gradient it returns), as custom ops require."""
    dx, dw, db, dr = _backend(x).backward(
        grad_y.contiguous(), x, weight, bias, residual, mean, rstd, training, act, slope,
        need_dx, need_dweight and weight is not None, need_dbias and bias is not None, need_dres,
    )
    # one fresh empty tensor per missing gradient: op outputs may not alias each other
    return tuple(x.new_empty((0,)) if t is None else t  # type: ignore[return-value]
                 for t in (dx, dw, db, dr))


# The fake kernels of the generic ops (the same metadata), rather than triton_op's default of
# tracing the body: cheaper, and independent of how the kernels are launched.
triton_forward_op.register_fake(L.forward_fake)
triton_backward_op.register_fake(L.backward_fake)


def _backward(ctx, grad_y, gmean, grstd, gvar):
    return L.backward_formula(ctx, grad_y, gmean, grstd, gvar,
                                 single_pass=triton_backward_op)


triton_forward_op.register_autograd(_backward, setup_context=L.setup_forward)

# triton_op finds the kernels of an op by reading its source for ``wrap_triton(name)`` calls;
# these launches are inside the backend's methods, so name them. torch.compile's AOTAutograd
# cache hashes these kernels' sources into its key: without them an edited kernel could be
# served a stale compiled graph.
_kernel_table = getattr(torch._library.triton, "triton_ops_to_kernels", None)
if isinstance(_kernel_table, dict):
    for _name in ("batchnorm::triton_forward", "batchnorm::triton_backward"):
        _kernel_table[_name] = [_launchable(k) for k in KERNELS]



def forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None, training: bool, eps: float,
    act: str, slope: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`triton_forward_op` on the canonical views of user-shaped tensors. Under tracing
    the view of the result back in the user's shape is functionalized like any other."""
    xc, lay = canonicalize(x)
    rc = None if residual is None else lay.canonical(residual)
    y, mean, rstd, var = triton_forward_op(xc, weight, bias, rc, running_mean, running_var,
                                           training, eps, act, slope)
    return lay.restore_view(y), mean, rstd, var
