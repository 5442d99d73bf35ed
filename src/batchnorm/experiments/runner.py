"""``reproduce``: run the chosen claims with progress bars and write the report."""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from . import CLAIMS, claim_module
from .data import load
from .report import write_report
from .result import SIZES, UNAVAILABLE, ClaimResult, RunConfig

__all__ = ["check_writable", "reproduce"]


def _progress_factory(enabled: bool) -> Any:
    def progress(iterable: Iterable[Any], desc: str = "", total: int | None = None) -> Any:
        if not enabled:
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr)

    return progress


def _unavailable(module: Any, exc: ImportError) -> ClaimResult:
    return ClaimResult(module.NAME, module.TITLE, module.CLAIM, module.CRITERION, UNAVAILABLE,
                       f"not measured: a component it needs did not import ({exc})", {},
                       source=getattr(module, "SOURCE", {}), agreement="not measured")


def set_threads(n: int) -> None:
    """``n`` intra-op threads for torch and, when it is installed, for Numba's parallel kernels.

    Numba's thread pool spin-waits: on a shared 2-core machine a training step of the claim-1
    MLP was many times slower with its default pool than with one thread (docs/decisions.md,
    "One thread for torch and Numba in the harness").
    """
    torch.set_num_threads(n)
    try:
        import numba
    except ImportError:
        return
    numba.set_num_threads(min(n, int(numba.config.NUMBA_NUM_THREADS)))  # type: ignore[attr-defined]


def check_writable(out: str) -> None:
    """Create ``out`` and write a probe file in it, or raise :class:`OSError` naming ``--out``.

    Done before any experiment runs, so an unwritable folder costs nothing.
    """
    if not isinstance(out, str) or not out:
        raise ValueError(f"--out: expected a folder path, got {out!r}")
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=out)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise OSError(f"--out: cannot write to {out!r}: {exc.strerror or exc}") from exc


def reproduce(claims: Sequence[str] | None = None, *, size: str = "full", out: str = "reproduce",
              seeds: int | None = None, data: str | None = None, progress: bool | None = None,
              threads: int = 1, command: str = "batchnorm reproduce",
              base_seed: int = 0) -> list[ClaimResult]:
    """Run ``claims`` (default: all, in report order) and write the report into ``out``.

    Every claim runs seeds ``base_seed, base_seed + 1, …`` (``seeds`` of them; default: the
    size's own number, at least 3 for ``quick`` and 5 for ``full``).
    """
    names = list(CLAIMS) if not claims else list(claims)
    modules = [claim_module(n) for n in names]  # validates every name before any work
    if size not in SIZES:
        raise ValueError(f"size: expected one of {SIZES}, got {size!r}")
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        raise ValueError(f"--seeds: expected a positive int, got {seeds!r}")
    if isinstance(base_seed, bool) or not isinstance(base_seed, int) or base_seed < 0:
        raise ValueError(f"--seed: expected an int >= 0, got {base_seed!r}")
    dataset = load(data)
    check_writable(out)
    set_threads(threads)
    show = sys.stderr.isatty() if progress is None else progress
    cfg = RunConfig(dataset, size, seeds, _progress_factory(show), base_seed=base_seed)
    results = []
    start = time.perf_counter()
    for module in _progress_factory(show)(modules, desc="claims"):
        t0 = time.perf_counter()
        try:
            result = module.run(cfg)
        except ImportError as exc:  # a variant/tool this claim needs is not installed
            result = _unavailable(module, exc)
        result.seconds = time.perf_counter() - t0
        results.append(result)
    from .. import __version__

    header = {"command": command, "data": dataset.describe(), "size": size,
              "seeds": seeds, "base_seed": base_seed, "torch": torch.__version__,
              "batchnorm": __version__,
              "python": platform.python_version(),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), "
                         "CPU", "seconds": time.perf_counter() - start}
    try:
        write_report(results, out, header)
    except OSError as exc:  # the folder was writable at the start; say so, in one line
        raise OSError(f"--out: cannot write the report into {out!r}: {exc.strerror or exc}") \
            from exc
    return results
