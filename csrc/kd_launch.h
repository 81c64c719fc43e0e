// kd_launch.h — a torch-free description of one fused forward launch (raw pointers + sizes), shared by
// the CPU twin (cpu_engine.cpp), the CUDA kernels (cuda/kd_kernels.cu) and the block simulator
// (sim_engine.cpp). ops.cpp and cuda/binding.cpp fill it from tensors (kd_torch_args.h); the engines
// never see a torch type.
//
// The launcher contract (README "Design"; issue 9). Per row n, with ℓ_n the row loss of the spec
// (ignored rows 0, bad-label and non-finite rows NaN) and the reduction scale
//     r = loss_weight / max(count, 1)  for batchmean,   r = loss_weight  for sum and none,
// count = #rows whose label != ignore_index (N without labels), counted inside the launch:
//   row_loss[n] = loss_weight · ℓ_n                          (the output itself for reduction none)
//   loss        = Σ_n row_loss[n] · (r / loss_weight)        (a scalar, for sum and batchmean)
//   grad[n, :]  = grad_factor_n · r · ∂ℓ_n/∂s_n              (when grad != nullptr; may alias s: every row
//                                                            is read completely before it is written)
//   dtemp[n]    = r · ∂ℓ_n/∂T_n                               (when dtemp != nullptr)
#pragma once

#include <cstdint>

#include "kd_math.h"
#include "kd_params.h"

namespace kd {

enum class KdDtype : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

//: the `reduction` int field (spec.REDUCTION_CODES)
enum KdReduction : int64_t { kReduceNone = 0, kReduceSum = 1, kReduceBatchmean = 2 };

struct KdLaunch {
  KdDtype s_dtype;        // of s and grad; accumulation is double when s is f64, float otherwise
  KdDtype t_dtype;        // of t (may differ from s: each operand is loaded in its own dtype)
  int64_t N, C;
  const void* s;          // [N, C], row stride s_ld, unit column stride
  int64_t s_ld;
  const void* t;           // [N, C] teacher logits, or [N, K] log-probabilities of a sparse teacher
  int64_t t_ld;
  const void* t_ids;       // sparse teacher (topk_mode 2): [N, K] int32 / int64 ids (row stride ids_ld,
  int64_t ids_ld;          // unit column stride; < 0 padding), else nullptr
  bool ids_i64;
  int64_t K;
  void* grad;             // [N, C] of s_dtype or nullptr (no gradient wanted)
  int64_t g_ld;
  const int64_t* labels;  // [N] (stride labels_stride) or nullptr: no labels, no ignore mask
  int64_t labels_stride;
  const void* temperature;  // accumulation dtype [N] (stride temp_stride, maybe 0) or nullptr
  int64_t temp_stride;
  const void* grad_factor;  // float32 (float64 when factor_f64) [N] (stride factor_stride, maybe 0); nullptr = 1
  bool factor_f64;
  int64_t factor_stride;
  void* row_loss;           // accumulation dtype [N]: loss_weight · ℓ_n
  void* loss;               // accumulation dtype: the scalar of sum/batchmean (== row_loss for none)
  void* dtemp;              // accumulation dtype [N] or nullptr
  void* scratch;            // device launches only: KdScratch (count + ticket), initialised in the launch
  KdParams params;
};

//: what the CUDA launch keeps between its two kernels (count first, then the rows and the last-block sum)
struct KdScratch {
  unsigned long long count;   // rows whose label is not ignore_index
  unsigned int ticket;        // blocks done (the last one reduces)
};

//: row n counts for batchmean (its label is not ignore_index; every row without labels)
KD_HD bool row_counted(const KdLaunch& L, int64_t n) {
  return L.labels == nullptr || L.labels[n * L.labels_stride] != L.params.ignore_index;
}

//: r of the header: loss_weight, divided by max(count, 1) for batchmean
template <class A>
KD_HD A reduction_scale(const KdParams& P, unsigned long long count) {
  const A w = static_cast<A>(P.loss_weight);
  if (P.reduction != kReduceBatchmean) return w;
  return w / static_cast<A>(count > 1ull ? count : 1ull);
}

//: grad_factor_n (1 without a factor tensor)
template <class A>
KD_HD A row_factor(const KdLaunch& L, int64_t n) {
  if (L.grad_factor == nullptr) return A(1);
  return L.factor_f64 ? static_cast<A>(static_cast<const double*>(L.grad_factor)[n * L.factor_stride])
                      : static_cast<A>(static_cast<const float*>(L.grad_factor)[n * L.factor_stride]);
}

}  // namespace kd
