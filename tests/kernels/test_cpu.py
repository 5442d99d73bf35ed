"""The Numba ``cpu`` backend against the reference backend and PyTorch, on awkward shapes.

Kernels see canonical tensors: channels-first ``(N, C, S)`` and channels-last ``(M, C)``. Shapes
cover S = 1, C = 1, N·S = 2, primes, a huge C, and a channel long enough to be split into chunks
(the Chan-merge path); both the fused single-channel path and the split path are exercised.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("numba")

from batchnorm import functional as BF  # noqa: E402
from batchnorm import kernels  # noqa: E402
from batchnorm import stats as S  # noqa: E402
from batchnorm.activations import ACTIVATIONS  # noqa: E402

CPU = kernels.get_backend("cpu")
REF = kernels.get_backend("reference")
ACTS = ACTIVATIONS  # every activation of the table
SLOPE = 0.2  # the activation's parameter: leaky slope, elu alpha

# (canonical shape, what it exercises)
SHAPES = [
    ((6, 3, 1), "S=1"),
    ((5, 1, 7), "C=1"),
    ((1, 2, 2), "N*S=2"),
    ((7, 13, 11), "primes"),
    ((2, 3001, 3), "huge C"),
    ((3, 2, 9001), "split channel"),
    ((16, 37, 49), "lane blocks"),
    ((300, 3, 5), "lane flush"),
    ((2, 5), "nc M=2"),
    ((97, 5), "nc primes"),
    ((3, 4099), "nc huge C"),
    ((20011, 3), "nc many rows"),
]
IDS = [name for _, name in SHAPES]
TOL = {torch.float32: {"atol": 2e-5, "rtol": 2e-5}, torch.float64: {"atol": 1e-11, "rtol": 1e-11}}


def _close(a: torch.Tensor | None, b: torch.Tensor | None, dtype: torch.dtype, scale: float = 1.0):
    assert (a is None) == (b is None)
    if a is not None and b is not None:
        tol = TOL[dtype]
        torch.testing.assert_close(a, b, atol=tol["atol"] * scale, rtol=tol["rtol"] * scale)


def _inputs(shape, dtype, residual: bool, affine: bool = True):
    c = shape[1]
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    w = torch.rand(c, dtype=dtype) + 0.5 if affine else None
    b = torch.randn(c, dtype=dtype) if affine else None
    r = torch.randn(shape, dtype=dtype) if residual else None
    return x, w, b, r


def test_backend_is_available_and_registered():
    assert CPU is not None and CPU.name == "cpu"
    assert "cpu" in kernels.available_backends()


@pytest.mark.parametrize("shape", [s for s, _ in SHAPES], ids=IDS)
@pytest.mark.parametrize("act", ACTS)
def test_forward_backward_against_reference(shape, act):
    dtype = torch.float32
    residual = act in ("relu", "gelu", "relu6", "sigmoid", "elu", "gelu_tanh")
    x, w, b, r = _inputs(shape, dtype, residual)
    n = x.numel() // shape[1]
    ours = CPU.forward_train(x, w, b, r, 1e-5, act, SLOPE)
    want = REF.forward_train(x, w, b, r, 1e-5, act, SLOPE)
    for o, e in zip(ours, want, strict=True):
        _close(o, e, dtype, scale=4)
    _y, mean, rstd, _var = want
    dy = torch.randn(shape, dtype=dtype)
    for training in (True, False):
        got = CPU.backward(dy, x, w, b, r, mean, rstd, training, act, SLOPE,
                           True, True, True, residual)
        exp = REF.backward(dy, x, w, b, r, mean, rstd, training, act, SLOPE,
                           True, True, True, residual)
        _close(got[0], exp[0], dtype, scale=20)
        _close(got[3], exp[3], dtype)
        for g, e in zip(got[1:3], exp[1:3], strict=True):  # sums over n elements
            _close(g, e, dtype, scale=20 * max(1.0, n ** 0.5))


@pytest.mark.parametrize("shape", [(8, 64, 601), (3, 2, 50021), (40009, 7), (1100, 600),
                                   (3000, 2, 7), (2999, 2, 7)],
                         ids=["fused", "split", "nc blocks", "nc wide blocks", "split samples",
                              "split runs"])
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_threaded_paths_against_reference(shape, act):
    """Tensors above SERIAL_ELEMENTS run on every thread (the shapes above run on one)."""
    from batchnorm.kernels.cpu import SERIAL_ELEMENTS

    dtype = torch.float32
    assert math.prod(shape) >= SERIAL_ELEMENTS
    x, w, b, r = _inputs(shape, dtype, residual=True)
    n = x.numel() // shape[1]
    ours = CPU.forward_train(x, w, b, r, 1e-5, act, SLOPE)
    want = REF.forward_train(x, w, b, r, 1e-5, act, SLOPE)
    for o, e in zip(ours, want, strict=True):
        _close(o, e, dtype, scale=4)
    dy = torch.randn(shape, dtype=dtype)
    got = CPU.backward(dy, x, w, b, r, want[1], want[2], True, act, SLOPE, True, True, True, True)
    exp = REF.backward(dy, x, w, b, r, want[1], want[2], True, act, SLOPE, True, True, True, True)
    _close(got[0], exp[0], dtype, scale=20)
    _close(got[3], exp[3], dtype)
    for g, e in zip(got[1:3], exp[1:3], strict=True):
        _close(g, e, dtype, scale=20 * max(1.0, n ** 0.5))


@pytest.mark.parametrize("shape", [(7, 13, 11), (3, 2, 9001), (97, 5), (20011, 3)],
                         ids=["fused", "split", "nc", "nc blocks"])
def test_float64_matches_reference_tightly(shape):
    dtype = torch.float64
    x, w, b, r = _inputs(shape, dtype, residual=True)
    ours = CPU.forward_train(x, w, b, r, 1e-5, "silu", SLOPE)
    want = REF.forward_train(x, w, b, r, 1e-5, "silu", SLOPE)
    for o, e in zip(ours, want, strict=True):
        _close(o, e, dtype, scale=100)
    dy = torch.randn(shape, dtype=dtype)
    got = CPU.backward(dy, x, w, b, r, want[1], want[2], True, "silu", SLOPE, True, True, True,
                       True)
    exp = REF.backward(dy, x, w, b, r, want[1], want[2], True, "silu", SLOPE, True, True, True,
                       True)
    for g, e in zip(got, exp, strict=True):
        _close(g, e, dtype, scale=1000)


@pytest.mark.parametrize("shape", [(7, 13, 11), (3, 2, 9001), (97, 5), (20011, 3)],
                         ids=["fused", "split", "nc", "nc blocks"])
def test_primitives_against_reference(shape):
    """The four primitives (the distributed path) agree with the reference's."""
    dtype = torch.float32
    x, w, b, r = _inputs(shape, dtype, residual=True)
    p, q = CPU.stats(x), REF.stats(x)
    assert torch.equal(p.n.expand_as(q.mean), q.n.expand_as(q.mean))
    _close(p.mean, q.mean, dtype, scale=4)
    torch.testing.assert_close(p.m2, q.m2, rtol=1e-5, atol=1e-4)
    mean, var, rstd = S.finalize(q, 1e-5)
    scale, shift = S.scale_of(rstd, w), b
    _close(CPU.apply(x, mean, scale, shift, r, "leaky_relu", SLOPE),
           REF.apply(x, mean, scale, shift, r, "leaky_relu", SLOPE), dtype)
    dy = torch.randn(shape, dtype=dtype)
    sg, sgx = CPU.backward_reduce(dy, x, mean, rstd, scale, shift, r, "gelu", SLOPE)
    eg, egx = REF.backward_reduce(dy, x, mean, rstd, scale, shift, r, "gelu", SLOPE)
    _close(sg, eg, dtype, scale=100)
    _close(sgx, egx, dtype, scale=100)
    n = x.numel() // shape[1]
    a, bb = eg / n, egx / n
    for aa, bv in ((a, bb), (None, None)):
        got = CPU.backward_apply(dy, x, mean, rstd, scale, shift, r, "gelu", SLOPE, aa, bv,
                                 True, True)
        exp = REF.backward_apply(dy, x, mean, rstd, scale, shift, r, "gelu", SLOPE, aa, bv,
                                 True, True)
        for g, e in zip(got, exp, strict=True):
            _close(g, e, dtype, scale=10)


@pytest.mark.parametrize("shape", [(3, 2, 9001), (20011, 3)], ids=["split", "nc blocks"])
def test_in_kernel_merge_agrees_with_stats_merge_many(shape):
    """The fused forward merges chunk partials in the kernel; ``stats()`` uses merge_many."""
    x = torch.randn(shape, dtype=torch.float64) * 3 + 100
    _, mean, rstd, var = CPU.forward_train(x, None, None, None, 1e-5, "none", 0.0)
    m, v, r = S.finalize(CPU.stats(x), 1e-5)
    torch.testing.assert_close(mean, m, rtol=1e-14, atol=0)
    torch.testing.assert_close(var, v, rtol=1e-12, atol=0)
    torch.testing.assert_close(rstd, r, rtol=1e-12, atol=0)


def test_need_flags_and_no_affine():
    x, _, _, _ = _inputs((4, 6, 33), torch.float32, residual=False, affine=False)
    y, mean, rstd, var = CPU.forward_train(x, None, None, None, 1e-3, "relu", 0.0)
    _close(y, REF.forward_train(x, None, None, None, 1e-3, "relu", 0.0)[0], torch.float32)
    dy = torch.randn_like(x)
    dx, dw, db, dr = CPU.backward(dy, x, None, None, None, mean, rstd, True, "relu", 0.0,
                                  True, False, False, False)
    assert dw is None and db is None and dr is None
    _close(dx, REF.backward(dy, x, None, None, None, mean, rstd, True, "relu", 0.0,
                            True, False, False, False)[0], torch.float32, scale=10)
    dx, dw, db, dr = CPU.backward(dy, x, None, None, None, mean, rstd, False, "none", 0.0,
                                  False, False, False, True)
    assert dx is None and torch.equal(dr, dy)


@pytest.mark.parametrize("need", [(True, False), (False, True), (True, True)],
                         ids=["dx", "dres", "dx+dres"])
@pytest.mark.parametrize("act", ["none", "relu", "silu"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", [(3, 5), (301, 37), (5001, 17), (20000, 16), (40001, 8)],
                         ids=["tiny", "odd", "threads", "super-rows", "odd super-rows"])
def test_channels_last_backward_flags(shape, residual, act, need):
    """Every (dx, dres) combination through the channels-last backward, whose none/relu paths
    take two rows at a time (odd row counts end in the general one-row loop), and narrow
    tensors whose rows are taken several at a time (``super_rows``)."""
    x, w, b, r = _inputs(shape, torch.float32, residual)
    _y, mean, rstd, _var = REF.forward_train(x, w, b, r, 1e-5, act, SLOPE)
    dy = torch.randn(shape)
    n = shape[0]
    for training in (True, False):
        got = CPU.backward(dy, x, w, b, r, mean, rstd, training, act, SLOPE, need[0], True, True,
                           need[1])
        exp = REF.backward(dy, x, w, b, r, mean, rstd, training, act, SLOPE, need[0], True, True,
                           need[1])
        assert (got[0] is None) != need[0] and (got[3] is None) != need[1]
        _close(got[0], exp[0], torch.float32, scale=20)
        _close(got[3], exp[3], torch.float32)
        for g, e in zip(got[1:3], exp[1:3], strict=True):
            _close(g, e, torch.float32, scale=20 * max(1.0, n ** 0.5))


@pytest.mark.parametrize("shape", [(16, 5, 4001), (8, 64, 49), (32, 64, 49), (5003, 64),
                                   (20000, 16)],
                         ids=["split", "fused", "lanes", "nc", "super-rows"])
def test_deterministic_bitwise(shape):
    x, w, b, r = _inputs(shape, torch.float32, residual=True)
    dy = torch.randn(shape)
    runs = []
    for _ in range(2):
        y, mean, rstd, var = CPU.forward_train(x, w, b, r, 1e-5, "relu", 0.0)
        grads = CPU.backward(dy, x, w, b, r, mean, rstd, True, "relu", 0.0, True, True, True,
                             True)
        runs.append((y, mean, rstd, var, *grads))
    for a, b2 in zip(*runs, strict=True):
        assert torch.equal(a, b2)


@pytest.mark.parametrize("need", [(True, False), (False, True), (True, True)],
                         ids=["dx", "dres", "dx+dres"])
@pytest.mark.parametrize("act", ["none", "relu"])
@pytest.mark.parametrize("residual", [False, True])
def test_lane_blocks_flags_and_thread_independence(residual, act, need, monkeypatch):
    """Short channels-first samples (S ≤ 64, N ≥ 16) run in lane blocks whose width depends on
    the thread count; every result must still be the same bits on one thread and on two, and
    every (dx, dres) combination must agree with the reference."""
    from batchnorm.kernels.cpu import _lanes as K

    shape = (24, 45, 9)
    assert shape[2] <= K._LANE_MAX_S and shape[0] >= K._LANE_MIN_N
    x, w, b, r = _inputs(shape, torch.float32, residual)
    dy = torch.randn(shape)
    results = []
    for threads in (1, 2):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        fwd = CPU.forward_train(x, w, b, r, 1e-5, act, SLOPE)
        results.append((fwd, [CPU.backward(dy, x, w, b, r, fwd[1], fwd[2], training, act, SLOPE,
                                           need[0], True, True, need[1])
                              for training in (True, False)]))
    (f1, b1), (f2, b2) = results
    assert all(torch.equal(u, v) for u, v in zip(f1, f2, strict=True))
    for g1, g2 in zip(b1, b2, strict=True):
        assert all((u is None and v is None) or torch.equal(u, v)
                   for u, v in zip(g1, g2, strict=True))
    want = REF.forward_train(x, w, b, r, 1e-5, act, SLOPE)
    for o, e in zip(f1, want, strict=True):
        _close(o, e, torch.float32, scale=4)
    for training, got in zip((True, False), b1, strict=True):
        exp = REF.backward(dy, x, w, b, r, f1[1], f1[2], training, act, SLOPE, need[0], True,
                           True, need[1])
        assert (got[0] is None) != need[0] and (got[3] is None) != need[1]
        _close(got[0], exp[0], torch.float32, scale=20)
        _close(got[3], exp[3], torch.float32)
        for g, e in zip(got[1:3], exp[1:3], strict=True):
            _close(g, e, torch.float32, scale=20 * shape[0])


def test_thread_count_follows_torch():
    import numba

    from batchnorm.kernels.cpu import SERIAL_ELEMENTS

    before = torch.get_num_threads()
    x = torch.randn(4, 3, SERIAL_ELEMENTS // 12 + 1)  # large enough to run threaded
    try:
        torch.set_num_threads(1)
        y1 = CPU.forward_train(x, None, None, None, 1e-5, "none", 0.0)[0]
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    y2 = CPU.forward_train(x, None, None, None, 1e-5, "none", 0.0)[0]
    assert numba.get_num_threads() == min(before, numba.config.NUMBA_NUM_THREADS)
    torch.testing.assert_close(y1, y2)
    CPU.forward_train(x[:, :, :10].contiguous(), None, None, None, 1e-5, "none", 0.0)
    assert numba.get_num_threads() == 1  # small tensors run on one thread


def test_channels_last_serial_threshold():
    """Channels-last calls (two parallel regions) stay on one thread up to a larger size than
    channels-first ones; both sides of the threshold agree with the reference."""
    import numba

    from batchnorm.kernels.cpu import SERIAL_ELEMENTS, SERIAL_ELEMENTS_LAST

    assert SERIAL_ELEMENTS_LAST > SERIAL_ELEMENTS
    c = 64
    threaded = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    for m, want in ((SERIAL_ELEMENTS_LAST // c - 1, 1), (SERIAL_ELEMENTS_LAST // c, threaded)):
        x = torch.randn(m, c)
        ours = CPU.forward_train(x, None, None, None, 1e-5, "relu", 0.0)
        assert numba.get_num_threads() == want
        exp = REF.forward_train(x, None, None, None, 1e-5, "relu", 0.0)
        for o, e in zip(ours, exp, strict=True):
            _close(o, e, torch.float32, scale=4)
    # channels-first of the same size runs threaded
    CPU.forward_train(torch.randn(4, c, SERIAL_ELEMENTS_LAST // (4 * c) - 1), None, None, None,
                      1e-5, "none", 0.0)
    assert numba.get_num_threads() == threaded


def test_large_mean_accuracy_no_worse_than_pytorch():
    """|mean|/std = 1e4 in float32: output error vs a float64 oracle within PyTorch's own."""
    g = torch.Generator().manual_seed(1)
    x = (1e4 + torch.randn(16, 4, 3000, generator=g)).float()
    want = REF.forward_train(x.double(), None, None, None, 1e-5, "none", 0.0)
    for layout in ("first", "last"):
        xin = x if layout == "first" else x.transpose(1, 2).reshape(-1, 4).contiguous()
        w64 = want[0] if layout == "first" else want[0].transpose(1, 2).reshape(-1, 4)
        ours = CPU.forward_train(xin, None, None, None, 1e-5, "none", 0.0)
        torch_y = F.batch_norm(x, None, None, training=True, eps=1e-5)
        torch_y = torch_y if layout == "first" else torch_y.transpose(1, 2).reshape(-1, 4)
        err_ours = (ours[0].double() - w64).abs().max().item()
        err_torch = (torch_y.double() - w64).abs().max().item()
        assert err_ours <= max(err_torch, 1e-3), (layout, err_ours, err_torch)
        torch.testing.assert_close(ours[1].double(), want[1], rtol=1e-7, atol=0)
        torch.testing.assert_close(ours[3].double(), want[3], rtol=2e-3, atol=0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_functional_against_pytorch(layout, act, monkeypatch):
    """Through the public functional (canonicalization included) against PyTorch itself."""
    monkeypatch.setenv(kernels.ENV_VAR, "cpu")
    base = torch.randn(6, 5, 9, 14, dtype=torch.float64)
    if layout == "channels_last":
        x = base.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = base[:, :, :, ::2]  # non-contiguous, neither layout
    else:
        x = base
    x = x.clone().requires_grad_(True) if layout != "strided" else x.detach().requires_grad_()
    r = torch.randn(x.shape, dtype=torch.float64, requires_grad=True)
    w = torch.rand(5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    assert kernels.select(torch.randn(2, 5, 3, dtype=torch.float64)).name == "cpu"
    y = BF.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, activation=act, residual=r)
    fn = F.relu if act == "relu" else F.silu
    e = fn(F.batch_norm(x, rm2, rv2, w, b, True, 0.1, 1e-5) + r)
    torch.testing.assert_close(y, e)
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)
    dy = torch.randn_like(e)
    got = torch.autograd.grad(y, (x, w, b, r), dy)
    exp = torch.autograd.grad(e, (x, w, b, r), dy)
    for g, ee in zip(got, exp, strict=True):
        torch.testing.assert_close(g, ee)


def test_half_types_go_to_reference_and_are_correct(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "cpu")
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(4, 3, 17).to(dtype)
        assert not CPU.supports(x)
        assert kernels.select(x).name == "reference"
        y = BF.batch_norm(x, None, None, training=True, activation="relu")
        e = F.relu(F.batch_norm(x.float(), None, None, training=True)).to(dtype)
        torch.testing.assert_close(y, e)


def test_importing_batchnorm_does_not_import_numba():
    code = "import sys, batchnorm; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("shape, g", [((20000, 16), 4), ((20001, 16), 1), ((40001, 8), 13),
                                      ((40000, 24), 1), ((4000, 64), 1), ((8000, 16), 1)])
def test_super_rows_choice_and_agreement(shape, g, monkeypatch):
    """Narrow channels-last tensors run their backward ``g`` rows at a time; the result agrees
    with the row-at-a-time kernels to the rounding of a different summation order."""
    from batchnorm.kernels import cpu as cpu_module
    from batchnorm.kernels.cpu import _host as cpu_host

    assert cpu_module.super_rows(*shape) == g
    x, w, b, r = _inputs(shape, torch.float64, residual=True)
    _y, mean, rstd, _var = REF.forward_train(x, w, b, r, 1e-5, "relu", 0.0)
    dy = torch.randn(shape, dtype=torch.float64)
    args = (dy, x, w, b, r, mean, rstd, True, "relu", 0.0, True, True, True, True)
    grouped = CPU.backward(*args)
    monkeypatch.setattr(cpu_host, "super_rows", lambda m, c: 1)
    plain = CPU.backward(*args)
    for a, e in zip(grouped, plain, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(70001, 3), (9001, 64), (4099, 96), (4099, 97), (301, 40)],
                         ids=["C=3", "C=64", "C=96", "C=97 long runs", "one short block"])
def test_channels_last_partials_in_runs_against_float64(shape, dtype, monkeypatch):
    """Channels-last block partials in short runs of rows (narrow tensors) and in runs of
    ``_FLUSH_ROWS`` (the wider ones, and every width with short runs turned off) agree with a
    float64 oracle and with each other, with |mean|/std = 1e3 and a first row (the shift) far
    out in the tail; one short block is a single run."""
    from batchnorm.kernels.cpu import _host
    from batchnorm.kernels.cpu._jit import _FLUSH_ROWS

    c = shape[1]
    short = _host.sub_rows(c, dtype.itemsize)
    assert (short < _FLUSH_ROWS) == (c <= _host._SUB_MAX_C and c * dtype.itemsize > 64)
    assert short % 4 == 0 and 4 <= short <= _FLUSH_ROWS
    g = torch.Generator().manual_seed(c)
    x = (1e3 + torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    x[0] += 40.0  # the shift K (first row) 40 std from the mean
    x64 = x.double()
    mean64, var64 = x64.mean(0), x64.var(0, unbiased=False)

    def run() -> tuple[torch.Tensor, ...]:
        _, mean, _, var = CPU.forward_train(x, None, None, None, 1e-5, "none", 0.0)
        mu, v, _ = S.finalize(CPU.stats(x), 1e-5)
        return mean, var, mu, v

    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    runs = run()
    monkeypatch.setattr(_host, "_SUB_MAX_C", 0)
    _host.sub_rows.cache_clear()
    try:
        long_runs = run()
    finally:
        monkeypatch.undo()
        _host.sub_rows.cache_clear()
    for got in (runs, long_runs):
        mean, var, mu, v = got
        torch.testing.assert_close(mean.double(), mean64, rtol=rtol, atol=0)
        torch.testing.assert_close(mu.double(), mean64, rtol=rtol, atol=0)
        torch.testing.assert_close(var.double(), var64, rtol=50 * rtol, atol=0)
        torch.testing.assert_close(v.double(), var64, rtol=50 * rtol, atol=0)
    for a, b in zip(runs, long_runs, strict=True):
        torch.testing.assert_close(a, b, rtol=50 * rtol, atol=0)
    if c > _host._SUB_MAX_C:  # the same path both times
        assert all(torch.equal(a, b) for a, b in zip(runs, long_runs, strict=True))


def test_channels_last_runs_propagate_nan():
    """A NaN in one run of one channel reaches that channel's mean and variance only."""
    x = torch.randn(5003, 8)
    x[4001, 5] = float("nan")
    _, mean, _, var = CPU.forward_train(x, None, None, None, 1e-5, "none", 0.0)
    assert torch.isnan(mean[5]) and torch.isnan(var[5])
    keep = [i for i in range(8) if i != 5]
    assert torch.isfinite(mean[keep]).all() and torch.isfinite(var[keep]).all()
