// binding.cpp — registers the CUDA kernels of kdkernels' ops (schemas: ../ops.cpp). Compiled only in a
// CUDA build of the extension: the kernels themselves (kd_kernels.cu) never see a torch header.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../kd_torch_args.h"
#include "kd_cuda_api.h"

namespace kd {
namespace {

void check_cuda(int err, const char* what) {
  TORCH_CHECK(err == 0, "kdkernels: ", what, " failed: ", cuda_error_string(err));
}

std::tuple<at::Tensor, at::Tensor> logit_distill_fwd_cuda(
    const at::Tensor& s, const at::Tensor& t, const c10::optional<at::Tensor>& labels,
    const c10::optional<at::Tensor>& temperature, c10::ArrayRef<double> fparams, c10::ArrayRef<int64_t> iparams,
    const c10::optional<at::Tensor>& grad, const c10::optional<at::Tensor>& grad_factor, bool want_dtemp,
    const c10::optional<at::Tensor>& teacher_ids) {
  TORCH_CHECK(s.is_cuda(), "kdkernels: the CUDA kernel needs CUDA tensors");
  check_block_engine_dtypes(s, t, teacher_ids);
  const c10::cuda::CUDAGuard guard(s.device());
  LaunchTensors lt = make_launch(s, t, labels, temperature, fparams, iparams, grad, grad_factor, want_dtemp,
                                 /*device_scratch=*/true, teacher_ids);
  TORCH_CHECK(lt.launch.N <= INT_MAX, "kdkernels: the CUDA engine takes at most 2^31 - 1 rows per launch");
  if (lt.launch.N > 0) {
    check_cuda(cuda_forward(lt.launch, c10::cuda::getCurrentCUDAStream().stream()), "forward");
  } else if (lt.launch.params.reduction != kReduceNone) {
    lt.loss.zero_();
  }
  if (grad.has_value()) mark_written(*grad);
  return {lt.loss, lt.dtemp};
}

void scale_rows_cuda(const at::Tensor& grad, const at::Tensor& factor) {
  check_scale_args(grad, factor);
  if (grad.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  check_cuda(cuda_scale_rows(grad.data_ptr(), kd_dtype(grad), grad.size(0), grad.size(1), grad.stride(0),
                             factor.data_ptr(), factor.scalar_type() == at::kDouble, factor.stride(0),
                             c10::cuda::getCurrentCUDAStream().stream()),
             "scale_rows_");
  mark_written(grad);
}

}  // namespace
}  // namespace kd

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("logit_distill_fwd", &kd::logit_distill_fwd_cuda);
  m.impl("scale_rows_", &kd::scale_rows_cuda);
}
