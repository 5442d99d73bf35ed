"""How the Numba kernels of the ``cpu`` backend are compiled, and how they accumulate.

The kernel modules (imported lazily; compiled on first call, cached on disk) share these
conventions. Every array is a flat, contiguous 1-D view; shapes travel as integers:

- channels-first ``(N, C, S)``: element ``(n, c, s)`` is ``x[(n*C + c)*S + s]``; a channel's
  ``N*S`` elements are numbered ``i = n*S + s`` and split into ``P`` chunks
  ``[p*NS//P, (p+1)*NS//P)`` (:mod:`._nchw`, :mod:`._lanes`);
- channels-last ``(M, C)``: element ``(m, c)`` is ``x[m*C + c]``; rows split into ``P`` blocks
  (:mod:`._nhwc`, :mod:`._nhwc_backward`).

``P`` is fixed by the host from the shape and the thread count, and every parallel item writes
its own slot, so results never depend on scheduling (determinism). Accumulation: runs of at most
``_BLOCK`` elements in the accumulation dtype (vectorised), runs summed in float64.

One call of the backend is one Numba dispatch: the entry points (``nchw_forward``,
``nhwc_forward``, ``nchw_backward``, ``nhwc_backward``, ``*_apply``) hold every pass, with as few
parallel regions as the data dependencies allow (one per channel-first call when a channel is one
item; statistics region + apply region otherwise). Each region is a fork/join of the thread pool,
which on a loaded machine costs a scheduler time slice.

Numba's disk cache is keyed on the file of the compiled function alone: a kernel inlines or
calls helpers from the other modules, and editing only a helper's module leaves the cached
kernels of the others stale. After editing a helper, delete ``kernels/cpu/__pycache__``.
"""

from __future__ import annotations

from numba import njit

_BLOCK = 2048  # elements summed in the accumulation dtype before going to float64
_FLUSH_ROWS = 256  # channels-last: rows summed in the accumulation dtype before float64

# reassoc/contract let LLVM vectorise the sums; never nnan/ninf: NaN must propagate so that
# the running statistics can skip a non-finite batch. Helpers are inlined at the Numba IR level
# and so compile under the flags of the kernel that calls them. Vectorised reductions are
# reassociated in a way fixed by the loop length alone, so results stay bitwise reproducible.
# error_model="numpy": a float division is IEEE (no zero-divisor check raising
# ZeroDivisionError), whose branch kept every loop with a division from vectorising; no kernel
# divides by a value that can be zero.
_FM = {"reassoc", "contract"}
_parallel = njit(cache=True, nogil=True, fastmath=_FM, parallel=True, error_model="numpy")
_njit_inline = njit(inline="always", fastmath=_FM, error_model="numpy")
# A helper compiled once and called (not inlined at every call site): the short-run paths, whose
# inlined copies multiplied the first-call compile time, and the channels-last block sums and dx
# rows (one call per row block) (docs/decisions.md, "Channels-first short runs: whole samples
# taken directly, and called, not inlined").
_njit_called = njit(cache=True, nogil=True, fastmath=_FM, error_model="numpy")
