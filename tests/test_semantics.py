"""The numeric semantics every backend shares (issue 9; README "Numeric semantics"), one backend-generic
test per item, parametrised over the reference and the fused backends available here:

* ``reference`` — ``kdkernels.reference.logit_distill`` under autograd;
* ``cpu`` — the C++ CPU twin's launcher; ``sim`` — the CUDA launch's code path on the host
  (``SimulatedCudaLauncher``); ``triton`` — the Triton launcher (under ``TRITON_INTERPRET=1`` on CPU).

A fused backend is called through its launcher when it implements the launcher contract 2
(``launcher.forward(s, t, labels, temperature, spec, grad, grad_factor) -> (loss, dtemp)``), otherwise
through the public API. Expected values are hand-derived (closed forms on one row) or the float64
reference on clean inputs. Shapes are small: the file runs in seconds.
"""
from __future__ import annotations

import math

import pytest
import torch

import kdkernels as kdk
from kdkernels import reference
from kdkernels.dispatch import interpreting, load_launcher

BACKENDS = ("reference", "cpu", "sim", "triton")
NAN, INF = math.nan, math.inf
#: float64 parity (relative to the largest magnitude compared)
TOL64 = 1e-12


# ---------------------------------------------------------------------------------------------
# running one backend
# ---------------------------------------------------------------------------------------------
def _launcher(name: str):
    if name == "sim":
        from kdkernels._cpp import SimulatedCudaLauncher, cpu_launcher
        if cpu_launcher.unavailable_reason(torch.device("cpu")) is not None:
            pytest.skip("the C++ extension is not built")
        return SimulatedCudaLauncher(4)
    launcher, reason = load_launcher("logit", name)
    if launcher is None:
        pytest.skip(reason)
    if name == "triton" and not interpreting():
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1")
    why = launcher.unavailable_reason(torch.device("cpu"))
    if why is not None:
        pytest.skip(why)
    return launcher


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param != "reference":
        _launcher(request.param)
    return request.param


def evaluate(name, s, t, labels, spec: kdk.LogitDistill, temperature=None, grad_factor=None):
    """(loss, ∂loss/∂s scaled by grad_factor, ∂loss/∂T or None) of ``spec`` on backend ``name``.

    ``temperature``: a per-row tensor [N] (learnable when it requires grad); ``grad_factor``: [N] or None.
    The gradient is that of Σ_n factor_n·loss_n (reduction none) or factor·loss (scalar losses)."""
    N = s.shape[0]
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    factor = torch.ones(N, dtype=acc) if grad_factor is None else grad_factor
    learn = temperature is not None and temperature.requires_grad
    launcher = None if name == "reference" else _launcher(name)
    if launcher is not None and getattr(launcher, "contract", 1) == 2:
        T = None if temperature is None else temperature.detach()
        packed = spec.replace(temperature=temperature).packed() if temperature is not None else spec.packed()
        grad = torch.empty_like(s)
        with torch.no_grad():
            loss, dtemp = launcher.forward(s, t, labels, T, packed, grad, grad_factor)
        return loss, grad, dtemp
    def run(with_T):
        x = s.detach().clone().requires_grad_(True)
        T = None if temperature is None else temperature.detach().clone().requires_grad_(with_T)
        if name == "reference":
            return x, T, reference.logit_distill(x, t, labels, spec, T)
        # a launcher still on the first contract: the public API
        return x, T, kdk.logit_distill(x, t, labels, spec if T is None else spec.replace(temperature=T),
                                       backend=name)

    x, _, loss = run(False)
    weights = factor.to(loss.dtype) if loss.dim() else factor[0].to(loss.dtype)
    grad, = torch.autograd.grad((loss * weights).sum(), x)
    dtemp = None
    if learn:
        _, T, loss_T = run(True)
        dtemp, = torch.autograd.grad(loss_T.sum(), T)
    return loss.detach(), grad, dtemp


def close(a, b, tol, what=""):
    """NaN where b is NaN, and |a − b| ≤ tol·max|b| (tol relative to the largest finite magnitude)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    nan_b = torch.isnan(b)
    assert torch.equal(torch.isnan(a), nan_b), f"{what}: NaN pattern differs:\n{a}\n{b}"
    fa, fb = a[~nan_b], b[~nan_b]
    if fb.numel() == 0:
        return
    scale = fb.abs().max().clamp(min=1e-300)
    err = ((fa - fb).abs().max() / scale).item()
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def rand(gen, N, C, dtype=torch.float64, scale=3.0):
    return (torch.randn(N, C, generator=gen, dtype=torch.float64) * scale).to(dtype)


def presets(C: int) -> dict:
    """One spec per term family (k adapted to C)."""
    L = kdk.LogitDistill
    k = min(3, (C - 1) // 2)
    return {
        "kd": L(temperature=3.0),
        "kd_ce_std": L(temperature=2.0, ce_weight=0.5, standardize=True),
        "dkd": L(kd_weight=0.0, decoupled=kdk.Decoupled(1.0, 8.0)),
        "aekt": L(kd_weight=0.0, decoupled=kdk.Decoupled(1.0, 8.0, adaptive=True, max_weight=2.0)),
        "dtkd": L(temperature=4.0, kd_weight=1.0, dtkd_weight=3.0),
        "ldrld": L(kd_weight=0.0, relation=kdk.RankRelation(k=k)),
        "topkd": L(teacher_topk_scale=kdk.TopKScale(k=k), tdl=kdk.TopKDecoupled(k=k, weight=1.5)),
    }


PRESETS = list(presets(8))


# ---------------------------------------------------------------------------------------------
# the launcher contract: reduction, loss_weight, grad_factor, ∂loss/∂T — float64 exact
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
def test_reduction_weight_and_factor(backend, reduction, gen):
    N, C = 5, 8
    s, t = rand(gen, N, C), rand(gen, N, C)
    y = torch.tensor([3, -100, 0, 7, -100])
    factor = torch.tensor([0.5, 2.0, 1.0, -1.5, 3.0], dtype=torch.float64)
    if reduction != "none":  # the scalar's grad_output, expanded as the Function passes it
        factor = torch.tensor(0.75, dtype=torch.float64).expand(N)
    for name, spec in presets(C).items():
        spec = spec.replace(reduction=reduction, loss_weight=0.625)
        got = evaluate(backend, s, t, y, spec, grad_factor=factor)
        ref = evaluate("reference", s, t, y, spec, grad_factor=factor)
        close(got[0], ref[0], TOL64, f"{name} loss")
        close(got[1], ref[1], TOL64, f"{name} grad")
    # batchmean divides by the 3 labelled rows: the same rows without the ignored ones give the same loss
    if reduction == "batchmean":
        spec = presets(C)["kd"].replace(reduction=reduction)
        keep = y != -100
        full = evaluate(backend, s, t, y, spec)[0]
        part = evaluate(backend, s[keep].contiguous(), t[keep].contiguous(), y[keep], spec)[0]
        close(full, part, TOL64, "batchmean count")


@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_learnable_temperature_gradient(backend, reduction, gen):
    """∂loss/∂T_n includes loss_weight and 1/count, not grad_factor."""
    N, C = 4, 9
    s, t = rand(gen, N, C), rand(gen, N, C)
    s[0, 2] = t[0, 2] = -INF
    y = torch.tensor([1, -100, 4, 0])
    T = torch.tensor([1.5, 2.0, 3.0, 4.5], dtype=torch.float64, requires_grad=True)
    spec = kdk.LogitDistill(temperature=T, ce_weight=0.25, reduction=reduction, loss_weight=1.5)
    factor = torch.full((N,), 2.0, dtype=torch.float64)
    got = evaluate(backend, s, t, y, spec, temperature=T, grad_factor=factor)
    ref = evaluate("reference", s, t, y, spec, temperature=T, grad_factor=factor)
    for g, r, what in zip(got, ref, ("loss", "grad", "dtemp")):
        close(g, r, TOL64, what)
    assert got[2][1] == 0


def test_empty_batch_and_all_ignored(backend, gen):
    s, t = rand(gen, 3, 6), rand(gen, 3, 6)
    y = torch.full((3,), -100)
    for reduction in ("none", "sum", "batchmean"):
        loss, grad, _ = evaluate(backend, s, t, y, presets(6)["dkd"].replace(reduction=reduction))
        assert (loss == 0).all() and (grad == 0).all(), reduction


# ---------------------------------------------------------------------------------------------
# ignored rows: exactly 0 whatever they hold
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_ignored_rows_are_zero_whatever_they_hold(backend, name, gen):
    N, C = 4, 8
    s, t = rand(gen, N, C), rand(gen, N, C)
    y = torch.tensor([2, -100, 5, -100])
    clean = evaluate("reference", s, t, y, presets(C)[name].replace(reduction="none"))
    s[1] = NAN
    t[1, ::2] = INF
    s[3, 0] = INF
    s[3, 1:] = -INF
    t[3] = NAN
    s[1, 0] = t[1, 0] = -INF  # a masked column 0 (AEKT's y = 0 fallback of ignored rows)
    for reduction in ("none", "batchmean"):
        loss, grad, _ = evaluate(backend, s, t, y, presets(C)[name].replace(reduction=reduction))
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), reduction
        assert (grad[1] == 0).all() and (grad[3] == 0).all()
        if reduction == "none":
            assert loss[1] == 0 and loss[3] == 0
            close(loss, clean[0], TOL64, "rows")
            close(grad, clean[1], TOL64, "grad")
        else:
            close(loss, clean[0].sum() / 2, TOL64, "batchmean over the 2 labelled rows")


# ---------------------------------------------------------------------------------------------
# NaN / +inf in a valid row: that row NaN (loss and the whole gradient row); −inf is a masked class
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_nan_and_posinf_propagate_to_their_row(backend, name, gen):
    N, C = 5, 8
    s, t = rand(gen, N, C), rand(gen, N, C)
    y = torch.tensor([1, 2, 3, 4, 6])
    s[4, 0] = t[4, 0] = -INF  # masked class: a valid, finite row
    clean = evaluate("reference", s, t, y, presets(C)[name].replace(reduction="none"))
    t[0, 5] = NAN
    s[1, 3] = INF
    t[2, 7] = INF
    s[3, 0] = NAN
    loss, grad, _ = evaluate(backend, s, t, y, presets(C)[name].replace(reduction="none"))
    assert torch.isnan(loss[:4]).all(), loss
    assert torch.isnan(grad[:4]).all(), grad[:4]
    close(loss[4], clean[0][4], TOL64, "clean row loss")
    close(grad[4], clean[1][4], TOL64, "clean row grad")
    loss, _, _ = evaluate(backend, s, t, y, presets(C)[name])
    assert torch.isnan(loss), "batchmean over a NaN row"


def test_teacher_nan_with_learnable_temperature(backend, gen):
    s, t = rand(gen, 2, 6), rand(gen, 2, 6)
    t[0, 1] = NAN
    T = torch.tensor([2.0, 3.0], dtype=torch.float64, requires_grad=True)
    loss, grad, dtemp = evaluate(backend, s, t, None, kdk.LogitDistill(temperature=T, reduction="none"),
                                 temperature=T)
    assert torch.isnan(loss[0]) and torch.isnan(grad[0]).all() and torch.isnan(dtemp[0])
    assert torch.isfinite(loss[1]) and torch.isfinite(grad[1]).all() and torch.isfinite(dtemp[1])


def test_bad_label_rows_are_nan(backend, gen):
    s, t = rand(gen, 3, 6), rand(gen, 3, 6)
    y = torch.tensor([9, 2, -7])
    loss, grad, _ = evaluate(backend, s, t, y, presets(6)["dkd"].replace(reduction="none"))
    assert torch.isnan(loss[[0, 2]]).all() and torch.isnan(grad[[0, 2]]).all()
    assert torch.isfinite(loss[1]) and torch.isfinite(grad[1]).all()


# ---------------------------------------------------------------------------------------------
# fully masked rows: 0 (no NaN), still counted by batchmean
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_fully_masked_rows_are_zero_and_counted(backend, name, gen):
    N, C = 4, 8
    s, t = rand(gen, N, C), rand(gen, N, C)
    y = torch.tensor([1, 2, 3, 4])
    clean = evaluate("reference", s, t, y, presets(C)[name].replace(reduction="none"))
    s[0] = -INF
    t[1] = -INF
    loss, grad, _ = evaluate(backend, s, t, y, presets(C)[name].replace(reduction="none"))
    assert (loss[:2] == 0).all() and (grad[:2] == 0).all(), (loss, grad[:2])
    close(loss[2:], clean[0][2:], TOL64, "other rows")
    loss, _, _ = evaluate(backend, s, t, y, presets(C)[name])
    close(loss, clean[0][2:].sum() / 4, TOL64, "batchmean counts the masked rows")


# ---------------------------------------------------------------------------------------------
# DTKD: x ≤ 0 or v ≤ 0 → T_s = T_t = τ (finite, −inf classes included)
# ---------------------------------------------------------------------------------------------
def test_dtkd_guard_rows_are_kd_at_tau(backend):
    tau, alpha, beta = 4.0, 3.0, 1.0
    t = torch.tensor([[2.0, 0.5, -INF, -1.0, 1.0],     # x > 0, v < 0 (negative student temperature before)
                      [-0.5, -2.0, -1.0, -INF, -3.0],  # x < 0 < v, x + v > 0
                      [-3.0, -1.0, -2.0, -4.0, -INF],  # x + v ≤ 0
                      [0.0, -1.0, -INF, -2.0, -0.5]], dtype=torch.float64)  # x = 0
    s = torch.tensor([[-1.0, -0.5, -INF, -2.0, -3.0],
                      [1.5, 0.25, -1.0, -INF, 0.5],
                      [-1.0, -0.5, 0.5, -2.0, -INF],
                      [1.0, 2.0, -INF, 0.5, 0.0]], dtype=torch.float64)
    spec = kdk.LogitDistill(temperature=tau, kd_weight=beta, dtkd_weight=alpha, reduction="none")
    loss, grad, _ = evaluate(backend, s, t, None, spec)
    lp, lq = torch.log_softmax(t / tau, -1), torch.log_softmax(s / tau, -1)
    p, q = lp.exp(), lq.exp()
    kl = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)
    close(loss, (alpha + beta) * tau ** 2 * kl, TOL64, "loss")
    close(grad, (alpha + beta) * tau * (q - p), TOL64, "grad")


# ---------------------------------------------------------------------------------------------
# KL rounding, overflow of x/T, constant rows under standardize
# ---------------------------------------------------------------------------------------------
def test_kl_is_never_negative_at_huge_temperature(backend, gen):
    """float32 at T = 1e4: the KL of nearly uniform distributions rounds to ± noise; the loss is ≥ 0."""
    N, C = 16, 50
    s = torch.randn(N, C, generator=gen)
    t = s + 1e-3 * torch.randn(N, C, generator=gen)
    spec = kdk.LogitDistill(temperature=1e4, reduction="none")
    raw = reference.kl_rows(torch.log_softmax(t / 1e4, -1), torch.log_softmax(s / 1e4, -1))
    assert (raw < 0).any(), "precondition: float32 rounding gives negative KL values here"
    for name, spec in (("kd", spec), ("dkd", spec.replace(kd_weight=0.0, decoupled=kdk.Decoupled(1.0, 8.0)))):
        y = torch.zeros(N, dtype=torch.long)
        loss, grad, _ = evaluate(backend, s, t, y, spec)
        assert (loss >= 0).all() and torch.isfinite(grad).all(), name


@pytest.mark.parametrize("name", ["kd", "kd_ce", "dkd", "aekt", "dtkd", "ldrld", "ldrld_teacher", "topkd"])
def test_overflowing_scaled_logits_are_exact_or_nan(backend, name):
    """float32 logits whose x/T overflows: every LSE is shifted by its set's maximum, (x − max)/T, so the
    loss is the float64 value rounded to float32 (inf where that overflows), or the row is NaN (DTKD's
    temperatures and TDL's dot products overflow) — never another finite number."""
    s = torch.tensor([[3e38, 2e38, -1e38, 0.0, 1.0], [1.0, 2.0, 0.5, -1.0, 0.0]])
    t = torch.tensor([[2e38, 3e38, 0.0, 1.0, 5.0], [0.0, 1.5, 1.0, -2.0, 0.3]])
    y = torch.tensor([1, 2])
    L = kdk.LogitDistill
    spec = {"kd": L(), "kd_ce": L(ce_weight=0.3), "dkd": L(kd_weight=0.0, decoupled=kdk.Decoupled()),
            "aekt": L(kd_weight=0.0, decoupled=kdk.Decoupled(adaptive=True)), "dtkd": L(dtkd_weight=3.0),
            "ldrld": L(kd_weight=0.0, relation=kdk.RankRelation(k=3)),
            "ldrld_teacher": L(kd_weight=0.0, relation=kdk.RankRelation(k=3, rank_by="teacher")),
            "topkd": L(teacher_topk_scale=kdk.TopKScale(k=2), tdl=kdk.TopKDecoupled(k=2))}[name]
    spec = spec.replace(temperature=0.5, reduction="none")
    ref = evaluate("reference", s.double(), t.double(), y, spec)
    assert torch.isfinite(ref[0]).all() and ref[0][0] > 1e37
    loss, grad, _ = evaluate(backend, s, t, y, spec)
    expected = ref[0].float()
    for n in range(2):
        if torch.isnan(loss[n]):
            assert n == 0 and torch.isnan(grad[n]).all(), "only the overflowing row may be NaN"
        elif torch.isinf(expected[n]):
            assert loss[n] == expected[n], f"row {n}: {loss[n]} for a loss beyond float32"
        else:
            close(loss[n], ref[0][n], 1e-5, f"row {n} loss")
            if n == 0 and name in ("kd", "kd_ce", "dkd"):
                close(grad[n], ref[1][n], 1e-6, "row 0 grad")


def test_standardize_constant_row(backend):
    """σ = 0 exactly on a constant row (0.1 is not a binary fraction: a rounded mean would leave noise
    that Z divides by 1e-7); Z = 0 on its finite entries, so q is uniform over them."""
    T = 2.0
    s = torch.tensor([[0.1] * 7, [0.1, 0.1, -INF, 0.1, 0.1, 0.1, 0.1]], dtype=torch.float64)
    t = torch.tensor([[0.3, -1.2, 2.0, 0.0, 0.7, -0.4, 1.1], [1.0, -0.5, -INF, 0.25, 2.0, -1.0, 0.5]],
                     dtype=torch.float64)
    spec = kdk.LogitDistill(temperature=T, standardize=True, reduction="sum")
    loss, grad, _ = evaluate(backend, s, t, None, spec)
    live = t != -INF
    n = live.sum(-1, keepdim=True).double()
    tz = torch.where(live, t, 0.0)
    mu = tz.sum(-1, keepdim=True) / n
    sd = (torch.where(live, t - mu, 0.0) ** 2).sum(-1, keepdim=True).div(n - 1).sqrt()
    zt = torch.where(live, (t - mu) / (sd + 1e-7), -INF)
    lp = torch.log_softmax(zt / T, -1)
    p = lp.exp()
    q = live.double() / n
    lq = torch.where(live, q.log(), -INF)
    kl = torch.where(p > 0, p * (lp - lq), 0.0).sum(-1)
    close(loss, (T ** 2 * kl).sum(), TOL64, "loss")
    g = T * (q - p)  # ∂/∂Z; its mean over the finite entries is 0 and the σ term is 0 on a constant row
    close(grad, torch.where(live, g / 1e-7, 0.0), 1e-9, "grad")


# ---------------------------------------------------------------------------------------------
# mixed dtypes: each operand loaded in its own dtype
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s_dtype,t_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                             (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)],
                         ids=["bf16-fp32", "fp16-fp32", "fp32-bf16", "bf16-fp16"])
@pytest.mark.parametrize("name", ["kd", "dkd", "kd_ce_std", "topkd"])
def test_mixed_student_teacher_dtypes(backend, name, s_dtype, t_dtype, gen):
    """bf16 student + fp32 teacher (and friends) equals the same values both held in float32, the gradient
    rounded once to the student's dtype."""
    N, C = 4, 40
    s, t = rand(gen, N, C, s_dtype), rand(gen, N, C, t_dtype)
    t[0, 3] = -INF
    y = torch.tensor([1, 5, -100, 39])
    spec = presets(C)[name].replace(reduction="sum", loss_weight=0.5)
    loss, grad, _ = evaluate(backend, s, t, y, spec)
    loss32, grad32, _ = evaluate(backend, s.float(), t.float(), y, spec)
    assert grad.dtype == s_dtype and loss.dtype == torch.float32
    close(loss, loss32, 1e-6, "loss")
    ulp = torch.finfo(s_dtype).eps * grad32.abs().max()
    assert (grad.float() - grad32).abs().max() <= ulp, "gradient beyond one rounding"


# ---------------------------------------------------------------------------------------------
# in-place safety: a tensor saved by another op and then overwritten is an autograd error
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", ["cpu", "sim", "triton"])
def test_inplace_gradient_bumps_the_logits_version(fused, gen):
    launcher = _launcher(fused)
    if getattr(launcher, "contract", 1) != 2:
        pytest.skip(f"the {fused} launcher does not implement contract 2 on this branch")
    x = rand(gen, 3, 10, torch.float32).requires_grad_()
    t = rand(gen, 3, 10, torch.float32)
    s = x * 1.0
    other = (s * s).sum()  # saves s
    before = s._version
    with torch.no_grad():
        launcher.forward(s, t, None, None, kdk.LogitDistill().packed(), s, None)
    assert s._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        other.backward()


def test_public_inplace_refuses_a_saved_student(backend, gen):
    if backend == "reference":
        pytest.skip("the reference never writes the logits")
    x = rand(gen, 3, 10, torch.float32).requires_grad_()
    t = rand(gen, 3, 10, torch.float32)
    s = x * 1.0
    other = (s * s).sum()
    backend = "cpu" if backend == "sim" else backend
    loss = kdk.kd_loss(s, t, inplace=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()
