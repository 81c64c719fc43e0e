// kd_stream_view.h — a row left in (global) memory: the View of kd_row.h for the CUDA engine, and for
// the host-side block simulator that tests the CUDA code path without a GPU (sim_engine.cpp).
//
// Nothing of the row is cached: every pass re-reads s and t (on CUDA coalesced — lane i reads columns
// i, i + lanes, … — and L2-hot between passes) and applies the row transforms on the fly:
//   s̃ = (s − μ_s)/σ'_s,  t̃ = (t − μ_t)/σ'_t            (when standardize; −inf stays −inf)
//   t' = the TSM value of t̃ for the TSM top-k (looked up by rank in the row's shared state), the
//        gt-rule value at y, t̃ elsewhere.
// Softcap (Gemma's c·tanh(x/c), softcap_s / softcap_t > 0) is applied at the load: s_raw / t_raw are the
// capped logits, and `write` multiplies the gradient w.r.t. the capped student by sech²(x/c) of the raw one
// (re-read from memory: the element is read before it is written, so grad may still alias s).
// The gradient is not buffered (kBuffersGrad = false): kd_row.h recomputes the bulk gradient in its last
// pass and writes each element once, after its last read (so grad may alias s).
// S, Tt: the storage dtypes of s (and the gradient) and of t, which may differ (bf16 student + fp32
// teacher): each is loaded in its own dtype and converted in registers. Cvt supplies `A to_acc<A>(x)` for
// both and `S from_acc<S>(A)` for the gradient.
#pragma once

#include "kd_row.h"

namespace kd {

template <class S, class Tt, class A, class Cvt>
struct StreamView {
  static constexpr bool kBuffersGrad = false;
  const S* sp;
  const Tt* tp;
  S* gp;
  A cap_s, cap_t;  // softcaps (0: none)
  bool std_on;
  A mu_s, sp_s, mu_t, sp_t;
  const RowShared<A>* tsm;  // non-null once TSM is applied
  int ty_col;
  A ty_val;

  KD_FN void init(const S* s, const Tt* t, S* g, A cap_s_, A cap_t_) {
    sp = s;
    tp = t;
    gp = g;
    cap_s = cap_s_;
    cap_t = cap_t_;
    std_on = false;
    mu_s = mu_t = A(0);
    sp_s = sp_t = A(1);
    tsm = nullptr;
    ty_col = -1;
    ty_val = A(0);
  }
  KD_FN A s_raw(int c) const {
    const A x = Cvt::template to_acc<A>(sp[c]);
    return cap_s != A(0) ? ksoftcap(x, cap_s) : x;
  }
  KD_FN A t_raw(int c) const {
    const A x = Cvt::template to_acc<A>(tp[c]);
    return cap_t != A(0) ? ksoftcap(x, cap_t) : x;
  }
  //: a dense teacher has no sparse support (a sparse one: SparseStreamView, kd_sparse_view.h)
  KD_FN bool member(int) const { return false; }
  KD_FN A s(int c) const {
    const A x = s_raw(c);
    return std_on ? (x - mu_s) / sp_s : x;
  }
  KD_FN A t(int c) const {
    A x = t_raw(c);
    if (std_on) x = (x - mu_t) / sp_t;
    if (tsm != nullptr) {
      if (tsm->tsm.contains(x, c)) return tsm->tsm_val[tsm->tsm.rank_of(c)];
      if (c == ty_col) return ty_val;
    }
    return x;
  }

  template <class Ex>
  KD_FN void set_standardize(const Ex&, A mu_s_, A sp_s_, A mu_t_, A sp_t_, bool) {
    std_on = true;
    mu_s = mu_s_;
    sp_s = sp_s_;
    mu_t = mu_t_;
    sp_t = sp_t_;
  }
  template <class Ex>
  KD_FN void set_tsm(const Ex&, const RowShared<A>& sh, int col, A val) {
    tsm = &sh;
    ty_col = col;
    ty_val = val;
  }
  KD_FN void keep_exp(int, A, A) {}
  KD_FN A kept_exp_s(int) const { return A(0); }
  KD_FN A kept_exp_t(int) const { return A(0); }
  KD_FN void store_bulk(int, A) {}
  KD_FN A bulk(int) const { return A(0); }
  KD_FN void add_bulk(int, A) {}
  //: the gradient w.r.t. the capped student, through the softcap
  KD_FN void write(int c, A g) const {
    if (cap_s != A(0)) g = g * ksoftcap_grad(Cvt::template to_acc<A>(sp[c]), cap_s);
    gp[c] = Cvt::template from_acc<S>(g);
  }
  //: a decided row's value as is
  KD_FN void fill(int c, A x) const { gp[c] = Cvt::template from_acc<S>(x); }
};

}  // namespace kd
