"""GPU benchmark of the Triton backend against PyTorch eager, torch.compile and a device copy.

    python benchmarks/bench_gpu.py                   # full run, writes benchmarks/results/gpu.json
    python benchmarks/bench_gpu.py --compile         # add torch.compile of the eager function
    python benchmarks/bench_gpu.py --quick           # two shapes, float32 only (a smoke run)
    python benchmarks/bench_gpu.py --dry-run         # no GPU needed: tiny shapes on the CPU

Shapes: the CPU benchmark's set ((32, C, H, W) NCHW and channels_last, and (256, 1024)) in
float32, float16 and bfloat16 (parameters and running statistics float32, as mixed precision
has them). Ops: BN, BN+ReLU, BN+Add+ReLU; modes: training forward (``fwd``) and
forward+backward (``fwdbwd``). Peers in the same run, interleaved (one call of each per round):
``eager`` (``F.batch_norm`` — cuDNN or PyTorch's native kernel — then the separate add and
ReLU), ``compile`` (``torch.compile`` of that eager function, with ``--compile``) and ``copy``
(``dst.copy_(x)``: the bandwidth bound). Times are medians of CUDA-event intervals.

Effective bandwidth counts the minimum traffic in bytes of the input dtype (forward: x in, y
out = 2 tensors, +1 with a residual; forward+backward: 5 tensors, +2 with a residual) and is
reported as a fraction of the copy bandwidth (2 tensors). Peak memory is the allocator's high
water mark of one call above what the case holds before it. Before timing, ours is checked
against eager (max abs difference of the output, recorded in the JSON).

``--dry-run`` runs the same code path (cases, checks, timing loop, table, summary, JSON) on
tiny CPU tensors with a wall-clock timer (Triton kernels through the interpreter when no GPU)
and writes to a temporary file unless ``--out`` is given: its figures are not GPU figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

SHAPES_4D = [
    (32, 64, 56, 56), (32, 64, 112, 112), (32, 256, 56, 56), (32, 128, 28, 28),
    (32, 512, 28, 28), (32, 1024, 14, 14), (32, 2048, 7, 7),
]
SHAPE_2D = (256, 1024)
DRY_SHAPES_4D = [(4, 8, 6, 6), (2, 3, 5, 7)]
DRY_SHAPE_2D = (16, 8)
OPS = ("bn", "bn_relu", "bn_add_relu")
MODES = ("fwd", "fwdbwd")
DTYPES = ("float32", "float16", "bfloat16")
LARGE_BYTES = 50e6  # targets apply to tensors of at least 50 MB


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two shapes, float32 only")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow)")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny CPU shapes, wall-clock timer: checks the script without a GPU")
    ap.add_argument("--rounds", type=int, default=50, help="timed calls per implementation")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated dtypes")
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated ops")
    ap.add_argument("--persistent-max", type=int, default=None,
                    help="Triton backend: largest slab tile (elements) of the persistent kernels")
    ap.add_argument("--tile", type=int, default=None,
                    help="Triton backend: elements per tile of the split/elementwise kernels")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = ap.parse_args(argv)
    for name, allowed in (("dtypes", DTYPES), ("ops", OPS)):
        chosen = [v for v in getattr(args, name).split(",") if v]
        bad = [v for v in chosen if v not in allowed]
        if bad or not chosen:
            ap.error(f"--{name}: expected a comma-separated subset of {allowed}, got "
                     f"{getattr(args, name)!r}")
        setattr(args, name, chosen)
    if args.rounds < 1:
        ap.error(f"--rounds: expected a positive integer, got {args.rounds}")
    return args


def cases(args: argparse.Namespace) -> list[tuple[tuple[int, ...], str, str]]:
    """``(shape, layout, dtype)`` in run order."""
    shapes4 = DRY_SHAPES_4D if args.dry_run else SHAPES_4D[:2] if args.quick else SHAPES_4D
    shape2 = DRY_SHAPE_2D if args.dry_run else SHAPE_2D
    dtypes = ["float32"] if args.quick else args.dtypes
    out = []
    for dtype in dtypes:
        out += [(s, lay, dtype) for s in shapes4 for lay in ("nchw", "nhwc")]
        out.append((shape2, "nc", dtype))
    return out


def min_traffic_tensors(op: str, mode: str) -> int:
    base = 2 if mode == "fwd" else 5
    return base + ((1 if mode == "fwd" else 2) if op == "bn_add_relu" else 0)


class Timer:
    """CUDA events on the GPU; ``perf_counter`` (dry run) on the CPU."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"

    def time_rounds(self, fns: dict[str, Callable[[], None]], rounds: int
                    ) -> dict[str, list[float]]:
        torch = self.torch
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            if self.cuda:
                events = {}
                for k, f in fns.items():
                    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                    start.record()
                    f()
                    end.record()
                    events[k] = (start, end)
                torch.cuda.synchronize()
                for k, (start, end) in events.items():
                    times[k].append(start.elapsed_time(end))
            else:
                for k, f in fns.items():
                    t0 = time.perf_counter()
                    f()
                    times[k].append(1e3 * (time.perf_counter() - t0))
        return times


def make_inputs(shape, layout, dtype_name, op, mode, device) -> dict:
    """One set of inputs per case, shared by every implementation (the same numbers)."""
    import torch

    dtype = getattr(torch, dtype_name)
    c = shape[1]
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = torch.randn(shape, device=device).to(dtype=dtype, memory_format=fmt)
    r = (torch.randn(shape, device=device).to(dtype=dtype, memory_format=fmt)
         if op == "bn_add_relu" else None)
    w = torch.rand(c, device=device) + 0.5
    b = torch.randn(c, device=device) * 0.1
    bwd = mode == "fwdbwd"
    if bwd:
        for t in (x, w, b, r):
            if t is not None:
                t.requires_grad_(True)
    dy = torch.randn(shape, device=device).to(dtype=dtype, memory_format=fmt) if bwd else None
    return {"x": x, "r": r, "w": w, "b": b, "dy": dy}


def make_case(inputs: dict, op: str, impl: str):
    """``(timed call, output-only call)`` of one implementation."""
    import torch
    import torch.nn.functional as F

    import batchnorm.functional as BF

    x, r, w, b, dy = (inputs[k] for k in ("x", "r", "w", "b", "dy"))
    c = x.shape[1]
    rm, rv = torch.zeros(c, device=x.device), torch.ones(c, device=x.device)
    bwd = dy is not None
    leaves = [t for t in (x, w, b, r) if t is not None]

    def eager(x, r):
        y = F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
        if r is not None:
            y = y + r
        return F.relu(y) if op != "bn" else y

    def ours(x, r):
        act = None if op == "bn" else "relu"
        return BF.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, activation=act, residual=r)

    if impl == "copy":
        dst, src = torch.empty_like(x.detach()), x.detach()
        return (lambda: dst.copy_(src)), None
    fn: Callable = {"eager": eager, "ours": ours}.get(impl) or torch.compile(eager)

    def run():
        y = fn(x, r)
        if bwd:
            y.backward(dy)
            for t in leaves:
                t.grad = None
        return y

    return run, (lambda: fn(x, r).detach())


def peak_memory_mb(f: Callable[[], object], device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    f()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def strategy_of(shape, layout, dtype_name, device) -> str:
    """Which backend (and Triton strategy) our call takes for this case."""
    import torch

    from batchnorm.kernels import select
    from batchnorm.layout import canonicalize

    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    probe = torch.empty(shape, device=device, dtype=getattr(torch, dtype_name),
                        memory_format=fmt)
    xc = canonicalize(probe)[0]
    backend = select(xc)
    persistent = getattr(backend, "_persistent", None)
    if persistent is None:
        return backend.name
    return f"{backend.name}:{'persistent' if persistent(xc) is not None else 'split'}"


def configure_triton(args: argparse.Namespace) -> dict[str, int] | None:
    """Apply --persistent-max / --tile to the Triton backend; its settings, for the JSON."""
    from batchnorm import kernels

    backend = kernels.get_backend("triton")
    if backend is None:
        return None
    for name, value in (("persistent_max", args.persistent_max), ("tile", args.tile)):
        if value is not None:
            setattr(backend, name, value)
    return {"persistent_max": backend.persistent_max, "tile": backend.tile}  # type: ignore


def format_header(compile_: bool) -> str:
    return (f"{'shape':>20} {'lay':>4} {'dtype':>8} {'op':>11} {'mode':>6} {'strategy':>18} "
            f"{'ours ms':>8} {'eager ms':>8} {'x eager':>7} {'bw/copy':>7}"
            + (f" {'comp ms':>8} {'x comp':>6}" if compile_ else ""))


def format_row(row: dict, compile_: bool) -> str:
    line = (f"{str(tuple(row['shape'])):>20} {row['layout']:>4} {row['dtype']:>8} "
            f"{row['op']:>11} {row['mode']:>6} {row['strategy']:>18} "
            f"{row['ours']['median_ms']:8.3f} {row['eager']['median_ms']:8.3f} "
            f"{row['speedup_vs_eager']:7.2f} {row['bw_fraction_of_copy']:7.2f}")
    if compile_:
        line += f" {row['compile']['median_ms']:8.3f} {row['speedup_vs_compile']:6.2f}"
    return line


def geomean(v: list[float]) -> float:
    return math.exp(sum(math.log(a) for a in v) / len(v)) if v else float("nan")


def summarize(rows: list[dict], compile_: bool) -> dict[str, float]:
    """The issue's targets, as measured: bandwidth on large tensors, speedups, layout parity."""
    out: dict[str, float] = {}
    large = [r for r in rows if r["bytes"] >= LARGE_BYTES]
    for mode in MODES:
        fr = [r["bw_fraction_of_copy"] for r in large if r["mode"] == mode]
        out[f"min_bw_fraction_{mode}_large"] = min(fr) if fr else float("nan")
    for op in [o for o in OPS if any(r["op"] == o for r in rows)]:
        for mode in MODES:
            sel = [r for r in rows if r["op"] == op and r["mode"] == mode]
            out[f"{op}_{mode}_geomean_x_eager"] = geomean([r["speedup_vs_eager"] for r in sel])
            if compile_:
                out[f"{op}_{mode}_geomean_x_compile"] = geomean(
                    [r["speedup_vs_compile"] for r in sel])
    nchw = {(tuple(r["shape"]), r["dtype"], r["op"], r["mode"]): r["ours"]["median_ms"]
            for r in rows if r["layout"] == "nchw"}
    ratios = [r["ours"]["median_ms"] / nchw[key] for r in rows if r["layout"] == "nhwc"
              and (key := (tuple(r["shape"]), r["dtype"], r["op"], r["mode"])) in nchw]
    out["geomean_time_nhwc_over_nchw"] = geomean(ratios)
    return out


def machine_info(device) -> dict[str, object]:
    import torch

    info: dict[str, object] = {"platform": platform.platform(), "torch": torch.__version__,
                               "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}",
                    gpu_memory_GiB=round(props.total_memory / 2**30, 1),
                    cudnn=torch.backends.cudnn.version())
    else:
        info.update(gpu=None, note="dry run on the CPU: not GPU figures")
    return info


def write_json(payload: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(payload), indent=1))
    return path


def _finite(v):
    """NaN (a summary with no qualifying rows) as JSON null, not the non-standard NaN."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(u) for k, u in v.items()}
    if isinstance(v, list):
        return [_finite(u) for u in v]
    return v


def default_out(args: argparse.Namespace) -> Path:
    if args.dry_run:
        return Path(tempfile.gettempdir()) / "bench_gpu_dry_run.json"
    name = "gpu_quick.json" if args.quick else "gpu.json"
    return Path(__file__).parent / "results" / name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("bench_gpu.py: no CUDA device (torch.cuda.is_available() is False); GPU "
                  "figures cannot be measured here. Run it on a CUDA machine, or use --dry-run "
                  "to check the script on the CPU.", file=sys.stderr)
            return 2
    else:  # CPU tensors: the Triton kernels run in the interpreter (set before Triton loads)
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("BATCHNORM_BACKEND", "triton")
    import torch

    torch.manual_seed(0)
    device = torch.device("cpu" if args.dry_run else "cuda")
    rounds = 2 if args.dry_run else 10 if args.quick else args.rounds
    impls = ["ours", "eager", "copy"] + (["compile"] if args.compile else [])
    timer = Timer(device)
    tuning = configure_triton(args)
    print(f"device={machine_info(device).get('gpu') or 'cpu (dry run)'} rounds={rounds}")
    print(format_header(args.compile))
    rows = []
    for shape, layout, dtype_name in cases(args):
        strategy = strategy_of(shape, layout, dtype_name, device)
        esize = torch.empty((), dtype=getattr(torch, dtype_name)).element_size()
        numel = math.prod(shape)
        for op in args.ops:
            for mode in MODES:
                inputs = make_inputs(shape, layout, dtype_name, op, mode, device)
                built = {k: make_case(inputs, op, k) for k in impls}
                y_ours, y_eager = built["ours"][1](), built["eager"][1]()
                max_err = (y_ours.float() - y_eager.float()).abs().max().item()
                fns = {k: v[0] for k, v in built.items()}
                for f in fns.values():  # warm-up: Triton JIT, cuDNN plans, compile
                    f()
                    f()
                memory = {k: peak_memory_mb(f, device) for k, f in fns.items()}
                times = timer.time_rounds(fns, rounds)
                res = {k: {"median_ms": statistics.median(v), "min_ms": min(v),
                           "peak_memory_MiB": memory[k]} for k, v in times.items()}
                tensors = min_traffic_tensors(op, mode)
                copy_bw = 2 * esize * numel / (res["copy"]["median_ms"] * 1e-3)
                ours_bw = tensors * esize * numel / (res["ours"]["median_ms"] * 1e-3)
                row = {
                    "shape": list(shape), "layout": layout, "dtype": dtype_name, "op": op,
                    "mode": mode, "strategy": strategy, "bytes": esize * numel,
                    "tensors_min_traffic": tensors, "max_abs_diff_vs_eager": max_err, **res,
                    "speedup_vs_eager": res["eager"]["median_ms"] / res["ours"]["median_ms"],
                    "copy_GBps": copy_bw / 1e9, "ours_GBps": ours_bw / 1e9,
                    "bw_fraction_of_copy": ours_bw / copy_bw,
                }
                if args.compile:
                    row["speedup_vs_compile"] = (res["compile"]["median_ms"]
                                                 / res["ours"]["median_ms"])
                rows.append(row)
                print(format_row(row, args.compile), flush=True)
                del built, fns, inputs
    summary = summarize(rows, args.compile)
    print(json.dumps(summary, indent=1))
    payload = {
        "command": "python benchmarks/bench_gpu.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "dry_run": args.dry_run, "machine": machine_info(device), "training": True,
        "rounds": rounds, "triton_tuning": tuning,
        "timer": "cuda events" if device.type == "cuda" else "perf_counter",
        "summary": summary, "rows": rows,
    }
    path = write_json(payload, Path(args.out) if args.out else default_out(args))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
