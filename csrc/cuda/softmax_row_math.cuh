// Per-row and per-element math of the softmax-family losses, written to match the CPU
// kernels (csrc/cpu/kernels_impl.h) formula for formula: the logit transform and its
// derivative, the focal value and gradient factor, and the gradient coefficients
//   grad_c = ds/dx_c * (A p_c - D q_c) - [c == t] ds/dx_t * B.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "../kernel_params.h"
#include "device_math.cuh"
#include "vec_io.cuh"

namespace tlf::cuda {

// s = cap * tanh(scale * x / cap) (softcap), s = scale * x, or s = x; deriv gives ds/dx
// in terms of s.
template <typename acc_t>
struct Transform {
  acc_t scale, cap, k;
  bool scaled, capped;

  __device__ __forceinline__ Transform(double logit_scale, double softcap)
      : scale(static_cast<acc_t>(logit_scale)),
        cap(static_cast<acc_t>(softcap)),
        k(softcap > 0 ? static_cast<acc_t>(logit_scale / softcap) : acc_t(0)),
        scaled(logit_scale != 1.0),
        capped(softcap > 0) {}

  __device__ __forceinline__ bool active() const { return scaled || capped; }

  __device__ __forceinline__ acc_t apply(acc_t x) const {
    if (capped) return tanh_accurate(x * k) * cap;
    if (scaled) return x * scale;
    return x;
  }

  __device__ __forceinline__ acc_t deriv(acc_t s) const {
    if (capped) {
      const acc_t u = div_rn(s, cap);
      return scale * (acc_t(1) - u * u);
    }
    return scale;
  }
};

// Focal pieces from log p_t: loss = -alpha_t (1-p_t)^gamma log p_t and the factor F with
// d loss / d s_c = F (p_c - [c == t]). Evaluated once per row in double, with libm's
// expm1/pow, whatever the input dtype: gamma = 0 still gives exactly the cross-entropy
// value (a product of two floats is exact in double, so it rounds as the float product
// does) and F = alpha_t, and saturated logits stay finite.
// q^gamma for q in [0, 1]: exact for the usual integer gammas, and inline (libm's double
// pow is a function call, which costs the calling kernel registers).
__device__ __forceinline__ double pow_q(double q, double gamma) {
  if (gamma == 0) return 1.0;
  if (gamma == 1) return q;
  if (gamma == 2) return q * q;
  return exp(gamma * log(q));  // q = 0: exp(-inf) = 0
}

template <typename acc_t>
struct Focal {
  acc_t loss = 0, factor = 0;

  __device__ __forceinline__ void compute(acc_t log_pt_acc, acc_t alpha_t_acc, double gamma) {
    const double log_pt = log_pt_acc, alpha_t = alpha_t_acc;
    const double q = -expm1(log_pt);  // 1 - p_t without cancellation
    const double q_pow = pow_q(q, gamma);
    // 0 - log_pt rather than -log_pt: +0.0 where p_t = 1, as cross-entropy's lse - s_t.
    loss = static_cast<acc_t>((alpha_t * q_pow) * (0.0 - log_pt));
    if (gamma == 0) {
      factor = alpha_t_acc;
    } else {
      const double pt = exp(log_pt);
      // log(1 - q) / q -> -1 as q -> 0; p_t * log p_t -> 0 as p_t -> 0.
      const double ratio = q > 0 ? log_pt / q : -1.0;
      const double corr = pt > 0 ? gamma * pt * ratio : 0.0;
      factor = static_cast<acc_t>(alpha_t * q_pow * (1.0 - corr));
    }
  }
};

template <typename acc_t>
__device__ __forceinline__ acc_t focal_alpha(const SoftmaxLossParams& p, int64_t t) {
  const acc_t a = static_cast<acc_t>(p.alpha_scale);
  return p.alpha != nullptr ? a * static_cast<const acc_t*>(p.alpha)[t] : a;
}

// The largest of the values packed in raw, NaN if any is NaN; exact (a maximum does not
// round). 16-bit values are compared two to a register while still packed (max.NaN on
// bf16x2 / f16x2, sm_80+), before any is unpacked: half the instructions of comparing
// them as floats, and the unpacked floats are not all live at once.
template <typename T>
__device__ __forceinline__ unsigned max_nan_x2(unsigned a, unsigned b) {
  static_assert(sizeof(T) == 2);
  unsigned r;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("max.NaN.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  } else {
    asm("max.NaN.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  }
#else
  float v[8], m[8] = {};
  Vec16<T>::unpack(make_uint4(a, b, 0u, 0u), v);  // a's pair, then b's
  m[0] = max_nan(v[0], v[2]);
  m[1] = max_nan(v[1], v[3]);
  r = Vec16<T>::pack(m).x;  // exact: each is one of the inputs
#endif
  return r;
}

template <typename T, int U>
__device__ __forceinline__ acc_of<T> max_nan_packed(const uint4 (&raw)[U]) {
  using acc_t = acc_of<T>;
  constexpr int kN = Vec16<T>::kVec;
  if constexpr (sizeof(T) == 2) {
    unsigned w[4 * U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      w[4 * u] = raw[u].x;
      w[4 * u + 1] = raw[u].y;
      w[4 * u + 2] = raw[u].z;
      w[4 * u + 3] = raw[u].w;
    }
    const unsigned pair =
        tree_reduce(w, [](unsigned a, unsigned b) { return max_nan_x2<T>(a, b); });
    const uint4 last = make_uint4(pair, pair, pair, pair);
    acc_t two[kN];
    Vec16<T>::unpack(last, two);
    return max_nan(two[0], two[1]);
  } else {
    acc_t v[kN * U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      acc_t one[kN];
      Vec16<T>::unpack(raw[u], one);
#pragma unroll
      for (int j = 0; j < kN; ++j) v[u * kN + j] = one[j];
    }
    return tree_reduce(v, [](acc_t a, acc_t b) { return max_nan(a, b); });
  }
}

// Which q_c enters the gradient and the smoothing sum of a row.
enum class QKind : int {
  None,     // no D term (plain cross-entropy, focal)
  One,      // label smoothing without weights: q_c = 1
  Weight,   // label smoothing with weights: q_c = w_c
  ProbTarget  // probability target: q_c = t'_c w_c, t' = (1 - eps) t + eps / C
};

// Reads q_c for one row (only the kinds that need memory).
template <typename T>
struct QReader {
  using acc_t = acc_of<T>;
  const acc_t* weight;     // null when unweighted
  const void* target_row;  // probability-target row start (elements of T or float)
  int64_t target_sc;
  bool target_f32;
  acc_t keep, add;  // t' = t * keep + add
  bool smooth;

  __device__ __forceinline__ QReader(const SoftmaxLossParams& p, int64_t r)
      : weight(static_cast<const acc_t*>(p.weight)),
        target_row(nullptr),
        target_sc(0),
        target_f32(false),
        keep(acc_t(1) - static_cast<acc_t>(p.label_smoothing)),
        add(static_cast<acc_t>(p.label_smoothing) / static_cast<acc_t>(p.in.C)),
        smooth(p.label_smoothing > 0) {
    if (p.prob_target) {
      const RowLayout& tl = p.prob_target_layout;
      target_sc = tl.sc;
      target_f32 = p.target_is_float32;
      const int64_t off = tl.row_offset(r);
      if (target_f32) {
        target_row = static_cast<const float*>(p.prob_target_ptr) + off;
      } else {
        target_row = static_cast<const T*>(p.prob_target_ptr) + off;
      }
    }
  }

  __device__ __forceinline__ acc_t prob(int64_t c) const {
    acc_t t = target_f32 ? static_cast<acc_t>(static_cast<const float*>(target_row)[c * target_sc])
                         : to_acc(static_cast<const T*>(target_row)[c * target_sc]);
    if (smooth) t = t * keep + add;
    if (weight != nullptr) t = t * weight[c];
    return t;
  }

  __device__ __forceinline__ acc_t operator()(QKind kind, int64_t c) const {
    switch (kind) {
      case QKind::ProbTarget:
        return prob(c);
      case QKind::Weight:
        return weight[c];
      case QKind::One:
        return acc_t(1);
      case QKind::None:
      default:
        return acc_t(0);
    }
  }
};

}  // namespace tlf::cuda
