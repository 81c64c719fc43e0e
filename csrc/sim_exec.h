// sim_exec.h — a CUDA block simulated on the host: `lanes` std::threads run one row together through
// kd_row.h with the same cooperation scheme as cuda/kd_exec.cuh (strided columns per lane, all-reduces
// through a shared scratch between two barriers, per-lane top-k lists merged by k rounds of an arg-best).
// Together with StreamView (kd_stream_view.h) this runs the CUDA engine's code path — recomputed
// gradient, on-the-fly standardisation/TSM, multi-lane reductions and top-k merges — in CI, which has no
// GPU. Test-only: slow (a thread per lane per row), exposed as kdkernels::_logit_distill_fwd_sim.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <vector>

#include "kd_row.h"

namespace kd {

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    const size_t gen = gen_;
    if (++waiting_ == n_) {
      waiting_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen_ != gen; });
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, waiting_ = 0;
  size_t gen_ = 0;
};

//: what the lanes of one simulated block share (CUDA: __shared__ memory)
template <class A>
struct SimBlock {
  explicit SimBlock(int lanes) : lanes(lanes), bar(lanes), red(size_t(lanes) * kRedWidth), red_i(lanes) {}
  int lanes;
  Barrier bar;
  std::vector<A> red;
  std::vector<int> red_i;
  RowShared<A> sh;
};

template <class A>
struct SimExec {
  static constexpr bool kSplitTerms = false;  // as on CUDA
  SimBlock<A>* b;
  int id;

  int lane() const { return id; }
  int lanes() const { return b->lanes; }
  bool leader() const { return id == 0; }
  void sync() const { b->bar.wait(); }

  template <int N>
  void reduce_sum(A (&v)[N]) const {
    publish(v);
    for (int j = 0; j < N; ++j) {
      A s = A(0);
      for (int l = 0; l < b->lanes; ++l) s += b->red[l * kRedWidth + j];
      v[j] = s;
    }
  }
  template <int N>
  void reduce_max(A (&v)[N]) const {
    publish(v);
    for (int j = 0; j < N; ++j) {
      A m = b->red[j];
      for (int l = 1; l < b->lanes; ++l) m = kmax(m, b->red[l * kRedWidth + j]);
      v[j] = m;
    }
  }
  void reduce_best(A& v, int& i) const {
    sync();
    b->red[id * kRedWidth] = v;
    b->red_i[id] = i;
    sync();
    v = b->red[0];
    i = b->red_i[0];
    for (int l = 1; l < b->lanes; ++l)
      if (better(b->red[l * kRedWidth], b->red_i[l], v, i)) {
        v = b->red[l * kRedWidth];
        i = b->red_i[l];
      }
  }
  template <class Key>
  void topk(Key key, int C, int k, Sel<A>& out) const {
    block_topk(*this, key, C, k, out);
  }

 private:
  template <int N>
  void publish(const A (&v)[N]) const {
    sync();
    for (int j = 0; j < N; ++j) b->red[id * kRedWidth + j] = v[j];
    sync();
  }
};

}  // namespace kd
