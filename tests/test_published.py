"""kdkernels' reference vs. independent transcriptions of the published codes (tests/published.py).

Every comparison runs in float64 on fresh seeded random logits and checks the loss and the gradient with
respect to the student logits (``torch.autograd.grad``) to a relative error of 1e-10 (max-abs error over
max-abs value). ``reduction="batchmean"`` is the published codes' ``.mean()`` over rows (or
``sum / N``). Only the deviations that docs/README.md calls out are allowed to differ:

* DKD: log-space ``log(1 - q_y)`` and exact target exclusion instead of ``log`` of summed probabilities and
  ``-1000`` masking. Identical to fp64 precision when the spreads of ``z/T`` are << 1000 (every input
  here); where the published code overflows (very confident student) kdkernels must stay finite.
* DTKD: rows with ``x + v <= 0`` use ``T_s = T_t = tau``; every other row follows the code exactly
  (including rows where one of the maxima is negative and a temperature is negative).
* LDRLD: ``-1000`` masks vs exact restricted softmaxes (identical at these spreads).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import kdkernels as kdk

try:  # tests/ may or may not be a package
    from . import published as pub
except ImportError:  # pragma: no cover - depends on how pytest imports the file
    import published as pub

DT = torch.float64
TOL = 1e-10
BACKEND = "reference"

NS = (1, 5, 16)
CS = (3, 10, 100)
SHAPES = list(itertools.product(NS, CS))


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _gen(*key) -> torch.Generator:
    seed = 0
    for part in key:
        seed = (seed * 1_000_003 + int(round(float(part) * 1000))) % (2**31 - 1)
    return torch.Generator().manual_seed(seed)


def _logits(g, n, c, scale=3.0):
    return torch.randn(n, c, generator=g, dtype=DT) * scale


def _labels(g, n, c):
    return torch.randint(0, c, (n,), generator=g)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.detach().to(DT)
    b = b.detach().to(DT)
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    return diff / scale if scale > 0 else diff


def _assert_close(ours, ref, what, tol=TOL):
    assert torch.isfinite(ref).all(), f"{what}: published value is not finite (bad test input)"
    assert torch.isfinite(ours).all(), f"{what}: kdkernels value is not finite"
    err = _rel_err(ours, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def _loss_and_grad(fn, s):
    s = s.detach().clone().requires_grad_(True)
    loss = fn(s)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad


def _compare(ours_fn, pub_fn, s, what):
    """ours_fn / pub_fn: student logits -> scalar loss. Compares losses and student gradients."""
    l_ours, g_ours = _loss_and_grad(ours_fn, s)
    l_pub, g_pub = _loss_and_grad(pub_fn, s)
    assert l_ours.dtype == DT, f"{what}: loss dtype {l_ours.dtype}, expected float64"
    assert l_ours.dim() == 0, f"{what}: batchmean loss must be a scalar"
    _assert_close(l_ours, l_pub, f"{what} loss")
    _assert_close(g_ours, g_pub, f"{what} grad")


def _dtkd_rows(g, n, c, lo=0.5, hi=8.0):
    """Logits whose row maxima lie in [lo, hi] (so x, v > 0 and x + v >= 2*lo): the regular DTKD case."""
    z = _logits(g, n, c)
    target_max = lo + (hi - lo) * torch.rand(n, 1, generator=g, dtype=DT)
    return z - z.max(dim=1, keepdim=True).values + target_max


# --------------------------------------------------------------------------------------------------
# KD — mdistiller kd_loss
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("n,c", SHAPES)
def test_kd_matches_mdistiller(n, c, T):
    g = _gen(1, n, c, T)
    s, t = _logits(g, n, c), _logits(g, n, c)
    _compare(
        lambda x: kdk.kd_loss(x, t, temperature=T, reduction="batchmean", backend=BACKEND),
        lambda x: pub.mdistiller_kd_loss(x, t, T),
        s,
        f"kd n={n} c={c} T={T}",
    )


@pytest.mark.parametrize("n,c", [(5, 10), (16, 100)])
def test_kd_standardize_matches_logit_standardization(n, c):
    T = 2.0
    g = _gen(2, n, c)
    s, t = _logits(g, n, c), _logits(g, n, c) + 1.5
    _compare(
        lambda x: kdk.kd_loss(x, t, temperature=T, standardize=True, backend=BACKEND),
        lambda x: pub.mdistiller_kd_loss(x, t, T, logit_stand=True),
        s,
        f"kd standardize n={n} c={c}",
    )


# --------------------------------------------------------------------------------------------------
# DKD — mdistiller dkd_loss
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("n,c", SHAPES)
def test_dkd_matches_mdistiller(n, c, T):
    g = _gen(3, n, c, T)
    s, t, y = _logits(g, n, c), _logits(g, n, c), _labels(g, n, c)
    alpha, beta = 1.0, 8.0
    _compare(
        lambda x: kdk.dkd_loss(x, t, y, alpha=alpha, beta=beta, temperature=T,
                               reduction="batchmean", backend=BACKEND),
        lambda x: pub.mdistiller_dkd_loss(x, t, y, alpha, beta, T),
        s,
        f"dkd n={n} c={c} T={T}",
    )


@pytest.mark.parametrize("alpha,beta", [(0.5, 2.0), (2.0, 0.0), (0.0, 3.0)])
def test_dkd_weights_match_mdistiller(alpha, beta):
    n, c, T = 16, 10, 4.0
    g = _gen(4, alpha, beta)
    s, t, y = _logits(g, n, c), _logits(g, n, c), _labels(g, n, c)
    _compare(
        lambda x: kdk.dkd_loss(x, t, y, alpha=alpha, beta=beta, temperature=T, backend=BACKEND),
        lambda x: pub.mdistiller_dkd_loss(x, t, y, alpha, beta, T),
        s,
        f"dkd alpha={alpha} beta={beta}",
    )


@pytest.mark.parametrize("n,c", [(5, 10), (16, 100)])
def test_dkd_standardize_matches_logit_standardization(n, c):
    T = 2.0
    g = _gen(5, n, c)
    s, t, y = _logits(g, n, c), _logits(g, n, c), _labels(g, n, c)
    _compare(
        lambda x: kdk.dkd_loss(x, t, y, alpha=1.0, beta=8.0, temperature=T, standardize=True,
                               backend=BACKEND),
        lambda x: pub.mdistiller_dkd_loss(x, t, y, 1.0, 8.0, T, logit_stand=True),
        s,
        f"dkd standardize n={n} c={c}",
    )


def _dkd_exact_logspace(s, t, y, alpha, beta, T):
    """DKD of docs/dkd.md written in log space with exact exclusion (for the over-confident case, where
    the published code is not usable). Mean over rows."""
    lq = F.log_softmax(s / T, dim=1)
    lp = F.log_softmax(t / T, dim=1)
    gt = F.one_hot(y, s.shape[1]).bool()
    lq_y = lq.gather(1, y[:, None]).squeeze(1)
    lp_y = lp.gather(1, y[:, None]).squeeze(1)
    lq_rest = torch.logsumexp(lq.masked_fill(gt, float("-inf")), dim=1)  # log(1 - q_y)
    lp_rest = torch.logsumexp(lp.masked_fill(gt, float("-inf")), dim=1)  # log(1 - p_y)
    tckd = lp_y.exp() * (lp_y - lq_y) + lp_rest.exp() * (lp_rest - lq_rest)
    lq_hat = F.log_softmax((s / T).masked_fill(gt, float("-inf")), dim=1)
    lp_hat = F.log_softmax((t / T).masked_fill(gt, float("-inf")), dim=1)
    p_hat = lp_hat.exp()
    nckd = torch.where(gt, torch.zeros_like(p_hat), p_hat * (lp_hat - lq_hat)).sum(1)
    return (T**2 * (alpha * tckd + beta * nckd)).mean()


def test_dkd_confident_student_finite_where_published_is_not():
    n, c, T, alpha, beta = 5, 10, 4.0, 1.0, 8.0
    g = _gen(6)
    s, t, y = _logits(g, n, c), _logits(g, n, c), _labels(g, n, c)
    s[torch.arange(n), y] += 1e4  # student logit gap ~1e4: the non-target mass underflows to 0

    l_pub, g_pub = _loss_and_grad(lambda x: pub.mdistiller_dkd_loss(x, t, y, alpha, beta, T), s)
    assert not (torch.isfinite(l_pub) and torch.isfinite(g_pub).all()), (
        "premise: published DKD should overflow (log of an underflowed probability sum) here"
    )

    l_ours, g_ours = _loss_and_grad(
        lambda x: kdk.dkd_loss(x, t, y, alpha=alpha, beta=beta, temperature=T, backend=BACKEND), s
    )
    assert torch.isfinite(l_ours), "kdkernels DKD loss must stay finite for a confident student"
    assert torch.isfinite(g_ours).all(), "kdkernels DKD gradient must stay finite for a confident student"
    # and it is the right finite value: docs/dkd.md in log space with exact exclusion
    l_ref, g_ref = _loss_and_grad(lambda x: _dkd_exact_logspace(x, t, y, alpha, beta, T), s)
    _assert_close(l_ours, l_ref, "dkd confident loss (log-space)")
    _assert_close(g_ours, g_ref, "dkd confident grad (log-space)")


# --------------------------------------------------------------------------------------------------
# DTKD — JinYu1998/DTKD
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [2.0, 4.0])
@pytest.mark.parametrize("n,c", SHAPES)
def test_dtkd_matches_official(n, c, tau):
    g = _gen(7, n, c, tau)
    s, t = _dtkd_rows(g, n, c), _dtkd_rows(g, n, c)
    alpha, beta = 3.0, 1.0
    _compare(
        lambda x: kdk.dtkd_loss(x, t, temperature=tau, alpha=alpha, beta=beta, reduction="batchmean",
                                backend=BACKEND),
        lambda x: pub.dtkd_official_loss(x, t, tau, alpha, beta),
        s,
        f"dtkd n={n} c={c} tau={tau}",
    )


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (0.0, 1.0), (0.5, 2.0)])
def test_dtkd_weights_match_official(alpha, beta):
    n, c, tau = 16, 10, 4.0
    g = _gen(8, alpha, beta)
    s, t = _dtkd_rows(g, n, c), _dtkd_rows(g, n, c)
    _compare(
        lambda x: kdk.dtkd_loss(x, t, temperature=tau, alpha=alpha, beta=beta, backend=BACKEND),
        lambda x: pub.dtkd_official_loss(x, t, tau, alpha, beta),
        s,
        f"dtkd alpha={alpha} beta={beta}",
    )


@pytest.mark.parametrize("case", ["student_max_negative", "teacher_max_negative"])
def test_dtkd_signed_temperatures_use_tau(case):
    """x + v > 0 but one maximum is negative: the published code's temperature for that side is negative
    (its softmax flipped). kdkernels' documented deviation (docs/dtkd.md): such rows use T_s = T_t = τ,
    so they equal (α + β)·τ²·KL at τ — the published KD term with weight α + β."""
    n, c, tau = 8, 10, 4.0
    g = _gen(9, len(case))
    if case == "student_max_negative":
        s = _dtkd_rows(g, n, c, lo=-3.0, hi=-1.0)
        t = _dtkd_rows(g, n, c, lo=5.0, hi=9.0)
    else:
        s = _dtkd_rows(g, n, c, lo=5.0, hi=9.0)
        t = _dtkd_rows(g, n, c, lo=-3.0, hi=-1.0)
    x, v = t.max(1).values, s.max(1).values
    assert ((x + v) > 1.0).all() and ((x < 0) | (v < 0)).all()
    _compare(
        lambda z: kdk.dtkd_loss(z, t, temperature=tau, alpha=3.0, beta=1.0, backend=BACKEND),
        lambda z: 4.0 * pub.mdistiller_kd_loss(z, t, tau),
        s,
        f"dtkd {case}",
    )


def test_dtkd_nonpositive_max_sum_uses_tau():
    """Rows with x + v <= 0: kdkernels uses T_s = T_t = tau (docs/dtkd.md's documented deviation), so
    those rows equal (alpha + beta) * tau^2 * KL at tau, i.e. the published KD term; the other rows of
    the same batch follow the published DTKD code."""
    n, c, tau, alpha, beta = 6, 10, 4.0, 3.0, 1.0
    g = _gen(10)
    s = _dtkd_rows(g, n, c, lo=1.0, hi=6.0)
    t = _dtkd_rows(g, n, c, lo=1.0, hi=6.0)
    # rows 0, 2, 4: x + v <= 0 (both negative; one positive and one more negative)
    s[0] -= s[0].max() + 2.0
    t[0] -= t[0].max() + 1.0
    s[2] -= s[2].max() - 1.5
    t[2] -= t[2].max() + 4.0
    s[4] -= s[4].max() + 5.0
    t[4] -= t[4].max() - 2.0
    x, v = t.max(1).values, s.max(1).values
    bad = (x + v) <= 0
    assert bad.tolist() == [True, False, True, False, True, False]

    def expected(z):
        rows = []
        for i in range(n):
            zi, ti = z[i : i + 1], t[i : i + 1]
            if bad[i]:
                rows.append((alpha + beta) * pub.mdistiller_kd_loss(zi, ti, tau))
            else:
                rows.append(pub.dtkd_official_loss(zi, ti, tau, alpha, beta))
        return torch.stack(rows).sum() / n

    _compare(
        lambda z: kdk.dtkd_loss(z, t, temperature=tau, alpha=alpha, beta=beta, backend=BACKEND),
        expected,
        s,
        "dtkd x+v<=0 rows",
    )


# --------------------------------------------------------------------------------------------------
# LDRLD — yema-web/LDRLD
# --------------------------------------------------------------------------------------------------


LDRLD_CK = [(10, 3), (10, 7), (10, 9), (100, 7), (100, 20)]


@pytest.mark.parametrize("c,k", LDRLD_CK)
@pytest.mark.parametrize("n", NS)
def test_ldrld_matches_official(n, c, k):
    T, alpha, beta = 4.0, 10.5, 7.0
    g = _gen(11, n, c, k)
    s, t = _logits(g, n, c), _logits(g, n, c)
    _compare(
        lambda x: kdk.ldrld_loss(x, t, k=k, temperature=T, alpha=alpha, beta=beta, rank_by="student",
                                 reduction="batchmean", backend=BACKEND),
        lambda x: pub.ldrld_official_loss(x, t, k, T, alpha, beta),
        s,
        f"ldrld n={n} c={c} k={k}",
    )


@pytest.mark.parametrize("T,alpha,beta", [(1.0, 1.0, 0.0), (2.0, 0.0, 1.0), (4.0, 3.0, 2.0)])
def test_ldrld_params_match_official(T, alpha, beta):
    n, c, k = 16, 100, 7
    g = _gen(12, T, alpha, beta)
    s, t = _logits(g, n, c), _logits(g, n, c)
    _compare(
        lambda x: kdk.ldrld_loss(x, t, k=k, temperature=T, alpha=alpha, beta=beta, backend=BACKEND),
        lambda x: pub.ldrld_official_loss(x, t, k, T, alpha, beta),
        s,
        f"ldrld T={T} alpha={alpha} beta={beta}",
    )


@pytest.mark.xfail(
    strict=True,
    reason=(
        "undocumented discrepancy: for k == 2 the published selective_softmax_loss treats the set tuple "
        "(0, 1) as a pair (len == 2) and weights the set term by ADW(0, 1) = 0.6886 too; docs/ldrld.md "
        "gives the set term weight 1. Owner to decide (document in docs/README.md or follow the code)."
    ),
)
@pytest.mark.parametrize("n,c", [(5, 3), (16, 10)])
def test_ldrld_k2_matches_official(n, c):
    k, T, alpha, beta = 2, 4.0, 10.5, 7.0
    g = _gen(13, n, c)
    s, t = _logits(g, n, c), _logits(g, n, c)
    _compare(
        lambda x: kdk.ldrld_loss(x, t, k=k, temperature=T, alpha=alpha, beta=beta, backend=BACKEND),
        lambda x: pub.ldrld_official_loss(x, t, k, T, alpha, beta),
        s,
        f"ldrld k=2 n={n} c={c}",
    )


def test_published_ldrld_weights_are_losses_md_table():
    """The transcribed ADW reproduces docs/ldrld.md's test vector (guards the transcription itself)."""
    w = pub.ldrld_adw
    assert abs(w(0, 1) - 0.6886) < 5e-5
    assert abs(w(0, 6) - 0.1788) < 5e-5
    assert abs(w(5, 6) - 0.4176) < 5e-5
    assert abs(sum(w(i, j) for i, j in itertools.combinations(range(7), 2)) - 7.7237) < 5e-5


# --------------------------------------------------------------------------------------------------
# all methods: the published CE term, and the other reductions (row-by-row published calls)
# --------------------------------------------------------------------------------------------------


def _method(name, s, t, y, **kw):
    """(kdkernels call, published call) for one method at the published recipe's defaults."""
    if name == "kd":
        return (lambda x: kdk.kd_loss(x, t, temperature=4.0, backend=BACKEND, **kw),
                lambda x, tt, yy: pub.mdistiller_kd_loss(x, tt, 4.0))
    if name == "dkd":
        kw.pop("labels", None)  # dkd_loss takes the labels positionally (its 3rd argument)
        return (lambda x: kdk.dkd_loss(x, t, y, alpha=1.0, beta=8.0, temperature=4.0,
                                       backend=BACKEND, **kw),
                lambda x, tt, yy: pub.mdistiller_dkd_loss(x, tt, yy, 1.0, 8.0, 4.0))
    if name == "dtkd":
        return (lambda x: kdk.dtkd_loss(x, t, temperature=4.0, alpha=3.0, beta=1.0, backend=BACKEND, **kw),
                lambda x, tt, yy: pub.dtkd_official_loss(x, tt, 4.0, 3.0, 1.0))
    if name == "ldrld":
        return (lambda x: kdk.ldrld_loss(x, t, k=7, temperature=4.0, alpha=10.5, beta=7.0, backend=BACKEND,
                                         **kw),
                lambda x, tt, yy: pub.ldrld_official_loss(x, tt, 7, 4.0, 10.5, 7.0))
    raise AssertionError(name)


METHODS = ["kd", "dkd", "dtkd", "ldrld"]


@pytest.mark.parametrize("method", METHODS)
def test_ce_weight_matches_published_distiller(method):
    """The published distillers add ``CE_WEIGHT * F.cross_entropy(s, y)`` (temperature 1, mean)."""
    n, c, w = 16, 100, 0.7
    g = _gen(14, len(method))
    s, t, y = _dtkd_rows(g, n, c), _dtkd_rows(g, n, c), _labels(g, n, c)
    ours, published = _method(method, s, t, y, labels=y, ce_weight=w)
    _compare(ours, lambda x: w * F.cross_entropy(x, y) + published(x, t, y), s, f"{method} ce_weight")


@pytest.mark.parametrize("method", METHODS)
def test_reduction_none_and_sum_match_published_rowwise(method):
    n, c = 5, 10
    g = _gen(15, len(method))
    s, t, y = _dtkd_rows(g, n, c), _dtkd_rows(g, n, c), _labels(g, n, c)
    ours_none, published = _method(method, s, t, y, reduction="none")
    ours_sum, _ = _method(method, s, t, y, reduction="sum")

    # per-row published values: the published batch mean over a one-row slice
    def rows(x):
        return torch.stack([published(x[i : i + 1], t[i : i + 1], y[i : i + 1]) for i in range(n)])

    weights = torch.linspace(0.5, 2.0, n, dtype=DT)  # distinct per-row upstream gradients
    x1 = s.detach().clone().requires_grad_(True)
    out = ours_none(x1)
    assert out.shape == (n,) and out.dtype == DT, f"{method}: reduction='none' gives {out.shape} {out.dtype}"
    (g_ours,) = torch.autograd.grad((out * weights).sum(), x1)
    x2 = s.detach().clone().requires_grad_(True)
    ref = rows(x2)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), x2)
    _assert_close(out.detach(), ref.detach(), f"{method} reduction=none loss")
    _assert_close(g_ours, g_ref, f"{method} reduction=none grad")

    _compare(ours_sum, lambda x: rows(x).sum(), s, f"{method} reduction=sum")
