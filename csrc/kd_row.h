// kd_row.h — the LogitDistill engine for ONE row, written once for both backends.
//
// `distill_row(ex, view, sh, P, io)` is templated on
//   Exec: how the lanes of a row cooperate — the CPU twin has one lane and no-op reductions
//         (cpu_engine.cpp), CUDA has one block per row with warp/block reductions (cuda/kd_exec.cuh);
//   View: where the row lives — the CPU twin holds it in thread-local accumulation-dtype buffers and
//         applies standardisation/TSM in place (cpu_engine.cpp), CUDA re-reads global memory each pass
//         and applies them on the fly (kd_stream_view.h; also run on the host by sim_engine.cpp, so CI
//         tests the CUDA code path without a GPU).
// The math (docs/README.md; kdkernels/reference.py is the ground truth), with s̃/t' the student/teacher after
// standardisation Z (§3) and the teacher's TSM (§6), zs = s̃/T, zt = t'/T, p = softmax(zt), q = softmax(zs):
//
//   ℓ = kd_w·T²·KL(p‖q) + ce_w·(LSE(s) − s_y) + T²·(α_n·TCKD + β·NCKD) + dtkd_w·T_t·T_s·KL_dyn
//       + local_w·L_local + rest_w·T²·KL_R + tdl_w·TDL
//
// Gradient w.r.t. s̃ (`g`, "bulk" part computed per column, "sparse" part on ≤ k + 1 columns):
//   KD      kd_w·T·(q − p)
//   TCKD    T·α_n·[(b0 + b1)·q_c − b0·[c = y] − b1·[c ≠ y]·q̂_c],  b = (p_y, 1 − p_y) in log space, α_n is
//           AEKT's min(p_y/q_y, w_max)·α when adaptive (a constant: no gradient through it)
//   NCKD    T·β·(q̂_c − p̂_c) for c ≠ y (softmaxes over c ≠ y, exact masking)
//   DTKD    dtkd_w·T_t·(Q − P) (softmaxes at T_s, T_t) + at m = argmax s̃ (sparse):
//           ∂ℓ/∂v = w[(T_s·dT_t + T_t·dT_s)·KL + T_t·T_s·(∂KL/∂T_s·dT_s + ∂KL/∂T_t·dT_t)],
//           dT_s/dv = −dT_t/dv = 2τx/(x + v)², ∂KL/∂T_s = −Σ(Q − P)s̃/T_s², ∂KL/∂T_t = −Σ P t'(logP − logQ − KL)/T_t²
//           (rows with x ≤ 0 or v ≤ 0 use T_s = T_t = τ and have no v path: so T_s, T_t > 0 always)
//   LDRLD   rest: rest_w·T·(Q_R − P_R) on c ∉ I; local (sparse, on I; O(k²), in double): local_w·T/(k(k−1)/2 + 1)·
//           [Σ_pairs w·∂BKL/∂d_s·(±1) + (Q_I − P_I)]; I = top-k of s̃ or t', ties to the lower index
//   TDL     tdl_w·w_G·(−t'_c/den + [den not clamped]·(u·v)·s̃_c/(|u|²·den)) per group G ∋ c (finite entries)
//   KD, generic divergence (rs.div: a divergence other than forward KL, or a top-k / sparse teacher;
//           the KD and CE terms only, + Z / TSM without a top-k teacher): D(p‖q) = Σ_o d_o over the outcomes
//           o, ∂(T²D)/∂s̃_c = T·(qg_c + extra_c − q_c·Σ_o qg_o) with qg_o = q_o·∂D/∂q_o (kd_terms.h
//           divergence_terms, term_div). Outcomes: every class (no top-k); the support S (renorm: both
//           renormalised on S; teacher: p̂ on S against the full log q); S plus one tail outcome (tail:
//           log q_tail = LSE_{∉S}(s̃/T) − LSE(s̃/T) by masking, p_tail likewise for a dense teacher or
//           1 − Σ exp(logprob) by expm1 for a sparse one; c ∉ S gets extra_c = q_c/q_tail·qg_tail). S is the
//           teacher's top-k (P2, ties to the lower index) or a sparse teacher's valid ids (the CPU twin
//           scatters the K slots into a −inf row and a membership row; the CUDA engine sorts them into
//           shared memory and finds each column by binary search, kd_sparse_view.h: exact masking either
//           way). A masked student class (−inf) gets no KD gradient.
// Softcap (softcap_s / softcap_t > 0): x ← c·tanh(x/c) on the raw logits at the load (the View), before
// everything else (CE included); the View's `write` multiplies the gradient by sech²(x/c).
// then through Z (§3, finite entries only, n of them):  ∂/∂s = (g − ḡ)/σ' − (Σ g·s̃)·s̃/((n − 1)·σ)
// (second term 0 when σ = 0), plus CE on the raw logits: ce_w·(softmax(s)_c − [c = y]).
// Learnable temperature (KD term only, spec-enforced): ∂ℓ/∂T = kd_w·(2T·KL − [Σ(q − p)s̃ + Σ t'p(log p − log q − KL)]).
// Masked classes (−inf) contribute 0 everywhere (0·log 0 = 0; their s̃·(q − p) and t'·p products are 0).
// Row semantics (README "Numeric semantics"): ignored rows 0 (loss, gradient, ∂ℓ/∂T) whatever they hold;
// bad labels NaN; a NaN or +inf in s̃ or t' (found by P3's poison sum) makes the whole row NaN; a row whose
// student or teacher has no finite entry is 0. Every LSE is shifted by its set's maximum, log q_c =
// (s̃_c − m)/T − lse, so a finite s̃/T that overflows changes nothing. KL values are clamped at 0 where
// rounding makes them negative (the gradient is not). A constant row (max = min over the finite entries)
// standardises with σ = 0 exactly and Z = 0.
//
// Passes over the row (each `for c` below is one pass; Exec reduces the per-lane partials after it):
//   P0 raw stats (Z's mean/extrema, then variance; CE's LSE) → Z      P1 TSM top-k + rest mean → t'
//   P2 top-k selections (LDRLD set I, TDL Pos, then Neg; the top-k      P3 maxima (also on S / off S), argmax s̃,
//      teacher's support S)                                               TDL dot products, poison sum (then
//                                                                         NaN / masked exits)
//   P4 sums of exp for every LSE (then the tail outcome)                P5 loss sums + bulk gradient (+ Σg, Σg·s̃;
//                                                                         the divergence's Σd, Σqg)
//   P6 gradient written once: Z backward + CE, scaled by grad_scale.
// The per-column math of P5/P6 lives in the term_* functions. Exec::kSplitTerms picks how P3–P6 loop:
// fused (CUDA: one pass calls every term, the gradient is recomputed in P6 instead of stored) or split
// (CPU twin: one unit-stride loop per term over the L1-resident row buffer, the gradient accumulated in
// the buffer, select-only bodies and `omp simd` sums, so the compiler vectorises each loop).
#pragma once

#include "kd_split_passes.h"

namespace kd {

//: Top-k of a row for a cooperative executor (a CUDA block, or its host simulator): every lane keeps a
//: sorted list of the columns it visits (ascending c, so ties keep the lower index), then k rounds of a
//: block arg-best over the list heads (larger key, then lower index). Written once so that the
//: simulator tests exactly the code the GPU runs.
template <class Exec, class Key, class A>
KD_FN void block_topk(const Exec& ex, Key key, int C, int k, Sel<A>& out) {
  A lk[kMaxTopK];
  int li[kMaxTopK];
  int cnt = 0;
  for (int c = ex.lane(); c < C; c += ex.lanes()) topk_insert(lk, li, cnt, k, ksel_key(key(c)), c);
  int head = 0;
  for (int r = 0; r < k; ++r) {
    const bool live = head < cnt;
    A bv = live ? lk[head] : -kinf<A>();
    int bi = live ? li[head] : INT_MAX;
    const int hi = bi;
    ex.reduce_best(bv, bi);
    if (live && bi == hi) ++head;
    if (ex.leader()) {
      out.idx[r] = bi;
      out.key[r] = bv;
    }
  }
  if (ex.leader()) out.k = k;
  ex.sync();
}

//: a row that is decided without its math: `fill` as every gradient element, the loss and ∂ℓ/∂T
//: (ignored and fully masked rows 0, bad-label and non-finite rows NaN)
template <class Exec, class View, class A>
KD_FN void fill_row(const Exec& ex, View& v, RowIO<A>& io, A fill) {
  if (io.want_grad)
    for (int c = ex.lane(); c < io.C; c += ex.lanes()) v.fill(c, fill);
  io.loss = fill;
  io.dtemp = fill;
}

//: what P0 gives the later passes: CE's LSE of the raw student and its target logit
template <class A>
struct RawStats {
  A lse_raw, s_raw_y;
};

//: P0 — reads the raw row: counts, sums and extrema of the finite entries (Z's mean; a constant row has
//: max = min and gets μ = that value, σ = 0 exactly), then Σ(z − μ)² and CE's Σ exp(s − max). Applies Z
//: to the view. Produces rs.n_s, sd_s, sp_s (Z's backward) and CE's LSE.
template <class Exec, class View, class A>
KD_FN RawStats<A> p0_raw_stats(const Exec& ex, View& v, RowState<A>& rs, int C, int y, bool stdz, bool ce) {
  const A NEG = -kinf<A>();
  RawStats<A> out = {A(0), A(0)};
  rs.n_s = A(0);
  rs.sd_s = A(0);
  rs.sp_s = A(1);
  if (!(stdz || ce)) return out;
  A ns = A(0), ss = A(0), nt = A(0), st = A(0);        // counts and sums of the finite entries
  A m0 = NEG, m1 = NEG, m2 = NEG, m3 = NEG;           // max s, −min s (finite), max t, −min t (finite)
  KD_SIMD(reduction(max : m0, m1, m2, m3) reduction(+ : ns, ss, nt, st))
  for (int c = ex.lane(); c < C; c += ex.lanes()) {
    const A a = v.s_raw(c), b = v.t_raw(c);
    const bool la = a != NEG, lb = b != NEG;
    ns += la ? A(1) : A(0);
    ss += la ? a : A(0);
    nt += lb ? A(1) : A(0);
    st += lb ? b : A(0);
    m0 = kmax(m0, a);
    m1 = kmax(m1, la ? -a : NEG);
    m2 = kmax(m2, b);
    m3 = kmax(m3, lb ? -b : NEG);
  }
  A r[4] = {ns, ss, nt, st};
  A mx[4] = {m0, m1, m2, m3};
  ex.template reduce_sum<4>(r);
  ex.template reduce_max<4>(mx);
  const bool const_s = r[0] > A(0) && mx[0] == -mx[1], const_t = r[2] > A(0) && mx[2] == -mx[3];
  const A mu_s = const_s ? mx[0] : r[1] / kmax(r[0], A(1));
  const A mu_t = const_t ? mx[2] : r[3] / kmax(r[2], A(1));
  const A m_raw = kshift(mx[0]);
  A q0 = A(0), q1 = A(0), q2 = A(0);  // Σ(s − μ)², Σ(t − μ)², Σ exp(s − max)
  if (stdz) {
    KD_SIMD_SUM(q0, q1)
    for (int c = ex.lane(); c < C; c += ex.lanes()) {
      const A a = v.s_raw(c), b = v.t_raw(c);
      q0 += a != NEG ? (a - mu_s) * (a - mu_s) : A(0);
      q1 += b != NEG ? (b - mu_t) * (b - mu_t) : A(0);
    }
  }
  if (ce) {
    KD_SIMD_SUM(q2)
    for (int c = ex.lane(); c < C; c += ex.lanes()) q2 += kexp(v.s_raw(c) - m_raw);
  }
  A q[3] = {q0, q1, q2};
  ex.template reduce_sum<3>(q);
  if (ce) {
    out.lse_raw = m_raw + klog(q[2]);
    out.s_raw_y = v.s_raw(y);
  }
  if (stdz) {
    const A var_s = q[0] / kmax(r[0] - A(1), A(1)), var_t = q[1] / kmax(r[2] - A(1), A(1));
    const A sd_s = var_s > A(0) ? ksqrt(var_s) : A(0), sd_t = var_t > A(0) ? ksqrt(var_t) : A(0);
    rs.n_s = r[0];
    rs.sd_s = sd_s;
    rs.sp_s = sd_s + A(kStdEps);
    v.set_standardize(ex, mu_s, rs.sp_s, mu_t, sd_t + A(kStdEps), ce);
  }
  return out;
}

//: P1 — TSM on the teacher: reads t̃ for its top-k and the mean of the rest; t' is then written into
//: the view (CPU) or applied on the fly (CUDA) from sh.tsm / sh.tsm_val.
template <class Exec, class View, class A>
KD_FN void p1_tsm(const Exec& ex, View& v, RowShared<A>& sh, const KdParams& P, const RowIO<A>& io, int C, int y) {
  const A NEG = -kinf<A>();
  const int k = static_cast<int>(P.tsm_k);
  ex.topk([&](int c) { return v.t(c); }, C, k, sh.tsm);
  A r[2] = {A(0), A(0)};  // Σ and count of the finite entries outside the top-k
  for (int c = ex.lane(); c < C; c += ex.lanes()) {
    const A b = v.t(c);
    if (b != NEG && !sh.tsm.contains(b, c)) { r[0] += b; r[1] += A(1); }
  }
  ex.template reduce_sum<2>(r);
  A top_sum = A(0), top_n = A(0);
  for (int i = 0; i < k; ++i)
    if (sh.tsm.key[i] != NEG) { top_sum += sh.tsm.key[i]; top_n += A(1); }
  const A gap = top_sum / kmax(top_n, A(1)) - r[0] / kmax(r[1], A(1));
  const A shift = A(P.tsm_shift) * gap;
  for (int i = ex.lane(); i < k; i += ex.lanes()) {
    const A w = A(1) + A(P.tsm_scale) * A(k - i) / A(k);
    sh.tsm_val[i] = w * sh.tsm.key[i] + shift;
  }
  int ty_col = -1;
  A ty_val = A(0);
  if (io.has_labels) {
    const A ty = v.t(y);
    if (!sh.tsm.contains(ty, y)) {
      ty_col = y;
      ty_val = A(1 + P.tsm_gt_scale) * ty + shift;
    }
  }
  ex.sync();
  v.set_tsm(ex, sh, ty_col, ty_val);
}

//: c is in the support S of a top-k teacher (b = t'_c): the dense top-k of t' (topk_mode 1), or a sparse
//: teacher's valid ids (topk_mode 2, from the View's membership: the CPU twin's BufView, SparseStreamView)
template <class View, class A>
KD_FN bool in_support(const View& v, const RowShared<A>& sh, const RowState<A>& rs, int c, A b) {
  if (rs.mode == kTopkDense) return sh.topk.contains(b, c);
  return rs.mode == kTopkSparse && v.member(c);
}

//: what P3 reduces: maxima, DTKD's argmax, TDL's dot products and the poison sum
template <class A>
struct RowMaxima {
  A mx[10];    // max s̃, max t', max s̃ (c≠y), max t' (c≠y), max s̃ (c∉I), max t' (c∉I),
               // max s̃ (c∈S), max t' (c∈S), max s̃ (c∉S), max t' (c∉S)  (S: a top-k teacher's support)
  A dots[9];   // per TDL group (Pos, Neg, Non): u·v, |u|², |v|²
  A poison;    // Σ kpoison(s̃) + kpoison(t'): NaN iff the row holds a NaN or +inf
  A best_v;    // max s̃ and its first column (DTKD)
  int best_i;
};

//: P3 — reads s̃, t': the maxima of every LSE set, the argmax of s̃ (DTKD), TDL's dot products and the
//: poison sum, all reduced over the block.
template <class Exec, class View, class A>
KD_FN RowMaxima<A> p3_maxima(const Exec& ex, View& v, const RowShared<A>& sh, const RowState<A>& rs, int C,
                             bool by_teacher) {
  const A NEG = -kinf<A>();
  const int y = rs.y < 0 ? 0 : rs.y;
  RowMaxima<A> m;
  for (int i = 0; i < 10; ++i) m.mx[i] = NEG;
  for (int i = 0; i < 9; ++i) m.dots[i] = A(0);
  m.best_v = NEG;
  m.best_i = INT_MAX;
  auto p3_tdl = [&](int c, A a, A b) {
    if (!(kfinite(a) && kfinite(b))) return;
    const bool in_pos = sh.pos.contains(b, c);
    const bool in_neg = sh.neg.contains(neg_key(in_pos, b), c);
    const bool member[3] = {in_pos, in_neg, !in_pos && !in_neg};
    for (int G = 0; G < 3; ++G)
      if (member[G]) { m.dots[3 * G] += a * b; m.dots[3 * G + 1] += a * a; m.dots[3 * G + 2] += b * b; }
  };
  A poison = A(0);
  if constexpr (Exec::kSplitTerms) {  // one loop per feature; c ≠ y by two loops around y
    A m0 = NEG, m1 = NEG;
    KD_SIMD(reduction(max : m0, m1) reduction(+ : poison))
    for (int c = 0; c < C; ++c) {
      const A a = v.s(c), b = v.t(c);
      m0 = kmax(m0, a);
      m1 = kmax(m1, b);
      poison += kpoison(a) + kpoison(b);
    }
    m.mx[0] = m0;
    m.mx[1] = m1;
    if (rs.dec) {
      A m2 = NEG, m3 = NEG;
      KD_SIMD_MAX(m2, m3)
      for (int c = 0; c < y; ++c) { m2 = kmax(m2, v.s(c)); m3 = kmax(m3, v.t(c)); }
      KD_SIMD_MAX(m2, m3)
      for (int c = y + 1; c < C; ++c) { m2 = kmax(m2, v.s(c)); m3 = kmax(m3, v.t(c)); }
      m.mx[2] = m2;
      m.mx[3] = m3;
    }
    if (rs.dtkd)  // the first column holding max s̃
      for (int c = 0; c < C; ++c)
        if (v.s(c) == m0) { m.best_v = m0; m.best_i = c; break; }
    if (rs.rel) {
      const SelCut<A> cut = sh.rel.cut();
      A m4 = NEG, m5 = NEG;
      KD_SIMD_MAX(m4, m5)
      for (int c = 0; c < C; ++c) {
        const A a = v.s(c), b = v.t(c);
        const bool rest = !cut.contains(by_teacher ? b : a, c);
        m4 = kmax(m4, rest ? a : NEG);
        m5 = kmax(m5, rest ? b : NEG);
      }
      m.mx[4] = m4;
      m.mx[5] = m5;
    }
    if (rs.tdl)
      for (int c = 0; c < C; ++c) p3_tdl(c, v.s(c), v.t(c));
    if (rs.mode != kTopkNone) {
      A m6 = NEG, m7 = NEG, m8 = NEG, m9 = NEG;
      for (int c = 0; c < C; ++c) {
        const A a = v.s(c), b = v.t(c);
        const bool in = in_support(v, sh, rs, c, b);
        m6 = kmax(m6, in ? a : NEG);
        m7 = kmax(m7, in ? b : NEG);
        m8 = kmax(m8, in ? NEG : a);
        m9 = kmax(m9, in ? NEG : b);
      }
      m.mx[6] = m6;
      m.mx[7] = m7;
      m.mx[8] = m8;
      m.mx[9] = m9;
    }
  } else {
    for (int c = ex.lane(); c < C; c += ex.lanes()) {
      const A a = v.s(c), b = v.t(c);
      m.mx[0] = kmax(m.mx[0], a);
      m.mx[1] = kmax(m.mx[1], b);
      poison += kpoison(a) + kpoison(b);
      if (rs.dtkd && better(a, c, m.best_v, m.best_i)) { m.best_v = a; m.best_i = c; }
      if (rs.dec && c != y) {
        m.mx[2] = kmax(m.mx[2], a);
        m.mx[3] = kmax(m.mx[3], b);
      }
      if (rs.rel && !rs.in_rel(sh, by_teacher, a, b, c)) {
        m.mx[4] = kmax(m.mx[4], a);
        m.mx[5] = kmax(m.mx[5], b);
      }
      if (rs.tdl) p3_tdl(c, a, b);
      if (rs.mode != kTopkNone) {
        const int o = in_support(v, sh, rs, c, b) ? 6 : 8;
        m.mx[o] = kmax(m.mx[o], a);
        m.mx[o + 1] = kmax(m.mx[o + 1], b);
      }
    }
  }
  A chk[1] = {poison};
  ex.template reduce_sum<1>(chk);
  m.poison = chk[0];
  ex.template reduce_max<10>(m.mx);
  if (rs.dtkd) ex.reduce_best(m.best_v, m.best_i);
  if (rs.tdl) ex.template reduce_sum<9>(m.dots);
  return m;
}

//: P4 — reads s̃, t': Σ exp((z − m_X)/T) of every LSE set X (DTKD's at T_s, T_t); sets rs.lse_*.
//: The CPU twin keeps exp((s̃ − m_s)/T), exp((t' − m_t)/T) for P5 and returns their sums in se_full.
template <class Exec, class View, class A>
KD_FN void p4_lse(const Exec& ex, View& v, const RowShared<A>& sh, RowState<A>& rs, int C, bool by_teacher,
                  A (&se_full)[2]) {
  const int y = rs.y < 0 ? 0 : rs.y;
  const A iT = rs.iT, ms = rs.m_s, mt = rs.m_t;
  A se[12] = {A(0), A(0), A(0), A(0), A(0), A(0), A(0), A(0), A(0), A(0), A(0), A(0)};
  //: a top-k teacher's LSEs on S and off S (exact masking): se[8..11] += the column's terms
  auto support_sums = [&](A (&sums)[12], int c, A a, A b) {
    const bool in = in_support(v, sh, rs, c, b);
    sums[8] += in ? kexp((a - rs.m_sk) * iT) : A(0);
    sums[9] += in ? kexp((b - rs.m_tk) * iT) : A(0);
    sums[10] += in ? A(0) : kexp((a - rs.m_so) * iT);
    sums[11] += in ? A(0) : kexp((b - rs.m_to) * iT);
  };
  if constexpr (Exec::kSplitTerms) {  // one unit-stride loop per LSE pair
    if (rs.full) {
      A s0 = A(0), s1 = A(0);
      KD_SIMD_SUM(s0, s1)
      for (int c = 0; c < C; ++c) {
        const A es = kexp((v.s(c) - ms) * iT), et = kexp((v.t(c) - mt) * iT);
        v.keep_exp(c, es, et);
        s0 += es;
        s1 += et;
      }
      se[0] = s0;
      se[1] = s1;
    }
    if (rs.dec) {  // c ≠ y: two loops around the target
      const A ms2 = rs.m_s_nt, mt2 = rs.m_t_nt;
      A s2 = A(0), s3 = A(0);
      KD_SIMD_SUM(s2, s3)
      for (int c = 0; c < y; ++c) {
        s2 += kexp((v.s(c) - ms2) * iT);
        s3 += kexp((v.t(c) - mt2) * iT);
      }
      KD_SIMD_SUM(s2, s3)
      for (int c = y + 1; c < C; ++c) {
        s2 += kexp((v.s(c) - ms2) * iT);
        s3 += kexp((v.t(c) - mt2) * iT);
      }
      se[2] = s2;
      se[3] = s3;
    }
    if (rs.rel) {
      const SelCut<A> cut = sh.rel.cut();
      const A ms4 = rs.m_s_r, mt4 = rs.m_t_r;
      A s4 = A(0), s5 = A(0);
      KD_SIMD_SUM(s4, s5)
      for (int c = 0; c < C; ++c) {
        const A a = v.s(c), b = v.t(c);
        const bool rest = !cut.contains(by_teacher ? b : a, c);
        s4 += rest ? kexp((a - ms4) * iT) : A(0);
        s5 += rest ? kexp((b - mt4) * iT) : A(0);
      }
      se[4] = s4;
      se[5] = s5;
    }
    if (rs.dtkd) {
      A s6 = A(0), s7 = A(0);
      const A iTs = rs.iTs, iTt = rs.iTt;
      KD_SIMD_SUM(s6, s7)
      for (int c = 0; c < C; ++c) {
        s6 += kexp((v.s(c) - ms) * iTs);
        s7 += kexp((v.t(c) - mt) * iTt);
      }
      se[6] = s6;
      se[7] = s7;
    }
    if (rs.mode != kTopkNone)
      for (int c = 0; c < C; ++c) support_sums(se, c, v.s(c), v.t(c));
  } else {
    for (int c = ex.lane(); c < C; c += ex.lanes()) {
      const A a = v.s(c), b = v.t(c);
      if (rs.full) {
        se[0] += kexp((a - ms) * iT);
        se[1] += kexp((b - mt) * iT);
        if (rs.dec && c != y) {
          se[2] += kexp((a - rs.m_s_nt) * iT);
          se[3] += kexp((b - rs.m_t_nt) * iT);
        }
      }
      if (rs.rel && !rs.in_rel(sh, by_teacher, a, b, c)) {
        se[4] += kexp((a - rs.m_s_r) * iT);
        se[5] += kexp((b - rs.m_t_r) * iT);
      }
      if (rs.dtkd) {
        se[6] += kexp((a - ms) * rs.iTs);
        se[7] += kexp((b - mt) * rs.iTt);
      }
      if (rs.mode != kTopkNone) support_sums(se, c, a, b);
    }
  }
  ex.template reduce_sum<12>(se);
  se_full[0] = se[0];
  se_full[1] = se[1];
  rs.lse_s = klog(se[0]);
  rs.lse_t = klog(se[1]);
  rs.lse_s_nt = klog(se[2]);
  rs.lse_t_nt = klog(se[3]);
  rs.lse_s_r = klog(se[4]);
  rs.lse_t_r = klog(se[5]);
  rs.lse_sd = klog(se[6]);
  rs.lse_td = klog(se[7]);
  rs.lse_sk = klog(se[8]);
  rs.lse_tk = klog(se[9]);
  rs.lse_so = klog(se[10]);
  rs.lse_to = klog(se[11]);
}

//: the tail outcome of a top-k teacher (topk_norm tail), after P4: the student's
//: log q_tail = LSE_{c∉S}(s̃/T) − LSE(s̃/T) (masking, never 1 − Σq); the teacher's log p_tail likewise for
//: a dense teacher, and log(max(0, −expm1(LSE_k logprob_k))) for a sparse one (at T = 1, −inf when 0);
//: then its (d, qg)
template <class A>
KD_FN void set_tail(RowState<A>& rs) {
  rs.d_tail = rs.qg_tail = A(0);
  rs.lq_tail = rs.lp_tail = -kinf<A>();
  if (!(rs.div && rs.mode != kTopkNone && rs.norm == kNormTail)) return;
  rs.lq_tail = (rs.m_so - rs.m_s) * rs.iT + rs.lse_so - rs.lse_s;
  if (rs.mode == kTopkSparse) {
    const A mass = rs.m_t + rs.lse_t;  // LSE_k logprob_k (T = 1: lse_t is unscaled)
    const A p_tail = mass == -kinf<A>() ? A(1) : kmax(A(0), -kexpm1(kmin(mass, A(0))));
    rs.lp_tail = p_tail > A(0) ? klog(p_tail) : -kinf<A>();
  } else {
    rs.lp_tail = (rs.m_to - rs.m_t) * rs.iT + rs.lse_to - rs.lse_t;
  }
  const DivPair<A> t = divergence_terms(rs.dp, rs.lp_tail, rs.lq_tail, kexp(rs.lp_tail), kexp(rs.lq_tail));
  rs.d_tail = t.d;
  rs.qg_tail = t.qg;
}

//: the row constants of P3's maxima: LSE shifts, DTKD's temperatures (x ≤ 0 or v ≤ 0 → both τ) and
//: TDL's norms
template <class A>
KD_FN void set_row_constants(RowState<A>& rs, const RowMaxima<A>& m) {
  rs.m_s = kshift(m.mx[0]);
  rs.m_t = kshift(m.mx[1]);
  rs.m_s_nt = kshift(m.mx[2]);
  rs.m_t_nt = kshift(m.mx[3]);
  rs.m_s_r = kshift(m.mx[4]);
  rs.m_t_r = kshift(m.mx[5]);
  rs.m_sk = kshift(m.mx[6]);
  rs.m_tk = kshift(m.mx[7]);
  rs.m_so = kshift(m.mx[8]);
  rs.m_to = kshift(m.mx[9]);
  // renorm needs a finite teacher and student logit on S, teacher a finite teacher logit on S
  const bool no_s = m.mx[6] == -kinf<A>(), no_t = m.mx[7] == -kinf<A>();
  rs.kd_empty = rs.div && rs.mode != kTopkNone &&
                ((rs.norm == kNormRenorm && (no_s || no_t)) || (rs.norm == kNormTeacher && no_t));
  if (rs.tdl) {
    for (int G = 0; G < 3; ++G) {
      const A raw = ksqrt(m.dots[3 * G + 1]) * ksqrt(m.dots[3 * G + 2]);
      rs.uv[G] = m.dots[3 * G];
      rs.uu[G] = m.dots[3 * G + 1];
      rs.clamped[G] = !(raw >= A(kCosEps));
      rs.den[G] = rs.clamped[G] ? A(kCosEps) : raw;
    }
  }
  const A T = rs.T;
  rs.dt_ok = false;
  rs.Ts = rs.Tt = T;
  rs.dt_m = m.best_i;
  rs.dt_x = m.mx[1];
  rs.dt_v = m.best_v;
  rs.dv = A(0);
  if (rs.dtkd && rs.dt_x > A(0) && rs.dt_v > A(0)) {
    const A den = rs.dt_x + rs.dt_v;
    rs.dt_ok = true;
    rs.Ts = A(2) * rs.dt_v * T / den;
    rs.Tt = A(2) * rs.dt_x * T / den;
  }
  rs.iTs = A(1) / rs.Ts;
  rs.iTt = A(1) / rs.Tt;
}

//: DKD / AEKT row constants: b_t, b_s in log space, TCKD, and α_n (AEKT: min(p_y/q_y, w_max)·α, with
//: p_y/q_y = 0 where p_y = 0)
template <class View, class A>
KD_FN void set_decoupled(RowState<A>& rs, const View& v, const KdParams& P) {
  rs.b0 = rs.b1 = rs.alpha = rs.tckd = A(0);
  if (!rs.dec) return;
  const int y = rs.y;
  const A iT = rs.iT;
  const A lbs0 = (v.s(y) - rs.m_s) * iT - rs.lse_s, lbs1 = (rs.m_s_nt - rs.m_s) * iT + rs.lse_s_nt - rs.lse_s;
  const A lbt0 = (v.t(y) - rs.m_t) * iT - rs.lse_t, lbt1 = (rs.m_t_nt - rs.m_t) * iT + rs.lse_t_nt - rs.lse_t;
  const A bt0 = kexp(lbt0), bt1 = kexp(lbt1);
  rs.b0 = bt0 > A(0) ? bt0 : A(0);
  rs.b1 = bt1 > A(0) ? bt1 : A(0);
  rs.tckd = (bt0 > A(0) ? bt0 * (lbt0 - lbs0) : A(0)) + (bt1 > A(0) ? bt1 * (lbt1 - lbs1) : A(0));
  rs.alpha = A(P.tckd_weight);
  if (P.adaptive_tckd) rs.alpha = rs.alpha * kmin(bt0 > A(0) ? kexp(lbt0 - lbs0) : A(0), A(P.max_weight));
}

//: LDRLD's local term on I: reads the k selected columns (raw, in double, into sh.rel_s / rel_t; scaled as
//: (z − max_I z)/T, shifted by the set's own maximum so nothing outside I costs precision), then pair terms
//: (rank r handled by lane r mod lanes) + set term, and each member's sparse gradient (sh.rel_g).
//: O(k²) scalar work per row, done in double: its KLs of nearly equal distributions cancel.
template <class Exec, class View, class A>
KD_FN A local_term(const Exec& ex, const View& v, RowShared<A>& sh, const RowState<A>& rs, const KdParams& P) {
  using W = double;
  const int k = static_cast<int>(P.rel_k);
  for (int i = ex.lane(); i < k; i += ex.lanes()) {
    const int c = sh.rel.idx[i];
    sh.rel_s[i] = W(v.s(c));
    sh.rel_t[i] = W(v.t(c));
  }
  ex.sync();
  const W T = W(rs.T);
  const W npairs1 = W(k * (k - 1) / 2) + W(1);
  W ms = -kinf<W>(), mt = -kinf<W>();
  for (int i = 0; i < k; ++i) { ms = kmax(ms, sh.rel_s[i]); mt = kmax(mt, sh.rel_t[i]); }
  ms = kshift(ms);
  mt = kshift(mt);
  auto zs = [&](int i) { return (sh.rel_s[i] - ms) / T; };
  auto zt = [&](int i) { return (sh.rel_t[i] - mt) / T; };
  W ss = W(0), st = W(0);
  for (int i = 0; i < k; ++i) { ss += kexp(zs(i)); st += kexp(zt(i)); }
  const W ls = klog(ss), lt = klog(st);
  W lpart = W(0);
  for (int i = ex.lane(); i < k; i += ex.lanes()) {
    W gi = W(0);
    for (int j = 0; j < k; ++j) {
      if (j == i) continue;
      const int lo = i < j ? i : j, hi = i < j ? j : i;
      const W w = pair_weight(W(P.rel_delta), W(P.rel_lambda), W(P.rel_eps), lo + 1, hi + 1);
      W l, d;
      bernoulli_kl((sh.rel_t[lo] - sh.rel_t[hi]) / T, (sh.rel_s[lo] - sh.rel_s[hi]) / T, l, d);
      if (i < j) { lpart += w * l; gi += w * d; }
      else { gi -= w * d; }
    }
    const W lq = zs(i) - ls, lp = zt(i) - lt;
    const W p = kexp(lp);
    if (p > W(0)) lpart += p * (lp - lq);
    gi += kexp(lq) - p;
    sh.rel_g[i] = A(W(P.local_weight) * T * gi / npairs1);
  }
  A part[1] = {A(lpart)};
  ex.template reduce_sum<1>(part);
  ex.sync();
  return rs.T * rs.T * part[0] / A(npairs1);
}

//: P5 — reads s̃, t': the loss sums of every term and (CPU twin) the bulk gradient into the buffer, plus
//: Σg and Σg·s̃ for Z's backward; returns them reduced in acc[kNumSums]
//: (the generic-divergence KD term, rs.div: Σd, Σqg, then rs.qg_sum; the fused passes form Z's backward
//: sums of its gradient from kQGL..kQA, since Σqg is only known after the reduction)
template <class Exec, class View, class A>
KD_FN void p5_sums(const Exec& ex, View& v, const RowShared<A>& sh, RowState<A>& rs, const KdParams& P,
                   const RowIO<A>& io, int C, bool by_teacher, const A (&se_full)[2], A (&acc)[kNumSums]) {
  const A NEG = -kinf<A>();
  const bool stdz = P.standardize != 0;
  for (int i = 0; i < kNumSums; ++i) acc[i] = A(0);
  if constexpr (Exec::kSplitTerms) {  // one unit-stride loop per term, accumulating in the buffer
    if (rs.div) {
      div_pass_split(P, rs, v, C, [&](int c, A b) { return in_support(v, sh, rs, c, b); }, acc);
    } else if (rs.full) {  // q and p come from P4's kept exps: KD needs no exp here, DKD only q̂ and p̂
      const A rss = A(1) / se_full[0], rst = A(1) / se_full[1];
      // (∂ℓ/∂T covers the KD term only: a learnable T with other T-dependent terms is a spec error)
      if (!rs.kd) full_pass_split<false, true, false>(P, rs, v, C, rss, rst, acc);
      else if (!rs.dec && !rs.want_dtemp) full_pass_split<true, false, false>(P, rs, v, C, rss, rst, acc);
      else if (!rs.dec) full_pass_split<true, false, true>(P, rs, v, C, rss, rst, acc);
      else if (!rs.want_dtemp) full_pass_split<true, true, false>(P, rs, v, C, rss, rst, acc);
      else full_pass_split<true, true, true>(P, rs, v, C, rss, rst, acc);
    } else {
      for (int c = 0; c < C; ++c) v.store_bulk(c, A(0));
    }
    if (rs.dtkd) {
      if (rs.dt_ok) dtkd_pass_split<true>(P, rs, v, C, acc);
      else dtkd_pass_split<false>(P, rs, v, C, acc);
    }
    if (rs.rel) rest_pass_split(P, rs, sh.rel.cut(), by_teacher, v, C, acc);
    if (rs.tdl)
      for (int c = 0; c < C; ++c) v.add_bulk(c, term_tdl(P, rs, sh, c, v.s(c), v.t(c)));
    if (io.want_grad && stdz) {
      A sg = A(0), sgz = A(0);
      KD_SIMD_SUM(sg, sgz)
      for (int c = 0; c < C; ++c) {
        const A a = v.s(c), g = v.bulk(c);
        const bool live = a != NEG;
        sg += live ? g : A(0);
        sgz += live ? g * a : A(0);
      }
      acc[kSG] = sg;
      acc[kSGZ] = sgz;
    }
  } else {
    for (int c = ex.lane(); c < C; c += ex.lanes()) {
      const A a = v.s(c), b = v.t(c);
      const A g = elem_bulk<true>(P, rs, sh, c, a, b, in_support(v, sh, rs, c, b), acc);
      if (io.want_grad && stdz && a != NEG) { acc[kSG] += g; acc[kSGZ] += g * a; }
    }
  }
  ex.template reduce_sum<kNumSums>(acc);
  if (!Exec::kSplitTerms && rs.div) {
    finish_div(rs, acc);
    if (io.want_grad && stdz) {  // Σ g and Σ g·s̃ of kd_w·T·(qg − q·Σqg) over the finite s̃ (no tail: no S)
      const A w = A(P.kd_weight) * rs.T;
      acc[kSG] += w * (acc[kQGL] - acc[kQL] * rs.qg_sum);
      acc[kSGZ] += w * (acc[kQGA] - acc[kQA] * rs.qg_sum);
    }
  }
}

//: the row loss from P5's sums (term order as in the reference; KL values clamped at 0) and DTKD's
//: argmax-column gradient rs.dv; sets io.loss and io.dtemp
template <class A>
KD_FN void row_loss(RowState<A>& rs, const KdParams& P, RowIO<A>& io, const RawStats<A>& raw, A local,
                    const A (&acc)[kNumSums]) {
  const A T = rs.T, T2 = rs.T * rs.T;
  A loss = A(0);
  if (rs.kd) loss += A(P.kd_weight) * T2 * kclamp0(acc[kKL]);
  if (P.ce_weight != 0) loss += A(P.ce_weight) * (raw.lse_raw - raw.s_raw_y);
  if (rs.dec) loss += T2 * (rs.alpha * kclamp0(rs.tckd) + A(P.nckd_weight) * kclamp0(acc[kNCKD]));
  if (rs.dtkd) {
    const A kl = acc[kKLD];
    loss += A(P.dtkd_weight) * (rs.Tt * rs.Ts) * kclamp0(kl);
    if (rs.dt_ok) {
      const A den = rs.dt_x + rs.dt_v;
      const A dTs = A(2) * T * rs.dt_x / (den * den), dTt = -dTs;
      const A dKL_dTs = -acc[kB1] / (rs.Ts * rs.Ts);
      const A dKL_dTt = -(acc[kB2] - kl * acc[kB3]) / (rs.Tt * rs.Tt);
      rs.dv = A(P.dtkd_weight) * ((dTt * rs.Ts + rs.Tt * dTs) * kl +
                                  rs.Tt * rs.Ts * (dKL_dTs * dTs + dKL_dTt * dTt));
    }
  }
  if (rs.rel) loss += A(P.local_weight) * local + A(P.rest_weight) * (T2 * kclamp0(acc[kKLR]));
  if (rs.tdl) {
    const A w[3] = {A(P.tdl_pos), A(P.tdl_neg), A(P.tdl_non)};
    A tdl = A(0);
    for (int G = 0; G < 3; ++G) tdl += w[G] * (A(1) - rs.uv[G] / rs.den[G]);
    loss += A(P.tdl_weight) * tdl;
  }
  io.loss = loss;
  io.dtemp = rs.kd ? A(P.kd_weight) * (A(2) * T * acc[kKL] - (acc[kA1] + acc[kA2] - acc[kKL] * acc[kA3]))
                   : A(0);
}

//: P6 — the gradient, written once: the sparse columns join the bulk (and Z's sums), then Z backward,
//: CE on the raw logits, × grad_scale
template <class Exec, class View, class A>
KD_FN void p6_write(const Exec& ex, View& v, const RowShared<A>& sh, const RowState<A>& rs, const KdParams& P,
                    const RowIO<A>& io, const RawStats<A>& raw, A (&acc)[kNumSums]) {
  const int C = io.C, y = rs.y < 0 ? 0 : rs.y;
  const bool stdz = P.standardize != 0, ce = P.ce_weight != 0;
  // sparse columns join the Z-backward sums (every lane adds the same, after the reduction)
  if (rs.rel) {
    for (int i = 0; i < static_cast<int>(P.rel_k); ++i) {
      const int c = sh.rel.idx[i];
      if (stdz) { acc[kSG] += sh.rel_g[i]; acc[kSGZ] += sh.rel_g[i] * v.s(c); }
      if (View::kBuffersGrad && ex.leader()) v.add_bulk(c, sh.rel_g[i]);
    }
  }
  if (rs.dtkd && rs.dt_ok) {
    if (stdz) { acc[kSG] += rs.dv; acc[kSGZ] += rs.dv * rs.dt_v; }
    if (View::kBuffersGrad && ex.leader()) v.add_bulk(rs.dt_m, rs.dv);
  }
  ex.sync();
  const A gbar = stdz ? acc[kSG] / kmax(rs.n_s, A(1)) : A(0);
  const A coef = (stdz && rs.sd_s > A(0)) ? acc[kSGZ] / (kmax(rs.n_s - A(1), A(1)) * rs.sd_s) : A(0);
  const A cw = A(P.ce_weight), scale = io.grad_scale, lse_raw = raw.lse_raw;
  if constexpr (View::kBuffersGrad) {
    if (stdz && ce) write_buffered<true, true>(v, C, y, gbar, rs.sp_s, coef, cw, lse_raw, scale);
    else if (stdz) write_buffered<true, false>(v, C, y, gbar, rs.sp_s, coef, cw, lse_raw, scale);
    else if (ce) write_buffered<false, true>(v, C, y, gbar, rs.sp_s, coef, cw, lse_raw, scale);
    else write_buffered<false, false>(v, C, y, gbar, rs.sp_s, coef, cw, lse_raw, scale);
  } else {
    for (int c = ex.lane(); c < C; c += ex.lanes()) {
      const A a = v.s(c), b = v.t(c);
      A g = elem_bulk<false>(P, rs, sh, c, a, b, in_support(v, sh, rs, c, b), acc) + elem_sparse(P, rs, sh, c, a, b);
      if (stdz) g = a != -kinf<A>() ? (g - gbar) / rs.sp_s - coef * a : A(0);
      if (ce) g += cw * (kexp(v.s_raw(c) - lse_raw) - (c == y ? A(1) : A(0)));
      v.write(c, g * scale);
    }
  }
}

//: the spec selects a top-k somewhere (TSM, LDRLD's set, TDL's groups)
KD_HD bool needs_topk(const KdParams& P) {
  return P.use_tsm != 0 || P.use_relation != 0 || P.use_tdl != 0 || P.topk_mode == kTopkDense;
}

//: one row of the engine: the driver over the passes above (docs/README.md; the header comment of this file).
//: kTopK = false compiles the engine without its top-k machinery (per-lane lists, merges, sparse columns)
//: for specs where needs_topk(P) is false (the CUDA kernels' specialisation; the CPU twin keeps one).
template <bool kTopK = true, class Exec, class View, class A>
KD_FN void distill_row(const Exec& ex, View& v, RowShared<A>& sh, const KdParams& P, RowIO<A>& io) {
  const int C = io.C;
  // ---- labels: ignored rows are 0, bad labels NaN (never read out of bounds) --------------------
  const bool ignored = io.has_labels && io.label == P.ignore_index;
  const bool bad = io.has_labels && !ignored && (io.label < 0 || io.label >= C);
  if (ignored || bad) return fill_row(ex, v, io, ignored ? A(0) : knan<A>());
  if (io.bad_teacher) return fill_row(ex, v, io, knan<A>());  // a sparse teacher id outside [0, C)

  RowState<A> rs;
  rs.y = io.has_labels ? static_cast<int>(io.label) : -1;
  const int y = rs.y < 0 ? 0 : rs.y;
  rs.T = io.T;
  rs.iT = A(1) / io.T;
  rs.kd = P.kd_weight != 0;
  rs.dec = P.use_decoupled != 0;
  rs.dtkd = P.dtkd_weight != 0;
  rs.rel = kTopK && P.use_relation != 0;
  rs.tdl = kTopK && P.use_tdl != 0;
  rs.full = rs.kd || rs.dec;
  rs.want_dtemp = io.want_dtemp;
  rs.div = rs.kd && (P.divergence != kForwardKL || P.topk_mode != kTopkNone);
  rs.mode = static_cast<int>(P.topk_mode);
  rs.norm = static_cast<int>(P.topk_norm);
  rs.dp = {static_cast<int>(P.divergence), A(P.div_param), A(log(P.div_param)), A(log1p(-P.div_param))};
  const bool by_teacher = P.rank_by_teacher != 0;

  const RawStats<A> raw = p0_raw_stats(ex, v, rs, C, y, P.standardize != 0, P.ce_weight != 0);
  if constexpr (kTopK) {
    if (P.use_tsm) p1_tsm(ex, v, sh, P, io, C, y);
    // ---- P2: selections: LDRLD's I (by s̃ or t'), TDL's Pos then Neg (by t') ----------------------
    if (rs.rel) {
      if (by_teacher) ex.topk([&](int c) { return v.t(c); }, C, static_cast<int>(P.rel_k), sh.rel);
      else ex.topk([&](int c) { return v.s(c); }, C, static_cast<int>(P.rel_k), sh.rel);
    }
    if (rs.tdl) {
      const int k = static_cast<int>(P.tdl_k);
      ex.topk([&](int c) { return v.t(c); }, C, k, sh.pos);
      ex.topk([&](int c) { const A b = v.t(c); return neg_key(sh.pos.contains(b, c), b); }, C, k, sh.neg);
    }
    if (P.topk_mode == kTopkDense) ex.topk([&](int c) { return v.t(c); }, C, static_cast<int>(P.topk_k), sh.topk);
  }
  const RowMaxima<A> m = p3_maxima(ex, v, sh, rs, C, by_teacher);
  if (!(m.poison == A(0))) return fill_row(ex, v, io, knan<A>());        // a NaN or +inf in s̃ or t'
  // fully masked (a sparse tail teacher with no finite slot is all tail mass: computed)
  const bool teacher_optional = rs.mode == kTopkSparse && rs.norm == kNormTail;
  if (m.mx[0] == -kinf<A>() || (m.mx[1] == -kinf<A>() && !teacher_optional)) return fill_row(ex, v, io, A(0));
  set_row_constants(rs, m);
  A se_full[2];
  p4_lse(ex, v, sh, rs, C, by_teacher, se_full);
  set_tail(rs);
  set_decoupled(rs, v, P);
  const A local = rs.rel ? local_term(ex, v, sh, rs, P) : A(0);
  A acc[kNumSums];
  p5_sums(ex, v, sh, rs, P, io, C, by_teacher, se_full, acc);
  row_loss(rs, P, io, raw, local, acc);
  if (io.want_grad) p6_write(ex, v, sh, rs, P, io, raw, acc);
}

}  // namespace kd
