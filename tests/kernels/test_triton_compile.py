"""The Triton backend as ``torch.library.triton_op`` operators (``ops/triton_op.py``).

``batchnorm::triton_forward``/``batchnorm::triton_backward`` must (a) compute exactly what the
Triton backend computes (bitwise: the same kernels on the same plan) and what PyTorch computes
(within rounding), forward and backward, in both canonical layouts and both strategies; (b) run
under ``torch.compile(fullgraph=True)`` and match eager; (c) reach the compiled graph as the
Triton kernels themselves (``triton_kernel_wrapper_functional`` nodes), not as an opaque op.

On a machine without a GPU the kernels run on CPU tensors in Triton's interpreter
(``conftest`` sets ``TRITON_INTERPRET=1``). There Triton has no active driver, so torch cannot
compile a kernel to TTIR to see which arguments it writes and treats every tensor argument as
written (the graph clones them; results are unaffected), and Inductor cannot compile the
graph at all (see ``test_inductor``).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from batchnorm import kernels  # noqa: E402
from batchnorm import stats as S  # noqa: E402
from tests.conftest import device_for  # noqa: E402

if kernels.get_backend("triton") is None:
    pytest.skip("triton backend not usable here (no GPU and no interpreter)",
                allow_module_level=True)

from functorch.compile import make_boxed_func  # noqa: E402
from torch._functorch.aot_autograd import aot_module_simplified  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from batchnorm.kernels.triton import BACKEND as TRITON  # noqa: E402
from batchnorm.kernels.triton import TritonBackend  # noqa: E402
from batchnorm.ops import library  # noqa: E402
from batchnorm.ops import triton_op as TO  # noqa: E402

DEVICE = device_for("triton")
INTERPRETED = DEVICE.type == "cpu"
EPS, SLOPE = 1e-5, 0.2
# Small shapes: "split" cuts every channel into several ragged tiles of 64 elements.
STRATEGIES = {
    "persistent": dict(persistent_max=1 << 20),
    "split": dict(persistent_max=0, tile=64),
}
# Which kernels each path launches (the graph must show exactly these).
FORWARD_KERNELS = {
    ("persistent", True): {"_fwd_persistent_kernel"},
    ("split", True): {"_partials_kernel", "_merge_kernel", "_apply_kernel"},
    ("persistent", False): {"_apply_kernel"},
    ("split", False): {"_apply_kernel"},
}
BACKWARD_KERNELS = {
    "persistent": {"_bwd_persistent_kernel"},
    "split": {"_bwd_reduce_kernel", "_bwd_sum_kernel", "_bwd_apply_kernel"},
}
# (activation, affine, residual)
CASES = {
    "plain": ("none", True, False),
    "relu+residual": ("relu", True, True),
    "leaky+residual-no-affine": ("leaky_relu", False, True),
}


@pytest.fixture(autouse=True)
def _quiet_mutation_analysis():
    """Without a driver, torch logs a warning with a traceback for every kernel whose TTIR it
    cannot build (the fallback is correct, just noisy)."""
    logger = logging.getLogger("torch._higher_order_ops.triton_kernel_wrap")
    level = logger.level
    if INTERPRETED:
        logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@pytest.fixture(params=list(STRATEGIES))
def strategy(request, monkeypatch):
    """The registered Triton backend (what the ops run) set to one strategy; returns its name
    and a separate backend with the same settings, called directly as the expected result."""
    direct = TritonBackend(**STRATEGIES[request.param])
    monkeypatch.setattr(TRITON, "persistent_max", direct.persistent_max)
    monkeypatch.setattr(TRITON, "tile", direct.tile)
    return request.param, direct


def _inputs(layout, case, training, grad=False, n=4, c=3, s=5):
    act, affine, with_res = CASES[case]
    shape = (n, c, s) if layout == "first" else (n * s, c)
    x = torch.randn(shape, device=DEVICE) * 2 + 0.5
    w = torch.rand(c, device=DEVICE) + 0.5 if affine else None
    b = torch.randn(c, device=DEVICE) if affine else None
    r = torch.randn(shape, device=DEVICE) if with_res else None
    rm = None if training else torch.randn(c, device=DEVICE)
    rv = None if training else torch.rand(c, device=DEVICE) + 0.5
    if grad:
        for t in (x, w, b, r):
            if t is not None:
                t.requires_grad_()
    return (x, w, b, r, rm, rv, training, EPS, act, SLOPE)


def _torch_forward(x, w, b, r, rm, rv, training, eps, act, slope):
    y = F.batch_norm(x, rm, rv, w, b, training, 0.0, eps)
    if r is not None:
        y = y + r
    return {"none": y, "relu": F.relu(y), "leaky_relu": F.leaky_relu(y, slope)}[act]


def _grads(y, wrt, dy):
    present = [t for t in wrt if t is not None]
    got = iter(torch.autograd.grad(y, present, dy))
    return [None if t is None else next(got) for t in wrt]


def _equal(a, e):
    assert (a is None) == (e is None)
    if a is not None:
        torch.testing.assert_close(a, e, rtol=0, atol=0)


TOL = dict(rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# (a) eager: the ops against the backend called directly, PyTorch and the generic op


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["first", "last"])
def test_forward_matches_backend_and_torch(strategy, layout, training, case):
    _, direct = strategy
    args = _inputs(layout, case, training)
    x, w, b, r, rm, rv, _, eps, act, slope = args
    y, mean, rstd, var = TO.triton_forward_op(*args)
    if training:
        expected = direct.forward_train(x, w, b, r, eps, act, slope)
    else:
        e_var = rv.clone()
        e_rstd = S.rstd_from_var(e_var, eps)
        expected = (direct.forward_eval(x, w, b, r, rm, e_rstd, act, slope), rm, e_rstd, e_var)
    for got, exp in zip((y, mean, rstd, var), expected, strict=True):
        _equal(got, exp)
    torch.testing.assert_close(y, _torch_forward(*args), **TOL)
    dims = (0, 2) if layout == "first" else (0,)
    if training:
        torch.testing.assert_close(mean, x.mean(dims), **TOL)
        torch.testing.assert_close(var, x.var(dims, unbiased=False), **TOL)
    else:  # the running statistics, copied (not aliased)
        _equal(mean, rm)
        assert mean.data_ptr() != rm.data_ptr() and var.data_ptr() != rv.data_ptr()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["first", "last"])
def test_backward_matches_backend_torch_and_generic_op(strategy, layout, training, case,
                                                       monkeypatch):
    _, direct = strategy
    args = _inputs(layout, case, training, grad=True)
    x, w, b, r, *_ = args
    wrt = (x, w, b, r)
    dy = torch.randn_like(x)
    got = _grads(TO.triton_forward_op(*args)[0], wrt, dy)
    # PyTorch's own batch norm
    for g, e in zip(got, _grads(_torch_forward(*args), wrt, dy), strict=True):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    # the generic custom op on the same backend: the same kernels, bitwise
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    assert kernels.select(x) is TRITON
    for g, e in zip(got, _grads(library.forward_op(*args)[0], wrt, dy), strict=True):
        _equal(g, e)
    # the backward op against the backend's backward
    with torch.no_grad():
        _y, mean, rstd, _var = TO.triton_forward_op(*args)
        bargs = (dy, *(t.detach() if t is not None else None for t in wrt), mean, rstd,
                 training, args[8], SLOPE, True, w is not None, b is not None, r is not None)
        op_out = TO.triton_backward_op(*bargs)
        for o, e in zip(op_out, direct.backward(*bargs), strict=True):
            _equal(o, e if e is not None else x.new_empty((0,)))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_double_backward_matches_generic_op(training, monkeypatch):
    """create_graph=True goes through the same differentiable recomputation as the generic
    op (``library.backward_formula``), so every second derivative is the generic op's."""
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    args = _inputs("first", "relu+residual", training, grad=True)
    x, w, b, r, *_ = args
    dy = torch.randn_like(x)

    def second(op):
        y = op(*args)[0]
        gx, gw = torch.autograd.grad(y, (x, w), dy, create_graph=True)
        return torch.autograd.grad(gx.square().sum() + gw.square().sum(), (x, w, b, r))

    got = second(TO.triton_forward_op)
    for g, e in zip(got, second(library.forward_op), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert got[0].abs().sum() > 0 and got[1].abs().sum() > 0  # (b: 0 through relu's kink)


# The tensor arguments each kernel writes: what torch's TTIR analysis finds on a GPU.
WRITES = {
    "_fwd_persistent_kernel": ("y_ptr", "mean_ptr", "rstd_ptr", "var_ptr"),
    "_partials_kernel": ("n_ptr", "mean_ptr", "m2_ptr"),
    "_merge_kernel": ("out_mean_ptr", "out_delta_ptr", "out_rstd_ptr", "out_var_ptr",
                      "out_scale_ptr"),
    "_apply_kernel": ("y_ptr",),
    "_bwd_persistent_kernel": ("dx_ptr", "dres_ptr", "dw_ptr", "db_ptr"),
    "_bwd_reduce_kernel": ("pg_ptr", "pgx_ptr"),
    "_bwd_sum_kernel": ("sum_g_ptr", "sum_gx_ptr", "scale_ptr", "dw_ptr", "db_ptr"),
    "_bwd_apply_kernel": ("dx_ptr", "dres_ptr"),
}


@pytest.fixture
def gpu_write_analysis(monkeypatch):
    """In the interpreter torch cannot analyse which arguments a kernel writes (no driver to
    build TTIR: "0 active drivers") and assumes every tensor argument is written. With the
    split strategy's chain of kernels, a compiled region that returns the statistics and is
    differentiated then fails in AOTAutograd's partitioner ("Node getitem_40 was invalid, but
    is output", torch/_functorch/partitioners.py:393), with either partitioner. Given the
    answer the analysis gives on a GPU (WRITES), it passes; on a GPU nothing is patched."""
    if INTERPRETED:
        import torch._higher_order_ops.triton_kernel_wrap as tkw

        def written(kernel_idx, _constant_args_idx, kwargs, _tma):
            kernel = kernel_side_table.get_kernel(kernel_idx)
            while not isinstance(kernel, JITFunction):
                kernel = kernel.fn
            return [n for n in WRITES[kernel.fn.__name__]
                    if isinstance(kwargs.get(n), torch.Tensor)]

        monkeypatch.setattr(tkw, "get_mutated_tensors", written)


@pytest.mark.parametrize("layout", ["first", "last"])
def test_opcheck(strategy, layout, gpu_write_analysis):
    """Schema (no aliasing, no undeclared mutation), fake kernels, autograd registration and
    AOT dispatch with dynamic shapes (through Inductor's min-cut partitioner), for both ops."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_dynamic")
    args = _inputs(layout, "relu+residual", True, grad=True)
    result = torch.library.opcheck(TO.triton_forward_op, args, test_utils=utils)
    assert set(result.values()) == {"SUCCESS"}, result
    x, w, b, r, *_ = (t.detach() if isinstance(t, torch.Tensor) else t for t in args)
    _y, mean, rstd, _var = TO.triton_forward_op(x, w, b, r, *args[4:])
    for act in ("none", "relu"):  # act "none": dres is dy itself in the math
        bargs = (torch.randn_like(x), x, w, b, r, mean, rstd, True, act, SLOPE, True, True,
                 True, True)
        result = torch.library.opcheck(TO.triton_backward_op, bargs, test_utils=utils[:1] +
                                       utils[2:])
        assert set(result.values()) == {"SUCCESS"}, result


def test_unsupported_input_is_an_error():
    x = torch.randn(4, 3, 5, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="does not run"):
        TO.triton_forward_op(x, None, None, None, None, None, True, EPS, "none", SLOPE)


# --------------------------------------------------------------------------------------------
# (b) torch.compile and (c) the graph it traces


class _Recorder:
    """A torch.compile backend: AOTAutograd (as ``aot_eager``), recording the forward and
    backward graphs it produces."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        def keep(graph, _inputs):
            self.graphs.append(graph)
            return make_boxed_func(graph.forward)

        return aot_module_simplified(gm, example_inputs, fw_compiler=keep, bw_compiler=keep)


def _kernel_name(node):
    kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
    while not isinstance(kernel, JITFunction):  # an Autotuner carrying launch options
        kernel = kernel.fn
    return kernel.fn.__name__


def _graph_summary(graph):
    """(kernel names launched, batchnorm ops called) in one FX graph."""
    names, custom = [], []
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in (torch.ops.higher_order.triton_kernel_wrapper_functional,
                           torch.ops.higher_order.triton_kernel_wrapper_mutation):
            names.append(_kernel_name(node))
        elif "batchnorm" in str(node.target):
            custom.append(str(node.target))
    return names, custom


def _train_step(op, args, dy):
    y = op(*args)[0]
    return y, _grads(y, args[:4], dy)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["first", "last"])
def test_compile_aot_eager_matches_eager(strategy, layout, training, gpu_write_analysis):
    torch._dynamo.reset()
    args = _inputs(layout, "relu+residual", training, grad=True)
    dy = torch.randn_like(args[0])
    eager = TO.triton_forward_op(*args)
    eager_g = _grads(eager[0], args[:4], dy)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(x, w, b, r, rm, rv):
        return TO.triton_forward_op(x, w, b, r, rm, rv, training, EPS, "relu", SLOPE)

    compiled = f(*args[:6])
    for c, e in zip(compiled, eager, strict=True):  # y and the statistics
        _equal(c, e)
    for g, e in zip(_grads(compiled[0], args[:4], dy), eager_g, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_with_conservative_write_analysis(strategy, training):
    """The interpreter's own (every-argument-written) analysis: a region returning ``y`` only
    compiles, runs and differentiates as in eager."""
    torch._dynamo.reset()
    args = _inputs("first", "relu+residual", training, grad=True)
    dy = torch.randn_like(args[0])

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(x, w, b, r, rm, rv):
        return TO.triton_forward_op(x, w, b, r, rm, rv, training, EPS, "relu", SLOPE)[0] * 1

    y, grads = _train_step(lambda *a: (f(*a[:6]),), args, dy)
    eager_y, eager_g = _train_step(TO.triton_forward_op, args, dy)
    _equal(y, eager_y)
    for g, e in zip(grads, eager_g, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["first", "last"])
def test_compiled_graph_contains_the_kernels(strategy, layout, training,
                                             gpu_write_analysis):
    name, _ = strategy
    torch._dynamo.reset()
    args = _inputs(layout, "relu+residual", training, grad=True)
    dy = torch.randn_like(args[0])
    recorder = _Recorder()

    @torch.compile(backend=recorder, fullgraph=True)
    def f(x, w, b, r, rm, rv):
        return TO.triton_forward_op(x, w, b, r, rm, rv, training, EPS, "relu", SLOPE)

    y, grads = _train_step(lambda *a: f(*a[:6]), args, dy)
    eager_y, eager_g = _train_step(TO.triton_forward_op, args, dy)
    _equal(y, eager_y)
    torch.testing.assert_close(grads[0], eager_g[0], rtol=1e-6, atol=1e-6)
    assert len(recorder.graphs) == 2  # forward, backward
    (fw_kernels, fw_ops), (bw_kernels, bw_ops) = map(_graph_summary, recorder.graphs)
    assert fw_ops == [] and bw_ops == [], (fw_ops, bw_ops)  # no opaque batchnorm op left
    assert set(fw_kernels) == FORWARD_KERNELS[name, training]
    assert len(fw_kernels) == len(FORWARD_KERNELS[name, training])  # one node per launch
    assert set(bw_kernels) == BACKWARD_KERNELS[name]


def test_generic_op_stays_opaque(monkeypatch):
    """The contrast that makes the test above meaningful: ``batchnorm::forward`` on the same
    backend reaches the graph as one custom-op node and no kernel."""
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    torch._dynamo.reset()
    args = _inputs("first", "relu+residual", True, grad=True)
    recorder = _Recorder()

    @torch.compile(backend=recorder, fullgraph=True)
    def f(x, w, b, r):
        return library.forward_op(x, w, b, r, None, None, True, EPS, "relu", SLOPE)

    y, _ = _train_step(lambda *a: f(*a[:4]), args, torch.randn_like(args[0]))
    fw_kernels, fw_ops = _graph_summary(recorder.graphs[0])
    assert fw_kernels == [] and fw_ops == ["batchnorm.forward.default"]


def test_inductor():
    torch._dynamo.reset()
    args = _inputs("first", "relu+residual", True)

    @torch.compile(backend="inductor", fullgraph=True)
    def f(x, w, b, r):
        return TO.triton_forward_op(x, w, b, r, None, None, True, EPS, "relu", SLOPE)[0] * 2

    if INTERPRETED:
        # Inductor lowers each kernel node to a UserDefinedTritonKernel and generates its
        # launcher for the active Triton driver (codegen/wrapper.py,
        # define_user_defined_triton_kernel -> torch/utils/_triton.py triton_backend ->
        # triton.runtime.driver.active): the interpreter has none.
        with pytest.raises(Exception, match="0 active drivers"):
            f(*args[:4])
        return
    torch.testing.assert_close(f(*args[:4]), TO.triton_forward_op(*args)[0] * 2, **TOL)


# --------------------------------------------------------------------------------------------
# The routing of ``ops.forward`` under torch.compile, without its ``x.device.type == "cuda"``
# condition (Inductor cannot compile interpreter kernels, so ops/ routes only CUDA tensors),
# so that the routing itself, with ``library.backends_loaded``, is exercised on CPU tensors.


def _routed_forward(*args):
    x = args[0]
    if torch.compiler.is_compiling():
        if library.backends_loaded(x.device.type) and kernels.select(x).name == "triton":
            from batchnorm.ops.triton_op import triton_forward_op
            return triton_forward_op(*args)
        return library.forward_op(*args)
    raise AssertionError("only called compiled here")


@pytest.mark.parametrize("forced", ["triton", "reference"])
def test_routing_traces_without_graph_break_from_a_cold_cache(forced, monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, forced)
    monkeypatch.setattr(kernels, "_CACHE", {})  # no backend loaded yet: loaders import
    torch._dynamo.reset()
    graphs = []

    def record(gm, _inputs):
        graphs.append(gm)
        return gm

    args = _inputs("first", "plain", True)
    y = torch.compile(lambda *a: _routed_forward(*a)[0], backend=record, fullgraph=True)(*args)
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"
               and "batchnorm" in str(n.target)]
    expected = "triton_forward" if forced == "triton" else "forward"
    assert targets == [f"batchnorm.{expected}.default"]
    torch.testing.assert_close(y, _torch_forward(*args), **TOL)


def test_backends_loaded_carries_torchs_constant_result_mark():
    """ops/library.py marks ``backends_loaded`` by hand (the decorator would import Dynamo at import
    time); the mark must be exactly what ``torch.compiler.assume_constant_result`` sets."""

    def fresh() -> None: ...

    marked = torch.compiler.assume_constant_result(fresh)
    added = {k: v for k, v in vars(marked).items()}
    assert added and all(getattr(library.backends_loaded, k, object()) == v
                         for k, v in added.items())

