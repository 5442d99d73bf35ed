"""Inference speed-up of folding batch norm into the convolutions of a ResNet-style model.

    python benchmarks/bench_fold.py             # writes benchmarks/results/fold.json
    python benchmarks/bench_fold.py --quick     # smaller batch, fewer repeats (a smoke run)

Model: ResNet-18 layout (stem conv 7x7/2 + max-pool, four stages of two BasicBlocks, widths
64-512, global pool, linear), float32, eval mode, on (N, 3, H, W) input, under
``torch.inference_mode()``. Variants timed in the same process, interleaved (one call of each per
round), reporting median and min:

- ``torch``        nn.BatchNorm2d + nn.ReLU + ``+`` (the unfolded baseline);
- ``ours``         batchnorm.BatchNorm2d with fused residual add and ReLU (unfolded);
- ``torch_fx_fuse`` the peer: ``torch.fx.experimental.optimization.fuse`` of ``torch``;
- ``fold(torch)``, ``fold(ours)``  :func:`batchnorm.fold` of each.

Also reported: the largest |output - torch output| (exactness of the rewrite), parameters+buffers
in bytes, and the number of batch-norm layers left. Effective bandwidth is not reported: the time
is dominated by the convolutions (compute bound), which is the point of folding.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

import batchnorm


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, ours: bool) -> None:
        super().__init__()
        self.ours = ours
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if ours:
            self.bn1 = batchnorm.BatchNorm2d(cout, activation="relu")
            self.bn2 = batchnorm.BatchNorm2d(cout, activation="relu")
        else:
            self.bn1, self.bn2, self.relu = nn.BatchNorm2d(cout), nn.BatchNorm2d(cout), nn.ReLU()
        self.down: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            bn = batchnorm.BatchNorm2d(cout) if ours else nn.BatchNorm2d(cout)
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn)

    def forward(self, x):
        if self.ours:
            return self.bn2(self.conv2(self.bn1(self.conv1(x))), self.down(x))
        h = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(h)) + self.down(x))


def resnet18(ours: bool) -> nn.Module:
    bn = batchnorm.BatchNorm2d(64, activation="relu") if ours else nn.BatchNorm2d(64)
    stem = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), bn] + ([] if ours else [nn.ReLU()])
    layers: list[nn.Module] = [nn.Sequential(*stem), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride, ours), BasicBlock(cout, cout, 1, ours)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000)]
    return nn.Sequential(*layers)


def randomized(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


def wait_for_quiet(limit_s: float, threshold: float = 1.5) -> float:
    """Poll (bounded) until the 1-minute load average is below ``threshold``; the machine is
    shared, so the load at start and end goes into the JSON either way."""
    start = time.time()
    while os.getloadavg()[0] >= threshold and time.time() - start < limit_s:
        time.sleep(10)
    return time.time() - start


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int,
                     warmup: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def state_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--wait", type=float, default=300.0,
                        help="seconds to wait at most for a quiet machine (0: do not wait)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "fold.json"))
    args = parser.parse_args()
    batch = args.batch or (2 if args.quick else 16)
    size = args.size or (64 if args.quick else 112)
    repeats = args.repeats or (5 if args.quick else 25)

    torch_model = randomized(resnet18(ours=False))
    ours_model = randomized(resnet18(ours=True))
    ours_model.load_state_dict(torch_model.state_dict())  # same weights: outputs comparable
    x = torch.randn(batch, 3, size, size)
    variants = {
        "torch": torch_model,
        "ours": ours_model,
        "torch_fx_fuse": fuse(torch_model),
        "fold(torch)": batchnorm.fold(torch_model, x),
        "fold(ours)": batchnorm.fold(ours_model, x),
    }
    with torch.inference_mode():
        reference = torch_model(x)
        diffs = {k: float((m(x) - reference).abs().max()) for k, m in variants.items()}

        def call(m: nn.Module) -> Callable[[], object]:
            return lambda: m(x)

        waited = wait_for_quiet(args.wait) if args.wait > 0 else 0.0
        load_before = os.getloadavg()[0]
        times = time_interleaved({k: call(m) for k, m in variants.items()}, repeats, warmup=2)
        load_after = os.getloadavg()[0]

    base = statistics.median(times["torch"])
    rows = []
    for name, m in variants.items():
        med = statistics.median(times[name])
        rows.append(dict(
            variant=name, median_ms=med, min_ms=min(times[name]), speedup_vs_torch=base / med,
            images_per_s=batch / med * 1e3, max_abs_diff_vs_torch=diffs[name],
            state_bytes=state_bytes(m),
            bn_layers_left=sum(batchnorm.tools.is_batch_norm(s) for s in m.modules()),
        ))
    print(f"ResNet-18 eval, float32, input ({batch}, 3, {size}, {size}), {repeats} interleaved "
          f"repeats, {torch.get_num_threads()} threads, load {load_before:.1f}->{load_after:.1f}")
    print(f"{'variant':<14} {'median ms':>10} {'min ms':>9} {'speed-up':>9} {'img/s':>8} "
          f"{'max|diff|':>10} {'BN left':>8}")
    for r in rows:
        print(f"{r['variant']:<14} {r['median_ms']:>10.2f} {r['min_ms']:>9.2f} "
              f"{r['speedup_vs_torch']:>8.2f}x {r['images_per_s']:>8.1f} "
              f"{r['max_abs_diff_vs_torch']:>10.2e} {r['bn_layers_left']:>8d}")
    result = dict(
        command=" ".join(["python", "benchmarks/bench_fold.py", *sys.argv[1:]]),
        machine=dict(platform=platform.platform(), processor=platform.processor(),
                     cpu_count=os.cpu_count(), threads=torch.get_num_threads(),
                     torch=torch.__version__, load_before=load_before, load_after=load_after,
                     waited_for_quiet_s=waited),
        model="resnet18 (torchvision layout), float32, eval, inference_mode",
        input=[batch, 3, size, size], repeats=repeats, gpu="not measured", rows=rows,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
