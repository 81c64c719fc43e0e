"""The engine under torch.compile(fullgraph=True): ops registered with torch.library, no graph breaks.

On CPU the C++ twin's ops are compiled (Triton's triton_op cannot be compiled through the interpreter,
benchmarks/README.md); on a GPU the Triton engine is. The dynamic-shape tests (issue 16) take ~3 min in all on 2 busy
cores (per-test times in their docstrings); compile time, not the inputs, is the cost."""
import pytest
import torch

import kdkernels as kdk
from kdkernels.dispatch import unavailable_reason


def _check(backend, device, gen):
    s = (torch.randn(8, 100, generator=gen) * 3).to(device).requires_grad_(True)
    t = (torch.randn(8, 100, generator=gen) * 3).to(device)
    y = torch.randint(0, 100, (8,), generator=gen).to(device)

    def f(s, t, y):
        return kdk.dkd_loss(s, t, y, backend=backend) + kdk.kd_loss(s, t, 2.0, labels=y, ce_weight=0.5,
                                                                     backend=backend)
    compiled = torch.compile(f, fullgraph=True)
    loss_c = compiled(s, t, y)
    g_c, = torch.autograd.grad(loss_c, s)
    loss_e = f(s, t, y)
    g_e, = torch.autograd.grad(loss_e, s)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(unavailable_reason("cpu", torch.device("cpu")) is not None,
                    reason="the C++ CPU twin is not built")
def test_compile_fullgraph_cpu_twin(gen):
    _check("cpu", "cpu", gen)


@pytest.mark.skipif(unavailable_reason("triton", torch.device("cpu")) is not None,
                    reason="Triton runs on CPU tensors only under TRITON_INTERPRET=1")
def test_compile_fullgraph_triton_interpreted(gen):
    """The Triton engine's ops (an opaque custom_op under the interpreter, benchmarks/README.md) inside a fullgraph."""
    _check("triton", "cpu", gen)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_compile_fullgraph_gpu(backend, gen):
    if unavailable_reason(backend, torch.device("cuda")) is not None:
        pytest.skip(unavailable_reason(backend, torch.device("cuda")))
    _check(backend, "cuda", gen)


@pytest.mark.skipif(unavailable_reason("triton", torch.device("cpu")) is not None,
                    reason="Triton runs on CPU tensors only under TRITON_INTERPRET=1")
def test_opcheck_triton_engine_ops(gen):
    s = torch.randn(3, 10, generator=gen)
    t = torch.randn(3, 10, generator=gen)
    y = torch.tensor([1, -100, 4])
    from kdkernels._triton.engine import param_tensor
    floats, ints = kdk.LogitDistill(kd_weight=0.0, decoupled=kdk.Decoupled(1.0, 8.0)).pack()
    params = param_tensor(floats, s.device, torch.float32)
    ticket = torch.zeros(1, dtype=torch.int32)
    torch.library.opcheck(torch.ops.kdkernels.triton_logit_distill.default,
                          (s, t, y, None, torch.empty_like(s), None, params, ticket, floats, ints, False))
    torch.library.opcheck(torch.ops.kdkernels.triton_scale_rows_.default,
                          (torch.randn(3, 10, generator=gen), torch.tensor([2.0, 1.0, 0.5])))


# ---------------------------------------------------------------------------------------------
# dynamic shapes and symbolic Python floats (issue 16, item 1)
# ---------------------------------------------------------------------------------------------
#: every logit method, its float arguments taken from the caller (symbolic under dynamic=True)
METHODS = {
    "kd": lambda s, t, y, T, w, b: kdk.kd_loss(s, t, T, labels=y, ce_weight=w, backend=b),
    "dkd": lambda s, t, y, T, w, b: kdk.dkd_loss(s, t, y, w, 8.0, T, backend=b),
    "aekt": lambda s, t, y, T, w, b: kdk.aekt_loss(s, t, y, w, 8.0, T, backend=b),
    "dtkd": lambda s, t, y, T, w, b: kdk.dtkd_loss(s, t, T, 3.0, w, labels=y, backend=b),
    "ldrld": lambda s, t, y, T, w, b: kdk.ldrld_loss(s, t, 3, T, 10.5, w, backend=b),
    "topkd": lambda s, t, y, T, w, b: kdk.topkd_loss(s, t, y, 2, T, scale=w, backend=b),
}
C_DYN = 12


def _all_methods(backend):
    def f(s, t, y, T, w):
        losses = [fn(s, t, y, T, w, backend) for fn in METHODS.values()]
        losses.append(kdk.info_nce(s, t, T / 10))  # the contrastive family (its own auto backend)
        return torch.stack(losses)
    return f


def _batch(gen, N, dtype=torch.float64, device="cpu"):
    s = torch.randn(N, C_DYN, generator=gen, dtype=dtype) * 3
    t = torch.randn(N, C_DYN, generator=gen, dtype=dtype) * 3
    y = torch.randint(0, C_DYN, (N,), generator=gen)
    y[0] = -100  # an ignored row: the batchmean count is a device value
    return s.to(device), t.to(device), y.to(device)


def _compare(compiled, eager, gen, N, T, w, mark=False, methods=len(METHODS) + 1, device="cpu"):
    """Losses of every method and the gradient of a random combination: compiled vs eager (float64)."""
    s, t, y = _batch(gen, N, device=device)
    v = torch.rand(methods, generator=gen, dtype=torch.float64).to(device)
    results = []
    for fn in (compiled, eager):
        x = s.clone().requires_grad_(True)
        if mark:  # the row dimension of every input (a clone does not keep the mark)
            for tensor in (x, t, y):
                torch._dynamo.mark_dynamic(tensor, 0)
        losses = fn(x, t, y, T, w)
        g, = torch.autograd.grad((losses * v).sum(), x)
        results.append((losses.detach(), g))
    (lc, gc), (le, ge) = results
    torch.testing.assert_close(lc, le, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gc, ge, rtol=1e-12, atol=1e-14)


CPP = unavailable_reason("cpu", torch.device("cpu")) is None
needs_cpp = pytest.mark.skipif(not CPP, reason="the C++ CPU twin is not built")


def _counted(fn, backend="aot_eager", **options):
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    return torch.compile(fn, fullgraph=True, backend=counter, **options), counter


@needs_cpp
def test_compile_dynamic_true_every_method_cpp(gen):
    """dynamic=True, the C++ ops: every method (+ info_nce) in one fullgraph, fwd + bwd; the floats arrive
    as SymFloats (validated by torch._check) and N is a symbol: a new N reuses the graph. (~25 s)"""
    eager = _all_methods("cpu")
    compiled, counter = _counted(eager, dynamic=True)
    _compare(compiled, eager, gen, 8, 4.0, 0.5)
    graphs = counter.frame_count
    _compare(compiled, eager, gen, 5, 4.0, 0.5)
    assert counter.frame_count == graphs


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_compile_dynamic_true_every_method_gpu(backend, gen):
    """dynamic=True on the GPU backends (triton_op / the CUDA C++ ops), every method, a new N."""
    if unavailable_reason(backend, torch.device("cuda")) is not None:
        pytest.skip(unavailable_reason(backend, torch.device("cuda")))
    eager = _all_methods(backend)
    compiled, counter = _counted(eager, backend="inductor", dynamic=True)
    _compare(compiled, eager, gen, 8, 4.0, 0.5, device="cuda")
    graphs = counter.frame_count
    _compare(compiled, eager, gen, 5, 4.0, 0.5, device="cuda")
    assert counter.frame_count == graphs


def test_compile_dynamic_true_reference(gen):
    """dynamic=True, the reference backend (plain autograd traced into the graph): LDRLD and TopKD, the
    methods with the most machinery (top-k, rank weights, TSM, TDL); KD in the check test below and DKD
    in the dynamic=None one. Every method costs ~15 s here, so the others run on the C++ ops only. (~45 s)"""
    def eager(s, t, y, T, w):
        return torch.stack([METHODS[name](s, t, y, T, w, "reference") for name in ("ldrld", "topkd")])
    compiled, _ = _counted(eager, dynamic=True)
    _compare(compiled, eager, gen, 7, 3.0, 0.5, methods=2)


@needs_cpp
def test_compile_dynamic_none_new_shape_and_values(gen):
    """dynamic=None (the default): the second call with a new N and new floats recompiles with them
    symbolic (automatic dynamic) — the call that raised in the spec's validation before. (~33 s)"""
    eager = _all_methods("cpu")
    compiled, _ = _counted(eager)
    _compare(compiled, eager, gen, 8, 4.0, 0.5)
    _compare(compiled, eager, gen, 6, 2.0, 0.75)


def test_compile_dynamic_none_new_values_reference(gen):
    """The same with the reference backend, one method (its graph is the slow part). (~16 s)"""
    eager = lambda s, t, y, T, w: METHODS["dkd"](s, t, y, T, w, "reference")[None]  # noqa: E731
    compiled, _ = _counted(eager)
    for N, T, w in ((6, 4.0, 0.5), (5, 2.0, 0.75)):
        _compare(compiled, eager, gen, N, T, w, methods=1)


def test_compile_mark_dynamic_inductor(gen):
    """mark_dynamic on the row dimension with the default inductor backend (the user's path): one graph
    for every N; then new float values (a recompile with them symbolic). One method: every method's
    symbolic N is covered by the dynamic=True tests. (~30 s: two inductor compiles)"""
    backend = "cpu" if CPP else "reference"
    eager = lambda s, t, y, T, w: METHODS["dkd"](s, t, y, T, w, backend)[None]  # noqa: E731
    compiled, counter = _counted(eager, backend="inductor")
    _compare(compiled, eager, gen, 8, 4.0, 0.5, mark=True, methods=1)
    graphs = counter.frame_count
    for N in (6, 5):
        _compare(compiled, eager, gen, N, 4.0, 0.5, mark=True, methods=1)
    assert counter.frame_count == graphs
    _compare(compiled, eager, gen, 7, 2.0, 0.75, mark=True, methods=1)  # new floats: symbolic now


def test_compile_symbolic_argument_is_still_checked(gen):
    """A symbolic temperature is validated inside the compiled graph (torch._check): a negative value
    raises with the spec's message; eager keeps its exact ValueError. (~12 s)"""
    s, t, _ = _batch(gen, 4)
    f, _ = _counted(lambda s, t, T: kdk.kd_loss(s, t, T, backend="reference"), dynamic=True)
    f(s, t, 4.0)
    with pytest.raises(Exception, match="temperature must be a finite positive number"):
        f(s, t, -2.0)
    with pytest.raises(ValueError, match="temperature must be a finite positive number"):
        kdk.kd_loss(s, t, -2.0)


def test_compile_tensor_temperature_changes_without_recompile(gen):
    """The README's advice for a temperature that changes every step: as a tensor it is a graph input,
    so new values reuse the graph (a Python float is a constant of the fused ops: a new value
    recompiles). (~6 s)"""
    backend = "cpu" if CPP else "reference"
    eager = lambda s, t, y, T, w: METHODS["dkd"](s, t, y, T, w, backend)[None]  # noqa: E731
    compiled, counter = _counted(eager)
    _compare(compiled, eager, gen, 6, torch.tensor(4.0, dtype=torch.float64), 0.5, methods=1)
    graphs = counter.frame_count
    for T in (3.0, 2.0):
        _compare(compiled, eager, gen, 6, torch.tensor(T, dtype=torch.float64), 0.5, methods=1)
    assert counter.frame_count == graphs
