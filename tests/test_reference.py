"""The reference losses (through the public API, ``backend="reference"``) against independent closed
forms and the identities / test vectors of docs/README.md.

Every closed form here is written from docs/README.md with plain torch primitives (softmax, log_softmax,
cross_entropy, explicit loops); none calls a helper of ``kdkernels.reference``. Everything runs in
float64; "rel" is max-abs error over max-abs value.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kdkernels as kdk
from kdkernels import reference as ref
from kdkernels.spec import RankRelation, TopKScale

DT = torch.float64
R = "reference"
TOL = 1e-10


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def rel_err(a, b) -> float:
    a = torch.as_tensor(a).detach().to(DT)
    b = torch.as_tensor(b).detach().to(DT)
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    diff = (a - b).abs().max().item()
    scale = b.abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_close(a, b, tol=TOL, what=""):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert torch.isfinite(b).all(), f"{what}: expected value not finite (bad test input)"
    assert torch.isfinite(a).all(), f"{what}: value not finite: {a}"
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def randn(gen, *shape, scale=2.0):
    return torch.randn(*shape, generator=gen, dtype=DT) * scale


def randlabels(gen, n, c):
    return torch.randint(0, c, (n,), generator=gen)


def spaced(gen, n, c, step=0.5, jitter=0.2, offset=0.0):
    """Rows that are permutations of well-separated values (gaps >= step - jitter): no near-ties."""
    rows = []
    for _ in range(n):
        perm = torch.randperm(c, generator=gen).to(DT)
        rows.append(perm * step + jitter * torch.rand(c, generator=gen, dtype=DT))
    z = torch.stack(rows)
    return z - z.mean(-1, keepdim=True) + offset


def loss_and_grad(fn, s, reduce_sum=False):
    x = s.detach().clone().requires_grad_(True)
    loss = fn(x)
    g, = torch.autograd.grad(loss.sum() if reduce_sum else loss, x)
    return loss.detach(), g


def kl_closed(t_z, s_z):
    """Σ p (log p − log q) for p = softmax(t_z), q = softmax(s_z) (finite inputs)."""
    lp, lq = t_z.log_softmax(-1), s_z.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def Z(z):
    """docs/standardize.md standardisation, written independently (torch.std is unbiased)."""
    return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-7)


def tckd_nckd_closed(s, t, y, T):
    """(KL(b_t‖b_s), KL(p̂‖q̂)) per row from plain probabilities, without T²."""
    p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    py, qy = p.gather(1, y[:, None])[:, 0], q.gather(1, y[:, None])[:, 0]
    tckd = py * torch.log(py / qy) + (1 - py) * torch.log((1 - py) / (1 - qy))
    N, C = s.shape
    keep = torch.ones(N, C, dtype=torch.bool)
    keep[torch.arange(N), y] = False
    ph = p[keep].view(N, C - 1) / (1 - py)[:, None]
    qh = q[keep].view(N, C - 1) / (1 - qy)[:, None]
    nckd = (ph * torch.log(ph / qh)).sum(-1)
    return tckd, nckd


# ------------------------------------------------------------------------------------------------
# §1 KD
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1.0, 2.5, 4.0])
def test_kd_rows_and_reductions_closed_form(gen, T):
    N, C = 6, 11
    s, t = randn(gen, N, C), randn(gen, N, C)
    rows = T * T * kl_closed(t / T, s / T)
    assert_close(kdk.kd_loss(s, t, T, reduction="none", backend=R), rows, what="none")
    assert_close(kdk.kd_loss(s, t, T, reduction="sum", backend=R), rows.sum(), what="sum")
    assert_close(kdk.kd_loss(s, t, T, backend=R), rows.sum() / N, what="batchmean")


@pytest.mark.parametrize("reduction,div", [("batchmean", 7), ("sum", 1), ("none", 1)])
def test_kd_gradient_is_T_q_minus_p_over_N(gen, reduction, div):
    N, C, T = 7, 9, 3.0
    s, t = randn(gen, N, C), randn(gen, N, C)
    _, g = loss_and_grad(lambda x: kdk.kd_loss(x, t, T, reduction=reduction, backend=R), s, reduce_sum=True)
    expected = T * (torch.softmax(s / T, -1) - torch.softmax(t / T, -1)) / div
    assert_close(g, expected, what="grad")
    assert g.sum(-1).abs().max() < 1e-13, "KD gradient rows must sum to 0"


def test_kd_per_row_temperature(gen):
    N, C = 5, 8
    s, t = randn(gen, N, C), randn(gen, N, C)
    T = 0.5 + 4 * torch.rand(N, generator=gen, dtype=DT)
    rows = T ** 2 * kl_closed(t / T[:, None], s / T[:, None])
    assert_close(kdk.kd_loss(s, t, T, reduction="none", backend=R), rows)
    _, g = loss_and_grad(lambda x: kdk.kd_loss(x, t, T, backend=R), s)
    expected = T[:, None] * (torch.softmax(s / T[:, None], -1) - torch.softmax(t / T[:, None], -1)) / N
    assert_close(g, expected)


def _dKL_dT(s, t, T):
    """docs/kd.md: ∂KL/∂T = −(1/T²)[Σ(q−p)s + Σ t p (log p − log q − KL)] per row; T is [N, 1]."""
    lp, lq = (t / T).log_softmax(-1), (s / T).log_softmax(-1)
    p, q = lp.exp(), lq.exp()
    kl = (p * (lp - lq)).sum(-1, keepdim=True)
    inner = ((q - p) * s).sum(-1) + (t * p * (lp - lq - kl)).sum(-1)
    return kl.squeeze(-1), -inner / T.squeeze(-1) ** 2


@pytest.mark.parametrize("per_row", [False, True])
def test_learnable_temperature_gradient_closed_form(gen, per_row):
    N, C = 6, 10
    s, t = randn(gen, N, C), randn(gen, N, C)
    T0 = (0.7 + 3 * torch.rand(N, generator=gen, dtype=DT)) if per_row else torch.tensor(2.7, dtype=DT)
    T = T0.clone().requires_grad_(True)
    x = s.clone().requires_grad_(True)
    loss = kdk.kd_loss(x, t, T, backend=R)
    gs, gT = torch.autograd.grad(loss, (x, T))
    Tcol = T0.expand(N).reshape(N, 1)
    kl, dkl = _dKL_dT(s, t, Tcol)
    Tr = Tcol.squeeze(-1)
    dl_dT = (2 * Tr * kl + Tr ** 2 * dkl) / N
    assert gT.shape == T0.shape
    assert_close(gT, dl_dT if per_row else dl_dT.sum(), what="dT")
    assert_close(gs, Tcol * (torch.softmax(s / Tcol, -1) - torch.softmax(t / Tcol, -1)) / N, what="ds")
    assert_close(loss, (Tr ** 2 * kl).sum() / N)

    # the closed form itself vs. a central finite difference (guards the formula, not the code)
    h = 1e-6
    f = lambda TT: TT.squeeze(-1) ** 2 * kl_closed(t / TT, s / TT)  # noqa: E731
    fd = (f(Tcol + h) - f(Tcol - h)) / (2 * h)
    assert_close(fd / N, dl_dT, tol=1e-6, what="closed form vs finite difference")

    # the T-free CE term adds nothing to ∂ℓ/∂T
    y = randlabels(gen, N, C)
    T2 = T0.clone().requires_grad_(True)
    gT2, = torch.autograd.grad(kdk.kd_loss(s, t, T2, labels=y, ce_weight=0.7, backend=R), T2)
    assert_close(gT2, gT, what="dT with ce")


def test_learnable_temperature_leading_dims(gen):
    B, L, C = 2, 3, 7
    s, t = randn(gen, B, L, C), randn(gen, B, L, C)
    T = (1 + 2 * torch.rand(B, L, generator=gen, dtype=DT)).requires_grad_(True)
    loss = kdk.kd_loss(s, t, T, backend=R)
    gT, = torch.autograd.grad(loss, T)
    Tc = T.detach().reshape(-1, 1)
    kl, dkl = _dKL_dT(s.reshape(-1, C), t.reshape(-1, C), Tc)
    Tr = Tc.squeeze(-1)
    assert gT.shape == (B, L)
    assert_close(gT.reshape(-1), (2 * Tr * kl + Tr ** 2 * dkl) / (B * L))


@pytest.mark.parametrize("standardize", [False, True])
def test_ce_weight_adds_ce_at_temperature_1_on_raw_logits(gen, standardize):
    N, C, T, w = 6, 9, 3.0, 0.35
    s, t, y = randn(gen, N, C), randn(gen, N, C) + 1.0, randlabels(gen, N, C)
    zs, zt = (Z(s), Z(t)) if standardize else (s, t)
    ce = F.cross_entropy(s, y, reduction="none")
    rows = T * T * kl_closed(zt / T, zs / T) + w * ce
    out = kdk.kd_loss(s, t, T, labels=y, ce_weight=w, standardize=standardize, reduction="none", backend=R)
    assert_close(out, rows)
    # and in dkd
    tc, nc = tckd_nckd_closed(zs, zt, y, T)
    out = kdk.dkd_loss(s, t, y, 1.5, 6.0, T, ce_weight=w, standardize=standardize, reduction="none", backend=R)
    assert_close(out, T * T * (1.5 * tc + 6.0 * nc) + w * ce)
    # gradient of the CE part: w·(softmax(s) − onehot)/N on top of the KD part
    _, g_ce = loss_and_grad(lambda x: kdk.kd_loss(x, t, T, labels=y, ce_weight=w, standardize=standardize,
                                                  backend=R), s)
    _, g_kd = loss_and_grad(lambda x: kdk.kd_loss(x, t, T, labels=y, standardize=standardize, backend=R), s)
    expected = w * (torch.softmax(s, -1) - F.one_hot(y, C).to(DT)) / N
    assert_close(g_ce - g_kd, expected)


# ------------------------------------------------------------------------------------------------
# §2 DKD
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_decomposition_identity(gen, T):
    N, C = 12, 10
    s, t, y = randn(gen, N, C), randn(gen, N, C), randlabels(gen, N, C)
    kl = kdk.kd_loss(s, t, T, reduction="none", backend=R) / T ** 2
    tckd = kdk.dkd_loss(s, t, y, 1.0, 0.0, T, reduction="none", backend=R) / T ** 2
    nckd = kdk.dkd_loss(s, t, y, 0.0, 1.0, T, reduction="none", backend=R) / T ** 2
    py = torch.softmax(t / T, -1).gather(1, y[:, None])[:, 0]
    assert_close(tckd + (1 - py) * nckd, kl, what="KL = TCKD + (1-p_y) NCKD")
    tc, nc = tckd_nckd_closed(s, t, y, T)
    assert_close(tckd, tc, what="TCKD")
    assert_close(nckd, nc, what="NCKD")
    # weights are linear
    out = kdk.dkd_loss(s, t, y, 1.7, 3.1, T, reduction="none", backend=R)
    assert_close(out, T * T * (1.7 * tc + 3.1 * nc))


def test_dkd_defaults(gen):
    N, C = 4, 7
    s, t, y = randn(gen, N, C), randn(gen, N, C), randlabels(gen, N, C)
    tc, nc = tckd_nckd_closed(s, t, y, 4.0)
    assert_close(kdk.dkd_loss(s, t, y, backend=R), (16.0 * (1.0 * tc + 8.0 * nc)).mean())


@pytest.mark.parametrize("alpha,beta,T", [(1.0, 8.0, 4.0), (0.4, 2.5, 1.5)])
def test_dkd_gradient_formula(gen, alpha, beta, T):
    N, C = 8, 9
    s, t, y = randn(gen, N, C), randn(gen, N, C), randlabels(gen, N, C)
    _, g = loss_and_grad(lambda x: kdk.dkd_loss(x, t, y, alpha, beta, T, backend=R), s)
    p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    py, qy = p.gather(1, y[:, None]), q.gather(1, y[:, None])
    qh, ph = q / (1 - qy), p / (1 - py)
    expected = T * (alpha * (py - qy) * qh + beta * (qh - ph))
    expected[torch.arange(N), y] = (T * alpha * (qy - py))[:, 0]
    expected = expected / N
    assert_close(g, expected)
    assert g.sum(-1).abs().max() < 1e-13 * max(1.0, g.abs().max().item()), "DKD rows must sum to 0"


def test_dkd_confident_student_stays_finite(gen):
    N, C, T = 4, 6, 4.0
    s, t, y = randn(gen, N, C), randn(gen, N, C), randlabels(gen, N, C)
    s = s.clone()
    s[torch.arange(N), y] += 3000.0  # q_y == 1 in float64; 1 − q_y underflows
    loss, g = loss_and_grad(lambda x: kdk.dkd_loss(x, t, y, backend=R), s)
    assert torch.isfinite(loss) and torch.isfinite(g).all()


# ------------------------------------------------------------------------------------------------
# §3 standardisation
# ------------------------------------------------------------------------------------------------
def test_standardize_row_statistics(gen):
    z = randn(gen, 5, 13, scale=3.0) + 4.0
    out = ref.standardize(z)
    sigma = z.std(-1, keepdim=True)
    assert out.mean(-1).abs().max() < 1e-14
    assert_close(out.std(-1, keepdim=True), sigma / (sigma + 1e-7), tol=1e-13)
    assert_close(out, Z(z), tol=1e-13)


STD_METHODS = {
    "kd": lambda s, t, y, **kw: kdk.kd_loss(s, t, 2.0, **kw),
    "dkd": lambda s, t, y, **kw: kdk.dkd_loss(s, t, y, 1.0, 8.0, 2.0, **kw),
    "aekt": lambda s, t, y, **kw: kdk.aekt_loss(s, t, y, 1.0, 8.0, 2.0, **kw),
    "dtkd": lambda s, t, y, **kw: kdk.dtkd_loss(s, t, 2.0, **kw),
    "ldrld": lambda s, t, y, **kw: kdk.ldrld_loss(s, t, 3, 2.0, **kw),
    "topkd": lambda s, t, y, **kw: kdk.topkd_loss(s, t, y, 2, 2.0, **kw),
}


@pytest.mark.parametrize("method", sorted(STD_METHODS))
def test_standardize_equals_method_on_standardized_logits(gen, method):
    """f(s, t, standardize=True) == f(Z(s), Z(t)) with Z independent, loss and gradient (chain rule)."""
    N, C = 5, 9
    fn = STD_METHODS[method]
    s = spaced(gen, N, C, step=0.7, offset=1.5) * 2.0
    t = spaced(gen, N, C, step=0.6, offset=-0.5) * 3.0
    y = randlabels(gen, N, C)
    l1, g1 = loss_and_grad(lambda x: fn(x, t, y, standardize=True, backend=R), s)
    l2, g2 = loss_and_grad(lambda x: fn(Z(x), Z(t), y, backend=R), s)
    assert_close(l1, l2, tol=1e-12)
    assert_close(g1, g2, tol=1e-9)


def test_standardize_gradient_formula(gen):
    N, C, T = 4, 8, 2.0
    s, t = randn(gen, N, C) + 2.0, randn(gen, N, C, scale=3.0)
    _, grad = loss_and_grad(lambda x: kdk.kd_loss(x, t, T, standardize=True, backend=R), s)
    zs, zt = Z(s), Z(t)
    g = T * (torch.softmax(zs / T, -1) - torch.softmax(zt / T, -1)) / N  # ∂L/∂z̃
    sigma = s.std(-1, keepdim=True)
    expected = (g - g.mean(-1, keepdim=True)) / (sigma + 1e-7) \
        - (g * zs).sum(-1, keepdim=True) * zs / ((C - 1) * sigma)
    assert_close(grad, expected, tol=1e-10)


def test_standardize_constant_row_finite_gradient(gen):
    N, C, T = 3, 7, 2.0
    s, t = randn(gen, N, C), randn(gen, N, C)
    c = round(float(torch.randn(1, generator=gen)) * 8) / 8 + 0.625  # dyadic: the row mean is exact
    s = s.clone()
    s[1] = c
    t = t.clone()
    t[2] = -1.375  # a constant teacher row too
    loss, grad = loss_and_grad(lambda x: kdk.kd_loss(x, t, T, standardize=True, backend=R), s)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # row 1: Z(s) = 0 → q uniform; the second term of §3 is 0: grad = (g − mean g)/(0 + 1e-7)
    zt = Z(t)
    g = T * (torch.full((C,), 1.0 / C, dtype=DT) - torch.softmax(zt[1] / T, -1)) / N
    assert_close(grad[1], (g - g.mean()) / 1e-7, tol=1e-9)
    # row 2: Z(t) = 0 → p uniform; ordinary §3 gradient
    zs = Z(s[2])
    g2 = T * (torch.softmax(zs / T, -1) - 1.0 / C) / N
    sig = s[2].std()
    exp2 = (g2 - g2.mean()) / (sig + 1e-7) - (g2 * zs).sum() * zs / ((C - 1) * sig)
    assert_close(grad[2], exp2)
    # the loss of row 1 is KL(p‖uniform) at Z(t)
    rows = kdk.kd_loss(s, t, T, standardize=True, reduction="none", backend=R)
    assert_close(rows[1], T * T * kl_closed(zt[1] / T, torch.zeros(C, dtype=DT)))


# ------------------------------------------------------------------------------------------------
# §4 DTKD
# ------------------------------------------------------------------------------------------------
def dtkd_closed(s, t, tau, alpha, beta):
    """(rows, gradient of Σ rows) per docs/dtkd.md, with the argmax path derived by hand."""
    N, C = s.shape
    x = t.max(-1).values
    v = s.max(-1).values
    m = [min(j for j in range(C) if s[n, j] == v[n]) for n in range(N)]  # first maximal index
    ok = (x > 0) & (v > 0)  # the extended guard (x ≤ 0 or v ≤ 0 → τ; covers the published x + v ≤ 0)
    den = torch.where(ok, x + v, torch.ones_like(x))
    Ts = torch.where(ok, 2 * v * tau / den, torch.full_like(x, tau))
    Tt = torch.where(ok, 2 * x * tau / den, torch.full_like(x, tau))
    lp, lq = (t / Tt[:, None]).log_softmax(-1), (s / Ts[:, None]).log_softmax(-1)
    p, q = lp.exp(), lq.exp()
    kl = (p * (lp - lq)).sum(-1)
    kl_tau = kl_closed(t / tau, s / tau)
    rows = alpha * Tt * Ts * kl + beta * tau ** 2 * kl_tau
    grad = alpha * Tt[:, None] * (q - p) + beta * tau * (torch.softmax(s / tau, -1) - torch.softmax(t / tau, -1))
    dkl_dTs = ((p * s).sum(-1) - (q * s).sum(-1)) / Ts ** 2
    Ept = (p * t).sum(-1, keepdim=True)
    dkl_dTt = -(p * (t - Ept) * (lp - lq)).sum(-1) / Tt ** 2
    dTs_dv = torch.where(ok, 2 * tau * x / den ** 2, torch.zeros_like(x))
    dTt_dv = -dTs_dv
    dF = dTs_dv * (Tt * kl + Tt * Ts * dkl_dTs) + dTt_dv * (Ts * kl + Tt * Ts * dkl_dTt)
    for n in range(N):
        grad[n, m[n]] += alpha * dF[n]
    return rows, grad, Ts, Tt, alpha * dF


def test_dtkd_temperatures_sum_to_2tau(gen):
    N, C, tau = 8, 10, 4.0
    s, t = randn(gen, N, C) + 1.0, randn(gen, N, C) + 2.0
    x, v = t.max(-1).values, s.max(-1).values
    assert ((x + v) > 0).all()
    Ts, Tt = 2 * v * tau / (x + v), 2 * x * tau / (x + v)
    assert_close(Ts + Tt, torch.full((N,), 2 * tau, dtype=DT), tol=1e-14)
    rTs, rTt = ref.dynamic_temperatures(s, t, torch.full((N, 1), tau, dtype=DT))
    assert_close(rTs[:, 0], Ts, tol=1e-14)
    assert_close(rTt[:, 0], Tt, tol=1e-14)
    assert_close(rTs[:, 0] + rTt[:, 0], torch.full((N,), 2 * tau, dtype=DT), tol=1e-14)
    rows, _, _, _, _ = dtkd_closed(s, t, tau, 3.0, 1.0)
    assert_close(kdk.dtkd_loss(s, t, reduction="none", backend=R), rows)


@pytest.mark.parametrize("tau,alpha,beta", [(4.0, 3.0, 1.0), (2.0, 0.5, 2.0)])
def test_dtkd_loss_and_gradient_closed_form(gen, tau, alpha, beta):
    N, C = 8, 9
    s = spaced(gen, N, C, step=0.5, offset=0.8) * 2
    t = randn(gen, N, C) + 2.5
    s = s.clone()
    s[1] -= s[1].max() + 1.0  # v = −1 < 0 < x + v: the published code's negative T_s; kdkernels falls back to τ
    t[1] -= t[1].max() - 3.0
    s[2] -= 20.0  # x + v ≤ 0: fallback T_s = T_t = τ
    t[3] -= 20.0
    x, v = t.max(-1).values, s.max(-1).values
    assert v[1] < 0 < x[1] + v[1] and x[2] + v[2] <= 0 and x[3] + v[3] <= 0
    rows, grad, Ts, Tt, row_sum = dtkd_closed(s, t, tau, alpha, beta)
    assert_close(kdk.dtkd_loss(s, t, tau, alpha, beta, reduction="none", backend=R), rows)
    _, g = loss_and_grad(lambda z: kdk.dtkd_loss(z, t, tau, alpha, beta, backend=R), s)
    assert_close(g, grad / N)
    # DTKD's rows do NOT sum to 0: the row sum is α·∂(T_t·T_s·KL)/∂v (0 on fallback rows)
    assert_close(g.sum(-1), row_sum / N, tol=1e-9)
    ok = (x > 0) & (v > 0)
    assert not ok[1] and ok.sum() >= 4
    assert (row_sum[ok].abs() > 1e-6).all()
    assert g.sum(-1)[~ok].abs().max() < 1e-13


def test_dtkd_fallback_rows_are_plain_kd_at_tau(gen):
    N, C, tau, alpha, beta = 6, 8, 3.0, 3.0, 1.0
    s, t = randn(gen, N, C) - 9.0, randn(gen, N, C) - 9.0
    s, t = s.clone(), t.clone()
    # an exact x + v == 0 row
    s[0] = s[0] - s[0].max() - 1.5
    t[0] = t[0] - t[0].max() + 1.5
    x, v = t.max(-1).values, s.max(-1).values
    assert ((x + v) <= 0).all() and (x + v)[0] == 0
    kl = kl_closed(t / tau, s / tau)
    assert_close(kdk.dtkd_loss(s, t, tau, alpha, beta, reduction="none", backend=R), (alpha + beta) * tau ** 2 * kl)
    _, g = loss_and_grad(lambda z: kdk.dtkd_loss(z, t, tau, alpha, beta, backend=R), s)
    assert_close(g, (alpha + beta) * tau * (torch.softmax(s / tau, -1) - torch.softmax(t / tau, -1)) / N)


def test_dtkd_tie_in_student_max_goes_to_first_index(gen):
    N, C, tau = 2, 7, 4.0
    s = spaced(gen, N, C, step=0.6, offset=1.0)
    t = randn(gen, N, C) + 2.0
    s = s.clone()
    top = s[0].max().item()
    j = int(s[0].argmin())
    s[0, j] = top  # the max is now tied; the first tied index takes the argmax gradient
    tied = [k for k in range(C) if s[0, k] == top]
    assert len(tied) == 2
    _, grad, _, _, _ = dtkd_closed(s, t, tau, 3.0, 1.0)
    _, g = loss_and_grad(lambda z: kdk.dtkd_loss(z, t, backend=R), s)
    assert_close(g, grad / N)


# ------------------------------------------------------------------------------------------------
# §5 LDRLD
# ------------------------------------------------------------------------------------------------
def test_ldrld_weight_table():
    rel = RankRelation()
    table = ref.ldrld_pair_weights(rel)
    assert table.shape == (7, 7)
    expected = {(1, 2): 0.6886, (1, 7): 0.1788, (6, 7): 0.4176}
    for (r, r2), w in expected.items():
        assert round(table[r - 1, r2 - 1].item(), 4) == w
        assert round(rel.pair_weight(r, r2), 4) == w
        closed = 2.0 * math.exp(-0.05 * (r + r2)) / (abs(r - r2) + 1.5)
        assert abs(rel.pair_weight(r, r2) - closed) < 1e-15
    pairs = [(r, r2) for r in range(1, 8) for r2 in range(r + 1, 8)]
    assert len(pairs) == 21
    assert round(sum(rel.pair_weight(r, r2) for r, r2 in pairs), 4) == 7.7237
    assert round(table.sum().item(), 4) == 7.7237
    # the table holds exactly the r < r' entries, each equal to pair_weight
    for r in range(1, 8):
        for r2 in range(1, 8):
            want = rel.pair_weight(r, r2) if r < r2 else 0.0
            assert abs(table[r - 1, r2 - 1].item() - want) < 1e-15


def ldrld_closed(s, t, k, T, alpha, beta, rank_by, eps=1.5, delta=2.0, lam=0.05):
    """docs/ldrld.md by explicit loops over rows and pairs."""
    N, C = s.shape
    out = []
    for n in range(N):
        key = (s if rank_by == "student" else t)[n].tolist()
        order = sorted(range(C), key=lambda j: -key[j])
        I = order[:k]
        rest = order[k:]
        pair_sum = 0.0
        for r in range(1, k + 1):
            for r2 in range(r + 1, k + 1):
                a, b = I[r - 1], I[r2 - 1]
                pt = torch.sigmoid((t[n, a] - t[n, b]) / T)
                ps = torch.sigmoid((s[n, a] - s[n, b]) / T)
                kl = pt * torch.log(pt / ps) + (1 - pt) * torch.log((1 - pt) / (1 - ps))
                w = delta * math.exp(-lam * (r + r2)) / (abs(r - r2) + eps)
                pair_sum = pair_sum + w * T * T * kl
        set_term = T * T * kl_closed(t[n, I] / T, s[n, I] / T)
        local = (pair_sum + set_term) / (k * (k - 1) / 2 + 1)
        l_rest = T * T * kl_closed(t[n, rest] / T, s[n, rest] / T)
        out.append(alpha * local + beta * l_rest)
    return torch.stack(out)


@pytest.mark.parametrize("rank_by", ["student", "teacher"])
@pytest.mark.parametrize("k,T,alpha,beta,extra", [
    (7, 4.0, 10.5, 7.0, {}),
    (3, 2.0, 1.5, 0.5, {"eps": 0.5, "delta": 1.3, "lam": 0.2}),
    (2, 3.0, 1.0, 2.0, {}),
])
def test_ldrld_closed_form(gen, rank_by, k, T, alpha, beta, extra):
    N, C = 4, 10
    s = spaced(gen, N, C, step=0.5) * 2
    t = spaced(gen, N, C, step=0.5) * 3
    rows = ldrld_closed(s, t, k, T, alpha, beta, rank_by, **extra)
    out = kdk.ldrld_loss(s, t, k, T, alpha, beta, rank_by=rank_by, reduction="none", backend=R, **extra)
    assert_close(out, rows)


# ------------------------------------------------------------------------------------------------
# shift invariance: gradient rows sum to 0 where the loss only sees differences of logits
# ------------------------------------------------------------------------------------------------
SHIFT_INVARIANT = {
    "kd": lambda s, t, y: kdk.kd_loss(s, t, 3.0, backend=R),
    "kd_ce": lambda s, t, y: kdk.kd_loss(s, t, 3.0, labels=y, ce_weight=0.4, backend=R),
    "kd_std": lambda s, t, y: kdk.kd_loss(s, t, 2.0, standardize=True, backend=R),
    "kd_tsm": lambda s, t, y: kdk.kd_loss(s, t, 3.0, labels=y, teacher_topk_scale=TopKScale(k=3), backend=R),
    "dkd": lambda s, t, y: kdk.dkd_loss(s, t, y, backend=R),
    "aekt": lambda s, t, y: kdk.aekt_loss(s, t, y, backend=R),
    "ldrld_student": lambda s, t, y: kdk.ldrld_loss(s, t, 4, backend=R),
    "ldrld_teacher": lambda s, t, y: kdk.ldrld_loss(s, t, 4, rank_by="teacher", backend=R),
    "topkd_no_tdl": lambda s, t, y: kdk.topkd_loss(s, t, y, 3, tdl_weight=0.0, backend=R),
}


@pytest.mark.parametrize("method", sorted(SHIFT_INVARIANT))
def test_gradient_rows_sum_to_zero(gen, method):
    N, C = 6, 10
    fn = SHIFT_INVARIANT[method]
    s, t, y = spaced(gen, N, C) * 2, randn(gen, N, C), randlabels(gen, N, C)
    loss, g = loss_and_grad(lambda x: fn(x, t, y), s)
    assert g.abs().max() > 1e-3
    assert g.sum(-1).abs().max() < 1e-12 * g.abs().max(), g.sum(-1)
    shifted = fn(s + 3.25, t, y)
    assert_close(shifted, loss, tol=1e-12)


def test_dtkd_and_tdl_rows_do_not_sum_to_zero(gen):
    N, C = 4, 10
    s, t, y = spaced(gen, N, C, offset=1.0) * 2, randn(gen, N, C) + 2.0, randlabels(gen, N, C)
    _, g = loss_and_grad(lambda x: kdk.dtkd_loss(x, t, backend=R), s)
    assert (g.sum(-1).abs() > 1e-8).all()
    _, g = loss_and_grad(lambda x: kdk.topkd_loss(x, t, y, 3, backend=R), s)
    assert (g.sum(-1).abs() > 1e-8).all()


# ------------------------------------------------------------------------------------------------
# §6 TopKD: TSM and TDL on hand-made rows
# ------------------------------------------------------------------------------------------------
def _tsm_case():
    # row A, k = 2 (defaults scale = shift = gt_scale = 0.5); top-2: class 1 (3.0, r=1), class 3 (2.0, r=2)
    # gap = (3 + 2)/2 − (1 − 0.5 + 0.25 − 1.5)/4 = 2.5 + 0.1875 = 2.6875; shift·gap = 1.34375
    # w_1 = 1 + 0.5·2/2 = 1.5, w_2 = 1 + 0.5·1/2 = 1.25
    tA = [1.0, 3.0, -0.5, 2.0, 0.25, -1.5, 0.75]
    sg = 0.5 * ((3.0 + 2.0) / 2 - (1.0 - 0.5 + 0.25 - 1.5 + 0.75) / 5)
    tA_nolab = [1.0, 1.5 * 3.0 + sg, -0.5, 1.25 * 2.0 + sg, 0.25, -1.5, 0.75]
    tA_y0 = [1.5 * 1.0 + sg] + tA_nolab[1:]           # y = 0 ∉ top-k: t'_y = (1 + 0.5)·t_y + shift·gap
    return tA, tA_nolab, tA_y0


def test_tsm_hand_made_rows(gen):
    T = 2.0
    tA, tA_nolab, tA_y0 = _tsm_case()
    t = torch.tensor([tA, tA, tA], dtype=DT)
    s = randn(gen, 3, 7)
    y = torch.tensor([0, 3, 1])        # outside the top-k, inside (rank 2), inside (rank 1)
    t_lab = torch.tensor([tA_y0, tA_nolab, tA_nolab], dtype=DT)
    t_nolab = torch.tensor([tA_nolab] * 3, dtype=DT)
    want_lab = kdk.kd_loss(s, t_lab, T, reduction="none", backend=R)
    want_nolab = kdk.kd_loss(s, t_nolab, T, reduction="none", backend=R)
    assert_close(want_lab, T * T * kl_closed(t_lab / T, s / T))
    tsm = TopKScale(k=2)
    assert_close(kdk.topkd_loss(s, t, y, 2, T, tdl_weight=0.0, reduction="none", backend=R), want_lab)
    assert_close(kdk.topkd_loss(s, t, None, 2, T, tdl_weight=0.0, reduction="none", backend=R), want_nolab)
    assert_close(kdk.kd_loss(s, t, T, labels=y, teacher_topk_scale=tsm, reduction="none", backend=R), want_lab)
    assert_close(kdk.kd_loss(s, t, T, teacher_topk_scale=dict(k=2), reduction="none", backend=R), want_nolab)
    # TSM as an option of dkd (labels always given there: the t'_y rule is on)
    assert_close(kdk.dkd_loss(s, t, y, 1.0, 8.0, T, teacher_topk_scale=tsm, reduction="none", backend=R),
                 kdk.dkd_loss(s, t_lab, y, 1.0, 8.0, T, reduction="none", backend=R))
    # the teacher transform carries no gradient: grad = T(q − p')/N
    _, g = loss_and_grad(lambda x: kdk.topkd_loss(x, t, y, 2, T, tdl_weight=0.0, backend=R), s)
    assert_close(g, T * (torch.softmax(s / T, -1) - torch.softmax(t_lab / T, -1)) / 3)
    # the TSM helper itself
    assert_close(ref.topk_scale(t, tsm, y), t_lab, tol=1e-15)
    assert_close(ref.topk_scale(t, tsm, None), t_nolab, tol=1e-15)


def test_tsm_hand_made_row_custom_constants(gen):
    # k = 3, scale = 0.3, shift = 0.2, gt_scale = 0.7; C = 8
    t0 = [0.5, -1.0, 2.5, 1.5, -2.0, 4.0, -1.5, 0.0]
    # top-3: class 5 (4.0, r=1), class 2 (2.5, r=2), class 3 (1.5, r=3)
    top_mean = (4.0 + 2.5 + 1.5) / 3
    rest_mean = (0.5 - 1.0 - 2.0 - 1.5 + 0.0) / 5
    sg = 0.2 * (top_mean - rest_mean)
    w1, w2, w3 = 1 + 0.3 * 3 / 3, 1 + 0.3 * 2 / 3, 1 + 0.3 * 1 / 3
    nolab = [0.5, -1.0, w2 * 2.5 + sg, w3 * 1.5 + sg, -2.0, w1 * 4.0 + sg, -1.5, 0.0]
    y4 = list(nolab)
    y4[4] = 1.7 * -2.0 + sg
    t = torch.tensor([t0, t0, t0], dtype=DT)
    y = torch.tensor([4, 5, 3])
    t_lab = torch.tensor([y4, nolab, nolab], dtype=DT)
    s = randn(gen, 3, 8)
    T = 3.0
    kw = dict(scale=0.3, shift=0.2, gt_scale=0.7, tdl_weight=0.0, reduction="none", backend=R)
    assert_close(kdk.topkd_loss(s, t, y, 3, T, **kw), T * T * kl_closed(t_lab / T, s / T))
    tsm = TopKScale(k=3, scale=0.3, shift=0.2, gt_scale=0.7)
    assert_close(kdk.kd_loss(s, t, T, labels=y, teacher_topk_scale=tsm, reduction="none", backend=R),
                 T * T * kl_closed(t_lab / T, s / T))
    # kd_weight scales only the KD term
    kw["kd_weight"] = 0.3
    assert_close(kdk.topkd_loss(s, t, y, 3, T, **kw), 0.3 * T * T * kl_closed(t_lab / T, s / T))


def _cos(u, v):
    dot = sum(a * b for a, b in zip(u, v))
    nu = math.sqrt(sum(a * a for a in u))
    nv = math.sqrt(sum(b * b for b in v))
    return dot / max(nu * nv, 1e-8)


def test_tdl_hand_made_row_identity_tsm():
    # TSM off (scale = shift = gt_scale = 0): t' = t. k = 2, C = 7.
    t = [0.5, 3.0, -1.0, 2.0, -2.5, 1.0, -0.25]
    s = [1.0, 2.0, -0.5, 1.5, -1.0, 0.5, 0.25]
    pos, neg, non = [1, 3], [4, 2], [0, 5, 6]
    a, b, c = 0.7, 1.3, 2.1
    tdl = sum(wt * (1 - _cos([s[i] for i in grp], [t[i] for i in grp]))
              for wt, grp in ((a, pos), (b, neg), (c, non)))
    st, tt = torch.tensor([s], dtype=DT), torch.tensor([t], dtype=DT)
    out = kdk.topkd_loss(st, tt, None, 2, 4.0, scale=0.0, shift=0.0, gt_scale=0.0, kd_weight=0.0,
                         tdl_weight=0.8, tdl_weights=(a, b, c), reduction="none", backend=R)
    assert_close(out, torch.tensor([0.8 * tdl], dtype=DT), tol=1e-13)


def test_tdl_groups_follow_transformed_teacher():
    # default TSM, k = 2, y = 5 ∉ top-2 of t but t'_5 enters the top-2 of t' (Pos = {1, 5}).
    t = [0.5, 3.0, -1.0, 2.0, -2.5, 1.9, -0.25]
    s = [1.0, 2.0, -0.5, 1.5, -1.0, 0.5, 0.25]
    sg = 0.5 * ((3.0 + 2.0) / 2 - (0.5 - 1.0 - 2.5 + 1.9 - 0.25) / 5)
    tp = list(t)
    tp[1] = 1.5 * 3.0 + sg
    tp[3] = 1.25 * 2.0 + sg
    tp[5] = 1.5 * 1.9 + sg
    assert sorted(range(7), key=lambda j: -tp[j])[:2] == [1, 5]
    pos, neg, non = [1, 5], [4, 2], [0, 3, 6]
    tdl = sum(1 - _cos([s[i] for i in grp], [tp[i] for i in grp]) for grp in (pos, neg, non))
    st, tt = torch.tensor([s], dtype=DT), torch.tensor([t], dtype=DT)
    y = torch.tensor([5])
    out = kdk.topkd_loss(st, tt, y, 2, 4.0, kd_weight=0.0, reduction="none", backend=R)
    assert_close(out, torch.tensor([tdl], dtype=DT), tol=1e-13)
    # total = KD at t' + TDL
    T = 4.0
    kd = T * T * kl_closed(torch.tensor([tp], dtype=DT) / T, st / T)
    out = kdk.topkd_loss(st, tt, y, 2, T, reduction="none", backend=R)
    assert_close(out, kd + tdl, tol=1e-13)


# ------------------------------------------------------------------------------------------------
# §7 AEKT
# ------------------------------------------------------------------------------------------------
def test_aekt_adaptive_weight_and_no_gradient_through_it(gen):
    N, C, T, alpha, beta, wmax = 8, 7, 2.0, 1.3, 5.0, 3.0
    s, t, y = randn(gen, N, C), randn(gen, N, C), randlabels(gen, N, C)
    t = t.clone()
    s = s.clone()
    r = torch.arange(N)
    # rows 0-2: confident teacher, unsure student: p_y/q_y > w_max (clamped)
    t[r[:3], y[:3]] = t[:3].max(-1).values + 6.0
    s[r[:3], y[:3]] = s[:3].min(-1).values - 1.0
    # rows 3-5: confident student (q_y > 0.55), teacher at its mean: p_y/q_y < 2 < w_max (unclamped)
    s[r[3:6], y[3:6]] = s[3:6].max(-1).values + 4.0
    t[r[3:6], y[3:6]] = t[3:6].mean(-1)

    def closed(x, detach=True):
        p, q = torch.softmax(t / T, -1), torch.softmax(x / T, -1)
        ratio = p.gather(1, y[:, None])[:, 0] / q.gather(1, y[:, None])[:, 0]
        w = torch.clamp(ratio, max=wmax)
        if detach:
            w = w.detach()
        tc, nc = tckd_nckd_closed(x, t, y, T)
        return T * T * (alpha * w * tc + beta * nc), ratio

    rows, ratio = closed(s)
    assert (ratio[:3] > wmax).all() and (ratio[3:6] < wmax).all()
    out = kdk.aekt_loss(s, t, y, alpha, beta, T, max_weight=wmax, reduction="none", backend=R)
    assert_close(out, rows)
    _, g = loss_and_grad(lambda x: kdk.aekt_loss(x, t, y, alpha, beta, T, max_weight=wmax, backend=R), s)
    _, g_det = loss_and_grad(lambda x: closed(x)[0].mean(), s)
    _, g_live = loss_and_grad(lambda x: closed(x, detach=False)[0].mean(), s)
    assert_close(g, g_det)
    assert rel_err(g, g_live) > 1e-3, "the check must be able to see a gradient through w"
    # w = max_weight on every row: AEKT is DKD with α·w_max
    s2, t2 = randn(gen, N, C), randn(gen, N, C)
    t2[r, y] = t2.max(-1).values + 6.0
    s2[r, y] = s2.min(-1).values - 1.0
    p2, q2 = torch.softmax(t2 / T, -1), torch.softmax(s2 / T, -1)
    assert (p2.gather(1, y[:, None]) / q2.gather(1, y[:, None]) > wmax).all()
    out = kdk.aekt_loss(s2, t2, y, alpha, beta, T, max_weight=wmax, reduction="none", backend=R)
    ref_dkd = kdk.dkd_loss(s2, t2, y, alpha * wmax, beta, T, reduction="none", backend=R)
    assert_close(out, ref_dkd)


def test_aekt_defaults(gen):
    N, C = 5, 6
    s, t, y = randn(gen, N, C), randn(gen, N, C), randlabels(gen, N, C)
    p, q = torch.softmax(t / 4, -1), torch.softmax(s / 4, -1)
    w = torch.clamp(p.gather(1, y[:, None])[:, 0] / q.gather(1, y[:, None])[:, 0], max=10.0)
    tc, nc = tckd_nckd_closed(s, t, y, 4.0)
    assert_close(kdk.aekt_loss(s, t, y, backend=R), (16 * (w * tc + 8 * nc)).mean())


# ------------------------------------------------------------------------------------------------
# §8 contrastive terms
# ------------------------------------------------------------------------------------------------
def info_nce_loop(a, b, tau):
    G, M, _ = a.shape
    total = 0.0
    for g in range(G):
        an = a[g] / a[g].norm(dim=-1, keepdim=True)
        bn = b[g] / b[g].norm(dim=-1, keepdim=True)
        S = an @ bn.T / tau
        target = torch.arange(M)
        total = total + 0.5 * (F.cross_entropy(S, target) + F.cross_entropy(S.T, target))
    return total / G


@pytest.mark.parametrize("G,M,D,tau", [(1, 5, 4, 0.1), (3, 6, 8, 0.5), (2, 1, 3, 0.2)])
def test_info_nce_explicit_loop(gen, G, M, D, tau):
    a, b = randn(gen, G, M, D), randn(gen, G, M, D)
    l1, g1 = loss_and_grad(lambda x: kdk.info_nce(x, b, tau, backend=R), a)
    l2, g2 = loss_and_grad(lambda x: info_nce_loop(x, b, tau), a)
    assert l1.dim() == 0
    assert_close(l1, l2, tol=1e-12)
    assert_close(g1, g2, tol=1e-10)
    if G == 1:  # [M, D] is one group
        assert_close(kdk.info_nce(a[0], b[0], tau, backend=R), l2, tol=1e-12)


def test_info_nce_default_tau(gen):
    a, b = randn(gen, 2, 4, 5), randn(gen, 2, 4, 5)
    assert_close(kdk.info_nce(a, b, backend=R), info_nce_loop(a, b, 0.1), tol=1e-12)


def _pool(f, g):
    N, D, H, W = f.shape
    return f.reshape(N, D, g, H // g, g, W // g).mean((3, 5))


def msd_loop(fs, ft, scales, tau, sw, fw):
    N, D = fs.shape[:2]
    sample, feature = [], []
    for g in scales:
        ps, pt = _pool(fs, g), _pool(ft, g)
        for i in range(g):
            for j in range(g):
                sample.append(info_nce_loop(ps[None, :, :, i, j], pt[None, :, :, i, j], tau))
        feature.append(info_nce_loop(ps.transpose(0, 1).reshape(1, D, N * g * g),
                                     pt.transpose(0, 1).reshape(1, D, N * g * g), tau))
    return sw * sum(sample) / len(sample) + fw * sum(feature) / len(feature)


@pytest.mark.parametrize("scales,tau,sw,fw", [((1, 2, 4), 0.1, 1.0, 1.0), ((2,), 0.3, 0.7, 1.9),
                                               ((1, 4), 0.2, 0.0, 1.0)])
def test_msd_explicit_loop(gen, scales, tau, sw, fw):
    N, D, H, W = 3, 5, 8, 8
    fs, ft = randn(gen, N, D, H, W), randn(gen, N, D, H, W)
    l1, g1 = loss_and_grad(lambda x: kdk.msd_contrastive_loss(x, ft, scales, tau, sw, fw, backend=R), fs)
    l2, g2 = loss_and_grad(lambda x: msd_loop(x, ft, scales, tau, sw, fw), fs)
    assert_close(l1, l2, tol=1e-12)
    assert_close(g1, g2, tol=1e-10)


def test_msd_default_scales(gen):
    fs, ft = randn(gen, 2, 3, 4, 4), randn(gen, 2, 3, 4, 4)
    assert_close(kdk.msd_contrastive_loss(fs, ft, backend=R), msd_loop(fs, ft, (1, 2, 4), 0.1, 1.0, 1.0),
                 tol=1e-12)


def test_topkd_contrastive_term_is_info_nce_of_logit_rows(gen):
    N, C, T = 5, 11, 4.0
    s, t, y = randn(gen, N, C), randn(gen, N, C), randlabels(gen, N, C)
    base = kdk.topkd_loss(s, t, y, 3, T, backend=R)
    out = kdk.topkd_loss(s, t, y, 3, T, contrastive_weight=0.6, contrastive_tau=0.3, backend=R)
    assert_close(out - base, 0.6 * info_nce_loop(s[None], t[None], 0.3), tol=1e-10)
    out = kdk.topkd_loss(s, t, y, 3, T, contrastive_weight=0.6, contrastive_tau=0.3, reduction="sum", backend=R)
    base = kdk.topkd_loss(s, t, y, 3, T, reduction="sum", backend=R)
    assert_close(out - base, 0.6 * info_nce_loop(s[None], t[None], 0.3), tol=1e-10)


def test_teacher_requires_grad_gets_its_gradient(gen):
    """Online/mutual distillation: a teacher that requires grad gets the gradient of the formula (never
    silently dropped); the contrastive terms' teacher stays a constant (documented)."""
    N, C = 4, 9
    s = randn(gen, N, C).requires_grad_(True)
    t = randn(gen, N, C).requires_grad_(True)
    y = randlabels(gen, N, C)
    loss = (kdk.kd_loss(s, t, backend=R) + kdk.dkd_loss(s, t, y, backend=R) + kdk.dtkd_loss(s, t, backend=R)
            + kdk.ldrld_loss(s, t, 3, rank_by="teacher", backend=R) + kdk.topkd_loss(s, t, y, 2, backend=R)
            + kdk.aekt_loss(s, t, y, backend=R))
    loss.backward()
    assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().max() > 0
    assert s.grad is not None and torch.isfinite(s.grad).all()
    s.grad = t.grad = None
    kdk.info_nce(s[None], t[None], backend=R).backward()
    assert t.grad is None and s.grad is not None


# ------------------------------------------------------------------------------------------------
# float64 gradcheck of every loss through the public API
# ------------------------------------------------------------------------------------------------
def _gc(fn, *inputs):
    inputs = tuple(x.detach().clone().requires_grad_(True) for x in inputs)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


GC_N, GC_C = 3, 7


def _gc_inputs(gen):
    s = spaced(gen, GC_N, GC_C, step=0.5, offset=1.0) * 2
    t = spaced(gen, GC_N, GC_C, step=0.5, offset=1.5) * 2
    y = randlabels(gen, GC_N, GC_C)
    return s, t, y


def test_gradcheck_kd_scalar_and_per_row_temperature(gen):
    s, t, _ = _gc_inputs(gen)
    _gc(lambda x: kdk.kd_loss(x, t, 2.5, backend=R), s)
    T = 1 + torch.rand(GC_N, generator=gen, dtype=DT) * 3
    _gc(lambda x: kdk.kd_loss(x, t, T, backend=R), s)


def test_gradcheck_kd_learnable_temperature(gen):
    s, t, _ = _gc_inputs(gen)
    _gc(lambda x, T: kdk.kd_loss(x, t, T, backend=R), s, torch.tensor(2.3, dtype=DT))
    _gc(lambda x, T: kdk.kd_loss(x, t, T, reduction="sum", backend=R), s,
        1 + torch.rand(GC_N, generator=gen, dtype=DT) * 3)


def test_gradcheck_kd_options(gen):
    s, t, y = _gc_inputs(gen)
    _gc(lambda x: kdk.kd_loss(x, t, 2.0, standardize=True, backend=R), s)
    _gc(lambda x: kdk.kd_loss(x, t, 3.0, labels=y, teacher_topk_scale=TopKScale(k=2), backend=R), s)
    _gc(lambda x: kdk.kd_loss(x, t, 3.0, labels=y, ce_weight=0.5, backend=R), s)


def test_gradcheck_dkd_and_aekt(gen):
    s, t, y = _gc_inputs(gen)
    _gc(lambda x: kdk.dkd_loss(x, t, y, 1.0, 8.0, 3.0, backend=R), s)
    _gc(lambda x: kdk.dkd_loss(x, t, y, 1.0, 8.0, 2.0, standardize=True, backend=R), s)
    # AEKT treats w = min(p_y/q_y, w_max) as a constant, which is only the exact derivative where w is
    # clamped: gradcheck it with every row clamped (the unclamped case is test_aekt_adaptive_weight…)
    t2, s2 = t.clone(), s.clone()
    t2[torch.arange(GC_N), y] = t.max(-1).values + 8.0
    s2[torch.arange(GC_N), y] = s.min(-1).values - 1.0
    p, q = torch.softmax(t2 / 3, -1), torch.softmax(s2 / 3, -1)
    assert (p.gather(1, y[:, None]) / q.gather(1, y[:, None]) > 1.5).all()
    _gc(lambda x: kdk.aekt_loss(x, t2, y, 1.0, 8.0, 3.0, max_weight=1.2, backend=R), s2)


def test_gradcheck_dtkd_argmax_path(gen):
    s, t, _ = _gc_inputs(gen)
    s, t = s.clone(), t.clone()
    s[1] -= 4.0   # negative student max, x + v > 0
    s[2] -= 30.0  # fallback row, far from x + v = 0
    x, v = t.max(-1).values, s.max(-1).values
    assert (x + v)[:2].min() > 0.5 and (x + v)[2] < -5
    _gc(lambda z: kdk.dtkd_loss(z, t, 4.0, 3.0, 1.0, backend=R), s)
    _gc(lambda z: kdk.dtkd_loss(z, t, 2.0, 0.7, 0.3, standardize=True, backend=R), s)


@pytest.mark.parametrize("rank_by", ["student", "teacher"])
def test_gradcheck_ldrld(gen, rank_by):
    s, t, _ = _gc_inputs(gen)
    _gc(lambda x: kdk.ldrld_loss(x, t, 3, 4.0, rank_by=rank_by, backend=R), s)


def test_gradcheck_topkd(gen):
    N, C = 2, 7
    s = spaced(gen, N, C) * 2
    t = spaced(gen, N, C) * 2
    y = randlabels(gen, N, C)
    _gc(lambda x: kdk.topkd_loss(x, t, y, 2, 4.0, backend=R), s)
    _gc(lambda x: kdk.topkd_loss(x, t, None, 3, 2.0, tdl_weights=(0.5, 1.5, 2.0), backend=R), s)
    _gc(lambda x: kdk.topkd_loss(x, t, y, 2, 4.0, contrastive_weight=0.5, backend=R), s)


def test_gradcheck_info_nce_and_msd(gen):
    b = randn(gen, 2, 4, 3)
    _gc(lambda a: kdk.info_nce(a, b, 0.2, backend=R), randn(gen, 2, 4, 3))
    ft = randn(gen, 3, 2, 2, 2)
    _gc(lambda f: kdk.msd_contrastive_loss(f, ft, (1, 2), 0.5, 0.7, 1.3, backend=R), randn(gen, 3, 2, 2, 2))


# ------------------------------------------------------------------------------------------------
# masked (-inf) classes, ignored rows, all-ignored batch, leading dims, bad labels — every method
# ------------------------------------------------------------------------------------------------
METHODS = {
    "kd": lambda s, t, y, **kw: kdk.kd_loss(s, t, 3.0, labels=y, **kw),
    "kd_row_T": lambda s, t, y, **kw: kdk.kd_loss(
        s, t, torch.linspace(1.5, 3.5, math.prod(s.shape[:-1]), dtype=s.dtype).reshape(s.shape[:-1]),
        labels=y, **kw),
    "kd_std": lambda s, t, y, **kw: kdk.kd_loss(s, t, 2.0, labels=y, standardize=True, **kw),
    "kd_ce": lambda s, t, y, **kw: kdk.kd_loss(s, t, 3.0, labels=y, ce_weight=0.5, **kw),
    "kd_tsm": lambda s, t, y, **kw: kdk.kd_loss(s, t, 3.0, labels=y, teacher_topk_scale=TopKScale(k=2), **kw),
    "dkd": lambda s, t, y, **kw: kdk.dkd_loss(s, t, y, 1.0, 8.0, 3.0, **kw),
    "dkd_std": lambda s, t, y, **kw: kdk.dkd_loss(s, t, y, 1.0, 8.0, 2.0, standardize=True, **kw),
    "aekt": lambda s, t, y, **kw: kdk.aekt_loss(s, t, y, **kw),
    "dtkd": lambda s, t, y, **kw: kdk.dtkd_loss(s, t, labels=y, **kw),
    "ldrld_student": lambda s, t, y, **kw: kdk.ldrld_loss(s, t, 3, labels=y, **kw),
    "ldrld_teacher": lambda s, t, y, **kw: kdk.ldrld_loss(s, t, 3, rank_by="teacher", labels=y, **kw),
    "topkd": lambda s, t, y, **kw: kdk.topkd_loss(s, t, y, 2, **kw),
}
def _method_params():
    return [pytest.param(name) for name in sorted(METHODS)]


def _inputs(gen, N, C, offset=1.0):
    s = spaced(gen, N, C, step=0.5, offset=offset) * 2
    t = spaced(gen, N, C, step=0.5, offset=offset + 0.5) * 2
    return s, t


@pytest.mark.parametrize("method", _method_params())
def test_masked_classes_equal_dropped_columns(gen, method):
    """-inf at the same classes of s and t (never in a top-k, never a label): finite loss and gradient,
    equal to the loss of the row with those classes removed; masked columns get gradient 0."""
    fn = METHODS[method]
    N, C, drop = 4, 10, 2
    s, t = _inputs(gen, N, C)
    y = t.argmax(-1)
    masked = []
    for n in range(N):
        # mask two of the 5 smallest classes of s + t (never the label), the same in s and t
        low = [j for j in torch.argsort(s[n] + t[n]).tolist() if j != int(y[n])][:5]
        masked.append(sorted(low[n % 3: n % 3 + drop]))
    s_m, t_m = s.clone(), t.clone()
    for n in range(N):
        s_m[n, masked[n]] = -math.inf
        t_m[n, masked[n]] = -math.inf
    loss, g = loss_and_grad(lambda x: fn(x, t_m, y, reduction="none", backend=R), s_m, reduce_sum=True)
    assert torch.isfinite(loss).all(), loss
    assert torch.isfinite(g).all(), g
    for n in range(N):
        keep = [j for j in range(C) if j not in masked[n]]
        yk = torch.tensor([keep.index(int(y[n]))])
        sn, tn = s[n, keep][None], t[n, keep][None]
        kw = dict(reduction="none", backend=R)
        if method == "kd_row_T":  # the row's own temperature
            T_n = torch.linspace(1.5, 3.5, N, dtype=DT)[n].reshape(1)
            ln, gn = loss_and_grad(lambda x: kdk.kd_loss(x, tn, T_n, labels=yk, **kw), sn, reduce_sum=True)
        else:
            ln, gn = loss_and_grad(lambda x: fn(x, tn, yk, **kw), sn, reduce_sum=True)
        assert_close(loss[n], ln[0], tol=1e-12, what=f"row {n} loss")
        assert_close(g[n, keep], gn[0], tol=1e-10, what=f"row {n} grad")
        assert (g[n, masked[n]] == 0).all()


def test_masked_classes_learnable_temperature(gen):
    """Regression: ∂(s/T)/∂T = −s/T² is −inf at a masked class; 0·inf must not make dT NaN."""
    N, C = 3, 8
    s, t = _inputs(gen, N, C)
    s_m, t_m = s.clone(), t.clone()
    lo = torch.argsort(s[0] + t[0])[:2]
    s_m[:, lo], t_m[:, lo] = -math.inf, -math.inf
    keep = [j for j in range(C) if j not in lo.tolist()]
    T = torch.tensor(2.5, dtype=DT, requires_grad=True)
    gT, = torch.autograd.grad(kdk.kd_loss(s_m, t_m, T, backend=R), T)
    T2 = torch.tensor(2.5, dtype=DT, requires_grad=True)
    gT2, = torch.autograd.grad(kdk.kd_loss(s[:, keep], t[:, keep], T2, backend=R), T2)
    assert_close(gT, gT2, tol=1e-12)


@pytest.mark.parametrize("method", _method_params())
def test_ignored_rows(gen, method):
    fn = METHODS[method]
    N, C = 7, 9
    s, t = _inputs(gen, N, C)
    y = randlabels(gen, N, C)
    ign = torch.tensor([1, 4, 5])
    y_ign = y.clone()
    y_ign[ign] = -100
    keep = torch.tensor([0, 2, 3, 6])
    rows, g_none = loss_and_grad(lambda x: fn(x, t, y_ign, reduction="none", backend=R), s, reduce_sum=True)
    assert (rows[ign] == 0).all() and (g_none[ign] == 0).all()
    assert (rows[keep] != 0).all()
    loss, g = loss_and_grad(lambda x: fn(x, t, y_ign, backend=R), s)
    assert (g[ign] == 0).all()
    # method-by-method: the valid rows alone (kd_row_T's temperatures depend on N: compare via "none")
    if method == "kd_row_T":
        assert_close(loss, rows.sum() / len(keep), tol=1e-13)
        assert_close(g, g_none / len(keep), tol=1e-13)
        return
    ref_loss, ref_g = loss_and_grad(lambda x: fn(x, t[keep], y[keep], backend=R), s[keep])
    assert_close(loss, ref_loss, tol=1e-12, what="batchmean counts valid rows only")
    assert_close(g[keep], ref_g, tol=1e-12)
    assert_close(rows[keep], fn(s[keep], t[keep], y[keep], reduction="none", backend=R), tol=1e-12)
    s_sum = fn(s, t, y_ign, reduction="sum", backend=R)
    assert_close(s_sum, rows.sum(), tol=1e-13)


def test_custom_ignore_index(gen):
    N, C = 5, 6
    s, t = _inputs(gen, N, C)
    y = torch.tensor([1, -1, 3, -1, 0])
    rows = kdk.dkd_loss(s, t, y, ignore_index=-1, reduction="none", backend=R)
    assert (rows[[1, 3]] == 0).all() and (rows[[0, 2, 4]] > 0).all()
    keep = torch.tensor([0, 2, 4])
    assert_close(kdk.dkd_loss(s, t, y, ignore_index=-1, backend=R),
                 kdk.dkd_loss(s[keep], t[keep], y[keep], backend=R), tol=1e-13)


@pytest.mark.parametrize("method", _method_params())
def test_all_ignored_batch_is_exactly_zero(gen, method):
    fn = METHODS[method]
    N, C = 4, 9
    s, t = _inputs(gen, N, C)
    y = torch.full((N,), -100)
    for reduction in ("batchmean", "sum"):
        loss, g = loss_and_grad(lambda x: fn(x, t, y, reduction=reduction, backend=R), s)
        assert loss.dim() == 0 and loss.item() == 0.0, (reduction, loss)
        assert (g == 0).all()
    rows, g = loss_and_grad(lambda x: fn(x, t, y, reduction="none", backend=R), s, reduce_sum=True)
    assert rows.shape == (N,) and (rows == 0).all() and (g == 0).all()


def test_all_ignored_batch_learnable_temperature(gen):
    s, t = _inputs(gen, 3, 6)
    T = torch.tensor(3.0, dtype=DT, requires_grad=True)
    loss = kdk.kd_loss(s, t, T, labels=torch.full((3,), -100), backend=R)
    gT, = torch.autograd.grad(loss, T)
    assert loss.item() == 0.0 and gT.item() == 0.0


@pytest.mark.parametrize("method", _method_params())
def test_leading_dims_are_flattened(gen, method):
    fn = METHODS[method]
    B, L, C = 2, 3, 9
    s, t = _inputs(gen, B * L, C)
    y = randlabels(gen, B * L, C)
    y[4] = -100
    s3, t3, y3 = s.reshape(B, L, C), t.reshape(B, L, C), y.reshape(B, L)
    rows3 = fn(s3, t3, y3, reduction="none", backend=R)
    assert rows3.shape == (B, L)
    assert_close(rows3.reshape(-1), fn(s, t, y, reduction="none", backend=R), tol=1e-14)
    l3, g3 = loss_and_grad(lambda x: fn(x, t3, y3, backend=R), s3)
    l2, g2 = loss_and_grad(lambda x: fn(x, t, y, backend=R), s)
    assert g3.shape == (B, L, C)
    assert_close(l3, l2, tol=1e-14)
    assert_close(g3.reshape(-1, C), g2, tol=1e-14)


@pytest.mark.parametrize("method", _method_params())
def test_bad_labels_nan_rows_only(gen, method):
    fn = METHODS[method]
    N, C = 6, 9
    s, t = _inputs(gen, N, C)
    y = randlabels(gen, N, C)
    y_bad = y.clone()
    bad = torch.tensor([1, 3, 4])
    y_bad[bad] = torch.tensor([C, -1, 10 ** 6])
    good = torch.tensor([0, 2, 5])
    rows = fn(s, t, y_bad, reduction="none", backend=R)   # never an IndexError
    assert torch.isnan(rows[bad]).all()
    assert torch.isfinite(rows[good]).all()
    loss, g = loss_and_grad(lambda x: fn(x, t, y_bad, reduction="sum", backend=R), s)
    assert torch.isnan(loss)
    assert torch.isfinite(g[good]).all()
    if method == "kd_row_T":
        _, g_ref = loss_and_grad(lambda x: fn(x, t, y, reduction="none", backend=R), s, reduce_sum=True)
        assert_close(g[good], g_ref[good], tol=1e-13)
        return
    _, g_ref = loss_and_grad(lambda x: fn(x, t[good], y[good], reduction="sum", backend=R), s[good])
    assert_close(g[good], g_ref, tol=1e-13)


def test_results_dtype(gen):
    s, t = randn(gen, 3, 7).float(), randn(gen, 3, 7).float()
    for dtype, want in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                        (torch.float16, torch.float32), (torch.float64, torch.float64)):
        x = s.to(dtype).requires_grad_(True)
        loss = kdk.kd_loss(x, t.to(dtype), backend=R)
        assert loss.dtype == want
        g, = torch.autograd.grad(loss, x)
        assert g.dtype == dtype
        assert torch.isfinite(loss) and torch.isfinite(g).all()


def test_empty_batch(gen):
    s, t = torch.empty(0, 6, dtype=DT), torch.empty(0, 6, dtype=DT)
    for reduction in ("batchmean", "sum"):
        out = kdk.kd_loss(s, t, reduction=reduction, backend=R)
        assert out.dim() == 0 and out.item() == 0.0
    assert kdk.dkd_loss(s, t, torch.empty(0, dtype=torch.long), reduction="none", backend=R).shape == (0,)


def test_topkd_contrastive_term_skips_ignored_rows(gen):
    """Regression: ignored rows must stay out of topkd's batch-coupled InfoNCE group (docs/conventions.md)."""
    N, C = 6, 9
    s, t = spaced(gen, N, C) * 2, spaced(gen, N, C) * 2
    y = randlabels(gen, N, C)
    y_ign = y.clone()
    y_ign[[1, 4]] = -100
    keep = torch.tensor([0, 2, 3, 5])
    kw = dict(contrastive_weight=0.5, backend=R)
    loss, g = loss_and_grad(lambda x: kdk.topkd_loss(x, t, y_ign, 2, **kw), s)
    assert (g[[1, 4]] == 0).all(), g[[1, 4]]
    assert_close(loss, kdk.topkd_loss(s[keep], t[keep], y[keep], 2, **kw), tol=1e-12)
    assert kdk.topkd_loss(s, t, torch.full((N,), -100), 2, **kw).item() == 0.0


def test_topkd_contrastive_term_masked_classes_finite(gen):
    """Regression: -inf classes must not make the L2-normalised logit rows NaN."""
    N, C = 5, 10
    s, t = spaced(gen, N, C, offset=1.0) * 2, spaced(gen, N, C, offset=1.0) * 2
    lo = torch.argsort(s[0] + t[0])[:2]
    s, t = s.clone(), t.clone()
    s[:, lo], t[:, lo] = -math.inf, -math.inf
    y = t.argmax(-1)
    loss, g = loss_and_grad(lambda x: kdk.topkd_loss(x, t, y, 2, contrastive_weight=0.5, backend=R), s)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    # the same classes masked in every row: equal to the batch with those columns removed
    keep = [j for j in range(C) if j not in lo.tolist()]
    yk = torch.tensor([keep.index(int(v)) for v in y])
    lk, gk = loss_and_grad(lambda x: kdk.topkd_loss(x, t[:, keep], yk, 2, contrastive_weight=0.5, backend=R),
                           s[:, keep])
    assert_close(loss, lk, tol=1e-12)
    assert_close(g[:, keep], gk, tol=1e-10)
    assert (g[:, lo] == 0).all()


# ------------------------------------------------------------------------------------------------
# §9 the engine: terms compose additively; per-row temperatures work for every method
# ------------------------------------------------------------------------------------------------
def test_engine_terms_are_additive(gen):
    N, C, T = 5, 10, 3.0
    s, t, y = spaced(gen, N, C, offset=1.0) * 2, spaced(gen, N, C, offset=1.5) * 2, randlabels(gen, N, C)
    spec = kdk.LogitDistill(temperature=T, kd_weight=0.5, ce_weight=0.2,
                            decoupled=kdk.Decoupled(alpha=1.5, beta=2.0), dtkd_weight=0.7,
                            relation=RankRelation(k=3, alpha=1.1, beta=0.9),
                            tdl=kdk.TopKDecoupled(k=2, weight=0.6, pos=1.0, neg=0.5, non=2.0), reduction="none")
    kw = dict(reduction="none", backend=R)
    parts = (0.5 * kdk.kd_loss(s, t, T, **kw)
             + 0.2 * F.cross_entropy(s, y, reduction="none")
             + kdk.dkd_loss(s, t, y, 1.5, 2.0, T, **kw)
             + kdk.dtkd_loss(s, t, T, 0.7, 0.0, **kw)
             + kdk.ldrld_loss(s, t, 3, T, 1.1, 0.9, **kw)
             + kdk.topkd_loss(s, t, None, 2, T, scale=0.0, shift=0.0, gt_scale=0.0, kd_weight=0.0,
                              tdl_weight=0.6, tdl_weights=(1.0, 0.5, 2.0), **kw))
    assert_close(kdk.logit_distill(s, t, y, spec, backend=R), parts, tol=1e-12)
    l1, g1 = loss_and_grad(lambda x: kdk.logit_distill(x, t, y, spec.replace(reduction="sum"), backend=R), s)
    l2, g2 = loss_and_grad(lambda x: (0.5 * kdk.kd_loss(x, t, T, reduction="sum", backend=R)
                                      + 0.2 * F.cross_entropy(x, y, reduction="sum")
                                      + kdk.dkd_loss(x, t, y, 1.5, 2.0, T, reduction="sum", backend=R)
                                      + kdk.dtkd_loss(x, t, T, 0.7, 0.0, reduction="sum", backend=R)
                                      + kdk.ldrld_loss(x, t, 3, T, 1.1, 0.9, reduction="sum", backend=R)
                                      + kdk.topkd_loss(x, t, None, 2, T, scale=0.0, shift=0.0, gt_scale=0.0,
                                                       kd_weight=0.0, tdl_weight=0.6, tdl_weights=(1.0, 0.5, 2.0),
                                                       reduction="sum", backend=R)), s)
    assert_close(l1, l2, tol=1e-12)
    assert_close(g1, g2, tol=1e-10)


PER_ROW_T = {
    "kd": lambda s, t, y, T, **kw: kdk.kd_loss(s, t, T, **kw),
    "dkd": lambda s, t, y, T, **kw: kdk.dkd_loss(s, t, y, 1.0, 8.0, T, **kw),
    "aekt": lambda s, t, y, T, **kw: kdk.aekt_loss(s, t, y, 1.0, 8.0, T, **kw),
    "dtkd": lambda s, t, y, T, **kw: kdk.dtkd_loss(s, t, T, **kw),
    "ldrld": lambda s, t, y, T, **kw: kdk.ldrld_loss(s, t, 3, T, **kw),
    "topkd": lambda s, t, y, T, **kw: kdk.topkd_loss(s, t, y, 2, T, **kw),
}


@pytest.mark.parametrize("method", sorted(PER_ROW_T))
def test_per_row_temperature_every_method(gen, method):
    fn = PER_ROW_T[method]
    N, C = 4, 9
    s, t, y = spaced(gen, N, C, offset=1.0) * 2, spaced(gen, N, C, offset=1.5) * 2, randlabels(gen, N, C)
    T = 1.0 + 3.0 * torch.rand(N, generator=gen, dtype=DT)
    rows, g = loss_and_grad(lambda x: fn(x, t, y, T, reduction="none", backend=R), s, reduce_sum=True)
    for n in range(N):
        ln, gn = loss_and_grad(lambda x: fn(x, t[n:n + 1], y[n:n + 1], float(T[n]), reduction="none", backend=R),
                               s[n:n + 1], reduce_sum=True)
        assert_close(rows[n], ln[0], tol=1e-13)
        assert_close(g[n], gn[0], tol=1e-13)
