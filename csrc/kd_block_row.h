// kd_block_row.h — one block's share of the CUDA launch, written once for the GPU (cuda/kd_kernels.cu)
// and for its host simulator (sim_engine.cpp), so CI runs exactly the code the GPU runs.
//
// The launch (kd_launch.h has the contract): a one-block prologue counts the valid rows and zeroes the
// ticket (KdScratch); then one block per row runs distill_row over a StreamView (or, for plain-KD specs
// on aligned rows, the two-pass specialisation of kd_row_kd.h; for a sparse teacher, over a SparseStreamView
// after the block has sorted the row's slots: kd_sparse_view.h), writes loss_weight·ℓ_n
// and r·∂ℓ_n/∂T_n, and — for sum / batchmean — the last block to finish (ticket) sums the row losses in a
// fixed order (reduce_rows), so the scalar is deterministic and no host sync is needed.
#pragma once

#include "kd_launch.h"
#include "kd_row_kd.h"
#include "kd_sparse_view.h"
#include "kd_stream_view.h"

namespace kd {

//: the inputs of row n of L (label, temperature, gradient scale r·grad_factor[n]) and zeroed outputs
template <class A>
KD_FN RowIO<A> row_io(const KdLaunch& L, int64_t n, A rscale) {
  RowIO<A> io;
  io.C = static_cast<int>(L.C);
  io.has_labels = L.labels != nullptr;
  io.label = io.has_labels ? L.labels[n * L.labels_stride] : 0;
  io.T = L.temperature ? static_cast<const A*>(L.temperature)[n * L.temp_stride]
                       : static_cast<A>(L.params.temperature);
  io.want_grad = L.grad != nullptr;
  io.want_dtemp = L.dtemp != nullptr;
  io.bad_teacher = false;  // (a sparse teacher's row sets it after its load: run_block_row_sparse)
  io.grad_scale = row_factor<A>(L, n) * rscale;
  io.loss = io.dtemp = A(0);
  return io;
}

//: row n's outputs: loss_weight·ℓ_n into row_loss, r·∂ℓ_n/∂T_n into dtemp
template <class A>
KD_FN void store_row(const KdLaunch& L, int64_t n, A rscale, const RowIO<A>& io) {
  static_cast<A*>(L.row_loss)[n] = static_cast<A>(L.params.loss_weight) * io.loss;
  if (L.dtemp) static_cast<A*>(L.dtemp)[n] = rscale * io.dtemp;
}

//: row n of L on the block `ex` (every lane calls it; the leader writes the row outputs); kTopK: false
//: only for specs without top-k (needs_topk)
template <class S, class Tt, class A, class Cvt, bool kTopK = true, class Exec>
KD_FN void run_block_row(const Exec& ex, RowShared<A>& sh, const KdLaunch& L, int64_t n,
                         unsigned long long count) {
  StreamView<S, Tt, A, Cvt> v;
  v.init(static_cast<const S*>(L.s) + n * L.s_ld, static_cast<const Tt*>(L.t) + n * L.t_ld,
         L.grad ? static_cast<S*>(L.grad) + n * L.g_ld : nullptr, static_cast<A>(L.params.softcap_s),
         static_cast<A>(L.params.softcap_t));
  const A rscale = reduction_scale<A>(L.params, count);
  RowIO<A> io = row_io<A>(L, n, rscale);
  distill_row<kTopK>(ex, v, sh, L.params, io);
  if (ex.leader()) store_row(L, n, rscale, io);
}

//: row n of L against a sparse teacher (L.t_ids: ids + log-probabilities [N, K]): the block sorts the
//: row's K slots into `tab` (an id ≥ C makes the row NaN), then distill_row over a SparseStreamView
//: (a sparse teacher takes no top-k term: the engine without its top-k machinery)
template <class S, class A, class Cvt, class Exec>
KD_FN void run_block_row_sparse(const Exec& ex, RowShared<A>& sh, SparseTable<A>& tab, const KdLaunch& L,
                                int64_t n, unsigned long long count) {
  const A rscale = reduction_scale<A>(L.params, count);
  RowIO<A> io = row_io<A>(L, n, rscale);
  io.bad_teacher = !load_sparse_row<A, Cvt>(ex, tab, L, n);
  SparseStreamView<S, A, Cvt> v;
  v.init_sparse(static_cast<const S*>(L.s) + n * L.s_ld, L.grad ? static_cast<S*>(L.grad) + n * L.g_ld : nullptr,
                static_cast<A>(L.params.softcap_s), &tab, sparse_span(L.K));
  distill_row<false>(ex, v, sh, L.params, io);
  if (ex.leader()) store_row(L, n, rscale, io);
}

//: the launch's rows take the two-pass plain-KD specialisation (kd_row_kd.h): a plain-KD spec whose s, t
//: and gradient rows are aligned for V-wide chunks (else the general engine runs them)
template <class S, class Tt>
KD_HD bool use_two_pass_kd(const KdLaunch& L) {
  constexpr int V = kKdVec<S, Tt>;
  return plain_kd(L.params) && chunk_aligned<V, S>(L.s, L.s_ld) && chunk_aligned<V, Tt>(L.t, L.t_ld) &&
         (L.grad == nullptr || chunk_aligned<V, S>(L.grad, L.g_ld));
}

//: row n of L by the two-pass plain-KD specialisation (as run_block_row otherwise)
template <class S, class Tt, class A, class Cvt, class Exec>
KD_FN void run_block_row_kd(const Exec& ex, const KdLaunch& L, int64_t n, unsigned long long count) {
  const A rscale = reduction_scale<A>(L.params, count);
  RowIO<A> io = row_io<A>(L, n, rscale);
  kd_two_pass_row<kKdVec<S, Tt>, Cvt>(ex, L.params, io, static_cast<const S*>(L.s) + n * L.s_ld,
                                        static_cast<const Tt*>(L.t) + n * L.t_ld,
                                        L.grad ? static_cast<S*>(L.grad) + n * L.g_ld : nullptr);
  if (ex.leader()) store_row(L, n, rscale, io);
}

//: the scalar of sum / batchmean over the row losses (each lane sums rows lane, lane + lanes, …, then
//: the block reduction); `load(n)` reads row_loss[n] (on the GPU past L1: written by other blocks)
template <class A, class Exec, class Load>
KD_FN void reduce_rows(const Exec& ex, const KdLaunch& L, unsigned long long count, Load load) {
  A part[1] = {A(0)};
  for (int64_t n = ex.lane(); n < L.N; n += ex.lanes()) part[0] += load(n);
  ex.template reduce_sum<1>(part);
  if (ex.leader()) {
    A total = part[0];
    if (L.params.reduction == kReduceBatchmean) total = total / static_cast<A>(count > 1ull ? count : 1ull);
    *static_cast<A*>(L.loss) = total;
  }
}

}  // namespace kd
