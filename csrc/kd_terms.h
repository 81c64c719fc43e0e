// kd_terms.h — the per-column math of the engine's loss terms (docs/README.md; reference.py is the truth).
//
// Each term_* returns, for column c (a = s̃_c, b = t'_c), its part of the bulk gradient w.r.t. s̃_c and
// its loss summands, by value, with guards written as selects (so the CPU loops over them vectorise):
//   term_full   KD and DKD/AEKT at T, sharing q = softmax(zs)_c and p = softmax(zt)_c:
//               KD  kd_w·T·(q − p), KL += p(log p − log q)  (+ the ∂ℓ/∂T sums Σ(q − p)s̃, Σ t'p(log p − log q), Σ t'p)
//               DKD T·α_n·[(b0 + b1)q − b0 at y, − b1·q̂ elsewhere] + T·β·(q̂ − p̂) off y
//   term_dtkd   dtkd_w·T_t·(Q − P) at (T_s, T_t), KL_dyn += P(log P − log Q) (+ the sums of ∂KL/∂T_s, ∂KL/∂T_t)
//   term_rest   LDRLD's rest_w·T·(Q_R − P_R) on c ∉ I, KL_R += P_R(log P_R − log Q_R)
//   term_tdl    tdl_w·w_G·(−t'/den + [not clamped]·(u·v)·s̃/(|u|²·den)) for each TDL group G ∋ c
//   term_div    the KD term by the generic divergence formula (rs.div: a divergence other than forward KL,
//               or a top-k / sparse teacher): class c's outcome (d_c, qg_c) from `divergence_terms`, the
//               student probability q_c multiplying Σqg, and the tail outcome's share `extra_c` (c ∉ S);
//               the KD gradient is kd_w·T·(qg_c + extra_c − q_c·Σ_o qg_o) (`div_grad`)
// elem_bulk sums them (the fused CUDA passes); elem_sparse adds the ≤ k + 1 sparse columns (LDRLD's set
// I, DTKD's argmax) where the gradient is recomputed instead of buffered.
#pragma once

#include "kd_row_state.h"

namespace kd {

// indices of the P5 sums
// (kQG: Σ_c qg_c of the class outcomes; kQGL, kQGA, kQL, kQA: Σ qg, Σ qg·s̃, Σ q, Σ q·s̃ over the finite
// s̃_c, from which Z's backward sums of the divergence gradient follow once Σqg is known)
enum : int {
  kKL = 0, kA1, kA2, kA3, kNCKD, kKLD, kB1, kB2, kB3, kKLR, kSG, kSGZ, kQG, kQGL, kQGA, kQL, kQA, kNumSums
};
static_assert(kNumSums <= kRedWidth, "the P5 sums must fit the reduction scratch");

//: (d_o, qg_o) of one outcome o of the divergence (docs/divergences.md), from the log-probabilities lp, lq
//: and p = e^lp, q = e^lq: D(p‖q) = Σ_o d_o and qg_o = q_o·∂D/∂q_o. Mixtures in log space,
//: log m = logaddexp(log w + log p, log(1 − w) + log q); 0·log 0 = 0. Mirrors the Triton kernels'
//: divergence_terms (kdkernels/_triton/divergence.py) and the reference's divergence_rows:
//:   forward_kl  d = p(lp − lq)                         qg = −p
//:   reverse_kl  d = q(lq − lp)                         qg = q(lq − lp + 1)
//:   jsd (β)     d = β·p(lp − lm) + (1−β)·q(lq − lm)    qg = (1−β)·q(lq − lm)       m = βp + (1−β)q
//:   tvd         d = |p − q|/2                          qg = sign(q − p)·q/2
//:   skew_kl (α) d = p(lp − lm)                         qg = −(1−α)·p·q/m           m = αp + (1−α)q
//:   skew_rkl(α) d = q(lq − lm)                         qg = q(lq − lm) + q − α·q²/m m = αq + (1−α)p
template <class A>
struct DivPair { A d, qg; };

//: w·(la − lb) where w > 0, else 0 (0·log 0 = 0; the difference is never formed for w = 0)
template <class A>
KD_HD A plogdiff(A w, A la, A lb) { return w > A(0) ? w * (la - lb) : A(0); }

template <class A>
KD_FN DivPair<A> divergence_terms(const DivParam<A>& dp, A lp, A lq, A p, A q) {
  switch (dp.code) {
    case kReverseKL:
      return {plogdiff(q, lq, lp), q > A(0) ? q * (lq - lp + A(1)) : A(0)};
    case kJSD: {
      const A lm = klogaddexp(dp.log_w + lp, dp.log_1mw + lq);
      const A qlog = plogdiff(q, lq, lm);
      return {dp.w * plogdiff(p, lp, lm) + (A(1) - dp.w) * qlog, (A(1) - dp.w) * qlog};
    }
    case kTVD:
      return {A(0.5) * (p > q ? p - q : q - p), q > p ? A(0.5) * q : (q < p ? A(-0.5) * q : A(0))};
    case kSkewKL: {
      const A lm = klogaddexp(dp.log_w + lp, dp.log_1mw + lq);
      return {plogdiff(p, lp, lm), p > A(0) ? -(A(1) - dp.w) * kexp(lq + lp - lm) : A(0)};
    }
    case kSkewRKL: {
      const A lm = klogaddexp(dp.log_w + lq, dp.log_1mw + lp);
      const A qlog = plogdiff(q, lq, lm);
      return {qlog, q > A(0) ? qlog + q - dp.w * kexp(A(2) * lq - lm) : A(0)};
    }
    default:  // kForwardKL
      return {plogdiff(p, lp, lq), -p};
  }
}

// ---- the per-column terms, shared by the fused (CUDA) and the split (CPU) passes ------------------
// Each returns its part of the bulk gradient w.r.t. s̃_c (a = s̃_c, b = t'_c) and its loss summands.
// Guards are selects, not branches, so the CPU loops over them vectorise.

//: a term's gradient part and its loss sums at one column (returned by value: the CPU loops keep
//: their sums in registers and vectorise)
template <class A>
struct FullTerm { A g, kl, a1, a2, a3, nckd; };
template <class A>
struct DtkdTerm { A g, kld, b1, b2, b3; };
template <class A>
struct RestTerm { A g, klr; };
template <class A>
struct DivTerm { A d, qg, q, extra; };

//: KD and DKD/AEKT at T with q = softmax(zs)_c and p = softmax(zt)_c given (they share them; the CPU twin
//: keeps them from P4); tgt: c is the label column
//: (zs, zt: the shifted scaled logits (s̃_c − m_s)/T, (t'_c − m_t)/T)
template <class A>
KD_FN FullTerm<A> term_full_qp(const KdParams& P, const RowState<A>& rs, bool kd, bool dec, bool dtemp, bool tgt,
                               A a, A b, A zs, A zt, A q, A p) {
  const A T = rs.T;
  const A lq = zs - rs.lse_s, lp = zt - rs.lse_t;
  const bool pos = p > A(0);
  FullTerm<A> r = {A(0), A(0), A(0), A(0), A(0), A(0)};
  if (kd) {
    r.g += A(P.kd_weight) * T * (q - p);
    r.kl = pos ? p * (lp - lq) : A(0);
    if (dtemp) {
      r.a1 = q != p ? (q - p) * a : A(0);
      r.a2 = pos ? b * p * (lp - lq) : A(0);
      r.a3 = pos ? b * p : A(0);
    }
  }
  if (dec) {  // the target column takes only TCKD; q̂, p̂ (softmaxes over c ≠ y) are unused there
    const A lqh = (a - rs.m_s_nt) * rs.iT - rs.lse_s_nt, lph = (b - rs.m_t_nt) * rs.iT - rs.lse_t_nt;
    const A qh = kexp(lqh), ph = kexp(lph);
    const A dt = (rs.b0 + rs.b1) * q - (tgt ? rs.b0 : rs.b1 * qh);
    r.g += T * rs.alpha * dt + (tgt ? A(0) : T * A(P.nckd_weight) * (qh - ph));
    r.nckd = (!tgt && ph > A(0)) ? ph * (lph - lqh) : A(0);
  }
  return r;
}

template <class A>
KD_FN FullTerm<A> term_full(const KdParams& P, const RowState<A>& rs, bool kd, bool dec, bool dtemp, int c, A a,
                            A b) {
  const A zs = (a - rs.m_s) * rs.iT, zt = (b - rs.m_t) * rs.iT;
  return term_full_qp(P, rs, kd, dec, dtemp, c == rs.y, a, b, zs, zt, kexp(zs - rs.lse_s), kexp(zt - rs.lse_t));
}

//: DTKD at (T_s, T_t); with vpath, the sums of ∂KL/∂T_s and ∂KL/∂T_t
template <class A>
KD_FN DtkdTerm<A> term_dtkd(const KdParams& P, const RowState<A>& rs, bool vpath, A a, A b) {
  const A ls = (a - rs.m_s) * rs.iTs - rs.lse_sd, lt = (b - rs.m_t) * rs.iTt - rs.lse_td;
  const A Q = kexp(ls), Pd = kexp(lt);
  const bool pos = Pd > A(0);
  DtkdTerm<A> r = {A(P.dtkd_weight) * rs.Tt * (Q - Pd), pos ? Pd * (lt - ls) : A(0), A(0), A(0), A(0)};
  if (vpath) {
    r.b1 = Q != Pd ? (Q - Pd) * a : A(0);
    r.b2 = pos ? b * Pd * (lt - ls) : A(0);
    r.b3 = pos ? b * Pd : A(0);
  }
  return r;
}

//: LDRLD's rest term on the classes outside I
template <class A>
KD_FN RestTerm<A> term_rest(const KdParams& P, const RowState<A>& rs, bool in_rel, A a, A b) {
  const A lq = (a - rs.m_s_r) * rs.iT - rs.lse_s_r, lp = (b - rs.m_t_r) * rs.iT - rs.lse_t_r;
  const A q = kexp(lq), p = kexp(lp);
  return {in_rel ? A(0) : A(P.rest_weight) * rs.T * (q - p), (!in_rel && p > A(0)) ? p * (lp - lq) : A(0)};
}

//: the KD term's part at class c under the generic divergence formula (rs.div); in_s: c is in the support S
//: (topk_mode ≥ 1). The outcomes per normalisation (docs/topk_teachers.md), with log q_c the full student
//: log-softmax at T:
//:   none     every class: lp_c, lq_c full log-softmaxes of t'/T, s̃/T
//:   renorm   c ∈ S: both renormalised over S (log p̂, log q̂); nothing off S (q = 0: no gradient there)
//:   teacher  c ∈ S: log p̂ renormalised over S against the full log q_c (forward KL); q_c everywhere
//:   tail     c ∈ S: the full log-probabilities (dense: of t'/T; sparse: the stored log-probability b);
//:            c ∉ S: no outcome of its own, its gradient share of the tail outcome q_c/q_tail·qg_tail
template <class A>
KD_FN DivTerm<A> term_div(const RowState<A>& rs, A a, A b, bool in_s) {
  DivTerm<A> r = {A(0), A(0), A(0), A(0)};
  if (rs.kd_empty) return r;
  const A lq_full = (a - rs.m_s) * rs.iT - rs.lse_s;
  A lp, lq;
  if (rs.mode == kTopkNone) {
    lp = (b - rs.m_t) * rs.iT - rs.lse_t;
    lq = lq_full;
  } else if (rs.norm == kNormRenorm) {
    if (!in_s) return r;
    lp = (b - rs.m_tk) * rs.iT - rs.lse_tk;
    lq = (a - rs.m_sk) * rs.iT - rs.lse_sk;
  } else {
    const A q = kexp(lq_full);
    r.q = q;
    if (!in_s) {
      if (rs.norm == kNormTail && rs.lq_tail != -kinf<A>()) r.extra = kexp(lq_full - rs.lq_tail) * rs.qg_tail;
      return r;
    }
    if (rs.norm == kNormTeacher) {  // forward KL of the renormalised teacher against the full student
      const A lph = (b - rs.m_tk) * rs.iT - rs.lse_tk;
      const A p = kexp(lph);
      r.d = plogdiff(p, lph, lq_full);
      r.qg = -p;
      return r;
    }
    lp = rs.mode == kTopkSparse ? b : (b - rs.m_t) * rs.iT - rs.lse_t;
    const DivPair<A> t = divergence_terms(rs.dp, lp, lq_full, kexp(lp), q);
    r.d = t.d;
    r.qg = t.qg;
    return r;
  }
  const A q = kexp(lq);
  const DivPair<A> t = divergence_terms(rs.dp, lp, lq, kexp(lp), q);
  return {t.d, t.qg, q, A(0)};
}

//: the KD gradient w.r.t. s̃_c (= a) of a term_div result, once Σ_o qg_o (rs.qg_sum) is known; 0 at a
//: masked student class (a = −inf: a constant, out of the graph, as in the reference — its qg still
//: counts in Σqg through the LSE)
template <class A>
KD_HD A div_grad(const KdParams& P, const RowState<A>& rs, A a, const DivTerm<A>& t) {
  return a != -kinf<A>() ? A(P.kd_weight) * rs.T * (t.qg + t.extra - t.q * rs.qg_sum) : A(0);
}

//: TDL's cosine terms of the groups holding c (finite entries only)
template <class A>
KD_FN A term_tdl(const KdParams& P, const RowState<A>& rs, const RowShared<A>& sh, int c, A a, A b) {
  if (!(kfinite(a) && kfinite(b))) return A(0);
  const bool in_pos = sh.pos.contains(b, c);
  const bool in_neg = sh.neg.contains(neg_key(in_pos, b), c);
  const A w[3] = {A(P.tdl_pos), A(P.tdl_neg), A(P.tdl_non)};
  const bool member[3] = {in_pos, in_neg, !in_pos && !in_neg};
  A g = A(0);
  for (int G = 0; G < 3; ++G) {
    if (!member[G]) continue;
    A d = -b / rs.den[G];
    if (!rs.clamped[G]) d += rs.uv[G] * a / (rs.uu[G] * rs.den[G]);
    g += w[G] * d;
  }
  return A(P.tdl_weight) * g;
}

//: the bulk gradient w.r.t. s̃ at column c, every term in one call (the fused passes)
//: (in_s: c is in the top-k / sparse support; P5 (kSums) leaves out the divergence gradient, which needs
//: Σqg: its sums for Z's backward follow from kQGL..kQA, see finish_div)
template <bool kSums, class A>
KD_FN A elem_bulk(const KdParams& P, const RowState<A>& rs, const RowShared<A>& sh, int c, A a, A b, bool in_s,
                  A* acc) {
  A g = A(0);
  if (rs.div) {
    const DivTerm<A> r = term_div(rs, a, b, in_s);
    if (kSums) {
      acc[kKL] += r.d;
      acc[kQG] += r.qg;
      if (a != -kinf<A>()) {
        acc[kQGL] += r.qg;
        acc[kQGA] += r.qg * a;
        acc[kQL] += r.q;
        acc[kQA] += r.q * a;
      }
    } else {
      g += div_grad(P, rs, a, r);
    }
  } else if (rs.full) {
    const FullTerm<A> r = term_full(P, rs, rs.kd, rs.dec, rs.want_dtemp, c, a, b);
    g += r.g;
    if (kSums) {
      acc[kKL] += r.kl;
      acc[kA1] += r.a1;
      acc[kA2] += r.a2;
      acc[kA3] += r.a3;
      acc[kNCKD] += r.nckd;
    }
  }
  if (rs.dtkd) {
    const DtkdTerm<A> r = term_dtkd(P, rs, rs.dt_ok, a, b);
    g += r.g;
    if (kSums) {
      acc[kKLD] += r.kld;
      acc[kB1] += r.b1;
      acc[kB2] += r.b2;
      acc[kB3] += r.b3;
    }
  }
  if (rs.rel) {
    const RestTerm<A> r = term_rest(P, rs, rs.in_rel(sh, P.rank_by_teacher != 0, a, b, c), a, b);
    g += r.g;
    if (kSums) acc[kKLR] += r.klr;
  }
  if (rs.tdl) g += term_tdl(P, rs, sh, c, a, b);
  return g;
}

//: the sparse gradient at column c (LDRLD's set I, DTKD's argmax column); used where g is recomputed
template <class A>
KD_FN A elem_sparse(const KdParams& P, const RowState<A>& rs, const RowShared<A>& sh, int c, A a, A b) {
  A g = A(0);
  if (rs.rel && rs.in_rel(sh, P.rank_by_teacher != 0, a, b, c)) g += sh.rel_g[sh.rel.rank_of(c)];
  if (rs.dtkd && rs.dt_ok && c == rs.dt_m) g += rs.dv;
  return g;
}

}  // namespace kd
