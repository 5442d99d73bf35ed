"""Memory of training with ``save="output"`` (in-place activated BN) against PyTorch's and ours
storing the input: a BN + leaky-ReLU block, and a training step of ResNet-50 with leaky ReLU.

    python benchmarks/bench_memory.py            # writes benchmarks/results/memory.json
    python benchmarks/bench_memory.py --batch 8 --size 64 --rounds 3 --out /tmp/memory.json

Measured, per variant, in one run:

- ``saved_MiB``: bytes autograd saves for backward during one forward, unique storages counted
  once (``torch.autograd.graph.saved_tensors_hooks``; a tensor the next convolution saves and
  the norm layer saves too is counted once), and the ratio to PyTorch's;
- ``peak_MiB`` (model step): the growth of the process's peak resident set (``VmHWM``, reset
  through ``/proc/self/clear_refs``) over one whole training step, each variant in a fresh
  process after a tiny warm-up batch that loads the kernels: the allocator's peak as the
  operating system sees it, weights, gradients and optimizer state included;
- time: forward + backward (block) or the whole step (model), variants interleaved, median and
  minimum over rounds (the machine is shared: compare minimums).

Variants. Block ``(N, C, H, W)`` input from a ``clone`` (a non-leaf that saves nothing):
``torch`` = ``nn.BatchNorm2d`` + ``nn.LeakyReLU(inplace=True)``; ``input`` = ours, activation
fused, storing the input; ``output`` = ours with ``save="output"``; ``output_inplace`` = also
``inplace=True``. Model: torchvision's ResNet-50 (``num_classes=10``, every ReLU a
``LeakyReLU(0.01, inplace=True)``), ``torch``, ``fuse`` (``batchnorm.fuse`` with the example
input) and ``fuse_output`` (``batchnorm.fuse(..., save="output")``); float32, SGD momentum 0.9.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import batchnorm  # noqa: E402

MIB = 2**20


def saved_bytes(fn: Callable[[], torch.Tensor],
                params: tuple[torch.Tensor, ...] = ()) -> tuple[int, int]:
    """Unique bytes autograd saves while ``fn`` runs (a storage saved twice counts once): all
    of them, and those that are not the storage of one of ``params`` (the activations)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    mine = {p.untyped_storage().data_ptr() for p in params}
    return sum(seen.values()), sum(b for k, b in seen.items() if k not in mine)


# ---------------------------------------------------------------------------------------------
# block


def block_layers(c: int) -> dict[str, nn.Module]:
    leaky = "leaky_relu"
    return {
        "torch": nn.Sequential(nn.BatchNorm2d(c), nn.LeakyReLU(0.01, inplace=True)),
        "input": batchnorm.BatchNorm2d(c, activation=leaky),
        "output": batchnorm.BatchNorm2d(c, activation=leaky, save="output"),
        "output_inplace": batchnorm.BatchNorm2d(c, activation=leaky, save="output",
                                                inplace=True),
    }


def run_block(args: argparse.Namespace, conv: bool) -> list[dict]:
    shape = (args.block_batch, args.block_channels, args.block_size, args.block_size)
    x = torch.randn(shape, requires_grad=True)
    g = torch.randn(shape)
    layers = block_layers(shape[1])
    if conv:  # what the block's output feeds in a network, which saves it as its input
        layers = {k: nn.Sequential(m, nn.Conv2d(shape[1], shape[1], 3, padding=1, bias=False))
                  for k, m in layers.items()}

    def step(layer: nn.Module) -> Callable[[], torch.Tensor]:
        def fwd() -> torch.Tensor:
            return layer(x.clone())

        def run() -> torch.Tensor:
            y = fwd()
            y.backward(g)
            return y
        run.fwd = fwd  # type: ignore[attr-defined]
        return run

    steps = {k: step(m) for k, m in layers.items()}
    for s in steps.values():  # warm-up: Numba compile/cache load
        s()
        s()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds * 3):
        for k, s in steps.items():
            x.grad = None
            t0 = time.perf_counter()
            s()
            times[k].append(time.perf_counter() - t0)
    rows = []
    ref = None
    for k, s in steps.items():
        fwd = s.fwd  # type: ignore[attr-defined]
        nbytes, act_bytes = saved_bytes(fwd, tuple(layers[k].parameters()))
        ref = nbytes if k == "torch" else ref
        assert ref is not None
        rows.append({"what": "bn_leaky+conv" if conv else "bn_leaky", "shape": list(shape),
                     "variant": k, "saved_MiB": nbytes / MIB, "saved_vs_torch": nbytes / ref,
                     "saved_activations_MiB": act_bytes / MIB,
                     "tensors_of_input_size": act_bytes // x.nbytes,
                     "median_ms": 1e3 * statistics.median(times[k]),
                     "min_ms": 1e3 * min(times[k])})
    return rows


# ---------------------------------------------------------------------------------------------
# model


def leaky(model: nn.Module) -> nn.Module:
    """Every ``nn.ReLU`` of ``model`` becomes ``nn.LeakyReLU(0.01)`` (same ``inplace``)."""
    for name, child in model.named_children():
        if isinstance(child, nn.ReLU):
            setattr(model, name, nn.LeakyReLU(0.01, inplace=child.inplace))
        else:
            leaky(child)
    return model


MODEL_VARIANTS = ("torch", "fuse", "fuse_output")


def build(variant: str, batch: int, size: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from tests.vision import torchvision

    torch.manual_seed(0)
    base = leaky(torchvision().models.resnet50(num_classes=10))
    x = torch.randn(batch, 3, size, size)
    target = torch.randint(0, 10, (batch,))
    if variant == "torch":
        return base, x, target
    model, report = batchnorm.fuse(copy.deepcopy(base), example_input=x[:2],
                                   save="output" if variant == "fuse_output" else "input")
    if variant == "fuse_output":
        assert report.save is not None
        print(f"# fuse_output: {len(report.save.switched)} layers switched, "
              f"{len(report.save.kept)} kept the input: {report.save.kept}", file=sys.stderr)
    return model, x, target


def stepper(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], float]:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def _vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def child_peak(variant: str, batch: int, size: int) -> dict:
    """In a fresh process: one tiny warm-up step (kernels loaded, optimizer state created),
    then the peak-RSS growth over one full-size step."""
    model, x, target = build(variant, batch, size)
    stepper(model, x[:2], target[:2])()
    step = stepper(model, x, target)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    before = _vm("VmRSS")
    step()
    return {"peak_MiB": (_vm("VmHWM") - before) / MIB}


def run_model(args: argparse.Namespace) -> list[dict]:
    models = {v: build(v, args.batch, args.size) for v in MODEL_VARIANTS}
    steps = {v: stepper(*m) for v, m in models.items()}
    for s in steps.values():
        s()
        s()
    times: dict[str, list[float]] = {v: [] for v in steps}
    for _ in range(args.rounds):
        for v, s in steps.items():
            t0 = time.perf_counter()
            s()
            times[v].append(time.perf_counter() - t0)
    rows = []
    ref = None
    for v, (model, x, target) in models.items():
        nbytes, act_bytes = saved_bytes(lambda m=model, x=x, t=target: F.cross_entropy(m(x), t),
                                        tuple(model.parameters()))
        ref = nbytes if v == "torch" else ref
        assert ref is not None
        peak = json.loads(subprocess.run(
            [sys.executable, __file__, "--child", v, "--batch", str(args.batch), "--size",
             str(args.size)], capture_output=True, text=True, check=True).stdout)["peak_MiB"]
        rows.append({"what": "resnet50_leaky_step", "batch": args.batch, "size": args.size,
                     "variant": v, "saved_MiB": nbytes / MIB, "saved_vs_torch": nbytes / ref,
                     "saved_activations_MiB": act_bytes / MIB, "peak_MiB": peak,
                     "median_ms": 1e3 * statistics.median(times[v]),
                     "min_ms": 1e3 * min(times[v])})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--block-batch", type=int, default=32)
    ap.add_argument("--block-channels", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=56)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child_peak(args.child, args.batch, args.size)))
        return
    print(f"threads={torch.get_num_threads()} load={os.getloadavg()[0]:.2f}")
    rows = run_block(args, False) + run_block(args, True) + run_model(args)
    head = (f"{'what':>20} {'variant':>15} {'saved MiB':>10} {'x torch':>8} {'of which act':>12} "
            f"{'peak MiB':>9} {'median ms':>10} {'min ms':>9}")
    print(head)
    for r in rows:
        peak = f"{r['peak_MiB']:9.1f}" if "peak_MiB" in r else f"{'-':>9}"
        print(f"{r['what']:>20} {r['variant']:>15} {r['saved_MiB']:10.1f} "
              f"{r['saved_vs_torch']:8.2f} {r['saved_activations_MiB']:12.1f} {peak} "
              f"{r['median_ms']:10.1f} {r['min_ms']:9.1f}")
    by = {(r["what"], r["variant"]): r for r in rows}
    summary = {
        "block_saved_vs_torch": by["bn_leaky", "output"]["saved_vs_torch"],
        "block_conv_saved_vs_torch": by["bn_leaky+conv", "output"]["saved_vs_torch"],
        "step_saved_vs_torch": by["resnet50_leaky_step", "fuse_output"]["saved_vs_torch"],
        "step_time_output_vs_input_min": by["resnet50_leaky_step", "fuse_output"]["min_ms"]
        / by["resnet50_leaky_step", "fuse"]["min_ms"],
        "step_time_output_vs_input_median": by["resnet50_leaky_step", "fuse_output"]["median_ms"]
        / by["resnet50_leaky_step", "fuse"]["median_ms"],
        "block_time_output_vs_input_min": by["bn_leaky", "output"]["min_ms"]
        / by["bn_leaky", "input"]["min_ms"],
    }
    print(json.dumps(summary, indent=1))
    out = {
        "command": "python benchmarks/bench_memory.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "dtype": "float32", "rounds": args.rounds, "loadavg_after": os.getloadavg()[0],
        "summary": summary, "rows": rows,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
