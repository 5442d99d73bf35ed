"""The Triton backend against the reference backend, PyTorch and float64.

Runs on the GPU when there is one, otherwise on CPU tensors through Triton's interpreter
(``conftest`` sets ``TRITON_INTERPRET=1`` before anything imports Triton). Both strategies are
exercised on small shapes by overriding the size threshold: ``persistent`` (the whole channel
slab in one tile) and ``split`` (tiles of 64 elements, so every channel has several partials,
some of them ragged, merged by ``stats.merge_many``).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

import batchnorm.functional as BF  # noqa: E402
from batchnorm import kernels  # noqa: E402
from batchnorm import stats as S  # noqa: E402
from batchnorm.activations import ACTIVATIONS  # noqa: E402
from tests.conftest import device_for  # noqa: E402

if kernels.get_backend("triton") is None:
    pytest.skip("triton backend not usable here (no GPU and no interpreter)",
                allow_module_level=True)

from batchnorm.kernels.reference import BACKEND as REF  # noqa: E402
from batchnorm.kernels.triton import TritonBackend  # noqa: E402

DEVICE = device_for("triton")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Outputs: both backends compute in float32 from the same input and round once, so they
# differ by float32 reassociation, i.e. at most about one unit of the output dtype.
OUT_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
# Statistics and parameter gradients are float32 for every input dtype.
STAT_TOL = dict(rtol=2e-5, atol=2e-5)
SLOPE = 0.2

STRATEGIES = {
    "persistent": TritonBackend(persistent_max=1 << 20),
    "split": TritonBackend(persistent_max=0, tile=64),
}


def _canonical(layout: str, n: int, c: int, s: int, dtype, scale=2.0, offset=0.5):
    shape = (n, c, s) if layout == "first" else (n * s, c)
    return (torch.randn(shape, device=DEVICE) * scale + offset).to(dtype)


def _params(c, dtype, affine=True):
    pdtype = torch.float32 if dtype != torch.float32 and affine == "fp32" else dtype
    w = (torch.rand(c, device=DEVICE) + 0.5).to(pdtype)
    b = torch.randn(c, device=DEVICE).to(pdtype)
    return w, b


def _close(actual, expected, tol):
    assert (actual is None) == (expected is None)
    if actual is not None:
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, **tol)


def _check_all(be, x, w, b, res, act, out_tol):
    """forward_train, forward_eval and both backwards of ``be`` against the reference."""
    y, mean, rstd, var = be.forward_train(x, w, b, res, 1e-5, act, SLOPE)
    ry, rmean, rrstd, rvar = REF.forward_train(x, w, b, res, 1e-5, act, SLOPE)
    _close(y, ry, out_tol)
    for a, e in ((mean, rmean), (rstd, rrstd), (var, rvar)):
        _close(a, e, STAT_TOL)
    _close(be.forward_eval(x, w, b, res, rmean, rrstd, act, SLOPE),
           REF.forward_eval(x, w, b, res, rmean, rrstd, act, SLOPE), out_tol)
    dy = torch.randn_like(x, dtype=torch.float32).to(x.dtype)
    for training in (True, False):
        args = (dy, x, w, b, res, rmean, rrstd, training, act, SLOPE, True, w is not None,
                b is not None, res is not None)
        got, exp = be.backward(*args), REF.backward(*args)
        _close(got[0], exp[0], out_tol)  # dx
        for g, e in zip(got[1:3], exp[1:3], strict=True):  # dweight, dbias: float32 sums
            _close(g, e, dict(rtol=1e-4, atol=1e-4 * x.shape[0]) if g is not None and
                   g.dtype == torch.float32 else out_tol)
        _close(got[3], exp[3], out_tol)  # dresidual


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layout", ["first", "last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_fused_paths_match_reference(strategy, layout, dtype, act):
    be = STRATEGIES[strategy]
    x = _canonical(layout, 3, 5, 13, dtype)
    w, b = _params(5, dtype, affine="fp32" if act == "silu" else True)
    res = _canonical(layout, 3, 5, 13, dtype)
    _check_all(be, x, w, b, res, act, OUT_TOL[dtype])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layout", ["first", "last"])
@pytest.mark.parametrize("which", ["no-affine", "weight-only", "bias-only", "no-residual"])
def test_optional_arguments(strategy, layout, which):
    be = STRATEGIES[strategy]
    x = _canonical(layout, 4, 3, 6, torch.float32)
    w, b = _params(3, torch.float32)
    res = _canonical(layout, 4, 3, 6, torch.float32)
    if which == "no-affine":
        w = b = None
    elif which == "weight-only":
        b = None
    elif which == "bias-only":
        w = None
    else:
        res = None
    _check_all(be, x, w, b, res, "leaky_relu", OUT_TOL[torch.float32])


AWKWARD = [  # (layout, N, C, S)
    ("first", 2, 1, 1),     # C = 1, N·S = 2
    ("first", 1, 3, 2),     # N = 1, N·S = 2
    ("first", 5, 1, 7),     # one channel, primes
    ("first", 7, 13, 1),    # S = 1 in channels-first form
    ("first", 3, 37, 11),   # C above one channel block, primes
    ("first", 2, 2, 67),    # S above one block of the split tile
    ("last", 2, 1, 1),      # (2, 1)
    ("last", 31, 17, 1),    # primes, C not a power of two
    ("last", 3, 67, 1),     # C above a channel block (32)
]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("layout", "n", "c", "s"), AWKWARD)
def test_awkward_shapes(strategy, layout, n, c, s):
    x = _canonical(layout, n, c, s, torch.float32)
    w, b = _params(c, torch.float32)
    res = _canonical(layout, n, c, s, torch.float32)
    _check_all(STRATEGIES[strategy], x, w, b, res, "relu", OUT_TOL[torch.float32])


@pytest.mark.parametrize("layout", ["first", "last"])
def test_strategies_are_what_they_claim(layout):
    x = _canonical(layout, 3, 5, 13, torch.float32)
    persistent = STRATEGIES["persistent"]._persistent(x)
    assert persistent is not None and persistent.K == 1
    assert STRATEGIES["split"]._persistent(x) is None
    assert STRATEGIES["split"]._split(x).K > 1  # several (some ragged) partials per channel


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layout", ["first", "last"])
def test_primitives_match_reference(strategy, layout):
    """The four primitives (used by the distributed path) on their own."""
    be = STRATEGIES[strategy]
    x = _canonical(layout, 3, 4, 9, torch.float16)
    res = _canonical(layout, 3, 4, 9, torch.float16)
    got, exp = be.stats(x), REF.stats(x)
    torch.testing.assert_close(got.n.expand_as(got.mean), exp.n.expand_as(exp.mean))
    torch.testing.assert_close(got.mean, exp.mean, **STAT_TOL)
    torch.testing.assert_close(got.m2, exp.m2, rtol=1e-5, atol=1e-4)
    mean, _var, rstd = S.finalize(exp, 1e-5)
    scale = S.scale_of(rstd, torch.rand(4, device=DEVICE) + 0.5)
    shift = torch.randn(4, device=DEVICE)
    args = (x, mean, scale, shift, res, "gelu", SLOPE)
    torch.testing.assert_close(be.apply(*args), REF.apply(*args), **OUT_TOL[torch.float16])
    dy = torch.randn_like(x)
    rargs = (dy, x, mean, rstd, scale, shift, res, "gelu", SLOPE)
    for g, e in zip(be.backward_reduce(*rargs), REF.backward_reduce(*rargs), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    a, bb = torch.randn(4, device=DEVICE), torch.randn(4, device=DEVICE)
    for ab in ((a, bb), (None, None)):
        got2 = be.backward_apply(*rargs, *ab, True, True)
        exp2 = REF.backward_apply(*rargs, *ab, True, True)
        for g, e in zip(got2, exp2, strict=True):
            torch.testing.assert_close(g, e, **OUT_TOL[torch.float16])


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("k", [1, 7, 300])
def test_merge_kernel_is_stats_merge_many(k, shifted):
    """The split forward's in-kernel merge + finalize agrees with stats.merge_many/finalize;
    shifted: the partial means are of ``x - K`` and the kernel also writes ``K + δ``."""
    from batchnorm.kernels.triton import _forward as T

    c = 37
    n = torch.randint(1, 50, (k, c), device=DEVICE).float()
    mean = torch.randn(k, c, device=DEVICE) * 3 + (0 if shifted else 100)
    m2 = torch.rand(k, c, device=DEVICE) * n
    w = torch.rand(c, device=DEVICE) + 0.5
    x = torch.randn(2, c, 3, device=DEVICE) * 10 + 1e3  # K = x[0, :, 0]
    out_mean, out_delta, out_rstd, out_var, out_scale = (
        torch.full((c,), float("nan"), device=DEVICE) for _ in range(5))
    be = STRATEGIES["split"]
    grid, blocks, warps = be._reduction(k, c)
    T._merge_kernel[grid](n, mean, m2, w, x if shifted else None, out_mean,
                          out_delta if shifted else None, out_rstd, out_var, out_scale, k, c,
                          x.shape[2], 1e-5, HAS_W=True, SHIFTED=shifted, **blocks, INT64=False,
                          num_warps=warps)
    exp_mean, exp_var, exp_rstd = S.finalize(S.merge_many(S.Partials(n, mean, m2)), 1e-5)
    if shifted:
        torch.testing.assert_close(out_delta, exp_mean, rtol=1e-6, atol=1e-6)
        exp_mean = x[0, :, 0] + out_delta
    torch.testing.assert_close(out_mean, exp_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(out_var, exp_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_rstd, exp_rstd, rtol=1e-5, atol=0)
    torch.testing.assert_close(out_scale, S.scale_of(exp_rstd, w), rtol=1e-5, atol=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layout", ["first", "last"])
def test_large_mean_against_float64(strategy, layout):
    """|mean| ≫ std: the shifted sums keep the variance accurate (raw Σx² would not)."""
    x = _canonical(layout, 8, 3, 32, torch.float32, scale=1.0, offset=1e4)
    _y, mean, _rstd, var = STRATEGIES[strategy].forward_train(x, None, None, None, 1e-5,
                                                              "none", 0.0)
    x64 = x.double()
    dims = (0, 2) if x.dim() == 3 else (0,)
    torch.testing.assert_close(mean.double(), x64.mean(dims), rtol=2.5e-7, atol=0)  # 2 ulp
    torch.testing.assert_close(var.double(), x64.var(dims, unbiased=False), rtol=2e-4, atol=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layout", ["first", "last"])
def test_large_mean_output_against_float64(strategy, layout):
    """|mean|/std = 1e4 in float32: the training forward normalizes (x - K) - δ (K one sample
    of the channel, δ the mean of x - K), as stats.centered_partials does, so y is exact to a
    few roundings; x - round(mean) would carry half an ulp of |mean| (~5e-4 here) as PyTorch
    does. Compared with float64 statistics of the same float32 input; mean stays K + δ."""
    torch.manual_seed(0)
    x = _canonical(layout, 8, 3, 32, torch.float32, scale=1.0, offset=1e4)
    w, b = _params(3, torch.float32)
    y, mean, _rstd, _var = STRATEGIES[strategy].forward_train(x, w, b, None, 1e-5, "none", 0.0)
    x64 = x.double()
    dims = (0, 2) if x.dim() == 3 else (0,)
    view = (1, -1, 1) if x.dim() == 3 else (1, -1)
    m64, v64 = x64.mean(dims), x64.var(dims, unbiased=False)
    y64 = (x64 - m64.view(view)) / torch.sqrt(v64.view(view) + 1e-5) * w.double().view(view) \
        + b.double().view(view)
    err = (y.double() - y64).abs().max().item()
    err_torch = (torch.nn.functional.batch_norm(x, None, None, w, b, True, 0.1, 1e-5).double()
                 - y64).abs().max().item()
    assert err <= 4e-6, err
    assert err <= err_torch, (err, err_torch)
    torch.testing.assert_close(mean.double(), m64, rtol=2.5e-7, atol=0)  # K + δ in float32


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layout", ["first", "last"])
def test_bitwise_deterministic(strategy, layout):
    be = STRATEGIES[strategy]
    x = _canonical(layout, 4, 5, 11, torch.bfloat16)
    res = _canonical(layout, 4, 5, 11, torch.bfloat16)
    w, b = _params(5, torch.bfloat16, affine="fp32")
    dy = torch.randn_like(x)

    def run():
        y, mean, rstd, var = be.forward_train(x, w, b, res, 1e-5, "silu", 0.0)
        grads = be.backward(dy, x, w, b, res, mean, rstd, True, "silu", 0.0, True, True, True,
                            True)
        return (y, mean, rstd, var, *grads)

    for first, second in zip(run(), run(), strict=True):
        assert torch.equal(first, second)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=st.sampled_from(["first", "last"]),
    n=st.integers(1, 6), c=st.integers(1, 9), s=st.integers(1, 40),
    strategy=st.sampled_from(sorted(STRATEGIES)),
    act=st.sampled_from(ACTIVATIONS),
    scale=st.floats(1e-2, 1e2), offset=st.floats(-50, 50),
)
def test_random_shapes(layout, n, c, s, strategy, act, scale, offset):
    if n * s < 2:
        n = 2
    x = _canonical(layout, n, c, s, torch.float32, scale, offset)
    w, b = _params(c, torch.float32)
    res = _canonical(layout, n, c, s, torch.float32)
    y, mean, rstd, var = STRATEGIES[strategy].forward_train(x, w, b, res, 1e-3, act, SLOPE)
    ry, rmean, rrstd, rvar = REF.forward_train(x, w, b, res, 1e-3, act, SLOPE)
    torch.testing.assert_close(mean, rmean, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(var, rvar, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(y, ry, rtol=1e-4, atol=1e-4)


def test_supports_and_selection(monkeypatch):
    be = kernels.get_backend("triton")
    assert be is not None and be.name == "triton"
    x = torch.randn(4, 3, 5, device=DEVICE)
    assert be.supports(x) and be.supports(x.half()) and be.supports(x.bfloat16())
    assert not be.supports(x.double())  # float64 is left to the reference backend
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    assert kernels.select(x).name == "triton"
    assert kernels.select(x.double()).name == "reference"


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_api_against_pytorch(monkeypatch, memory_format, dtype):
    """Through ``batch_norm`` (both canonical layouts reach the kernels) against PyTorch."""
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    x0 = (torch.randn(4, 6, 5, 3, device=DEVICE) * 3 + 1).to(dtype)
    x1 = x0.to(memory_format=memory_format).requires_grad_()
    x2 = x0.float().detach().requires_grad_()
    w = (torch.rand(6, device=DEVICE) + 0.5).requires_grad_()
    b = torch.randn(6, device=DEVICE).requires_grad_()
    w2, b2 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    rm1, rv1 = torch.zeros(6, device=DEVICE), torch.ones(6, device=DEVICE)
    rm2, rv2 = rm1.clone(), rv1.clone()
    y1 = BF.batch_norm(x1, rm1, rv1, w, b, True, 0.1, 1e-5, activation="relu")
    y2 = torch.relu(torch.nn.functional.batch_norm(x2, rm2, rv2, w2, b2, True, 0.1, 1e-5))
    assert y1.dtype == dtype and y1.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(y1.float(), y2, **OUT_TOL[dtype])
    torch.testing.assert_close(rm1, rm2, **STAT_TOL)
    torch.testing.assert_close(rv1, rv2, **STAT_TOL)
    g = torch.randn_like(y2)
    y1.backward(g.to(dtype).to(memory_format=memory_format))
    y2.backward(g.to(dtype).float())
    torch.testing.assert_close(x1.grad.float(), x2.grad, **OUT_TOL[dtype])
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cuda_graph_capture(strategy):
    """No host synchronization: forward and backward capture into a CUDA graph and replay."""
    be = STRATEGIES[strategy]
    x = torch.randn(8, 16, 64, device="cuda")
    w, b = _params(16, torch.float32)
    dy = torch.randn_like(x)

    def step():
        y, mean, rstd, _ = be.forward_train(x, w, b, None, 1e-5, "relu", 0.0)
        return (y, *be.backward(dy, x, w, b, None, mean, rstd, True, "relu", 0.0, True, True,
                                True, False))

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    for got, exp in zip(out, step(), strict=True):
        if exp is not None:
            assert torch.equal(got, exp)


# Compiles every kernel for an sm_90 target with Triton's real code generator and its bundled
# ptxas, in a process without TRITON_INTERPRET: the interpreter accepts code that the compiler
# rejects (non-constexpr globals, dynamic-if scoping), and this catches it without a GPU.
_COMPILE_CHECK = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import batchnorm.kernels.triton._backward as B
import batchnorm.kernels.triton._forward as F

HALF = ("x_ptr", "y_ptr", "res_ptr", "dy_ptr", "dx_ptr", "dres_ptr", "b_ptr")
INTS = ("R", "C", "S", "stride_r", "stride_c", "K")

def check(fn, **consts):
    sig = {}
    for p in fn.params:
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*bf16" if name in HALF else "*fp32"
        else:
            sig[name] = ("i64" if consts.get("INT64") else "i32") if name in INTS else "fp32"
    consts = {"BLOCK_R": 16, "BLOCK_C": 2, "BLOCK_S": 32, "INT64": False, **consts}
    consts = {k: v for k, v in consts.items() if k in sig}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})

flags = dict(HAS_W=True, HAS_B=True, HAS_RES=True)
bwd = dict(NEED_DX=True, NEED_DRES=True, NEED_DW=True, NEED_DB=True)
for act in range(5):
    check(F._fwd_persistent_kernel, ACT=act, **flags)
    check(B._bwd_persistent_kernel, ACT=act, TRAINING=True, **bwd, **flags)
check(F._fwd_persistent_kernel, ACT=1, HAS_W=False, HAS_B=False, HAS_RES=False,
      BLOCK_R=64, BLOCK_C=32, BLOCK_S=1)
for shifted in (True, False):
    check(F._partials_kernel, SHIFTED=shifted, INT64=True)
    check(F._merge_kernel, HAS_W=True, SHIFTED=shifted, BLOCK_K=64, BLOCK_C=32,
          INT64=shifted)
    check(F._apply_kernel, ACT=1, HAS_SCALE=True, SHIFTED=shifted, INT64=shifted, **flags)
for has_w in (True, False):
    check(F._merge_kernel, HAS_W=has_w, SHIFTED=True, BLOCK_K=64, BLOCK_C=32)
    check(B._bwd_sum_kernel, HAS_W=has_w, NEED_SCALE=True, NEED_DW=True, NEED_DB=True,
          BLOCK_K=64, BLOCK_C=32)
for has_scale in (True, False):
    check(F._apply_kernel, ACT=4, HAS_SCALE=has_scale, SHIFTED=False, **flags)
    check(B._bwd_reduce_kernel, ACT=3, HAS_SCALE=has_scale, **flags)
for training in (True, False):
    check(B._bwd_apply_kernel, ACT=2, HAS_B=True, HAS_RES=True, TRAINING=training,
          NEED_X=True, NEED_DX=True, NEED_DRES=True)
    check(B._bwd_persistent_kernel, ACT=0, HAS_W=False, HAS_B=False, HAS_RES=False,
          TRAINING=training, NEED_DX=True, NEED_DRES=False, NEED_DW=False, NEED_DB=False)
check(B._bwd_apply_kernel, ACT=0, HAS_B=False, HAS_RES=False, TRAINING=False, NEED_X=False,
      NEED_DX=False, NEED_DRES=True)
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_a_gpu_target():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-4000:]


def _bench_gpu():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_host_parts(tmp_path):
    """The GPU benchmark's argument parsing, case list, summary, table and JSON (no timing)."""
    bench = _bench_gpu()
    args = bench.parse_args([])
    assert len(bench.cases(args)) == 3 * (2 * 7 + 1)  # dtypes x (NCHW, NHWC per 4-D shape + 2-D)
    assert bench.min_traffic_tensors("bn_add_relu", "fwdbwd") == 7
    with pytest.raises(SystemExit):
        bench.parse_args(["--dtypes", "float64"])
    row = {"shape": [32, 64, 112, 112], "layout": "nchw", "dtype": "float16", "op": "bn",
           "mode": "fwd", "strategy": "triton:split", "bytes": 51_380_224,
           "ours": {"median_ms": 2.0}, "eager": {"median_ms": 3.0},
           "speedup_vs_eager": 1.5, "bw_fraction_of_copy": 0.9}
    other = dict(row, layout="nhwc", ours={"median_ms": 1.0}, bytes=10)
    summary = bench.summarize([row, other], False)
    assert summary["min_bw_fraction_fwd_large"] == 0.9
    assert summary["geomean_time_nhwc_over_nchw"] == pytest.approx(0.5)
    assert "triton:split" in bench.format_row(row, False)
    out = bench.write_json({"summary": summary, "x": float("nan")}, tmp_path / "r.json")
    import json

    assert json.loads(out.read_text())["x"] is None


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("layout", ["first", "last"])
@pytest.mark.parametrize("act", ["leaky_relu", "none"])
def test_forward_train_into_writes_the_input_itself(strategy, layout, act):
    """``inplace=True``'s forward: the output lands in ``x``'s own storage (no copy of a second
    buffer) and equals the reference's ``act((x - mean)·scale + β)``; the statistics are the
    forward's."""
    be = STRATEGIES[strategy]
    x = _canonical(layout, 4, 3, 20, torch.float32)
    w, b = _params(3, torch.float32)
    want_y, want_mean, want_rstd, _ = REF.forward_train(x, w, b, None, 1e-5, act, SLOPE)
    ptr = x.data_ptr()
    mean, rstd, _var = be.forward_train_into(x, w, b, None, 1e-5, act, SLOPE)
    assert x.data_ptr() == ptr
    torch.testing.assert_close(x, want_y, **OUT_TOL[torch.float32])
    torch.testing.assert_close(mean, want_mean, **STAT_TOL)
    torch.testing.assert_close(rstd, want_rstd, **STAT_TOL)
