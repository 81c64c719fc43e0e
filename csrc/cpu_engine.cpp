// cpu_engine.cpp — the CPU twin of the CUDA engine: the same row math (kd_row.h), one lane per row.
//
// Rows are split across threads with at::parallel_for; each chunk owns one workspace of thread-local row
// buffers in the accumulation dtype (double when s is f64, float otherwise). Each operand stored in another
// dtype (16-bit, or a teacher whose dtype differs from the student's: bf16 student + fp32 teacher) is
// widened into it at the row boundary (and the gradient narrowed back), so the heavy row code exists
// once per accumulation dtype. The valid-row count comes first (labels only), the scalar of sum/batchmean
// last. Inside a row (run_row): softcap, standardisation and TSM are applied in place (else the
// input row is read where it lies; the softcap's derivative sech²(s/c) is kept for the gradient), a sparse
// teacher (ids + log-probabilities [N, K]) is scattered into a −inf row with a membership row beside it
// (so every pass sees a dense teacher row and the support S by exact masking), every pass of kd_row.h
// runs as one unit-stride, vectorisable loop per term over L1/L2-resident memory (Exec::kSplitTerms), the bulk gradient is buffered in P5 and the
// output row is written exactly once in P6. run_row is compiled for AVX2 and for the x86-64 baseline.
#include "cpu_engine.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

#include "kd_row.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define KD_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define KD_CPU_CLONES
#endif

namespace kd {
namespace {

//: one lane per row: reductions are identities, the top-k is a single insertion pass
struct CpuExec {
  //: kd_row.h runs its hot passes as one unit-stride (vectorisable) loop per term
  static constexpr bool kSplitTerms = true;
  static constexpr int lane() { return 0; }
  static constexpr int lanes() { return 1; }
  static constexpr bool leader() { return true; }
  void sync() const {}
  template <int N, class A>
  void reduce_sum(A (&)[N]) const {}
  template <int N, class A>
  void reduce_max(A (&)[N]) const {}
  template <class A>
  void reduce_best(A&, int&) const {}
  template <class Key, class A>
  void topk(Key key, int C, int k, Sel<A>& out) const {
    int cnt = 0;
    out.k = k;
    for (int c = 0; c < C; ++c) topk_insert(out.key, out.idx, cnt, k, ksel_key(key(c)), c);
  }
};

//: the row in thread-local accumulation-dtype buffers, transformed in place. A row already in the
//: accumulation dtype that no transform (softcap, Z, TSM) rewrites is read where it lies.
template <class A>
struct BufView {
  static constexpr bool kBuffersGrad = true;
  const A* sr;    // s, then s̃ (the input row itself, or sbuf)
  const A* tr;    // t, then t̃, then t' (the input row itself, or tbuf)
  const A* raw;   // where the (capped) raw student lives now
  A* sbuf;
  A* tbuf;
  A* rb;          // raw copy of s (CE after standardisation)
  A* gb;          // bulk gradient w.r.t. s̃ (first: P4's exp(zs − max))
  A* eb;          // P4's exp(zt − max)
  A* db;          // the softcap's derivative sech²(s/c) per class
  A* mb;          // sparse teacher: 1 on the support (its valid ids), else 0
  const A* dcap;  // db when the student is capped, else nullptr
  const A* mem;   // mb for a sparse teacher, else nullptr
  A* out;         // gradient row (may alias the input row: each element is written after its last read)
  int C;

  //: s (softcapped when cap_s > 0, copied when it is transformed in place)
  void load_student(const A* s, A cap_s, bool copy) {
    dcap = nullptr;
    if (cap_s != A(0)) {
      for (int c = 0; c < C; ++c) {
        sbuf[c] = ksoftcap(s[c], cap_s);
        db[c] = ksoftcap_grad(s[c], cap_s);
      }
      dcap = db;
    } else if (copy) {
      std::copy(s, s + C, sbuf);
    } else {
      sr = raw = s;
      return;
    }
    sr = raw = sbuf;
  }
  //: dense teacher logits (softcapped when cap_t > 0, copied when transformed in place)
  void load_teacher(const A* t, A cap_t, bool copy) {
    mem = nullptr;
    if (cap_t != A(0)) {
      for (int c = 0; c < C; ++c) tbuf[c] = ksoftcap(t[c], cap_t);
    } else if (copy) {
      std::copy(t, t + C, tbuf);
    } else {
      tr = t;
      return;
    }
    tr = tbuf;
  }
  //: a sparse teacher already scattered into tbuf / mb (scatter_sparse)
  void load_sparse() {
    tr = tbuf;
    mem = mb;
  }
  bool member(int c) const { return mem[c] != A(0); }
  A s_raw(int c) const { return raw[c]; }
  A t_raw(int c) const { return tr[c]; }
  A s(int c) const { return sr[c]; }
  A t(int c) const { return tr[c]; }

  template <class Ex>
  void set_standardize(const Ex&, A mu_s, A sp_s, A mu_t, A sp_t, bool keep_raw) {
    if (keep_raw) {
      std::copy(sbuf, sbuf + C, rb);
      raw = rb;
    }
    // (−inf − μ)/σ' = −inf: masked classes stay masked
    for (int c = 0; c < C; ++c) sbuf[c] = (sbuf[c] - mu_s) / sp_s;
    for (int c = 0; c < C; ++c) tbuf[c] = (tbuf[c] - mu_t) / sp_t;
  }
  template <class Ex>
  void set_tsm(const Ex&, const RowShared<A>& sh, int ty_col, A ty_val) {
    for (int i = 0; i < sh.tsm.k; ++i) tbuf[sh.tsm.idx[i]] = sh.tsm_val[i];
    if (ty_col >= 0) tbuf[ty_col] = ty_val;
  }
  void keep_exp(int c, A es, A et) {
    gb[c] = es;
    eb[c] = et;
  }
  A kept_exp_s(int c) const { return gb[c]; }
  A kept_exp_t(int c) const { return eb[c]; }
  //: the generic divergence's q_c and qg_c + extra_c, kept between its two P5 loops (kd_split_passes.h)
  void keep_div(int c, A q, A qg) {
    gb[c] = q;
    eb[c] = qg;
  }
  A kept_q(int c) const { return gb[c]; }
  A kept_qg(int c) const { return eb[c]; }
  void store_bulk(int c, A g) { gb[c] = g; }
  A bulk(int c) const { return gb[c]; }
  void add_bulk(int c, A g) { gb[c] += g; }
  //: the gradient w.r.t. the capped student, through the softcap
  void write(int c, A g) { out[c] = dcap ? g * dcap[c] : g; }
  //: a decided row's value as is
  void fill(int c, A x) { out[c] = x; }
};

//: one thread's row workspace: the view's 7 buffers, 3 staging rows (s, t, gradient in the accumulation
//: dtype, for operands stored in another dtype), and the row state
template <class A>
struct Workspace {
  static constexpr int kViewRows = 7;
  explicit Workspace(int64_t C) : C(C), buf(static_cast<size_t>(C) * (kViewRows + 3)), sh(new RowShared<A>()) {}
  int64_t C;
  std::vector<A> buf;
  std::unique_ptr<RowShared<A>> sh;
  A* view() { return buf.data(); }
  A* stage(int i) { return buf.data() + (kViewRows + i) * C; }
};

//: a sparse teacher's K slots scattered into the −inf row `t` with the membership row `mem` (1 on the
//: valid ids; ids < 0 are padding), softcapped when cap_t > 0; false when an id is ≥ C (the row is NaN)
template <class A, class I, class X>
bool scatter_sparse(const I* ids, const X* logprobs, int64_t K, int C, A cap_t, A* t, A* mem) {
  std::fill(t, t + C, -kinf<A>());
  std::fill(mem, mem + C, A(0));
  bool ok = true;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t id = static_cast<int64_t>(ids[k]);
    if (id < 0) continue;
    if (id >= C) { ok = false; continue; }
    const A x = static_cast<A>(logprobs[k]);
    t[id] = cap_t != A(0) ? ksoftcap(x, cap_t) : x;
    mem[id] = A(1);
  }
  return ok;
}

//: one row in the accumulation dtype (s, t, out: C values; out may alias s). This is where every pass of
//: kd_row.h is inlined, compiled twice (AVX2 and the x86-64 baseline; the loader picks by CPU) so its
//: loops vectorise 8 floats wide where the CPU allows; instantiated once per accumulation dtype.
//: (`sparse`: the teacher is a sparse one, already scattered into the view's buffers; t unused)
template <class A>
KD_CPU_CLONES void run_row(const KdParams& P, RowIO<A>& io, const A* s, const A* t, bool sparse, A* out, A* buf,
                           RowShared<A>* sh) {
  const int C = io.C;
  BufView<A> v{};
  v.sbuf = buf;
  v.tbuf = buf + C;
  v.gb = buf + 2 * C;
  v.eb = buf + 3 * C;
  v.rb = buf + 4 * C;
  v.db = buf + 5 * C;
  v.mb = buf + 6 * C;
  v.out = out;
  v.C = C;
  v.load_student(s, static_cast<A>(P.softcap_s), P.standardize != 0);
  if (sparse) v.load_sparse();
  else v.load_teacher(t, static_cast<A>(P.softcap_t), P.standardize || P.use_tsm);
  distill_row(CpuExec{}, v, *sh, P, io);
}

//: a row of x in the accumulation dtype: the row itself when stored in it, else widened into `stage`
template <class A, class X>
const A* widened(const X* x, int C, A* stage) {
  if constexpr (std::is_same_v<X, A>) {
    return x;
  } else {
    for (int c = 0; c < C; ++c) stage[c] = static_cast<A>(x[c]);
    return stage;
  }
}

//: rows [begin, end): each operand widened from its own storage dtype at the row boundary (no [N, C]
//: copy), the math in run_row, the gradient narrowed back to s's dtype; loss/∂ℓ/∂T rows scaled by r
template <class S, class Tt, class A>
void forward_rows(const KdLaunch& L, int64_t begin, int64_t end, A rscale, Workspace<A>& ws) {
  const int C = static_cast<int>(L.C);
  const auto* Sp = static_cast<const S*>(L.s);
  const auto* Tp = static_cast<const Tt*>(L.t);
  const bool sparse = L.t_ids != nullptr;
  const size_t id_bytes = L.ids_i64 ? sizeof(int64_t) : sizeof(int32_t);
  auto* G = static_cast<S*>(L.grad);
  auto* rows = static_cast<A*>(L.row_loss);
  auto* dtemp = static_cast<A*>(L.dtemp);
  const auto* temp = static_cast<const A*>(L.temperature);
  const A lw = static_cast<A>(L.params.loss_weight);
  for (int64_t n = begin; n < end; ++n) {
    RowIO<A> io{};
    io.C = C;
    io.has_labels = L.labels != nullptr;
    io.label = io.has_labels ? L.labels[n * L.labels_stride] : 0;
    io.T = temp ? temp[n * L.temp_stride] : static_cast<A>(L.params.temperature);
    io.want_grad = G != nullptr;
    io.want_dtemp = dtemp != nullptr;
    io.grad_scale = row_factor<A>(L, n) * rscale;
    const A* s = widened<A>(Sp + n * L.s_ld, C, ws.stage(0));
    const A* t = nullptr;
    if (sparse) {  // into the view's tbuf / mb rows (Workspace layout: BufView's buffers 1 and 6)
      const void* ids = static_cast<const char*>(L.t_ids) + static_cast<size_t>(n * L.ids_ld) * id_bytes;
      const A cap_t = static_cast<A>(L.params.softcap_t);
      A* tb = ws.view() + C;
      A* mb = ws.view() + 6 * C;
      const Tt* lp = Tp + n * L.t_ld;
      io.bad_teacher = !(L.ids_i64 ? scatter_sparse(static_cast<const int64_t*>(ids), lp, L.K, C, cap_t, tb, mb)
                                   : scatter_sparse(static_cast<const int32_t*>(ids), lp, L.K, C, cap_t, tb, mb));
    } else {
      t = widened<A>(Tp + n * L.t_ld, C, ws.stage(1));
    }
    S* g = G ? G + n * L.g_ld : nullptr;
    if constexpr (std::is_same_v<S, A>) {
      run_row<A>(L.params, io, s, t, sparse, g, ws.view(), ws.sh.get());
    } else {
      A* gt = ws.stage(2);
      run_row<A>(L.params, io, s, t, sparse, g ? gt : nullptr, ws.view(), ws.sh.get());
      if (g)
        for (int c = 0; c < C; ++c) g[c] = static_cast<S>(gt[c]);
    }
    rows[n] = lw * io.loss;
    if (dtemp) dtemp[n] = rscale * io.dtemp;
  }
}

//: the count, the rows (at::parallel_for, one workspace per chunk), then the scalar of sum/batchmean
//: (summed in double, in row order)
template <class S, class Tt, class A>
void forward_typed(const KdLaunch& L) {
  unsigned long long count = 0;
  for (int64_t n = 0; n < L.N; ++n) count += row_counted(L, n) ? 1ull : 0ull;
  const A rscale = reduction_scale<A>(L.params, count);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(L.C, 1));
  at::parallel_for(0, L.N, grain, [&](int64_t begin, int64_t end) {
    Workspace<A> ws(L.C);
    forward_rows<S, Tt, A>(L, begin, end, rscale, ws);
  });
  if (L.params.reduction == kReduceNone) return;
  const A* rows = static_cast<const A*>(L.row_loss);
  double total = 0.0;
  for (int64_t n = 0; n < L.N; ++n) total += static_cast<double>(rows[n]);
  if (L.params.reduction == kReduceBatchmean) total /= static_cast<double>(count > 1ull ? count : 1ull);
  *static_cast<A*>(L.loss) = static_cast<A>(total);
}

template <class S, class A>
void forward_teacher_dispatch(const KdLaunch& L) {
  switch (L.t_dtype) {
    case KdDtype::f32: return forward_typed<S, float, A>(L);
    case KdDtype::f64: return forward_typed<S, double, A>(L);
    case KdDtype::f16: return forward_typed<S, c10::Half, A>(L);
    case KdDtype::bf16: return forward_typed<S, c10::BFloat16, A>(L);
  }
}

template <class scalar_t, class factor_t>
void scale_typed(void* grad, int64_t N, int64_t C, int64_t ld, const factor_t* factor, int64_t fstride) {
  auto* G = static_cast<scalar_t*>(grad);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(C, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const factor_t f = factor[n * fstride];
      if (f == factor_t(1)) continue;
      scalar_t* row = G + n * ld;
      using A = std::conditional_t<std::is_same_v<scalar_t, double> || std::is_same_v<factor_t, double>,
                                   double, float>;
      const A fa = static_cast<A>(f);
      for (int64_t c = 0; c < C; ++c) row[c] = static_cast<scalar_t>(static_cast<A>(row[c]) * fa);
    }
  });
}

}  // namespace

void cpu_forward(const KdLaunch& L) {
  switch (L.s_dtype) {
    case KdDtype::f32: return forward_teacher_dispatch<float, float>(L);
    case KdDtype::f64: return forward_teacher_dispatch<double, double>(L);
    case KdDtype::f16: return forward_teacher_dispatch<c10::Half, float>(L);
    case KdDtype::bf16: return forward_teacher_dispatch<c10::BFloat16, float>(L);
  }
}

template <class factor_t>
void scale_dispatch(void* grad, KdDtype dtype, int64_t N, int64_t C, int64_t ld, const factor_t* factor,
                    int64_t fstride) {
  switch (dtype) {
    case KdDtype::f32: return scale_typed<float>(grad, N, C, ld, factor, fstride);
    case KdDtype::f64: return scale_typed<double>(grad, N, C, ld, factor, fstride);
    case KdDtype::f16: return scale_typed<c10::Half>(grad, N, C, ld, factor, fstride);
    case KdDtype::bf16: return scale_typed<c10::BFloat16>(grad, N, C, ld, factor, fstride);
  }
}

void cpu_scale_rows(void* grad, KdDtype dtype, int64_t N, int64_t C, int64_t ld, const void* factor,
                    bool factor_f64, int64_t fstride) {
  if (factor_f64)
    scale_dispatch(grad, dtype, N, C, ld, static_cast<const double*>(factor), fstride);
  else
    scale_dispatch(grad, dtype, N, C, ld, static_cast<const float*>(factor), fstride);
}

}  // namespace kd
