// kd_torch_args.h — tensors → KdLaunch for the torch ops (ops.cpp for CPU, cuda/binding.cpp for CUDA).
//
// Checks shapes, dtypes, devices, strides and the parameter block (no tensor values are read, so no
// device sync), allocates the outputs and fills the raw-pointer launch description. s and t may have
// different floating dtypes (each is loaded in its own); grad has s's dtype. A sparse teacher comes as
// `teacher_ids` [N, K] (int32 / int64) with t its log-probabilities [N, K] (topk_mode 2).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/TensorImpl.h>
#include <c10/util/Exception.h>

#include <climits>
#include <tuple>

#include "kd_launch.h"

namespace kd {

inline KdDtype kd_dtype(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return KdDtype::f32;
    case at::kDouble: return KdDtype::f64;
    case at::kHalf: return KdDtype::f16;
    case at::kBFloat16: return KdDtype::bf16;
    default: TORCH_CHECK(false, "kdkernels: logits must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  }
}

inline at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

//: a [N] tensor of `dtype` with possibly zero stride
inline void check_rows(const at::Tensor& x, int64_t N, const char* name, const at::Tensor& like) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) == N, "kdkernels: ", name, " must have shape [", N, "], got ", x.sizes());
  TORCH_CHECK(x.device() == like.device(), "kdkernels: ", name, " must be on ", like.device());
}

struct LaunchTensors {
  KdLaunch launch;
  at::Tensor loss, row_loss, dtemp, temperature, grad_factor, scratch;  // outputs, workspaces, casts kept alive
};

//: the LLM-family fields of the parameter block (divergence, softcap, top-k / sparse teacher) are
//: consistent with each other, the rest of the spec and the inputs (LogitDistill enforces the same)
inline void check_llm_params(const KdParams& P, int64_t C, const c10::optional<at::Tensor>& ids,
                             const c10::optional<at::Tensor>& temperature, bool want_dtemp) {
  TORCH_CHECK(P.divergence >= kForwardKL && P.divergence <= kSkewRKL,
              "kdkernels: divergence code must be in [0, 5], got ", P.divergence);
  const bool mixture = P.divergence == kJSD || P.divergence == kSkewKL || P.divergence == kSkewRKL;
  TORCH_CHECK(!mixture || (P.div_param > 0.0 && P.div_param < 1.0),
              "kdkernels: the divergence parameter (jsd's beta, skew's alpha) must be in (0, 1), got ", P.div_param);
  TORCH_CHECK(P.softcap_s >= 0.0 && P.softcap_t >= 0.0, "kdkernels: softcap must be >= 0 (0 = none)");
  TORCH_CHECK(P.topk_mode >= kTopkNone && P.topk_mode <= kTopkSparse, "kdkernels: topk_mode must be 0, 1 or 2");
  TORCH_CHECK(P.topk_norm >= kNormRenorm && P.topk_norm <= kNormTeacher, "kdkernels: topk_norm must be 0, 1 or 2");
  TORCH_CHECK((P.topk_mode == kTopkSparse) == ids.has_value(),
              "kdkernels: teacher_ids (a sparse teacher) must be given exactly when topk_mode == 2");
  const bool generic = P.divergence != kForwardKL || P.topk_mode != kTopkNone;
  TORCH_CHECK(!generic || !(P.use_decoupled || P.dtkd_weight != 0 || P.use_relation || P.use_tdl),
              "kdkernels: a divergence other than forward_kl or a top-k teacher combines with the KD and CE "
              "terms only");
  TORCH_CHECK(!generic || !want_dtemp,
              "kdkernels: a learnable temperature is supported with the plain forward-KL KD term only");
  TORCH_CHECK(P.topk_mode == kTopkNone || !(P.standardize || P.use_tsm),
              "kdkernels: a top-k teacher does not combine with standardize or teacher_topk_scale");
  TORCH_CHECK(P.topk_norm != kNormTeacher || P.topk_mode == kTopkNone || P.divergence == kForwardKL,
              "kdkernels: normalize='teacher' is defined for divergence='forward_kl' only");
  if (P.topk_mode == kTopkDense) {
    const int64_t kmax = std::min<int64_t>(kMaxTopK, C - 1);
    TORCH_CHECK(P.topk_k >= 1 && P.topk_k <= kmax, "kdkernels: TopK k must be in [1, ", kmax, "], got ", P.topk_k);
  }
  if (P.topk_mode == kTopkSparse) {
    TORCH_CHECK(P.topk_norm != kNormTail || (P.temperature == 1.0 && !temperature.has_value()),
                "kdkernels: a sparse teacher's tail (normalize='tail') needs the constant temperature 1.0");
  }
}

//: the op's checks (no tensor values are read) and its outputs: loss ([N] for reduction none, else 0-dim),
//: dtemp ([N] when want_dtemp, else [0]); `device_scratch`: allocate the CUDA launch's KdScratch;
//: teacher_ids: a sparse teacher's ids [N, K] (t then holds its log-probabilities [N, K])
inline LaunchTensors make_launch(const at::Tensor& s, const at::Tensor& t, const c10::optional<at::Tensor>& labels,
                                 const c10::optional<at::Tensor>& temperature, c10::ArrayRef<double> fparams,
                                 c10::ArrayRef<int64_t> iparams, const c10::optional<at::Tensor>& grad,
                                 const c10::optional<at::Tensor>& grad_factor, bool want_dtemp,
                                 bool device_scratch = false,
                                 const c10::optional<at::Tensor>& teacher_ids = c10::nullopt) {
  const bool sparse = teacher_ids.has_value();
  TORCH_CHECK(s.dim() == 2, "kdkernels: s must be [N, C], got ", s.sizes());
  if (sparse) {
    const at::Tensor& ids = *teacher_ids;
    TORCH_CHECK(ids.dim() == 2 && ids.size(0) == s.size(0) && t.sizes() == ids.sizes(),
                "kdkernels: a sparse teacher's ids and log-probabilities must both be [N, K] (N = ", s.size(0),
                "), got ", ids.sizes(), " and ", t.sizes());
    TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
                "kdkernels: sparse teacher ids must be int32 or int64, got ", ids.scalar_type());
    TORCH_CHECK(ids.device() == s.device(), "kdkernels: sparse teacher ids must be on ", s.device());
    TORCH_CHECK(ids.size(1) >= 1 && ids.size(1) <= kMaxSparseK, "kdkernels: a sparse teacher needs 1 <= K <= ",
                kMaxSparseK, ", got K = ", ids.size(1));
    TORCH_CHECK(ids.stride(1) == 1 || ids.size(1) == 1, "kdkernels: sparse teacher ids need a unit column stride");
  } else {
    TORCH_CHECK(t.sizes() == s.sizes(), "kdkernels: s and t must be [N, C] of the same shape, got ", s.sizes(),
                " and ", t.sizes());
  }
  TORCH_CHECK(s.device() == t.device(), "kdkernels: s and t must be on the same device");
  TORCH_CHECK(s.stride(1) == 1 && t.stride(1) == 1, "kdkernels: s and t need a unit column stride");
  TORCH_CHECK(static_cast<int64_t>(fparams.size()) == kNumFloatFields &&
                  static_cast<int64_t>(iparams.size()) == kNumIntFields,
              "kdkernels: parameter block must have ", kNumFloatFields, " floats and ", kNumIntFields,
              " ints (LogitDistill.pack()), got ", fparams.size(), " and ", iparams.size());
  const int64_t N = s.size(0), C = s.size(1);
  TORCH_CHECK(C >= 1 && C < INT_MAX, "kdkernels: need 1 <= C < 2^31, got C = ", C);
  LaunchTensors out;
  KdLaunch& L = out.launch;
  L.params = params_from_flat(fparams.data(), iparams.data());
  const KdParams& P = L.params;
  const int64_t kmax = std::min<int64_t>(kMaxTopK, C - 1);
  TORCH_CHECK(!P.use_tsm || (P.tsm_k >= 1 && P.tsm_k <= kmax), "kdkernels: TopKScale k must be in [1, ", kmax, "]");
  TORCH_CHECK(!P.use_relation || (P.rel_k >= 2 && P.rel_k <= kmax), "kdkernels: ldrld k must be in [2, ", kmax, "]");
  TORCH_CHECK(!P.use_tdl || (P.tdl_k >= 1 && P.tdl_k <= kMaxTopK && 2 * P.tdl_k < C),
              "kdkernels: TDL needs 1 <= k <= ", kMaxTopK, " and 2k < C");
  TORCH_CHECK(!P.use_decoupled || C >= 2, "kdkernels: the decoupled term needs C >= 2");
  TORCH_CHECK(!(P.use_decoupled || P.ce_weight != 0) || labels.has_value(),
              "kdkernels: the decoupled and CE terms need labels");
  TORCH_CHECK(P.reduction >= kReduceNone && P.reduction <= kReduceBatchmean,
              "kdkernels: reduction code must be 0 (none), 1 (sum) or 2 (batchmean), got ", P.reduction);
  check_llm_params(P, C, teacher_ids, temperature, want_dtemp);
  TORCH_CHECK(!sparse || P.topk_k == teacher_ids->size(1), "kdkernels: topk_k (", P.topk_k,
              ") must be the sparse teacher's K (", teacher_ids->size(1), ")");

  const auto acc = acc_type(s);
  const auto opts = s.options().dtype(acc);
  L.s_dtype = kd_dtype(s);
  L.t_dtype = kd_dtype(t);
  L.N = N;
  L.C = C;
  L.s = s.data_ptr();
  L.s_ld = s.stride(0);
  L.t = t.data_ptr();
  L.t_ld = t.stride(0);
  L.t_ids = sparse ? teacher_ids->data_ptr() : nullptr;
  L.ids_ld = sparse ? teacher_ids->stride(0) : 0;
  L.ids_i64 = sparse && teacher_ids->scalar_type() == at::kLong;
  L.K = sparse ? teacher_ids->size(1) : 0;
  L.grad = nullptr;
  L.g_ld = 0;
  if (grad.has_value()) {
    TORCH_CHECK(grad->sizes() == s.sizes() && grad->scalar_type() == s.scalar_type() &&
                    grad->device() == s.device() && grad->stride(1) == 1,
                "kdkernels: grad must be like s with a unit column stride");
    L.grad = grad->data_ptr();
    L.g_ld = grad->stride(0);
  }
  L.labels = nullptr;
  L.labels_stride = 0;
  if (labels.has_value()) {
    check_rows(*labels, N, "labels", s);
    TORCH_CHECK(labels->scalar_type() == at::kLong, "kdkernels: labels must be int64");
    L.labels = labels->data_ptr<int64_t>();
    L.labels_stride = labels->stride(0);
  }
  L.temperature = nullptr;
  L.temp_stride = 0;
  if (temperature.has_value()) {
    check_rows(*temperature, N, "temperature", s);
    out.temperature = temperature->to(acc);
    L.temperature = out.temperature.data_ptr();
    L.temp_stride = out.temperature.stride(0);
  }
  L.grad_factor = nullptr;
  L.factor_f64 = false;
  L.factor_stride = 0;
  if (grad_factor.has_value()) {
    check_rows(*grad_factor, N, "grad_factor", s);
    const bool f64 = grad_factor->scalar_type() == at::kDouble;
    out.grad_factor = f64 ? *grad_factor : grad_factor->to(at::kFloat);
    L.grad_factor = out.grad_factor.data_ptr();
    L.factor_f64 = f64;
    L.factor_stride = out.grad_factor.stride(0);
  }
  out.row_loss = at::empty({N}, opts);
  out.loss = P.reduction == kReduceNone ? out.row_loss : at::empty({}, opts);
  out.dtemp = at::empty({want_dtemp ? N : 0}, opts);
  L.row_loss = out.row_loss.data_ptr();
  L.loss = out.loss.data_ptr();
  L.dtemp = want_dtemp ? out.dtemp.data_ptr() : nullptr;
  L.scratch = nullptr;
  if (device_scratch) {
    out.scratch = at::empty({static_cast<int64_t>(sizeof(KdScratch))}, s.options().dtype(at::kByte));
    L.scratch = out.scratch.data_ptr();
  }
  return out;
}

//: the dtype pairs of the CUDA engine (and its simulator): any of float32/float16/bfloat16 for s and t,
//: or float64 for both; a sparse teacher's log-probabilities (teacher_ids given) may have any float dtype
//: with any student (they are read once per row, into the accumulation dtype)
inline void check_block_engine_dtypes(const at::Tensor& s, const at::Tensor& t,
                                      const c10::optional<at::Tensor>& teacher_ids) {
  TORCH_CHECK(teacher_ids.has_value() || (s.scalar_type() == at::kDouble) == (t.scalar_type() == at::kDouble),
              "kdkernels: the CUDA engine takes float64 logits only with float64 on both sides, got s ",
              s.scalar_type(), " and t ", t.scalar_type());
}

//: an op wrote `x` in place: bump its version counter, so autograd refuses a saved copy of it later
//: (inference tensors have none)
inline void mark_written(const at::Tensor& x) {
  if (!x.is_inference()) x.unsafeGetTensorImpl()->bump_version();
}

inline void check_scale_args(const at::Tensor& grad, const at::Tensor& factor) {
  TORCH_CHECK(grad.dim() == 2 && grad.stride(1) == 1, "kdkernels: grad must be [N, C] with a unit column stride");
  check_rows(factor, grad.size(0), "factor", grad);
  TORCH_CHECK(factor.scalar_type() == at::kFloat || factor.scalar_type() == at::kDouble,
              "kdkernels: factor must be float32 or float64");
  kd_dtype(grad);
}

}  // namespace kd
