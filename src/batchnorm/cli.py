"""The ``batchnorm`` command: ``reproduce`` (the claims harness), ``bench`` and ``info``.

``bench`` is a small built-in comparison, not the full benchmark suite: for a few shapes it times
forward + backward of training-mode batch norm on every backend that is available and supports
the tensor (forced one at a time through ``BATCHNORM_BACKEND``), against ``torch.nn.functional``'s
own ``batch_norm`` in the same run, interleaved, medians over repeats. The scripts under
``benchmarks/`` are the reference measurements.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

__all__ = ["main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    from .experiments import CLAIMS

    parser = argparse.ArgumentParser(prog="batchnorm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="measure the claims made for batch normalization")
    rep.add_argument("--claims", default=None,
                     help=f"comma-separated subset of: {','.join(CLAIMS)} (default: all)")
    rep.add_argument("--quick", action="store_true",
                     help="smaller runs, 3 seeds per claim (about a minute)")
    rep.add_argument("--out", default="batchnorm-report", help="output folder")
    rep.add_argument("--seeds", type=_positive_int, default=None,
                     help="seeds per claim (default: 3 with --quick, 5 otherwise)")
    rep.add_argument("--seed", type=_non_negative_int, default=0,
                     help="first seed; the others follow it (default 0)")
    rep.add_argument("--data", default="digits",
                     help="'digits' (scikit-learn, bundled) or 'mnist:PATH' (folder of IDX files)")
    rep.add_argument("--threads", type=_positive_int, default=1,
                     help="torch intra-op threads (default 1: the models are tiny)")
    rep.add_argument("--size", choices=("tiny", "quick", "full"), default=None,
                     help=argparse.SUPPRESS)  # 'tiny' is for tests
    rep.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench = sub.add_parser("bench", help="time the kernel backends present against PyTorch")
    bench.add_argument("--repeats", type=_positive_int, default=15)
    bench.add_argument("--small", action="store_true", help="tiny shapes only (a smoke test)")
    sub.add_parser("info", help="versions, backends, and which backend each tensor would use")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "reproduce":
        return _reproduce(args, argv)
    if args.command == "bench":
        return _bench(args.repeats, args.small)
    return _info()


def _reproduce(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from .experiments.runner import reproduce

    claims = [c.strip() for c in args.claims.split(",") if c.strip()] if args.claims else None
    size = args.size or ("quick" if args.quick else "full")
    shown = list(sys.argv[1:] if argv is None else argv)
    try:
        results = reproduce(claims, size=size, out=args.out, seeds=args.seeds, data=args.data,
                            progress=False if args.no_progress else None, threads=args.threads,
                            command=" ".join(["batchnorm", *shown]), base_seed=args.seed)
    except (ValueError, OSError) as exc:  # bad input, or an --out that cannot be written
        print(f"batchnorm reproduce: error: {exc}", file=sys.stderr)
        return 2
    width = max(len(r.title) for r in results)
    for r in results:
        print(f"{r.title:<{width}}  {r.shown_verdict:<34}  {r.reason}")
    print(f"report: {os.path.join(args.out, 'report.md')} and report.html")
    return 0


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _sample_tensors() -> list[tuple[str, str, str, Any]]:
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = []
    for device in devices:
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            # the two canonical layouts the kernels see: (N, C, S) and channels-last (M, C)
            cf = torch.zeros(4, 8, 16, dtype=dtype, device=device)
            cl = torch.zeros(64, 8, dtype=dtype, device=device)
            out.append((device, str(dtype).replace("torch.", ""), "channels-first (N,C,S)", cf))
            out.append((device, str(dtype).replace("torch.", ""), "channels-last (M,C)", cl))
    return out


def _info() -> int:
    import torch

    from . import __version__, kernels

    print(f"batchnorm {__version__}  python {platform.python_version()}  "
          f"torch {torch.__version__}  numpy {_version('numpy')}  numba {_version('numba')}  "
          f"triton {_version('triton')}")
    print(f"CUDA available: {torch.cuda.is_available()}   "
          f"{kernels.ENV_VAR}={os.environ.get(kernels.ENV_VAR, '') or '(unset)'}")
    print(f"backends available: {', '.join(kernels.available_backends())}")
    print()
    print(f"{'device':<7} {'dtype':<9} {'layout':<24} backend")
    for device, dtype, layout, x in _sample_tensors():
        try:
            name = kernels.select(x).name
        except RuntimeError as exc:
            name = f"error: {exc}"
        print(f"{device:<7} {dtype:<9} {layout:<24} {name}")
    return 0


def _time_ms(fn: Callable[[], object], timings: list[float]) -> None:
    t0 = time.perf_counter()
    fn()
    timings.append((time.perf_counter() - t0) * 1e3)


def _bench(repeats: int, small: bool = False) -> int:
    import torch

    from . import kernels

    torch.manual_seed(0)
    shapes = [(8, 4, 5, 5), (16, 8)] if small else [(64, 64, 28, 28), (256, 256, 7, 7),
                                                     (512, 1024)]
    backends = kernels.available_backends()
    print(f"batchnorm bench: training forward+backward, float32, CPU, "
          f"{torch.get_num_threads()} thread(s), median of {repeats} interleaved repeats; "
          "peer: torch.nn.functional.batch_norm in the same run")
    print(f"{'shape':<20} {'layout':<14} {'impl':<10} {'ms':>9} {'vs torch':>9}")
    saved = os.environ.get(kernels.ENV_VAR)
    try:
        for shape in shapes:
            for layout in ("contiguous", "channels_last") if len(shape) == 4 else ("contiguous",):
                _bench_case(shape, layout, backends, repeats)
    finally:
        if saved is None:
            os.environ.pop(kernels.ENV_VAR, None)
        else:
            os.environ[kernels.ENV_VAR] = saved
    return 0


def _bench_case(shape: tuple[int, ...], layout: str, backends: list[str], repeats: int) -> None:
    import torch
    import torch.nn.functional as F

    from . import kernels
    from .functional import batch_norm

    x = torch.randn(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    c = shape[1]
    w = torch.ones(c, requires_grad=True)
    b = torch.zeros(c, requires_grad=True)
    canon = x.detach().reshape(shape[0], c, -1) if layout == "contiguous" \
        else x.detach().permute(0, 2, 3, 1).reshape(-1, c)

    def ours() -> object:
        batch_norm(x, None, None, w, b, True).sum().backward()
        return None

    def theirs() -> object:
        F.batch_norm(x, None, None, w, b, True).sum().backward()
        return None

    impls: dict[str, Callable[[], object]] = {"torch": theirs}
    for name in backends:
        backend = kernels.get_backend(name)
        if backend is None or not backend.supports(canon):
            continue
        if name == "triton" and x.device.type == "cpu":
            continue  # Triton's CPU interpreter is a correctness tool, not timed
        impls[name] = functools.partial(_forced, kernels.ENV_VAR, name, ours)
    timings: dict[str, list[float]] = {k: [] for k in impls}
    for fn in impls.values():  # warm-up (JIT compilation)
        fn()
    for _ in range(repeats):
        for k, fn in impls.items():
            _time_ms(fn, timings[k])
    ref = statistics.median(timings["torch"])
    for k, ts in timings.items():
        med = statistics.median(ts)
        print(f"{'x'.join(map(str, shape)):<20} {layout:<14} {k:<10} {med:9.3f} "
              f"{ref / med:8.2f}x")


def _forced(var: str, name: str, fn: Callable[[], object]) -> object:
    os.environ[var] = name
    return fn()


if __name__ == "__main__":
    raise SystemExit(main())
