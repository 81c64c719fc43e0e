// kd_row_state.h — what one row of the engine keeps between passes (shared by every backend).
//
//  * Sel / SelCut: a top-k selection in rank order. Selection order: larger key, then lower index
//    (kd_math.h `better`), so the top-k is exactly {c : (key_c, c) ⪰ (key, idx) of its k-th entry} —
//    an O(1) membership test every later pass uses instead of a per-class flag array.
//  * RowShared: state all lanes of a row read (CUDA: __shared__ memory; CPU: a thread-local object).
//  * RowIO: a row's inputs (label, T, gradient scale) and outputs (loss, ∂ℓ/∂T).
//  * RowState: the row constants (LSEs, DKD's b, DTKD's temperatures, TDL's dot products, …), computed
//    identically in every lane after each reduction.
#pragma once

#include "kd_math.h"
#include "kd_params.h"

namespace kd {

//: the k-th entry of a selection: c is selected iff (key_c, c) ⪰ (key, idx) (a copy keeps loops alias-free)
template <class A>
struct SelCut {
  A key;
  int idx;
  KD_HD bool contains(A v, int c) const { return v > key || (v == key && c <= idx); }
};

//: a top-k selection (rank order) with the O(1) membership test of kd_math.h
template <class A>
struct Sel {
  int k;
  int idx[kMaxTopK];
  A key[kMaxTopK];
  KD_HD bool contains(A v, int c) const {
    return v > key[k - 1] || (v == key[k - 1] && c <= idx[k - 1]);
  }
  KD_HD SelCut<A> cut() const { return {key[k - 1], idx[k - 1]}; }
  KD_HD int rank_of(int c) const {
    for (int r = 0; r < k; ++r)
      if (idx[r] == c) return r;
    return -1;
  }
};

//: width of the per-warp reduction scratch (largest reduce_sum<N> below)
constexpr int kRedWidth = 20;

//: row state every lane reads (CUDA: __shared__; CPU: a thread-local object)
template <class A>
struct RowShared {
  Sel<A> tsm, rel, pos, neg;
  Sel<A> topk;                               // the support S of a dense top-k teacher (topk_mode 1)
  A tsm_val[kMaxTopK];                       // t' of the TSM members, by rank
  double rel_s[kMaxTopK], rel_t[kMaxTopK];   // s̃, t' of LDRLD's set I, by rank, in double (the local term's
                                             // arithmetic; scaled there by its own shift)
  A rel_g[kMaxTopK];                         // sparse gradient (w.r.t. s̃) of L_local, by rank
  A red[32 * kRedWidth];                     // reduction scratch (CUDA)
  int red_i[32];
};

//: per-row inputs and outputs of distill_row
template <class A>
struct RowIO {
  int C;
  int64_t label;     // ignored when !has_labels
  bool has_labels;
  A T;               // temperature of this row
  bool want_grad, want_dtemp;
  bool bad_teacher;  // a sparse teacher row holds an id ≥ C (the row is NaN unless ignored)
  A grad_scale;
  A loss, dtemp;     // outputs (every lane holds them)
};

//: the divergence of the KD term and its parameter w (β of jsd, α of skew_kl / skew_rkl) with log w,
//: log(1 − w) (mixtures are taken in log space)
template <class A>
struct DivParam {
  int code;
  A w, log_w, log_1mw;
};

//: row constants, identical in every lane
template <class A>
struct RowState {
  int y;                     // label (−1: none)
  A T, iT, iTs, iTt;         // T and the reciprocals of T, T_s, T_t
  bool kd, dec, dtkd, rel, tdl, full, want_dtemp;
  // the KD term by the generic divergence formula (a divergence other than forward KL, or a top-k
  // teacher): D = Σ_o d_o over the outcomes o, ∂(T²D)/∂s̃_c = T·(qg_c + extra_c − q_c·Σ_o qg_o)
  bool div, kd_empty;        // kd_empty: the support holds no finite teacher / student logit (KD term 0)
  int mode, norm;            // topk_mode, topk_norm
  DivParam<A> dp;
  // support S (top-k / sparse ids) and its complement: shifts (max s̃, t' on S and off S) and shifted LSEs
  A m_sk, m_tk, m_so, m_to, lse_sk, lse_tk, lse_so, lse_to;
  // the tail outcome (topk_norm tail): log-probabilities and its (d, qg); Σ_o qg_o of the whole row
  A lq_tail, lp_tail, d_tail, qg_tail, qg_sum;
  // standardisation of s (for the backward)
  A n_s, sd_s, sp_s;
  // shifts (row maxima of s̃, t' over: all classes, non-target, rest c ∉ I; 0 for an empty set) and the
  // shifted LSEs at T: lse_X = log Σ_{c∈X} exp((z_c − m_X)/T), so log q_c = (s̃_c − m)/T − lse (exact where
  // s̃/T itself would overflow)
  A m_s, m_t, m_s_nt, m_t_nt, m_s_r, m_t_r;
  A lse_s, lse_t, lse_s_nt, lse_t_nt, lse_s_r, lse_t_r;
  // DKD / AEKT
  A b0, b1, alpha, tckd;
  // DTKD
  bool dt_ok;
  int dt_m;
  A dt_x, dt_v, Ts, Tt, lse_sd, lse_td, dv;  // lse_sd/td shifted by m_s/m_t (T_s, T_t > 0)
  // TDL per group (Pos, Neg, Non): u·v, |u|², den = max(|u||v|, eps), den clamped?
  A uv[3], uu[3], den[3];
  bool clamped[3];

  KD_HD bool in_rel(const RowShared<A>& sh, bool by_teacher, A s, A t, int c) const {
    return sh.rel.contains(by_teacher ? t : s, c);
  }
};

//: TDL's Neg key (as −key, best first): the smallest t' among the classes not in Pos, then the masked
//: classes, then the Pos classes (never chosen while k classes outside Pos exist, which TDL's k ≤ (C − 1)/2
//: guarantees); ties to the lower column
template <class A>
KD_HD A neg_key(bool in_pos, A t) { return in_pos ? -kinf<A>() : t == -kinf<A>() ? -kmax_finite<A>() : -t; }

}  // namespace kd
