"""The autograd contract of the fused Function (architecture §7), on every fused backend available:

* at most one ``[N, C]`` buffer between forward and backward (measured), saved through
  ``save_for_backward``; no gradient work without grad mode / a student that requires grad;
* a second backward is opt-in (``kdkernels.repeatable_backward``), double backward raises;
* ``inplace=True`` is refused where unsafe and visible to autograd where it is allowed;
* ``loss_weight`` is folded into the launch; a teacher that requires grad gets its gradient.
"""
import gc

import pytest
import torch

import kdkernels as kdk
from parity import DEVICE, FUSED, TOL, make_inputs, presets, reference64

pytestmark = pytest.mark.skipif(not FUSED, reason="no fused backend can run here")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.mark.parametrize("backend", FUSED)
def test_double_backward_raises(backend, gen):
    s, t, y = make_inputs(gen, 3, 10, torch.float64)
    x = s.clone().requires_grad_(True)
    g, = torch.autograd.grad(kdk.dkd_loss(x, t, y, backend=backend), x, create_graph=True)
    penalty = (g * g).sum()
    assert penalty.requires_grad  # a gradient penalty must not silently contribute nothing
    with pytest.raises(RuntimeError, match="not differentiable"):
        penalty.backward()
    # the reference backend is the documented way to get higher derivatives
    xr = s.clone().requires_grad_(True)
    gr, = torch.autograd.grad(kdk.dkd_loss(xr, t, y, backend="reference"), xr, create_graph=True)
    hvp, = torch.autograd.grad((gr * gr).sum(), xr)
    assert torch.isfinite(hvp).all() and hvp.abs().max() > 0


@pytest.mark.parametrize("backend", FUSED)
def test_second_backward_needs_opt_in(backend, gen):
    s, t, y = make_inputs(gen, 3, 10, torch.float32)
    x = s.clone().requires_grad_(True)
    loss = kdk.kd_loss(x, t, 2.0, labels=y, backend=backend)
    g1, = torch.autograd.grad(loss, x, retain_graph=True)
    with pytest.raises(RuntimeError, match="repeatable_backward"):
        torch.autograd.grad(loss, x)
    with kdk.repeatable_backward():
        loss = kdk.kd_loss(x, t, 2.0, labels=y, backend=backend)
    g2, = torch.autograd.grad(loss * 3.0, x, retain_graph=True)
    g3, = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g2, 3.0 * g1, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g3, g1, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", FUSED)
def test_inplace_is_visible_to_autograd(backend, gen):
    """Another op saved the logits; the fused loss overwrites them: backward must raise, not read a
    gradient as logits."""
    s, t, y = make_inputs(gen, 4, 10, torch.float32)
    h = s.clone().requires_grad_(True)
    x = h * 1.0                                  # non-leaf logits
    other = (x * x).sum()                        # saves x
    loss = kdk.kd_loss(x, t, 2.0, labels=y, inplace=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


@pytest.mark.parametrize("backend", FUSED)
def test_inplace_refuses_overlapping_or_shared_student(backend, gen):
    s, t, y = make_inputs(gen, 4, 10, torch.float32)
    row = s[:1].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="overlap"):
        kdk.kd_loss(row.expand(4, 10), t, inplace=True, backend=backend)
    both = torch.stack([s, t]).requires_grad_(True) * 1.0
    with pytest.raises(ValueError, match="share memory with the teacher"):
        kdk.kd_loss(both[0], both[0].detach(), inplace=True, backend=backend)
    # disjoint halves of one buffer are fine (e.g. student and teacher outputs of one batched model)
    loss = kdk.kd_loss(both[0], both[1].detach(), 2.0, inplace=True, backend=backend)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", FUSED)
def test_inplace_refuses_the_contrastive_term(backend, gen):
    s, t, y = make_inputs(gen, 6, 12, torch.float32)
    x = s.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="contrastive"):
        kdk.topkd_loss(x, t, y, k=2, contrastive_weight=0.5, inplace=True, backend=backend)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no_requires_grad"])
def test_no_gradient_work_without_grad(backend, mode, gen):
    s, t, y = make_inputs(gen, 4, 10, torch.float32)
    x = s.clone().requires_grad_(mode != "no_requires_grad")
    before = x.detach().clone()
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, torch.enable_grad)
    with ctx():
        loss = kdk.dkd_loss(x, t, y, inplace=True, backend=backend)
    assert loss.grad_fn is None
    assert torch.equal(x.detach(), before), "inplace=True must not touch the logits when no gradient is wanted"
    want, _ = reference64(s, t, y, presets(10)["dkd"])
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", FUSED)
def test_one_buffer_saved_for_backward(backend, gen):
    """Saved-tensor hooks see exactly one [N, C] tensor: a new gradient buffer, or with inplace=True the
    student's own storage (no new memory)."""
    s, t, y = make_inputs(gen, 4, 10, torch.float32)
    for inplace in (False, True):
        saved = []

        def pack(x):
            saved.append(x)
            return x

        x = s.clone().requires_grad_(True) * 1.0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = kdk.kd_loss(x, t, 2.0, labels=y, inplace=inplace, backend=backend)
        big = [z for z in saved if z.dim() == 2]
        assert len(big) == 1 and big[0].shape == s.shape, [tuple(z.shape) for z in saved]
        assert (big[0].data_ptr() == x.data_ptr()) == inplace
        assert big[0].data_ptr() != t.data_ptr()
        loss.backward()


def _rss() -> int:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif("cpu" not in FUSED or DEVICE.type != "cpu", reason="measured with the CPU allocator")
def test_memory_between_forward_and_backward():
    """At N·C = 32M floats (128 MiB per buffer), forward keeps one buffer alive — not s, t and the grad."""
    N, C, H = 1024, 32768, 16
    buffer = N * C * 4
    h = torch.randn(N, H, requires_grad=True)
    w = torch.randn(H, C)
    ids = torch.randint(0, C, (N,))

    def forward():
        s = h @ w                                    # the matmul saves h and w, not its output
        t = torch.randn(N, C)
        return kdk.kd_loss(s, t, 2.0, labels=ids, backend="cpu")

    base = _rss()
    loss = forward()
    held = _rss() - base
    assert held < 1.5 * buffer, f"{held / buffer:.2f} [N, C] buffers held between forward and backward"
    loss.backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


@pytest.mark.parametrize("backend", FUSED)
def test_loss_weight_is_folded_in(backend, gen):
    s, t, y = make_inputs(gen, 5, 12, torch.float64)
    for name in ("kd", "dkd", "ldrld"):
        spec = presets(12)[name]
        loss_ref, grad_ref = reference64(s, t, y, spec)
        x = s.clone().requires_grad_(True)
        loss = kdk.logit_distill(x, t, y, spec.replace(loss_weight=0.375), backend=backend)
        g, = torch.autograd.grad(loss, x)
        tol = TOL[torch.float64][0]
        torch.testing.assert_close(loss, 0.375 * loss_ref, rtol=tol, atol=0)
        torch.testing.assert_close(g, 0.375 * grad_ref, rtol=tol, atol=tol * grad_ref.abs().max())
    x = s.clone().requires_grad_(True)
    kw = kdk.dkd_loss(x, t, y, loss_weight=0.25, reduction="none", backend=backend)
    torch.testing.assert_close(kw, 0.25 * kdk.dkd_loss(s, t, y, reduction="none", backend="reference"))


@pytest.mark.parametrize("backend", FUSED + ["reference"])
def test_teacher_gradient(backend, gen):
    """A teacher that requires grad (mutual distillation) gets the published kd_loss's gradient."""
    s, t, y = make_inputs(gen, 4, 10, torch.float64, masked=False)
    x, z = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    kdk.kd_loss(x, z, 3.0, backend=backend).backward()
    xr, zr = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    log_q = torch.log_softmax(xr / 3.0, 1)
    ref = torch.nn.functional.kl_div(log_q, torch.log_softmax(zr / 3.0, 1), reduction="none",
                                     log_target=True).sum(1).mean() * 9.0
    ref.backward()
    torch.testing.assert_close(z.grad, zr.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("backend", FUSED)
def test_torch_func_grad(backend, gen):
    s, t, y = make_inputs(gen, 3, 10, torch.float64)
    g_func = torch.func.grad(lambda x: kdk.dkd_loss(x, t, y, backend=backend))(s)
    x = s.clone().requires_grad_(True)
    g, = torch.autograd.grad(kdk.dkd_loss(x, t, y, backend=backend), x)
    torch.testing.assert_close(g_func, g, rtol=1e-12, atol=0)


def test_topkd_contrastive_with_an_explicit_cpp_backend(gen):
    """backend="cpu" runs the whole TopKD loss: the contrastive term, which has no C++ kernel, takes
    auto's pick instead of raising."""
    if "cpu" not in FUSED:
        pytest.skip("the C++ CPU backend is not built")
    s, t, y = make_inputs(gen, 6, 12, torch.float64)
    got = kdk.topkd_loss(s, t, y, k=2, contrastive_weight=0.5, backend="cpu")
    want = kdk.topkd_loss(s, t, y, k=2, contrastive_weight=0.5, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


@pytest.mark.parametrize("backend", FUSED)
def test_backward_allocates_nothing_of_size_n_c(backend, gen):
    """The Function's extra outputs (the gradient buffer, dtemp) are not differentiable: backward must
    not materialise an [N, C] zero gradient for them (an allocation and a memset)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Fills(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "zero" in func.__name__ or "fill" in func.__name__ or "empty" in func.__name__:
                self.ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    s, t, y = make_inputs(gen, 4, 10, torch.float32)
    x = s.clone().requires_grad_(True)
    loss = kdk.kd_loss(x, t, 2.0, labels=y, backend=backend)
    with Fills() as mode:
        loss.backward()
    assert not mode.ops, mode.ops


def _node_name(loss) -> str:
    """The names of the loss's autograd nodes down to the first one with inputs of its own (a reshape of
    the per-row losses sits above the loss node)."""
    names, node = [], loss.grad_fn
    while node is not None:
        names.append(node.name())
        nxt = [f for f, _ in node.next_functions if f is not None]
        node = nxt[0] if len(nxt) == 1 and "View" in node.name() else None
    return " ".join(names)


@pytest.mark.parametrize("backend", [b for b in FUSED if b in ("cpu", "cuda")])
def test_native_autograd_node_of_the_cpp_backends(backend, gen):
    """The C++ backends record their backward in a C++ node (csrc/autograd.cpp, no Python in backward) for
    the common calls; every call that needs more of the contract goes through the Python Function. Both
    give the float64 reference's gradient for any grad_output (rows reshaped, stride 0, per-row)."""
    s, t, y = make_inputs(gen, 6, 12, torch.float64)
    specs = {"kd": kdk.LogitDistill(temperature=2.0), "dkd": kdk.LogitDistill(decoupled=kdk.Decoupled(), ce_weight=0.5),
             "none": kdk.LogitDistill(temperature=3.0, reduction="none", loss_weight=0.5)}
    for name, spec in specs.items():
        x = s.clone().requires_grad_(True)
        loss = kdk.logit_distill(x.view(2, 3, 12), t.view(2, 3, 12), y.view(2, 3), spec, backend=backend)
        assert "LogitDistillLoss" in _node_name(loss), (name, _node_name(loss))
        go = torch.randn(loss.shape, generator=gen, dtype=torch.float64)
        g, = torch.autograd.grad(loss, x, go)
        xr = s.clone().requires_grad_(True)
        ref = kdk.logit_distill(xr.view(2, 3, 12), t.view(2, 3, 12), y.view(2, 3), spec, backend="reference")
        g_ref, = torch.autograd.grad(ref, xr, go)
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-15)
    # a stride-0 grad_output of the per-row losses (loss.sum() backward)
    x = s.clone().requires_grad_(True)
    kdk.logit_distill(x, t, y, specs["none"], backend=backend).sum().backward()
    xr = s.clone().requires_grad_(True)
    kdk.logit_distill(xr, t, y, specs["none"], backend="reference").sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-15)
    # what only the Python Function does: learnable T, inplace, float16, a repeatable backward
    x = s.clone().requires_grad_(True)
    T = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    others = [kdk.kd_loss(x, t, T, backend=backend), kdk.kd_loss(x.detach().clone().requires_grad_(True) * 1.0, t,
                                                                  inplace=True, backend=backend),
              kdk.kd_loss(x.half(), t.half(), backend=backend)]
    with kdk.repeatable_backward():
        others.append(kdk.kd_loss(x, t, backend=backend))
    for loss in others:
        assert "LogitDistillLoss" not in _node_name(loss), _node_name(loss)


@pytest.mark.parametrize("backend", [b for b in FUSED if b in ("cpu", "cuda")])
def test_native_autograd_node_unused_loss(backend, gen):
    """A loss that is computed but not part of what is differentiated costs nothing and breaks nothing."""
    s, t, y = make_inputs(gen, 3, 10, torch.float32)
    x = s.clone().requires_grad_(True)
    loss = kdk.kd_loss(x, t, 2.0, backend=backend)
    other = (x * 2.0).sum()
    g, = torch.autograd.grad(other, x)
    assert torch.equal(g, torch.full_like(x, 2.0)) and loss.requires_grad
