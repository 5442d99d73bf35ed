"""What the SyncBatchNorm exchange costs, on Gloo over localhost (2 CPU processes).

    python benchmarks/bench_sync.py            # writes benchmarks/results/sync.json
    python benchmarks/bench_sync.py --quick    # fewer repeats

Per channel count C and per call (median over interleaved repeats, µs, rank 0's clock):
``header`` the 4-int64 all-gather that checks channels/dtype/arguments on every rank,
``gather`` the (2C+1)-value all-gather of the partials, ``reduce`` the 2C-value backward
all-reduce, ``sync`` a whole SyncBatchNorm forward+backward on (8, C, 16, 16) float32 per rank,
and the peer ``local``: batchnorm.BatchNorm2d forward+backward on the same per-rank input.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CHANNELS = (64, 256, 1024)


def _time(fn: Callable[[], object]) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


def _worker(rank: int, world: int, port: int, repeats: int, out: str) -> None:
    import batchnorm
    from batchnorm import distributed as D

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    rows = []
    for c in CHANNELS:
        x = torch.randn(8, c, 16, 16)
        sync = batchnorm.SyncBatchNorm(c)
        local = batchnorm.BatchNorm2d(c)
        header = torch.zeros(4, dtype=torch.int64)
        header_out = torch.empty(4 * world, dtype=torch.int64)
        packed = torch.randn(2 * c + 1)
        packed_out = torch.empty((2 * c + 1) * world)
        sums = torch.randn(2 * c)

        def step(m: torch.nn.Module, x: torch.Tensor = x) -> None:
            xi = x.clone().requires_grad_()
            m(xi).sum().backward()

        cases: dict[str, Callable[[], object]] = {
            "header": lambda ho=header_out, h=header: D._all_gather_single(ho, h, None),
            "gather": lambda po=packed_out, p=packed: D._all_gather_single(po, p, None),
            "reduce": lambda s=sums: dist.all_reduce(s.clone()),
            "sync": lambda m=sync: step(m),
            "local": lambda m=local: step(m),
        }
        for fn in cases.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(repeats):
            for name, fn in cases.items():  # interleaved
                times[name].append(_time(fn))
        rows.append({"C": c, **{k: statistics.median(v) for k, v in times.items()},
                     "forward_bytes_gathered": (2 * c + 1) * world * 4 + 4 * world * 8,
                     "backward_bytes_reduced": 2 * c * 4})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description="SyncBatchNorm exchange cost on Gloo")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    repeats = 20 if args.quick else 200
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = Path("benchmarks/results/.sync_tmp.json")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(args.world, port, repeats, str(tmp)), nprocs=args.world)
    rows = json.loads(tmp.read_text())
    tmp.unlink()
    print(f"Gloo, {args.world} ranks on localhost, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}; medians of {repeats} interleaved repeats, µs per call")
    print(f"{'C':>6} {'header':>8} {'gather':>8} {'reduce':>8} {'sync f+b':>9} "
          f"{'local f+b':>10} {'fwd bytes':>10} {'bwd bytes':>10}")
    for r in rows:
        print(f"{r['C']:>6} {r['header']:>8.0f} {r['gather']:>8.0f} {r['reduce']:>8.0f} "
              f"{r['sync']:>9.0f} {r['local']:>10.0f} {r['forward_bytes_gathered']:>10} "
              f"{r['backward_bytes_reduced']:>10}")
    result = {"machine": platform.platform(), "torch": torch.__version__, "world": args.world,
              "repeats": repeats, "command": "python benchmarks/bench_sync.py", "rows": rows}
    Path("benchmarks/results/sync.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
