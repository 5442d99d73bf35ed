"""Training steps of real models: PyTorch's batch norm against ours after ``convert_model`` and
after ``fuse`` (and, with ``--compile``, ``torch.compile`` of PyTorch's model).

    python benchmarks/models.py                      # writes benchmarks/results/models.json
    python benchmarks/models.py --models resnet18 --layouts nhwc --rounds 5 --out /tmp/m.json
    python benchmarks/models.py --compile            # adds torch.compile (slow to compile)
    python benchmarks/models.py --variants torch_fn  # PyTorch's kernels behind a Python Function
    THP_MEM_ALLOC_ENABLE=1 MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 \
        python benchmarks/models.py --out benchmarks/results/models_alloc.json

Models are torchvision's ResNet-18, ResNet-50, MobileNetV3-Small and EfficientNet-B0
(``num_classes=10``, random weights), float32, built once per layout and copied for each variant
so every variant starts from the same weights. A step is forward, cross-entropy, backward and an
SGD (momentum 0.9) update on a fixed batch. Variants run interleaved, one step each per round;
the table reports medians (and minimums) over rounds and the speed-up against PyTorch's model.

Also per variant, from separate measurements outside the timed rounds:

- ``saved_MiB``: the bytes autograd saves for backward in one forward (unique storages, through
  ``torch.autograd.graph.saved_tensors_hooks``), a proxy for activation memory;
- ``faults``: the median of the page faults (``ru_minflt``) per timed step: glibc's defaults
  return freed blocks to the OS and the next step faults them in again, at random, for either
  variant; run with the allocator setting of ``docs/performance.md`` (``MALLOC_*``,
  ``THP_MEM_ALLOC_ENABLE``) to compare compute rather than page faults (the JSON records the
  setting);
- ``other_ms``: the step's median time minus ``fixed_ms``, its share spent in the
  convolutions, linear layers, loss and optimizer (self CPU time over wall time, both from one
  profile of three steps): what batch norm, activations, adds, copies and the rest of the step
  cost. The issue's target for ``fuse`` is at most half of PyTorch's.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import batchnorm  # noqa: E402
from tests.vision import torchvision  # noqa: E402

MODELS = {
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "mobilenet_v3_small": "mobilenet_v3_small",
    "efficientnet_b0": "efficientnet_b0",
}
VARIANTS = ("torch", "convert", "fuse")
# on request (--variants): fuse with the memory mode save="output" (benchmarks/bench_memory.py);
# torch_fn, PyTorch's own kernels behind a Python autograd.Function per layer (the floor of a
# layer defined in Python: what the Function machinery alone adds to PyTorch's model)
EXTRA_VARIANTS = ("fuse_output", "torch_fn")
# conv/linear kernels and their backward, the optimizer: time we do not control
_NOT_OURS = ("conv", "Conv", "mkldnn", "addmm", "aten::linear", "aten::matmul", "Optimizer",
             "sgd", "_foreach", "cross_entropy", "nll_loss", "log_softmax", "LogSoftmax",
             "NllLoss", "AddmmBackward", "MmBackward")
# names that other ops contain (``aten::t`` is a prefix of ``aten::threshold_backward``)
_NOT_OURS_EXACT = frozenset({"aten::t", "aten::mm", "aten::bmm", "TBackward0"})


def _not_ours(key: str) -> bool:
    return key in _NOT_OURS_EXACT or any(k in key for k in _NOT_OURS)


# the allocator setting of docs/performance.md, recorded with the results
_ALLOCATOR_ENV = ("THP_MEM_ALLOC_ENABLE", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


class _TorchKernels(torch.autograd.Function):
    """PyTorch's training batch-norm kernels (``_native_batch_norm_legit`` and
    ``native_batch_norm_backward``, running statistics updated by the kernel) behind a Python
    ``autograd.Function``: the same kernels as PyTorch's layer, the call path of ours."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):  # type: ignore[override]
        y, mean, invstd = torch.ops.aten._native_batch_norm_legit(
            x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, weight, None, None, mean, invstd, True, ctx.eps,
            list(ctx.needs_input_grad[:3]))
        return dx, dw, db, None, None, None, None


class _TorchFnBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training call goes through :class:`_TorchKernels`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.running_mean is None or self.momentum is None:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        return _torch_kernels(x, self.weight, self.bias,  # type: ignore[no-any-return]
                              self.running_mean, self.running_var, self.momentum, self.eps)


# the Function's C entry, as batchnorm.ops.fast_train calls its own (no Python wrapper)
_torch_kernels = torch._C._FunctionBase.__dict__["apply"].__get__(None, _TorchKernels)


def build(name: str, variant: str, base: nn.Module, example: torch.Tensor) -> nn.Module:
    model = copy.deepcopy(base)
    if variant == "torch_fn":
        for m in model.modules():
            if type(m) is nn.BatchNorm2d:
                m.__class__ = _TorchFnBatchNorm2d
    elif variant == "convert":
        model = batchnorm.convert_model(model)
    elif variant == "fuse":
        model, _report = batchnorm.fuse(model, example_input=example)
    elif variant == "fuse_output":
        model, _report = batchnorm.fuse(model, example_input=example, save="output")
    return model


def stepper(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
            compile_: bool = False) -> Callable[[], float]:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    fwd = torch.compile(model) if compile_ else model

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(fwd(x), target)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def saved_bytes(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> int:
    """Bytes of the unique storages autograd saves for backward in one forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), target)
    del loss
    return sum(seen.values())


def fixed_share(step: Callable[[], float], steps: int = 3) -> float:
    """The share of a step's time that no batch-norm implementation changes: the self CPU time
    of the convolutions, linear layers, loss and optimizer over the wall time of the same
    profiled steps (both from one profile: the profiler's own overhead inflates the two
    alike, where an unprofiled median would not be comparable). The profiler's attribution
    of the remaining ops is not used: it charges our kernels' Python frames and waits
    unevenly."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - t0
    fixed = sum(e.self_cpu_time_total / 1e6 for e in prof.key_averages() if _not_ours(e.key))
    return min(fixed / wall, 1.0)


def run_model(name: str, layout: str, args: argparse.Namespace) -> list[dict]:
    tv = torchvision()
    torch.manual_seed(0)
    base = getattr(tv.models, MODELS[name])(num_classes=10)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    base = base.to(memory_format=fmt)
    x = torch.randn(args.batch, 3, args.size, args.size).to(memory_format=fmt)
    target = torch.randint(0, 10, (args.batch,))
    variants = [v for v in args.variants if v != "compile"]
    models = {v: build(name, v, base, x) for v in variants}
    steps = {v: stepper(m, x, target) for v, m in models.items()}
    if args.compile:
        models["compile"] = copy.deepcopy(base)
        steps["compile"] = stepper(models["compile"], x, target, compile_=True)
    for s in steps.values():  # warm-up: Numba compile, allocator, torch.compile
        s()
        s()
    times: dict[str, list[float]] = {v: [] for v in steps}
    faults: dict[str, list[int]] = {v: [] for v in steps}
    keys, rng = list(steps), random.Random(0)
    for _ in range(args.rounds):
        # a fresh (seeded) order each round: a step finds in the caches what the step before it
        # left (our layers' code after a step with our layers); each variant must follow each
        # other as often
        for v in rng.sample(keys, len(keys)):
            s = steps[v]
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            s()
            times[v].append(time.perf_counter() - t0)
            faults[v].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    rows = []
    ref = statistics.median(times["torch"])
    for v, ts in times.items():
        med = statistics.median(ts)
        fixed = 1e3 * med * fixed_share(steps[v]) if v != "compile" else math.nan
        row = {"model": name, "layout": layout, "variant": v, "median_ms": 1e3 * med,
               "min_ms": 1e3 * min(ts), "speedup_vs_torch": ref / med,
               "faults": statistics.median(faults[v]),
               "saved_MiB": saved_bytes(models[v], x, target) / 2**20,
               "fixed_ms": fixed, "other_ms": 1e3 * med - fixed}
        rows.append(row)
        print(f"{name:>20} {layout:>4} {v:>8} {row['median_ms']:9.1f} ms (min "
              f"{row['min_ms']:8.1f})  x torch {row['speedup_vs_torch']:5.2f}  faults "
              f"{row['faults']:7.0f}  saved "
              f"{row['saved_MiB']:7.1f} MiB  other {row['other_ms']:8.1f} ms", flush=True)
    return rows


def geomean(v: list[float]) -> float:
    return math.exp(sum(math.log(a) for a in v) / len(v)) if v else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--layouts", nargs="+", default=["nchw", "nhwc"], choices=["nchw", "nhwc"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS),
                    choices=list(VARIANTS + EXTRA_VARIANTS))
    ap.add_argument("--compile", action="store_true", help="also torch.compile PyTorch's model")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if "torch" not in args.variants:
        args.variants = ["torch", *args.variants]
    print(f"threads={torch.get_num_threads()} batch={args.batch} size={args.size} "
          f"rounds={args.rounds} load={os.getloadavg()[0]:.2f}")
    rows = []
    for name in args.models:
        for layout in args.layouts:
            rows += run_model(name, layout, args)
    summary = {}
    for v in args.variants + (["compile"] if args.compile else []):
        if v == "torch":
            continue
        sp = [r["speedup_vs_torch"] for r in rows if r["variant"] == v]
        summary[f"{v}_geomean_speedup"] = geomean(sp)
        summary[f"{v}_min_speedup"] = min(sp) if sp else float("nan")
        ratios = []
        for r in rows:
            if r["variant"] != v or math.isnan(r["other_ms"]):
                continue
            t = next(q for q in rows if q["variant"] == "torch" and q["model"] == r["model"]
                     and q["layout"] == r["layout"])
            ratios.append(r["other_ms"] / t["other_ms"] if t["other_ms"] > 0 else math.nan)
        # the share is clamped to [0, 1]; a ratio is only meaningful where PyTorch's side left
        # time outside the fixed ops
        if ratios and all(q >= 0 and math.isfinite(q) for q in ratios):
            summary[f"{v}_other_time_ratio_geomean"] = geomean(ratios)
        else:
            summary[f"{v}_other_time_ratio_geomean"] = None
    print(json.dumps(summary, indent=1))
    out = {
        "command": "python benchmarks/models.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torchvision": torchvision().__version__,
                    "torch_threads": torch.get_num_threads(),
                    "allocator_env": {k: os.environ[k] for k in _ALLOCATOR_ENV
                                      if k in os.environ}},
        "batch": args.batch, "size": args.size, "rounds": args.rounds, "dtype": "float32",
        "loadavg_after": os.getloadavg()[0], "summary": summary, "rows": rows,
    }
    path = Path(args.out) if args.out else Path(__file__).parent / "results" / "models.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
