// sim_engine.cpp — the CUDA engine's code path (StreamView + a simulated block of `lanes` threads,
// sim_exec.h) on host memory, behind the test-only op kdkernels::_logit_distill_fwd_sim (ops.cpp).
// It checks on machines without a GPU what only the CUDA kernels run. One row at a time.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <thread>

#include "cpu_engine.h"
#include "kd_stream_view.h"
#include "sim_exec.h"

namespace kd {
namespace {

struct HostCvt {
  template <class A, class T>
  static A to_acc(T x) { return static_cast<A>(x); }
  template <class T, class A>
  static T from_acc(A x) { return static_cast<T>(x); }
};

template <class scalar_t, class A>
void sim_forward_typed(const KdLaunch& L, int lanes) {
  for (int64_t n = 0; n < L.N; ++n) {
    SimBlock<A> block(lanes);
    auto lane = [&](int id) {
      StreamView<scalar_t, A, HostCvt> v;
      v.init(static_cast<const scalar_t*>(L.s) + n * L.s_ld, static_cast<const scalar_t*>(L.t) + n * L.t_ld,
             L.grad ? static_cast<scalar_t*>(L.grad) + n * L.g_ld : nullptr);
      const SimExec<A> ex{&block, id};
      RowIO<A> io{};
      io.C = static_cast<int>(L.C);
      io.has_labels = L.labels != nullptr;
      io.label = io.has_labels ? L.labels[n * L.labels_stride] : 0;
      io.T = L.temperature ? static_cast<const A*>(L.temperature)[n * L.temp_stride]
                           : static_cast<A>(L.params.temperature);
      io.want_grad = L.grad != nullptr;
      io.want_dtemp = L.dtemp != nullptr;
      io.grad_scale = static_cast<A>(
          !L.grad_scale ? L.grad_scale_value
          : L.scale_f64 ? static_cast<const double*>(L.grad_scale)[n * L.scale_stride]
                        : static_cast<const float*>(L.grad_scale)[n * L.scale_stride]);
      distill_row(ex, v, block.sh, L.params, io);
      if (id == 0) {
        static_cast<A*>(L.loss)[n] = io.loss;
        if (L.dtemp) static_cast<A*>(L.dtemp)[n] = io.dtemp;
      }
    };
    std::vector<std::thread> others;
    for (int id = 1; id < lanes; ++id) others.emplace_back(lane, id);
    lane(0);
    for (auto& th : others) th.join();
  }
}

}  // namespace

void sim_forward(const KdLaunch& L, int lanes) {
  switch (L.dtype) {
    case KdDtype::f32: return sim_forward_typed<float, float>(L, lanes);
    case KdDtype::f64: return sim_forward_typed<double, double>(L, lanes);
    case KdDtype::f16: return sim_forward_typed<c10::Half, float>(L, lanes);
    case KdDtype::bf16: return sim_forward_typed<c10::BFloat16, float>(L, lanes);
  }
}

}  // namespace kd
