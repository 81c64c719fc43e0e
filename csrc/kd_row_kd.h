// kd_row_kd.h — plain KD (+ CE at T = 1, + a learnable temperature) in two passes over global memory with
// 16-byte vector loads: the CUDA engine's specialisation for the most common preset, so it carries none
// of the top-k, standardisation, TSM, decoupled or DTKD machinery of kd_row.h (the general engine, which
// still serves every other spec and rows not aligned for vector loads). Run by the GPU (cuda/kd_kernels.cu)
// and by its host simulator (sim_engine.cpp), so CI tests this code.
//
//   pass 1 (kd_online_stats): per lane, an online LSE of s/T and t/T over V-wide chunks — the chunk
//          maximum first, the running sum rescaled once per chunk — plus CE's Σ exp(s − max) and the
//          poison sum (NaN / +inf), merged over the block (reduce_max, rescale, reduce_sum);
//   pass 2 (kd_write_pass): q, p from the statistics, the KL sums (loss, ∂ℓ/∂T) and the gradient
//          kd_w·T·(q − p) + ce_w·(softmax(s) − onehot(y)), each element stored right after it is read.
// Transfers per element: s, t read twice, the gradient written once (5). The row semantics are
// kd_row.h's (ignored rows 0, bad labels / NaN / +inf NaN, fully masked rows 0, shifted LSEs, KL clamp).
#pragma once

#include <stdint.h>

#include "kd_row.h"

namespace kd {

//: the spec has only the terms of this specialisation (forward-KL KD, CE, learnable T; no softcap)
KD_HD bool plain_kd(const KdParams& P) {
  return P.standardize == 0 && P.use_tsm == 0 && P.use_decoupled == 0 && P.dtkd_weight == 0 &&
         P.use_relation == 0 && P.use_tdl == 0 && P.divergence == kForwardKL && P.topk_mode == kTopkNone &&
         P.softcap_s == 0 && P.softcap_t == 0;
}

//: V consecutive elements of X, loaded / stored as one (8- or 16-byte) access
template <class X, int V>
struct alignas(sizeof(X) * V) Pack {
  X v[V];
};

//: elements per chunk: 16 bytes of the wider operand
template <class S, class Tt>
constexpr int kKdVec = 16 / static_cast<int>(sizeof(S) > sizeof(Tt) ? sizeof(S) : sizeof(Tt));

//: a pointer / row stride suits V-wide chunks of X
template <int V, class X>
KD_HD bool chunk_aligned(const void* p, int64_t ld) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(X) * V) == 0 && ld % V == 0;
}

//: pass 1's per-lane statistics: running maxima (m), sums Σ exp((x − shift(m))/T) (z), CE's Σ exp(s − shift(m_s))
template <class A>
struct KdStats {
  A ms, zs, mt, zt, zr, poison;
};

//: fold V values of s (a) and t (b) into the running statistics (one rescale per chunk)
template <int V, class A>
KD_FN void kd_fold(KdStats<A>& st, const A (&a)[V], const A (&b)[V], A iT, bool ce) {
  A cs = st.ms, ct = st.mt;
  for (int i = 0; i < V; ++i) {
    cs = kmax(cs, a[i]);
    ct = kmax(ct, b[i]);
    st.poison += kpoison(a[i]) + kpoison(b[i]);
  }
  const A old_s = kshift(st.ms), old_t = kshift(st.mt), sh_s = kshift(cs), sh_t = kshift(ct);
  if (st.zs > A(0)) st.zs *= kexp((old_s - sh_s) * iT);
  if (st.zt > A(0)) st.zt *= kexp((old_t - sh_t) * iT);
  if (ce && st.zr > A(0)) st.zr *= kexp(old_s - sh_s);
  st.ms = cs;
  st.mt = ct;
  for (int i = 0; i < V; ++i) {
    st.zs += kexp((a[i] - sh_s) * iT);
    st.zt += kexp((b[i] - sh_t) * iT);
    if (ce) st.zr += kexp(a[i] - sh_s);
  }
}

//: load V elements of s and t at column c0 into the accumulation dtype
template <int V, class Cvt, class S, class Tt, class A>
KD_FN void kd_load(const S* sp, const Tt* tp, int c0, A (&a)[V], A (&b)[V]) {
  const Pack<S, V> ps = *reinterpret_cast<const Pack<S, V>*>(sp + c0);
  const Pack<Tt, V> pt = *reinterpret_cast<const Pack<Tt, V>*>(tp + c0);
  for (int i = 0; i < V; ++i) {
    a[i] = Cvt::template to_acc<A>(ps.v[i]);
    b[i] = Cvt::template to_acc<A>(pt.v[i]);
  }
}

//: what pass 1 says of a row
enum class RowVerdict : int { kCompute = 0, kNan = 1, kMasked = 2 };

//: pass 1: the block's statistics of the row (chunks lane, lane + lanes, …, then the scalar tail); sets
//: rs.m_s, m_t, lse_s, lse_t and CE's LSE of the raw student; returns whether the row is computed, NaN (a
//: NaN or +inf) or fully masked
template <int V, class Cvt, class Exec, class S, class Tt, class A>
KD_FN RowVerdict kd_online_stats(const Exec& ex, RowState<A>& rs, const S* sp, const Tt* tp, int C, bool ce,
                                 A& lse_raw) {
  const A NEG = -kinf<A>();
  KdStats<A> st = {NEG, A(0), NEG, A(0), A(0), A(0)};
  const int nvec = C / V;
  for (int j = ex.lane(); j < nvec; j += ex.lanes()) {
    A a[V], b[V];
    kd_load<V, Cvt>(sp, tp, j * V, a, b);
    kd_fold<V>(st, a, b, rs.iT, ce);
  }
  for (int c = nvec * V + ex.lane(); c < C; c += ex.lanes()) {
    const A a[1] = {Cvt::template to_acc<A>(sp[c])}, b[1] = {Cvt::template to_acc<A>(tp[c])};
    kd_fold<1>(st, a, b, rs.iT, ce);
  }
  A mx[2] = {st.ms, st.mt};
  ex.template reduce_max<2>(mx);
  const A sh_s = kshift(mx[0]), sh_t = kshift(mx[1]);
  A r[4] = {st.zs > A(0) ? st.zs * kexp((kshift(st.ms) - sh_s) * rs.iT) : A(0),
            st.zt > A(0) ? st.zt * kexp((kshift(st.mt) - sh_t) * rs.iT) : A(0),
            ce && st.zr > A(0) ? st.zr * kexp(kshift(st.ms) - sh_s) : A(0), st.poison};
  ex.template reduce_sum<4>(r);
  rs.m_s = sh_s;
  rs.m_t = sh_t;
  rs.lse_s = klog(r[0]);
  rs.lse_t = klog(r[1]);
  lse_raw = sh_s + klog(r[2]);
  if (!(r[3] == A(0))) return RowVerdict::kNan;
  return mx[0] == NEG || mx[1] == NEG ? RowVerdict::kMasked : RowVerdict::kCompute;
}

//: pass 2: the KL sums (acc[kKL], kA1..kA3) and, when g != nullptr, the gradient row × scale
template <int V, class Cvt, class Exec, class S, class Tt, class A>
KD_FN void kd_write_pass(const Exec& ex, const KdParams& P, const RowState<A>& rs, const S* sp, const Tt* tp, S* gp,
                         int C, int y, A lse_raw, A scale, A (&acc)[4]) {
  const A cw = A(P.ce_weight);
  const bool ce = P.ce_weight != 0;
  A sums[4] = {A(0), A(0), A(0), A(0)};
  auto column = [&](int c, A a, A b) {
    const A zs = (a - rs.m_s) * rs.iT, zt = (b - rs.m_t) * rs.iT;
    const FullTerm<A> r = term_full_qp(P, rs, rs.kd, false, rs.want_dtemp, false, a, b, zs, zt,
                                       kexp(zs - rs.lse_s), kexp(zt - rs.lse_t));
    sums[0] += r.kl;
    sums[1] += r.a1;
    sums[2] += r.a2;
    sums[3] += r.a3;
    A g = r.g;
    if (ce) g += cw * (kexp(a - lse_raw) - (c == y ? A(1) : A(0)));
    return g * scale;
  };
  const int nvec = C / V;
  for (int j = ex.lane(); j < nvec; j += ex.lanes()) {
    A a[V], b[V];
    kd_load<V, Cvt>(sp, tp, j * V, a, b);
    Pack<S, V> out;
    for (int i = 0; i < V; ++i) out.v[i] = Cvt::template from_acc<S>(column(j * V + i, a[i], b[i]));
    if (gp != nullptr) *reinterpret_cast<Pack<S, V>*>(gp + j * V) = out;
  }
  for (int c = nvec * V + ex.lane(); c < C; c += ex.lanes()) {
    const A g = column(c, Cvt::template to_acc<A>(sp[c]), Cvt::template to_acc<A>(tp[c]));
    if (gp != nullptr) gp[c] = Cvt::template from_acc<S>(g);
  }
  ex.template reduce_sum<4>(sums);
  for (int i = 0; i < 4; ++i) acc[i] = sums[i];
}

//: one row of a plain-KD spec (the semantics of distill_row): io in, io.loss / io.dtemp out
template <int V, class Cvt, class Exec, class S, class Tt, class A>
KD_FN void kd_two_pass_row(const Exec& ex, const KdParams& P, RowIO<A>& io, const S* sp, const Tt* tp, S* gp) {
  const int C = io.C;
  auto fill = [&](A value) {
    if (gp != nullptr)
      for (int c = ex.lane(); c < C; c += ex.lanes()) gp[c] = Cvt::template from_acc<S>(value);
    io.loss = value;
    io.dtemp = value;
  };
  const bool ignored = io.has_labels && io.label == P.ignore_index;
  const bool bad = io.has_labels && !ignored && (io.label < 0 || io.label >= C);
  if (ignored || bad) return fill(ignored ? A(0) : knan<A>());
  const bool ce = P.ce_weight != 0;
  const int y = io.has_labels ? static_cast<int>(io.label) : 0;
  const A s_y = ce ? Cvt::template to_acc<A>(sp[y]) : A(0);  // read before any lane writes (inplace)
  RowState<A> rs;
  rs.y = io.has_labels ? y : -1;
  rs.T = io.T;
  rs.iT = A(1) / io.T;
  rs.kd = P.kd_weight != 0;
  rs.want_dtemp = io.want_dtemp;
  A lse_raw;
  const RowVerdict verdict = kd_online_stats<V, Cvt>(ex, rs, sp, tp, C, ce, lse_raw);
  if (verdict != RowVerdict::kCompute) return fill(verdict == RowVerdict::kNan ? knan<A>() : A(0));
  A acc[4];
  kd_write_pass<V, Cvt>(ex, P, rs, sp, tp, io.want_grad ? gp : nullptr, C, y, lse_raw, io.grad_scale, acc);
  const A T = rs.T;
  A loss = A(0);
  if (rs.kd) loss += A(P.kd_weight) * T * T * kclamp0(acc[0]);
  if (ce) loss += A(P.ce_weight) * (lse_raw - s_y);
  io.loss = loss;
  io.dtemp = rs.kd ? A(P.kd_weight) * (A(2) * T * acc[0] - (acc[1] + acc[2] - acc[0] * acc[3])) : A(0);
}

}  // namespace kd
