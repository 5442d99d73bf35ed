"""Training-step cost (forward + backward) of the variants against the ways they are usually
written in plain PyTorch, measured in the same process, interleaved, medians.

    python benchmarks/bench_variants.py            # writes benchmarks/results/variants.json
    python benchmarks/bench_variants.py --quick    # smaller shapes, fewer repeats

Subjects (each row: one implementation; the peer is named):

- ghost: ``GhostBatchNorm2d`` (all equal virtual batches in one op call) vs the same module
  forced through one ``batch_norm`` per virtual batch + ``cat`` (``loop-ours``) vs the usual
  PyTorch idiom ``torch.cat([F.batch_norm(c) for c in x.split(v)])`` (peer).
- renorm: ``BatchRenorm2d`` vs ``torch.nn.BatchNorm2d`` (the cost of the correction) vs a plain
  PyTorch Batch Renorm written from the paper (peer).
- masked: ``MaskedBatchNorm1d`` (partials merged with ``stats.merge_many``, static shapes) vs
  gather valid frames → BN → scatter (``gather``, data-dependent shapes) vs ``nn.BatchNorm1d``
  on the padded batch (wrong statistics; the floor).

Effective bandwidth is ``bytes(x) + bytes(y)`` over the forward+backward time (a lower bound on
traffic). Memory is not reported (CPU allocations are not tracked by torch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import batchnorm
from batchnorm.functional import batch_norm_impl


def _step(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        xi = x.detach().requires_grad_()
        fn(xi).sum().backward()

    return run


def _time(cases: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    for run in cases.values():  # warm-up (and first-call costs) outside the timing
        run()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, run in cases.items():  # interleaved
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    return times


def ghost_cases(quick: bool) -> tuple[torch.Tensor, dict[str, Callable[[], None]]]:
    n, c, hw, v = (64, 16, 8, 16) if quick else (256, 64, 16, 32)
    x = torch.randn(n, c, hw, hw)
    ours = batchnorm.GhostBatchNorm2d(c, virtual_batch_size=v)

    def loop_ours(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([batch_norm_impl(p, ours.running_mean, ours.running_var, ours.weight,
                                          ours.bias, True, 0.1, 1e-5) for p in t.split(v)])

    w, b = ours.weight, ours.bias
    rm, rv = torch.zeros(c), torch.ones(c)

    def torch_loop(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.batch_norm(p, rm, rv, w, b, True) for p in t.split(v)])

    return x, {"ghost ours": _step(ours, x), "ghost loop-ours": _step(loop_ours, x),
               "ghost torch loop (peer)": _step(torch_loop, x)}


def renorm_cases(quick: bool) -> tuple[torch.Tensor, dict[str, Callable[[], None]]]:
    n, c, hw = (8, 16, 16) if quick else (32, 64, 32)
    x = torch.randn(n, c, hw, hw)
    ours = batchnorm.BatchRenorm2d(c, warmup_steps=0)
    bn = torch.nn.BatchNorm2d(c)
    w, b = bn.weight, bn.bias
    rm, rv = torch.zeros(c), torch.ones(c)

    def plain(t: torch.Tensor) -> torch.Tensor:
        mean = t.mean((0, 2, 3))
        var = t.var((0, 2, 3), unbiased=False)
        sb = torch.sqrt(var + 1e-5)
        s = torch.sqrt(rv + 1e-5)
        r = (sb / s).clamp(1 / 3, 3).detach()
        d = ((mean - rm) / s).clamp(-5, 5).detach()
        xh = (t - mean.view(1, -1, 1, 1)) / sb.view(1, -1, 1, 1)
        with torch.no_grad():
            rm.mul_(0.9).add_(0.1 * mean)
            rv.mul_(0.9).add_(0.1 * var * t.numel() / c / (t.numel() / c - 1))
        return w.view(1, -1, 1, 1) * (xh * r.view(1, -1, 1, 1) + d.view(1, -1, 1, 1)) \
            + b.view(1, -1, 1, 1)

    return x, {"renorm ours": _step(ours, x), "renorm torch BN (no correction)": _step(bn, x),
               "renorm plain torch (peer)": _step(plain, x)}


def masked_cases(quick: bool) -> tuple[torch.Tensor, dict[str, Callable[[], None]]]:
    n, c, length = (8, 64, 50) if quick else (32, 256, 200)
    x = torch.randn(n, c, length)
    lengths = torch.randint(length // 4, length + 1, (n,))
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    ours = batchnorm.MaskedBatchNorm1d(c)
    bn = torch.nn.BatchNorm1d(c)

    def gather(t: torch.Tensor) -> torch.Tensor:
        frames = t.transpose(1, 2)[mask]
        y = F.batch_norm(frames, bn.running_mean, bn.running_var, bn.weight, bn.bias, True)
        out = t.new_zeros(n, length, c).index_put((mask.nonzero(as_tuple=True)), y)
        return out.transpose(1, 2)

    return x, {"masked ours": _step(lambda t: ours(t, mask), x),
               "masked gather+BN+scatter (peer)": _step(gather, x),
               "masked torch BN on padding (floor)": _step(bn, x)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "variants.json"))
    args = parser.parse_args()
    repeats = args.repeats or (5 if args.quick else 21)
    torch.manual_seed(0)
    rows = []
    print(f"{'case':40s} {'median ms':>10s} {'min ms':>9s} {'GB/s':>7s}  shape")
    for build in (ghost_cases, renorm_cases, masked_cases):
        x, cases = build(args.quick)
        for name, ts in _time(cases, repeats).items():
            med = statistics.median(ts)
            gbs = 2 * x.numel() * x.element_size() / med / 1e9
            rows.append(dict(case=name, median_ms=med * 1e3, min_ms=min(ts) * 1e3,
                             effective_gb_s=gbs, shape=list(x.shape), repeats=repeats))
            print(f"{name:40s} {med * 1e3:10.2f} {min(ts) * 1e3:9.2f} {gbs:7.2f}  "
                  f"{tuple(x.shape)}")
    meta = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                load_average=os.getloadavg(), torch=torch.__version__,
                threads=torch.get_num_threads(), backend=os.environ.get("BATCHNORM_BACKEND"),
                command="python benchmarks/bench_variants.py" + (" --quick" if args.quick else ""))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
