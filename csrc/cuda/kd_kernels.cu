// kd_kernels.cu — the CUDA engine: one block per row running kd_row.h, plus the row-scaling kernel.
// Torch-free (raw pointers, kd_cuda_api.h), so `nvcc -c` compiles it without a CUDA build of torch.
//
// Block size by row length: 32 threads up to C = 64, 128 up to 1024, 256 up to 16384, 512 beyond
// (the row is streamed in strided column tiles; registers bound the block at 512 for the fp64 path).
// Accumulation: float for fp32/fp16/bf16 inputs, double for fp64.
#include <cuda_runtime.h>

#include <type_traits>

#include "kd_cuda_api.h"
#include "kd_exec.cuh"
#include "kd_view.cuh"

namespace kd {
namespace {

constexpr int kMaxThreads = 512;

inline int block_threads(int64_t C) {
  if (C <= 64) return 32;
  if (C <= 1024) return 128;
  if (C <= 16384) return 256;
  return kMaxThreads;
}

__device__ __forceinline__ double row_scale(const KdLaunch& L, int64_t n) {
  if (L.grad_scale == nullptr) return L.grad_scale_value;
  return L.scale_f64 ? static_cast<const double*>(L.grad_scale)[n * L.scale_stride]
                     : static_cast<double>(static_cast<const float*>(L.grad_scale)[n * L.scale_stride]);
}

template <class scalar_t, class A>
__global__ void __launch_bounds__(kMaxThreads) forward_kernel(const KdLaunch L) {
  __shared__ RowShared<A> sh;
  const int64_t n = blockIdx.x;
  GlobalView<scalar_t, A> v;
  v.init(static_cast<const scalar_t*>(L.s) + n * L.s_ld, static_cast<const scalar_t*>(L.t) + n * L.t_ld,
         L.grad ? static_cast<scalar_t*>(L.grad) + n * L.g_ld : nullptr);
  const GpuExec<A> ex{&sh};
  RowIO<A> io;
  io.C = static_cast<int>(L.C);
  io.has_labels = L.labels != nullptr;
  io.label = io.has_labels ? L.labels[n * L.labels_stride] : 0;
  io.T = L.temperature ? static_cast<const A*>(L.temperature)[n * L.temp_stride] : static_cast<A>(L.params.temperature);
  io.want_grad = L.grad != nullptr;
  io.want_dtemp = L.dtemp != nullptr;
  io.grad_scale = static_cast<A>(row_scale(L, n));
  io.loss = io.dtemp = A(0);
  distill_row(ex, v, sh, L.params, io);
  if (threadIdx.x == 0) {
    static_cast<A*>(L.loss)[n] = io.loss;
    if (L.dtemp) static_cast<A*>(L.dtemp)[n] = io.dtemp;
  }
}

template <class scalar_t, class A, class factor_t>
__global__ void scale_kernel(scalar_t* grad, int64_t C, int64_t ld, const factor_t* factor, int64_t fstride) {
  const int64_t n = blockIdx.x;
  const factor_t f = factor[n * fstride];
  if (f == factor_t(1)) return;
  scalar_t* row = grad + n * ld;
  const A fa = static_cast<A>(f);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
    row[c] = CudaCvt::from_acc<scalar_t>(CudaCvt::to_acc<A>(row[c]) * fa);
}

template <class scalar_t, class A>
int launch_forward(const KdLaunch& L, cudaStream_t stream) {
  forward_kernel<scalar_t, A><<<static_cast<unsigned>(L.N), block_threads(L.C), 0, stream>>>(L);
  return static_cast<int>(cudaGetLastError());
}

template <class scalar_t, class A>
int launch_scale(void* grad, int64_t N, int64_t C, int64_t ld, const void* factor, bool f64, int64_t fstride,
                 cudaStream_t stream) {
  const int threads = C <= 1024 ? 128 : 256;
  if (f64)
    scale_kernel<scalar_t, double, double><<<static_cast<unsigned>(N), threads, 0, stream>>>(
        static_cast<scalar_t*>(grad), C, ld, static_cast<const double*>(factor), fstride);
  else
    scale_kernel<scalar_t, A, float><<<static_cast<unsigned>(N), threads, 0, stream>>>(
        static_cast<scalar_t*>(grad), C, ld, static_cast<const float*>(factor), fstride);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int cuda_forward(const KdLaunch& L, void* stream) {
  if (L.N == 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  switch (L.dtype) {
    case KdDtype::f32: return launch_forward<float, float>(L, st);
    case KdDtype::f64: return launch_forward<double, double>(L, st);
    case KdDtype::f16: return launch_forward<__half, float>(L, st);
    case KdDtype::bf16: return launch_forward<__nv_bfloat16, float>(L, st);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int cuda_scale_rows(void* grad, KdDtype dtype, int64_t N, int64_t C, int64_t ld, const void* factor,
                    bool factor_f64, int64_t fstride, void* stream) {
  if (N == 0 || C == 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case KdDtype::f32: return launch_scale<float, float>(grad, N, C, ld, factor, factor_f64, fstride, st);
    case KdDtype::f64: return launch_scale<double, double>(grad, N, C, ld, factor, factor_f64, fstride, st);
    case KdDtype::f16: return launch_scale<__half, float>(grad, N, C, ld, factor, factor_f64, fstride, st);
    case KdDtype::bf16: return launch_scale<__nv_bfloat16, float>(grad, N, C, ld, factor, factor_f64, fstride, st);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

const char* cuda_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace kd
