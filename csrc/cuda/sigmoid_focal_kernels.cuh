// Kernel bodies of the elementwise sigmoid focal loss (torchvision.ops.sigmoid_focal_loss
// semantics), matching the CPU formulas of csrc/cpu/kernels_impl.h. Torch-free.
//
// The loss is elementwise with several transcendental functions per element, so the exp,
// log1p, division and pow below are the accurate ones (device_math.cuh): --use_fast_math
// would otherwise cost the fp32 results several ulp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../kernel_params.h"
#include "device_math.cuh"
#include "group_reduce.cuh"
#include "vec_io.cuh"

extern "C" __device__ float __nv_expf(float);

namespace tlf::cuda {

__device__ __forceinline__ float exp_accurate(float x) { return __nv_expf(x); }
__device__ __forceinline__ double exp_accurate(double x) { return exp(x); }

template <typename acc_t>
struct SigmoidTerms {
  acc_t ce, p, q, m;  // BCE-with-logits, sigmoid(x), 1 - sigmoid(x), 1 - p_t
  __device__ __forceinline__ SigmoidTerms(acc_t x, acc_t t) {
    const acc_t ax = fabs(x);
    const acc_t e = exp_accurate(-ax);  // exp(-|x|) never overflows
    const bool pos = x >= acc_t(0);
    // max(x, 0) - x t as |x| (1 - t) or |x| t, as the CPU kernels: +inf with t < 1 gives
    // inf (inf - inf t was nan), and 1 - t is exact where t is near 1
    ce = fma_acc(ax, pos ? acc_t(1) - t : t, log1p_accurate(e));
    const acc_t inv = div_rn(acc_t(1), acc_t(1) + e);
    p = pos ? inv : e * inv;
    q = pos ? e * inv : inv;
    m = t * q + (acc_t(1) - t) * p;
  }
};

template <typename acc_t>
__device__ __forceinline__ acc_t pow_gamma(acc_t m, acc_t gamma) {
  if (gamma == 0) return acc_t(1);
  if (gamma == 1) return m;
  if (gamma == 2) return m * m;
  return pow_accurate(m, gamma);
}

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid_alpha_t(acc_t t, acc_t alpha) {
  return alpha * t + (acc_t(1) - alpha) * (acc_t(1) - t);
}

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid_focal_value(const SigmoidTerms<acc_t>& s, acc_t t,
                                                     acc_t alpha, acc_t gamma) {
  acc_t l = s.ce * pow_gamma(s.m, gamma);
  if (alpha >= 0) l = l * sigmoid_alpha_t(t, alpha);
  return l;
}

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid_focal_value(acc_t x, acc_t t, acc_t alpha, acc_t gamma) {
  return sigmoid_focal_value(SigmoidTerms<acc_t>(x, t), t, alpha, gamma);
}

// d loss / dx.
template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid_focal_deriv(const SigmoidTerms<acc_t>& s, acc_t t,
                                                     acc_t alpha, acc_t gamma) {
  // d ce / dx = p - t, as (1 - t) p - t q (p + q = 1): no cancellation of p - 1 for a
  // confident positive, so its gradient keeps its relative accuracy.
  acc_t d = (acc_t(1) - t) * s.p - t * s.q;
  if (gamma != 0) {
    // d/dx [ce * m^gamma] = d m^gamma + ce gamma m^(gamma-1) p q (1 - 2t)
    acc_t dpow = gamma * pow_gamma(s.m, gamma - acc_t(1));
    if (gamma < 1 && !(s.m > 0)) dpow = 0;  // m = 0 only where p q = 0: the product's limit
    // ce (p q) first: finite for every finite x, where ce * dpow overflowed
    d = d * pow_gamma(s.m, gamma) + s.ce * (s.p * s.q) * dpow * (acc_t(1) - acc_t(2) * t);
  }
  if (alpha >= 0) d = d * sigmoid_alpha_t(t, alpha);
  return d;
}

// d loss / dx times the incoming gradient g.
template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid_focal_grad(acc_t x, acc_t t, acc_t g, acc_t alpha,
                                                    acc_t gamma) {
  return sigmoid_focal_deriv(SigmoidTerms<acc_t>(x, t), t, alpha, gamma) * g;
}

// kVec: every pointer in use is 16-byte aligned (checked at launch); the n % kN last
// elements go through the scalar path.
template <typename T, bool kVec, bool kBackward>
__global__ void __launch_bounds__(256)
    sigmoid_focal_kernel(const __grid_constant__ SigmoidFocalParams p) {
  using acc_t = acc_of<T>;
  using V = Vec16<T>;
  constexpr int kN = V::kVec;
  const acc_t alpha = static_cast<acc_t>(p.alpha), gamma = static_cast<acc_t>(p.gamma);
  const T* x = static_cast<const T*>(p.input);
  const T* t = static_cast<const T*>(p.target);
  const T* gl = static_cast<const T*>(p.grad_loss);
  T* out = static_cast<T*>(kBackward ? p.grad_input : p.loss);
  const acc_t g0 = kBackward && p.scalar_grad ? to_acc(gl[0]) : acc_t(0);
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;

  auto one = [&](int64_t i) {
    const acc_t xi = to_acc(x[i]), ti = to_acc(t[i]);
    acc_t r;
    if (kBackward) {
      r = sigmoid_focal_grad(xi, ti, p.scalar_grad ? g0 : to_acc(gl[i]), alpha, gamma);
    } else {
      r = sigmoid_focal_value(xi, ti, alpha, gamma);
    }
    out[i] = from_acc<T>(r);
  };

  int64_t scalar_from = 0;
  if (kVec) {
    const int64_t nvec = p.n / kN;
    for (int64_t v = tid; v < nvec; v += nthreads) {
      const int64_t i = v * kN;
      acc_t xv[kN], tv[kN], gv[kN];
      V::unpack(V::load(x + i), xv);
      V::unpack(V::load(t + i), tv);
      if (kBackward) {
        if (p.scalar_grad) {
#pragma unroll
          for (int j = 0; j < kN; ++j) gv[j] = g0;
        } else {
          V::unpack(V::load(gl + i), gv);
        }
      }
#pragma unroll
      for (int j = 0; j < kN; ++j) {
        xv[j] = kBackward ? sigmoid_focal_grad(xv[j], tv[j], gv[j], alpha, gamma)
                          : sigmoid_focal_value(xv[j], tv[j], alpha, gamma);
      }
      V::store(out + i, V::pack(xv));
    }
    scalar_from = nvec * kN;
  }
  for (int64_t i = scalar_from + tid; i < p.n; i += nthreads) one(i);
}

// The reduced loss (sigmoid_focal_sum[_grad]): each block writes the sum of its threads'
// losses to partial[blockIdx.x]; with kGrad the same pass writes grad = scale * d loss / dx.
// The grid size depends only on n (see the launcher), so the sum is bitwise reproducible.
template <typename T, bool kVec, bool kGrad>
__global__ void __launch_bounds__(256)
    sigmoid_focal_sum_kernel(const __grid_constant__ SigmoidFocalParams p,
                             acc_of<T>* __restrict__ partial) {
  using acc_t = acc_of<T>;
  using V = Vec16<T>;
  constexpr int kN = V::kVec;
  const acc_t alpha = static_cast<acc_t>(p.alpha), gamma = static_cast<acc_t>(p.gamma);
  const acc_t scale = static_cast<acc_t>(p.scale);
  const T* x = static_cast<const T*>(p.input);
  const T* t = static_cast<const T*>(p.target);
  T* grad = static_cast<T*>(p.grad_input);
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  acc_t total = 0;

  int64_t scalar_from = 0;
  if (kVec) {
    const int64_t nvec = p.n / kN;
    for (int64_t v = tid; v < nvec; v += nthreads) {
      const int64_t i = v * kN;
      acc_t xv[kN], tv[kN];
      V::unpack(V::load(x + i), xv);
      V::unpack(V::load(t + i), tv);
#pragma unroll
      for (int j = 0; j < kN; ++j) {
        const SigmoidTerms<acc_t> s(xv[j], tv[j]);
        total += sigmoid_focal_value(s, tv[j], alpha, gamma);
        if (kGrad) xv[j] = sigmoid_focal_deriv(s, tv[j], alpha, gamma) * scale;
      }
      if (kGrad) V::store(grad + i, V::pack(xv));
    }
    scalar_from = nvec * kN;
  }
  for (int64_t i = scalar_from + tid; i < p.n; i += nthreads) {
    const acc_t xi = to_acc(x[i]), ti = to_acc(t[i]);
    const SigmoidTerms<acc_t> s(xi, ti);
    total += sigmoid_focal_value(s, ti, alpha, gamma);
    if (kGrad) grad[i] = from_acc<T>(sigmoid_focal_deriv(s, ti, alpha, gamma) * scale);
  }
  total = BlockGroup{}.sum(total);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// One block: out = scale * (partial[0] + ... + partial[count - 1]), in a fixed order.
template <typename acc_t>
__global__ void __launch_bounds__(256)
    sum_partials_kernel(const acc_t* __restrict__ partial, int count, double scale,
                        acc_t* __restrict__ out) {
  acc_t v = 0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) v += partial[i];
  v = BlockGroup{}.sum(v);
  if (threadIdx.x == 0) *out = static_cast<acc_t>(static_cast<double>(v) * scale);
}

}  // namespace tlf::cuda
