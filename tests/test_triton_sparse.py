"""The Triton sparse-teacher kernel (kdkernels/_triton/sparse.py) against the float64 reference.

A stored top-K teacher ``SparseTeacher(ids, logprobs, normalize)`` (log_softmax of random teacher logits
gathered at its top-K or at random distinct ids; padding slots ``id = -1``) against every normalisation ×
divergence where defined, K ∈ {1, 5, 64}, single-block and streamed rows, CE, the student softcap, per-row
temperatures, ignored rows, an id ≥ C, every student dtype, reductions, inplace; and the memory claims: the
renorm path reads only the K support values of the student, and nothing [N, C] besides the gradient is
allocated. Runs under ``TRITON_INTERPRET=1`` (N ≤ 4, C ≤ 256).
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import kdkernels as kdk
from kdkernels.dispatch import unavailable_reason
from parity import DEVICE, TOL, Allocations, assert_close, sparse_teacher

pytestmark = pytest.mark.skipif(unavailable_reason("triton", DEVICE) is not None,
                                reason=f"Triton cannot run on {DEVICE} here")

E = pytest.importorskip("kdkernels._triton.engine")
SP = pytest.importorskip("kdkernels._triton.sparse")

DIVERGENCES = {"fwd": "forward_kl", "jsd": ("jsd", 0.3), "rev": "reverse_kl", "tvd": "tvd"}
NORMALIZATIONS = ("renorm", "tail", "teacher")


def _divs(norm):
    return ("fwd",) if norm == "teacher" else tuple(DIVERGENCES)


def student_of(gen, N, C, dtype, *, scale=3.0, ignore_row=1):
    s = torch.randn(N, C, generator=gen, dtype=torch.float64) * scale
    y = torch.randint(0, C, (N,), generator=gen)
    if ignore_row is not None and N > ignore_row:
        y[ignore_row] = -100
    return s.to(dtype).to(DEVICE), y.to(DEVICE)


def run(s, teacher, y, spec, backend="triton", block_c=None):
    """(loss, ∂Σloss/∂s) through the public entry point on a fresh leaf copy of ``s``."""
    x = s.detach().clone().requires_grad_(True)
    ctx = E.forced_block_c(block_c) if block_c is not None and backend == "triton" else contextlib.nullcontext()
    with ctx:
        loss = kdk.logit_distill(x, teacher, y, spec, backend=backend)
        grad, = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def reference64(s, teacher, y, spec):
    t64 = kdk.SparseTeacher(teacher.ids, teacher.logprobs.double(), teacher.normalize)
    return run(s.double(), t64, y, spec, "reference")


def spec_for(norm, dname="fwd", **kw):
    kw.setdefault("temperature", 1.0 if norm == "tail" else 2.0)
    return kdk.LogitDistill(divergence=DIVERGENCES[dname], **kw)


# ---- parity -----------------------------------------------------------------------------------------
def _cases():
    for norm in NORMALIZATIONS:
        for dname in _divs(norm):
            for K in (1, 5, 64):
                yield pytest.param(norm, dname, K, id=f"{norm}-{dname}-K{K}")


@pytest.mark.parametrize("norm,dname,K", list(_cases()))
def test_matches_reference(norm, dname, K, gen):
    """Single-block rows; K = 5: the teacher's top-K, K ∈ {1, 64}: random distinct ids (K = 1: row 0 is
    all padding, an empty row for renorm/teacher; tail's all-padding row is checked in test_empty_rows)."""
    C = 80
    s, y = student_of(gen, 4, C, torch.float32)
    teacher = sparse_teacher(gen, 4, C, K, norm, random_ids=K != 5, pad=0 if (K == 1 and norm == "tail") else 1)
    off_support = [c for c in range(C) if c not in teacher.ids[2].tolist()]
    s[2, off_support[:3]] = float("-inf")  # masked classes of the student, off the support
    spec = spec_for(norm, dname)
    assert_close(run(s, teacher, y, spec), reference64(s, teacher, y, spec), torch.float32, f"{norm} {dname} K={K}")


@pytest.mark.parametrize("norm,dname", [(n, d) for n in NORMALIZATIONS for d in _divs(n)])
def test_streamed_with_ce_softcap_and_bf16_logprobs(norm, dname, gen):
    """Rows of 100 columns in blocks of 16, CE with labels (one row ignored), the student softcap, random
    ids with two padding slots, log-probabilities stored in bf16."""
    s, y = student_of(gen, 4, 100, torch.float32, scale=6.0)
    teacher = sparse_teacher(gen, 4, 100, 9, norm, dtype=torch.bfloat16, pad=2, random_ids=True)
    y[2] = teacher.ids[2, 3]  # a label on the support: its column gets the KD and the CE terms
    spec = spec_for(norm, dname, ce_weight=0.5, softcap=(5.0, None))
    assert_close(run(s, teacher, y, spec, block_c=16), reference64(s, teacher, y, spec), torch.float32,
                 f"{norm} {dname}")


@pytest.mark.parametrize("norm", NORMALIZATIONS)
@pytest.mark.parametrize("dt", ["fp64", "bf16", "fp16"])
def test_student_dtypes(norm, dt, gen):
    """Every student dtype (fp16's gradient is written in backward with grad_output folded in:
    the ``grad_factor`` path); float64 exact to 1e-12, streamed, with CE and a softcap."""
    dtype = {"fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}[dt]
    s, y = student_of(gen, 4, 60, dtype)
    teacher = sparse_teacher(gen, 4, 60, 5, norm, dtype=torch.float64 if dt == "fp64" else torch.float32)
    spec = spec_for(norm, "jsd" if norm != "teacher" else "fwd", ce_weight=0.3, softcap=(4.0, None))
    assert_close(run(s, teacher, y, spec, block_c=16), reference64(s, teacher, y, spec), dtype, f"{norm} {dt}")


@pytest.mark.parametrize("norm", ["renorm", "teacher"])
def test_per_row_temperature(norm, gen):
    s, y = student_of(gen, 3, 40, torch.float64)
    teacher = sparse_teacher(gen, 3, 40, 6, norm, dtype=torch.float64)
    T = torch.tensor([0.5, 2.0, 3.5], dtype=torch.float64, device=DEVICE)
    spec = kdk.LogitDistill(temperature=T, ce_weight=0.2)
    assert_close(run(s, teacher, y, spec), reference64(s, teacher, y, spec), torch.float64, norm)


@pytest.mark.parametrize("norm", NORMALIZATIONS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_reductions_in_the_launch(norm, reduction, gen):
    s, y = student_of(gen, 4, 50, torch.float32)
    y[3] = -100
    teacher = sparse_teacher(gen, 4, 50, 5, norm)
    spec = spec_for(norm, reduction=reduction, loss_weight=0.7)
    got, want = run(s, teacher, y, spec), reference64(s, teacher, y, spec)
    assert got[0].shape == want[0].shape
    assert_close(got, want, torch.float32, reduction)
    assert torch.equal(got[1][1], torch.zeros_like(got[1][1])) and torch.equal(got[1][3], torch.zeros_like(got[1][3]))


@pytest.mark.parametrize("norm", NORMALIZATIONS)
def test_student_close_to_teacher_bf16_gradient(norm, gen):
    """Student ≈ teacher (bf16 logits 1e-2 apart, K = 32 of 256): the gradient is a small difference,
    formed in fp32 from log-probabilities — relative error ≤ 1e-2."""
    base = torch.randn(4, 256, generator=gen, dtype=torch.float64) * 2
    s = (base + 1e-2 * torch.randn(4, 256, generator=gen, dtype=torch.float64)).to(torch.bfloat16).to(DEVICE)
    lp = F.log_softmax(base.to(torch.bfloat16).double(), -1)
    ids = lp.topk(32, -1).indices
    teacher = kdk.SparseTeacher(ids.to(DEVICE), lp.gather(-1, ids).float().to(DEVICE), norm)
    spec = kdk.LogitDistill(temperature=1.0)
    (loss, grad), (loss_ref, grad_ref) = run(s, teacher, None, spec), reference64(s, teacher, None, spec)
    rel = (grad.double() - grad_ref).norm() / grad_ref.norm()
    assert rel <= 1e-2, f"bf16 gradient relative error {float(rel):.3e}"
    assert abs(float(loss) - float(loss_ref)) <= TOL[torch.bfloat16][0] * abs(float(loss_ref)) + 1e-6


# ---- row semantics ----------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", NORMALIZATIONS)
def test_id_out_of_range_makes_only_its_row_nan(norm, gen):
    s, y = student_of(gen, 4, 30, torch.float32)
    teacher = sparse_teacher(gen, 4, 30, 4, norm, pad=0)
    teacher.ids[2, 1] = 30
    spec = spec_for(norm, reduction="none", ce_weight=0.4 if norm == "teacher" else 0.0)
    loss, grad = run(s, teacher, y, spec, block_c=16)
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all()
    loss_ref, grad_ref = reference64(s, teacher, y, spec)
    keep = torch.tensor([0, 1, 3], device=DEVICE)
    assert_close((loss[keep], grad[keep]), (loss_ref[keep], grad_ref[keep]), torch.float32, "bad id")


@pytest.mark.parametrize("norm", NORMALIZATIONS)
def test_nan_in_a_logprob_or_the_student_is_a_nan_row(norm, gen):
    s, y = student_of(gen, 4, 40, torch.float32, ignore_row=None)
    teacher = sparse_teacher(gen, 4, 40, 5, norm, pad=0)
    teacher.logprobs[0, 2] = float("nan")
    s[3, int(teacher.ids[3, 0])] = float("inf")  # on the support: seen by every path
    spec = spec_for(norm, reduction="none")
    loss, grad = run(s, teacher, y, spec)
    assert torch.isnan(loss[[0, 3]]).all() and torch.isnan(grad[[0, 3]]).all()
    assert torch.isfinite(loss[[1, 2]]).all() and torch.isfinite(grad[[1, 2]]).all()


def test_empty_rows(gen):
    """A student with no finite logit → 0; a renorm/teacher row with only padding → 0 (CE included, as the
    reference); a tail row with only padding is all tail mass: p_tail = q_tail = 1, KD 0, CE counted."""
    s, y = student_of(gen, 3, 40, torch.float32, ignore_row=None)
    s[0] = float("-inf")
    ce_w = 0.5
    for norm in NORMALIZATIONS:
        teacher = sparse_teacher(gen, 3, 40, 4, norm, pad=0)
        teacher.ids[1] = -1
        spec = spec_for(norm, reduction="none", ce_weight=ce_w)
        got, want = run(s, teacher, y, spec, block_c=16), reference64(s, teacher, y, spec)
        assert float(got[0][0]) == 0.0 and torch.equal(got[1][0], torch.zeros_like(got[1][0])), norm
        keep = [0, 2]
        assert_close((got[0][keep], got[1][keep]), (want[0][keep], want[1][keep]), torch.float32, norm)
        if norm == "tail":  # (the reference's x/T overflow guard reads the all −inf teacher as NaN)
            x = s[1].double().clone().requires_grad_(True)
            ce = ce_w * (torch.logsumexp(x, -1) - x[y[1]])
            ce_grad, = torch.autograd.grad(ce, x)
            assert_close((got[0][1:2], got[1][1:2]), (ce.detach().reshape(1), ce_grad.reshape(1, -1)),
                         torch.float32, "tail, all padding")
        else:
            assert float(got[0][1]) == 0.0 and torch.equal(got[1][1], torch.zeros_like(got[1][1])), norm


@pytest.mark.parametrize("norm", NORMALIZATIONS)
def test_masked_student_class_at_a_slot_gets_no_kd_gradient(norm, gen):
    """A slot whose student logit is −inf (a masked class the teacher gives mass): its row's loss is what the
    reference says (+inf for forward KL) and its KD gradient there is 0, as the reference's and the CPU
    twin's — no −kd_w·T·p̂ leaking into a masked class (with and without CE, single block and streamed)."""
    s, y = student_of(gen, 4, 40, torch.float64, ignore_row=None)
    teacher = sparse_teacher(gen, 4, 40, 5, norm, pad=0)
    ids = teacher.ids
    for row in range(4):
        s[row, ids[row, 1]] = float("-inf")
    for ce_w in (0.0, 0.5):
        spec = spec_for(norm, reduction="none", ce_weight=ce_w)
        want = reference64(s, teacher, y, spec)
        for block_c in (None, 16):
            got = run(s, teacher, y, spec, block_c=block_c)
            assert_close(got, want, torch.float64, f"{norm} ce={ce_w} block={block_c}")
            masked_cols = ids[:, 1].to(s.device)
            assert torch.equal(got[1].gather(1, masked_cols[:, None]), want[1].gather(1, masked_cols[:, None]))


def test_ignored_rows_read_nothing_and_are_exactly_zero(gen):
    s, y = student_of(gen, 3, 40, torch.float32)
    s[1] = float("nan")
    teacher = sparse_teacher(gen, 3, 40, 5, "tail")
    teacher.ids[1, 0] = 1000  # would be a NaN row if it were not ignored
    loss, grad = run(s, teacher, y, spec_for("tail", reduction="none", ce_weight=0.5))
    assert float(loss[1]) == 0.0 and torch.equal(grad[1], torch.zeros_like(grad[1]))
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_every_gradient_element_is_written(gen):
    """Poisoned (NaN) gradient buffers: after one launch no NaN survives (renorm writes the zeros too)."""
    s, y = student_of(gen, 3, 37, torch.float32)
    for norm in NORMALIZATIONS:
        teacher = sparse_teacher(gen, 3, 37, 5, norm)
        spec = spec_for(norm, reduction="none")
        grad = torch.full_like(s, float("nan"))
        rows, dtemp = E.launcher.forward(s, teacher, y, None, spec.packed((norm, 5)), grad, None)
        assert dtemp is None
        assert torch.isfinite(grad).all() and torch.isfinite(rows).all(), norm
        assert torch.equal(grad[1], torch.zeros_like(grad[1])), norm


def test_inplace_writes_the_gradient_into_the_student(gen):
    s, y = student_of(gen, 4, 50, torch.float32)
    for norm in ("renorm", "tail"):
        teacher = sparse_teacher(gen, 4, 50, 5, norm)
        spec = spec_for(norm, ce_weight=0.3)
        want = reference64(s, teacher, y, spec)
        x = s.clone().requires_grad_(True)
        storage = x.data_ptr()
        loss = kdk.logit_distill(x, teacher, y, spec.replace(inplace=True), backend="triton")
        grad, = torch.autograd.grad(loss, x)
        assert grad.data_ptr() == storage, norm
        assert_close((loss.detach(), grad), want, torch.float32, norm)


def test_int32_ids_and_strided_teacher_rows(gen):
    s, y = student_of(gen, 4, 64, torch.float32)
    base = sparse_teacher(gen, 4, 64, 6, "tail", ids_dtype=torch.int32)
    wide_ids = torch.full((4, 10), -1, dtype=torch.int32, device=DEVICE)
    wide_lp = torch.zeros(4, 10, dtype=torch.float32, device=DEVICE)
    wide_ids[:, :6], wide_lp[:, :6] = base.ids, base.logprobs
    teacher = kdk.SparseTeacher(wide_ids[:, :6], wide_lp[:, :6], "tail")  # row stride 10
    assert teacher.ids.stride(0) == 10
    spec = spec_for("tail", ce_weight=0.2)
    assert_close(run(s, teacher, y, spec), reference64(s, base, y, spec), torch.float32, "strided")


# ---- memory -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _count_loads(tensor, counts):
    """Counts, in ``counts[0]``, the elements the interpreter loads from ``tensor``'s storage."""
    from triton.runtime import interpreter
    lo = tensor.untyped_storage().data_ptr()
    hi = lo + tensor.untyped_storage().nbytes()
    original = interpreter.InterpreterBuilder.create_masked_load

    def counting(self, ptrs, mask, other, *args):
        addr = ptrs.data[mask.data] if mask is not None else ptrs.data.ravel()
        counts[0] += int(((addr >= lo) & (addr < hi)).sum())
        return original(self, ptrs, mask, other, *args)

    interpreter.InterpreterBuilder.create_masked_load = counting
    try:
        yield
    finally:
        interpreter.InterpreterBuilder.create_masked_load = original


@pytest.mark.skipif(DEVICE.type != "cpu", reason="counts the interpreter's loads")
@pytest.mark.parametrize("write_grad", [False, True])
def test_renorm_reads_only_the_support_of_the_student(write_grad, gen):
    """renorm without CE: the student is read at the K ids only (the gradient row is written dense);
    a streamed normalisation (tail) reads whole rows — the counter sees them."""
    N, C, K = 4, 96, 5
    s, y = student_of(gen, N, C, torch.float32)
    teacher = sparse_teacher(gen, N, C, K, "renorm")
    spec = spec_for("renorm", reduction="none")
    grad = torch.empty_like(s) if write_grad else None
    counts = [0]
    with _count_loads(s, counts), E.forced_block_c(32):
        E.launcher.forward(s, teacher, y, None, spec.packed(("renorm", K)), grad, None)
    live = (y != -100).unsqueeze(-1) & (teacher.ids >= 0)
    assert counts[0] == int(live.sum()), (counts[0], int(live.sum()))
    tail = kdk.SparseTeacher(teacher.ids, teacher.logprobs, "tail")
    counts = [0]
    with _count_loads(s, counts), E.forced_block_c(32):
        E.launcher.forward(s, tail, y, None, spec_for("tail", reduction="none").packed(("tail", K)), grad, None)
    assert counts[0] >= (N - 1) * C * (2 if write_grad else 1)


@pytest.mark.parametrize("norm", NORMALIZATIONS)
def test_no_dense_teacher_is_allocated(norm, gen):
    """The only [N, V] buffer of a fwd+bwd call is the gradient."""
    N, V = 4, 64
    s, y = student_of(gen, N, V, torch.float32)
    teacher = sparse_teacher(gen, N, V, 5, norm)
    x = s.clone().requires_grad_(True)
    with Allocations() as rec:
        kdk.logit_distill(x, teacher, y, spec_for(norm, ce_weight=0.1), backend="triton").backward()
    dense = [shape for shape in rec.shapes if len(shape) >= 2 and shape[-1] == V]
    assert len(dense) == 1, dense


# ---- the launcher's contract ------------------------------------------------------------------------
def test_registered_as_a_torch_library_op():
    assert hasattr(torch.ops.kdkernels, "triton_sparse_distill")


def test_unsupported_combinations_raise(gen):
    s, y = student_of(gen, 2, 20, torch.float32)
    teacher = sparse_teacher(gen, 2, 20, 3, "teacher")

    def launch(spec, t=teacher, temperature=None, sparse=True):
        packed = spec.packed((t.normalize, 3)) if sparse else spec.packed()
        return E.launcher.forward(s, t, y, temperature, packed, None, None)

    with pytest.raises(ValueError, match="forward_kl"):
        launch(kdk.LogitDistill(divergence="tvd"), sparse=False)
    with pytest.raises(NotImplementedError, match="teacher softcap"):
        launch(kdk.LogitDistill(softcap=(None, 3.0)))
    with pytest.raises(NotImplementedError, match="standardize"):
        launch(kdk.LogitDistill(standardize=True), sparse=False)
    tail = kdk.SparseTeacher(teacher.ids, teacher.logprobs, "tail")
    with pytest.raises(ValueError, match="temperature=1.0"):
        launch(kdk.LogitDistill(temperature=2.0), t=tail, sparse=False)
    with pytest.raises(ValueError, match="differs"):
        E.launcher.forward(s, tail, y, None, kdk.LogitDistill().packed(("renorm", 3)), None, None)
    # the public API rejects these before any launch
    with pytest.raises(ValueError):
        kdk.logit_distill(s, tail, y, kdk.LogitDistill(temperature=2.0), backend="triton")


def test_no_rows(gen):
    s = torch.zeros(0, 10, device=DEVICE)
    teacher = kdk.SparseTeacher(torch.zeros(0, 3, dtype=torch.int64, device=DEVICE), torch.zeros(0, 3, device=DEVICE))
    for reduction in ("sum", "none"):
        packed = kdk.LogitDistill(reduction=reduction).packed(("renorm", 3))
        loss, _ = E.launcher.forward(s, teacher, None, None, packed, torch.empty_like(s), None)
        assert loss.shape == (() if reduction == "sum" else (0,)) and float(loss.sum()) == 0.0


# ---- the GPU compiler ---------------------------------------------------------------------------------
def _aot_job(norm, dtype, C, K, *, ce=False, cap=False, div="forward_kl", ids="i64"):
    """One shipped configuration of the kernel as an ahead-of-time compile job (tests/aot_util.py)."""
    ty = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[dtype]
    acc = "fp64" if dtype == torch.float64 else "fp32"
    block, single, num_warps = E.block_config(C)
    k_pad = SP._k_pad(K)
    sig = dict(s_ptr="*" + ty, ids_ptr="*" + ids, lp_ptr="*fp32", labels_ptr="*i64", temp_ptr="*" + acc,
               gfactor_ptr="*" + acc, params_ptr="*" + acc, grad_ptr="*" + ty, row_loss_ptr="*" + acc,
               loss_ptr="*" + acc, ticket_ptr="*i32", N="i32", C="i32", K="i32", stride_s_row="i32",
               stride_ids_row="i32", stride_lp_row="i32", stride_g_row="i32", stride_temp="i32",
               stride_gfactor="i32", ignore_index="i32")
    cons = dict(HAS_LABELS=True, TEMP_IS_TENSOR=False, HAS_GFACTOR=True, WRITE_GRAD=True, REDUCTION=2, USE_KD=True,
                USE_CE=ce, NORM=kdk.spec.NORMALIZATION_CODES[norm], DIVERGENCE=kdk.spec.DIVERGENCE_CODES[div],
                SOFTCAP_S=cap, K_PAD=k_pad, LOG_K_PAD=k_pad.bit_length() - 1, BLOCK_C=block, SINGLE_BLOCK=single,
                ACC="tl.float64" if dtype == torch.float64 else "tl.float32", VEC=E.vector_width(C),
                BATCH_BLOCK=E.BATCH_BLOCK)
    return {"kernel": "kdkernels._triton.sparse:_sparse_distill_kernel", "signature": sig, "constexprs": cons,
            "num_warps": num_warps, "label": f"{norm} {ty} C={C} K={K} ce={ce} cap={cap} {div}"}


def test_compiles_for_sm80_and_sm90():
    """The interpreter accepts programs the GPU compiler rejects (tl.sort / tl.gather of the tail mask
    included): the main configurations compile for real targets (no GPU needed)."""
    from aot_util import aot_compile
    jobs = [_aot_job("renorm", torch.bfloat16, 128_000, 64),
            _aot_job("tail", torch.bfloat16, 128_000, 1024, ce=True, cap=True, div="jsd"),
            _aot_job("teacher", torch.float32, 1000, 5, ce=True, ids="i32"),
            _aot_job("tail", torch.float64, 1000, 20, div="reverse_kl")]
    errors = aot_compile(jobs, archs=(80, 90))
    assert not errors, "\n".join(errors)
