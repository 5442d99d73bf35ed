"""What a batch-norm layer defined in Python can gain in a real model's training step: the cost
of its ``autograd.Function`` against the room PyTorch's own kernels leave under the copy speed.

    python benchmarks/floor.py                    # writes benchmarks/results/floor.json
    python benchmarks/floor.py --models resnet18 --layouts nhwc --rounds 9 --out /tmp/f.json

For each model (those of ``benchmarks/models.py``) and layout, in one process:

- ``floor_ms``: PyTorch's model with every ``BatchNorm2d``'s training call sent through a
  Python ``autograd.Function`` that runs PyTorch's own kernels (``torch_fn`` in
  ``benchmarks/models.py``), minus PyTorch's model: the median of the two steps' difference
  within a round, over interleaved rounds.
  The kernels, the numbers and the graph are PyTorch's; what is added is the Function's
  machinery (its forward entry, the engine's call into a Python backward), which any layer
  written in Python pays and no kernel removes.
- ``slack_ms``: over the model's batch-norm layers (shapes and counts from one forward),
  PyTorch's training kernels, forward and backward (``_native_batch_norm_legit``,
  ``native_batch_norm_backward``), minus the copy-speed time of the least traffic any batch
  norm must move, five tensors (forward: ``x`` in, ``y`` out; backward: ``dy`` and ``x`` in,
  ``dx`` out) at the speed of ``dst.copy_(src)`` (two tensors) measured in the same loop. It is
  the most that kernels of any design could save on these layers, and more than any can (a
  channels-last forward larger than the caches must read ``x`` twice: ``docs/decisions.md``,
  "What the copy bound allows on channels-last").

Where ``floor_ms > slack_ms``, a ``convert_model``-ed model, whose layers each pay the Function,
cannot reach PyTorch's step time whatever its kernels do: ``best_speedup`` is the step time
of PyTorch's model over that step plus the floor minus the slack. The activations are not
counted (``convert_model`` leaves them to PyTorch; ``fuse`` folds them in and has their
kernels' time as further room, so no bound is claimed for ``fuse``). Run with the allocator
setting of ``docs/performance.md``, as ``benchmarks/models.py``.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import _ALLOCATOR_ENV, MODELS, build, stepper  # noqa: E402
from tests.vision import torchvision  # noqa: E402


def floor_steps(base: nn.Module, x: torch.Tensor, target: torch.Tensor,
                rounds: int) -> dict[str, float]:
    """Median step times (s) of PyTorch's model and of the same with ``torch_fn`` layers, and
    ``floor``: the median over rounds of the difference within a round (the two steps run back
    to back, in a fresh order each round, so a drift of the machine's speed cancels)."""
    steps = {v: stepper(build("", v, base, x), x, target) for v in ("torch", "torch_fn")}
    for s in steps.values():
        s()
        s()
    times: dict[str, list[float]] = {v: [] for v in steps}
    keys, rng = list(steps), random.Random(0)
    for _ in range(rounds):
        for v in rng.sample(keys, len(keys)):
            t0 = time.perf_counter()
            steps[v]()
            times[v].append(time.perf_counter() - t0)
    out = {v: statistics.median(ts) for v, ts in times.items()}
    out["floor"] = statistics.median(
        a - b for a, b in zip(times["torch_fn"], times["torch"], strict=True))
    return out


def bn_shapes(base: nn.Module, x: torch.Tensor) -> dict[tuple[int, ...], int]:
    """The model's batch-norm output shapes, with how many layers have each."""
    count: collections.Counter[tuple[int, ...]] = collections.Counter()
    model = copy.deepcopy(base).train()
    hooks = [m.register_forward_hook(lambda _m, _i, out: count.update([tuple(out.shape)]))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return dict(count)


def kernel_slack(shapes: dict[tuple[int, ...], int], fmt: torch.memory_format,
                 rounds: int) -> tuple[float, float]:
    """Per step (s): PyTorch's batch-norm kernels, forward and backward, over ``shapes``, and
    the copy-speed time of five tensors of each; medians of interleaved rounds."""
    cases = {}
    for shape in shapes:
        c = shape[1]
        x = torch.randn(shape).to(memory_format=fmt)
        g = torch.randn(shape).to(memory_format=fmt)
        y = torch.empty_like(x)
        w, b, rm, rv = torch.ones(c), torch.zeros(c), torch.zeros(c), torch.ones(c)

        def kernels(x: torch.Tensor = x, g: torch.Tensor = g, w: torch.Tensor = w,
                    b: torch.Tensor = b, rm: torch.Tensor = rm, rv: torch.Tensor = rv) -> None:
            _out, mean, invstd = torch.ops.aten._native_batch_norm_legit(
                x, w, b, rm, rv, True, 0.1, 1e-5)
            torch.ops.aten.native_batch_norm_backward(g, x, w, None, None, mean, invstd, True,
                                                      1e-5, [True, True, True])

        cases[(shape, "kernels")] = kernels
        cases[(shape, "copy")] = lambda x=x, y=y: y.copy_(x)
    for f in cases.values():
        f()
    times: dict[tuple[tuple[int, ...], str], list[float]] = {k: [] for k in cases}
    keys, rng = list(cases), random.Random(1)
    for _ in range(rounds):
        for k in rng.sample(keys, len(keys)):
            t0 = time.perf_counter()
            cases[k]()
            times[k].append(time.perf_counter() - t0)
    kern = sum(n * statistics.median(times[(s, "kernels")]) for s, n in shapes.items())
    bound = sum(n * 2.5 * statistics.median(times[(s, "copy")]) for s, n in shapes.items())
    return kern, bound


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--layouts", nargs="+", default=["nchw", "nhwc"], choices=["nchw", "nhwc"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--rounds", type=int, default=41, help="model steps per variant")
    ap.add_argument("--kernel-rounds", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tv = torchvision()
    print(f"threads={torch.get_num_threads()} batch={args.batch} size={args.size} "
          f"rounds={args.rounds} load={os.getloadavg()[0]:.2f}")
    rows = []
    for name in args.models:
        for layout in args.layouts:
            torch.manual_seed(0)
            fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
            base = getattr(tv.models, MODELS[name])(num_classes=10).to(memory_format=fmt)
            x = torch.randn(args.batch, 3, args.size, args.size).to(memory_format=fmt)
            target = torch.randint(0, 10, (args.batch,))
            steps = floor_steps(base, x, target, args.rounds)
            shapes = bn_shapes(base, x)
            kern, bound = kernel_slack(shapes, fmt, args.kernel_rounds)
            floor, slack = steps["floor"], kern - bound
            row = {"model": name, "layout": layout, "bn_layers": sum(shapes.values()),
                   "torch_step_ms": 1e3 * steps["torch"],
                   "torch_fn_step_ms": 1e3 * steps["torch_fn"], "floor_ms": 1e3 * floor,
                   "torch_bn_kernels_ms": 1e3 * kern, "copy_bound_ms": 1e3 * bound,
                   "slack_ms": 1e3 * slack,
                   "best_speedup": steps["torch"] / (steps["torch"] + floor - slack)}
            rows.append(row)
            print(f"{name:>20} {layout:>4}  step {row['torch_step_ms']:8.1f} ms  floor "
                  f"{row['floor_ms']:6.1f} ms  BN kernels {row['torch_bn_kernels_ms']:6.1f} "
                  f"(copy bound {row['copy_bound_ms']:6.1f}) slack {row['slack_ms']:6.1f} ms  "
                  f"best x{row['best_speedup']:.3f}", flush=True)
    out = {
        "command": "python benchmarks/floor.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torchvision": tv.__version__, "torch_threads": torch.get_num_threads(),
                    "allocator_env": {k: os.environ[k] for k in _ALLOCATOR_ENV
                                      if k in os.environ}},
        "batch": args.batch, "size": args.size, "rounds": args.rounds,
        "kernel_rounds": args.kernel_rounds, "dtype": "float32",
        "loadavg_after": os.getloadavg()[0], "rows": rows,
    }
    path = Path(args.out) if args.out else Path(__file__).parent / "results" / "floor.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
