"""The C++ row engine's LLM family (csrc/): divergences, softcap, dense top-k teachers and sparse teachers,
on the CPU twin (``backend="cpu"``) and on the CUDA engine's code path run by the host block simulator.

* every divergence (jsd β = 0.3, skew α = 0.2) × C ∈ {10, 100, 1000} × {fp32, bf16, fp64} against the
  float64 reference (masked classes, an ignored row), with CE and with softcap;
* dense top-k k = 3 × {renorm, tail, teacher} × {forward_kl, jsd, reverse_kl};
* sparse teachers K = 5 (ids at the teacher's top-K or spread at random, padding slots holding garbage,
  int32 and int64 ids, logprobs a true log_softmax of a random teacher) × {renorm, tail, teacher}; rows
  with an id ≥ C are NaN, rows with only padding are 0 (renorm) or all tail mass (tail) — on the CPU twin
  and on the simulated CUDA engine (which sorts the K slots per row in shared memory), the latter also at
  1, 3 and 32 lanes, K = 1 and K = C, streamed rows, duplicate ids (as the CPU twin: the last slot wins),
  and reductions sum / batchmean;
* student ≈ teacher in bf16: the gradient stays within 1e-2 of max|grad|;
* float64 gradcheck through the autograd Function, reductions, N = 1, inplace, mixed dtypes, opcheck of
  the op with ``teacher_ids``; the simulator for dense specs.
"""
from __future__ import annotations

import math

import pytest
import torch

import kdkernels as kdk
from kdkernels.dispatch import unavailable_reason
from kdkernels.spec import MAX_SPARSE_K, SparseTeacher

from parity import TOL, assert_close, make_inputs, reference64, run

CPU_REASON = unavailable_reason("cpu", torch.device("cpu"))
pytestmark = pytest.mark.skipif(CPU_REASON is not None, reason=f"C++ CPU backend unavailable: {CPU_REASON}")

DT_ID = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}
DIVERGENCES = {
    "forward_kl": kdk.Divergence("forward_kl"),
    "reverse_kl": kdk.Divergence("reverse_kl"),
    "jsd": kdk.JSD(0.3),
    "tvd": kdk.Divergence("tvd"),
    "skew_kl": kdk.SkewKL(0.2),
    "skew_rkl": kdk.SkewRKL(0.2),
}
NORMS = ("renorm", "tail", "teacher")
#: where the C++ engine runs: the CPU twin ("cpu", through the public API) or the CUDA engine's code path
#: on the host block simulator ("sim", 4 lanes)
LAUNCHERS = ("cpu", "sim")
SOFTCAP = (5.0, 3.0)


@pytest.fixture(autouse=True)
def _repeatable_backward():
    with kdk.repeatable_backward():
        yield


def _sim(lanes=4):
    from kdkernels._cpp import SimulatedCudaLauncher
    return SimulatedCudaLauncher(lanes)


def _launcher(name, lanes=4):
    """The launcher named in LAUNCHERS: None for the CPU twin (see run_on), else the block simulator."""
    return None if name == "cpu" else _sim(lanes)


def run_on(s, t, y, spec, launcher):
    """(per-row losses, gradient) of the CPU twin through the public API (launcher None) or of a launcher."""
    spec = spec.replace(reduction="none")
    return run(s, t, y, spec, "cpu") if launcher is None else run_launcher(s, t, y, spec, launcher)


def check(s, t, y, spec, dtype, what, launcher=None):
    """Per-row losses (reduction none) and the gradient of the CPU twin (through the public API) or of a
    launcher, against the float64 reference on the same inputs."""
    spec = spec.replace(reduction="none")
    got = run_on(s, t, y, spec, launcher)
    want = sparse_reference64(s, t, y, spec) if isinstance(t, SparseTeacher) else reference64(s, t, y, spec)
    assert_close(got, want, dtype, what)


def run_launcher(s, t, y, spec, launcher):
    """(per-row losses, gradient) of a launcher's contract-2 forward (reduction none)."""
    spec = spec.replace(reduction="none")
    packed = spec.packed((t.normalize, t.ids.shape[-1])) if isinstance(t, SparseTeacher) else spec.packed()
    grad = torch.empty_like(s)
    loss, _ = launcher.forward(s, t, y, None, packed, grad, None)
    return loss, grad


def sparse_reference64(s, teacher, y, spec):
    """The float64 reference on the same (already rounded) student and stored log-probabilities."""
    t64 = SparseTeacher(teacher.ids, teacher.logprobs.double(), teacher.normalize)
    return run(s.double(), t64, y, spec, "reference")


def sparse_teacher(gen, t, K, normalize, *, spread=False, pad=True, ids_dtype=torch.int64, lp_dtype=None):
    """A SparseTeacher of K slots from dense teacher logits t [N, C]: logprobs = log_softmax(t) gathered at
    the teacher's top-K ids or at K random distinct ids (spread); with pad, the last slot of every other
    row is padding (id −1) holding a NaN, which must never be read."""
    N, C = t.shape
    lp = torch.log_softmax(t.double(), -1)
    if spread:
        ids = torch.stack([torch.randperm(C, generator=gen)[:K] for _ in range(N)])
    else:
        ids = lp.topk(K, -1).indices
    vals = lp.gather(1, ids)
    if pad:
        ids[::2, -1] = -1
        vals[::2, -1] = math.nan
    return SparseTeacher(ids.to(ids_dtype), vals.to(lp_dtype or t.dtype), normalize)


def _div_matrix():
    for C in (10, 100, 1000):
        for name in DIVERGENCES:
            for dtype in (torch.float32, torch.bfloat16, torch.float64):
                yield pytest.param(name, C, dtype, id=f"{name}-C{C}-{DT_ID[dtype]}")


# ---------------------------------------------------------------------------------------------
# divergences on dense teachers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,C,dtype", list(_div_matrix()))
def test_divergence_matches_reference(name, C, dtype, gen):
    s, t, y = make_inputs(gen, 6, C, dtype)
    spec = kdk.LogitDistill(temperature=2.0, divergence=DIVERGENCES[name])
    check(s, t, y, spec, dtype, f"cpu {name}")


@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_divergence_with_ce_softcap_and_standardize(name, dtype, gen):
    s, t, y = make_inputs(gen, 6, 100, dtype, scale=6.0)
    div = DIVERGENCES[name]
    for spec in (kdk.LogitDistill(temperature=2.0, divergence=div, ce_weight=0.5),
                 kdk.LogitDistill(temperature=1.5, divergence=div, softcap=SOFTCAP, ce_weight=0.5),
                 kdk.LogitDistill(temperature=2.0, divergence=div, standardize=True, softcap=SOFTCAP),
                 kdk.LogitDistill(temperature=2.0, divergence=div, teacher_topk_scale=kdk.TopKScale(k=2))):
        check(s, t, y, spec, dtype, f"cpu {name} {spec}")


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_student_close_to_teacher_bf16_gradient(name, gen):
    """s ≈ t in bf16: the gradient is formed in fp32 from log-probabilities (no cancellation of rounded
    probabilities), within 1e-2 of max|grad| of the float64 reference."""
    t = torch.randn(8, 1000, generator=gen, dtype=torch.float64) * 3
    s = (t + 1e-2 * torch.randn(8, 1000, generator=gen, dtype=torch.float64)).bfloat16()
    t = t.bfloat16()
    spec = kdk.LogitDistill(temperature=1.0, divergence=DIVERGENCES[name])
    spec = spec.replace(reduction="none")
    (_, g), (_, g_ref) = run(s, t, None, spec, "cpu"), reference64(s, t, None, spec)
    assert ((g.double() - g_ref).abs().max() / g_ref.abs().max()).item() <= 1e-2


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_float16(name, gen):
    """fp16 logits (the gradient is written in backward, with grad_output folded in): dense, top-k tail,
    sparse renorm with fp16-stored log-probabilities."""
    s, t, y = make_inputs(gen, 6, 100, torch.float16)
    spec = kdk.LogitDistill(temperature=2.0, divergence=DIVERGENCES[name], ce_weight=0.5)
    check(s, t, y, spec, torch.float16, f"fp16 {name}")
    check(s, t, y, spec.replace(teacher_topk=kdk.TopK(3, "tail")), torch.float16, f"fp16 topk {name}")
    check(s, sparse_teacher(gen, t, 5, "renorm"), y, spec, torch.float16, f"fp16 sparse {name}")


@pytest.mark.parametrize("launcher", ["cpu", "sim"])
def test_masked_student_classes_get_no_gradient(launcher, gen):
    """A student −inf where the teacher is finite: a constant (0 gradient there), yet its q·∂D/∂q still
    counts in Σqg; finite losses for the divergences that stay finite (reverse KL, jsd, tvd, skew)."""
    s, t, y = make_inputs(gen, 4, 30, torch.float64, masked=False)
    s[0, [3, 7]] = -math.inf
    s[2, 11] = -math.inf
    lp = torch.log_softmax(t, -1)
    ids = lp.topk(5, -1).indices
    s[3, ids[3, 1]] = -math.inf                     # inside a sparse / top-k support
    teacher = SparseTeacher(ids, lp.gather(1, ids), "renorm")
    sim = _sim(3) if launcher == "sim" else None
    for name in ("reverse_kl", "jsd", "tvd", "skew_kl", "skew_rkl"):
        spec = kdk.LogitDistill(temperature=2.0, divergence=DIVERGENCES[name], ce_weight=0.5)
        check(s, t, y, spec, torch.float64, f"masked {name}", sim)
        spec = spec.replace(teacher_topk=kdk.TopK(5, "tail"))
        check(s, t, y, spec, torch.float64, f"masked topk tail {name}", sim)
        if launcher == "cpu":
            check(s, teacher, y, spec.replace(teacher_topk=None), torch.float64, f"masked sparse {name}")


# ---------------------------------------------------------------------------------------------
# dense top-k teachers
# ---------------------------------------------------------------------------------------------
def _topk_cases():
    for norm in NORMS:
        for name in ("forward_kl", "jsd", "reverse_kl"):
            if norm == "teacher" and name != "forward_kl":
                continue
            for dtype in (torch.float32, torch.bfloat16, torch.float64):
                yield pytest.param(norm, name, dtype, id=f"{norm}-{name}-{DT_ID[dtype]}")


@pytest.mark.parametrize("norm,name,dtype", list(_topk_cases()))
def test_dense_topk_matches_reference(norm, name, dtype, gen):
    for C in (10, 100):
        s, t, y = make_inputs(gen, 6, C, dtype)
        for spec in (kdk.LogitDistill(temperature=2.0, divergence=DIVERGENCES[name], teacher_topk=kdk.TopK(3, norm)),
                     kdk.LogitDistill(temperature=1.5, divergence=DIVERGENCES[name], teacher_topk=kdk.TopK(3, norm),
                                      ce_weight=0.5, softcap=SOFTCAP)):
            check(s, t, y, spec, dtype, f"cpu topk {norm} {name}")


def test_dense_topk_ties_and_masked_support(gen):
    """Ties in the teacher go to the lower index; a support holding masked teacher classes (fewer finite
    teacher logits than k) and a student masked on the whole support (renorm: KD term 0, CE kept)."""
    s, t, y = make_inputs(gen, 4, 12, torch.float64, masked=False)
    t[0, [2, 5, 7, 9]] = 4.0                        # a 4-way tie for k = 3
    t[1, 3:] = -math.inf                            # 3 finite teacher logits ... then masked classes
    t[1, 0] = -math.inf
    top = t[2].topk(3).indices
    s[2, top] = -math.inf                           # student masked on the support
    for norm in NORMS:
        spec = kdk.LogitDistill(temperature=2.0, teacher_topk=kdk.TopK(3, norm), ce_weight=0.5)
        if norm != "renorm":
            s2 = s.clone()
            s2[2, top] = 0.0                        # (tail / teacher: a masked student on S is +inf)
        else:
            s2 = s
        check(s2, t, y, spec, torch.float64, f"ties {norm}")


# ---------------------------------------------------------------------------------------------
# sparse teachers
# ---------------------------------------------------------------------------------------------
def _sparse_cases():
    for norm in NORMS:
        for name in ("forward_kl", "jsd", "reverse_kl", "skew_rkl"):
            if norm == "teacher" and name != "forward_kl":
                continue
            for dtype in (torch.float32, torch.bfloat16, torch.float64):
                yield pytest.param(norm, name, dtype, id=f"{norm}-{name}-{DT_ID[dtype]}")


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("norm,name,dtype", list(_sparse_cases()))
def test_sparse_teacher_matches_reference(norm, name, dtype, launcher, gen):
    T = 1.0 if norm == "tail" else 2.0
    for C, spread, ids_dtype in ((10, False, torch.int64), (100, True, torch.int32), (1000, False, torch.int32)):
        s, t, y = make_inputs(gen, 6, C, dtype)
        teacher = sparse_teacher(gen, t, 5, norm, spread=spread, ids_dtype=ids_dtype)
        for spec in (kdk.LogitDistill(temperature=T, divergence=DIVERGENCES[name]),
                     kdk.LogitDistill(temperature=T, divergence=DIVERGENCES[name], ce_weight=0.5,
                                      softcap=(SOFTCAP[0], None))):
            check(s, teacher, y, spec, dtype, f"{launcher} sparse {norm} {name} C={C}", _launcher(launcher))


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("norm", NORMS)
def test_sparse_teacher_row_semantics(norm, launcher, gen):
    """An id ≥ C makes its row NaN (loss and gradient) unless the row is ignored; a row of padding only is
    0 for renorm / teacher (a fully masked teacher) and all tail mass for tail; the student's masked
    classes and an fp32 teacher under a bf16 student."""
    C, K = 20, 4
    s, t, y = make_inputs(gen, 5, C, torch.float64, masked=False)
    teacher = sparse_teacher(gen, t, K, norm, pad=False)
    ids = teacher.ids.clone()
    ids[0, 1] = C + 3          # bad id, valid row → NaN
    ids[1, 2] = C              # bad id, ignored row (make_inputs: y[1] = -100) → 0
    ids[3] = -1                # padding only
    teacher = SparseTeacher(ids, teacher.logprobs, norm)
    spec = kdk.LogitDistill(temperature=1.0, ce_weight=0.5, reduction="none")
    loss, grad = run_on(s, teacher, y, spec, _launcher(launcher))
    loss_r, grad_r = sparse_reference64(s, teacher, y, spec)
    assert torch.isnan(loss[0]) and torch.isnan(grad[0]).all()
    assert loss[1] == 0 and (grad[1] == 0).all()
    keep = torch.tensor([False, False, True, norm != "tail", True])
    assert_close((loss[keep], grad[keep]), (loss_r[keep], grad_r[keep]), torch.float64, f"sparse rows {norm}")
    if norm != "tail":
        assert loss[3] == 0 and (grad[3] == 0).all()
    else:  # all tail mass on both sides (S is empty): the KD term is 0, CE remains
        ce_only = run(s[3:4], t[3:4], y[3:4], spec.replace(kd_weight=0.0), "reference")
        torch.testing.assert_close((loss[3:4], grad[3:4]), ce_only, rtol=1e-12, atol=1e-14)
    # mixed dtypes: bf16 student, fp32 log-probabilities
    rows = [2, 4]
    s16 = s[rows].bfloat16()
    t32 = SparseTeacher(teacher.ids[rows], teacher.logprobs[rows].float(), norm)
    check(s16, t32, y[rows], spec, torch.bfloat16, "mixed", _launcher(launcher))


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_sparse_tail_at_the_teacher_mass_limits(launcher, gen):
    """Stored log-probabilities of (nearly) the whole vocabulary: one class missing (its mass is the tail),
    a mass slightly above 1 (p_tail clamped to 0; the student's complement is empty too), two missing."""
    C, K = 8, 8
    s = torch.randn(3, C, generator=gen, dtype=torch.float64)
    lp = torch.log_softmax(torch.randn(3, C, generator=gen, dtype=torch.float64), -1)
    ids = torch.arange(C).expand(3, C).clone()
    ids[0, -1] = -1
    lp[1] += 1e-9
    ids[2, [0, 3]] = -1
    teacher = SparseTeacher(ids, lp, "tail")
    for name in ("forward_kl", "jsd"):
        spec = kdk.LogitDistill(temperature=1.0, divergence=DIVERGENCES[name])
        check(s, teacher, None, spec, torch.float64, f"{launcher} tail limits {name}", _launcher(launcher))


# ---------------------------------------------------------------------------------------------
# reductions, N = 1, gradcheck, inplace
# ---------------------------------------------------------------------------------------------
def _llm_specs():
    L = kdk.LogitDistill
    return {
        "jsd_ce": L(temperature=2.0, divergence=DIVERGENCES["jsd"], ce_weight=0.5),
        "skew_rkl_cap": L(temperature=1.5, divergence=DIVERGENCES["skew_rkl"], softcap=SOFTCAP),
        "tvd_std": L(temperature=2.0, divergence=DIVERGENCES["tvd"], standardize=True),
        "topk_tail_rkl": L(temperature=2.0, divergence=DIVERGENCES["reverse_kl"], teacher_topk=kdk.TopK(3, "tail")),
        "topk_renorm_jsd": L(temperature=2.0, divergence=DIVERGENCES["jsd"], teacher_topk=kdk.TopK(3, "renorm"),
                             ce_weight=0.5),
        "topk_teacher_cap": L(temperature=2.0, teacher_topk=kdk.TopK(3, "teacher"), softcap=SOFTCAP),
    }


@pytest.mark.parametrize("reduction", ["sum", "batchmean", "none"])
def test_reductions_and_single_row(reduction, gen):
    s, t, y = make_inputs(gen, 5, 30, torch.float64)
    for name, spec in _llm_specs().items():
        spec = spec.replace(reduction=reduction, loss_weight=0.75)
        for n in (5, 1):
            a, b = s[-n:], t[-n:]
            got = kdk.logit_distill(a, b, y[-n:], spec, backend="cpu")
            want = kdk.logit_distill(a, b, y[-n:], spec, backend="reference")
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14, msg=f"{name} {reduction} N={n}")
    teacher = sparse_teacher(gen, t, 5, "tail")
    spec = kdk.LogitDistill(temperature=1.0, divergence=DIVERGENCES["jsd"], ce_weight=0.5, reduction=reduction)
    torch.testing.assert_close(kdk.logit_distill(s, teacher, y, spec, backend="cpu"),
                               kdk.logit_distill(s, teacher, y, spec, backend="reference"), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(_llm_specs()))
def test_gradcheck_dense(name, gen):
    s, t, y = make_inputs(gen, 3, 9, torch.float64, masked=False)
    spec = _llm_specs()[name]
    x = s.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: kdk.logit_distill(z, t, y, spec, backend="cpu"), (x,),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck_sparse(norm, gen):
    s, t, y = make_inputs(gen, 3, 9, torch.float64, masked=False)
    teacher = sparse_teacher(gen, t, 4, norm, spread=True)
    spec = kdk.LogitDistill(temperature=1.0 if norm == "tail" else 2.0, ce_weight=0.5,
                            divergence=DIVERGENCES["jsd" if norm != "teacher" else "forward_kl"])
    x = s.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: kdk.logit_distill(z, teacher, y, spec, backend="cpu"), (x,),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


def test_inplace_gradient_matches(gen):
    from kdkernels._cpp import cpu_launcher
    s, t, y = make_inputs(gen, 4, 50, torch.float32)
    teacher = sparse_teacher(gen, t, 5, "renorm")
    for spec, tt in ((_llm_specs()["skew_rkl_cap"], t), (_llm_specs()["topk_tail_rkl"], t),
                     (kdk.LogitDistill(temperature=2.0, divergence=DIVERGENCES["jsd"], softcap=(5.0, None)), teacher)):
        want = run_launcher(s, tt, y, spec, cpu_launcher)
        spec = spec.replace(reduction="none")
        packed = spec.packed((tt.normalize, tt.ids.shape[-1])) if isinstance(tt, SparseTeacher) else spec.packed()
        x = s.clone()
        loss, _ = cpu_launcher.forward(x, tt, y, None, packed, x, None)
        assert torch.equal(loss, want[0]) and torch.equal(x, want[1])


# ---------------------------------------------------------------------------------------------
# the CUDA engine's code path (block simulator)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["jsd", "tvd", "skew_kl", "skew_rkl", "reverse_kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_simulator_divergences(name, dtype, gen):
    s, t, y = make_inputs(gen, 5, 100, dtype)
    div = DIVERGENCES[name]
    for spec in (kdk.LogitDistill(temperature=2.0, divergence=div, ce_weight=0.5, softcap=SOFTCAP),
                 kdk.LogitDistill(temperature=2.0, divergence=div, standardize=True)):
        check(s, t, y, spec, dtype, f"sim {name}", _sim(4))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_simulator_dense_topk(norm, dtype, gen):
    s, t, y = make_inputs(gen, 5, 40, dtype)
    name = "forward_kl" if norm == "teacher" else "jsd"
    spec = kdk.LogitDistill(temperature=2.0, divergence=DIVERGENCES[name], teacher_topk=kdk.TopK(3, norm),
                            ce_weight=0.5, softcap=SOFTCAP)
    for lanes in (4, 32):
        check(s, t, y, spec, dtype, f"sim topk {norm} lanes={lanes}", _sim(lanes))


def test_simulator_gradient_is_the_derivative(gen):
    """The simulated launch's batchmean gradient (softcap + top-k tail + jsd) against its own central
    differences."""
    spec = kdk.LogitDistill(temperature=2.0, divergence=DIVERGENCES["jsd"], teacher_topk=kdk.TopK(2, "tail"),
                            softcap=SOFTCAP, ce_weight=0.3, loss_weight=0.75).packed()
    s, t, y = make_inputs(gen, 3, 7, torch.float64, masked=False)
    y[1] = -100
    sim = _sim(3)
    grad = torch.empty_like(s)
    sim.forward(s, t, y, None, spec, grad, None)
    eps, fd = 1e-6, torch.zeros_like(s)
    for n in range(3):
        for c in range(7):
            hi, lo = s.clone(), s.clone()
            hi[n, c] += eps
            lo[n, c] -= eps
            fd[n, c] = (sim.forward(hi, t, y, None, spec, None, None)[0]
                        - sim.forward(lo, t, y, None, spec, None, None)[0]) / (2 * eps)
    assert (grad - fd).abs().max() <= 1e-6 * max(1.0, fd.abs().max().item())


@pytest.mark.parametrize("lanes", [1, 3, 32])
def test_simulator_sparse_lanes_and_support_sizes(lanes, gen):
    """The block's slot sort and column search at 1 (serial), 3 (uneven) and 32 lanes: K = 1, K = 5 with
    int32 ids, K = C (every class stored, all valid), on rows several times longer than the block (each
    lane visits many columns); each normalisation, with CE + softcap, in fp32 against the reference."""
    T = {"renorm": 2.0, "tail": 1.0, "teacher": 2.0}
    for C, K, ids_dtype in ((200, 1, torch.int64), (200, 5, torch.int32), (64, 64, torch.int64),
                            (1030, MAX_SPARSE_K, torch.int32)):
        s, t, y = make_inputs(gen, 3, C, torch.float32)
        for norm in NORMS:
            teacher = sparse_teacher(gen, t, K, norm, spread=True, pad=1 < K < C, ids_dtype=ids_dtype)
            spec = kdk.LogitDistill(temperature=T[norm], ce_weight=0.5, softcap=(SOFTCAP[0], None),
                                    divergence=DIVERGENCES["jsd" if norm != "teacher" else "forward_kl"])
            check(s, teacher, y, spec, torch.float32, f"sim lanes={lanes} {norm} C={C} K={K}", _sim(lanes))


def test_simulator_sparse_duplicates_and_slot_order(gen):
    """Ids in any slot order (the sort is by id, ties by slot) give the same numbers; a duplicate id (invalid
    input) resolves as in the CPU twin: the last slot's log-probability wins (the reference, which treats
    each slot as an outcome, is not the yardstick for it)."""
    C, K = 40, 6
    s, t, y = make_inputs(gen, 4, C, torch.float64, masked=False)
    for norm in NORMS:
        teacher = sparse_teacher(gen, t, K, norm, spread=True)
        perm = torch.randperm(K, generator=gen)
        shuffled = SparseTeacher(teacher.ids[:, perm], teacher.logprobs[:, perm], norm)
        spec = kdk.LogitDistill(temperature=1.0, ce_weight=0.5)
        want = run_on(s, teacher, y, spec, _sim(3))
        got = run_on(s, shuffled, y, spec, _sim(3))
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
        ids = teacher.ids.clone()
        ids[:, 3] = ids[:, 1]  # slot 3 repeats slot 1's id (row 0's last slot stays padding)
        dup = SparseTeacher(ids, teacher.logprobs, norm)
        cpu, sim = run_on(s, dup, y, spec, None), run_on(s, dup, y, spec, _sim(3))
        torch.testing.assert_close(sim, cpu, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("reduction", ["sum", "batchmean"])
def test_simulator_sparse_reductions(reduction, gen):
    """The sparse launch's scalar (the last block's fixed-order sum; batchmean's count skips the ignored
    row) and its gradient, against the reference, for bf16 logits with fp32 log-probabilities and fp64."""
    for dtype in (torch.float64, torch.bfloat16):
        s, t, y = make_inputs(gen, 5, 30, dtype)
        teacher = sparse_teacher(gen, t, 5, "renorm", lp_dtype=torch.float32)
        spec = kdk.LogitDistill(temperature=2.0, divergence=DIVERGENCES["reverse_kl"], ce_weight=0.5,
                                softcap=(SOFTCAP[0], None), reduction=reduction, loss_weight=0.75)
        grad = torch.empty_like(s)
        loss, _ = _sim(4).forward(s, teacher, y, None, spec.packed(("renorm", 5)), grad, None)
        assert_close((loss, grad), sparse_reference64(s, teacher, y, spec), dtype, f"sim sparse {reduction}")


# ---------------------------------------------------------------------------------------------
# the op: opcheck with teacher_ids, parameter-block checks
# ---------------------------------------------------------------------------------------------
def _sparse_op_args(gen, spec, K=4, ids_dtype=torch.int64):
    from kdkernels._cpp import _op_args
    s, t, y = make_inputs(gen, 5, 12, torch.float32, masked=False)
    teacher = sparse_teacher(gen, t, K, "renorm", ids_dtype=ids_dtype)
    packed = spec.packed((teacher.normalize, K))
    return (*_op_args(s, teacher, y, None, packed, torch.empty_like(s), None), teacher.ids)


def test_opcheck_sparse_and_llm_specs(gen):
    op = torch.ops.kdkernels.logit_distill_fwd.default
    for spec, ids_dtype in ((kdk.LogitDistill(temperature=2.0, reduction="none"), torch.int64),
                            (kdk.LogitDistill(divergence=kdk.JSD(0.3), ce_weight=0.5), torch.int32)):
        torch.library.opcheck(op, _sparse_op_args(gen, spec, ids_dtype=ids_dtype))
    from kdkernels._cpp import _op_args
    s, t, y = make_inputs(gen, 5, 12, torch.float32, masked=False)
    for spec in _llm_specs().values():
        torch.library.opcheck(op, _op_args(s, t, y, None, spec, torch.empty_like(s), torch.full((5,), 0.5)))


def test_op_rejects_inconsistent_llm_blocks(gen):
    from kdkernels._cpp import _op_args
    s, t, y = make_inputs(gen, 3, 12, torch.float32, masked=False)
    op = torch.ops.kdkernels.logit_distill_fwd
    args = list(_sparse_op_args(gen, kdk.LogitDistill()))
    with pytest.raises(RuntimeError, match="exactly when topk_mode == 2"):
        op(args[0], args[0], *args[2:-1], None)  # a sparse block without ids
    dense = list(_op_args(s, t, y, None, kdk.LogitDistill(), None, None))
    with pytest.raises(RuntimeError, match="exactly when topk_mode == 2"):
        op(*dense, torch.zeros(3, 12, dtype=torch.long))
    args[-1] = args[-1][:, :3]  # K differs from topk_k
    args[1] = args[1][:, :3]
    with pytest.raises(RuntimeError, match="must be the sparse teacher's K"):
        op(*args)
