"""Pure-PyTorch references: the ground truth every fast backend is checked against.

Each function is plain autograd over the formulas of ``docs/README.md`` (no hand-written backward), in
float32 for 16/32-bit inputs and float64 for float64 inputs. :func:`logit_distill_rows` evaluates any
:class:`~kdkernels.spec.LogitDistill` spec term by term; the method presets (kd, dkd, dtkd, ldrld, topkd,
aekt) are only specs, built in :mod:`kdkernels.functional`.

Masked classes: a ``-inf`` logit marks a class that does not exist in that row. The KL terms handle it
through ``0·log 0 = 0``; standardisation statistics and TopKScale means are taken over the finite entries
(``-inf`` stays ``-inf``); TDL drops masked classes from its dot products and picks its groups among
finite entries first.

Row semantics (README "Numeric semantics", shared by every backend):

* ignored rows (label == ignore_index): loss 0 and gradient exactly 0 whatever they hold (NaN/inf padding
  included) — their inputs are replaced by zeros before any arithmetic, so no NaN can leak backwards;
* a NaN or ``+inf`` in the student or teacher of a non-ignored row, or a bad label: loss NaN and the
  whole gradient row NaN (also ∂/∂T);
* a fully masked row (the student or the teacher has no finite logit): loss 0, gradient 0, still counted;
* a row whose ``x/T`` (or a transform: standardisation, TSM) overflows the accumulation dtype is NaN —
  never a finite wrong number (the fused backends compute such rows exactly, shifted by the row maximum;
  the float64 reference does not overflow there);
* KL values are clamped at 0 where rounding makes them negative (value only: the gradient is the KL's);
* DTKD uses ``T_s = T_t = τ`` where ``x ≤ 0`` or ``v ≤ 0`` (extends the published ``x + v ≤ 0`` guard);
* standardisation of a constant row (max = min over the finite entries) has σ = 0 exactly and Z = 0.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .spec import Divergence, LogitDistill, RankRelation, SparseTeacher, TopKDecoupled, TopKScale

#: added to the standard deviation before dividing (logit-standardization-KD's constant)
STD_EPS = 1e-7
#: lower bound of ‖u‖·‖v‖ in TDL's cosine (docs/topkd.md)
COS_EPS = 1e-8


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class WholeRow:
    """The row reductions of the formulas, over whole rows ``[N, C]`` (plain torch ops).

    Every formula below takes its row reductions (sums, maxima, LSEs, top-k selection, the value at a
    class index) from an ``over`` object: this one, or :class:`kdkernels.parallel.ShardedRow`, which takes
    the same reductions over a vocabulary shard and merges the per-rank statistics across a process
    group (tensor parallelism). Class indices (labels, top-k ids) are global; ``mark``/``put`` touch the
    columns this object holds.
    """

    def classes(self, x: torch.Tensor) -> int:
        """The number of classes of the whole row."""
        return x.shape[-1]

    def columns(self, x: torch.Tensor) -> torch.Tensor:
        """The class index of each column of ``x`` [C]."""
        return torch.arange(x.shape[-1], device=x.device)

    def sum(self, x, keepdim=False):
        return x.sum(-1, keepdim=keepdim)

    def any(self, m):
        return m.any(-1)

    def all(self, m):
        return m.all(-1)

    def amax(self, x, keepdim=False):
        return x.amax(-1, keepdim=keepdim)

    def amin(self, x, keepdim=False):
        return x.amin(-1, keepdim=keepdim)

    def max_values(self, x):
        """The row maxima [N, 1]; the gradient flows to the first maximal column."""
        return x.max(-1, keepdim=True).values

    def lse(self, x):
        return x.logsumexp(-1)

    def log_softmax(self, x):
        return torch.log_softmax(x, -1)

    def norm(self, x):
        return torch.linalg.vector_norm(x, dim=-1)

    def ranked(self, x, k: int, descending: bool = True):
        """Indices of the k best entries per row, best first; ties go to the lower index."""
        return torch.sort(x.detach(), dim=-1, descending=descending, stable=True).indices[:, :k]

    def take(self, x, idx):
        """``x`` at the class indices ``idx`` [N, k] (every index valid)."""
        return x.gather(1, idx)

    def mark(self, x, idx):
        """A bool mask like ``x``: True at the class indices ``idx`` [N, k] (a negative index marks none)."""
        C = x.shape[-1]
        spare = torch.zeros(x.shape[0], C + 1, dtype=torch.bool, device=x.device)
        return spare.scatter(1, torch.where(idx < 0, C, idx), True)[:, :C]

    def put(self, x, idx, values):
        """``x`` with ``values`` [N, k] written at the class indices ``idx`` [N, k]."""
        return x.scatter(1, idx, values)


#: the row reductions over whole rows (the default of every formula)
WHOLE_ROW = WholeRow()


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------
def entropy_rows(log_p: torch.Tensor, over: WholeRow = WHOLE_ROW) -> torch.Tensor:
    """−Σ_c p_c log p_c per row, with 0·log 0 = 0."""
    p = log_p.exp()
    return -over.sum(torch.where(p > 0, p * log_p, torch.zeros_like(p)))


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor, over: WholeRow = WHOLE_ROW) -> torch.Tensor:
    """Σ_c p_c (log p_c − log q_c) per row, with 0·log 0 = 0 (so −inf entries are harmless)."""
    p = log_p.exp()
    live = p > 0  # the difference is selected before the product so masked classes carry no NaN
    diff = torch.where(live, log_p - log_q, torch.zeros_like(p))
    return over.sum(torch.where(live, p * diff, torch.zeros_like(p)))


def clamp_kl(kl: torch.Tensor) -> torch.Tensor:
    """A KL value clamped at 0 where rounding made it negative; the gradient stays the KL's."""
    return torch.where(kl < 0, kl - kl.detach(), kl)  # (inf stays inf: no inf − inf)


def scaled(x: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """x / T with masked (−inf) entries kept at −inf and out of the autograd graph: their derivative
    w.r.t. a learnable or dynamic temperature (−x/T²) would be inf·0 = NaN otherwise."""
    live = x != -math.inf
    return torch.where(live, torch.where(live, x, torch.zeros_like(x)) / T, torch.full_like(x, -math.inf))


def _log_softmax_masked(z: torch.Tensor, keep: torch.Tensor, over: WholeRow = WHOLE_ROW) -> torch.Tensor:
    """log softmax over the classes where ``keep`` is True (others −inf): exact, no subtraction."""
    return over.log_softmax(z.masked_fill(~keep, -math.inf))


def standardize(z: torch.Tensor, over: WholeRow = WHOLE_ROW) -> torch.Tensor:
    """Z(z) = (z − mean)/(std + 1e-7) over the finite entries of each row (unbiased std).

    A constant row (max = min over the finite entries) has σ = 0 exactly and Z = 0 (its mean is taken as
    the constant itself, not a rounded sum); its std is defined through a safe square root so the
    gradient's second term is 0 there (docs/standardize.md) instead of autograd's NaN.
    """
    live = z != -math.inf
    n = over.sum(live.to(z.dtype), keepdim=True)
    zero = torch.zeros_like(z)
    mean = over.sum(torch.where(live, z, zero), keepdim=True) / n.clamp(min=1)
    # a constant row: the mean's value becomes exactly that constant (its gradient stays the mean's)
    z_max = over.amax(torch.where(live, z, torch.full_like(z, -math.inf)).detach(), keepdim=True)
    z_min = over.amin(torch.where(live, z, torch.full_like(z, math.inf)).detach(), keepdim=True)
    constant = (n > 0) & (z_max == z_min)
    mean = torch.where(constant, mean + (torch.where(constant, z_max, mean) - mean).detach(), mean)
    dev = torch.where(live, z - mean, zero)
    var = over.sum(dev * dev, keepdim=True) / (n - 1).clamp(min=1)
    pos = var > 0
    std = torch.where(pos, torch.sqrt(torch.where(pos, var, torch.ones_like(var))), torch.zeros_like(var))
    return torch.where(live, dev / (std + STD_EPS), torch.full_like(z, -math.inf))


def ranked(x: torch.Tensor, k: int, descending: bool = True) -> torch.Tensor:
    """Indices of the k best entries per row, best first; ties go to the lower index."""
    return WHOLE_ROW.ranked(x, k, descending)


def topk_scale(t: torch.Tensor, tsm: TopKScale, labels: Optional[torch.Tensor],
               over: WholeRow = WHOLE_ROW) -> torch.Tensor:
    """TopKD's TSM (docs/topkd.md) on teacher logits ``t`` [N, C]; ``labels`` already in range."""
    k = tsm.k
    top = over.ranked(t, k)
    in_top = over.mark(t, top)
    live = t != -math.inf
    zero = torch.zeros_like(t)
    n_top = over.sum((live & in_top).to(t.dtype)).clamp(min=1)
    n_rest = over.sum((live & ~in_top).to(t.dtype)).clamp(min=1)
    mean_top = over.sum(torch.where(live & in_top, t, zero)) / n_top
    mean_rest = over.sum(torch.where(live & ~in_top, t, zero)) / n_rest
    shift = (tsm.shift * (mean_top - mean_rest)).unsqueeze(-1)
    ranks = torch.arange(1, k + 1, device=t.device, dtype=t.dtype)
    w = 1.0 + tsm.scale * (k - ranks + 1) / k
    out = over.put(t, top, w * over.take(t, top) + shift)
    if labels is not None:
        y = labels.unsqueeze(-1)
        y_top = (top == y).any(-1, keepdim=True)
        t_y = (1.0 + tsm.gt_scale) * over.take(t, y) + shift
        out = torch.where(y_top, out, over.put(out, y, t_y))
    return out


def _cos_term(s: torch.Tensor, t: torch.Tensor, member: torch.Tensor, over: WholeRow = WHOLE_ROW) -> torch.Tensor:
    """1 − cos(s_G, t_G) per row for the group ``member`` (masked classes dropped)."""
    keep = member & torch.isfinite(s) & torch.isfinite(t)
    u = torch.where(keep, s, torch.zeros_like(s))
    v = torch.where(keep, t, torch.zeros_like(t))
    den = (over.norm(u) * over.norm(v)).clamp(min=COS_EPS)
    return 1.0 - over.sum(u * v) / den


def tdl_rows(s: torch.Tensor, t: torch.Tensor, tdl: TopKDecoupled, over: WholeRow = WHOLE_ROW) -> torch.Tensor:
    """TopKD's TDL (docs/topkd.md): Pos/Neg/Non groups chosen by the transformed teacher ``t``."""
    k = tdl.k
    pos = over.mark(t, over.ranked(t, k))
    # the k smallest among the classes not in Pos; masked (−inf) classes are taken last, and Pos classes
    # never (they rank after the masked ones, so Neg stays disjoint from Pos when fewer than k classes
    # outside Pos are finite)
    masked_last = torch.where(t == -math.inf, torch.full_like(t, torch.finfo(t.dtype).max), t)
    neg_key = torch.where(pos, torch.full_like(t, math.inf), masked_last)
    neg = over.mark(t, over.ranked(neg_key, k, descending=False))
    non = ~(pos | neg)
    return (tdl.pos * _cos_term(s, t, pos, over) + tdl.neg * _cos_term(s, t, neg, over)
            + tdl.non * _cos_term(s, t, non, over))


def ldrld_pair_weights(rel: RankRelation, device=None, dtype=torch.float64) -> torch.Tensor:
    """[k, k] table of w(r, r') for r < r' (zero elsewhere); ranks are 1-based."""
    r = torch.arange(1, rel.k + 1, device=device, dtype=dtype)
    w = rel.delta * torch.exp(-rel.lam * (r[:, None] + r[None, :])) / ((r[:, None] - r[None, :]).abs() + rel.eps)
    return torch.triu(w, diagonal=1)


def _bernoulli_kl(d_t: torch.Tensor, d_s: torch.Tensor) -> torch.Tensor:
    """KL(Bern(σ(d_t)) ‖ Bern(σ(d_s))) in log space."""
    p, one_m_p = torch.sigmoid(d_t), torch.sigmoid(-d_t)
    a = torch.where(p > 0, p * (F.logsigmoid(d_t) - F.logsigmoid(d_s)), torch.zeros_like(p))
    b = torch.where(one_m_p > 0, one_m_p * (F.logsigmoid(-d_t) - F.logsigmoid(-d_s)), torch.zeros_like(p))
    return a + b


def ldrld_rows(s, t, T, rel: RankRelation, over: WholeRow = WHOLE_ROW):
    """(L_local, L_rest) per row for LDRLD (docs/ldrld.md); ``T`` is [N, 1]."""
    k = rel.k
    idx = over.ranked(s if rel.rank_by == "student" else t, k)
    zs, zt = scaled(s, T), scaled(t, T)
    s_top, t_top = over.take(zs, idx), over.take(zt, idx)
    d_s = s_top[:, :, None] - s_top[:, None, :]
    d_t = t_top[:, :, None] - t_top[:, None, :]
    w = ldrld_pair_weights(rel, device=s.device, dtype=s.dtype)
    T2 = (T * T).squeeze(-1)
    pairs = (w * _bernoulli_kl(d_t, d_s)).sum((-1, -2))
    set_term = kl_rows(torch.log_softmax(t_top, -1), torch.log_softmax(s_top, -1))
    local = T2 * (pairs + set_term) / (k * (k - 1) / 2 + 1)
    rest = ~over.mark(zs, idx)
    l_rest = T2 * clamp_kl(kl_rows(_log_softmax_masked(zt, rest, over), _log_softmax_masked(zs, rest, over), over))
    return local, l_rest


def dynamic_temperatures(s, t, tau, over: WholeRow = WHOLE_ROW):
    """DTKD's (T_s, T_t) per row [N, 1] from the row maxima x (teacher) and v (student). Rows with
    x ≤ 0 or v ≤ 0 (which includes the published guard x + v ≤ 0) use T_s = T_t = τ (documented
    deviation: both temperatures stay positive, so every row is finite)."""
    x = over.max_values(t.detach())
    v = over.max_values(s)  # gradient flows to the first maximal column
    ok = (x > 0) & (v > 0)
    den = torch.where(ok, x + v, torch.ones_like(x))
    tau = tau.expand_as(x)
    return torch.where(ok, 2 * v * tau / den, tau), torch.where(ok, 2 * x * tau / den, tau)


def decoupled_rows(zs, zt, y, over: WholeRow = WHOLE_ROW):
    """(TCKD, NCKD, log p_y − log q_y) per row at fixed temperature, without the T² factor."""
    y1 = y.unsqueeze(-1)
    gt = over.mark(zs, y1)
    lse_s, lse_t = over.lse(zs), over.lse(zt)
    lse_s_nt = over.lse(zs.masked_fill(gt, -math.inf))
    lse_t_nt = over.lse(zt.masked_fill(gt, -math.inf))
    log_b_s = torch.stack([over.take(zs, y1).squeeze(-1) - lse_s, lse_s_nt - lse_s], -1)
    log_b_t = torch.stack([over.take(zt, y1).squeeze(-1) - lse_t, lse_t_nt - lse_t], -1)
    tckd = clamp_kl(kl_rows(log_b_t, log_b_s))
    nckd = clamp_kl(kl_rows(_log_softmax_masked(zt, ~gt, over), _log_softmax_masked(zs, ~gt, over), over))
    return tckd, nckd, log_b_t[:, 0] - log_b_s[:, 0]


# ---------------------------------------------------------------------------------------------
# LLM family: divergences, top-k teachers, softcap (docs/divergences.md, docs/topk_teachers.md)
# ---------------------------------------------------------------------------------------------
def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """Gemma's ``cap·tanh(x/cap)`` (``cap`` 0: identity). A masked class (−inf) stays masked (−inf)."""
    if not cap:
        return x
    live = x != -math.inf
    safe = torch.where(live, x, torch.zeros_like(x))
    return torch.where(live, cap * torch.tanh(safe / cap), torch.full_like(x, -math.inf))


def _logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(e^a + e^b) whose gradient stays finite where both are −inf (the result is −inf there)."""
    both = (a == -math.inf) & (b == -math.inf)
    zero = torch.zeros_like(a)
    out = torch.logaddexp(torch.where(both, zero, a), torch.where(both, zero, b))
    return torch.where(both, torch.full_like(a, -math.inf), out)


def _xlogy_diff(w: torch.Tensor, la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """``w·(la − lb)`` where ``w > 0``, else 0 (``0·log 0 = 0``; the difference is selected first, so
    masked entries carry no NaN into the gradient)."""
    live = w > 0
    diff = torch.where(live, la - lb, torch.zeros_like(la))
    return torch.where(live, w * diff, torch.zeros_like(w))


def divergence_rows(lp: torch.Tensor, lq: torch.Tensor, div: Divergence, over: WholeRow = WHOLE_ROW) -> torch.Tensor:
    """``D(p‖q)`` per row over the last dim (the outcomes), from log-probabilities, in log space
    (docs/divergences.md): mixtures through ``log m = logaddexp(log β + log p, log(1−β) + log q)``."""
    p, q = lp.exp(), lq.exp()
    name, a = div.name, div.param
    if name == "forward_kl":
        terms = _xlogy_diff(p, lp, lq)
    elif name == "reverse_kl":
        terms = _xlogy_diff(q, lq, lp)
    elif name == "jsd":
        lm = _logaddexp(math.log(a) + lp, math.log1p(-a) + lq)
        terms = a * _xlogy_diff(p, lp, lm) + (1.0 - a) * _xlogy_diff(q, lq, lm)
    elif name == "tvd":
        terms = 0.5 * (p - q).abs()
    elif name == "skew_kl":
        lm = _logaddexp(math.log(a) + lp, math.log1p(-a) + lq)
        terms = _xlogy_diff(p, lp, lm)
    elif name == "skew_rkl":
        lm = _logaddexp(math.log(a) + lq, math.log1p(-a) + lp)
        terms = _xlogy_diff(q, lq, lm)
    else:  # pragma: no cover - Divergence validates its name
        raise ValueError(name)
    return over.sum(terms)


def _masked_lse(z: torch.Tensor, keep: torch.Tensor, over: WholeRow = WHOLE_ROW) -> torch.Tensor:
    """LSE over the entries where ``keep`` (masking, never a subtraction of sums); −inf when none."""
    return over.lse(z.masked_fill(~keep, -math.inf))


def _log_softmax_safe(z: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim; a row with no finite entry gives −inf everywhere (not NaN)."""
    empty = (z == -math.inf).all(-1, keepdim=True)
    out = torch.log_softmax(torch.where(empty, torch.zeros_like(z), z), -1)
    return torch.where(empty, torch.full_like(z, -math.inf), out)


def support_rows(zs: torch.Tensor, lse_s: torch.Tensor, zt_k: torch.Tensor, lp_k: torch.Tensor,
                 zs_k: torch.Tensor, lp_tail: Optional[torch.Tensor], comp_s: Optional[torch.Tensor],
                 normalize: str, div: Divergence) -> tuple:
    """The KD term's ``D`` over a top-k support (docs/topk_teachers.md), per row, and whether the row is
    empty on the support (then 0). ``zt_k``: the teacher's support logits at T for ``renorm``/``teacher``
    (renormalised here) — ``lp_k``: its full log-probabilities for ``tail``; ``zs_k``: the student's
    support logits at T; ``lse_s``: the student's full LSE at T; ``lp_tail``/``comp_s``: the teacher's
    tail log-probability and the student's complement LSE (``tail``)."""
    if normalize == "renorm":
        lp, lq = _log_softmax_safe(zt_k), _log_softmax_safe(zs_k)
        empty = (zt_k == -math.inf).all(-1) | (zs_k == -math.inf).all(-1)
        return divergence_rows(lp, lq, div), empty
    if normalize == "teacher":
        lp = _log_softmax_safe(zt_k)
        lq = zs_k - lse_s.unsqueeze(-1)
        return _xlogy_diff(lp.exp(), lp, lq).sum(-1), (zt_k == -math.inf).all(-1)
    lp = torch.cat([lp_k, lp_tail.unsqueeze(-1)], -1)
    lq = torch.cat([zs_k - lse_s.unsqueeze(-1), (comp_s - lse_s).unsqueeze(-1)], -1)
    return divergence_rows(lp, lq, div), torch.zeros_like(lse_s, dtype=torch.bool)


def dense_kd_rows(zs: torch.Tensor, zt: torch.Tensor, spec: LogitDistill, over: WholeRow = WHOLE_ROW) -> tuple:
    """(``D`` per row, empty rows) of the KD term on dense logits at T: the full softmaxes, or the
    teacher's top-k support (``spec.teacher_topk``)."""
    div = spec.divergence
    if spec.teacher_topk is None:
        empty = torch.zeros(zs.shape[0], dtype=torch.bool, device=zs.device)
        return divergence_rows(over.log_softmax(zt), over.log_softmax(zs), div, over), empty
    topk = spec.teacher_topk
    idx = over.ranked(zt, topk.k)
    in_k = over.mark(zt, idx)
    lse_s, lse_t = over.lse(zs), over.lse(zt)
    zt_k, zs_k = over.take(zt, idx), over.take(zs, idx)
    lp_k = zt_k - lse_t.unsqueeze(-1)
    return support_rows(zs, lse_s, zt_k, lp_k, zs_k, _masked_lse(zt, ~in_k, over) - lse_t,
                        _masked_lse(zs, ~in_k, over), topk.normalize, div)


def sparse_kd_rows(zs: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, T: torch.Tensor,
                   normalize: str, div: Divergence, over: WholeRow = WHOLE_ROW) -> tuple:
    """(``D`` per row, empty rows) of the KD term against a sparse teacher: ``ids`` [N, K] in range or
    padding (< 0), ``logprobs`` [N, K] at temperature 1 (docs/topk_teachers.md)."""
    valid = (ids >= 0) & (ids < over.classes(zs))  # (an id ≥ C made its row NaN already: never read)
    safe_ids = torch.where(valid, ids, torch.zeros_like(ids))
    minus_inf = torch.full_like(logprobs, -math.inf)
    lp_raw = torch.where(valid, logprobs, minus_inf)
    zs_k = torch.where(valid, over.take(zs, safe_ids), torch.full_like(zs[:, :1].expand_as(lp_raw), -math.inf))
    lse_s = over.lse(zs)
    if normalize == "tail":
        in_k = over.mark(zs, torch.where(valid, ids, torch.full_like(ids, -1)))
        mass = lp_raw.logsumexp(-1)
        p_tail = (-torch.expm1(torch.where(mass == -math.inf, mass, mass.clamp(max=0.0)))).clamp(min=0.0)
        lp_tail = torch.where(p_tail > 0, torch.log(torch.where(p_tail > 0, p_tail, torch.ones_like(p_tail))),
                              torch.full_like(p_tail, -math.inf))
        return support_rows(zs, lse_s, None, lp_raw, zs_k, lp_tail, _masked_lse(zs, ~in_k, over), normalize, div)
    zt_k = scaled(lp_raw, T)
    return support_rows(zs, lse_s, zt_k, None, zs_k, None, None, normalize, div)


# ---------------------------------------------------------------------------------------------
# the engine reference
# ---------------------------------------------------------------------------------------------
def label_masks(labels: Optional[torch.Tensor], N: int, C: int, ignore_index: int, device):
    """(valid, bad, y_safe): valid = not ignored; bad = not ignored and outside [0, C)."""
    if labels is None:
        ones = torch.ones(N, dtype=torch.bool, device=device)
        return ones, ~ones, torch.zeros(N, dtype=torch.long, device=device)
    labels = labels.long()
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < C)
    return valid, valid & ~in_range, torch.where(in_range, labels, torch.zeros_like(labels))


def poisoned(x: torch.Tensor, over: WholeRow = WHOLE_ROW) -> torch.Tensor:
    """Rows of ``x`` [N, C] holding a NaN or a +inf."""
    return over.any(torch.isnan(x) | (x == math.inf))


def row_classes(s: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, bad: torch.Tensor,
                over: WholeRow = WHOLE_ROW, over_t: Optional[WholeRow] = None):
    """(live, nan_rows): rows computed by the formulas, and rows whose loss and gradient are NaN (a bad
    label, or a NaN / +inf in the student or teacher). The rest (ignored or fully masked) are 0.
    ``over_t``: the teacher's row reductions when they differ from the student's (a sparse teacher's K
    slots are whole rows even when the student is a vocabulary shard)."""
    over_t = over if over_t is None else over_t
    nan_rows = valid & (bad | poisoned(s, over) | poisoned(t, over_t))
    live = valid & ~nan_rows & ~over.all(s == -math.inf) & ~over_t.all(t == -math.inf)
    return live, nan_rows


def teacher_transform(t: torch.Tensor, spec: LogitDistill, y: Optional[torch.Tensor],
                      over: WholeRow = WHOLE_ROW) -> torch.Tensor:
    """The teacher logits the terms see: standardised, then TopKScale'd (each when the spec asks)."""
    if spec.standardize:
        t = standardize(t, over)
    if spec.teacher_topk_scale is not None:
        t = topk_scale(t, spec.teacher_topk_scale, y, over)
    return t


def teacher_entropy_rows(t: torch.Tensor, labels: Optional[torch.Tensor], spec: LogitDistill,
                         temperature: Optional[torch.Tensor] = None, over: WholeRow = WHOLE_ROW) -> torch.Tensor:
    """``loss_weight·kd_weight·T²·H(p)`` per row: what ``value="cross_entropy"`` adds to the KD term (0 on
    ignored and fully masked rows, NaN on non-finite ones). No student involved: its gradient is the
    teacher's only (kept when ``t`` requires grad)."""
    N = t.shape[0]
    acc = acc_dtype(t.dtype)
    t_in = t.to(acc)
    valid, bad, y = label_masks(labels, N, over.classes(t), spec.ignore_index, t.device)
    live, nan_rows = row_classes(t_in.detach(), t_in.detach(), valid, bad, over)
    T = (temperature if temperature is not None else
         torch.full((N,), float(spec.temperature), dtype=acc, device=t.device)).to(acc).reshape(N, 1)
    t_live = torch.where(live.unsqueeze(-1), t_in, torch.zeros_like(t_in))
    zt = scaled(teacher_transform(t_live, spec, y if labels is not None else None, over), T)
    rows = (spec.loss_weight * spec.kd_weight * (T * T).squeeze(-1)
            * entropy_rows(over.log_softmax(zt), over))
    rows = torch.where(live, rows, torch.zeros_like(rows))
    return torch.where(nan_rows, torch.full_like(rows, math.nan), rows)


def logit_distill_rows(s: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor],
                       spec: LogitDistill, temperature: Optional[torch.Tensor] = None, *,
                       teacher_grad: bool = False, over: WholeRow = WHOLE_ROW) -> torch.Tensor:
    """Per-row losses ``[N]`` of ``spec`` on logits ``[N, C]`` (without ``spec.loss_weight``; ignored and
    fully masked rows 0, bad-label and non-finite rows NaN — see the module docstring).

    ``temperature``: optional per-row tensor ``[N]`` that overrides ``spec.temperature`` (it keeps its
    autograd history, so a learnable temperature gets its gradient from autograd). ``teacher_grad``: keep
    the teacher in the graph (online/mutual distillation); by default it is a constant (§0). ``over``:
    where the row reductions are taken (:class:`WholeRow`, or a vocabulary shard's).
    """
    N, C = s.shape[0], over.classes(s)
    acc = acc_dtype(s.dtype)
    s_in = s.to(acc)
    sparse = t if isinstance(t, SparseTeacher) else None
    valid, bad, y = label_masks(labels, N, C, spec.ignore_index, s.device)
    if sparse is not None:  # padding slots hold nothing; an id outside [0, C) makes the row NaN
        ids = sparse.ids.long()
        t_in = torch.where(ids >= 0, sparse.logprobs.detach().to(acc), torch.full_like(ids, -math.inf, dtype=acc))
        bad = bad | (valid & (ids >= C).any(-1))
    else:
        t_in = (t if teacher_grad else t.detach()).to(acc)
    # the student columns the loss reads: all, except for a sparse teacher with "renorm" and no CE, whose loss
    # depends on the K support columns only (a NaN elsewhere does not reach it: the fused kernels never read it)
    seen = None
    if sparse is not None and sparse.normalize == "renorm" and spec.ce_weight == 0:
        seen = over.mark(s, torch.where(ids < C, ids, -1))

    def student_seen(x):
        return x if seen is None else torch.where(seen, x, torch.full_like(x, -math.inf))

    over_t = over if sparse is None else WHOLE_ROW  # (a sparse teacher's K slots are whole rows)
    live, nan_rows = row_classes(student_seen(s_in), t_in, valid, bad, over, over_t)
    if sparse is not None and sparse.normalize == "tail":  # a teacher with no finite slot is all tail mass
        live = valid & ~nan_rows & ~over.all(s_in == -math.inf)
    if temperature is None:
        temperature = torch.full((N,), float(spec.temperature), dtype=acc, device=s.device)
    T = temperature.to(acc).reshape(N, 1)
    T2 = (T * T).squeeze(-1)
    # rows that are not computed are zeros from here on: nothing they hold reaches the arithmetic
    keep = live.unsqueeze(-1)
    cap_s, cap_t = spec.softcap
    s_raw = softcap(torch.where(keep, s_in, torch.zeros_like(s_in)), cap_s)
    s, t = s_raw, softcap(torch.where(keep, t_in, torch.zeros_like(t_in)), cap_t)

    if spec.standardize:
        s = standardize(s, over)
    if sparse is None:
        t = teacher_transform(t, spec, y if labels is not None else None, over)
    # a transform that overflowed (huge finite logits) leaves a NaN / +inf, and so does x/T where it
    # overflows the accumulation dtype: that row is NaN (never a finite wrong number; the fused backends
    # check their transformed row the same way, and compute x/T shifted by the row maximum, exactly)
    def overflows(x, over_x):  # the row maximum over T is NaN or +inf (−inf: no finite entry, not an overflow)
        v = over_x.amax(x.detach()) / T.detach().squeeze(-1)
        return torch.isnan(v) | (v == math.inf)

    s_seen = student_seen(s)
    overflow = overflows(s_seen, over) | overflows(t, over_t)
    late = live & (poisoned(s_seen.detach(), over) | poisoned(t.detach(), over_t) | overflow)
    nan_rows, live = nan_rows | late, live & ~late

    zs, zt = scaled(s, T), scaled(t, T)
    rows = torch.zeros(N, dtype=acc, device=s.device)
    if spec.kd_weight != 0 and (sparse is not None or spec.teacher_topk is not None
                                or spec.divergence.name != "forward_kl"):
        if sparse is not None:
            div_rows, empty = sparse_kd_rows(zs, ids, t, T, sparse.normalize, spec.divergence, over)
        else:
            div_rows, empty = dense_kd_rows(zs, zt, spec, over)
        div_rows = torch.where(empty, torch.zeros_like(div_rows), div_rows)
        rows = rows + spec.kd_weight * T2 * clamp_kl(div_rows)
    elif spec.kd_weight != 0:
        lp, lq = over.log_softmax(zt), over.log_softmax(zs)
        rows = rows + spec.kd_weight * T2 * clamp_kl(kl_rows(lp, lq, over))
        if spec.value == "cross_entropy":  # torchtune's number: KL + the teacher's entropy (same gradient)
            rows = rows + spec.kd_weight * T2 * entropy_rows(lp, over)
    y1 = y.unsqueeze(-1)
    if spec.ce_weight != 0:
        ce = over.lse(s_raw) - over.take(s_raw, y1).squeeze(-1)
        rows = rows + spec.ce_weight * ce
    if spec.decoupled is not None:
        dec = spec.decoupled
        tckd, nckd, log_ratio = decoupled_rows(zs, zt, y, over)
        alpha = dec.alpha
        if dec.adaptive:  # AEKT: w = min(p_y/q_y, w_max), a constant of the gradient (0 where p_y = 0)
            ratio = log_ratio.detach().exp()
            p_y = (over.take(zt, y1).squeeze(-1) - over.lse(zt)).detach().exp()
            alpha = dec.alpha * torch.where(p_y > 0, ratio, torch.zeros_like(ratio)).clamp(max=dec.max_weight)
        rows = rows + T2 * (alpha * tckd + dec.beta * nckd)
    if spec.dtkd_weight != 0:
        T_s, T_t = dynamic_temperatures(s, t, T, over)
        kl = clamp_kl(kl_rows(over.log_softmax(scaled(t, T_t)), over.log_softmax(scaled(s, T_s)), over))
        rows = rows + spec.dtkd_weight * (T_t * T_s).squeeze(-1) * kl
    if spec.relation is not None:
        local, rest = ldrld_rows(s, t, T, spec.relation, over)
        rows = rows + spec.relation.alpha * local + spec.relation.beta * rest
    if spec.tdl is not None:
        rows = rows + spec.tdl.weight * tdl_rows(s, t, spec.tdl, over)

    rows = torch.where(live, rows, torch.zeros_like(rows))
    # NaN rows: NaN loss and a NaN gradient on every column (and T), without touching the other rows:
    # their factor is exactly 0 and their probe input a constant 0
    nan_factor = torch.where(nan_rows, math.nan, 0.0).to(acc)
    nan_keep = nan_rows.unsqueeze(-1)
    probe = (over.sum(torch.where(nan_keep, s_in, torch.zeros_like(s_in))) + T.squeeze(-1)
             + over_t.sum(torch.where(nan_keep, t_in, torch.zeros_like(t_in))))
    return rows + nan_factor * probe


def logit_distill(s: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor], spec: LogitDistill,
                  temperature: Optional[torch.Tensor] = None, *, teacher_grad: bool = False,
                  over: WholeRow = WHOLE_ROW) -> torch.Tensor:
    """The loss of the launcher contract: ``loss_weight · ℓ_n`` per row (reduction none), their sum, or
    their sum over ``max(count, 1)`` with ``count`` the rows whose label is not ``ignore_index`` (counted
    on the device: no host sync)."""
    rows = spec.loss_weight * logit_distill_rows(s, t, labels, spec, temperature, teacher_grad=teacher_grad,
                                                 over=over)
    return reduce_rows(rows, labels, spec)


def reduce_rows(rows: torch.Tensor, labels: Optional[torch.Tensor], spec: LogitDistill) -> torch.Tensor:
    """``spec.reduction`` of per-row losses: as is, their sum, or their sum over the valid-row count."""
    if spec.reduction == "none":
        return rows
    total = rows.sum()
    if spec.reduction == "sum":
        return total
    if labels is None:
        return total / max(rows.shape[0], 1)
    return total / (labels != spec.ignore_index).sum().clamp(min=1).to(total.dtype)


# ---------------------------------------------------------------------------------------------
# batch-coupled contrastive terms (docs/contrastive.md)
# ---------------------------------------------------------------------------------------------
def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE per group of ``[G, M, D]`` (student ``a``, teacher ``b``), mean over groups."""
    acc = acc_dtype(a.dtype)
    a_n = F.normalize(a.to(acc), dim=-1)
    b_n = F.normalize(b.detach().to(acc), dim=-1)
    S = a_n @ b_n.transpose(-1, -2) / tau
    G, M, _ = S.shape
    target = torch.arange(M, device=a.device).expand(G, M)
    rows = F.cross_entropy(S.transpose(1, 2), target, reduction="none").mean(-1)
    cols = F.cross_entropy(S, target, reduction="none").mean(-1)
    return (0.5 * (rows + cols)).mean()


def msd_groups(f: torch.Tensor, scales: Sequence[int]):
    """Sample-wise groups [Σg², N, D] and, per scale, feature-wise groups [1, D, N·g²]."""
    N, D = f.shape[:2]
    sample, feature = [], []
    for g in scales:
        p = F.adaptive_avg_pool2d(f, g)                                  # [N, D, g, g]
        sample.append(p.permute(2, 3, 0, 1).reshape(g * g, N, D))
        feature.append(p.permute(1, 0, 2, 3).reshape(1, D, N * g * g))
    return torch.cat(sample, 0), feature


def msd_contrastive_loss(f_s, f_t, scales=(1, 2, 4), tau=0.1, sample_weight=1.0, feature_weight=1.0):
    """Multi-scale decoupled contrastive feature loss (docs/contrastive.md), mean over each kind of group."""
    s_sample, s_feature = msd_groups(f_s, scales)
    t_sample, t_feature = msd_groups(f_t.detach(), scales)
    sample = info_nce(s_sample, t_sample, tau)
    feature = torch.stack([info_nce(a, b, tau) for a, b in zip(s_feature, t_feature)]).mean()
    return sample_weight * sample + feature_weight * feature
