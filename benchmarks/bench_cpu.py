"""CPU benchmark of the Numba backend against PyTorch eager (and, with --compile, torch.compile).

    python benchmarks/bench_cpu.py                  # full run, writes benchmarks/results/cpu.json
    python benchmarks/bench_cpu.py --quick          # two shapes, few repeats (a smoke run)
    python benchmarks/bench_cpu.py --compile        # add torch.compile of the eager function
    python benchmarks/bench_cpu.py --overhead       # per-call overhead: small 2-D fwd+bwd only

float32, training. Ops: BN, BN+ReLU, BN+Add+ReLU (ours fused), and BN followed by the user's own
``nn.ReLU()`` / ``nn.ReLU(inplace=True)`` module (``bn_then_relu``/``bn_then_relu_``: ours
unfused, the path a converted model takes); modes: forward (``fwd``) and forward+backward
(``fwdbwd``). Every case times ours and the peers in the same process, interleaved (one call of each
per round), and reports median and min. ``copy`` is ``dst.copy_(x)`` into a preallocated tensor:
the bandwidth bound. Effective bandwidth counts the minimum traffic (forward: x in, y out = 2
tensors, +1 for the residual; forward+backward: 5 tensors, +2 with a residual) and is reported as
a fraction of the copy bandwidth. ``bound`` is the fraction of the copy-speed bound for the traffic
our algorithm must move (``docs/decisions.md``, "What the copy bound allows on channels-last"):
channels-first as the minimum, channels-last reads ``x`` twice in each direction (forward 3
tensors, forward+backward 8, +1/+2 with a residual). Both sides allocate their outputs fresh on
every call (the same allocation regime). Numba's first-call compile time is measured in a
subprocess with an empty cache directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import batchnorm.functional as BF
from batchnorm import kernels
from batchnorm.kernels import select

SHAPES_4D = [
    (32, 64, 56, 56), (32, 64, 112, 112), (32, 256, 56, 56), (32, 128, 28, 28),
    (32, 512, 28, 28), (32, 1024, 14, 14), (32, 2048, 7, 7),
]
SHAPE_2D = (256, 1024)
OPS = ("bn", "bn_relu", "bn_add_relu", "bn_then_relu", "bn_then_relu_")
KERNEL_OPS = ("bn", "bn_relu", "bn_add_relu")
LARGE = {(32, 64, 112, 112), (32, 256, 56, 56), (32, 512, 28, 28), (32, 64, 56, 56)}


def wait_for_quiet(limit_s: float = 300.0, threshold: float = 1.0) -> tuple[float, float]:
    """Poll (bounded) until the 1-minute load average is below ``threshold``."""
    start = time.time()
    while os.getloadavg()[0] >= threshold and time.time() - start < limit_s:
        time.sleep(10)
    return os.getloadavg()[0], time.time() - start


def make_case(shape, layout, op, mode, impl):
    c = shape[1]
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = torch.randn(shape).to(memory_format=fmt)
    r = torch.randn(shape).to(memory_format=fmt) if op == "bn_add_relu" else None
    w = torch.rand(c) + 0.5
    b = torch.randn(c) * 0.1
    rm, rv = torch.zeros(c), torch.ones(c)
    bwd = mode == "fwdbwd"
    if bwd:
        x.requires_grad_(True)
        w.requires_grad_(True)
        b.requires_grad_(True)
        if r is not None:
            r.requires_grad_(True)
    dy = torch.randn(shape).to(memory_format=fmt) if bwd else None

    module = torch.nn.ReLU(inplace=op == "bn_then_relu_")

    def eager(x, r):
        y = F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
        if op.startswith("bn_then"):
            return module(y)
        if r is not None:
            y = y + r
        return F.relu(y) if op != "bn" else y

    def ours(x, r):
        if op.startswith("bn_then"):
            return module(BF.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5))
        act = None if op == "bn" else "relu"
        return BF.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, activation=act, residual=r)

    if impl == "copy":
        dst = torch.empty_like(x.detach())
        src = x.detach()
        return lambda: dst.copy_(src)
    fn: Callable = {"eager": eager, "ours": ours}.get(impl) or torch.compile(eager)

    def run():
        y = fn(x, r)
        if bwd:
            y.backward(dy)
            x.grad = w.grad = b.grad = None
            if r is not None:
                r.grad = None

    return run


def bench(fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, dict[str, float]]:
    for f in fns.values():  # warm-up (and compile)
        f()
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys, rng = list(fns), random.Random(0)
    for _ in range(rounds):
        # a fresh (seeded) order each round: a call finds in the caches what the call before
        # it left there (its own code, if the same side ran), so each side must follow each
        # other as often (docs/decisions.md, "Benchmarks shuffle the order of their rounds")
        for k in rng.sample(keys, len(keys)):
            f = fns[k]
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v)}
            for k, v in times.items()}


def compile_time() -> float:
    """Seconds of the first training forward+backward with an empty Numba cache."""
    code = (
        "import time, torch, batchnorm.functional as BF\n"
        "x = torch.randn(8, 16, 10, 10, requires_grad=True)\n"
        "t = time.perf_counter()\n"
        "BF.batch_norm(x, None, None, training=True, activation='relu').sum().backward()\n"
        "print(time.perf_counter() - t)\n"
    )
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, NUMBA_CACHE_DIR=d, BATCHNORM_BACKEND="cpu")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


OVERHEAD_SHAPES = [(60, 100), (256, 1024)]


def overhead(rounds: int) -> list[dict]:
    """BN+ReLU training forward+backward on small 2-D tensors, ours against eager, in µs
    (interleaved, medians and minimums): where the per-call cost of the Python layers shows."""
    rows = []
    for shape in OVERHEAD_SHAPES:
        fns = {k: make_case(shape, "nc", "bn_relu", "fwdbwd", k) for k in ("ours", "eager")}
        for f in fns.values():
            for _ in range(20):
                f()
        res = bench(fns, rounds)
        row = {"shape": list(shape), "op": "bn_relu", "mode": "fwdbwd",
               **{k: {"median_us": 1e3 * v["median_ms"], "min_us": 1e3 * v["min_ms"]}
                  for k, v in res.items()},
               "speedup_vs_eager_median": res["eager"]["median_ms"] / res["ours"]["median_ms"],
               "speedup_vs_eager_min": res["eager"]["min_ms"] / res["ours"]["min_ms"]}
        rows.append(row)
        print(f"{str(shape):>12} ours {row['ours']['median_us']:7.1f} µs "
              f"(min {row['ours']['min_us']:6.1f})  eager {row['eager']['median_us']:7.1f} µs "
              f"(min {row['eager']['min_us']:6.1f})  x eager {row['speedup_vs_eager_median']:.2f}",
              flush=True)
    return rows


def allocator_env() -> dict[str, str]:
    """The allocator setting of docs/performance.md that this process runs under (the
    environment sets it; large fresh outputs fault in their pages without it)."""
    return {k: os.environ[k] for k in ("THP_MEM_ALLOC_ENABLE", "MALLOC_MMAP_THRESHOLD_",
                                       "MALLOC_TRIM_THRESHOLD_") if k in os.environ}


def geomean(v: list[float]) -> float:
    return math.exp(sum(math.log(a) for a in v) / len(v)) if v else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two shapes, few repeats")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine")
    ap.add_argument("--overhead", action="store_true",
                    help="only the per-call overhead cases (small 2-D tensors)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    load_before, waited = (os.getloadavg()[0], 0.0) if args.no_wait else wait_for_quiet()
    if args.overhead:
        os.environ.setdefault(kernels.ENV_VAR, "cpu")
        print(f"threads={torch.get_num_threads()} load={load_before:.2f}")
        orows = overhead(args.rounds)
        opath = Path(args.out) if args.out else (
            Path(__file__).parent / "results" / "cpu_overhead.json")
        opath.parent.mkdir(parents=True, exist_ok=True)
        opath.write_text(json.dumps({
            "command": "python benchmarks/bench_cpu.py " + " ".join(sys.argv[1:]),
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                        "allocator_env": allocator_env()},
            "backend": select(torch.randn(2, 4, 3)).name, "rounds": args.rounds,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0],
            "waited_s": waited, "rows": orows}, indent=1))
        print(f"wrote {opath}")
        return
    shapes = SHAPES_4D[:2] if args.quick else SHAPES_4D
    rounds = 5 if args.quick else args.rounds
    cases = [(s, lay) for s in shapes for lay in ("nchw", "nhwc")] + [(SHAPE_2D, "nc")]
    impls = ["ours", "eager", "copy"] + (["compile"] if args.compile else [])
    # Time the cpu kernels on every shape, whatever default selection (Backend.prefers) picks.
    os.environ.setdefault(kernels.ENV_VAR, "cpu")
    probe = torch.randn(2, 4, 3)
    backend = select(probe).name
    rows = []
    header = (f"{'shape':>20} {'lay':>4} {'op':>11} {'mode':>6} {'ours ms':>8} {'eager ms':>8} "
              f"{'x eager':>7} {'bw/copy':>7} {'bound':>5}"
              + (f" {'x comp':>6}" if args.compile else ""))
    print(f"backend={backend} threads={torch.get_num_threads()} load={load_before:.2f}")
    print(header)
    for shape, layout in cases:
        for op in OPS:
            for mode in ("fwd", "fwdbwd"):
                fns = {k: make_case(shape, layout, op, mode, k) for k in impls}
                res = bench(fns, rounds)
                numel = math.prod(shape)
                tensors = (2 if mode == "fwd" else 5) + (
                    (1 if mode == "fwd" else 2) if op == "bn_add_relu" else 0)
                copy_bw = 2 * 4 * numel / (res["copy"]["median_ms"] * 1e-3)
                ours_bw = tensors * 4 * numel / (res["ours"]["median_ms"] * 1e-3)
                alg = tensors if layout != "nhwc" else (
                    (3 if mode == "fwd" else 8) + (tensors - (2 if mode == "fwd" else 5)))
                row = {
                    "shape": list(shape), "layout": layout, "op": op, "mode": mode,
                    "tensors_min_traffic": tensors, **{f"{k}": v for k, v in res.items()},
                    "speedup_vs_eager": res["eager"]["median_ms"] / res["ours"]["median_ms"],
                    "copy_GBps": copy_bw / 1e9, "ours_GBps": ours_bw / 1e9,
                    "bw_fraction_of_copy": ours_bw / copy_bw,
                    "tensors_algorithm_traffic": alg,
                    "bound_fraction": ours_bw / copy_bw * alg / tensors,
                }
                if args.compile:
                    row["speedup_vs_compile"] = (res["compile"]["median_ms"]
                                                 / res["ours"]["median_ms"])
                rows.append(row)
                line = (f"{str(shape):>20} {layout:>4} {op:>11} {mode:>6} "
                        f"{res['ours']['median_ms']:8.2f} {res['eager']['median_ms']:8.2f} "
                        f"{row['speedup_vs_eager']:7.2f} {row['bw_fraction_of_copy']:7.2f} "
                        f"{row['bound_fraction']:5.2f}")
                if args.compile:
                    line += f" {row['speedup_vs_compile']:6.2f}"
                print(line, flush=True)
                del fns
    summary = {
        "min_speedup_all_cells": min(r["speedup_vs_eager"] for r in rows),
        "bound_fraction_geomean_kernel_cells": geomean(
            [r["bound_fraction"] for r in rows if r["op"] in KERNEL_OPS]),
    }
    for op in ("bn_then_relu", "bn_then_relu_"):
        sp = [r["speedup_vs_eager"] for r in rows if r["op"] == op]
        summary[f"{op}_min_speedup"] = min(sp) if sp else float("nan")
    for op in ("bn_relu",):
        for mode in ("fwd", "fwdbwd"):
            sp = [r["speedup_vs_eager"] for r in rows
                  if r["op"] == op and r["mode"] == mode and len(r["shape"]) == 4]
            summary[f"{op}_{mode}_geomean_speedup_4d"] = geomean(sp)
            summary[f"{op}_{mode}_min_speedup_4d"] = min(sp) if sp else float("nan")
    print(json.dumps(summary, indent=1))
    load_after = os.getloadavg()[0]
    ctime = compile_time()  # last: compiling loads the machine
    print(f"numba first-call compile {ctime:.1f}s")
    out = {
        "command": "python benchmarks/bench_cpu.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "allocator_env": allocator_env()},
        "backend": backend, "dtype": "float32", "training": True, "rounds": rounds,
        "loadavg_before": load_before, "loadavg_after": load_after, "waited_s": waited,
        "alloc_env": {k: v for k, v in os.environ.items()
                      if k.startswith(("MALLOC_", "THP_", "OMP_", "NUMBA_"))},
        "numba_first_call_compile_s": ctime, "summary": summary, "rows": rows,
    }
    path = Path(args.out) if args.out else (
        Path(__file__).parent / "results" / ("cpu_quick.json" if args.quick else "cpu.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
