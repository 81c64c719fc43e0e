// cpu_engine.h — the host engines' plain C++ entry points: the CPU twin (cpu_engine.cpp) and the
// test-only CUDA-path simulator (sim_engine.cpp). Torch-free.
#pragma once

#include <cstdint>

#include "kd_launch.h"

namespace kd {

//: every row of `L` (at::parallel_for over rows; one thread-local row buffer per chunk)
void cpu_forward(const KdLaunch& L);

//: grad[n, :] *= factor[n · fstride] for the rows whose factor is not exactly 1.0
//: (factor is float32, or float64 when factor_f64)
void cpu_scale_rows(void* grad, KdDtype dtype, int64_t N, int64_t C, int64_t ld, const void* factor,
                    bool factor_f64, int64_t fstride);

//: test-only: the CUDA engine's code path on host memory, each row run by a simulated block of
//: `lanes` threads (sim_engine.cpp)
void sim_forward(const KdLaunch& L, int lanes);

}  // namespace kd
