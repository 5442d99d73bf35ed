"""Per-layer forward times of batch norm inside a real model's training step: PyTorch's layers
against ours after ``convert_model``, the same layers in the same step.

    python benchmarks/model_layers.py                 # writes benchmarks/results/model_layers.json
    python benchmarks/model_layers.py --model resnet50 --layout nchw --rounds 9

Forward pre/post hooks on every ``BatchNorm2d`` time its call (``perf_counter``) while the model
trains (forward, cross-entropy, backward, SGD with momentum; torchvision model, ``num_classes=10``,
float32, 32×3×112×112), the two models' steps interleaved. The hooks cost the same on both
sides. Reported per layer: the median over rounds, its shape, and the sum per step; also the
same layer's forward timed on its own in a loop (hot caches), so the table shows what the model's
surroundings add to each side.
"""

from __future__ import annotations

import argparse
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
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import batchnorm  # noqa: E402
from tests.vision import torchvision  # noqa: E402


def _hooks(model: nn.Module, times: dict[str, list[float]],
           shapes: dict[str, tuple[int, ...]]) -> None:
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.BatchNorm2d):
            continue

        def pre(m: nn.Module, _inp: object) -> None:
            m._t0 = time.perf_counter()  # type: ignore[assignment]

        def post(m: nn.Module, _inp: object, out: torch.Tensor, name: str = name) -> None:
            times.setdefault(name, []).append(time.perf_counter() - m._t0)  # type: ignore[operator]
            shapes[name] = tuple(out.shape)

        mod.register_forward_pre_hook(pre)
        mod.register_forward_hook(post)


def _alone(layer: nn.Module, shape: tuple[int, ...], fmt: torch.memory_format,
           repeats: int) -> float:
    """The layer's training forward on its own, repeated (hot caches): median seconds."""
    layer = copy.deepcopy(layer).train()
    x = torch.randn(shape).to(memory_format=fmt).requires_grad_()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        layer(x)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts[repeats // 5:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mobilenet_v3_small")
    ap.add_argument("--layout", default="nhwc", choices=["nchw", "nhwc"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tv = torchvision()
    torch.manual_seed(0)
    fmt = torch.channels_last if args.layout == "nhwc" else torch.contiguous_format
    base = getattr(tv.models, args.model)(num_classes=10).to(memory_format=fmt)
    x = torch.randn(32, 3, 112, 112).to(memory_format=fmt)
    target = torch.randint(0, 10, (32,))
    models = {"torch": copy.deepcopy(base), "ours": batchnorm.convert_model(copy.deepcopy(base))}
    times: dict[str, dict[str, list[float]]] = {k: {} for k in models}
    shapes: dict[str, tuple[int, ...]] = {}
    steps = {}
    for k, m in models.items():
        _hooks(m, times[k], shapes)
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)

        def step(m: nn.Module = m, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), target).backward()
            opt.step()

        steps[k] = step
    for s in steps.values():  # warm-up (Numba compiles and loads)
        s()
        s()
    for t in times.values():
        t.clear()
    step_times: dict[str, list[float]] = {k: [] for k in steps}
    keys, rng = list(steps), random.Random(0)
    for _ in range(args.rounds):
        for k in rng.sample(keys, len(keys)):  # a fresh order each round
            s = steps[k]
            t0 = time.perf_counter()
            s()
            step_times[k].append(time.perf_counter() - t0)
    layers = {k: dict(models[k].named_modules()) for k in models}
    rows = []
    for name in times["torch"]:
        row = {"layer": name, "shape": list(shapes[name])}
        for k in models:
            row[f"{k}_in_model_us"] = 1e6 * statistics.median(times[k][name])
            row[f"{k}_alone_us"] = 1e6 * _alone(layers[k][name], shapes[name], fmt, 60)
        rows.append(row)
        print(f"{name:34} {str(tuple(row['shape'])):20} in model: torch "
              f"{row['torch_in_model_us']:7.1f} ours {row['ours_in_model_us']:7.1f} µs | alone: "
              f"torch {row['torch_alone_us']:6.1f} ours {row['ours_alone_us']:6.1f} µs", flush=True)
    summary = {
        f"{k}_{w}_ms_per_step": sum(r[f"{k}_{w}_us"] for r in rows) / 1e3
        for k in models for w in ("in_model", "alone")
    }
    summary.update({f"{k}_step_ms": 1e3 * statistics.median(v) for k, v in step_times.items()})
    print(json.dumps(summary, indent=1))
    out = {
        "command": "python benchmarks/model_layers.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "allocator_env": {k: os.environ[k] for k in (
                        "THP_MEM_ALLOC_ENABLE", "MALLOC_MMAP_THRESHOLD_",
                        "MALLOC_TRIM_THRESHOLD_") if k in os.environ}},
        "model": args.model, "layout": args.layout, "rounds": args.rounds,
        "summary": summary, "rows": rows,
    }
    path = Path(args.out) if args.out else Path(__file__).parent / "results" / "model_layers.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
