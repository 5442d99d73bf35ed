"""What a fresh CPU output costs under each allocator setting (the page faults every kernel pays).

    python benchmarks/bench_alloc.py            # writes benchmarks/results/alloc.json

Every training forward allocates its output; so does every eager op. Whether a fresh tensor is
served from memory the process already has, or from new pages that fault on first touch, is
decided by glibc's malloc and PyTorch's huge-page switch, not by the kernels. This script times
``torch.empty(n).fill_(1)`` (fresh) against ``pre.fill_(1)`` (a preallocated tensor) for a
12.8 MB tensor (the (32, 128, 28, 28) benchmark shape) and a 103 MB one ((32, 64, 112, 112)),
each regime in its own subprocess (the settings are read when the process starts), the regimes
alternated over ``--repeats`` passes; medians of 30 interleaved rounds per pass.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

REGIMES = {
    "defaults": {},
    "thp": {"THP_MEM_ALLOC_ENABLE": "1"},
    "malloc": {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296"},
    "thp+malloc": {"THP_MEM_ALLOC_ENABLE": "1", "MALLOC_MMAP_THRESHOLD_": "33554432",
                   "MALLOC_TRIM_THRESHOLD_": "4294967296"},
}
SIZES = {"12.8 MB": 32 * 128 * 28 * 28, "103 MB": 32 * 64 * 112 * 112}

CHILD = """
import json, statistics, sys, time, torch
out = {}
for name, n in json.loads(sys.argv[1]).items():
    pre = torch.empty(n)
    fns = {"fresh": lambda: torch.empty(n).fill_(1.0), "reuse": lambda: pre.fill_(1.0)}
    for f in fns.values():
        for _ in range(3):
            f()
    t = {k: [] for k in fns}
    for _ in range(30):
        for k, f in fns.items():
            s = time.perf_counter(); f(); t[k].append(time.perf_counter() - s)
    out[name] = {k: 1e3 * statistics.median(v) for k, v in t.items()}
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "alloc.json"))
    args = ap.parse_args()
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("MALLOC_", "THP_", "GLIBC_TUNABLES"))}
    runs: dict[str, list[dict]] = {r: [] for r in REGIMES}
    for _ in range(args.repeats):
        for regime, env in REGIMES.items():
            res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(SIZES)],
                                 env={**base, **env}, capture_output=True, text=True, check=True)
            runs[regime].append(json.loads(res.stdout))
    print(f"{'regime':>12} " + " ".join(f"{s + ' fresh/reuse ms':>28}" for s in SIZES))
    summary = {}
    for regime, rs in runs.items():
        cells = []
        summary[regime] = {}
        for size in SIZES:
            fresh = statistics.median(r[size]["fresh"] for r in rs)
            reuse = statistics.median(r[size]["reuse"] for r in rs)
            summary[regime][size] = {"fresh_ms": fresh, "reuse_ms": reuse,
                                     "fresh_over_reuse": fresh / reuse}
            cells.append(f"{fresh:8.2f} / {reuse:6.2f} (x{fresh / reuse:4.1f})")
        print(f"{regime:>12} " + " ".join(f"{c:>28}" for c in cells))
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "command": "python benchmarks/bench_alloc.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "regimes": REGIMES, "sizes_elements": SIZES, "loadavg": os.getloadavg()[0],
        "summary": summary, "runs": runs}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
