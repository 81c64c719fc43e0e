// kd_exec.cuh — how the threads of one CUDA block cooperate on a row (the Exec of kd_row.h).
//
// Lane = thread, lanes = blockDim.x (a multiple of 32). Every reduction is an all-reduce: an xor
// butterfly inside each warp (commutative pairs, so all lanes get bit-identical values), then the warp
// partials through shared memory, summed by every thread in the same order — all lanes then hold the same
// row constants and take the same branches. Top-k: each thread keeps its own sorted top-k of the columns
// it visits (ascending c, so ties keep the lower index), then k rounds of a block arg-best over the heads
// of those lists (selection order: larger key, then lower index; kd_math.h `better`).
#pragma once

#include <cuda_runtime.h>

#include "../kd_row.h"

namespace kd {

template <class A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <class A>
__device__ __forceinline__ A warp_max(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = kmax(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

template <class A>
__device__ __forceinline__ void warp_best(A& v, int& i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const A ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (better(ov, oi, v, i)) {
      v = ov;
      i = oi;
    }
  }
}

//: the shared memory of a block that only reduces (the two-pass KD rows): the scratch of RowShared
template <class A>
struct BlockScratch {
  A red[32 * kRedWidth];
  int red_i[32];
};

//: Shared: RowShared<A> (the general engine) or BlockScratch<A> (anything with red / red_i)
template <class A, class Shared = RowShared<A>>
struct GpuExec {
  //: kd_row.h fuses every term into one pass over the row (each pass re-reads global memory)
  static constexpr bool kSplitTerms = false;
  Shared* sh;

  __device__ int lane() const { return threadIdx.x; }
  __device__ int lanes() const { return blockDim.x; }
  __device__ bool leader() const { return threadIdx.x == 0; }
  __device__ void sync() const { __syncthreads(); }

  template <int N>
  __device__ void reduce_sum(A (&v)[N]) const {
    static_assert(N <= kRedWidth, "reduction wider than the scratch");
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = warp_sum(v[j]);
    publish(v);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      A s = A(0);
      for (int w = 0; w < int(blockDim.x >> 5); ++w) s += sh->red[w * kRedWidth + j];
      v[j] = s;
    }
  }

  template <int N>
  __device__ void reduce_max(A (&v)[N]) const {
    static_assert(N <= kRedWidth, "reduction wider than the scratch");
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = warp_max(v[j]);
    publish(v);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      A m = sh->red[j];
      for (int w = 1; w < int(blockDim.x >> 5); ++w) m = kmax(m, sh->red[w * kRedWidth + j]);
      v[j] = m;
    }
  }

  __device__ void reduce_best(A& v, int& i) const {
    warp_best(v, i);
    __syncthreads();  // the previous reduction's readers are done with the scratch
    if ((threadIdx.x & 31) == 0) {
      sh->red[threadIdx.x >> 5] = v;
      sh->red_i[threadIdx.x >> 5] = i;
    }
    __syncthreads();
    v = sh->red[0];
    i = sh->red_i[0];
    for (int w = 1; w < int(blockDim.x >> 5); ++w)
      if (better(sh->red[w], sh->red_i[w], v, i)) {
        v = sh->red[w];
        i = sh->red_i[w];
      }
  }

  template <class Key>
  __device__ void topk(Key key, int C, int k, Sel<A>& out) const {
    block_topk(*this, key, C, k, out);
  }

 private:
  template <int N>
  __device__ void publish(const A (&v)[N]) const {
    __syncthreads();  // the previous reduction's readers are done with the scratch
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
      for (int j = 0; j < N; ++j) sh->red[(threadIdx.x >> 5) * kRedWidth + j] = v[j];
    }
    __syncthreads();
  }
};

}  // namespace kd
