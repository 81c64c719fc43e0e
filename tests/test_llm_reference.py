"""The LLM family's reference (docs/divergences.md, docs/topk_teachers.md) against closed forms, identities
and the published codes it reproduces; float64 gradcheck of every divergence and top-k teacher; the API's
validation of the new options."""
import math

import pytest
import torch
import torch.nn.functional as F

import kdkernels as kdk
from kdkernels import reference
from published_llm import (megatron_topk_tail_kl, renorm_topk_kl, torchtune_forward_kl, torchtune_reverse_kl,
                           trl_generalized_jsd_loss)

DIVERGENCES = ["forward_kl", "reverse_kl", ("jsd", 0.3), "tvd", ("skew_kl", 0.2), ("skew_rkl", 0.2)]


def _logits(gen, *shape, scale=2.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def _closed_form(p, q, name, a):
    """D(p‖q) per row with numpy-like explicit formulas (probabilities, no log space)."""
    if name == "forward_kl":
        return (p * (p / q).log()).sum(-1)
    if name == "reverse_kl":
        return (q * (q / p).log()).sum(-1)
    if name == "jsd":
        m = a * p + (1 - a) * q
        return a * (p * (p / m).log()).sum(-1) + (1 - a) * (q * (q / m).log()).sum(-1)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "skew_kl":
        return (p * (p / (a * p + (1 - a) * q)).log()).sum(-1)
    return (q * (q / (a * q + (1 - a) * p)).log()).sum(-1)


@pytest.mark.parametrize("div", DIVERGENCES, ids=str)
def test_divergence_closed_forms(div, gen):
    s, t = _logits(gen, 5, 13), _logits(gen, 5, 13)
    d = kdk.Divergence.coerce(div)
    T = 1.7
    rows = kdk.kd_loss(s, t, T, divergence=div, reduction="none", backend="reference")
    p, q = F.softmax(t / T, -1), F.softmax(s / T, -1)
    want = T * T * _closed_form(p, q, d.name, d.param)
    torch.testing.assert_close(rows, want, rtol=1e-12, atol=1e-14)
    assert (rows > 0).all()


@pytest.mark.parametrize("div", DIVERGENCES, ids=str)
def test_gradient_formula_of_the_kernels(div, gen):
    """∂(T²D)/∂s = T·(qg − q·Σqg) with the per-divergence qg of docs/divergences.md (what every kernel
    writes), against autograd of the reference."""
    s = _logits(gen, 4, 11).requires_grad_(True)
    t = _logits(gen, 4, 11)
    d = kdk.Divergence.coerce(div)
    T = 2.5
    kdk.kd_loss(s, t, T, divergence=div, reduction="sum", backend="reference").backward()
    lp, lq = F.log_softmax(t / T, -1), F.log_softmax(s.detach() / T, -1)
    p, q, a = lp.exp(), lq.exp(), d.param
    qg = {
        "forward_kl": -p,
        "reverse_kl": q * (lq - lp + 1),
        "jsd": (1 - a) * q * (lq - torch.logaddexp(math.log(a) + lp, math.log(1 - a) + lq)) if a else None,
        "tvd": 0.5 * q * torch.sign(q - p),
        "skew_kl": -(1 - a) * q * p / (a * p + (1 - a) * q) if a else None,
        "skew_rkl": q * ((q / (a * q + (1 - a) * p)).log() + 1 - a * q / (a * q + (1 - a) * p)) if a else None,
    }[d.name]
    want = T * (qg - q * qg.sum(-1, keepdim=True))
    torch.testing.assert_close(s.grad, want, rtol=1e-10, atol=1e-13)


def test_jsd_end_points_and_limit(gen):
    s, t = _logits(gen, 3, 9), _logits(gen, 3, 9)
    fwd = kdk.kd_loss(s, t, 1.0, reduction="none", backend="reference")
    rev = kdk.kd_loss(s, t, 1.0, divergence="reverse_kl", reduction="none", backend="reference")
    assert kdk.JSD(0.0) == kdk.Divergence("forward_kl") and kdk.JSD(1.0) == kdk.Divergence("reverse_kl")
    for beta, want in ((1e-7, fwd), (1 - 1e-7, rev)):  # JSD_β ≈ β·KL(p‖q) near 0, (1−β)·KL(q‖p) near 1
        jsd = kdk.kd_loss(s, t, 1.0, divergence=("jsd", beta), reduction="none", backend="reference")
        torch.testing.assert_close(jsd / min(beta, 1 - beta), want, rtol=1e-5, atol=0)
    assert kdk.SkewKL(0.0) == kdk.Divergence("forward_kl") and kdk.SkewRKL(0.0) == kdk.Divergence("reverse_kl")


def test_tvd_bounded_and_symmetric(gen):
    s, t = _logits(gen, 6, 20, scale=8.0), _logits(gen, 6, 20, scale=8.0)
    a = kdk.kd_loss(s, t, 1.0, divergence="tvd", reduction="none", backend="reference")
    b = kdk.kd_loss(t, s, 1.0, divergence="tvd", reduction="none", backend="reference")
    assert (a <= 1).all() and (a >= 0).all()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_masked_teacher_class(gen):
    """−inf where the teacher masks a class the student gives mass: reverse KL is +inf, the rest finite."""
    s, t = _logits(gen, 2, 8), _logits(gen, 2, 8)
    t[0, 3] = -math.inf
    for div in DIVERGENCES:
        rows = kdk.kd_loss(s, t, 1.0, divergence=div, reduction="none", backend="reference")
        if div == "reverse_kl":
            assert rows[0] == math.inf and torch.isfinite(rows[1])
        else:
            assert torch.isfinite(rows).all(), div


def test_tail_with_k_v_minus_one_is_the_full_divergence(gen):
    """With k = V − 1 the tail outcome is the one remaining class: the tail divergence is the full one."""
    s, t = _logits(gen, 3, 7), _logits(gen, 3, 7)
    for div in DIVERGENCES:
        full = kdk.kd_loss(s, t, 1.5, divergence=div, reduction="none", backend="reference")
        tail = kdk.kd_loss(s, t, 1.5, divergence=div, teacher_topk=kdk.TopK(6, "tail"), reduction="none",
                           backend="reference")
        torch.testing.assert_close(tail, full, rtol=1e-12, atol=1e-15)


def test_tail_exactly_known(gen):
    """A row whose support holds all but 1e-30 of the student's mass: q_tail is exact (masking, not 1 − Σq)."""
    s = torch.tensor([[0.0, 0.0, -69.0776]], dtype=torch.float64)   # q_tail = e^-69.08/(2 + e^-69.08) ≈ 5e-31
    t = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)       # p_tail = 1/3
    rows = kdk.kd_loss(s, t, 1.0, teacher_topk=kdk.TopK(2, "tail"), reduction="none", backend="reference")
    q_tail = math.exp(-69.0776) / (2 + math.exp(-69.0776))
    want = 2 * (1 / 3) * math.log((1 / 3) / ((1 - q_tail) / 2)) + (1 / 3) * math.log((1 / 3) / q_tail)
    assert abs(float(rows[0]) - want) <= 1e-12 * want


def test_renorm_and_teacher_modes_closed_form(gen):
    s, t = _logits(gen, 4, 12), _logits(gen, 4, 12)
    T, k = 2.0, 4
    idx = t.topk(k, -1).indices  # distinct random values: no ties
    lp_hat = F.log_softmax(t.gather(1, idx) / T, -1)
    lq_hat = F.log_softmax(s.gather(1, idx) / T, -1)
    lq_full = F.log_softmax(s / T, -1).gather(1, idx)
    renorm = kdk.kd_loss(s, t, T, teacher_topk=kdk.TopK(k), reduction="none", backend="reference")
    teacher = kdk.kd_loss(s, t, T, teacher_topk=kdk.TopK(k, "teacher"), reduction="none", backend="reference")
    torch.testing.assert_close(renorm, T * T * (lp_hat.exp() * (lp_hat - lq_hat)).sum(-1), rtol=1e-12, atol=0)
    torch.testing.assert_close(teacher, T * T * (lp_hat.exp() * (lp_hat - lq_full)).sum(-1), rtol=1e-12, atol=0)


def _sparse(gen, t, K, pad=0):
    """A stored top-K teacher of dense logits t (ids of the K largest, log-probs at T = 1), the last
    ``pad`` slots padding."""
    lp = F.log_softmax(t, -1)
    ids = lp.topk(K, -1).indices
    logprobs = lp.gather(-1, ids)
    if pad:
        ids[..., K - pad:] = -1
        logprobs[..., K - pad:] = 0.0
    return ids, logprobs


@pytest.mark.parametrize("normalize", ["renorm", "tail", "teacher"])
def test_sparse_equals_dense_topk(normalize, gen):
    s, t = _logits(gen, 5, 30), _logits(gen, 5, 30)
    ids, lp = _sparse(gen, t, 6)
    divs = ["forward_kl"] if normalize == "teacher" else DIVERGENCES
    for div in divs:
        sparse = kdk.kd_loss(s, kdk.SparseTeacher(ids, lp, normalize), 1.0, divergence=div, reduction="none",
                             backend="reference")
        dense = kdk.kd_loss(s, t, 1.0, divergence=div, teacher_topk=kdk.TopK(6, normalize), reduction="none",
                            backend="reference")
        torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-15)


def test_sparse_padding_slots_and_leading_dims(gen):
    s, t = _logits(gen, 2, 3, 25), _logits(gen, 2, 3, 25)
    ids, lp = _sparse(gen, t, 8, pad=3)
    want_ids, want_lp = _sparse(gen, t, 5)
    for normalize in ("renorm", "tail", "teacher"):
        got = kdk.kd_loss(s, kdk.SparseTeacher(ids, lp, normalize), 1.0, reduction="none", backend="reference")
        want = kdk.kd_loss(s, kdk.SparseTeacher(want_ids, want_lp, normalize), 1.0, reduction="none",
                           backend="reference")
        assert got.shape == (2, 3)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_sparse_bad_id_row_is_nan_and_check_mode(gen):
    s, t = _logits(gen, 3, 10), _logits(gen, 3, 10)
    ids, lp = _sparse(gen, t, 4)
    ids[1, 2] = 10
    rows = kdk.kd_loss(s, kdk.SparseTeacher(ids, lp), 1.0, reduction="none", backend="reference")
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()
    with pytest.raises(ValueError, match=r"ids\[1, 2\] = 10 is outside \[0, 10\)"):
        kdk.kd_loss(s, kdk.SparseTeacher(ids, lp), 1.0, check=True, backend="reference")
    ids, lp = _sparse(gen, t, 4)
    ids[2, 3] = ids[2, 0]
    with pytest.raises(ValueError, match="twice"):
        kdk.kd_loss(s, kdk.SparseTeacher(ids, lp), 1.0, check=True, backend="reference")
    ids, lp = _sparse(gen, t, 4)
    lp[0, 1] = 0.5
    with pytest.raises(ValueError, match="must be finite or -inf and <= 0"):
        kdk.kd_loss(s, kdk.SparseTeacher(ids, lp), 1.0, check=True, backend="reference")


def test_sparse_id_dtypes(gen):
    s, t = _logits(gen, 3, 40), _logits(gen, 3, 40)
    ids, lp = _sparse(gen, t, 5)
    want = kdk.kd_loss(s, kdk.SparseTeacher(ids, lp), 2.0, backend="reference")
    for dtype in (torch.int32, torch.int16, torch.uint16):
        got = kdk.kd_loss(s, kdk.SparseTeacher(ids.to(dtype), lp.float()), 2.0, backend="reference")
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    with pytest.raises(TypeError, match="ids must be int64, int32, int16 or uint16"):
        kdk.kd_loss(s, kdk.SparseTeacher(ids.float(), lp), 2.0)


def test_softcap_is_tanh_before_the_temperature(gen):
    s = _logits(gen, 4, 16, scale=20.0).requires_grad_(True)
    t = _logits(gen, 4, 16, scale=20.0)
    s[0, 2].data.fill_(-math.inf)
    got = kdk.kd_loss(s, t, 2.0, softcap=(10.0, 5.0), divergence=("jsd", 0.5), reduction="sum", backend="reference")
    s2 = s.detach().clone().requires_grad_(True)
    capped = torch.where(s2 == -math.inf, s2, 10.0 * torch.tanh(s2 / 10.0))
    want = kdk.kd_loss(capped, 5.0 * torch.tanh(t / 5.0), 2.0, divergence=("jsd", 0.5), reduction="sum",
                       backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    got.backward()
    want.backward()
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-12, atol=1e-15)
    assert s.grad[0, 2] == 0


def _gradcheck(fn, s):
    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("div", DIVERGENCES, ids=str)
def test_gradcheck_divergences_topk_sparse(div, gen):
    s = _logits(gen, 3, 9).requires_grad_(True)
    t = _logits(gen, 3, 9)
    y = torch.tensor([1, -100, 4])
    _gradcheck(lambda x: kdk.kd_loss(x, t, 2.0, divergence=div, labels=y, ce_weight=0.5, softcap=6.0,
                                     backend="reference"), s)
    for normalize in ("renorm", "tail"):
        _gradcheck(lambda x: kdk.kd_loss(x, t, 2.0, divergence=div, teacher_topk=kdk.TopK(3, normalize),
                                         backend="reference"), s)
    ids, lp = _sparse(gen, t, 4, pad=1)
    _gradcheck(lambda x: kdk.kd_loss(x, kdk.SparseTeacher(ids, lp, "tail"), 1.0, divergence=div,
                                     backend="reference"), s)
    if div == "forward_kl":
        _gradcheck(lambda x: kdk.kd_loss(x, kdk.SparseTeacher(ids, lp, "teacher"), 2.0, backend="reference"), s)


# ---- the drop-in entry points against the published code ----------------------------------------------
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_generalized_jsd_equals_trl(beta, reduction, with_labels, gen):
    s = _logits(gen, 2, 5, 17).requires_grad_(True)
    t = _logits(gen, 2, 5, 17)
    y = torch.randint(0, 17, (2, 5), generator=gen)
    y[0, :2] = -100
    labels = y if with_labels else None
    got = kdk.generalized_jsd_loss(s, t, labels, beta=beta, temperature=2.0, reduction=reduction,
                                   backend="reference")
    s2 = s.detach().clone().requires_grad_(True)
    want = trl_generalized_jsd_loss(s2, t, labels, beta=beta, temperature=2.0, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    got.backward()
    want.backward()
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-10, atol=1e-15)


def test_generalized_jsd_none_is_per_token(gen):
    s, t = _logits(gen, 2, 3, 11), _logits(gen, 2, 3, 11)
    got = kdk.generalized_jsd_loss(s, t, beta=0.4, reduction="none", backend="reference")
    torch.testing.assert_close(got, trl_generalized_jsd_loss(s, t, beta=0.4, reduction="none").sum(-1),
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("normalize", [True, False])
def test_torchtune_forward_and_reverse_kl(normalize, gen):
    s = _logits(gen, 2, 4, 13).requires_grad_(True)
    t = _logits(gen, 2, 4, 13)
    y = torch.randint(0, 13, (2, 4), generator=gen)
    y[1, 1:] = -100
    for ours, theirs in ((kdk.forward_kl_loss, torchtune_forward_kl), (kdk.reverse_kl_loss, torchtune_reverse_kl)):
        got = ours(s, t, y, normalize=normalize, backend="reference")
        want = theirs(s, t, y, normalize=normalize)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
        g1, = torch.autograd.grad(got, s)
        g2, = torch.autograd.grad(want, s)
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-15)


def test_sparse_entry_points_equal_the_plain_pytorch_codes(gen):
    s, t = _logits(gen, 6, 50), _logits(gen, 6, 50)
    ids, lp = _sparse(gen, t, 16)
    y = torch.randint(0, 50, (6,), generator=gen)
    y[2] = -100
    tail = kdk.kd_loss(s, kdk.SparseTeacher(ids, lp, "tail"), 1.0, labels=y, backend="reference")
    torch.testing.assert_close(tail, megatron_topk_tail_kl(s, ids, lp, y), rtol=1e-10, atol=0)
    renorm = kdk.kd_loss(s, kdk.SparseTeacher(ids, lp), 2.0, labels=y, backend="reference")
    torch.testing.assert_close(renorm, renorm_topk_kl(s, ids, lp, 2.0, y), rtol=1e-12, atol=0)


# ---- validation ----------------------------------------------------------------------------------------
def test_invalid_combinations_raise():
    s, t = torch.randn(2, 10), torch.randn(2, 10)
    y = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="keep their published KL"):
        kdk.LogitDistill(decoupled=kdk.Decoupled(), divergence="reverse_kl")
    with pytest.raises(ValueError, match="combines with ce_weight and divergence only"):
        kdk.LogitDistill(teacher_topk=kdk.TopK(3), standardize=True)
    with pytest.raises(ValueError, match="only divergence='forward_kl' is defined"):
        kdk.LogitDistill(teacher_topk=kdk.TopK(3, "teacher"), divergence="tvd")
    with pytest.raises(ValueError, match="needs its beta"):
        kdk.LogitDistill(divergence="jsd")
    with pytest.raises(ValueError, match=r"beta must be in \[0.0, 1.0\]"):
        kdk.JSD(1.5)
    with pytest.raises(ValueError, match=r"alpha must be in \[0.0, 1.0\)"):
        kdk.SkewKL(1.0)
    with pytest.raises(ValueError, match="divergence must be one of"):
        kdk.kd_loss(s, t, divergence="kl")
    with pytest.raises(ValueError, match=r"TopK.k must be in \[1, C - 1\]"):
        kdk.kd_loss(s, t, teacher_topk=kdk.TopK(10))
    with pytest.raises(ValueError, match="normalize must be one of"):
        kdk.TopK(3, "softmax")
    with pytest.raises(ValueError, match="needs temperature=1.0"):
        kdk.kd_loss(s, kdk.SparseTeacher(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), "tail"), 2.0)
    with pytest.raises(ValueError, match="cap the student only"):
        kdk.kd_loss(s, kdk.SparseTeacher(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3)), softcap=5.0)
    with pytest.raises(ValueError, match="must have shape"):
        kdk.kd_loss(s, kdk.SparseTeacher(torch.zeros(3, 3, dtype=torch.long), torch.zeros(3, 3)))
    with pytest.raises(ValueError, match="a learnable temperature"):
        kdk.kd_loss(s, t, torch.tensor(2.0, requires_grad=True), divergence="tvd")
    with pytest.raises(ValueError, match="softcap must be a finite positive"):
        kdk.kd_loss(s, t, softcap=-1.0)
    with pytest.raises(ValueError, match="SparseTeacher K"):
        kdk.kd_loss(s, kdk.SparseTeacher(torch.zeros(2, 1025, dtype=torch.long), torch.zeros(2, 1025)), 1.0)
    kdk.kd_loss(s, t, labels=y, ce_weight=1.0, teacher_topk=kdk.TopK(3, "tail"), divergence=kdk.JSD(0.2),
                backend="reference")


def test_sparse_rows_that_read_only_part_of_the_student(gen):
    """A tail row whose teacher has no finite slot is all tail mass (not NaN); renorm without CE reads the
    student at the K ids only, so a NaN elsewhere in the row does not reach its loss."""
    s, t = _logits(gen, 3, 12), _logits(gen, 3, 12)
    ids, lp = _sparse(gen, t, 4)
    lp_empty = lp.clone()
    lp_empty[1] = -math.inf
    rows = kdk.kd_loss(s, kdk.SparseTeacher(ids, lp_empty, "tail"), 1.0, reduction="none", backend="reference")
    assert torch.isfinite(rows).all()
    q = F.log_softmax(s[1], -1)
    in_k = torch.zeros(12, dtype=torch.bool).scatter(0, ids[1], True)
    torch.testing.assert_close(rows[1], -q.masked_fill(in_k, -math.inf).logsumexp(-1), rtol=1e-12, atol=0)
    s_nan = s.clone()
    outside = int((~torch.zeros(12, dtype=torch.bool).scatter(0, ids[0], True)).nonzero()[0])
    s_nan[0, outside] = math.nan
    renorm = kdk.kd_loss(s_nan, kdk.SparseTeacher(ids, lp), 1.0, reduction="none", backend="reference")
    torch.testing.assert_close(renorm, kdk.kd_loss(s, kdk.SparseTeacher(ids, lp), 1.0, reduction="none",
                                                   backend="reference"), rtol=0, atol=0)
    with_ce = kdk.kd_loss(s_nan, kdk.SparseTeacher(ids, lp), 1.0, labels=torch.tensor([1, 2, 3]), ce_weight=0.5,
                          reduction="none", backend="reference")
    assert torch.isnan(with_ce[0]) and torch.isfinite(with_ce[1:]).all()
