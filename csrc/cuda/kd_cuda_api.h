// kd_cuda_api.h — the plain C++ launch API of the CUDA engine (no torch, no CUDA types), implemented in
// kd_kernels.cu and called by binding.cpp. `stream` is a cudaStream_t; return values are cudaError_t.
#pragma once

#include <cstdint>

#include "../kd_launch.h"

namespace kd {

//: one block per row: the LogitDistill engine of kd_row.h over every row of L
int cuda_forward(const KdLaunch& L, void* stream);

//: grad[n, :] *= factor[n · fstride] for rows whose factor is not exactly 1.0 (factor f32, or f64)
int cuda_scale_rows(void* grad, KdDtype dtype, int64_t N, int64_t C, int64_t ld, const void* factor,
                    bool factor_f64, int64_t fstride, void* stream);

const char* cuda_error_string(int err);

}  // namespace kd
