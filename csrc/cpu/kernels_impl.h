// CPU kernel bodies. Included only by kernels_<capability>.cpp, each compiled with that
// capability's flags and CPU_CAPABILITY macro, so every copy lives in its own namespace and
// at::vec picks the matching instruction set. No torch tensor header here: kernels see only
// the torch-free params of kernel_params.h.
//
// Numerics: accumulate in float (double for double inputs). A row is processed in blocks
// of kBlock classes converted into an L1-resident buffer: the forward keeps an online
// (max, sum of exp) pair per row, so logits are read from memory once; the backward reads
// them once more and writes the gradient once.
#ifndef CPU_CAPABILITY
#error "kernels_impl.h is compiled through csrc/cpu/kernels_<capability>.cpp"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace tlf::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

constexpr int64_t kBlock = 2048;  // classes per block; 8 KiB of floats stays in L1

// For the per-vector formulas of elementwise losses: GCC kept SigmoidTerms out of line,
// so each call stored its four results to memory, and reloaded its constants, every vector.
#if defined(__GNUC__)
#define TLF_ALWAYS_INLINE inline __attribute__((always_inline))
#define TLF_ALWAYS_INLINE_LAMBDA __attribute__((always_inline))
#else
#define TLF_ALWAYS_INLINE inline
#define TLF_ALWAYS_INLINE_LAMBDA
#endif

template <typename scalar_t>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// Every row keeps its lse as hi + lo in registers (RowLse, kernel_params.h): a float row
// for its float64 store, a double row so that its loss and fused gradient stay exact far
// from zero, as F's (lse - s formed from one double M + log S lost an ulp of M: loss 0 for
// a row of two logits 1e16). A double row stores hi alone, so the split backward reads
// that one double.
template <typename scalar_t>
constexpr bool kSplitLse = true;

template <typename scalar_t>
constexpr bool kReduced =
    std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>;

// v rounded to scalar_t as this build's vector stores round it, NaN's bits included, so an
// element's bits do not depend on whether a row's vector body or its tail stored it (nor
// on a scaled loss's guessed step, which stores the target element alone). ATen's
// AVX2/AVX-512 conversions write a bfloat16 NaN as 0xffff and a float16 one as
// vcvtps2ph does (its sign and top payload bits kept), where c10's scalar conversions
// write 0x7fc0 and a canonical 0x7e00; F's CPU gradients are the vector ones.
template <typename scalar_t, typename acc_t>
inline scalar_t narrow(acc_t v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (std::isnan(v)) return c10::BFloat16(0xffff, c10::BFloat16::from_bits());
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return c10::Half(static_cast<unsigned short>(_cvtss_sh(
                         static_cast<float>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)),
                     c10::Half::from_bits());
  }
#endif
  return static_cast<scalar_t>(v);
}

template <typename T>
inline Vectorized<T> vmax(const Vectorized<T>& a, const Vectorized<T>& b) {
  return at::vec::maximum(a, b);  // propagates NaN, so a NaN logit poisons its row
}

template <typename T>
inline Vectorized<T> vadd(const Vectorized<T>& a, const Vectorized<T>& b) {
  return a + b;
}

// ---- 2^y for float on AVX2 and AVX-512 ------------------------------------------------------
// 2^y = 2^n 2^f with n = round(y), f in [-1/2, 1/2] and a degree-6 polynomial for 2^f
// (about 1e-7 relative in float, against 4 ulp for ATen's exp_u20): about half the
// instructions of exp_u20 and its NaN fix-up. A NaN stays NaN, -inf gives exactly 0 and
// +inf gives +inf.
constexpr float kLog2e = 0x1.715476p+0f;
// Minimax coefficients (relative error) of 2^f on [-1/2, 1/2], constant term first.
constexpr float kExp2Poly[7] = {0x1p+0f,        0x1.62e43p-1f,   0x1.ebfbdap-3f, 0x1.c6aed4p-5f,
                                0x1.3b2dbcp-7f, 0x1.5f456ap-10f, 0x1.41d334p-13f};
constexpr float kLn2Hi = 0x1.62e43p-1f;    // log(2) rounded to float
constexpr float kLn2Lo = -0x1.05c61p-29f;  // log(2) - kLn2Hi

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
TLF_ALWAYS_INLINE Vectorized<float> exp2_poly(const Vectorized<float>& f) {
  Vectorized<float> p(kExp2Poly[6]);
  for (int k = 5; k >= 0; --k) p = at::vec::fmadd(p, f, Vectorized<float>(kExp2Poly[k]));
  return p;
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
inline Vectorized<float> vexp2(const Vectorized<float>& yv) {
  // reduce gives f = y - round(y) exactly, and 0 for y = +-inf, so n = y - f is +-inf
  // there and scalef makes inf or 0; a NaN stays NaN. No clamps needed.
  const __m512 f = _mm512_reduce_ps(yv, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 n = _mm512_sub_ps(yv, f);
  return _mm512_scalef_ps(exp2_poly(f), n);
}

TLF_ALWAYS_INLINE Vectorized<float> vexp_exact(const Vectorized<float>& v) {
  // Beyond [-104, 89] exp is 0 or inf in float; the clamp keeps n finite (r is never
  // inf - inf) and keeps a NaN, as max and min return their second operand for NaN.
  const __m512 x =
      _mm512_min_ps(_mm512_set1_ps(89.f), _mm512_max_ps(_mm512_set1_ps(-104.f), v));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  return _mm512_scalef_ps(exp2_poly(_mm512_mul_ps(r, _mm512_set1_ps(kLog2e))), n);
}
#elif defined(CPU_CAPABILITY_AVX2)
// 2^n for an integral n in [-127, 128], from its exponent bits: 0 for -127, inf for 128.
inline __m256 pow2i(__m256 n) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}

inline Vectorized<float> vexp2(const Vectorized<float>& yv) {
  // y clamped to [-127, 128]; max and min return their second operand when either is
  // NaN, so a NaN stays NaN. 2^n is built from its exponent bits: 0 for n = -127, inf for
  // n = 128. A NaN y makes p NaN, whatever n's bits.
  __m256 y = _mm256_max_ps(_mm256_set1_ps(-127.f), yv);
  y = _mm256_min_ps(_mm256_set1_ps(128.f), y);
  const __m256 n = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(y, n);
  return _mm256_mul_ps(exp2_poly(f), pow2i(n));
}

TLF_ALWAYS_INLINE Vectorized<float> vexp_exact(const Vectorized<float>& v) {
  // v clamped to [-88, 89] (NaN kept, as in vexp2), so n lies in [-127, 128] for pow2i;
  // exp(v) below -88 is subnormal and comes out 0.
  __m256 x = _mm256_max_ps(_mm256_set1_ps(-88.f), v);
  x = _mm256_min_ps(_mm256_set1_ps(89.f), x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  return _mm256_mul_ps(exp2_poly(_mm256_mul_ps(r, _mm256_set1_ps(kLog2e))), pow2i(n));
}
#endif

// exp for probabilities and sums of exponentials; callers pass v - shift.
// float on AVX2 and AVX-512: 2^(v L) by vexp2, with L = log2(e) rounded to float (its
// rounding costs a relative error of about |v| * 3e-8, nothing for the terms that count).
// v = 0 gives exactly 1, so a one-class row has loss 0 and gradient 0,
// as in PyTorch. float elsewhere: ATen's inline polynomial exp_u20 (within 4 ulp on
// [-87, 0], the only range used here, and free of a library call); it maps NaN to inf, so
// NaN is put back (a NaN logit must poison its row). double: Sleef's exp.
template <typename acc_t>
inline Vectorized<acc_t> vexp(const Vectorized<acc_t>& v) {
  if constexpr (std::is_same_v<acc_t, float>) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    return vexp2(v * Vectorized<float>(kLog2e));
#else
    return Vectorized<acc_t>::blendv(v.exp_u20(), v, v.isnan());
#endif
  } else {
    return v.exp();
  }
}

// exp of an elementwise value, which is the loss itself where the logit is confident
// (sigmoid focal: exp(-|x|)), so vexp's relative error of |v| * 3e-8 would show.
// float on AVX2 and AVX-512: vexp_exact, which reduces the argument without that error
// (Cody-Waite: r = v - n log(2), log(2) in two parts; exp(v) = 2^n 2^(r L)), about 1e-7
// relative for any v. Elsewhere ATen's exp.
template <typename acc_t>
TLF_ALWAYS_INLINE Vectorized<acc_t> vexp_elementwise(const Vectorized<acc_t>& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) return vexp_exact(v);
#endif
  return v.exp();
}

// Loops that stream logits from memory prefetch kPrefetchBytes ahead of the `bytes` they
// are about to read, a cache line at a time: the hardware prefetchers alone left a 2-thread
// bf16 forward at 11 GB/s of a 27 GB/s copy bandwidth (Xeon VM); with this it took 18% less
// time, and the in-place bf16 backward 17% less. Prefetches never fault, so running past the
// end of a row or a tensor is harmless.
constexpr int64_t kPrefetchBytes = 4096;

inline void prefetch_ahead(const void* p, int64_t bytes) {
#if defined(__GNUC__)
  const char* c = static_cast<const char*>(p) + kPrefetchBytes;
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b, 0, 3);
#else
  (void)p;
  (void)bytes;
#endif
}

// Two acc_t vectors from 2W contiguous elements, and back (rounding once): a bf16/fp16
// vector holds exactly two float vectors' worth.
template <typename scalar_t, typename acc_t>
inline void load_pair(const scalar_t* src, Vectorized<acc_t>& lo, Vectorized<acc_t>& hi) {
  if constexpr (kReduced<scalar_t>) {
    std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(src));
  } else {
    lo = Vectorized<acc_t>::loadu(src);
    hi = Vectorized<acc_t>::loadu(src + Vectorized<acc_t>::size());
  }
}

template <typename scalar_t, typename acc_t>
inline void store_pair(scalar_t* dst, const Vectorized<acc_t>& lo, const Vectorized<acc_t>& hi) {
  if constexpr (kReduced<scalar_t>) {
    at::vec::convert_from_float<scalar_t>(lo, hi).store(dst);
  } else {
    lo.store(dst);
    hi.store(dst + Vectorized<acc_t>::size());
  }
}

// The first n (< 2W) elements of a pair, rounded as store_pair rounds them.
template <typename scalar_t, typename acc_t>
inline void store_pair_head(scalar_t* dst, const Vectorized<acc_t>& lo,
                            const Vectorized<acc_t>& hi, int64_t n) {
  constexpr int64_t W = Vectorized<acc_t>::size();
  if constexpr (kReduced<scalar_t>) {
    at::vec::convert_from_float<scalar_t>(lo, hi).store(dst, n);
  } else {
    lo.store(dst, std::min(n, W));
    if (n > W) hi.store(dst + W, n - W);
  }
}

// Non-temporal stores, for gradients too large for the caches (stream_threshold_bytes):
// a plain store first reads the line it writes (a read for ownership), which was a third
// of a fused bf16 forward's memory traffic. stream_pair stores as store_pair does, at a
// dst aligned to kStreamAlign; a row's streaming stores end with stream_fence, before
// another thread may read what they wrote.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool kStreamStores = true;
#else
constexpr bool kStreamStores = false;
#endif
constexpr int64_t kStreamAlign = sizeof(Vectorized<float>);

template <typename scalar_t>
inline void stream_pair(scalar_t* dst, const Vectorized<float>& lo, const Vectorized<float>& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (kReduced<scalar_t>) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst),
                        at::vec::convert_from_float<scalar_t>(lo, hi));
  } else {
    _mm512_stream_ps(dst, lo);
    _mm512_stream_ps(dst + Vectorized<float>::size(), hi);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (kReduced<scalar_t>) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst),
                        at::vec::convert_from_float<scalar_t>(lo, hi));
  } else {
    _mm256_stream_ps(dst, lo);
    _mm256_stream_ps(dst + Vectorized<float>::size(), hi);
  }
#else
  store_pair(dst, lo, hi);
#endif
}

// store_pair, or stream_pair when `stream` (a flag fixed for the row: a predicted branch).
template <typename scalar_t>
inline void put_pair(bool stream, scalar_t* dst, const Vectorized<float>& lo,
                     const Vectorized<float>& hi) {
  if (stream) {
    stream_pair(dst, lo, hi);
  } else {
    store_pair(dst, lo, hi);
  }
}

// A fused forward's post_scale f (SoftmaxLossParams): a gradient value v becomes what the
// backward's rescale (scale_row) would make of it once stored, round(round(v) * f), with
// v rounded to the gradient's dtype and widened back first (nothing to do for float and
// double gradients); the store rounds the product. on: f != 1.
template <typename scalar_t, typename acc_t>
struct PostScale {
  acc_t f;
  bool on;

  explicit PostScale(double factor) : f(static_cast<acc_t>(factor)), on(factor != 1.0) {}

  Vectorized<acc_t> operator()(Vectorized<acc_t> v) const {
    if constexpr (kReduced<scalar_t>) {
      const auto [lo, hi] = at::vec::convert_to_float<scalar_t>(
          at::vec::convert_from_float<scalar_t>(v, v));
      (void)hi;
      return lo * Vectorized<acc_t>(f);
    } else {
      return v * Vectorized<acc_t>(f);
    }
  }

  acc_t operator()(acc_t v) const {
    return static_cast<acc_t>(narrow<scalar_t>(v)) * f;
  }

  // put_pair of the two vectors, post-scaled when on.
  void put(bool stream, scalar_t* dst, Vectorized<float> lo, Vectorized<float> hi) const {
    if (on) {
      if constexpr (kReduced<scalar_t>) {
        std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(
            at::vec::convert_from_float<scalar_t>(lo, hi));
      }
      lo = lo * Vectorized<float>(f);
      hi = hi * Vectorized<float>(f);
    }
    put_pair(stream, dst, lo, hi);
  }

  // One element's store, post-scaled when on.
  scalar_t scalar(acc_t v) const { return narrow<scalar_t>(on ? (*this)(v) : v); }

  // The first n (< 2W) elements of a pair, as put (without streaming) and scalar store them.
  void put_head(scalar_t* dst, Vectorized<float> lo, Vectorized<float> hi, int64_t n) const {
    if (on) {
      lo = (*this)(lo);
      hi = (*this)(hi);
    }
    store_pair_head(dst, lo, hi, n);
  }
};

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Whether this call writes its gradient with streaming stores: the logits and the gradient
// together outgrow the last-level cache, and the gradient is not written over the logits
// (an in-place row's lines are in the cache already, just read).
template <typename scalar_t>
inline bool stream_gradient(const SoftmaxLossParams& p,
                            int64_t threshold_bytes = stream_threshold_bytes()) {
  return kStreamStores && std::is_same_v<typename AccOf<scalar_t>::type, float> &&
         p.grad_input != nullptr && p.grad_input != p.input &&
         2 * p.in.rows() * p.in.C * static_cast<int64_t>(sizeof(scalar_t)) > threshold_bytes;
}

// Whether a gradient row starting at g takes the streaming stores (every pair after an
// aligned start is aligned: blocks and pairs are whole multiples of kStreamAlign).
template <typename scalar_t>
inline bool stream_row(bool stream, const scalar_t* g) {
  return stream && reinterpret_cast<uintptr_t>(g) % kStreamAlign == 0;
}

// n elements at src (element stride `stride`) -> contiguous acc_t.
template <typename scalar_t, typename acc_t>
inline void load_block(const scalar_t* src, int64_t stride, int64_t n, acc_t* dst) {
  if (stride != 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i * stride]);
  } else if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(dst, src, n * sizeof(acc_t));
  } else if constexpr (kReduced<scalar_t>) {
    using bVec = Vectorized<scalar_t>;
    using fVec = Vectorized<float>;
    int64_t i = 0;
    for (; i + bVec::size() <= n; i += bVec::size()) {
      prefetch_ahead(src + i, bVec::size() * sizeof(scalar_t));
      fVec lo, hi;
      load_pair(src + i, lo, hi);
      lo.store(dst + i);
      hi.store(dst + i + fVec::size());
    }
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
  }
}

// Contiguous acc_t -> n elements at dst (element stride `stride`), rounding once.
template <typename scalar_t, typename acc_t>
inline void store_block(const acc_t* src, int64_t n, scalar_t* dst, int64_t stride) {
  if (stride != 1) {
    for (int64_t i = 0; i < n; ++i) dst[i * stride] = narrow<scalar_t>(src[i]);
  } else if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(dst, src, n * sizeof(acc_t));
  } else if constexpr (kReduced<scalar_t>) {
    using bVec = Vectorized<scalar_t>;
    using fVec = Vectorized<float>;
    int64_t i = 0;
    for (; i + bVec::size() <= n; i += bVec::size()) {
      store_pair(dst + i, fVec::loadu(src + i), fVec::loadu(src + i + fVec::size()));
    }
    for (; i < n; ++i) dst[i] = narrow<scalar_t>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

// n contiguous floats -> dst as store_block(src, n, dst, 1) does, whole pairs by streaming
// stores (dst aligned as stream_row asks).
template <typename scalar_t>
inline void stream_block(const float* src, int64_t n, scalar_t* dst) {
  constexpr int64_t W = Vectorized<float>::size();
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    stream_pair(dst + i, Vectorized<float>::loadu(src + i), Vectorized<float>::loadu(src + i + W));
  }
  store_block(src + i, n - i, dst + i, 1);
}

template <typename scalar_t>
inline void zero_row(scalar_t* dst, int64_t n, int64_t stride) {
  if (stride == 1) {
    std::memset(static_cast<void*>(dst), 0, n * sizeof(scalar_t));  // +0.0 in every format
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i * stride] = scalar_t(0);
  }
}

// The logit transform s = cap * tanh(scale * x / cap) (softcap) or s = scale * x, and its
// derivative ds/dx written in terms of s.
template <typename acc_t>
struct Transform {
  using V = Vectorized<acc_t>;
  acc_t scale, cap, k;
  bool scaled, capped;

  Transform(double logit_scale, double softcap)
      : scale(static_cast<acc_t>(logit_scale)),
        cap(static_cast<acc_t>(softcap)),
        k(softcap > 0 ? static_cast<acc_t>(logit_scale / softcap) : acc_t(0)),
        scaled(logit_scale != 1.0),
        capped(softcap > 0) {}

  bool active() const { return scaled || capped; }

  void apply(acc_t* buf, int64_t n) const {
    if (capped) {
      const V vk(k), vc(cap);
      at::vec::map([&](V x) { return (x * vk).tanh() * vc; }, buf, buf, n);
    } else if (scaled) {
      const V vs(scale);
      at::vec::map([&](V x) { return x * vs; }, buf, buf, n);
    }
  }

  V deriv(const V& s) const {
    if (capped) {
      const V u = s / V(cap);
      return V(scale) * (V(1) - u * u);
    }
    return V(scale);
  }

  acc_t deriv1(acc_t s) const {
    if (capped) {
      const acc_t u = s / cap;
      return scale * (acc_t(1) - u * u);
    }
    return scale;
  }
};

// NaN-propagating scalar max, matching vmax.
template <typename T>
inline T smax(T a, T b) {
  return (std::isnan(a) || a >= b) ? a : b;
}

// Max of n contiguous values. Four independent accumulators keep the vector max unit
// busy instead of waiting on one dependency chain. kStream: s is in memory, not in an L1
// buffer, so the loop prefetches.
template <bool kStream = false, typename acc_t>
inline acc_t block_max(const acc_t* s, int64_t n) {
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  const V lowest(-std::numeric_limits<acc_t>::infinity());
  V m0 = lowest, m1 = lowest, m2 = lowest, m3 = lowest;
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    if constexpr (kStream) prefetch_ahead(s + i, 4 * W * sizeof(acc_t));
    m0 = vmax(m0, V::loadu(s + i));
    m1 = vmax(m1, V::loadu(s + i + W));
    m2 = vmax(m2, V::loadu(s + i + 2 * W));
    m3 = vmax(m3, V::loadu(s + i + 3 * W));
  }
  for (; i + W <= n; i += W) m0 = vmax(m0, V::loadu(s + i));
  acc_t m = at::vec::vec_reduce_all<acc_t>(vmax<acc_t>, vmax(vmax(m0, m1), vmax(m2, m3)));
  for (; i < n; ++i) m = smax(m, s[i]);
  return m;
}

// sum_i exp(s_i - M) over n contiguous values, four accumulators; with kStore, each term
// is also stored in e. Both sum in one order, so a forward gives bitwise the same lse
// whether it keeps the terms for a gradient or not (reentrant checkpointing runs the
// forward without a gradient, then with one).
template <bool kStore, typename acc_t>
inline acc_t block_exp_terms(const acc_t* s, int64_t n, acc_t M, acc_t* e) {
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  const V vM(M);
  auto term = [&](int64_t i) {
    const V t = vexp(V::loadu(s + i) - vM);
    if constexpr (kStore) t.store(e + i);
    return t;
  };
  V a0(0), a1(0), a2(0), a3(0);
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    a0 = a0 + term(i);
    a1 = a1 + term(i + W);
    a2 = a2 + term(i + 2 * W);
    a3 = a3 + term(i + 3 * W);
  }
  for (; i + W <= n; i += W) a0 = a0 + term(i);
  if (i < n) {  // a partial vector: lanes past n stay zero
    const V t = V::set(V(0), vexp(V::loadu(s + i, n - i) - vM), n - i);
    if constexpr (kStore) t.store(e + i, n - i);
    a1 = a1 + t;
  }
  return at::vec::vec_reduce_all<acc_t>(vadd<acc_t>, (a0 + a1) + (a2 + a3));
}

template <typename acc_t>
inline acc_t block_expsum(const acc_t* s, int64_t n, acc_t M) {
  return block_exp_terms<false>(s, n, M, static_cast<acc_t*>(nullptr));
}

// Converts n contiguous bf16/fp16 logits to float in buf, applying a plain logit scale,
// and returns their max: one pass instead of convert, scale and max passes.
template <typename scalar_t>
inline float convert_block_max(const scalar_t* x, int64_t n, float scale, bool scaled,
                               float* buf) {
  using V = Vectorized<float>;
  constexpr int64_t W = V::size();
  const V lowest(-std::numeric_limits<float>::infinity()), vs(scale);
  V m0 = lowest, m1 = lowest;
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    prefetch_ahead(x + i, 2 * W * sizeof(scalar_t));
    V lo, hi;
    load_pair(x + i, lo, hi);
    if (scaled) {
      lo = lo * vs;
      hi = hi * vs;
    }
    lo.store(buf + i);
    hi.store(buf + i + W);
    m0 = vmax(m0, lo);
    m1 = vmax(m1, hi);
  }
  float m = at::vec::vec_reduce_all<float>(vmax<float>, vmax(m0, m1));
  for (; i < n; ++i) {
    buf[i] = scaled ? static_cast<float>(x[i]) * scale : static_cast<float>(x[i]);
    m = smax(m, buf[i]);
  }
  return m;
}

// The transformed logits of classes [c0, c0 + n) of a row as contiguous acc_t, and their
// max. Read in place when the row already is contiguous float/double with no transform;
// otherwise converted (and transformed) into buf.
template <typename scalar_t, typename acc_t>
inline const acc_t* logits_block(const scalar_t* x, int64_t sc, int64_t c0, int64_t n,
                                 const Transform<acc_t>& tf, acc_t* buf,
                                 acc_t* max_out = nullptr) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (sc == 1 && !tf.active()) {
      if (max_out != nullptr) *max_out = block_max<true>(x + c0, n);
      return x + c0;
    }
  }
  if constexpr (kReduced<scalar_t>) {
    if (sc == 1 && !tf.capped && max_out != nullptr) {
      *max_out = convert_block_max(x + c0, n, tf.scale, tf.scaled, buf);
      return buf;
    }
  }
  load_block(x + c0 * sc, sc, n, buf);
  tf.apply(buf, n);
  if (max_out != nullptr) *max_out = block_max(buf, n);
  return buf;
}

// ---- the backward's rescale of a fused gradient's rows -----------------------------------

template <typename scalar_t, typename acc_t>
inline void scale_row(scalar_t* row, int64_t C, acc_t f) {
  using aVec = Vectorized<acc_t>;
  constexpr int64_t W = aVec::size();
  const aVec fv(f);
  int64_t c = 0;
  for (; c + 2 * W <= C; c += 2 * W) {
    aVec lo, hi;
    load_pair(row + c, lo, hi);
    store_pair(row + c, lo * fv, hi * fv);
  }
  for (; c < C; ++c) row[c] = narrow<scalar_t>(static_cast<acc_t>(row[c]) * f);
}

// Row r of a gradient laid out as l (D == 1) times f; untouched where f is 1.
template <typename scalar_t, typename acc_t>
inline void scale_row_of(scalar_t* grad, const RowLayout& l, int64_t r, acc_t f) {
  if (f == acc_t(1)) return;
  scalar_t* row = grad + r * l.sb;
  if (l.sc == 1) {
    scale_row(row, l.C, f);
  } else {
    for (int64_t c = 0; c < l.C; ++c) {
      row[c * l.sc] = narrow<scalar_t>(static_cast<acc_t>(row[c * l.sc]) * f);
    }
  }
}

template <typename scalar_t, typename acc_t = typename AccOf<scalar_t>::type>
inline void scale_rows_range(scalar_t* grad, const RowLayout& l, const acc_t* factor,
                             int64_t begin, int64_t end) {
  auto scale1 = [](scalar_t* e, acc_t f) {
    *e = narrow<scalar_t>(static_cast<acc_t>(*e) * f);
  };
  if (l.D == 1) {
    for (int64_t r = begin; r < end; ++r) scale_row_of<scalar_t, acc_t>(grad, l, r, factor[r]);
    return;
  }
  // (B, C, D): a plane at a time, d innermost, the order of a contiguous layout's memory.
  for (int64_t b = begin; b < end; ++b) {
    const acc_t* fb = factor + b * l.D;
    for (int64_t c = 0; c < l.C; ++c) {
      scalar_t* e = grad + b * l.sb + c * l.sc;
      for (int64_t d = 0; d < l.D; ++d) {
        if (fb[d] != acc_t(1)) scale1(e + d * l.sd, fb[d]);
      }
    }
  }
}

template <typename acc_t>
struct RowBuffers {
  alignas(64) acc_t s[kBlock];  // transformed logits of the current block
  alignas(64) acc_t t[kBlock];  // probability-target block
  alignas(64) acc_t out[kBlock];
  bool stream = false;  // gradient rows by streaming stores (stream_gradient)
};

// A row's max M and sum S of exp(s - M), before the log that makes them its lse: the
// chunked loop (kRowChunk) runs this pass over several rows before their logs.
template <typename acc_t>
struct RowSums {
  acc_t M, S;
};

template <typename scalar_t, typename acc_t>
inline RowLse<acc_t> lse_of_sums(const RowSums<acc_t>& r) {
  return lse_of<kSplitLse<scalar_t>>(r.M, std::log(r.S));
}

// Pass over a row: online log-sum-exp. Captures the transformed logit at `target` (when
// 0 <= target < C) from the same buffer the sum used, so forward and backward agree.
template <typename scalar_t, typename acc_t>
inline RowSums<acc_t> row_sums(const scalar_t* x, int64_t C, int64_t sc,
                               const Transform<acc_t>& tf, int64_t target, acc_t* s_target,
                               acc_t* buf) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  acc_t M = kNegInf, S = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    const int64_t n = std::min(kBlock, C - c0);
    acc_t m;
    const acc_t* s = logits_block(x, sc, c0, n, tf, buf, &m);
    if (target >= c0 && target < c0 + n) *s_target = s[target - c0];
    if (!(m <= M)) {  // a larger maximum, or NaN (which then poisons S)
      S = S * std::exp(M - m);  // exp(-inf) = 0 when nothing finite was seen yet
      M = m;
    }
    if (M == kNegInf) continue;  // all -inf so far: each term is exp(-inf) = 0
    S += block_expsum(s, n, M);
  }
  return {M, S};
}

template <typename scalar_t, typename acc_t>
inline RowLse<acc_t> row_lse(const scalar_t* x, int64_t C, int64_t sc,
                             const Transform<acc_t>& tf, int64_t target, acc_t* s_target,
                             acc_t* buf) {
  return lse_of_sums<scalar_t>(row_sums<scalar_t, acc_t>(x, C, sc, tf, target, s_target, buf));
}

// Loads a probability-target block and turns it into t'_c * w_c, where
// t' = (1 - eps) t + eps / C (PyTorch's smoothed probability target).
template <typename scalar_t, typename acc_t>
inline void load_prob_target(const SoftmaxLossParams& p, int64_t r, int64_t c0, int64_t n,
                             acc_t* dst) {
  const RowLayout& tl = p.prob_target_layout;
  const int64_t off = tl.row_offset(r) + c0 * tl.sc;
  if (p.target_is_float32 && !std::is_same_v<scalar_t, float>) {
    load_block(static_cast<const float*>(p.prob_target_ptr) + off, tl.sc, n, dst);
  } else {
    load_block(static_cast<const scalar_t*>(p.prob_target_ptr) + off, tl.sc, n, dst);
  }
  using V = Vectorized<acc_t>;
  const acc_t eps = static_cast<acc_t>(p.label_smoothing);
  if (eps > 0) {
    const V keep(acc_t(1) - eps), add(eps / static_cast<acc_t>(p.in.C));
    at::vec::map([&](V t) { return t * keep + add; }, dst, dst, n);
  }
  if (p.weight != nullptr) {
    at::vec::map2([](V t, V w) { return t * w; }, dst, dst,
                  static_cast<const acc_t*>(p.weight) + c0, n);
  }
}

// Second pass for label smoothing and probability targets:
// sum_c q_c * (lse - s_c), with q_c = w_c (smoothing) or t'_c * w_c (probability target).
template <typename scalar_t, typename acc_t>
inline acc_t row_weighted_nll_sum(const SoftmaxLossParams& p, int64_t r, const scalar_t* x,
                                  const Transform<acc_t>& tf, const RowLse<acc_t>& lse,
                                  RowBuffers<acc_t>& b) {
  using V = Vectorized<acc_t>;
  const int64_t C = p.in.C, sc = p.in.sc;
  const auto* w = static_cast<const acc_t*>(p.weight);
  const V vhi(lse.hi), vneg_lo(acc_t(0) - lse.lo);
  auto nll = [&](V sv) { return (vhi - sv) - vneg_lo; };  // lse - s, as RowLse::minus
  acc_t total = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    const int64_t n = std::min(kBlock, C - c0);
    const acc_t* s = logits_block(x, sc, c0, n, tf, b.s);
    if (p.prob_target) {
      load_prob_target<scalar_t>(p, r, c0, n, b.t);
      total += at::vec::map2_reduce_all<acc_t>([&](V sv, V q) { return q * nll(sv); },
                                               vadd<acc_t>, s, b.t, n);
    } else if (w != nullptr) {
      total += at::vec::map2_reduce_all<acc_t>([&](V sv, V q) { return q * nll(sv); },
                                               vadd<acc_t>, s, w + c0, n);
    } else {
      total += at::vec::map_reduce_all<acc_t>(nll, vadd<acc_t>, s, n);
    }
  }
  return total;
}

// Focal pieces from log p_t: loss = -alpha_t (1-p_t)^gamma log p_t, and the factor F with
// d loss / d s_c = F * (p_c - [c == t]). Written so that gamma = 0 gives exactly the
// cross-entropy values (F = alpha_t) and saturated logits give finite values. Each is
// computed only where asked for, and (1-p_t)^gamma once, by a product for gamma 1 and 2:
// this scalar math per row was about a tenth of a 1000-class focal forward+backward.
template <typename acc_t>
struct Focal {
  acc_t log_pt, alpha_t, gamma;
  // p_t, 1 - p_t without cancellation, and q^gamma (gamma = 0: only q_pow = 1 is used)
  acc_t pt = 0, q = 0, q_pow = 1;
  Focal(acc_t log_pt_, acc_t alpha_t_, acc_t gamma_)
      : log_pt(log_pt_), alpha_t(alpha_t_), gamma(gamma_) {
    if (gamma == 0) return;
    pt = std::exp(log_pt);
    // Below p_t = 1/2, 1 - p_t is within an ulp as expm1 is (p_t's error is at most half
    // an ulp of q >= 1/2, and the subtraction rounds once) and reuses exp(log_pt), which
    // factor() needs anyway: glibc's expm1f takes about three times expf's latency, on
    // each row's chain before its gradient pass (short rows: a tenth of the time).
    q = log_pt < acc_t(-0.6931471805599453) ? acc_t(1) - pt : -std::expm1(log_pt);
    q_pow = gamma == 1 ? q : gamma == 2 ? q * q : std::pow(q, gamma);
  }
  // 0 - log_pt rather than -log_pt: +0.0 where p_t = 1, as cross-entropy's lse - s_t.
  acc_t loss() const { return (alpha_t * q_pow) * (acc_t(0) - log_pt); }
  acc_t factor() const {
    if (gamma == 0) return alpha_t;
    // log(1 - q) / q -> -1 as q -> 0; p_t * log p_t -> 0 as p_t -> 0.
    const acc_t ratio = q > 0 ? log_pt / q : acc_t(-1);
    const acc_t corr = pt > 0 ? gamma * pt * ratio : acc_t(0);
    return alpha_t * q_pow * (acc_t(1) - corr);
  }
};

template <typename acc_t>
inline acc_t focal_alpha(const SoftmaxLossParams& p, int64_t t) {
  const acc_t a = static_cast<acc_t>(p.alpha_scale);
  return p.alpha != nullptr ? a * static_cast<const acc_t*>(p.alpha)[t] : a;
}

// The loss of a counted class-index row from its lse and its target's (transformed) logit
// s_t; smooth_sum() gives sum_c q_c (lse - s_c) (row_weighted_nll_sum's), called only
// with label smoothing. The row and column kernels share it.
template <typename acc_t, typename SmoothSum>
inline acc_t index_row_loss(const SoftmaxLossParams& p, int64_t t, const RowLse<acc_t>& L,
                            acc_t s_t, SmoothSum&& smooth_sum) {
  if (p.focal) {
    return Focal<acc_t>(L.log_p(s_t), focal_alpha<acc_t>(p, t), static_cast<acc_t>(p.gamma))
        .loss();
  }
  const auto* w = static_cast<const acc_t*>(p.weight);
  const acc_t eps = static_cast<acc_t>(p.label_smoothing);
  const acc_t z = static_cast<acc_t>(p.z_loss);
  const acc_t nll = L.minus(s_t);
  acc_t l = (acc_t(1) - eps) * (w != nullptr ? w[t] * nll : nll);
  if (eps > 0) l += eps / static_cast<acc_t>(p.in.C) * smooth_sum();
  if (z != 0) l += z * L.hi * L.hi;
  return l;
}

// The target's gradient element, A exp(s_t - lse) - D q_t - B, times ds/dx: by std::exp,
// in the row and column kernels alike (the same bits in the fused and split passes).
template <typename acc_t>
inline acc_t target_grad(acc_t A, acc_t D, acc_t B, acc_t qt, acc_t st, acc_t lse,
                         const Transform<acc_t>& tf) {
  const acc_t gt = A * std::exp(st - lse) - D * qt - B;
  return tf.active() ? gt * tf.deriv1(st) : gt;
}

// row_grad for contiguous bf16/fp16 rows without soft-capping or probability targets (the
// LM-training case). Each pair of vectors is converted where it is computed; the loop
// prefetches kPrefetchBytes ahead, which keeps enough loads in flight behind the
// exponential's long dependency chains. (Before the prefetch, converting each block into
// an L1 buffer first, by a load-only loop, was 1.5x faster on a Xeon; with it, that
// staging pass made the in-place bf16 backward about 25% slower on the AMD EPYC, 2 threads:
// its buffer's loads run twice as fast through the addresses as the row's stores, which
// a 4K-aliasing guess would explain.) `stream`: this row streams (stream_row).
template <typename scalar_t>
inline void row_grad_reduced(const scalar_t* x, scalar_t* g, int64_t C,
                             const Transform<float>& tf, float lse, float A, float D,
                             const float* q, bool uniform_q, float B, int64_t target,
                             bool stream, const PostScale<scalar_t, float>& post) {
  using V = Vectorized<float>;
  constexpr int64_t W = V::size();
  // Read before the row is written: g may be x itself (inplace_backward).
  const float x_target = target >= 0 ? static_cast<float>(x[target]) : 0.f;
  const V vA(A), vD(D), vlse(lse), vs(tf.scale);
  auto grad = [&](V sv, int64_t at) {
    if (tf.scaled) sv = sv * vs;
    V gv = vA * vexp(sv - vlse);
    if (q != nullptr) {
      gv = gv - vD * V::loadu(q + at);
    } else if (uniform_q) {
      gv = gv - vD;
    }
    return tf.scaled ? gv * vs : gv;
  };
  auto scalar_grad = [&](float xc, int64_t c) {
    const float sv = tf.scaled ? xc * tf.scale : xc;
    const float qc = q != nullptr ? q[c] : (uniform_q ? 1.f : 0.f);
    float gc = A * std::exp(sv - lse) - D * qc - (c == target ? B : 0.f);
    return tf.scaled ? gc * tf.scale : gc;
  };
  int64_t c = 0;
  for (; c + 2 * W <= C; c += 2 * W) {
    prefetch_ahead(x + c, 2 * W * sizeof(scalar_t));
    V lo, hi;
    load_pair(x + c, lo, hi);  // (read before g's pair is written: g may be x)
    post.put(stream, g + c, grad(lo, c), grad(hi, c + W));
  }
  for (; c < C; ++c) g[c] = post.scalar(scalar_grad(static_cast<float>(x[c]), c));
  if (stream) stream_fence();
  if (target >= 0) g[target] = post.scalar(scalar_grad(x_target, target));
}

// Gradient of one row: grad_c = ds/dx_c * (A p_c - D q_c) - [c == t] ds/dx_t * B, where q_c is
// w_c (label smoothing) or t'_c w_c (probability target). The target element is
// recomputed in acc precision so p_t - 1 is formed before rounding.
template <typename scalar_t, typename acc_t>
inline void row_grad(const SoftmaxLossParams& p, int64_t r, const scalar_t* x, scalar_t* g,
                     const Transform<acc_t>& tf, acc_t lse, acc_t A, acc_t D, acc_t B,
                     int64_t target, RowBuffers<acc_t>& b) {
  using V = Vectorized<acc_t>;
  const int64_t C = p.in.C, sc = p.in.sc, gsc = p.grad_layout.sc;
  const auto* w = static_cast<const acc_t*>(p.weight);
  const V vA(A), vD(D), vlse(lse);
  const bool with_q = D != 0 && (p.prob_target || w != nullptr);
  const bool uniform_q = D != 0 && !with_q;  // smoothing without weights: q_c = 1
  const bool stream = gsc == 1 && stream_row(b.stream, g);
  const PostScale<scalar_t, acc_t> post(p.post_scale);
  if constexpr (kReduced<scalar_t>) {
    if (sc == 1 && gsc == 1 && !tf.capped && !p.prob_target) {
      row_grad_reduced(x, g, C, tf, lse, A, D, with_q ? w : nullptr, uniform_q, B, target,
                       stream, post);
      return;
    }
  }
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    const int64_t n = std::min(kBlock, C - c0);
    const acc_t* s = logits_block(x, sc, c0, n, tf, b.s);
    const acc_t* q = nullptr;
    if (with_q) {
      if (p.prob_target) {
        load_prob_target<scalar_t>(p, r, c0, n, b.t);
        q = b.t;
      } else {
        q = w + c0;
      }
    }
    // Read before the block is written: g may be x itself (inplace_backward).
    const bool has_target = target >= c0 && target < c0 + n;
    const acc_t st = has_target ? s[target - c0] : acc_t(0);
    // Contiguous float/double gradients are computed straight into place, or streamed
    // from the buffer.
    acc_t* out = b.out;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (gsc == 1 && !stream) out = g + c0;
    }
    if (q != nullptr) {
      at::vec::map2(
          [&](V sv, V qv) {
            V gv = vA * vexp<acc_t>(sv - vlse) - vD * qv;
            return tf.active() ? gv * tf.deriv(sv) : gv;
          },
          out, s, q, n);
    } else {
      at::vec::map(
          [&](V sv) {
            V gv = vA * vexp<acc_t>(sv - vlse);
            if (uniform_q) gv = gv - vD;
            return tf.active() ? gv * tf.deriv(sv) : gv;
          },
          out, s, n);
    }
    if (has_target) {
      const int64_t i = target - c0;
      const acc_t qt = q != nullptr ? q[i] : (uniform_q ? acc_t(1) : acc_t(0));
      out[i] = target_grad(A, D, B, qt, st, lse, tf);
    }
    if (post.on) at::vec::map([&](V v) { return post(v); }, out, out, n);
    if constexpr (std::is_same_v<acc_t, float>) {
      if (stream) {
        stream_block(b.out, n, g + c0);
        continue;
      }
    }
    if (out == b.out) store_block(b.out, n, g + c0 * gsc, gsc);
  }
  if (stream) stream_fence();
}

// Coefficients of a counted class-index row: grad_s = A p - D q - [c == t] B (see row_grad).
// s_t is the target's logit; only focal loss reads it (its factor depends on log p_t).
template <typename acc_t>
struct IndexRowCoef {
  acc_t A, D, B;
};

template <typename acc_t>
inline IndexRowCoef<acc_t> index_row_coef(const SoftmaxLossParams& p, int64_t t,
                                          const RowLse<acc_t>& lse, acc_t g, acc_t s_t,
                                          acc_t* focal_loss = nullptr) {
  if (p.focal) {
    // focal_loss: the row's loss from the same terms (its expm1 and pow are a large part
    // of a short row's time)
    const Focal<acc_t> fo(lse.log_p(s_t), focal_alpha<acc_t>(p, t),
                          static_cast<acc_t>(p.gamma));
    if (focal_loss != nullptr) *focal_loss = fo.loss();
    const acc_t f = fo.factor();
    return {g * f, acc_t(0), g * f};
  }
  const int64_t C = p.in.C;
  const auto* w = static_cast<const acc_t*>(p.weight);
  const acc_t eps = static_cast<acc_t>(p.label_smoothing);
  const acc_t z = static_cast<acc_t>(p.z_loss);
  const acc_t wt = w != nullptr ? w[t] : acc_t(1);
  acc_t coef = (acc_t(1) - eps) * wt, D = 0;
  if (eps > 0) {
    const acc_t W = p.weight_sum != nullptr ? *static_cast<const acc_t*>(p.weight_sum)
                                            : static_cast<acc_t>(C);
    coef += eps / static_cast<acc_t>(C) * W;
    D = g * (eps / static_cast<acc_t>(C));
  }
  if (C == 1 && z != 0) {
    // One class: lse = s, so the cross-entropy and smoothing terms are 0 for every finite
    // logit and their gradient, coef (p - 1), exactly 0 (p = 1), as in F's composition;
    // only the z-loss's 2 z lse p is left. Formed alone: (coef + 2 z lse) p - coef lost
    // the z term to cancellation (5e5 float32 ulps at z = 1e-4). coef * 0 keeps a nan or
    // infinite weight's nan, and A p a non-finite logit's (p nan). A per-row branch; rows
    // of more classes keep their formula and bits. Only with a z-loss: a backward handed
    // another lse than the row's own (vocab_parallel's slices of one class, z = 0 there)
    // has p != 1 and needs B; and without one, A p - B is exactly 0 on CPU already, and
    // focal's rows (the same formula) stay bitwise cross-entropy's at gamma = 0.
    coef = coef * acc_t(0) + 2 * z * lse.hi;
    return {g * coef, acc_t(0), acc_t(0)};
  }
  if (z != 0) coef += 2 * z * lse.hi;
  return {g * coef, D, g * ((acc_t(1) - eps) * wt)};
}

// Writes the gradient of row r given its lse, the loss gradient g and the lse gradient
// g_lse (has_g_lse false when no gradient flows into lse). t is the class-index target
// (already validated; unused for probability targets). The gradient loops take hi for
// lse, and p's coefficient A times exp(-lo).
template <typename scalar_t, typename acc_t>
inline void write_row_grad(const SoftmaxLossParams& p, int64_t r, const scalar_t* row,
                           int64_t t, const RowLse<acc_t>& L, acc_t g, acc_t g_lse,
                           bool has_g_lse, const Transform<acc_t>& tf, RowBuffers<acc_t>& b) {
  const int64_t C = p.in.C;
  scalar_t* grow = static_cast<scalar_t*>(p.grad_input) + p.grad_layout.row_offset(r);
  const acc_t z = static_cast<acc_t>(p.z_loss);
  const acc_t lse = L.hi, corr = L.correction();

  if (p.prob_target) {
    // d/ds_c sum_k q_k (lse - s_k) = (sum_k q_k) p_c - q_c.
    acc_t mass = 0;
    for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
      const int64_t n = std::min(kBlock, C - c0);
      load_prob_target<scalar_t>(p, r, c0, n, b.t);
      mass += at::vec::reduce_all<acc_t>(vadd<acc_t>, b.t, n);
    }
    // (One class with a z-loss: mass p - q is 0 for a finite logit, p = 1; mass * 0 keeps
    // a non-finite target's nan, and no q term is subtracted. See index_row_coef.)
    const bool one_class = C == 1 && z != 0;
    acc_t A = one_class ? g * (mass * acc_t(0)) : g * mass;
    if (z != 0) A += g * 2 * z * lse;
    if (has_g_lse) A += g_lse;
    row_grad<scalar_t>(p, r, row, grow, tf, lse, A * corr, one_class ? acc_t(0) : g, acc_t(0), -1,
                       b);
    return;
  }

  if (t == p.ignore_index) {
    // An ignored row gets exact zeros unless its lse has a nonzero gradient, whatever its
    // logits hold (0 * p would be NaN for a NaN, +inf or all -inf row).
    if (has_g_lse && g_lse != 0) {
      row_grad<scalar_t>(p, r, row, grow, tf, lse, g_lse * corr, acc_t(0), acc_t(0), -1, b);
    } else {
      // (+0 whatever the post scale: the backward's rescale leaves ignored rows as made,
      // and F never writes them)
      zero_row(grow, C, p.grad_layout.sc);
    }
    return;
  }
  IndexRowCoef<acc_t> k = index_row_coef<acc_t>(p, t, L, g,
                                                static_cast<acc_t>(row[t * p.in.sc]));
  if (has_g_lse) k.A += g_lse;
  row_grad<scalar_t>(p, r, row, grow, tf, lse, k.A * corr, k.D, k.B, t, b);
}

// ---- fused forward + gradient, one exp per logit -------------------------------------------
// The common training row (contiguous classes, class-index target, no label smoothing or
// soft-capping) keeps the terms e_c = exp(s_c - M_b) of the log-sum-exp pass
// (block_exp_terms), M_b being the running max when block b was summed; the gradient pass
// then needs no exp per logit: p_c = e_c * exp(M_b - lse). float rows keep e in the
// gradient buffer itself, bf16/fp16 rows in a per-thread float scratch row.

// Rows of up to kChunkClasses classes go kRowChunk at a time: first each row's pass of
// max and sum of exponentials, then each row's log, loss and gradient. A short row's
// passes are one chain of dependent steps (the max's and the sum's reductions across
// lanes, std::log, std::exp) that row by row the core ran one after another; a chunk's
// rows give it independent work to overlap. Each row's arithmetic is the same as alone,
// so the bits are. (Longer rows go one at a time: their chains are a small part.)
constexpr int64_t kRowChunk = 4;
constexpr int64_t kChunkClasses = 1024;

inline int64_t row_chunk(int64_t C) { return C <= kChunkClasses ? kRowChunk : 1; }

// The exp terms and running maxima of a chunk's rows (kept for their gradient pass).
template <typename acc_t>
struct ExpRow {
  std::vector<acc_t> e;      // bf16/fp16 rows, or streamed ones: exp terms of each row
  std::vector<acc_t> max_b;  // running max per block, of each row
  int64_t C = 0, blocks = 0;
  acc_t* e_of(int64_t j) { return e.empty() ? nullptr : e.data() + j * C; }
  acc_t* max_b_of(int64_t j) { return max_b.data() + j * blocks; }
};

// Whether the fused forward's counted rows take the one-exp path. (The separate backward
// reads the saved lse and needs one pass with one exp per logit anyway.)
template <typename acc_t>
inline bool one_exp_path(const SoftmaxLossParams& p, const Transform<acc_t>& tf) {
  return p.with_grad && p.in.sc == 1 && p.grad_layout.sc == 1 && !tf.capped &&
         !p.prob_target && p.label_smoothing == 0;
}

template <typename acc_t>
inline void size_scratch(ExpRow<acc_t>& scratch, int64_t C, int64_t rows, bool need_e) {
  scratch.C = C;
  scratch.blocks = (C + kBlock - 1) / kBlock + 1;
  if (need_e) scratch.e.resize(C * rows);
  scratch.max_b.resize(scratch.blocks * rows);
}

// Pass 1: online log-sum-exp keeping the exp terms in e (C values) and the running max per
// block in max_b; captures the target's transformed logit.
template <typename scalar_t, typename acc_t>
inline RowSums<acc_t> row_sums_keep_exp(const scalar_t* x, int64_t C, const Transform<acc_t>& tf,
                                        int64_t target, acc_t* s_target, acc_t* buf, acc_t* e,
                                        acc_t* max_b) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  acc_t M = kNegInf, S = 0;
  for (int64_t c0 = 0, k = 0; c0 < C; c0 += kBlock, ++k) {
    const int64_t n = std::min(kBlock, C - c0);
    acc_t m;
    const acc_t* s = logits_block(x, 1, c0, n, tf, buf, &m);
    if (target >= c0 && target < c0 + n) *s_target = s[target - c0];
    if (!(m <= M)) {
      S = S * std::exp(M - m);
      M = m;
    }
    max_b[k] = M;
    if (M == kNegInf) {
      std::fill(e + c0, e + c0 + n, acc_t(0));
      continue;
    }
    S += block_exp_terms<true>(s, n, M, e + c0);
  }
  return {M, S};
}

// Pass 2: grad_c = ds/dx * (A e_c exp(M_b - lse)) - [c == t] ds/dx_t B, written over g;
// with `stream` (e then is not g) by streaming stores where stream_row allows them.
template <typename scalar_t, typename acc_t>
inline void row_grad_from_exp(const acc_t* e, const acc_t* max_b, scalar_t* g, int64_t C,
                              const Transform<acc_t>& tf, acc_t lse, acc_t A, acc_t B,
                              int64_t target, acc_t s_t, bool stream,
                              const PostScale<scalar_t, acc_t>& post) {
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  const acc_t deriv = tf.scaled ? tf.scale : acc_t(1);
  stream = stream_row(stream, g);
  for (int64_t c0 = 0, k = 0; c0 < C; c0 += kBlock, ++k) {
    const int64_t n = std::min(kBlock, C - c0);
    const acc_t fs = A * std::exp(max_b[k] - lse) * deriv;
    const V f(fs);
    if constexpr (std::is_same_v<acc_t, float>) {
      int64_t i = 0;
      for (; i + 2 * W <= n; i += 2 * W) {
        post.put(stream, g + c0 + i, V::loadu(e + c0 + i) * f, V::loadu(e + c0 + i + W) * f);
      }
      if (i < n) {  // a partial pair: lanes past n are neither read nor stored
        const int64_t m = n - i;
        const V lo = V::loadu(e + c0 + i, std::min(m, W)) * f;
        const V hi = m > W ? V::loadu(e + c0 + i + W, m - W) * f : V(acc_t(0));
        post.put_head(g + c0 + i, lo, hi, m);
      }
    } else if (post.on) {
      at::vec::map([&](V ev) { return post(ev * f); }, g + c0, e + c0, n);
    } else {
      at::vec::map([&](V ev) { return ev * f; }, g + c0, e + c0, n);
    }
  }
  if (stream) stream_fence();
  if (target >= 0) g[target] = post.scalar((A * std::exp(s_t - lse) - B) * deriv);
}

// The one-exp path's passes for a counted row, slot j of the chunk's scratch: the first
// keeps the row's exp terms (in its gradient row unless the scratch holds them).
template <typename scalar_t, typename acc_t>
inline acc_t* exp_terms_of(const SoftmaxLossParams& p, int64_t r, ExpRow<acc_t>& scratch,
                           int64_t j) {
  acc_t* e = scratch.e_of(j);
  if (e != nullptr) return e;
  return reinterpret_cast<acc_t*>(static_cast<scalar_t*>(p.grad_input) +
                                  p.grad_layout.row_offset(r));
}

template <typename scalar_t, typename acc_t>
inline RowSums<acc_t> one_exp_sums(const SoftmaxLossParams& p, int64_t r, const scalar_t* row,
                                   int64_t t, const Transform<acc_t>& tf, acc_t* buf,
                                   ExpRow<acc_t>& scratch, int64_t j, acc_t* s_t) {
  return row_sums_keep_exp<scalar_t, acc_t>(row, p.in.C, tf, t, s_t, buf,
                                            exp_terms_of<scalar_t>(p, r, scratch, j),
                                            scratch.max_b_of(j));
}

// The second: the gradient from the kept terms. Returns the row's lse; sets *focal_loss to
// a focal row's loss.
template <typename scalar_t, typename acc_t>
inline RowLse<acc_t> one_exp_grad(const SoftmaxLossParams& p, int64_t r, int64_t t,
                                  acc_t g_loss, const Transform<acc_t>& tf,
                                  const RowSums<acc_t>& sums, ExpRow<acc_t>& scratch, int64_t j,
                                  acc_t s_t, bool stream, acc_t* focal_loss) {
  auto* g = static_cast<scalar_t*>(p.grad_input) + p.grad_layout.row_offset(r);
  const RowLse<acc_t> L = lse_of_sums<scalar_t>(sums);
  const auto k = index_row_coef<acc_t>(p, t, L, g_loss, s_t, focal_loss);
  row_grad_from_exp<scalar_t, acc_t>(exp_terms_of<scalar_t>(p, r, scratch, j),
                                     scratch.max_b_of(j), g, p.in.C, tf, L.hi,
                                     k.A * L.correction(), k.B, t, s_t,
                                     stream && !scratch.e.empty(),
                                     PostScale<scalar_t, acc_t>(p.post_scale));
  return L;
}

// Rows laid across memory ((N, C, H, W) maps): tiles of rows, a lane each.
#include "column_rows_impl.h"

template <typename scalar_t>
int64_t softmax_loss_fwd_rows(const SoftmaxLossParams& p, int64_t begin, int64_t end,
                              int64_t* bad_target) {
  if (column_layout(p, p.with_grad)) {
    return softmax_loss_fwd_columns<scalar_t>(p, begin, end, bad_target);
  }
  using acc_t = typename AccOf<scalar_t>::type;
  const auto* x = static_cast<const scalar_t*>(p.input);
  const int64_t C = p.in.C, sc = p.in.sc;
  const Transform<acc_t> tf(p.logit_scale, p.softcap);
  const acc_t z = static_cast<acc_t>(p.z_loss);
  auto* loss = static_cast<acc_t*>(p.loss);
  auto* lse_out = static_cast<double*>(p.lse);
  RowBuffers<acc_t> b;
  // Fused forward: the row was just read, so its second pass mostly hits cache.
  auto fused_grad = [&](int64_t r, int64_t t, const RowLse<acc_t>& lse) {
    write_row_grad<scalar_t>(p, r, x + p.in.row_offset(r), t, lse,
                             read_row_value<acc_t>(p.grad_loss, r), acc_t(0), false, tf, b);
  };
  const bool one_exp = one_exp_path(p, tf);
  // A gradient that, with the logits, outgrows the caches is streamed (stream_pair); a
  // float one then keeps its exp terms in the scratch row instead of in itself.
  const bool stream = p.with_grad && stream_gradient<scalar_t>(p);
  b.stream = stream;
  const int64_t K = p.prob_target ? 1 : row_chunk(C);
  ExpRow<acc_t> scratch;
  if (one_exp) size_scratch(scratch, C, K, !std::is_same_v<scalar_t, acc_t> || stream);

  // A chunk's rows between their passes.
  struct Pending {
    int64_t t;
    bool ignored, one_exp;
    acc_t s_t;
    RowSums<acc_t> sums;
  };
  Pending rows[kRowChunk];
  for (int64_t r0 = begin; r0 < end; r0 += K) {
    const int64_t k = std::min(K, end - r0);
    if (p.prob_target) {  // (K is 1)
      const scalar_t* row = x + p.in.row_offset(r0);
      const RowLse<acc_t> lse = row_lse<scalar_t, acc_t>(row, C, sc, tf, -1, nullptr, b.s);
      acc_t l = row_weighted_nll_sum<scalar_t>(p, r0, row, tf, lse, b);
      if (z != 0) l += z * lse.hi * lse.hi;
      loss[r0] = l;
      lse_out[r0] = stored_lse<kSplitLse<scalar_t>>(lse);
      if (p.with_grad) fused_grad(r0, -1, lse);
      continue;
    }
    // Pass 1 of each row, up to a target out of range (its row and those after it untouched)
    int64_t done = 0;
    for (; done < k; ++done) {
      const int64_t r = r0 + done;
      Pending& q = rows[done];
      q.t = read_index(p, r);
      q.ignored = q.t == p.ignore_index;
      if (!q.ignored && (q.t < 0 || q.t >= C)) break;
      q.s_t = 0;
      q.one_exp = one_exp && !q.ignored;
      const scalar_t* row = x + p.in.row_offset(r);
      q.sums = q.one_exp ? one_exp_sums<scalar_t, acc_t>(p, r, row, q.t, tf, b.s, scratch,
                                                          done, &q.s_t)
                         : row_sums<scalar_t, acc_t>(row, C, sc, tf, q.ignored ? -1 : q.t,
                                                     &q.s_t, b.s);
    }
    for (int64_t j = 0; j < done; ++j) {
      const int64_t r = r0 + j;
      const Pending& q = rows[j];
      const scalar_t* row = x + p.in.row_offset(r);
      RowLse<acc_t> lse;
      acc_t focal_loss = 0;
      if (q.one_exp) {
        lse = one_exp_grad<scalar_t, acc_t>(p, r, q.t, read_row_value<acc_t>(p.grad_loss, r),
                                            tf, q.sums, scratch, j, q.s_t, stream,
                                            &focal_loss);
      } else {
        lse = lse_of_sums<scalar_t>(q.sums);
        if (p.with_grad) fused_grad(r, q.t, lse);
      }
      lse_out[r] = stored_lse<kSplitLse<scalar_t>>(lse);
      if (q.ignored) {
        loss[r] = 0;
        continue;
      }
      if (p.focal && q.one_exp) {
        loss[r] = focal_loss;
        continue;
      }
      loss[r] = index_row_loss<acc_t>(p, q.t, lse, q.s_t, [&] {
        return row_weighted_nll_sum<scalar_t>(p, r, row, tf, lse, b);
      });
    }
    if (done < k) {
      *bad_target = rows[done].t;
      return r0 + done;
    }
  }
  return -1;
}

template <typename scalar_t>
int64_t softmax_loss_bwd_rows(const SoftmaxLossParams& p, int64_t begin, int64_t end,
                              int64_t* bad_target) {
  if (column_layout(p, true)) return softmax_loss_bwd_columns<scalar_t>(p, begin, end, bad_target);
  using acc_t = typename AccOf<scalar_t>::type;
  const auto* x = static_cast<const scalar_t*>(p.input);
  const int64_t C = p.in.C;
  const Transform<acc_t> tf(p.logit_scale, p.softcap);
  const auto* lse_in = static_cast<const double*>(p.lse_in);
  const bool has_g_lse = p.grad_lse.ptr != nullptr;
  RowBuffers<acc_t> b;
  b.stream = stream_gradient<scalar_t>(p);

  for (int64_t r = begin; r < end; ++r) {
    int64_t t = -1;
    if (!p.prob_target) {
      t = read_index(p, r);
      if (t != p.ignore_index && (t < 0 || t >= C)) {
        *bad_target = t;
        return r;
      }
    }
    const acc_t g = read_row_value<acc_t>(p.grad_loss, r);
    const acc_t g_lse =
        has_g_lse ? static_cast<acc_t>(read_row_value<double>(p.grad_lse, r)) : acc_t(0);
    const scalar_t* row = x + p.in.row_offset(r);
    RowLse<acc_t> L = split_lse<kSplitLse<scalar_t>, acc_t>(lse_in[r]);
    if (!stored_lse_suffices(L.hi)) {
      L = row_lse<scalar_t, acc_t>(row, C, p.in.sc, tf, -1, nullptr, b.s);
    }
    write_row_grad<scalar_t>(p, r, row, t, L, g, g_lse, has_g_lse, tf, b);
  }
  return -1;
}

// ---- sigmoid focal loss (elementwise, torchvision.ops.sigmoid_focal_loss semantics) ----

// Minimax coefficients (relative error) of Q in log(1 + f) = f - f^2/2 + f^3 Q(f) on
// [sqrt(1/2) - 1, sqrt(2) - 1], constant term first.
constexpr float kLog1pPoly[8] = {0x1.555554p-2f,  -0x1.000228p-2f, 0x1.99a008p-3f,
                                 -0x1.547242p-3f, 0x1.22da18p-3f,  -0x1.0d854ep-3f,
                                 0x1.055b9ep-3f,  -0x1.38b5cp-4f};
constexpr float kSqrt2 = 0x1.6a09e6p+0f;

// V::blendv(a, b, x >= y) (kGe) or V::blendv(a, b, x > y) (kGt): b where the comparison
// holds, else a. float on AVX-512: the comparison stays a mask register (ATen's makes a
// vector of it, which blendv compares back into a mask: two instructions more).
enum class Cmp { kGe, kGt };

template <Cmp kCmp, typename acc_t>
TLF_ALWAYS_INLINE Vectorized<acc_t> pick_if(const Vectorized<acc_t>& x, const Vectorized<acc_t>& y,
                                            const Vectorized<acc_t>& a,
                                            const Vectorized<acc_t>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    constexpr int kPred = kCmp == Cmp::kGe ? _CMP_GE_OQ : _CMP_GT_OQ;
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, y, kPred), a, b);
  }
#endif
  if constexpr (kCmp == Cmp::kGe) {
    return Vectorized<acc_t>::blendv(a, b, x >= y);
  } else {
    return Vectorized<acc_t>::blendv(a, b, x > y);
  }
}

// log(1 + e) for e in [0, 1], given u = 1 + e rounded and inv = 1 / u.
// float on AVX2 and AVX-512: log(u) by a polynomial once u is brought into
// [sqrt(1/2), sqrt(2)] (u - 1 and u / 2 - 1 are exact there), plus (e - (u - 1)) / u for
// the rounding of u, itself exact: about 2 ulp, for a fifth of Sleef's log1p, which was
// the most expensive instruction sequence of the loss. Elsewhere ATen's log1p.
template <typename acc_t>
TLF_ALWAYS_INLINE Vectorized<acc_t> vlog1p_unit(const Vectorized<acc_t>& e,
                                                [[maybe_unused]] const Vectorized<acc_t>& u,
                                                [[maybe_unused]] const Vectorized<acc_t>& inv) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    using V = Vectorized<float>;
    // u > sqrt(2) is false for NaN: f and the result stay NaN
    const V one(1.f), root2(kSqrt2), zero(0.f);
    const V f = pick_if<Cmp::kGt>(u, root2, u - one, u * V(0.5f) - one);
    V q(kLog1pPoly[7]);
    for (int k = 6; k >= 0; --k) q = at::vec::fmadd(q, f, V(kLog1pPoly[k]));
    const V z = f * f;
    const V log_m = f + at::vec::fmadd(f * z, q, V(-0.5f) * z);
    const V rounding =
        at::vec::fmadd(e - (u - one), inv, pick_if<Cmp::kGt>(u, root2, zero, V(kLn2Lo)));
    return pick_if<Cmp::kGt>(u, root2, zero, V(kLn2Hi)) + (log_m + rounding);
  }
#endif
  return e.log1p();
}

// 1 / d for d in [1, 2]. float on AVX-512: a 14-bit estimate and one Newton step, within
// about 1 ulp for a fraction of vdivps' cost. Elsewhere a division.
template <typename acc_t>
TLF_ALWAYS_INLINE Vectorized<acc_t> vrecip_unit(const Vectorized<acc_t>& d) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m512 r = _mm512_rcp14_ps(d);
    return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(1.f)), r);
  }
#endif
  return Vectorized<acc_t>(1) / d;
}

template <typename acc_t>
struct SigmoidTerms {
  using V = Vectorized<acc_t>;
  V ce, p, q, m;  // BCE-with-logits, sigmoid(x), 1 - sigmoid(x), 1 - p_t
  TLF_ALWAYS_INLINE SigmoidTerms(const V& x, const V& t) {
    const V one(1), zero(0);
    const V ax = x.abs();
    const V e = vexp_elementwise(ax.neg());  // exp(-|x|) never overflows
    const V u = one + e;
    const V inv = vrecip_unit(u);
    // max(x, 0) - x t as |x| (1 - t) or |x| t by x's sign: +inf with t < 1 gives inf, as
    // torchvision's (1 - t) x - logsigmoid(x) does (inf - inf t was nan), and a large x with
    // t near 1 keeps its relative accuracy (1 - t is exact there; x - x t cancels).
    ce = at::vec::fmadd(ax, pick_if<Cmp::kGe>(x, zero, t, one - t), vlog1p_unit(e, u, inv));
    const V e_inv = e * inv;
    p = pick_if<Cmp::kGe>(x, zero, e_inv, inv);
    q = pick_if<Cmp::kGe>(x, zero, inv, e_inv);
    m = t * q + (one - t) * p;
  }
};

template <typename acc_t>
TLF_ALWAYS_INLINE Vectorized<acc_t> vpow(const Vectorized<acc_t>& m, acc_t gamma) {
  using V = Vectorized<acc_t>;
  if (gamma == 0) return V(1);
  if (gamma == 1) return m;
  if (gamma == 2) return m * m;
  return m.pow(V(gamma));
}

// f(gamma), with gamma a literal where it is 2, 0 or 1 (the usual values): f is inlined at
// each call, so each is a copy of the loop in which vpow's tests of gamma fold away.
template <typename acc_t, typename F>
TLF_ALWAYS_INLINE void with_gamma(acc_t gamma, F&& f) {
  if (gamma == acc_t(2)) {
    f(acc_t(2));
  } else if (gamma == acc_t(0)) {
    f(acc_t(0));
  } else if (gamma == acc_t(1)) {
    f(acc_t(1));
  } else {
    f(gamma);
  }
}

template <typename acc_t>
TLF_ALWAYS_INLINE Vectorized<acc_t> alpha_t(const Vectorized<acc_t>& t, acc_t alpha) {
  using V = Vectorized<acc_t>;
  return V(alpha) * t + V(acc_t(1) - alpha) * (V(1) - t);
}

template <typename acc_t>
TLF_ALWAYS_INLINE Vectorized<acc_t> sigmoid_focal_value(const SigmoidTerms<acc_t>& s,
                                             const Vectorized<acc_t>& t, acc_t alpha,
                                             acc_t gamma) {
  const Vectorized<acc_t> l = s.ce * vpow(s.m, gamma);
  return alpha >= 0 ? l * alpha_t(t, alpha) : l;
}

// d loss / dx.
template <typename acc_t>
TLF_ALWAYS_INLINE Vectorized<acc_t> sigmoid_focal_deriv(const SigmoidTerms<acc_t>& s,
                                             const Vectorized<acc_t>& t, acc_t alpha,
                                             acc_t gamma) {
  using V = Vectorized<acc_t>;
  // d ce / dx = p - t, written without the cancellation of p - 1 for a confident
  // positive (p + q = 1): that gradient keeps its relative accuracy, as the loss does.
  V d = (V(1) - t) * s.p - t * s.q;
  if (gamma != 0) {
    // d/dx [ce * m^gamma] = d m^gamma + ce gamma m^(gamma-1) p q (1 - 2t)
    V dpow = V(gamma) * vpow(s.m, gamma - acc_t(1));
    if (gamma < 1) {  // m = 0 only where p q = 0: the limit of the product is 0
      dpow = pick_if<Cmp::kGt>(s.m, V(0), V(0), dpow);
    }
    // ce (p q) first: ce grows as |x| where p q decays as exp(-|x|), so the product stays
    // finite for every finite x (ce * dpow overflowed beyond about max / gamma: nan)
    d = d * vpow(s.m, gamma) + s.ce * (s.p * s.q) * dpow * (V(1) - V(2) * t);
  }
  return alpha >= 0 ? d * alpha_t(t, alpha) : d;
}

// Runs step(x, t, g, out, n) over [begin, end) in chunks of 2W elements (W = acc_t lanes):
// pointers into the tensors, n = 2W, straight from memory with no staging copies. The
// last, partial chunk runs on zero-padded local copies with n < 2W, and only its n outputs
// are copied back. g (an elementwise grad_loss) and out may be null.
template <typename scalar_t, typename Step>
TLF_ALWAYS_INLINE void sigmoid_chunks(const SigmoidFocalParams& p, const scalar_t* g, scalar_t* out,
                           int64_t begin, int64_t end, Step&& step) {
  constexpr int64_t K = 2 * Vectorized<typename AccOf<scalar_t>::type>::size();
  const auto* x = static_cast<const scalar_t*>(p.input);
  const auto* t = static_cast<const scalar_t*>(p.target);
  int64_t i = begin;
  for (; i + K <= end; i += K) {
    step(x + i, t + i, g != nullptr ? g + i : nullptr, out != nullptr ? out + i : nullptr, K);
  }
  if (i == end) return;
  const int64_t n = end - i;
  scalar_t xb[K] = {}, tb[K] = {}, gb[K] = {}, ob[K] = {};
  std::copy(x + i, x + end, xb);
  std::copy(t + i, t + end, tb);
  if (g != nullptr) std::copy(g + i, g + end, gb);
  step(xb, tb, g != nullptr ? gb : nullptr, out != nullptr ? ob : nullptr, n);
  if (out != nullptr) std::copy(ob, ob + n, out + i);
}

template <typename scalar_t>
void sigmoid_focal_fwd_range(const SigmoidFocalParams& p, int64_t begin, int64_t end) {
  using acc_t = typename AccOf<scalar_t>::type;
  using V = Vectorized<acc_t>;
  const acc_t alpha = static_cast<acc_t>(p.alpha);
  with_gamma(static_cast<acc_t>(p.gamma), [&](const acc_t gamma) TLF_ALWAYS_INLINE_LAMBDA {
    auto value = [&](const V& xv, const V& tv) TLF_ALWAYS_INLINE_LAMBDA {
      return sigmoid_focal_value(SigmoidTerms<acc_t>(xv, tv), tv, alpha, gamma);
    };
    sigmoid_chunks<scalar_t>(
        p, nullptr, static_cast<scalar_t*>(p.loss), begin, end,
        [&](const scalar_t* x, const scalar_t* t, const scalar_t*, scalar_t* out,
            int64_t) TLF_ALWAYS_INLINE_LAMBDA {
          V x0, x1, t0, t1;
          load_pair(x, x0, x1);
          load_pair(t, t0, t1);
          store_pair(out, value(x0, t0), value(x1, t1));
        });
  });
}

template <typename scalar_t>
void sigmoid_focal_bwd_range(const SigmoidFocalParams& p, int64_t begin, int64_t end) {
  using acc_t = typename AccOf<scalar_t>::type;
  using V = Vectorized<acc_t>;
  const auto* gl = static_cast<const scalar_t*>(p.grad_loss);
  const acc_t alpha = static_cast<acc_t>(p.alpha);
  const V g_all(p.scalar_grad ? static_cast<acc_t>(gl[0]) : acc_t(0));
  with_gamma(static_cast<acc_t>(p.gamma), [&](const acc_t gamma) TLF_ALWAYS_INLINE_LAMBDA {
    auto deriv = [&](const V& xv, const V& tv) TLF_ALWAYS_INLINE_LAMBDA {
      return sigmoid_focal_deriv(SigmoidTerms<acc_t>(xv, tv), tv, alpha, gamma);
    };
    sigmoid_chunks<scalar_t>(
        p, p.scalar_grad ? nullptr : gl, static_cast<scalar_t*>(p.grad_input), begin, end,
        [&](const scalar_t* x, const scalar_t* t, const scalar_t* g, scalar_t* out,
            int64_t) TLF_ALWAYS_INLINE_LAMBDA {
          V x0, x1, t0, t1, g0 = g_all, g1 = g_all;
          load_pair(x, x0, x1);
          load_pair(t, t0, t1);
          if (g != nullptr) load_pair(g, g0, g1);
          store_pair(out, deriv(x0, t0) * g0, deriv(x1, t1) * g1);
        });
  });
}

// One pass for the reduced loss: each element's terms are computed once, for its loss and
// (when p.grad_input is set) its gradient. Lanes accumulate in acc_t; the caller sums the
// ranges of a fixed partition in order, so the result does not depend on the thread count.
template <typename scalar_t>
double sigmoid_focal_sum_range(const SigmoidFocalParams& p, int64_t begin, int64_t end) {
  using acc_t = typename AccOf<scalar_t>::type;
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  const acc_t alpha = static_cast<acc_t>(p.alpha);
  const V scale(static_cast<acc_t>(p.scale));
  V total0(0), total1(0);
  with_gamma(static_cast<acc_t>(p.gamma), [&](const acc_t gamma) TLF_ALWAYS_INLINE_LAMBDA {
    sigmoid_chunks<scalar_t>(
        p, nullptr, static_cast<scalar_t*>(p.grad_input), begin, end,
        [&](const scalar_t* x, const scalar_t* t, const scalar_t*, scalar_t* out,
            int64_t n) TLF_ALWAYS_INLINE_LAMBDA {
          V x0, x1, t0, t1;
          load_pair(x, x0, x1);
          load_pair(t, t0, t1);
          const SigmoidTerms<acc_t> s0(x0, t0), s1(x1, t1);
          V v0 = sigmoid_focal_value(s0, t0, alpha, gamma);
          V v1 = sigmoid_focal_value(s1, t1, alpha, gamma);
          if (n < 2 * W) {  // the padded lanes of the last chunk add nothing
            v0 = V::set(V(0), v0, std::min(n, W));
            v1 = V::set(V(0), v1, std::max<int64_t>(n - W, 0));
          }
          total0 += v0;
          total1 += v1;
          if (out != nullptr) {
            store_pair(out, sigmoid_focal_deriv(s0, t0, alpha, gamma) * scale,
                       sigmoid_focal_deriv(s1, t1, alpha, gamma) * scale);
          }
        });
  });
  alignas(64) acc_t lanes[W];
  (total0 + total1).store(lanes);
  double sum = 0;
  for (int64_t j = 0; j < W; ++j) sum += lanes[j];
  return sum;
}

// ---- float32 accumulation of a narrower (or equal) tensor --------------------------------

template <typename scalar_t>
inline void accumulate_range(float* acc, const scalar_t* src, int64_t begin, int64_t end) {
  using fVec = Vectorized<float>;
  constexpr int64_t W = fVec::size();
  int64_t i = begin;
  for (; i + 2 * W <= end; i += 2 * W) {
    fVec lo, hi;
    load_pair(src + i, lo, hi);
    (fVec::loadu(acc + i) + lo).store(acc + i);
    (fVec::loadu(acc + i + W) + hi).store(acc + i + W);
  }
  for (; i < end; ++i) acc[i] += static_cast<float>(src[i]);
}

template <typename F>
inline auto dispatch_dtype(Dtype dt, F&& f) {
  switch (dt) {
    case Dtype::Float64:
      return f(double{});
    case Dtype::BFloat16:
      return f(c10::BFloat16{});
    case Dtype::Float16:
      return f(c10::Half{});
    case Dtype::Float32:
    default:
      return f(float{});
  }
}

int64_t softmax_loss_fwd(const SoftmaxLossParams& p, Dtype dt, int64_t begin, int64_t end,
                         int64_t* bad_target) {
  return dispatch_dtype(dt, [&](auto tag) {
    return softmax_loss_fwd_rows<decltype(tag)>(p, begin, end, bad_target);
  });
}

int64_t softmax_loss_bwd(const SoftmaxLossParams& p, Dtype dt, int64_t begin, int64_t end,
                         int64_t* bad_target) {
  return dispatch_dtype(dt, [&](auto tag) {
    return softmax_loss_bwd_rows<decltype(tag)>(p, begin, end, bad_target);
  });
}

void sigmoid_focal_fwd(const SigmoidFocalParams& p, Dtype dt, int64_t begin, int64_t end) {
  dispatch_dtype(dt, [&](auto tag) { sigmoid_focal_fwd_range<decltype(tag)>(p, begin, end); });
}

void sigmoid_focal_bwd(const SigmoidFocalParams& p, Dtype dt, int64_t begin, int64_t end) {
  dispatch_dtype(dt, [&](auto tag) { sigmoid_focal_bwd_range<decltype(tag)>(p, begin, end); });
}

void accumulate(float* acc, const void* src, Dtype dt, int64_t begin, int64_t end) {
  dispatch_dtype(dt, [&](auto tag) {
    using scalar_t = decltype(tag);
    // (The launcher sends no float64 source: a float accumulator would round it.)
    if constexpr (!std::is_same_v<scalar_t, double>) {
      accumulate_range(acc, static_cast<const scalar_t*>(src), begin, end);
    }
  });
}

void scale_rows(void* grad, const RowLayout& l, Dtype dt, const void* factor, int64_t begin,
                int64_t end) {
  dispatch_dtype(dt, [&](auto tag) {
    using scalar_t = decltype(tag);
    scale_rows_range(static_cast<scalar_t*>(grad), l,
                     static_cast<const typename AccOf<scalar_t>::type*>(factor), begin, end);
  });
}

double sigmoid_focal_sum(const SigmoidFocalParams& p, Dtype dt, int64_t begin, int64_t end) {
  return dispatch_dtype(
      dt, [&](auto tag) { return sigmoid_focal_sum_range<decltype(tag)>(p, begin, end); });
}

}  // namespace

#define TLF_STR2(x) #x
#define TLF_STR(x) TLF_STR2(x)
extern const KernelTable kTable = {TLF_STR(CPU_CAPABILITY), softmax_loss_fwd, softmax_loss_bwd,
                                   sigmoid_focal_fwd, sigmoid_focal_bwd, sigmoid_focal_sum,
                                   accumulate, scale_rows};

}  // namespace CPU_CAPABILITY
}  // namespace tlf::cpu
