// kd_split_passes.h — P5/P6 of the engine as one unit-stride loop per term over a buffered row (the
// CPU twin, Exec::kSplitTerms). Each loop is specialised on the terms present and reads only local copies
// of the row constants, so its body is select-only and alias-free and GCC vectorises it (with the
// `omp simd` sums of kd_math.h). The math is that of kd_terms.h.
#pragma once

#include "kd_terms.h"

namespace kd {

//: P5's KD/DKD loop of the split (CPU) passes, specialised on the terms present so it vectorises
template <bool kKd, bool kDec, bool kDtemp, class View, class A>
KD_FN void full_pass_split(const KdParams& P0, const RowState<A>& rs0, View& v, int C, A rss, A rst, A* acc) {
  // local copies: the loop then provably reads no memory its stores could touch (else GCC keeps it scalar)
  const KdParams P = P0;
  const RowState<A> rs = rs0;
  A kl = A(0), a1 = A(0), a2 = A(0), a3 = A(0), nc = A(0);
  const A iT = rs.iT, ms = rs.m_s, mt = rs.m_t;
  const int y = kDec ? rs.y : -1;
  KD_SIMD_SUM(kl, a1, a2, a3, nc)
  for (int c = 0; c < C; ++c) {
    const A a = v.s(c), b = v.t(c);
    const FullTerm<A> r = term_full_qp(P, rs, kKd, kDec, kDtemp, c == y, a, b, (a - ms) * iT, (b - mt) * iT,
                                       v.kept_exp_s(c) * rss, v.kept_exp_t(c) * rst);
    v.store_bulk(c, r.g);
    kl += r.kl;
    a1 += r.a1;
    a2 += r.a2;
    a3 += r.a3;
    nc += r.nckd;
  }
  acc[kKL] = kl;
  acc[kA1] = a1;
  acc[kA2] = a2;
  acc[kA3] = a3;
  acc[kNCKD] = nc;
}

//: P5's DTKD loop of the split (CPU) passes (kVpath: the row has the argmax-column path)
template <bool kVpath, class View, class A>
KD_FN void dtkd_pass_split(const KdParams& P0, const RowState<A>& rs0, View& v, int C, A* acc) {
  const KdParams P = P0;
  const RowState<A> rs = rs0;
  A kld = A(0), b1 = A(0), b2 = A(0), b3 = A(0);
  KD_SIMD_SUM(kld, b1, b2, b3)
  for (int c = 0; c < C; ++c) {
    const DtkdTerm<A> r = term_dtkd(P, rs, kVpath, v.s(c), v.t(c));
    v.add_bulk(c, r.g);
    kld += r.kld;
    b1 += r.b1;
    b2 += r.b2;
    b3 += r.b3;
  }
  acc[kKLD] = kld;
  acc[kB1] = b1;
  acc[kB2] = b2;
  acc[kB3] = b3;
}

//: P5's LDRLD rest loop of the split (CPU) passes
template <class View, class A>
KD_FN void rest_pass_split(const KdParams& P0, const RowState<A>& rs0, SelCut<A> cut, bool by_teacher, View& v,
                           int C, A* acc) {
  const KdParams P = P0;
  const RowState<A> rs = rs0;
  A klr = A(0);
  KD_SIMD_SUM(klr)
  for (int c = 0; c < C; ++c) {
    const A a = v.s(c), b = v.t(c);
    const RestTerm<A> r = term_rest(P, rs, cut.contains(by_teacher ? b : a, c), a, b);
    v.add_bulk(c, r.g);
    klr += r.klr;
  }
  acc[kKLR] = klr;
}

//: the row's Σ_o qg_o once P5's class sums are reduced: the tail outcome joins Σd and Σqg (every lane adds
//: the same, after the reduction)
template <class A>
KD_FN void finish_div(RowState<A>& rs, A* acc) {
  acc[kKL] += rs.d_tail;
  rs.qg_sum = acc[kQG] + rs.qg_tail;
}

//: P5's generic-divergence KD loops of the split (CPU) passes: Σd and Σqg over the class outcomes, keeping
//: q_c and qg_c + extra_c in the row buffers (the tail's qg is known from P4), then (Σqg known) the KD
//: gradient kd_w·T·(qg + extra − q·Σqg) into the buffer (0 at a masked student class). `in_s(c, b)`: c ∈ S.
template <class View, class A, class InSupport>
KD_FN void div_pass_split(const KdParams& P, RowState<A>& rs, View& v, int C, InSupport in_s, A* acc) {
  A kl = A(0), qg = A(0);
  for (int c = 0; c < C; ++c) {
    const A b = v.t(c);
    const DivTerm<A> r = term_div(rs, v.s(c), b, in_s(c, b));
    v.keep_div(c, r.q, r.qg + r.extra);
    kl += r.d;
    qg += r.qg;
  }
  acc[kKL] = kl;
  acc[kQG] = qg;
  finish_div(rs, acc);
  const A w = A(P.kd_weight) * rs.T, sum = rs.qg_sum;
  for (int c = 0; c < C; ++c)
    v.store_bulk(c, v.s(c) != -kinf<A>() ? w * (v.kept_qg(c) - v.kept_q(c) * sum) : A(0));
}

//: P6 on a buffered row: Z backward, CE, scale — specialised on (standardize, ce) so it vectorises
template <bool kStd, bool kCe, class View, class A>
KD_FN void write_buffered(View& v, int C, int y, A gbar, A sp, A coef, A cw, A lse_raw, A scale) {
  for (int c = 0; c < C; ++c) {
    A g = v.bulk(c);
    if (kStd) {
      const A a = v.s(c);
      g = a != -kinf<A>() ? (g - gbar) / sp - coef * a : A(0);
    }
    if (kCe) g += cw * (kexp(v.s_raw(c) - lse_raw) - (c == y ? A(1) : A(0)));
    v.write(c, g * scale);
  }
}

}  // namespace kd
