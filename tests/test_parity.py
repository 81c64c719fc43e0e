"""The parity matrix: every fused backend available here × preset × dtype × shape × option, loss and
gradient against the float64 reference (tests/parity.py holds the presets, inputs and tolerances)."""
import pytest
import torch

import kdkernels as kdk
from parity import DEVICE, FUSED, assert_close, make_inputs, presets, reference64, run

pytestmark = pytest.mark.skipif(not FUSED, reason=f"no fused backend can run on {DEVICE} here")

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DT_ID = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def _matrix():
    for C in (3, 10, 100):  # tiny, masked class + ignored row, not a power of two
        for name in presets(C):
            for dtype in DTYPES:
                yield pytest.param(C, name, dtype, id=f"C{C}-{name}-{DT_ID[dtype]}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("C,name,dtype", list(_matrix()))
def test_matrix(backend, C, name, dtype, gen):
    s, t, y = make_inputs(gen, 4, C, dtype)
    spec = presets(C)[name]
    assert_close(run(s, t, y, spec, backend), reference64(s, t, y, spec), dtype, f"{backend} {name}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", list(presets(1000)))
def test_multi_block(backend, name, gen):
    """C = 1000 streamed in 4 blocks of 256 (Triton); the C++ backends take their own tiling."""
    s, t, y = make_inputs(gen, 2, 1000, torch.float32, ignore=False)
    spec = presets(1000)[name]
    assert_close(run(s, t, y, spec, backend, block_c=256), reference64(s, t, y, spec), torch.float32, name)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", list(presets(2)))
def test_two_classes(backend, name, gen):
    s, t, y = make_inputs(gen, 3, 2, torch.float32)
    spec = presets(2)[name]
    assert_close(run(s, t, y, spec, backend), reference64(s, t, y, spec), torch.float32, name)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", list(presets(10)))
def test_single_row(backend, name, gen):
    s, t, y = make_inputs(gen, 1, 10, torch.float32)
    spec = presets(10)[name]
    assert_close(run(s, t, y, spec, backend), reference64(s, t, y, spec), torch.float32, name)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_all_ignored_batch(backend, reduction, gen):
    s, t, _ = make_inputs(gen, 3, 10, torch.float32)
    y = torch.full((3,), -100, device=DEVICE)
    for name, spec in presets(10).items():
        loss, grad = run(s, t, y, spec.replace(reduction=reduction), backend)
        assert torch.equal(loss, torch.zeros_like(loss)), name
        assert torch.equal(grad, torch.zeros_like(grad)), name


@pytest.mark.parametrize("backend", FUSED)
def test_bad_label_row_is_nan_and_isolated(backend, gen):
    s, t, y = make_inputs(gen, 4, 10, torch.float32)
    y[2] = 10  # outside [0, C), not ignore_index
    for name, spec in presets(10).items():
        spec = spec.replace(reduction="none")
        loss, grad = run(s, t, y, spec, backend)
        loss_ref, grad_ref = reference64(s, t, y, spec)
        assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all(), name
        keep = torch.tensor([0, 1, 3], device=DEVICE)
        assert_close((loss[keep], grad[keep]), (loss_ref[keep], grad_ref[keep]), torch.float32, name)


@pytest.mark.parametrize("backend", FUSED)
def test_per_row_temperature(backend, gen):
    s, t, y = make_inputs(gen, 4, 10, torch.float32)
    T = (torch.rand(4, generator=gen, dtype=torch.float64) * 3 + 1).float().to(DEVICE)
    for name, spec in presets(10).items():
        spec = spec.replace(temperature=T)
        assert_close(run(s, t, y, spec, backend), reference64(s, t, y, spec), torch.float32, name)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("name", ["kd", "kd_std", "kd_ce", "kd_tsm", "topkd"])
def test_learnable_temperature(backend, per_row, name, gen):
    s, t, y = make_inputs(gen, 4, 12, torch.float64)
    T0 = torch.rand(4 if per_row else (), generator=gen, dtype=torch.float64) * 3 + 1
    results = []
    for b in (backend, "reference"):
        T = T0.clone().to(DEVICE).requires_grad_(True)
        x = s.clone().requires_grad_(True)
        spec = presets(12)[name].replace(temperature=T)
        loss = kdk.logit_distill(x, t, y, spec, backend=b)
        results.append((loss.detach(),) + torch.autograd.grad(loss, (x, T)))
    (l1, gx1, gT1), (l2, gx2, gT2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gx1, gx2, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gT1, gT2, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_grad_output_scaling_and_repeated_backward(backend, reduction, gen):
    """A non-unit grad_output is applied on the device; a second backward (retain_graph) is exact."""
    s, t, y = make_inputs(gen, 4, 10, torch.float32)
    spec = presets(10)["dkd"].replace(reduction=reduction)
    x = s.clone().requires_grad_(True)
    xr = s.double().clone().requires_grad_(True)
    with kdk.repeatable_backward():
        loss = kdk.logit_distill(x, t, y, spec, backend=backend)
    loss_ref = kdk.logit_distill(xr, t.double(), y, spec, backend="reference")
    for _ in range(2):
        go = torch.rand(loss.shape, generator=gen, dtype=torch.float64).to(DEVICE) + 0.5
        g, = torch.autograd.grad(loss, x, go.float(), retain_graph=True)
        g_ref, = torch.autograd.grad(loss_ref, xr, go, retain_graph=True)
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", FUSED)
def test_leading_dims(backend, gen):
    s, t, y = make_inputs(gen, 6, 10, torch.float32)
    s3, t3, y3 = s.reshape(2, 3, 10), t.reshape(2, 3, 10), y.reshape(2, 3)
    for name, spec in presets(10).items():
        spec = spec.replace(reduction="none")
        loss, grad = run(s3, t3, y3, spec, backend)
        assert loss.shape == (2, 3) and grad.shape == (2, 3, 10)
        loss_ref, grad_ref = reference64(s, t, y, spec)
        assert_close((loss.reshape(6), grad.reshape(6, 10)), (loss_ref, grad_ref), torch.float32, name)


@pytest.mark.parametrize("backend", FUSED)
def test_inplace_writes_gradient_into_logits(backend, gen):
    s, t, y = make_inputs(gen, 4, 10, torch.float32)
    for name, spec in presets(10).items():
        loss_ref, grad_ref = reference64(s, t, y, spec)
        x = s.clone().requires_grad_(True)
        storage = x.data_ptr()
        loss = kdk.logit_distill(x, t, y, spec.replace(inplace=True), backend=backend)
        grad, = torch.autograd.grad(loss, x)
        assert grad.data_ptr() == storage, f"{name}: gradient not written into the logits' storage"
        assert_close((loss.detach(), grad), (loss_ref, grad_ref), torch.float32, name)


@pytest.mark.parametrize("backend", FUSED)
def test_every_gradient_element_is_written(backend, gen):
    """Poisoned (NaN) output buffers: after one forward, no NaN may survive anywhere."""
    from kdkernels.dispatch import load_launcher
    launcher, _ = load_launcher("logit", backend)
    s, t, y = make_inputs(gen, 3, 37, torch.float32, masked=False)
    y[1] = -100
    for name, spec in presets(37).items():
        grad = torch.full_like(s, float("nan"))
        rows, _ = launcher.forward(s, t, y, None, spec.replace(reduction="none").packed(), grad, None)
        assert torch.isfinite(grad).all(), name
        assert torch.isfinite(rows).all() and rows[1] == 0, name
        assert torch.equal(grad[1], torch.zeros_like(grad[1])), name


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", list(presets(6)))
def test_gradcheck(backend, name, gen):
    s, t, y = make_inputs(gen, 2, 6, torch.float64, masked=False)
    spec = presets(6)[name]
    if spec.decoupled is not None and spec.decoupled.adaptive:
        # AEKT's weight min(p_y/q_y, w_max) is a constant of the gradient by definition: gradcheck
        # needs it saturated (w = w_max) for the numerical Jacobian to agree
        spec = spec.replace(decoupled=kdk.Decoupled(1.0, 8.0, adaptive=True, max_weight=1e-4))
    x = s.clone().requires_grad_(True)
    with kdk.repeatable_backward():
        assert torch.autograd.gradcheck(lambda x: kdk.logit_distill(x, t, y, spec, backend=backend), (x,),
                                        eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", FUSED)
def test_gradcheck_reduction_none_and_learnable_temperature(backend, gen):
    s, t, y = make_inputs(gen, 3, 6, torch.float64, masked=False)
    x = s.clone().requires_grad_(True)
    T = torch.tensor([1.5, 2.5, 3.0], dtype=torch.float64, device=DEVICE, requires_grad=True)

    def f(x, T):
        return kdk.logit_distill(x, t, y, kdk.LogitDistill(temperature=T, ce_weight=0.3, reduction="none"),
                                 backend=backend)
    with kdk.repeatable_backward():
        assert torch.autograd.gradcheck(f, (x, T), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", FUSED)
def test_strided_labels(backend, gen):
    """A strided label view (e.g. one column of a [N, 2] tensor) is read by row, not by memory offset."""
    s, t, y = make_inputs(gen, 4, 10, torch.float32)
    y2 = torch.stack([y, (y + 3) % 10], 1)
    spec = presets(10)["dkd"]
    assert_close(run(s, t, y2[:, 0], spec, backend), reference64(s, t, y, spec), torch.float32, "strided")


@pytest.mark.parametrize("backend", FUSED)
def test_fp16_gradient_keeps_a_loss_scale(backend, gen):
    """float16 + GradScaler: the loss scale reaches the gradient before its float16 rounding, so entries
    that are tiny before scaling (batchmean over 256 rows) keep float16 precision, as in eager autograd."""
    s, t, y = make_inputs(gen, 256, 40, torch.float16, ignore=False, masked=False)
    spec = presets(40)["kd"]
    scale = 2.0 ** 14
    x = s.clone().requires_grad_(True)
    g, = torch.autograd.grad(kdk.logit_distill(x, t, y, spec, backend=backend) * scale, x)
    _, g_ref = reference64(s, t, y, spec)
    g_ref = g_ref * scale
    rel = ((g.double() - g_ref).abs() / g_ref.abs().clamp(min=1e-30))[g_ref.abs() > 1e-3]
    assert rel.max() < 4e-3, float(rel.max())  # a few float16 ulps, everywhere in the normal range


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("s_dtype,t_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.float16, torch.float32)])
def test_mixed_dtypes_without_a_cast_copy(backend, s_dtype, t_dtype, gen):
    """A bf16 student with an fp32 teacher (autocast, LLM teachers): each operand is loaded in its own
    dtype — no [N, C] cast copy — and the result equals the float64 reference on the same values."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.casts = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.startswith(("_to_copy", "to.", "copy_")) and args[0].dim() == 2:
                self.casts.append(func.__name__)
            return func(*args, **(kwargs or {}))

    s, t, y = make_inputs(gen, 4, 40, torch.float64)
    s, t = s.to(s_dtype), t.to(t_dtype)
    for name in ("kd", "dkd", "ldrld"):
        spec = presets(40)[name]
        x = s.clone().requires_grad_(True)
        with Casts() as mode:
            loss = kdk.logit_distill(x, t, y, spec, backend=backend)
            grad, = torch.autograd.grad(loss, x)
        assert not mode.casts, f"{name}: [N, C] casts {mode.casts}"
        assert grad.dtype == s_dtype
        assert_close((loss.detach().reshape(1), grad), tuple(v.reshape(1) if v.dim() == 0 else v for v in
                     reference64(s, t, y, spec)), s_dtype, f"{name} {s_dtype}/{t_dtype}")
