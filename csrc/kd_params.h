// kd_params.h — the flat parameter block of one LogitDistill spec, shared by every C++ backend.
//
// The field order mirrors kdkernels/spec.py FLOAT_FIELDS / INT_FIELDS exactly (tests/test_cpp.py parses
// the two X-macro lists below and compares them with the Python tuples). LogitDistill.pack() produces
// the two flat lists; ops.cpp copies them into a KdParams in this order. Torch-free and device-safe.
#pragma once

#include <cstdint>

// clang-format off
#define KD_FLOAT_FIELDS(X)                                                                       \
  X(temperature) X(kd_weight) X(ce_weight) X(tckd_weight) X(nckd_weight) X(max_weight)            \
  X(dtkd_weight) X(local_weight) X(rest_weight) X(rel_eps) X(rel_delta) X(rel_lambda)             \
  X(tdl_weight) X(tdl_pos) X(tdl_neg) X(tdl_non) X(tsm_scale) X(tsm_shift) X(tsm_gt_scale)             \
  X(loss_weight) X(div_param) X(softcap_s) X(softcap_t)

#define KD_INT_FIELDS(X)                                                                         \
  X(ignore_index) X(standardize) X(use_tsm) X(tsm_k) X(use_decoupled) X(adaptive_tckd)            \
  X(use_relation) X(rel_k) X(rank_by_teacher) X(use_tdl) X(tdl_k) X(reduction)                 \
  X(divergence) X(topk_mode) X(topk_k) X(topk_norm)
// clang-format on

namespace kd {

//: largest k of the in-kernel top-k (spec.MAX_TOPK)
constexpr int kMaxTopK = 64;
//: largest K of a sparse teacher (spec.MAX_SPARSE_K)
constexpr int kMaxSparseK = 1024;
//: the `divergence` int field (spec.DIVERGENCE_CODES)
enum KdDivergence : int { kForwardKL = 0, kReverseKL = 1, kJSD = 2, kTVD = 3, kSkewKL = 4, kSkewRKL = 5 };
//: the `topk_mode` int field (spec.TOPK_MODES): no top-k teacher, dense top-k masking, sparse teacher
enum KdTopkMode : int { kTopkNone = 0, kTopkDense = 1, kTopkSparse = 2 };
//: the `topk_norm` int field (spec.NORMALIZATION_CODES)
enum KdTopkNorm : int { kNormRenorm = 0, kNormTail = 1, kNormTeacher = 2 };
//: added to the standard deviation before dividing (reference.STD_EPS)
constexpr double kStdEps = 1e-7;
//: lower bound of |u|·|v| in TDL's cosine (reference.COS_EPS)
constexpr double kCosEps = 1e-8;

struct KdParams {
#define KD_DECLARE_FLOAT(name) double name;
#define KD_DECLARE_INT(name) int64_t name;
  KD_FLOAT_FIELDS(KD_DECLARE_FLOAT)
  KD_INT_FIELDS(KD_DECLARE_INT)
#undef KD_DECLARE_FLOAT
#undef KD_DECLARE_INT
};

#define KD_COUNT_FIELD(name) +1
constexpr int kNumFloatFields = 0 KD_FLOAT_FIELDS(KD_COUNT_FIELD);
constexpr int kNumIntFields = 0 KD_INT_FIELDS(KD_COUNT_FIELD);
#undef KD_COUNT_FIELD

// Fill a KdParams from the two flat lists of LogitDistill.pack() (sizes checked by the caller).
inline KdParams params_from_flat(const double* floats, const int64_t* ints) {
  KdParams p{};
  int i = 0;
#define KD_READ_FLOAT(name) p.name = floats[i++];
  KD_FLOAT_FIELDS(KD_READ_FLOAT)
#undef KD_READ_FLOAT
  i = 0;
#define KD_READ_INT(name) p.name = ints[i++];
  KD_INT_FIELDS(KD_READ_INT)
#undef KD_READ_INT
  return p;
}

}  // namespace kd
