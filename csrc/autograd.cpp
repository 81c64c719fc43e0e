// autograd.cpp — kdkernels::logit_distill_loss: the fused loss with its backward recorded in C++.
//
//   kdkernels::logit_distill_loss(s, t, labels?, temperature?, fparams, iparams, teacher_ids?=None) -> loss
//
// The C++ backends' (cpu, cuda) fast path of kdkernels/engine.py's LogitDistillFunction, for the calls
// that need nothing beyond the common contract (engine.fused_logit_distill sends every other call to the
// Python Function): forward is one logit_distill_fwd launch that also writes ∂loss/∂s into the one
// [N, C] buffer held until backward (saved with save_for_backward, so saved-tensor hooks see it);
// backward is one scale_rows_ launch by grad_output (a no-op pass where it is 1). No Python runs in
// either, which is most of a small call's host time. The same refusals as the Python Function:
//   * a second backward through the same graph raises (the buffer was scaled in place by the first);
//   * differentiating the gradient (double backward) raises when it is attempted (a DelayedError node).
// Without grad mode or a student that requires grad it is the plain forward (no gradient written).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty_like.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace kd {
namespace {

using OptTensor = c10::optional<at::Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr const char* kSecondBackward =
    "kdkernels: this fused loss was already differentiated once and did not keep its logits (at most one "
    "[N, C] buffer is held between forward and backward). For a repeated backward (gradcheck, "
    "retain_graph=True) build the loss inside `with kdkernels.repeatable_backward():`, or use "
    "backend='reference'.";
constexpr const char* kDoubleBackward =
    "kdkernels: the fused loss's gradient is not differentiable (double backward, e.g. a gradient "
    "penalty). Use backend='reference' for higher derivatives.";
//: forward's arguments, in schema order (backward returns one gradient slot for each)
constexpr size_t kForwardArgs = 7;

//: one launch of logit_distill_fwd below autograd: the reduced loss, writing ∂loss/∂s into `grad` if given
at::Tensor launch_forward(const at::Tensor& s, const at::Tensor& t, const OptTensor& labels,
                          const OptTensor& temperature, c10::ArrayRef<double> fparams,
                          c10::ArrayRef<int64_t> iparams, const OptTensor& grad, const OptTensor& teacher_ids) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kdkernels::logit_distill_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                           c10::ArrayRef<double>, c10::ArrayRef<int64_t>, const OptTensor&, const OptTensor&, bool,
                           const OptTensor&)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return std::get<0>(op.call(s, t, labels, temperature, fparams, iparams, grad, c10::nullopt, false, teacher_ids));
}

void launch_scale(const at::Tensor& grad, const at::Tensor& factor) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kdkernels::scale_rows_", "")
                       .typed<void(const at::Tensor&, const at::Tensor&)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  op.call(grad, factor);
}

struct LogitDistillLoss : public torch::autograd::Function<LogitDistillLoss> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& s, const at::Tensor& t, const OptTensor& labels,
                            const OptTensor& temperature, std::vector<double> fparams, std::vector<int64_t> iparams,
                            const OptTensor& teacher_ids) {
    at::Tensor grad = at::empty_like(s);
    at::Tensor loss = launch_forward(s, t, labels, temperature, fparams, iparams, grad, teacher_ids);
    ctx->save_for_backward({grad});
    ctx->saved_data["calls"] = static_cast<int64_t>(0);
    ctx->set_materialize_grads(false);  // else autograd would build a zero grad_output for an unused loss
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(kForwardArgs);
    const at::Tensor& grad_output = grad_outputs[0];
    if (!grad_output.defined()) return grads;  // the loss was not used
    const int64_t calls = ctx->saved_data["calls"].toInt() + 1;
    ctx->saved_data["calls"] = calls;
    TORCH_CHECK(calls == 1, kSecondBackward);
    at::Tensor grad = ctx->get_saved_variables()[0];
    // grad_output is 0-dim (sum, batchmean) or [N] (none): one factor per row, as scale_rows_ reads it
    launch_scale(grad, grad_output.dim() == 0 ? grad_output.expand({grad.size(0)}) : grad_output);
    if (torch::autograd::GradMode::is_enabled()) {  // create_graph: differentiating the gradient raises
      torch::autograd::DelayedError error(kDoubleBackward, 1);
      grad = error.apply({grad.detach().requires_grad_(true)})[0];
    }
    grads[0] = grad;
    return grads;
  }
};

at::Tensor logit_distill_loss_autograd(const at::Tensor& s, const at::Tensor& t, const OptTensor& labels,
                                       const OptTensor& temperature, c10::ArrayRef<double> fparams,
                                       c10::ArrayRef<int64_t> iparams, const OptTensor& teacher_ids) {
  if (!(torch::autograd::GradMode::is_enabled() && s.requires_grad())) {
    return launch_forward(s, t, labels, temperature, fparams, iparams, c10::nullopt, teacher_ids);
  }
  return LogitDistillLoss::apply(s, t, labels, temperature, fparams.vec(), iparams.vec(), teacher_ids);
}

at::Tensor logit_distill_loss_forward(const at::Tensor& s, const at::Tensor& t, const OptTensor& labels,
                                      const OptTensor& temperature, c10::ArrayRef<double> fparams,
                                      c10::ArrayRef<int64_t> iparams, const OptTensor& teacher_ids) {
  return launch_forward(s, t, labels, temperature, fparams, iparams, c10::nullopt, teacher_ids);
}

}  // namespace
}  // namespace kd

TORCH_LIBRARY_FRAGMENT(kdkernels, m) {
  m.def(
      "logit_distill_loss(Tensor s, Tensor t, Tensor? labels, Tensor? temperature, float[] fparams, "
      "int[] iparams, Tensor? teacher_ids=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(kdkernels, Autograd, m) {
  m.impl("logit_distill_loss", &kd::logit_distill_loss_autograd);
}

TORCH_LIBRARY_IMPL(kdkernels, CompositeExplicitAutograd, m) {
  m.impl("logit_distill_loss", &kd::logit_distill_loss_forward);
}
