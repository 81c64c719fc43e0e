// kd_kernels.cu — the CUDA engine: a one-block prologue, one block per row running kd_row.h (with the
// last block reducing the row losses), and the row-scaling kernel. Torch-free (raw pointers,
// kd_cuda_api.h), so `nvcc -c` compiles it without a CUDA build of torch.
//
// One op = two kernels on the stream, no host sync (the launcher contract, ../kd_launch.h):
//   prepare_kernel<<<1, 256>>>  counts the rows whose label is not ignore_index (batchmean's divisor, read
//                               by every row block for its gradient scale) and zeroes the ticket;
//   forward_kernel<<<N, …>>>    each block runs its row (kd_block_row.h); for sum / batchmean every block
//                               then takes a ticket (atomicAdd after a __threadfence), and the block that
//                               draws the last one sums all row losses in a fixed order (deterministic).
// Reduction none skips the prologue: one kernel. The row kernel is forward_kd_kernel (kd_row_kd.h: two
// passes, 16-byte loads, no top-k machinery) for plain-KD specs on aligned rows, else forward_kernel,
// compiled without the top-k machinery for specs that select no top-k (DKD, AEKT, DTKD, standardize, CE);
// a sparse teacher (L.t_ids) runs forward_sparse_kernel (one instantiation per student dtype: its block
// sorts the row's K slots into shared memory, kd_sparse_view.h, the log-probabilities in any dtype).
//
// Block size by row length: 32 threads up to C = 64, 128 up to 1024, 256 up to 16384, 512 beyond
// (the row is streamed in strided column tiles; registers bound the block at 512 for the fp64 path).
// Accumulation: float unless s is fp64 (then s and t are both fp64). s and t may differ among
// fp32/fp16/bf16: each is loaded in its own dtype.
#include <cuda_runtime.h>

#include <type_traits>

#include "kd_cuda_api.h"
#include "kd_exec.cuh"
#include "kd_view.cuh"

namespace kd {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kPrepareThreads = 256;

inline int block_threads(int64_t C) {
  if (C <= 64) return 32;
  if (C <= 1024) return 128;
  if (C <= 16384) return 256;
  return kMaxThreads;
}

__global__ void prepare_kernel(const KdLaunch L) {
  __shared__ unsigned long long total;
  if (threadIdx.x == 0) total = 0ull;
  __syncthreads();
  unsigned long long mine = 0ull;
  for (int64_t n = threadIdx.x; n < L.N; n += blockDim.x) mine += row_counted(L, n) ? 1ull : 0ull;
  atomicAdd(&total, mine);
  __syncthreads();
  if (threadIdx.x == 0) {
    auto* scratch = static_cast<KdScratch*>(L.scratch);
    scratch->count = total;
    scratch->ticket = 0u;
  }
}

//: the tail of a row block for sum / batchmean: take a ticket after this block's row loss is visible
//: device-wide; the block that draws the last one sums every row loss (reduce_rows, fixed order)
template <class A, class Exec>
__device__ __forceinline__ void reduce_if_last(const Exec& ex, const KdLaunch& L, unsigned long long count) {
  __shared__ bool last_block;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last_block = atomicAdd(&static_cast<KdScratch*>(L.scratch)->ticket, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  const A* rows = static_cast<const A*>(L.row_loss);
  reduce_rows<A>(ex, L, count, [&](int64_t n) { return __ldcg(rows + n); });
}

//: batchmean's valid-row count (0 when the launch does not reduce: no prologue ran)
__device__ __forceinline__ unsigned long long launch_count(const KdLaunch& L) {
  return L.params.reduction != kReduceNone ? static_cast<const KdScratch*>(L.scratch)->count : 0ull;
}

//: the general engine: any spec (kTopK) or any spec without top-k terms (!kTopK), one block per row
//: (kd_row.h over a StreamView)
template <class S, class Tt, class A, bool kTopK>
__global__ void __launch_bounds__(kMaxThreads) forward_kernel(const KdLaunch L) {
  __shared__ RowShared<A> sh;
  const unsigned long long count = launch_count(L);
  const GpuExec<A> ex{&sh};
  run_block_row<S, Tt, A, CudaCvt, kTopK>(ex, sh, L, blockIdx.x, count);
  if (L.params.reduction != kReduceNone) reduce_if_last<A>(ex, L, count);
}

//: plain KD (+ CE, learnable T) in two passes with 16-byte vector loads (kd_row_kd.h)
template <class S, class Tt, class A>
__global__ void __launch_bounds__(kMaxThreads) forward_kd_kernel(const KdLaunch L) {
  __shared__ BlockScratch<A> sh;
  const unsigned long long count = launch_count(L);
  const GpuExec<A, BlockScratch<A>> ex{&sh};
  run_block_row_kd<S, Tt, A, CudaCvt>(ex, L, blockIdx.x, count);
  if (L.params.reduction != kReduceNone) reduce_if_last<A>(ex, L, count);
}

//: a sparse teacher's rows: the block's shared memory adds the row's sorted SparseTable to RowShared
//: (static: fp64 about 27 KB, under the 48 KB static limit)
template <class A>
struct SparseRowShared {
  RowShared<A> row;
  SparseTable<A> table;
};

template <class S, class A>
__global__ void __launch_bounds__(kMaxThreads) forward_sparse_kernel(const KdLaunch L) {
  __shared__ SparseRowShared<A> sh;
  const unsigned long long count = launch_count(L);
  const GpuExec<A> ex{&sh.row};
  run_block_row_sparse<S, A, CudaCvt>(ex, sh.row, sh.table, L, blockIdx.x, count);
  if (L.params.reduction != kReduceNone) reduce_if_last<A>(ex, L, count);
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

template <class S, class Tt, class A>
int launch_forward(const KdLaunch& L, cudaStream_t stream) {
  if (L.params.reduction != kReduceNone) prepare_kernel<<<1, kPrepareThreads, 0, stream>>>(L);
  const dim3 grid(static_cast<unsigned>(L.N)), block(block_threads(L.C));
  if (use_two_pass_kd<S, Tt>(L)) forward_kd_kernel<S, Tt, A><<<grid, block, 0, stream>>>(L);
  else if (needs_topk(L.params)) forward_kernel<S, Tt, A, true><<<grid, block, 0, stream>>>(L);
  else forward_kernel<S, Tt, A, false><<<grid, block, 0, stream>>>(L);
  return static_cast<int>(cudaGetLastError());
}

template <class S, class A>
int launch_forward_sparse(const KdLaunch& L, cudaStream_t stream) {
  if (L.params.reduction != kReduceNone) prepare_kernel<<<1, kPrepareThreads, 0, stream>>>(L);
  forward_sparse_kernel<S, A><<<static_cast<unsigned>(L.N), block_threads(L.C), 0, stream>>>(L);
  return static_cast<int>(cudaGetLastError());
}

//: a sparse teacher's launch, by the student's dtype
int launch_sparse(const KdLaunch& L, cudaStream_t stream) {
  switch (L.s_dtype) {
    case KdDtype::f32: return launch_forward_sparse<float, float>(L, stream);
    case KdDtype::f16: return launch_forward_sparse<__half, float>(L, stream);
    case KdDtype::bf16: return launch_forward_sparse<__nv_bfloat16, float>(L, stream);
    case KdDtype::f64: return launch_forward_sparse<double, double>(L, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

template <class S>
int launch_forward_teacher(const KdLaunch& L, cudaStream_t stream) {
  switch (L.t_dtype) {
    case KdDtype::f32: return launch_forward<S, float, float>(L, stream);
    case KdDtype::f16: return launch_forward<S, __half, float>(L, stream);
    case KdDtype::bf16: return launch_forward<S, __nv_bfloat16, float>(L, stream);
    case KdDtype::f64: break;  // refused by the binding (check_block_engine_dtypes)
  }
  return static_cast<int>(cudaErrorInvalidValue);
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
  if (L.t_ids != nullptr) return launch_sparse(L, st);
  switch (L.s_dtype) {
    case KdDtype::f32: return launch_forward_teacher<float>(L, st);
    case KdDtype::f16: return launch_forward_teacher<__half>(L, st);
    case KdDtype::bf16: return launch_forward_teacher<__nv_bfloat16>(L, st);
    case KdDtype::f64:
      if (L.t_dtype == KdDtype::f64) return launch_forward<double, double, double>(L, st);
      break;
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
