// ops.cpp — the torch.library schemas of kdkernels' C++ ops and their CPU kernels.
//
//   kdkernels::logit_distill_fwd(s, t, labels?, temperature?, fparams, iparams, grad?, grad_factor?,
//                                want_dtemp, teacher_ids?=None) -> (loss, dtemp)
//       one launch of the LogitDistill engine (kd_row.h) under the launcher contract of kd_launch.h:
//       loss is [N] (reduction none: loss_weight·ℓ_n) or 0-dim (sum / batchmean, the valid-row count
//       taken from labels inside the op); `grad` (mutated, declared Tensor(a!), version bumped; may alias
//       s for inplace) receives grad_factor·∂loss/∂s; dtemp is ∂loss/∂T_n [N] when want_dtemp, else [0].
//       s and t may have different floating dtypes. A sparse teacher (topk_mode 2): teacher_ids [N, K]
//       int32 / int64 (< 0 padding) with t its log-probabilities [N, K] (any float dtype; both engines).
//   kdkernels::scale_rows_(grad, factor) -> ()
//       grad[n, :] *= factor[n], skipping rows whose factor is exactly 1.0 (read on the device).
//   kdkernels::_logit_distill_fwd_sim(..., lanes) — test-only: the CUDA engine's code path on CPU
//       tensors, a block of `lanes` simulated by host threads (sim_engine.cpp).
// The fake (meta) kernels live in kdkernels/_cpp.py (set_python_module below makes torch import it);
// the CUDA kernels are registered by cuda/binding.cpp when the extension is built with CUDA.
#include <torch/library.h>

#include "cpu_engine.h"
#include "kd_torch_args.h"

namespace kd {
namespace {

std::tuple<at::Tensor, at::Tensor> logit_distill_fwd_cpu(
    const at::Tensor& s, const at::Tensor& t, const c10::optional<at::Tensor>& labels,
    const c10::optional<at::Tensor>& temperature, c10::ArrayRef<double> fparams, c10::ArrayRef<int64_t> iparams,
    const c10::optional<at::Tensor>& grad, const c10::optional<at::Tensor>& grad_factor, bool want_dtemp,
    const c10::optional<at::Tensor>& teacher_ids) {
  LaunchTensors lt = make_launch(s, t, labels, temperature, fparams, iparams, grad, grad_factor, want_dtemp,
                                 /*device_scratch=*/false, teacher_ids);
  if (lt.launch.N > 0) {
    cpu_forward(lt.launch);
  } else if (lt.launch.params.reduction != kReduceNone) {
    lt.loss.zero_();
  }
  if (grad.has_value()) mark_written(*grad);
  return {lt.loss, lt.dtemp};
}

void scale_rows_cpu(const at::Tensor& grad, const at::Tensor& factor) {
  check_scale_args(grad, factor);
  if (grad.numel() == 0) return;
  cpu_scale_rows(grad.data_ptr(), kd_dtype(grad), grad.size(0), grad.size(1), grad.stride(0),
                 factor.data_ptr(), factor.scalar_type() == at::kDouble, factor.stride(0));
  mark_written(grad);
}

std::tuple<at::Tensor, at::Tensor> logit_distill_fwd_sim(
    const at::Tensor& s, const at::Tensor& t, const c10::optional<at::Tensor>& labels,
    const c10::optional<at::Tensor>& temperature, c10::ArrayRef<double> fparams, c10::ArrayRef<int64_t> iparams,
    const c10::optional<at::Tensor>& grad, const c10::optional<at::Tensor>& grad_factor, bool want_dtemp,
    int64_t lanes, const c10::optional<at::Tensor>& teacher_ids) {
  TORCH_CHECK(lanes >= 1 && lanes <= 64, "kdkernels: lanes must be in [1, 64]");
  check_block_engine_dtypes(s, t, teacher_ids);
  LaunchTensors lt = make_launch(s, t, labels, temperature, fparams, iparams, grad, grad_factor, want_dtemp,
                                 /*device_scratch=*/true, teacher_ids);
  if (lt.launch.N > 0) {
    sim_forward(lt.launch, static_cast<int>(lanes));
  } else if (lt.launch.params.reduction != kReduceNone) {
    lt.loss.zero_();
  }
  if (grad.has_value()) mark_written(*grad);
  return {lt.loss, lt.dtemp};
}

}  // namespace
}  // namespace kd

TORCH_LIBRARY(kdkernels, m) {
  m.set_python_module("kdkernels._cpp");
  m.def(
      "logit_distill_fwd(Tensor s, Tensor t, Tensor? labels, Tensor? temperature, float[] fparams, "
      "int[] iparams, Tensor(a!)? grad, Tensor? grad_factor, bool want_dtemp, Tensor? teacher_ids=None) "
      "-> (Tensor, Tensor)");
  m.def("scale_rows_(Tensor(a!) grad, Tensor factor) -> ()");
  m.def(
      "_logit_distill_fwd_sim(Tensor s, Tensor t, Tensor? labels, Tensor? temperature, float[] fparams, "
      "int[] iparams, Tensor(a!)? grad, Tensor? grad_factor, bool want_dtemp, int lanes, "
      "Tensor? teacher_ids=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("logit_distill_fwd", &kd::logit_distill_fwd_cpu);
  m.impl("scale_rows_", &kd::scale_rows_cpu);
  m.impl("_logit_distill_fwd_sim", &kd::logit_distill_fwd_sim);
}
