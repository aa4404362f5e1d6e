// Math helpers whose accuracy does not depend on --use_fast_math (the build passes it).
//
// Hot-path exp/log: float uses the hardware approximations (__expf/__logf: about 2 ulp for
// arguments near 0, which is where softmax terms that matter live, and the outputs are
// rounded to at most float anyway); double uses libm. Where an approximation would be too
// coarse (fast-math tanhf is a 2^-11 approximation, powf loses bits for small bases) the
// libdevice functions are called by name, which fast math does not rewrite.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

extern "C" __device__ float __nv_tanhf(float);
extern "C" __device__ float __nv_powf(float, float);
extern "C" __device__ float __nv_log1pf(float);

namespace tlf::cuda {

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -static_cast<acc_t>(INFINITY);
}

__device__ __forceinline__ float exp_fast(float x) { return __expf(x); }
__device__ __forceinline__ double exp_fast(double x) { return exp(x); }
// 2^x: one ex2.approx (what __expf runs after its multiply by log2(e)); libm for double.
__device__ __forceinline__ float exp2_fast(float x) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#else
  return exp2f(x);
#endif
}
__device__ __forceinline__ double exp2_fast(double x) { return exp2(x); }
__device__ __forceinline__ float log2_fast(float x) { return __log2f(x); }
template <typename acc_t>
inline constexpr acc_t kLog2e = static_cast<acc_t>(1.4426950408889634);

// Overloads by name, so a host compiler (tests/cuda_emulation) rounds as the device does.
__device__ __forceinline__ float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return fma(a, b, c); }
__device__ __forceinline__ bool is_finite(float x) { return fabsf(x) < INFINITY; }
__device__ __forceinline__ bool is_finite(double x) { return fabs(x) < INFINITY; }

// exp(x - m) in base 2, for a shift m used many times: with m2 = RN(m log2 e) (finite),
// exp(x - m) = 2^(x log2 e - m2) * 2^-(m log2 e - m2). exp2_shifted is the first factor,
// one fma and one ex2 with the exponent rounded once; base2_residual the second, exact but
// for the ex2 (the fma gives m log2 e - m2 exactly).
template <typename acc_t>
__device__ __forceinline__ acc_t exp2_shifted(acc_t x, acc_t m2) {
  return exp2_fast(fma_acc(x, kLog2e<acc_t>, -m2));
}
template <typename acc_t>
__device__ __forceinline__ acc_t base2_residual(acc_t m, acc_t m2) {
  return exp2_fast(-fma_acc(m, kLog2e<acc_t>, -m2));
}
// Whether the base-2 loops may shift by m2: base2_residual's exponent is up to half an ulp
// of m2, which leaves ex2's range once |m2| reaches 2^31 in float (logits beyond about
// 1.5e9; 2^60 in double), and inf * 0 made the sums and gradients NaN. Below 2^30 it is
// at most 2^5. False for an infinite or NaN m2 too: the base-e loops take those rows.
__device__ __forceinline__ bool base2_ok(float m2) { return fabsf(m2) < 0x1p30f; }
__device__ __forceinline__ bool base2_ok(double m2) { return fabs(m2) < 0x1p30; }

__device__ __forceinline__ float log_fast(float x) { return __logf(x); }
__device__ __forceinline__ double log_fast(double x) { return log(x); }

__device__ __forceinline__ float tanh_accurate(float x) { return __nv_tanhf(x); }
__device__ __forceinline__ double tanh_accurate(double x) { return tanh(x); }
__device__ __forceinline__ float pow_accurate(float x, float y) { return __nv_powf(x, y); }
__device__ __forceinline__ double pow_accurate(double x, double y) { return pow(x, y); }
__device__ __forceinline__ float log1p_accurate(float x) { return __nv_log1pf(x); }
__device__ __forceinline__ double log1p_accurate(double x) { return log1p(x); }

// Correctly rounded division (fast math would approximate a / b): for the few per-row or
// per-element quotients whose accuracy shows in the results.
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

// max that returns NaN when either side is NaN, so a NaN logit poisons its row (fmaxf
// would drop it).
__device__ __forceinline__ float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return (a > b || a != a) ? a : b;
#endif
}
__device__ __forceinline__ double max_nan(double a, double b) {
  return (a > b || a != a) ? a : b;
}

// Reduces v in place, pairwise: ((v0 op v1) op (v2 op v3)) op ..., a fixed order.
template <typename acc_t, int N, class Op>
__device__ __forceinline__ acc_t tree_reduce(acc_t (&v)[N], Op op) {
#pragma unroll
  for (int w = 1; w < N; w *= 2) {
#pragma unroll
    for (int i = 0; i + w < N; i += 2 * w) v[i] = op(v[i], v[i + w]);
  }
  return v[0];
}

// Online log-sum-exp state: m is the largest value seen (NaN once a NaN was seen, possibly
// replaced later while s stays NaN), s = sum exp(v - m).
template <typename acc_t>
struct LseState {
  acc_t m, s;

  __device__ __forceinline__ LseState() : m(neg_inf<acc_t>()), s(0) {}

  // Adds n values; entries the caller wants skipped are -inf (they add exp(-inf) = 0).
  // The maximum and the sum are pairwise trees: log2(n) dependent steps rather than n, so
  // the few warps of a block per row have independent instructions to issue.
  template <int N>
  __device__ __forceinline__ void add(const acc_t (&v)[N]) {
    acc_t t[N];
#pragma unroll
    for (int j = 0; j < N; ++j) t[j] = v[j];
    if (!raise_max(tree_reduce(t, [](acc_t a, acc_t b) { return max_nan(a, b); }))) return;
#pragma unroll
    for (int j = 0; j < N; ++j) t[j] = exp_fast(v[j] - m);
    s += tree_reduce(t, [](acc_t a, acc_t b) { return a + b; });
  }

  // The first half of adding values whose maximum is vmax: m becomes max(m, vmax) and s
  // follows it. False when every value so far is -inf: the terms exp(v - m) to add next
  // are all exp(-inf) = 0, and the caller skips them.
  __device__ __forceinline__ bool raise_max(acc_t vmax) {
    if (!(vmax <= m)) {  // a larger maximum, or NaN (which then poisons s)
      s = s * exp_fast(m - vmax);  // exp(-inf) = 0 while nothing finite was seen
      m = vmax;
    }
    return m != neg_inf<acc_t>();
  }

  // s expressed relative to M >= m (M the maximum over the states being merged):
  // exp(-inf) = 0 drops states that saw only -inf, and a NaN in M or s carries through.
  __device__ __forceinline__ acc_t rescaled(acc_t M) const {
    if (M == neg_inf<acc_t>()) return s;  // every state empty: s = 0
    return s * exp_fast(m - M);
  }

  // log(sum exp) = m + log(s): -inf for an empty or all -inf row, NaN if a NaN was seen.
  // s >= 1 whenever m is finite (the largest term is exp(0) = 1), so log(s) >= 0; __logf's
  // absolute error near 1 (up to 2^-21.4) can make it slightly negative, which would put lse
  // below the largest logit: a negative loss, log p_t > 0 and 1 - p_t < 0 (a NaN focal loss
  // for non-integer gamma). Clamped; NaN stays NaN, and s = 0 gives -inf either way.
  __device__ __forceinline__ acc_t log_s() const {
    const acc_t l = log_fast(s);
    return l < acc_t(0) ? acc_t(0) : l;
  }
  __device__ __forceinline__ acc_t lse() const { return m + log_s(); }
};

}  // namespace tlf::cuda
