// kd_math.h — scalar building blocks of the row math, identical on host (CPU twin) and device (CUDA).
//
//  * better(a, i, b, j): the selection order of every top-k — larger key first, ties to the lower index
//    (torch.sort(descending=True, stable=True)); a top-k is then exactly {c : (key_c, c) ⪰ k-th entry},
//    which gives an O(1) membership test (Sel::contains) used by every later pass.
//  * Bernoulli KL of LDRLD's pair term in log space (docs/ldrld.md):
//        KL(Bern(σ(d_t)) ‖ Bern(σ(d_s))) = σ(d_t)(logσ(d_t) − logσ(d_s)) + σ(−d_t)(logσ(−d_t) − logσ(−d_s))
//        ∂/∂d_s = −σ(d_t)·σ(−d_s) + σ(−d_t)·σ(d_s)        (each half dropped where its weight is 0)
//  * stable σ / logσ: logσ(x) = min(x, 0) − log1p(exp(−|x|)).
// Everything here is a pure function of its arguments (no torch, no std containers).
#pragma once

#include <climits>
#include <cstdint>
#include <cstring>
#include <math.h>

#if defined(__CUDACC__)
#define KD_FN __device__ __forceinline__
#define KD_HD __host__ __device__ __forceinline__
#define KD_SIMD_SUM(...)
#define KD_SIMD_MAX(...)
#define KD_SIMD_MAX_SUM(m, ...)
#define KD_SIMD(...)
#else
#define KD_FN inline __attribute__((always_inline))
#define KD_HD inline __attribute__((always_inline))
#define KD_PRAGMA(x) _Pragma(#x)
//: lets the host compiler vectorise a loop whose float sums it may then reassociate
#define KD_SIMD_SUM(...) KD_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#define KD_SIMD_MAX(...) KD_PRAGMA(omp simd reduction(max : __VA_ARGS__))
#define KD_SIMD_MAX_SUM(m, ...) KD_PRAGMA(omp simd reduction(max : m) reduction(+ : __VA_ARGS__))
//: `omp simd` with the given clauses (host only)
#define KD_SIMD(...) KD_PRAGMA(omp simd __VA_ARGS__)
#endif

namespace kd {

template <class A>
KD_HD A kinf() { return static_cast<A>(INFINITY); }
template <class A>
KD_HD A knan() { return static_cast<A>(NAN); }
//: the largest finite value of A (float: FLT_MAX, double: DBL_MAX)
template <class A>
KD_HD A kmax_finite() { return sizeof(A) == sizeof(float) ? static_cast<A>(3.40282346638528859812e+38F)
                                                          : static_cast<A>(1.79769313486231570815e+308); }

#if !defined(__CUDACC__)
//: exp for float on the host, branch-free so loops calling it vectorise: exp(x) = 2^n·e^r with
//: n = round(x·log2 e) (magic-number rounding), r = x − n·ln 2 (Cody–Waite), e^r by Cephes' expf
//: polynomial (≤ 2 ulp). Results below e^−87 are flushed to 0 (so e^−inf = 0), NaN propagates.
inline __attribute__((always_inline)) float kexp_host(float x) {
  const bool under = x < -87.0f, over = x > 88.0f;  // both tested unconditionally: if-convertible
  float xc = under ? -87.0f : x;
  xc = over ? 88.0f : xc;
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float out = y * scale;
  out = under ? 0.0f : out;
  out = over ? INFINITY : out;
  return x != x ? x : out;
}
KD_HD float kexp(float x) { return kexp_host(x); }
#else
KD_HD float kexp(float x) { return expf(x); }
#endif
KD_HD double kexp(double x) { return exp(x); }
KD_HD float klog(float x) { return logf(x); }
KD_HD double klog(double x) { return log(x); }
KD_HD float klog1p(float x) { return log1pf(x); }
KD_HD double klog1p(double x) { return log1p(x); }
KD_HD float ksqrt(float x) { return sqrtf(x); }
KD_HD double ksqrt(double x) { return sqrt(x); }
KD_HD float kexpm1(float x) { return expm1f(x); }
KD_HD double kexpm1(double x) { return expm1(x); }
KD_HD float ktanh(float x) { return tanhf(x); }
KD_HD double ktanh(double x) { return tanh(x); }

template <class A>
KD_HD A kmax(A a, A b) { return a > b ? a : b; }
template <class A>
KD_HD A kmin(A a, A b) { return a < b ? a : b; }
template <class A>
KD_HD bool kfinite(A x) { return x == x && x != kinf<A>() && x != -kinf<A>(); }
//: a KL value clamped at 0 where rounding made it negative (NaN stays NaN)
template <class A>
KD_HD A kclamp0(A x) { return x < A(0) ? A(0) : x; }
//: x·0 for the non-masked entries (−inf gives 0): 0 for finite x, NaN for NaN and +inf, so its row sum is NaN
//: exactly when the row holds a NaN or a +inf (a −inf entry is a masked class and is skipped)
template <class A>
KD_HD A kpoison(A x) { return x != -kinf<A>() ? x * A(0) : A(0); }
//: a top-k key with NaN mapped to −inf, so a selection never takes an index outside the row
template <class A>
KD_HD A ksel_key(A x) { return x == x ? x : -kinf<A>(); }
//: a finite shift for exp(z − M): M itself, or 0 when M is ±inf/NaN (an empty set gives exp(−inf) = 0)
template <class A>
KD_HD A kshift(A m) { return kfinite(m) ? m : A(0); }

//: log(e^a + e^b), −inf where both are −inf (never NaN there)
template <class A>
KD_HD A klogaddexp(A a, A b) {
  const A m = a > b ? a : b;
  if (m == -kinf<A>()) return -kinf<A>();
  return m + klog1p(kexp(-(a > b ? a - b : b - a)));
}

//: Gemma's softcap c·tanh(x/c) of a raw logit (c > 0); −inf stays −inf and +inf stays +inf (so a +inf
//: input still poisons its row), NaN stays NaN
template <class A>
KD_HD A ksoftcap(A x, A cap) {
  return (x == -kinf<A>() || x == kinf<A>()) ? x : cap * ktanh(x / cap);
}

//: d softcap(x)/dx = sech²(x/c) = 4e/(1 + e)² with e = exp(−2|x/c|) (accurate also where tanh saturates;
//: 0 at ±inf)
template <class A>
KD_HD A ksoftcap_grad(A x, A cap) {
  const A u = x / cap;
  const A e = kexp(A(-2) * (u < A(0) ? -u : u));
  return A(4) * e / ((A(1) + e) * (A(1) + e));
}

//: the selection order: key a at index i comes before key b at index j
template <class A>
KD_HD bool better(A a, int i, A b, int j) { return a > b || (a == b && i < j); }

//: insert (v, c) into the sorted list (key, idx) of at most k entries, count in `cnt`
template <class A>
KD_HD void topk_insert(A* key, int* idx, int& cnt, int k, A v, int c) {
  if (cnt == k && !better(v, c, key[k - 1], idx[k - 1])) return;
  int j = cnt < k ? cnt++ : k - 1;
  while (j > 0 && better(v, c, key[j - 1], idx[j - 1])) {
    key[j] = key[j - 1];
    idx[j] = idx[j - 1];
    --j;
  }
  key[j] = v;
  idx[j] = c;
}

template <class A>
KD_HD A sigmoid(A x) {
  if (x >= A(0)) return A(1) / (A(1) + kexp(-x));
  A e = kexp(x);
  return e / (A(1) + e);
}

template <class A>
KD_HD A log_sigmoid(A x) { return kmin(x, A(0)) - klog1p(kexp(x < A(0) ? x : -x)); }

//: LDRLD pair term: loss and ∂loss/∂d_s for KL(Bern(σ(dt)) ‖ Bern(σ(ds)))
template <class A>
KD_HD void bernoulli_kl(A dt, A ds, A& loss, A& d_ds) {
  const A p = sigmoid(dt), pm = sigmoid(-dt);
  loss = A(0);
  d_ds = A(0);
  if (p > A(0)) {
    loss += p * (log_sigmoid(dt) - log_sigmoid(ds));
    d_ds -= p * sigmoid(-ds);
  }
  if (pm > A(0)) {
    loss += pm * (log_sigmoid(-dt) - log_sigmoid(-ds));
    d_ds += pm * sigmoid(ds);
  }
}

//: LDRLD's w(r, r') for 1-based ranks: δ·exp(−λ(r + r'))/(|r − r'| + ε)
template <class A>
KD_HD A pair_weight(A delta, A lam, A eps, int r1, int r2) {
  const int d = r1 > r2 ? r1 - r2 : r2 - r1;
  return delta * kexp(-lam * A(r1 + r2)) / (A(d) + eps);
}

}  // namespace kd
