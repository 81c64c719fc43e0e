// kd_launch.h — a torch-free description of one fused forward launch (raw pointers + sizes), shared by
// the CPU twin (cpu_engine.cpp) and the CUDA kernels (cuda/kd_kernels.cu). ops.cpp and
// cuda/binding.cpp fill it from tensors (kd_torch_args.h); the engines never see a torch type.
//
// Per row n the engine writes loss[n] (ignored rows 0, bad-label rows NaN), dtemp[n] = ∂ℓ_n/∂T_n when
// dtemp != nullptr, and grad[n, :] = grad_scale_n · ∂ℓ_n/∂s_n when grad != nullptr (grad may alias s:
// every row is read completely before its gradient is written).
#pragma once

#include <cstdint>

#include "kd_params.h"

namespace kd {

enum class KdDtype : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

struct KdLaunch {
  KdDtype dtype;          // of s, t and grad; accumulation is double for f64, float otherwise
  int64_t N, C;
  const void* s;          // [N, C], row stride s_ld, unit column stride
  int64_t s_ld;
  const void* t;
  int64_t t_ld;
  void* grad;             // [N, C] or nullptr (no gradient wanted)
  int64_t g_ld;
  const int64_t* labels;  // [N] (stride labels_stride) or nullptr: no labels, no ignore mask
  int64_t labels_stride;
  const void* temperature;  // accumulation dtype [N] (stride temp_stride, maybe 0) or nullptr
  int64_t temp_stride;
  const void* grad_scale;   // float32 (float64 when scale_f64) [N] (stride scale_stride, maybe 0) or nullptr
  bool scale_f64;
  int64_t scale_stride;
  double grad_scale_value;  // used when grad_scale == nullptr
  void* loss;               // accumulation dtype [N]
  void* dtemp;              // accumulation dtype [N] or nullptr
  KdParams params;
};

}  // namespace kd
