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
// elem_bulk sums them (the fused CUDA passes); elem_sparse adds the ≤ k + 1 sparse columns (LDRLD's set
// I, DTKD's argmax) where the gradient is recomputed instead of buffered.
#pragma once

#include "kd_row_state.h"

namespace kd {

// indices of the P5 sums
enum : int { kKL = 0, kA1, kA2, kA3, kNCKD, kKLD, kB1, kB2, kB3, kKLR, kSG, kSGZ, kNumSums };

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
template <bool kSums, class A>
KD_FN A elem_bulk(const KdParams& P, const RowState<A>& rs, const RowShared<A>& sh, int c, A a, A b,
                  A* acc) {
  A g = A(0);
  if (rs.full) {
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
