// kd_sparse_view.h — a sparse teacher (K (id, log-probability) slots per row, topk_mode 2) on the CUDA
// engine and its host simulator: the View of kd_row.h that reads the student from (global) memory as
// StreamView does and the teacher from a per-row table the block sorts into shared memory.
//
// load_sparse_row: every lane reads its slots (k = lane, lane + lanes, …), an id ≥ C marks the row bad
// (io.bad_teacher: NaN), ids < 0 are padding; then a rank sort by (id, slot) —
//     rank_k = #{j : key_j < key_k or (key_j == key_k and j < k)},   padding keyed kPadKey (last)
// — O(K²/lanes) per lane, deterministic, no atomics; the sorted ids are padded with kPadKey up to `span`
// (the power of two ≥ K) for a fixed-depth binary search.
// SparseStreamView then gives distill_row exactly the teacher row the CPU twin scatters
// (cpu_engine.cpp scatter_sparse): t(c) = the (softcapped) log-probability of c's slot and −inf off the
// support, member(c) = c is one of the row's valid ids, each by a log2(span)-step search over the sorted
// ids (the last search is memoised: a pass asks t(c) and member(c) of the same column). A duplicate id
// (invalid input: docs/topk_teachers.md) resolves as in the CPU twin: its last slot wins.
// No [N, C] or [C] scratch: the table is 2·K ints + K accumulation values per row.
#pragma once

#include <climits>

#include "kd_launch.h"
#include "kd_stream_view.h"

namespace kd {

//: the sort key of a padding slot (id < 0) and of the table's fill past K: after every valid id
//: (< C < INT_MAX), so a column search never stops on one
constexpr int kPadKey = INT_MAX;

//: a row's sparse teacher, sorted by id (CUDA: __shared__; the simulator: one per simulated block)
template <class A>
struct SparseTable {
  int key[kMaxSparseK];  // the slots' sort keys in slot order (the valid id, or kPadKey)
  int ids[kMaxSparseK];  // the keys in ascending order (ties by slot), kPadKey-filled up to the span
  A val[kMaxSparseK];    // the (softcapped) log-probability of each sorted slot (−inf for padding)
};

//: the binary search's range: the smallest power of two ≥ K (1 ≤ K ≤ kMaxSparseK)
KD_HD int sparse_span(int64_t K) {
  static_assert((kMaxSparseK & (kMaxSparseK - 1)) == 0, "kMaxSparseK must be a power of two");
  int span = 1;
  while (span < K) span <<= 1;
  return span;
}

//: element i of the int32 / int64 ids
KD_HD int64_t sparse_id(const void* ids, bool ids_i64, int64_t i) {
  return ids_i64 ? static_cast<const int64_t*>(ids)[i] : static_cast<int64_t>(static_cast<const int32_t*>(ids)[i]);
}

//: element i of the log-probabilities, stored in `dtype`, in the accumulation dtype (Cvt::Half /
//: Cvt::BFloat16: the platform's 16-bit types)
template <class A, class Cvt>
KD_FN A logprob_at(const void* logprobs, KdDtype dtype, int64_t i) {
  switch (dtype) {
    case KdDtype::f32: return Cvt::template to_acc<A>(static_cast<const float*>(logprobs)[i]);
    case KdDtype::f64: return Cvt::template to_acc<A>(static_cast<const double*>(logprobs)[i]);
    case KdDtype::f16: return Cvt::template to_acc<A>(static_cast<const typename Cvt::Half*>(logprobs)[i]);
    case KdDtype::bf16: return Cvt::template to_acc<A>(static_cast<const typename Cvt::BFloat16*>(logprobs)[i]);
  }
  return knan<A>();
}

//: row n's K slots of L sorted into `tab` by the block `ex` (every lane calls it; the table is complete
//: when it returns); false when one of its ids is ≥ C (every lane returns the same)
template <class A, class Cvt, class Exec>
KD_FN bool load_sparse_row(const Exec& ex, SparseTable<A>& tab, const KdLaunch& L, int64_t n) {
  const int K = static_cast<int>(L.K), span = sparse_span(L.K);
  const A cap_t = static_cast<A>(L.params.softcap_t);
  bool bad = false;
  for (int k = ex.lane(); k < K; k += ex.lanes()) {
    const int64_t id = sparse_id(L.t_ids, L.ids_i64, n * L.ids_ld + k);
    bad = bad || id >= L.C;
    tab.key[k] = id >= 0 && id < L.C ? static_cast<int>(id) : kPadKey;
  }
  A any_bad[1] = {bad ? A(1) : A(0)};
  ex.template reduce_max<1>(any_bad);  // (its barriers also publish tab.key)
  if (any_bad[0] != A(0)) return false;
  for (int k = ex.lane(); k < span; k += ex.lanes()) {
    if (k >= K) {
      tab.ids[k] = kPadKey;
      continue;
    }
    const int key = tab.key[k];
    int rank = 0;
    for (int j = 0; j < K; ++j) {
      const int other = tab.key[j];
      rank += (other < key || (other == key && j < k)) ? 1 : 0;
    }
    A x = -kinf<A>();
    if (key != kPadKey) {
      x = logprob_at<A, Cvt>(L.t, L.t_dtype, n * L.t_ld + k);
      if (cap_t != A(0)) x = ksoftcap(x, cap_t);
    }
    tab.ids[rank] = key;
    tab.val[rank] = x;
  }
  ex.sync();
  return true;
}

//: the student as StreamView reads it (softcap at the load and in `write`); the teacher from a sorted
//: SparseTable (see the header). S: the storage dtype of s and the gradient.
template <class S, class A, class Cvt>
struct SparseStreamView : StreamView<S, S, A, Cvt> {
  const SparseTable<A>* tab;
  int span;
  mutable int memo_c, memo_slot;  // the last column searched and its sorted slot (−1: not in the support)

  KD_FN void init_sparse(const S* s, S* g, A cap_s, const SparseTable<A>* table, int span_) {
    StreamView<S, S, A, Cvt>::init(s, nullptr, g, cap_s, A(0));
    tab = table;
    span = span_;
    memo_c = -1;
    memo_slot = -1;
  }
  //: the sorted slot of column c (the last of its duplicates), −1 when c is not a valid id of the row
  KD_FN int slot_of(int c) const {
    if (c == memo_c) return memo_slot;
    int base = 0;  // the last slot whose id is ≤ c (or 0)
    for (int half = span >> 1; half > 0; half >>= 1)
      if (tab->ids[base + half] <= c) base += half;
    memo_c = c;
    memo_slot = tab->ids[base] == c ? base : -1;
    return memo_slot;
  }
  KD_FN bool member(int c) const { return slot_of(c) >= 0; }
  KD_FN A t_raw(int c) const {
    const int k = slot_of(c);
    return k >= 0 ? tab->val[k] : -kinf<A>();
  }
  //: (a sparse teacher takes no standardisation or TSM: t' = t)
  KD_FN A t(int c) const { return t_raw(c); }
};

}  // namespace kd
