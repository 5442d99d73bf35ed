"""Fused activations on the CPU: which ones ``fuse`` should move into our layer.

    python benchmarks/bench_activations.py            # writes benchmarks/results/activations.json
    python benchmarks/bench_activations.py --rounds 31 --acts leaky_relu silu

For each activation of the table and each shape, in NCHW and channels_last, float32, training,
forward+backward of three variants, interleaved (one call of each per round):

- ``torch``: ``torch.nn.BatchNorm2d`` followed by PyTorch's activation module (in place where
  the module can be);
- ``ours+module``: our layer followed by the same module (what ``convert_model`` gives);
- ``fused``: our layer with the activation inside the kernels. ``Backend.fuses_fast`` is
  overridden to admit every activation for the run: it is what this benchmark measures (a layer
  built with an activation that ``fuses_fast`` refuses otherwise runs our kernels without it and
  then PyTorch's op, i.e. ``ours+module``).

Reports the median and min of the rounds and the ratios ``fused`` against the other two; the
summary is the geometric mean of ``ours+module / fused`` per activation (above 1: fusing wins).
The shapes are layers of the models in ``benchmarks/models.py`` (ResNet stem, MobileNetV3 and
EfficientNet blocks).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import batchnorm

SHAPES = [(32, 64, 56, 56), (32, 16, 56, 56), (32, 72, 28, 28), (32, 96, 14, 14),
          (32, 240, 7, 7), (32, 576, 4, 4)]

ACTS: dict[str, tuple[object, type[nn.Module], dict]] = {
    "relu": ("relu", nn.ReLU, {"inplace": True}),
    "leaky_relu": (("leaky_relu", 0.1), nn.LeakyReLU, {"negative_slope": 0.1, "inplace": True}),
    "relu6": ("relu6", nn.ReLU6, {"inplace": True}),
    "hardswish": ("hardswish", nn.Hardswish, {"inplace": True}),
    "hardsigmoid": ("hardsigmoid", nn.Hardsigmoid, {"inplace": True}),
    "silu": ("silu", nn.SiLU, {"inplace": True}),
    "sigmoid": ("sigmoid", nn.Sigmoid, {}),
    "elu": (("elu", 1.0), nn.ELU, {"alpha": 1.0, "inplace": True}),
    "gelu": ("gelu", nn.GELU, {}),
}


def variants(shape: tuple[int, ...], act: str) -> dict[str, nn.Module]:
    spec, module, kwargs = ACTS[act]
    c = shape[1]
    return {
        "torch": nn.Sequential(nn.BatchNorm2d(c), module(**kwargs)),
        "ours+module": nn.Sequential(batchnorm.BatchNorm2d(c), module(**kwargs)),
        "fused": batchnorm.BatchNorm2d(c, activation=spec),
    }


def run_case(shape: tuple[int, ...], layout: str, act: str, rounds: int) -> dict:
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = torch.randn(*shape).to(memory_format=fmt).requires_grad_()
    g = torch.randn(*shape).to(memory_format=fmt)
    models = variants(shape, act)

    def step(m: nn.Module) -> None:
        m(x).backward(g)

    for m in models.values():
        step(m)
        step(m)
    times: dict[str, list[float]] = {k: [] for k in models}
    keys, rng = list(models), random.Random(0)
    for _ in range(rounds):
        for k in rng.sample(keys, len(keys)):  # a fresh order each round
            m = models[k]
            t0 = time.perf_counter()
            step(m)
            times[k].append(time.perf_counter() - t0)
    med = {k: 1e6 * statistics.median(v) for k, v in times.items()}
    low = {k: 1e6 * min(v) for k, v in times.items()}
    return {"shape": list(shape), "layout": layout, "act": act, "median_us": med, "min_us": low,
            "fused_vs_torch": med["torch"] / med["fused"],
            "fused_vs_ours_module": med["ours+module"] / med["fused"],
            "fused_vs_ours_module_min": low["ours+module"] / low["fused"]}


def geomean(v: list[float]) -> float:
    return math.exp(sum(math.log(a) for a in v) / len(v)) if v else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--acts", nargs="+", choices=list(ACTS), default=list(ACTS))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default="benchmarks/results/activations.json")
    args = ap.parse_args()
    cpu = batchnorm.kernels.get_backend("cpu")
    if cpu is None:
        raise SystemExit("the cpu backend (Numba) is not importable")
    cpu.fuses_fast = lambda act: True  # type: ignore[method-assign]  # measure the kernels
    print(f"threads={torch.get_num_threads()} rounds={args.rounds} "
          f"load={os.getloadavg()[0]:.2f}")
    rows = []
    for act in args.acts:
        for shape in SHAPES:
            for layout in ("nchw", "nhwc"):
                row = run_case(shape, layout, act, args.rounds)
                rows.append(row)
                m = row["median_us"]
                print(f"{act:>12} {str(tuple(shape)):>18} {layout:>4}  torch {m['torch']:8.0f}"
                      f"  ours+module {m['ours+module']:8.0f}  fused {m['fused']:8.0f} us  "
                      f"fused x{row['fused_vs_ours_module']:.2f} vs ours+module "
                      f"(min x{row['fused_vs_ours_module_min']:.2f}), "
                      f"x{row['fused_vs_torch']:.2f} vs torch", flush=True)
    summary = {act: {"fused_vs_ours_module_geomean": geomean(
        [r["fused_vs_ours_module"] for r in rows if r["act"] == act]),
        "fused_vs_ours_module_min_geomean": geomean(
        [r["fused_vs_ours_module_min"] for r in rows if r["act"] == act]),
        "fused_vs_torch_geomean": geomean([r["fused_vs_torch"] for r in rows if r["act"] == act])}
        for act in args.acts}
    print(json.dumps(summary, indent=1))
    out = {"command": "python benchmarks/bench_activations.py " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k != "out"),
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
        "loadavg_after": os.getloadavg()[0], "summary": summary, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
