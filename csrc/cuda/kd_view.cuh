// kd_view.cuh — storage conversions for the CUDA engine's StreamView (../kd_stream_view.h):
// fp16/bf16 are widened to float on load and rounded to nearest on store; fp32/fp64 are cast.
#pragma once

#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../kd_block_row.h"

namespace kd {

struct CudaCvt {
  using Half = __half;  // the 16-bit storage types (../kd_sparse_view.h logprob_at)
  using BFloat16 = __nv_bfloat16;
  template <class A>
  __device__ static A to_acc(float x) { return static_cast<A>(x); }
  template <class A>
  __device__ static A to_acc(double x) { return static_cast<A>(x); }
  template <class A>
  __device__ static A to_acc(__half x) { return static_cast<A>(__half2float(x)); }
  template <class A>
  __device__ static A to_acc(__nv_bfloat16 x) { return static_cast<A>(__bfloat162float(x)); }

  template <class T, class A>
  __device__ static T from_acc(A x) {
    if constexpr (std::is_same<T, __half>::value) return __float2half_rn(static_cast<float>(x));
    else if constexpr (std::is_same<T, __nv_bfloat16>::value) return __float2bfloat16_rn(static_cast<float>(x));
    else return static_cast<T>(x);
  }
};

}  // namespace kd
