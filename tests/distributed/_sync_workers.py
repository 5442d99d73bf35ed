"""What each spawned rank runs, and the launcher that spawns a Gloo group on localhost.

A group is started once per suite (process start-up dominates the cost), runs every case of
the suite in order and saves, per rank, ``{case: [failure messages]}``; the tests in
``test_sync.py`` assert on those records. Every rank builds the same global batch from the same
seed, runs its slice through ``SyncBatchNorm`` and compares with one-process
``batchnorm.BatchNorm*d`` on the whole batch.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
PG_TIMEOUT_S = 20
SHORT_TIMEOUT_S = 3

# --------------------------------------------------------------------------------------------
# Cases

LAYOUTS = {  # name -> (spatial shape, memory format)
    "nc": ((), None),
    "ncl": ((5,), None),
    "nchw": ((3, 4), torch.contiguous_format),
    "nhwc": ((3, 4), torch.channels_last),
    "ndhwc": ((2, 2, 3), torch.channels_last_3d),
}
VARIANTS = {  # name -> (activation, residual, module kwargs)
    "plain": (None, False, {}),
    "silu+res": ("silu", True, {}),
    "noaffine-cumulative": ("leaky_relu", True, {"affine": False, "momentum": None}),
    "untracked": (None, False, {"track_running_stats": False}),
}
SIZES = {2: ([4, 4], [1, 1]), 3: ([5, 0, 3], [0, 2, 1])}
ERROR_CASES = ("channels", "dtype", "local-error", "global-one")


def numeric_cases(world: int) -> list[str]:
    names = []
    for sizes in SIZES[world]:
        for layout in LAYOUTS:
            for dtype in ("float64", "float32"):
                for variant in VARIANTS:
                    names.append(f"{sizes}-{layout}-{dtype}-{variant}")
    # half inputs: float32 statistics, one rounding of the output (tolerance of one half ulp)
    half = {2: ["[4, 4]-nhwc-bfloat16-silu+res", "[1, 1]-nc-float16-plain"],
            3: ["[5, 0, 3]-ncl-float16-silu+res", "[0, 2, 1]-nchw-bfloat16-plain"]}
    return names + half[world]


def _parse(name: str) -> tuple[list[int], str, torch.dtype, str]:
    sizes, layout, dtype, variant = name.split("-", 3)
    return json.loads(sizes), layout, getattr(torch, dtype), variant


# --------------------------------------------------------------------------------------------
# Checks run inside a rank


def _close(failures: list[str], what: str, got: torch.Tensor | None,
           want: torch.Tensor | None, tol: float) -> None:
    if (got is None) != (want is None):
        failures.append(f"{what}: got {got!r}, want {want!r}")
        return
    if got is None or want is None:
        return
    if got.shape != want.shape:
        failures.append(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
        return
    try:
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    except AssertionError as e:
        failures.append(f"{what}: {str(e).splitlines()[0:4]}")


def _bn_class(ndim: int) -> type:
    import batchnorm

    return {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d,
            5: batchnorm.BatchNorm3d}[ndim]


def run_numeric_case(name: str, rank: int, world: int) -> list[str]:
    import batchnorm

    sizes, layout, dtype, variant = _parse(name)
    spatial, fmt = LAYOUTS[layout]
    act, use_residual, kwargs = VARIANTS[variant]
    c, tol, total = 3, TOL[dtype], sum(sizes)
    start = sum(sizes[:rank])
    stop = start + sizes[rank]

    def fmt_(t: torch.Tensor) -> torch.Tensor:  # a fresh leaf in the case's memory format
        return t.detach().clone(memory_format=fmt or torch.contiguous_format)

    gen = torch.Generator().manual_seed(1234)
    ref = _bn_class(2 + len(spatial))(c, activation=act, dtype=dtype, **kwargs)
    mine = batchnorm.SyncBatchNorm(c, activation=act, dtype=dtype, **kwargs)
    if ref.affine:
        with torch.no_grad():
            ref.weight.copy_(torch.rand(c, generator=gen, dtype=dtype) + 0.5)
            ref.bias.copy_(torch.randn(c, generator=gen, dtype=dtype))
        mine.load_state_dict(ref.state_dict())
    failures: list[str] = []
    for step in range(2):
        shape = (total, c, *spatial)
        # channels with a large common offset: the merge must not cancel
        x_full = torch.randn(shape, generator=gen, dtype=dtype) * 2 + 7
        r_full = torch.randn(shape, generator=gen, dtype=dtype)
        w_full = torch.randn(shape, generator=gen, dtype=dtype)

        xr = fmt_(x_full).requires_grad_()
        rr = fmt_(r_full).requires_grad_() if use_residual else None
        y_ref = ref(xr, rr) if rr is not None else ref(xr)
        (y_ref * w_full).sum().backward()

        xm = fmt_(x_full[start:stop]).requires_grad_()
        rm = fmt_(r_full[start:stop]).requires_grad_() if use_residual else None
        y = mine(xm, rm) if rm is not None else mine(xm)
        (y * w_full[start:stop]).sum().backward()

        tag = f"step {step}"
        if fmt is not None and stop > start and y.dim() > 2 and not y.is_contiguous(
                memory_format=fmt):
            failures.append(f"{tag}: output lost the memory format {fmt}")
        _close(failures, f"{tag} y", y.detach(), y_ref.detach()[start:stop], tol)
        assert xr.grad is not None
        _close(failures, f"{tag} dx", xm.grad, xr.grad[start:stop], tol)
        if rr is not None and rm is not None:
            assert rr.grad is not None
            _close(failures, f"{tag} dresidual", rm.grad, rr.grad[start:stop], tol)
        if ref.affine:
            for p_name in ("weight", "bias"):
                local = getattr(mine, p_name).grad.clone()
                dist.all_reduce(local)  # each rank's dγ, dβ is its own loss's; DDP sums them
                _close(failures, f"{tag} d{p_name}", local, getattr(ref, p_name).grad, tol)
                getattr(mine, p_name).grad = None
                getattr(ref, p_name).grad = None
        for b_name in ("running_mean", "running_var", "num_batches_tracked"):
            _close(failures, f"{tag} {b_name}", getattr(mine, b_name), getattr(ref, b_name), tol)
    # eval: the local path with the (global) running statistics
    if ref.track_running_stats:
        mine.eval()
        ref.eval()
        x = fmt_(torch.randn((total, c, *spatial), generator=gen, dtype=dtype))
        with torch.no_grad():
            _close(failures, "eval y", mine(x[start:stop]), ref(x)[start:stop], tol)
    return failures


def _expect_error(fn: Callable[[], Any], kind: type, words: str) -> list[str]:
    try:
        fn()
    except kind as e:
        return [] if words in str(e) else [f"error without {words!r}: {e}"]
    except Exception as e:
        return [f"expected {kind.__name__} with {words!r}, got {type(e).__name__}: {e}"]
    return [f"expected {kind.__name__} with {words!r}, nothing was raised"]


def run_error_case(name: str, rank: int, world: int) -> list[str]:
    import batchnorm

    last = rank == world - 1
    if name == "channels":
        c = 3 if rank == 0 else 4
        m = batchnorm.SyncBatchNorm(c)
        return _expect_error(lambda: m(torch.randn(4, c, 2)), ValueError,
                             "same number of channels on every rank")
    if name == "dtype":
        dtype = torch.float32 if rank == 0 else torch.float64
        m = batchnorm.SyncBatchNorm(3, dtype=dtype)
        return _expect_error(lambda: m(torch.randn(4, 3, 2, dtype=dtype)), ValueError,
                             "same dtype on every rank")
    if name == "local-error":
        m = batchnorm.SyncBatchNorm(3)
        x = torch.randn(4, 3, 2)
        residual = torch.randn(4, 3, 5) if last else torch.randn(4, 3, 2)
        words = "residual" if last else "rejected their arguments"
        return _expect_error(lambda: m(x, residual), ValueError, words)
    if name == "global-one":
        m = batchnorm.SyncBatchNorm(3)
        x = torch.randn(1 if rank == 0 else 0, 3)
        return _expect_error(lambda: m(x), ValueError, "more than 1 value per channel")
    raise AssertionError(name)


# --------------------------------------------------------------------------------------------
# DistributedDataParallel: a small CNN, 3 steps


def _cnn() -> torch.nn.Module:
    import batchnorm

    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        batchnorm.BatchNorm2d(6, activation="relu"),
        nn.Conv2d(6, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).double()


def run_ddp_case(rank: int, world: int, sizes: list[int]) -> list[str]:
    from torch.nn.parallel import DistributedDataParallel

    import batchnorm

    torch.manual_seed(7)
    ref = _cnn()
    model = _cnn()
    model.load_state_dict(ref.state_dict())
    model = batchnorm.convert_sync_batchnorm(model)
    ddp = DistributedDataParallel(model)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    total = sum(sizes)
    start = sum(sizes[:rank])
    stop = start + sizes[rank]
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randn(total, 3, 6, 6, generator=gen, dtype=torch.float64)
        target = torch.randint(0, 4, (total,), generator=gen)
        ce = torch.nn.functional.cross_entropy
        opt_ref.zero_grad()
        ce(ref(x), target).backward()
        opt_ref.step()
        opt.zero_grad()
        # DDP averages gradients over ranks: world·(local sum)/total makes that average the
        # gradient of the mean loss over the global batch, whatever the per-rank sizes.
        local = ce(ddp(x[start:stop]), target[start:stop], reduction="sum")
        (local * world / total).backward()
        opt.step()
    failures: list[str] = []
    got, want = model.state_dict(), ref.state_dict()
    if sorted(got) != sorted(want):
        failures.append(f"state_dict keys differ: {sorted(got)} vs {sorted(want)}")
    for key in want:
        if key in got:
            _close(failures, key, got[key], want[key], TOL[torch.float64])
    kinds = sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})
    if kinds != ["SyncBatchNorm"]:
        failures.append(f"convert_sync_batchnorm left {kinds}")
    return failures


# --------------------------------------------------------------------------------------------
# Suites and the launcher


def suite(rank: int, world: int) -> dict[str, list[str]]:
    """Errors first (the group must stay in step after them), then numbers, then DDP."""
    results: dict[str, list[str]] = {}
    for name in ERROR_CASES:
        results[name] = _guard(lambda n=name: run_error_case(n, rank, world))
    for name in numeric_cases(world):
        results[name] = _guard(lambda n=name: run_numeric_case(n, rank, world))
    if world == 2:
        results["ddp"] = _guard(lambda: run_ddp_case(rank, world, [3, 5]))
    return results


def dead_rank(rank: int, world: int) -> dict[str, list[str]]:
    """The last rank exits; the others' next collective must raise (Gloo sees the closed
    connection), not hang."""
    import batchnorm

    m = batchnorm.SyncBatchNorm(3)
    m(torch.randn(2, 3, 4))  # one healthy step together
    if rank == world - 1:
        return {"dead-rank": []}
    t0 = time.monotonic()
    failures = _expect_error(lambda: m(torch.randn(2, 3, 4)), RuntimeError, "")
    if time.monotonic() - t0 > PG_TIMEOUT_S + 10:
        failures.append(f"took {time.monotonic() - t0:.1f}s, more than the group's timeout")
    return {"dead-rank": failures}


def hung_rank(rank: int, world: int) -> dict[str, list[str]]:
    """The last rank stays alive but never joins; the others fail with the group's timeout."""
    import batchnorm

    m = batchnorm.SyncBatchNorm(3)
    m(torch.randn(2, 3, 4))
    if rank == world - 1:
        time.sleep(SHORT_TIMEOUT_S + 2)  # outlive the others' timeout, then leave
        return {"hung-rank": []}
    t0 = time.monotonic()
    failures = _expect_error(lambda: m(torch.randn(2, 3, 4)), RuntimeError, "imed out")
    waited = time.monotonic() - t0
    if not SHORT_TIMEOUT_S - 0.5 <= waited <= SHORT_TIMEOUT_S + 5:
        failures.append(f"raised after {waited:.1f}s, not after the {SHORT_TIMEOUT_S}s timeout")
    return {"hung-rank": failures}


SUITES = {"suite": suite, "dead_rank": dead_rank, "hung_rank": hung_rank}
TIMEOUTS = {"suite": PG_TIMEOUT_S, "dead_rank": PG_TIMEOUT_S, "hung_rank": SHORT_TIMEOUT_S}


def _guard(fn: Callable[[], list[str]]) -> list[str]:
    try:
        return fn()
    except Exception:  # recorded, and asserted on in the parent
        return [traceback.format_exc()]


def _entry(rank: int, world: int, port: int, suite_name: str, out_dir: str,
           backend: str) -> None:
    os.environ["BATCHNORM_BACKEND"] = backend
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=TIMEOUTS[suite_name]),
    )
    results = SUITES[suite_name](rank, world)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    if suite_name not in ("dead_rank", "hung_rank"):  # theirs is broken, that is the point
        dist.barrier()  # no rank leaves while another still has a collective in flight
    # No orderly shutdown: a rank once aborted in the Gloo group's teardown ("terminate called
    # without an active exception", SIGABRT) after both ranks had saved their results, which
    # failed every test of the suite; the parent needs only the saved files.
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(world: int, suite_name: str, out_dir: Path, timeout_s: float,
           backend: str) -> list[dict[str, list[str]]]:
    """Spawn ``world`` ranks running ``suite_name``; kill them all after ``timeout_s``.

    ``free_port`` closes its socket before rank 0 binds the port, so another process may take
    it in between: a launch whose rendezvous failed on a taken address is retried on a new
    port (twice at most); any other failure is raised at once."""
    for attempt in range(3):
        try:
            return _launch_once(world, suite_name, out_dir, timeout_s, backend)
        except mp.ProcessRaisedException as e:
            text = str(e).lower()
            if attempt == 2 or not ("address already in use" in text or "eaddrinuse" in text):
                raise
    raise AssertionError("unreachable")


def _launch_once(world: int, suite_name: str, out_dir: Path, timeout_s: float,
                 backend: str) -> list[dict[str, list[str]]]:
    ctx = mp.start_processes(
        _entry, args=(world, free_port(), suite_name, str(out_dir), backend), nprocs=world,
        join=False, start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{suite_name} on {world} ranks did not finish in {timeout_s}s")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]
