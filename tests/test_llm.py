"""The LLM family on every fused backend available here (docs/divergences.md, docs/topk_teachers.md):
loss and gradient against the float64 reference — every divergence × {dense, dense top-k, sparse teacher ×
each normalisation} × dtypes × {single-block and streamed rows, −inf columns, ignored tokens, all ignored,
N = 1}, softcap, CE, student ≈ teacher in bf16, float64 gradcheck through the fused Function, and the sparse
path's memory (no dense teacher)."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import kdkernels as kdk
from parity import DEVICE, FUSED, Allocations, assert_close, make_inputs, sparse_teacher

pytestmark = pytest.mark.skipif(not FUSED, reason=f"no fused backend can run on {DEVICE} here")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
DIVERGENCES = {"fwd": "forward_kl", "rev": "reverse_kl", "jsd": ("jsd", 0.3), "tvd": "tvd",
               "skew": ("skew_kl", 0.2), "skewr": ("skew_rkl", 0.2)}
NORMALIZATIONS = ("renorm", "tail", "teacher")


def _forced_block(backend, block_c):
    """Streamed rows at small C: the Triton engine's forced block (the C++ engines tile on their own)."""
    if block_c is None or backend != "triton":
        return contextlib.nullcontext()
    from kdkernels._triton.engine import forced_block_c
    return forced_block_c(block_c)


def run(s, teacher, y, spec, backend, block_c=None):
    x = s.detach().clone().requires_grad_(True)
    with _forced_block(backend, block_c):
        loss = kdk.logit_distill(x, teacher, y, spec, backend=backend)
        grad, = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def reference64(s, teacher, y, spec):
    if isinstance(teacher, kdk.SparseTeacher):
        teacher = kdk.SparseTeacher(teacher.ids, teacher.logprobs.double(), teacher.normalize)
    else:
        teacher = teacher.double()
    return run(s.double(), teacher, y, spec, "reference")


def _dense_cases():
    for dname in DIVERGENCES:
        for C in (10, 100):
            for dt in DTYPES:
                yield pytest.param(dname, C, dt, id=f"{dname}-C{C}-{dt}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dname,C,dt", list(_dense_cases()))
def test_divergence_dense(backend, dname, C, dt, gen):
    s, t, y = make_inputs(gen, 4, C, DTYPES[dt])
    spec = kdk.LogitDistill(temperature=2.0, divergence=DIVERGENCES[dname])
    assert_close(run(s, t, y, spec, backend), reference64(s, t, y, spec), DTYPES[dt], f"{backend} {dname}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dname", list(DIVERGENCES))
def test_divergence_streamed_with_ce_and_softcap(backend, dname, gen):
    """Rows longer than the block (C = 100 in blocks of 16), CE in the same pass, softcap on both sides."""
    s, t, y = make_inputs(gen, 3, 100, torch.float32, scale=6.0)
    spec = kdk.LogitDistill(temperature=1.5, divergence=DIVERGENCES[dname], ce_weight=0.5, softcap=(5.0, 3.0))
    assert_close(run(s, t, y, spec, backend, block_c=16), reference64(s, t, y, spec), torch.float32, dname)


def _topk_cases():
    for norm in NORMALIZATIONS:
        for dname in (("fwd",) if norm == "teacher" else ("fwd", "jsd", "rev", "tvd")):
            for dt in ("fp32", "bf16", "fp64"):
                yield pytest.param(norm, dname, dt, id=f"{norm}-{dname}-{dt}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("norm,dname,dt", list(_topk_cases()))
def test_dense_topk(backend, norm, dname, dt, gen):
    s, t, y = make_inputs(gen, 4, 40, DTYPES[dt])
    spec = kdk.LogitDistill(temperature=2.0, divergence=DIVERGENCES[dname], teacher_topk=kdk.TopK(3, norm))
    assert_close(run(s, t, y, spec, backend), reference64(s, t, y, spec), DTYPES[dt], f"{backend} {norm}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("norm", NORMALIZATIONS)
def test_dense_topk_streamed_with_ce(backend, norm, gen):
    s, t, y = make_inputs(gen, 3, 100, torch.float32)
    spec = kdk.LogitDistill(temperature=1.0, ce_weight=0.7, teacher_topk=kdk.TopK(5, norm), softcap=8.0,
                            divergence="forward_kl" if norm == "teacher" else ("jsd", 0.6))
    assert_close(run(s, t, y, spec, backend, block_c=16), reference64(s, t, y, spec), torch.float32, norm)


def _sparse_cases():
    for norm in NORMALIZATIONS:
        for dname in (("fwd",) if norm == "teacher" else ("fwd", "jsd", "rev", "tvd")):
            for dt in ("fp32", "bf16", "fp64"):
                yield pytest.param(norm, dname, dt, id=f"{norm}-{dname}-{dt}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("norm,dname,dt", list(_sparse_cases()))
def test_sparse_teacher(backend, norm, dname, dt, gen):
    dtype = DTYPES[dt]
    s, _, y = make_inputs(gen, 4, 50, dtype)
    teacher = sparse_teacher(gen, 4, 50, 6, norm, dtype=dtype if dtype == torch.float64 else torch.float32)
    spec = kdk.LogitDistill(temperature=1.0 if norm == "tail" else 2.0, divergence=DIVERGENCES[dname])
    assert_close(run(s, teacher, y, spec, backend), reference64(s, teacher, y, spec), dtype, f"{backend} {norm}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("norm", NORMALIZATIONS)
def test_sparse_teacher_streamed_ce_bf16_logprobs(backend, norm, gen):
    """Random distinct ids (not the top-K), bf16-stored log-probabilities, CE, a student softcap, streamed."""
    s, _, y = make_inputs(gen, 3, 120, torch.float32)
    teacher = sparse_teacher(gen, 3, 120, 9, norm, dtype=torch.bfloat16, pad=2, random_ids=True)
    spec = kdk.LogitDistill(temperature=1.0, ce_weight=0.5, softcap=(10.0, None))
    assert_close(run(s, teacher, y, spec, backend, block_c=32), reference64(s, teacher, y, spec), torch.float32,
                 norm)


@pytest.mark.parametrize("backend", FUSED)
def test_sparse_bad_id_row_is_nan_and_isolated(backend, gen):
    s, _, y = make_inputs(gen, 4, 30, torch.float32)
    teacher = sparse_teacher(gen, 4, 30, 4, "renorm", dtype=torch.float32, pad=0)
    teacher.ids[2, 1] = 30
    spec = kdk.LogitDistill(temperature=2.0, reduction="none")
    loss, grad = run(s, teacher, y, spec, backend)
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all()
    loss_ref, grad_ref = reference64(s, teacher, y, spec)
    keep = torch.tensor([0, 1, 3], device=DEVICE)
    assert_close((loss[keep], grad[keep]), (loss_ref[keep], grad_ref[keep]), torch.float32, "bad id")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_all_ignored_and_single_row(backend, reduction, gen):
    s, t, _ = make_inputs(gen, 3, 20, torch.float32)
    y = torch.full((3,), -100, device=DEVICE)
    teacher = sparse_teacher(gen, 3, 20, 4, "tail", dtype=torch.float32)
    for tt, spec in ((t, kdk.LogitDistill(divergence=("jsd", 0.5), reduction=reduction)),
                     (t, kdk.LogitDistill(teacher_topk=kdk.TopK(3, "tail"), reduction=reduction)),
                     (teacher, kdk.LogitDistill(temperature=1.0, reduction=reduction))):
        loss, grad = run(s, tt, y, spec, backend)
        assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(grad, torch.zeros_like(grad))
    s1, t1, y1 = make_inputs(gen, 1, 20, torch.float32)
    spec = kdk.LogitDistill(divergence="tvd", reduction=reduction)
    assert_close(run(s1, t1, y1, spec, backend), reference64(s1, t1, y1, spec), torch.float32, "N=1")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", ["jsd", "rev", "tvd", "tail", "sparse"])
def test_bf16_gradient_when_student_close_to_teacher(backend, case, gen):
    """Student ≈ teacher (bf16 logits 1e-2 apart): the gradient is a small difference, computed in fp32 from
    log-probabilities — its relative error stays ≤ 1e-2 (peers' bf16 kernels are 4–20 % off here)."""
    base = torch.randn(4, 256, generator=gen, dtype=torch.float64) * 2
    s = (base + 1e-2 * torch.randn(4, 256, generator=gen, dtype=torch.float64)).to(torch.bfloat16).to(DEVICE)
    t = base.to(torch.bfloat16).to(DEVICE)
    teacher = t
    spec = {"jsd": kdk.LogitDistill(temperature=1.0, divergence=("jsd", 0.5)),
            "rev": kdk.LogitDistill(temperature=1.0, divergence="reverse_kl"),
            "tvd": kdk.LogitDistill(temperature=1.0, divergence="tvd"),
            "tail": kdk.LogitDistill(temperature=1.0, teacher_topk=kdk.TopK(8, "tail")),
            "sparse": kdk.LogitDistill(temperature=1.0)}[case]
    if case == "sparse":
        lp = F.log_softmax(t.double(), -1)
        ids = lp.topk(32, -1).indices
        teacher = kdk.SparseTeacher(ids, lp.gather(-1, ids).float(), "tail")
    loss, grad = run(s, teacher, None, spec, backend)
    loss_ref, grad_ref = reference64(s, teacher, None, spec)
    rel = (grad.double() - grad_ref).norm() / grad_ref.norm()
    assert rel <= 1e-2, f"bf16 gradient relative error {float(rel):.3e}"
    assert abs(float(loss) - float(loss_ref)) <= 1e-2 * abs(float(loss_ref)) + 1e-6


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", ["jsd", "skewr", "topk_tail", "sparse_renorm", "sparse_tail", "sparse_teacher"])
def test_gradcheck_float64(backend, case, gen):
    s, t, y = make_inputs(gen, 3, 9, torch.float64, masked=False)
    teacher, spec = t, None
    if case == "jsd":
        spec = kdk.LogitDistill(temperature=2.0, divergence=("jsd", 0.4), ce_weight=0.3, softcap=4.0)
    elif case == "skewr":
        spec = kdk.LogitDistill(temperature=1.5, divergence=("skew_rkl", 0.3), reduction="none")
    elif case == "topk_tail":
        spec = kdk.LogitDistill(temperature=2.0, divergence="reverse_kl", teacher_topk=kdk.TopK(3, "tail"))
    else:
        norm = case.split("_")[1]
        teacher = sparse_teacher(gen, 3, 9, 4, norm, dtype=torch.float64)
        spec = kdk.LogitDistill(temperature=1.0 if norm == "tail" else 2.0, ce_weight=0.2)
    x = s.clone().requires_grad_(True)
    with kdk.repeatable_backward():
        assert torch.autograd.gradcheck(lambda x: kdk.logit_distill(x, teacher, y, spec, backend=backend), (x,),
                                        eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("norm", NORMALIZATIONS)
def test_sparse_path_allocates_no_dense_teacher(backend, norm, gen):
    """The sparse teacher is read at its K ids: the only [N, V] buffer of a fwd+bwd call is the gradient."""
    N, V = 4, 64
    s, _, y = make_inputs(gen, N, V, torch.float32)
    teacher = sparse_teacher(gen, N, V, 5, norm, dtype=torch.float32)
    x = s.clone().requires_grad_(True)
    spec = kdk.LogitDistill(temperature=1.0)
    with Allocations() as rec:
        loss = kdk.logit_distill(x, teacher, y, spec, backend=backend)
        loss.backward()
    dense = [shape for shape in rec.shapes if len(shape) >= 2 and shape[-1] == V]
    assert len(dense) <= 1, dense  # the gradient buffer


@pytest.mark.parametrize("backend", FUSED)
def test_compile_fullgraph(backend, gen):
    """The LLM options through torch.compile(fullgraph=True): a divergence with softcap and a top-k teacher on
    dense logits, and a sparse teacher (its ids and log-probabilities are graph inputs)."""
    s = (torch.randn(6, 64, generator=gen) * 3).to(DEVICE).requires_grad_(True)
    t = (torch.randn(6, 64, generator=gen) * 3).to(DEVICE)
    y = torch.randint(0, 64, (6,), generator=gen).to(DEVICE)
    lp = F.log_softmax(t, -1)
    ids = lp.topk(8, -1).indices.to(torch.int32)
    vals = lp.gather(-1, ids.long())

    def f(s, t, ids, vals, y):
        return (kdk.kd_loss(s, t, 2.0, labels=y, divergence=kdk.JSD(0.3), softcap=5.0, backend=backend)
                + kdk.kd_loss(s, t, 1.0, labels=y, teacher_topk=kdk.TopK(4, "tail"), backend=backend)
                + kdk.kd_loss(s, kdk.SparseTeacher(ids, vals, "tail"), 1.0, labels=y, ce_weight=0.5, backend=backend))

    compiled = torch.compile(f, fullgraph=True)
    loss_c = compiled(s, t, ids, vals, y)
    g_c, = torch.autograd.grad(loss_c, s)
    loss_e = f(s, t, ids, vals, y)
    g_e, = torch.autograd.grad(loss_e, s)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-7)
