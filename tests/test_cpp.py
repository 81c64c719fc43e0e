"""The C++ backends (csrc/): the CPU twin (``backend="cpu"``), the CUDA engine's code path run on the host
by the block simulator, the torch.library ops, the parameter-layout mirror and the CUDA compile check.

* parity: every preset × {fp32, fp64, bf16} × C ∈ {3, 10, 100, 1000} with an ignored row, a bad-label row
  (NaN loss and gradient), masked (−inf) classes, against ``kdkernels.reference`` in float64;
* the same matrix through ``SimulatedCudaLauncher`` (the CUDA launch's code: kd_row.h with the CUDA
  StreamView, or the two-pass plain-KD specialisation kd_row_kd.h, on a simulated multi-lane block, then
  the last block's reduction), so the CUDA kernels' logic is tested where no GPU exists;
* float64 gradcheck through ``kdk.logit_distill(..., backend="cpu")`` for every preset, the learnable
  temperature, N = 1, an all-ignored batch, inplace, opcheck, torch.compile; the ops' version bumps
  (Tensor(a!)) and mixed student/teacher dtypes;
* ``nvcc -c`` of the CUDA sources for sm_80 and sm_90 (skipped only where nvcc is absent);
* GPU-marked: the matrix and gradcheck for ``backend="cuda"``.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import kdkernels as kdk
from kdkernels import spec as spec_mod
from kdkernels.dispatch import unavailable_reason
from kdkernels.engine import fused_logit_distill

ROOT = Path(__file__).resolve().parents[1]
CPU_REASON = unavailable_reason("cpu", torch.device("cpu"))
needs_cpp = pytest.mark.skipif(CPU_REASON is not None, reason=f"C++ CPU backend unavailable: {CPU_REASON}")

DT_ID = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16"}
#: (loss, gradient, floor) tolerance vs. the float64 reference: |Δloss_n| ≤ tol·(|ref_n| + floor·max|ref|),
#: max|Δgrad| ≤ tol·max|grad_ref|. The floor covers rows whose KL is a small difference of O(1) terms
#: (ill-conditioned in float32 for any implementation, the float32 reference included).
TOL = {torch.float64: (1e-10, 1e-10, 1e-3), torch.float32: (1e-5, 1e-5, 1e-2), torch.bfloat16: (2e-2, 2e-2, 1e-2)}


@pytest.fixture(autouse=True)
def _repeatable_backward():
    """gradcheck differentiates each graph many times: keep the logits (an opt-in of the Function)."""
    with kdk.repeatable_backward():
        yield


def presets(C: int) -> dict:
    """name → LogitDistill for every method and the main option combinations, k adapted to C."""
    k_rel = min(4, C - 1)
    k_tsm = min(3, C - 1)
    k_tdl = min(3, (C - 1) // 2)
    L = kdk.LogitDistill
    return {
        "kd": L(temperature=3.0),
        "kd_ce": L(temperature=3.0, ce_weight=0.5),
        "kd_std": L(temperature=2.0, standardize=True),
        "kd_tsm": L(temperature=3.0, teacher_topk_scale=kdk.TopKScale(k=k_tsm)),
        "kd_row_T": L(temperature=torch.linspace(1.5, 4.0, 6, dtype=torch.float64)),  # sized per test
        "dkd": L(kd_weight=0.0, decoupled=kdk.Decoupled(1.0, 8.0)),
        "aekt": L(kd_weight=0.0, decoupled=kdk.Decoupled(1.0, 8.0, adaptive=True, max_weight=2.0)),
        "dtkd": L(temperature=4.0, kd_weight=1.0, dtkd_weight=3.0),
        "ldrld": L(kd_weight=0.0, relation=kdk.RankRelation(k=k_rel)),
        "ldrld_teacher": L(kd_weight=0.0, relation=kdk.RankRelation(k=k_rel, rank_by="teacher")),
        "topkd": L(teacher_topk_scale=kdk.TopKScale(k=k_tdl), tdl=kdk.TopKDecoupled(k=k_tdl, weight=1.5, neg=0.5)),
        # combinations: every transform with every term family
        "dkd_std_tsm_ce": L(temperature=2.0, kd_weight=0.0, standardize=True, ce_weight=0.3,
                            teacher_topk_scale=kdk.TopKScale(k=k_tsm, scale=0.7), decoupled=kdk.Decoupled(1.0, 2.0)),
        "dtkd_std": L(temperature=2.0, kd_weight=1.0, dtkd_weight=3.0, standardize=True),
        "ldrld_std_tsm": L(temperature=2.0, kd_weight=0.0, standardize=True, teacher_topk_scale=kdk.TopKScale(k=k_tsm),
                           relation=kdk.RankRelation(k=k_rel, rank_by="teacher")),
    }


def fit(spec: kdk.LogitDistill, N: int, dtype=torch.float64) -> kdk.LogitDistill:
    """The spec with a per-row temperature resized to N rows."""
    if isinstance(spec.temperature, torch.Tensor):
        return spec.replace(temperature=torch.linspace(1.5, 4.0, N, dtype=dtype))
    return spec


def gradcheck_spec(spec: kdk.LogitDistill) -> kdk.LogitDistill:
    """AEKT's weight min(p_y/q_y, w_max) carries no gradient by definition: gradcheck it where the weight
    is clamped (a constant), so finite differences see the same function."""
    dec = spec.decoupled
    if dec is not None and dec.adaptive:
        return spec.replace(decoupled=kdk.Decoupled(dec.alpha, dec.beta, adaptive=True, max_weight=1e-3))
    return spec


def make_inputs(gen, N, C, dtype, *, ignore=True, bad=True, masked=True):
    """s, t [N, C] (dtype) and labels: row 1 ignored, row 2 a bad label, two masked classes (−inf in s and
    t, the lowest of their row, never a label) in rows 0 and 3 when C ≥ 10."""
    s = torch.randn(N, C, generator=gen, dtype=torch.float64) * 3
    t = torch.randn(N, C, generator=gen, dtype=torch.float64) * 3
    y = torch.randint(0, C, (N,), generator=gen)
    if masked and C >= 10:
        for n in (0, 3):
            if n < N:
                low = [int(j) for j in torch.argsort(s[n] + t[n]) if int(j) != int(y[n])][:2]
                s[n, low] = t[n, low] = -math.inf
    if ignore and N >= 3:
        y[1] = -100
    if bad and N >= 4:
        y[2] = C + 5 if C % 2 else -7
    return s.to(dtype), t.to(dtype), y


def run(s, t, y, spec, backend=None, launcher=None):
    """(per-row losses, gradient) on a fresh leaf copy of s, through the public API, or a launcher's
    contract-2 forward (reduction none, the gradient written into a fresh buffer)."""
    spec = spec.replace(reduction="none")
    if launcher is not None:
        T = spec.temperature.to(s.device) if isinstance(spec.temperature, torch.Tensor) else None
        grad = torch.empty_like(s)
        loss, _ = launcher.forward(s, t, y, None if T is None else T.detach(), spec.packed(), grad, None)
        return loss, grad
    x = s.detach().clone().requires_grad_(True)
    loss = kdk.logit_distill(x, t, y, spec, backend=backend)
    grad, = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def reference64(s, t, y, spec):
    """(loss, grad) of the reference in float64 on the same inputs, plus, for 16/32-bit inputs, how far the
    reference's own float32 evaluation is from it (ill-conditioned rows widen the tolerance by 4× that)."""
    s, t, y = s.cpu(), t.cpu(), None if y is None else y.cpu()
    loss, grad = run(s.double(), t.double(), y, fit(spec, s.shape[0]), "reference")
    if s.dtype == torch.float64:
        return loss, grad, torch.zeros_like(loss), 0.0
    spec32 = fit(spec, s.shape[0], torch.float32)
    loss32, grad32 = run(s.float(), t.float(), y, spec32, "reference")
    return loss, grad, (loss32.double() - loss).abs(), (grad32.double() - grad).abs().nan_to_num().max().item()


def assert_parity(got, ref, y, C, dtype, what):
    loss, grad = got[0].double().cpu(), got[1].double().cpu()
    loss_r, grad_r, slack_l, slack_g = ref
    tol_l, tol_g, floor = TOL[dtype]
    bad = torch.zeros(loss.shape[0], dtype=torch.bool) if y is None else (y.cpu() != -100) & ((y.cpu() < 0) | (y.cpu() >= C))
    ignored = torch.zeros_like(bad) if y is None else y.cpu() == -100
    assert torch.isnan(loss[bad]).all() and torch.isnan(grad[bad]).all(), f"{what}: bad-label rows must be NaN"
    assert (loss[ignored] == 0).all() and (grad[ignored] == 0).all(), f"{what}: ignored rows must be 0"
    ok = ~bad
    assert torch.isfinite(loss[ok]).all() and torch.isfinite(grad[ok]).all(), f"{what}: non-finite values"
    scale = loss_r[ok].abs().max().clamp(min=1e-30)
    excess = (loss[ok] - loss_r[ok]).abs() - 4 * slack_l[ok]
    err = (excess / (loss_r[ok].abs() + floor * scale)).max().item()
    assert err <= tol_l, f"{what}: loss rel err {err:.3e} > {tol_l}"
    gscale = grad_r[ok].abs().max().clamp(min=1e-30)
    gerr = (((grad[ok] - grad_r[ok]).abs().max() - 4 * slack_g) / gscale).item()
    assert gerr <= tol_g, f"{what}: grad err {gerr:.3e} (of max|grad|) > {tol_g}"


def _matrix(Cs=(3, 10, 100, 1000), dtypes=(torch.float32, torch.float64, torch.bfloat16)):
    for C in Cs:
        for name in presets(C):
            for dtype in dtypes:
                yield pytest.param(C, name, dtype, id=f"C{C}-{name}-{DT_ID[dtype]}")


# ---------------------------------------------------------------------------------------------
# the CPU twin against the float64 reference
# ---------------------------------------------------------------------------------------------
@needs_cpp
@pytest.mark.parametrize("C,name,dtype", list(_matrix()))
def test_cpu_matches_reference(C, name, dtype, gen):
    N = 6 if C < 1000 else 4
    s, t, y = make_inputs(gen, N, C, dtype)
    spec = fit(presets(C)[name], N, torch.float64 if dtype == torch.float64 else torch.float32)
    assert_parity(run(s, t, y, spec, "cpu"), reference64(s, t, y, spec), y, C, dtype, f"cpu {name}")


@needs_cpp
@pytest.mark.parametrize("name", list(presets(10)))
def test_cpu_single_row_and_all_ignored(name, gen):
    spec = presets(10)[name]
    s, t, y = make_inputs(gen, 1, 10, torch.float64)
    assert_parity(run(s, t, y, fit(spec, 1), "cpu"), reference64(s, t, y, spec), y, 10, torch.float64, name)
    s, t, _ = make_inputs(gen, 3, 10, torch.float64)
    y = torch.full((3,), -100)
    for reduction in ("batchmean", "sum", "none"):
        x = s.clone().requires_grad_()
        loss = kdk.logit_distill(x, t, y, fit(spec, 3).replace(reduction=reduction), backend="cpu")
        g, = torch.autograd.grad(loss.sum(), x)
        assert (loss == 0).all() and (g == 0).all(), (name, reduction)


@needs_cpp
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_cpu_reductions(reduction, gen):
    """batchmean's in-launch count and 1/#valid (in the accumulation dtype: float64 exact) and sum."""
    s, t, y = make_inputs(gen, 6, 50, torch.float64, bad=False)
    for name, spec in presets(50).items():
        spec = fit(spec, 6).replace(reduction=reduction)
        out = []
        for backend in ("reference", "cpu"):
            x = s.clone().requires_grad_()
            loss = kdk.logit_distill(x, t, y, spec, backend=backend)
            out.append((loss.detach(), torch.autograd.grad(loss, x)[0]))
        tol = 1e-12
        assert abs(out[0][0] - out[1][0]) <= tol * abs(out[0][0]), name
        assert (out[0][1] - out[1][1]).abs().max() <= tol * out[0][1].abs().max(), name


@needs_cpp
@pytest.mark.parametrize("name", list(presets(7)))
def test_cpu_gradcheck(name, gen):
    """float64 gradcheck through the public entry point (the Function recomputes on a second backward)."""
    spec = gradcheck_spec(fit(presets(7)[name], 3))
    s, t, y = make_inputs(gen, 3, 7, torch.float64, bad=False, masked=False)
    x = s.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: kdk.logit_distill(z, t, y, spec, backend="cpu"), (x,),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


@needs_cpp
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_learnable_temperature(per_row, dtype, gen):
    """CTKD-style learnable T (scalar or per row): ∂ℓ/∂T and ∂ℓ/∂s against the reference, masked classes in."""
    N, C = 5, 40
    s, t, y = make_inputs(gen, N, C, dtype, bad=False)
    T0 = torch.linspace(2.0, 4.0, N, dtype=torch.float64) if per_row else torch.tensor(3.0, dtype=torch.float64)
    out = []
    for backend, cast in (("reference", torch.float64), ("cpu", dtype)):
        T = T0.to(cast).requires_grad_()
        x = s.to(cast).clone().requires_grad_()
        loss = kdk.kd_loss(x, t.to(cast), T, labels=y, ce_weight=0.2, backend=backend)
        out.append([v.double() for v in torch.autograd.grad(loss, (x, T))])
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for got, ref, what in zip(out[1], out[0], ("grad s", "grad T")):
        assert (got - ref).abs().max() <= tol * ref.abs().max(), what
    if dtype == torch.float64:
        T = T0.clone().requires_grad_()
        x = s.clone()[:, :12].contiguous().requires_grad_()
        y12 = torch.where(y >= 0, y % 12, y)
        assert torch.autograd.gradcheck(
            lambda a, b: kdk.kd_loss(a, t[:, :12], b, labels=y12, standardize=True, backend="cpu"), (x, T),
            eps=1e-6, atol=1e-7, rtol=1e-5)


@needs_cpp
def test_cpu_inplace_gradient(gen):
    s, t, y = make_inputs(gen, 4, 30, torch.float32, bad=False)
    ref = run(s, t, y, presets(30)["dkd"], "cpu")[1]
    x = s.clone().requires_grad_()
    loss = kdk.dkd_loss(x, t, y, reduction="sum", inplace=True, backend="cpu")
    g, = torch.autograd.grad(loss, x)
    assert torch.equal(g, ref)


@needs_cpp
def test_cpu_confident_student_stays_finite():
    """DKD with s_y/T ≫ the rest (mdistiller's log(1 − q_y) overflows): restricted LSEs keep it finite."""
    s = torch.tensor([[400.0, 0.0, -1.0, 2.0], [0.0, 300.0, 1.0, -2.0]])
    t = torch.tensor([[3.0, 1.0, 0.0, 2.0], [0.0, 2.0, 1.0, -1.0]])
    y = torch.tensor([0, 1])
    for dtype in (torch.float32, torch.float64):
        got = run(s.to(dtype), t.to(dtype), y, presets(4)["dkd"], "cpu")
        assert_parity(got, reference64(s, t, y, presets(4)["dkd"]), y, 4, dtype, "confident dkd")


def test_params_layout_matches_spec():
    """csrc/kd_params.h lists the flat fields in spec.FLOAT_FIELDS / INT_FIELDS order."""
    text = (ROOT / "csrc" / "kd_params.h").read_text()

    def fields(macro):
        body = re.search(rf"#define {macro}\(X\)(.*?)(?:\n\s*\n|#define|// clang-format on)", text, re.S).group(1)
        return tuple(re.findall(r"X\((\w+)\)", body))

    assert fields("KD_FLOAT_FIELDS") == spec_mod.FLOAT_FIELDS
    assert fields("KD_INT_FIELDS") == spec_mod.INT_FIELDS


@needs_cpp
def test_ops_reject_bad_parameter_blocks():
    s = torch.randn(3, 5)
    floats, ints = kdk.LogitDistill(relation=kdk.RankRelation(k=4)).pack()
    with pytest.raises(RuntimeError, match="parameter block"):
        torch.ops.kdkernels.logit_distill_fwd(s, s, None, None, floats[:-1], ints, None, None, False)
    bad = list(ints)
    bad[spec_mod.INT_FIELDS.index("rel_k")] = 9  # > C - 1
    with pytest.raises(RuntimeError, match="ldrld k"):
        torch.ops.kdkernels.logit_distill_fwd(s, s, None, None, floats, bad, None, None, False)
    bad = list(ints)
    bad[spec_mod.INT_FIELDS.index("reduction")] = 3
    with pytest.raises(RuntimeError, match="reduction code"):
        torch.ops.kdkernels.logit_distill_fwd(s, s, None, None, floats, bad, None, None, False)


@needs_cpp
def test_op_writes_bump_the_version_counter(gen):
    """Tensor(a!) semantics: the fused op and scale_rows_ bump the version of the tensor they write, so
    an op that saved it (here (s·s).sum() on the same logits) raises in backward instead of reading the
    gradient as logits (issue 9, defect 2)."""
    from kdkernels._cpp import cpu_launcher
    x = torch.randn(3, 12, generator=gen, requires_grad=True)
    t = torch.randn(3, 12, generator=gen)
    s = x * 1.0
    other = (s * s).sum()
    with torch.no_grad():
        cpu_launcher.forward(s, t, None, None, kdk.LogitDistill().packed(), s, None)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        other.backward()
    s = x * 1.0
    other = (s * s).sum()
    v = s._version
    with torch.no_grad():
        cpu_launcher.scale_(s, torch.full((3,), 2.0))
    assert s._version > v
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        other.backward()


@needs_cpp
def test_mixed_dtypes_cpu_any_pair_simulator_refuses_float64_mix(gen):
    """The CPU twin loads s and t in their own dtypes (float64 student + float32 teacher: float64 math on
    the teacher's values); the CUDA engine (simulated) pairs float64 only with float64, with a clear error."""
    from kdkernels._cpp import cpu_launcher
    s = torch.randn(3, 9, generator=gen, dtype=torch.float64)
    t = torch.randn(3, 9, generator=gen).float()
    spec = kdk.LogitDistill(reduction="none").packed()
    got = cpu_launcher.forward(s, t, None, None, spec, None, None)[0]
    ref = cpu_launcher.forward(s, t.double(), None, None, spec, None, None)[0]
    assert got.dtype == torch.float64 and torch.equal(got, ref)
    with pytest.raises(RuntimeError, match="float64 logits only with float64 on both sides"):
        _sim(2).forward(s, t, None, None, spec, None, None)


# ---------------------------------------------------------------------------------------------
# the CUDA engine's code path, simulated on the host (no GPU needed)
# ---------------------------------------------------------------------------------------------
def _sim(lanes):
    from kdkernels._cpp import SimulatedCudaLauncher
    return SimulatedCudaLauncher(lanes)


@needs_cpp
@pytest.mark.parametrize("C,name,dtype", list(_matrix(Cs=(3, 10, 100), dtypes=(torch.float32, torch.float64,
                                                                                 torch.bfloat16))))
def test_cuda_path_simulated(C, name, dtype, gen):
    """kd_row.h as the CUDA kernel runs it (StreamView, 4 lanes: strided columns, block reductions, merged
    per-lane top-k lists, recomputed gradient), against the float64 reference."""
    N = 6
    s, t, y = make_inputs(gen, N, C, dtype)
    spec = fit(presets(C)[name], N, torch.float64 if dtype == torch.float64 else torch.float32)
    assert_parity(run(s, t, y, spec, launcher=_sim(4)), reference64(s, t, y, spec), y, C, dtype, f"sim {name}")


@needs_cpp
@pytest.mark.parametrize("engine", ["cpu", "sim"])
def test_topk_sets_with_ties_and_masked_classes(engine, gen):
    """Integer logits (ties across every set's worst member), masked classes, a constant teacher row; TDL
    with C = 2k + 1 takes masked classes into Neg before it would take a Pos class (never)."""
    C = 11
    s = torch.randint(-3, 4, (5, C), generator=gen).double()
    t = torch.randint(-2, 3, (5, C), generator=gen).double()
    s[0, 3] = t[0, 3] = float("-inf")
    s[1, 5] = t[1, 5] = s[1, 7] = t[1, 7] = float("-inf")
    t[2] = 1.0
    y = torch.tensor([0, 1, 2, 4, 6])
    specs = {"ldrld": kdk.LogitDistill(kd_weight=0.5, relation=kdk.RankRelation(k=4)),
             "topkd": kdk.LogitDistill(teacher_topk_scale=kdk.TopKScale(k=3), tdl=kdk.TopKDecoupled(k=3)),
             "tdl_k5": kdk.LogitDistill(tdl=kdk.TopKDecoupled(k=5), ce_weight=0.5)}
    for name, spec in specs.items():
        got = run(s, t, y, spec, backend="cpu") if engine == "cpu" else run(s, t, y, spec, launcher=_sim(4))
        want = run(s, t, y, spec, backend="reference")
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=0, msg=name)
        torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-14, msg=name)


@needs_cpp
@pytest.mark.parametrize("name", ["kd_std", "dtkd", "ldrld_std_tsm", "topkd", "dkd_std_tsm_ce"])
def test_cuda_path_simulated_warp_sized_block(name, gen):
    """32 lanes over C = 40: most lanes hold one or two columns, top-k heads come from many lanes."""
    s, t, y = make_inputs(gen, 4, 40, torch.float64)
    spec = presets(40)[name]
    assert_parity(run(s, t, y, spec, launcher=_sim(32)), reference64(s, t, y, spec), y, 40, torch.float64, name)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("C", [7, 40, 129])
def test_cuda_path_simulated_two_pass_kd(C, dtype, gen):
    """Plain-KD specs take the two-pass, vector-load specialisation (kd_row_kd.h) on rows aligned for
    16-byte chunks and the general engine otherwise (a view starting one column in): both match the
    reference, vector tails (C not a multiple of the chunk) and masked, ignored, bad rows included."""
    N, width = 5, (C + 1 + 7) // 8 * 8  # row stride: a multiple of every chunk width
    s, t, y = make_inputs(gen, N, width, dtype)
    y = torch.where((y >= 0) & (y < C), y, y.clamp(max=C + 5))
    for name in ("kd", "kd_ce", "kd_row_T"):
        spec = fit(presets(C)[name], N, torch.float64 if dtype == torch.float64 else torch.float32)
        T = spec.temperature.detach() if isinstance(spec.temperature, torch.Tensor) else None
        for what, cols in {"aligned": slice(0, C), "misaligned": slice(1, C + 1)}.items():
            a, b = s[:, cols], t[:, cols]
            grad = torch.full((N, width), math.nan, dtype=dtype)[:, cols]
            loss, _ = _sim(4).forward(a, b, y, T, spec.replace(reduction="none").packed(), grad, None)
            assert_parity((loss, grad), reference64(a, b, y, spec), y, C, dtype, f"{name} {what}")


@needs_cpp
@pytest.mark.parametrize("name", ["kd", "kd_ce", "kd_std", "dtkd", "ldrld", "topkd", "dkd_std_tsm_ce", "aekt"])
def test_cuda_path_simulated_gradient_is_the_derivative(name, gen):
    """The simulated CUDA launch's gradient of the batchmean loss against central differences of its own
    loss (float64): the gradient, the in-launch count and the last block's reduction agree."""
    spec = gradcheck_spec(presets(7)[name]).replace(loss_weight=0.75).packed()
    s, t, y = make_inputs(gen, 3, 7, torch.float64, bad=False, masked=False)
    y[1] = -100
    sim = _sim(3)
    grad = torch.empty_like(s)
    sim.forward(s, t, y, None, spec, grad, None)
    eps = 1e-6
    fd = torch.zeros_like(s)
    for n in range(3):
        for c in range(7):
            hi, lo = s.clone(), s.clone()
            hi[n, c] += eps
            lo[n, c] -= eps
            fd[n, c] = (sim.forward(hi, t, y, None, spec, None, None)[0]
                        - sim.forward(lo, t, y, None, spec, None, None)[0]) / (2 * eps)
    assert (grad - fd).abs().max() <= 1e-6 * max(1.0, fd.abs().max().item())
    x = s.clone().requires_grad_()  # and through the autograd Function (repeatable_backward: autouse fixture)
    assert torch.autograd.gradcheck(lambda z: fused_logit_distill(z, t, y, None, spec, sim), (x,),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------
def _op_cases():
    from kdkernels._cpp import _op_args
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 12, generator=g), torch.randn(5, 12, generator=g)
    y = torch.tensor([3, -100, 0, 11, 7])
    specs = [
        (kdk.LogitDistill(temperature=2.0, reduction="none"), None, None, torch.full((5,), 0.5)),
        (kdk.LogitDistill(kd_weight=0.0, standardize=True, ce_weight=0.3, decoupled=kdk.Decoupled(),
                          reduction="none", loss_weight=2.0), y, None, torch.full((5,), 0.25)),
        (kdk.LogitDistill(temperature=torch.tensor(2.0, requires_grad=True)), y, torch.full((5,), 2.0), None),
        (kdk.LogitDistill(relation=kdk.RankRelation(k=3), tdl=kdk.TopKDecoupled(k=2), dtkd_weight=1.0), y, None,
         None),
    ]
    for spec, labels, T, factor in specs:
        yield _op_args(s, t, labels, T, spec, torch.empty_like(s), factor)
    for reduction in ("sum", "batchmean"):
        yield _op_args(s, t, y, None, specs[1][0].replace(reduction=reduction), torch.empty_like(s),
                       torch.tensor(0.5).expand(5))
    yield _op_args(s, t, y, None, specs[1][0], None, None)  # forward only
    yield _op_args(s.bfloat16(), t, y, None, specs[0][0], torch.empty_like(s.bfloat16()), None)  # mixed dtypes


@needs_cpp
def test_opcheck_logit_distill_fwd():
    for args in _op_cases():
        torch.library.opcheck(torch.ops.kdkernels.logit_distill_fwd.default, args)
    args = next(iter(_op_cases()))
    torch.library.opcheck(torch.ops.kdkernels._logit_distill_fwd_sim.default, (*args, 2))


@needs_cpp
def test_opcheck_logit_distill_loss():
    """The op with its C++ autograd node (csrc/autograd.cpp): schema, fake kernel, autograd registration."""
    for s, t, labels, T, floats, ints, grad, _, _ in _op_cases():
        if grad is None or T is not None:
            continue
        x = s.detach().clone().requires_grad_(s.dtype != torch.bfloat16)
        torch.library.opcheck(torch.ops.kdkernels.logit_distill_loss.default, (x, t, labels, None, floats, ints, None))


@needs_cpp
def test_opcheck_scale_rows():
    g = torch.randn(4, 9)
    for factor in (torch.tensor([1.0, 2.0, 1.0, 0.5]), torch.tensor(3.0, dtype=torch.float64).expand(4)):
        torch.library.opcheck(torch.ops.kdkernels.scale_rows_.default, (g.clone(), factor))
    x = torch.randn(4, 9)
    ref = x.clone()
    torch.ops.kdkernels.scale_rows_(x, torch.tensor([1.0, 2.0, 1.0, -1.0]))
    assert torch.equal(x[0], ref[0]) and torch.equal(x[1], 2 * ref[1]) and torch.equal(x[3], -ref[3])


@needs_cpp
def test_torch_compile_fullgraph(gen):
    s, t, y = make_inputs(gen, 4, 20, torch.float32, bad=False)

    def f(x):
        return kdk.dkd_loss(x, t, y, standardize=True, ce_weight=0.1, backend="cpu")

    x1, x2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    loss = torch.compile(f, backend="aot_eager", fullgraph=True)(x1)
    g, = torch.autograd.grad(loss, x1)
    ref = f(x2)
    g_ref, = torch.autograd.grad(ref, x2)
    assert torch.allclose(loss, ref) and torch.allclose(g, g_ref)


# ---------------------------------------------------------------------------------------------
# the CUDA sources compile without a CUDA torch (nvcc -c, sm_80 and sm_90)
# ---------------------------------------------------------------------------------------------
NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                if os.environ.get("CUDA_HOME") else None)
needs_nvcc = pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC), reason="nvcc not found (set CUDA_HOME)")
ARCHS = ("sm_80", "sm_90")


@pytest.fixture(scope="module")
def nvcc_builds(tmp_path_factory):
    """Both architectures compiled concurrently (~25-60 s each)."""
    out = tmp_path_factory.mktemp("nvcc")
    procs = {arch: subprocess.Popen(
        [NVCC, "-c", "-std=c++17", "-O3", f"-arch={arch}", f"-I{ROOT / 'csrc'}",
         str(ROOT / "csrc" / "cuda" / "kd_kernels.cu"), "-o", str(out / f"kd_{arch}.o")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for arch in ARCHS}
    return {arch: (p.wait(timeout=900), p.stdout.read()) for arch, p in procs.items()}


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_sources_compile(nvcc_builds, arch):
    rc, log = nvcc_builds[arch]
    assert rc == 0, log[-4000:]


def test_cuda_kernels_are_torch_free():
    for path in list((ROOT / "csrc" / "cuda").glob("*.cu*")) + [ROOT / "csrc" / f for f in (
            "kd_row.h", "kd_row_state.h", "kd_terms.h", "kd_split_passes.h", "kd_math.h", "kd_params.h",
            "kd_launch.h", "kd_stream_view.h", "kd_sparse_view.h", "kd_block_row.h", "kd_row_kd.h")]:
        includes = re.findall(r'#include [<"]([^>"]+)[>"]', path.read_text())
        assert not [i for i in includes if i.startswith(("torch", "ATen", "c10"))], path.name


@needs_nvcc
def test_cuda_binding_syntax():
    """cuda/binding.cpp (torch glue, built only by a CUDA torch) at least parses against this torch's
    headers; the CPU wheel lacks the generated c10/cuda/impl/cuda_cmake_macros.h, stubbed here."""
    import torch.utils.cpp_extension as ce
    # nvcc may be a wrapper script: ask it where its toolkit lives (nvcc -v prints TOP=<toolkit>)
    probe = subprocess.run([NVCC, "-v", "-E", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True, text=True)
    tops = re.findall(r"#\$ TOP=(\S+)", probe.stdout + probe.stderr)
    candidates = [Path(p) / "include" for p in tops + [os.environ.get("CUDA_HOME", ""), ce.CUDA_HOME or ""] if p]
    candidates.append(Path(NVCC).resolve().parents[1] / "include")
    cuda_inc = next((p for p in candidates if (p / "cuda_runtime_api.h").exists()), None)
    if cuda_inc is None:
        pytest.skip(f"CUDA headers not found for {NVCC}")
    with tempfile.TemporaryDirectory() as stub:
        macro = Path(stub, "c10", "cuda", "impl")
        macro.mkdir(parents=True)
        (macro / "cuda_cmake_macros.h").write_text("#pragma once\n")
        cmd = [os.environ.get("CXX", "g++"), "-std=c++17", "-fsyntax-only", f"-I{stub}", f"-I{cuda_inc}",
               f"-I{ROOT / 'csrc'}"] + [f"-I{p}" for p in ce.include_paths()] + [
               str(ROOT / "csrc" / "cuda" / "binding.cpp")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


# ---------------------------------------------------------------------------------------------
# backend="cuda" on a GPU
# ---------------------------------------------------------------------------------------------
def _cuda_ready():
    return torch.cuda.is_available() and unavailable_reason("cuda", torch.device("cuda")) is None


@pytest.mark.gpu
@pytest.mark.parametrize("C,name,dtype", list(_matrix(Cs=(3, 10, 100, 1000, 5000))))
def test_cuda_matches_reference(C, name, dtype, gen):
    if not _cuda_ready():
        pytest.skip(f"backend='cuda' unavailable: {unavailable_reason('cuda', torch.device('cuda'))}")
    N = 6
    s, t, y = make_inputs(gen, N, C, dtype)
    spec = fit(presets(C)[name], N, torch.float64 if dtype == torch.float64 else torch.float32)
    if isinstance(spec.temperature, torch.Tensor):
        spec = spec.replace(temperature=spec.temperature.cuda())
    got = run(s.cuda(), t.cuda(), y.cuda(), spec, "cuda")
    assert_parity(got, reference64(s, t, y, fit(presets(C)[name], N)), y, C, dtype, f"cuda {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(presets(7)))
def test_cuda_gradcheck(name, gen):
    if not _cuda_ready():
        pytest.skip(f"backend='cuda' unavailable: {unavailable_reason('cuda', torch.device('cuda'))}")
    spec = gradcheck_spec(fit(presets(7)[name], 3))
    if isinstance(spec.temperature, torch.Tensor):
        spec = spec.replace(temperature=spec.temperature.cuda())
    s, t, y = make_inputs(gen, 3, 7, torch.float64, bad=False, masked=False)
    x = s.cuda().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: kdk.logit_distill(z, t.cuda(), y.cuda(), spec, backend="cuda"), (x,),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.gpu
def test_cuda_learnable_temperature_and_inplace(gen):
    if not _cuda_ready():
        pytest.skip(f"backend='cuda' unavailable: {unavailable_reason('cuda', torch.device('cuda'))}")
    s, t, y = make_inputs(gen, 5, 300, torch.float32, bad=False)
    out = []
    for backend, dev in (("cpu", "cpu"), ("cuda", "cuda")):
        T = torch.linspace(2.0, 4.0, 5, device=dev).requires_grad_()
        x = s.to(dev).clone().requires_grad_()
        loss = kdk.kd_loss(x, t.to(dev), T, labels=y.to(dev), backend=backend)
        out.append([v.cpu() for v in torch.autograd.grad(loss, (x, T))])
    for a, b in zip(out[0], out[1]):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    grads = []
    for backend, dev in (("cpu", "cpu"), ("cuda", "cuda")):
        x = s.to(dev).clone().requires_grad_()
        grads.append(torch.autograd.grad(kdk.dkd_loss(x, t.to(dev), y.to(dev), inplace=dev == "cuda",
                                                      backend=backend), x)[0].cpu())
    assert (grads[1] - grads[0]).abs().max() <= 1e-5 * grads[0].abs().max()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
