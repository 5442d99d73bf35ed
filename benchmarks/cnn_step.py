"""End-to-end CPU training step of a small ResNet-style CNN: ours against torch.nn.BatchNorm2d.

    python benchmarks/cnn_step.py                 # writes benchmarks/results/cpu_cnn_step.json
    python benchmarks/cnn_step.py --channels-last --batch 32

The same network is built twice with the same weights: once with ``torch.nn.BatchNorm2d`` then
``nn.ReLU`` (and ``relu(bn(x) + identity)`` at the end of a block), once with
``batchnorm.BatchNorm2d(activation="relu")`` whose second norm of a block takes the identity as
its fused ``residual``. A step is forward, cross-entropy, backward and an SGD update. Steps of the
two models are interleaved; the table reports medians and minimums. Memory: the bytes saved for
backward by one forward (unique storages, via ``saved_tensors_hooks``) in this process, and the
peak resident set size of a separate process running only that model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import batchnorm

sys.path.insert(0, str(Path(__file__).parent))
from bench_cpu import wait_for_quiet  # noqa: E402


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, ours: bool) -> None:
        super().__init__()
        self.ours = ours
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if ours:
            self.bn1 = batchnorm.BatchNorm2d(cout, activation="relu")
            self.bn2 = batchnorm.BatchNorm2d(cout, activation="relu")
        else:
            self.bn1, self.bn2 = nn.BatchNorm2d(cout), nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
        self.down: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            bn = batchnorm.BatchNorm2d(cout) if ours else nn.BatchNorm2d(cout)
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.down(x)
        if self.ours:
            out = self.bn1(self.conv1(x))
            return self.bn2(self.conv2(out), residual=identity)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Net(nn.Module):
    def __init__(self, ours: bool, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        bn = batchnorm.BatchNorm2d(width, activation="relu") if ours else nn.Sequential(
            nn.BatchNorm2d(width), nn.ReLU())
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), bn)
        chans = [width, width, 2 * width, 4 * width]
        self.blocks = nn.Sequential(*[
            Block(chans[i], chans[i + 1], 1 if i == 0 else 2, ours) for i in range(3)
        ])
        self.head = nn.Linear(chans[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def build(ours: bool, channels_last: bool) -> Net:
    torch.manual_seed(0)
    net = Net(ours)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Same parameters in both nets (the module trees differ only in the BN+ReLU nesting)."""
    for p, q in zip(src.parameters(), dst.parameters(), strict=True):
        q.data.copy_(p.data)


def make_step(net: nn.Module, x: torch.Tensor, target: torch.Tensor):
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), target)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def saved_bytes(net: nn.Module, x: torch.Tensor) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x).sum()
    return sum(seen.values())


def peak_rss_child(args: argparse.Namespace, ours: bool) -> float:
    """Peak RSS (MiB) of a fresh process doing a few steps of one model."""
    cmd = [sys.executable, __file__, "--child", "ours" if ours else "torch",
           "--batch", str(args.batch), "--size", str(args.size)]
    if args.channels_last:
        cmd.append("--channels-last")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--no-wait", action="store_true")
    ap.add_argument("--child", choices=["ours", "torch"], default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    x = torch.randn(args.batch, 3, args.size, args.size)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (args.batch,))
    if args.child:
        step = make_step(build(args.child == "ours", args.channels_last), x, target)
        for _ in range(3):
            step()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return
    load, waited = (os.getloadavg()[0], 0.0) if args.no_wait else wait_for_quiet()
    ref_net = build(False, args.channels_last)
    our_net = build(True, args.channels_last)
    copy_weights(ref_net, our_net)
    steps = {"torch": make_step(ref_net, x, target), "ours": make_step(our_net, x, target)}
    losses = {k: [f(), f()] for k, f in steps.items()}  # warm-up (Numba compiles here)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.steps):
        for k, f in steps.items():
            t = time.perf_counter()
            losses[k].append(f())
            times[k].append(time.perf_counter() - t)
    res = {k: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v)}
           for k, v in times.items()}
    saved = {"torch": saved_bytes(ref_net, x), "ours": saved_bytes(our_net, x)}
    rss = {"torch": peak_rss_child(args, False), "ours": peak_rss_child(args, True)}
    speedup = res["torch"]["median_ms"] / res["ours"]["median_ms"]
    print(f"batch {args.batch}x3x{args.size}x{args.size} channels_last={args.channels_last} "
          f"threads={torch.get_num_threads()} load={load:.2f}")
    print(f"{'model':>6} {'median ms':>10} {'min ms':>8} {'saved MiB':>10} {'peak RSS MiB':>12}")
    for k in ("torch", "ours"):
        print(f"{k:>6} {res[k]['median_ms']:10.1f} {res[k]['min_ms']:8.1f} "
              f"{saved[k] / 2**20:10.1f} {rss[k]:12.1f}")
    print(f"speed-up {speedup:.2f}x; first losses torch {losses['torch'][0]:.5f} "
          f"ours {losses['ours'][0]:.5f}")
    out = {
        "command": "python benchmarks/cnn_step.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "loadavg_before": load, "loadavg_after": os.getloadavg()[0], "waited_s": waited,
        "batch": args.batch, "size": args.size, "channels_last": args.channels_last,
        "steps": args.steps, "times": res, "speedup": speedup,
        "saved_for_backward_bytes": saved, "peak_rss_mib": rss,
        "first_loss": {k: v[0] for k, v in losses.items()},
    }
    name = "cpu_cnn_step_cl.json" if args.channels_last else "cpu_cnn_step.json"
    path = Path(args.out) if args.out else Path(__file__).parent / "results" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
