// sim_engine.cpp — the CUDA launch's code path (kd_block_row.h: StreamView + a simulated block of `lanes`
// threads, sim_exec.h) on host memory, behind the test-only op kdkernels::_logit_distill_fwd_sim (ops.cpp).
// It checks on machines without a GPU what only the CUDA kernels run: the prologue's count (here a host
// loop), one block per row (the two-pass plain-KD specialisation where the GPU takes it; a sparse teacher's
// rows sorted into a SparseTable the lanes share, as the GPU's shared memory), then the last block's
// reduce_rows. One row at a time.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <memory>
#include <thread>
#include <vector>

#include "cpu_engine.h"
#include "kd_block_row.h"
#include "sim_exec.h"

namespace kd {
namespace {

struct HostCvt {
  using Half = c10::Half;  // the 16-bit storage types (kd_sparse_view.h logprob_at)
  using BFloat16 = c10::BFloat16;
  template <class A, class X>
  static A to_acc(X x) { return static_cast<A>(x); }
  template <class X, class A>
  static X from_acc(A x) { return static_cast<X>(x); }
};

//: `body(ex)` on a simulated block of `lanes` threads
template <class A, class Body>
void on_block(int lanes, Body body) {
  SimBlock<A> block(lanes);
  auto lane = [&](int id) { body(SimExec<A>{&block, id}, block); };
  std::vector<std::thread> others;
  for (int id = 1; id < lanes; ++id) others.emplace_back(lane, id);
  lane(0);
  for (auto& th : others) th.join();
}

//: the scalar of sum / batchmean: the last block's reduce_rows over the row losses
template <class A>
void sim_reduce(const KdLaunch& L, int lanes, unsigned long long count) {
  if (L.params.reduction == kReduceNone) return;
  const A* rows = static_cast<const A*>(L.row_loss);
  on_block<A>(lanes, [&](const SimExec<A>& ex, SimBlock<A>&) {
    reduce_rows<A>(ex, L, count, [&](int64_t n) { return rows[n]; });
  });
}

//: batchmean's valid-row count (the prologue kernel's)
inline unsigned long long sim_count(const KdLaunch& L) {
  unsigned long long count = 0;
  for (int64_t n = 0; n < L.N; ++n) count += row_counted(L, n) ? 1ull : 0ull;
  return count;
}

template <class S, class Tt, class A>
void sim_forward_typed(const KdLaunch& L, int lanes) {
  const unsigned long long count = sim_count(L);
  const bool two_pass_kd = use_two_pass_kd<S, Tt>(L), topk = needs_topk(L.params);
  for (int64_t n = 0; n < L.N; ++n)
    on_block<A>(lanes, [&](const SimExec<A>& ex, SimBlock<A>& block) {
      if (two_pass_kd) run_block_row_kd<S, Tt, A, HostCvt>(ex, L, n, count);
      else if (topk) run_block_row<S, Tt, A, HostCvt, true>(ex, block.sh, L, n, count);
      else run_block_row<S, Tt, A, HostCvt, false>(ex, block.sh, L, n, count);
    });
  sim_reduce<A>(L, lanes, count);
}

//: a sparse teacher's launch (the log-probabilities in any float dtype: read once per row at the sort)
template <class S, class A>
void sim_forward_sparse(const KdLaunch& L, int lanes) {
  const unsigned long long count = sim_count(L);
  auto table = std::make_unique<SparseTable<A>>();  // the block's shared table, reused row after row
  for (int64_t n = 0; n < L.N; ++n)
    on_block<A>(lanes, [&](const SimExec<A>& ex, SimBlock<A>& block) {
      run_block_row_sparse<S, A, HostCvt>(ex, block.sh, *table, L, n, count);
    });
  sim_reduce<A>(L, lanes, count);
}

//: the CUDA engine's dtype pairs (cuda/kd_kernels.cu): any of f32/f16/bf16 with any, or f64 with f64
template <class S>
void sim_teacher_dispatch(const KdLaunch& L, int lanes) {
  switch (L.t_dtype) {
    case KdDtype::f32: return sim_forward_typed<S, float, float>(L, lanes);
    case KdDtype::f16: return sim_forward_typed<S, c10::Half, float>(L, lanes);
    case KdDtype::bf16: return sim_forward_typed<S, c10::BFloat16, float>(L, lanes);
    case KdDtype::f64: break;
  }
}

}  // namespace

void sim_forward(const KdLaunch& L, int lanes) {
  if (L.t_ids != nullptr) {
    switch (L.s_dtype) {
      case KdDtype::f32: return sim_forward_sparse<float, float>(L, lanes);
      case KdDtype::f16: return sim_forward_sparse<c10::Half, float>(L, lanes);
      case KdDtype::bf16: return sim_forward_sparse<c10::BFloat16, float>(L, lanes);
      case KdDtype::f64: return sim_forward_sparse<double, double>(L, lanes);
    }
  }
  switch (L.s_dtype) {
    case KdDtype::f32: return sim_teacher_dispatch<float>(L, lanes);
    case KdDtype::f16: return sim_teacher_dispatch<c10::Half>(L, lanes);
    case KdDtype::bf16: return sim_teacher_dispatch<c10::BFloat16>(L, lanes);
    case KdDtype::f64: return sim_forward_typed<double, double, double>(L, lanes);
  }
}

}  // namespace kd
