// Element and 16-byte vector access for the kernel dtypes. Kernels accumulate in float
// (double for double inputs); a 16-byte vector holds 16 / sizeof(T) elements, so one load
// instruction moves the most bytes a thread can have in flight per instruction.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace tlf::cuda {

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_of = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }

// Rounds once, to nearest even, as PyTorch's own casts do.
template <typename T>
__device__ __forceinline__ T from_acc(acc_of<T> x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ double from_acc<double>(double x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}

template <typename T>
__device__ __forceinline__ T zero_of() {
  return from_acc<T>(acc_of<T>(0));
}

// 16 bytes of T: raw loads/stores plus conversion to and from kVec accumulators. The raw
// form is what the shared-memory row cache keeps, so a cached row costs its input size.
template <typename T>
struct Vec16 {
  static constexpr int kVec = 16 / sizeof(T);
  using acc_t = acc_of<T>;

  // p must be 16-byte aligned.
  static __device__ __forceinline__ uint4 load(const T* p) {
    return *reinterpret_cast<const uint4*>(p);
  }
  // For data read for the last time: evict-first, so it does not push out rows that are
  // still to be re-read.
  static __device__ __forceinline__ uint4 load_last(const T* p) {
    return __ldcs(reinterpret_cast<const uint4*>(p));
  }
  static __device__ __forceinline__ void store(T* p, uint4 v) {
    *reinterpret_cast<uint4*>(p) = v;
  }
  // The gradient is not read again by this kernel: stream it past the caches.
  static __device__ __forceinline__ void store_streaming(T* p, uint4 v) {
    __stcs(reinterpret_cast<uint4*>(p), v);
  }

  static __device__ __forceinline__ void unpack(const uint4& v, acc_t (&out)[kVec]);
  static __device__ __forceinline__ uint4 pack(const acc_t (&in)[kVec]);
};

template <>
__device__ __forceinline__ void Vec16<float>::unpack(const uint4& v, float (&out)[4]) {
  out[0] = __uint_as_float(v.x);
  out[1] = __uint_as_float(v.y);
  out[2] = __uint_as_float(v.z);
  out[3] = __uint_as_float(v.w);
}
template <>
__device__ __forceinline__ uint4 Vec16<float>::pack(const float (&in)[4]) {
  return make_uint4(__float_as_uint(in[0]), __float_as_uint(in[1]), __float_as_uint(in[2]),
                    __float_as_uint(in[3]));
}

template <>
__device__ __forceinline__ void Vec16<double>::unpack(const uint4& v, double (&out)[2]) {
  out[0] = __hiloint2double(static_cast<int>(v.y), static_cast<int>(v.x));
  out[1] = __hiloint2double(static_cast<int>(v.w), static_cast<int>(v.z));
}
template <>
__device__ __forceinline__ uint4 Vec16<double>::pack(const double (&in)[2]) {
  return make_uint4(static_cast<unsigned>(__double2loint(in[0])),
                    static_cast<unsigned>(__double2hiint(in[0])),
                    static_cast<unsigned>(__double2loint(in[1])),
                    static_cast<unsigned>(__double2hiint(in[1])));
}

namespace detail {
// Little endian: element 2i is the low half of word i.
__device__ __forceinline__ void bf16x2_to_float(unsigned w, float& lo, float& hi) {
  lo = __uint_as_float(w << 16);  // bf16 is the top half of a float: exact
  hi = __uint_as_float(w & 0xffff0000u);
}
__device__ __forceinline__ unsigned float_to_bf16x2(float lo, float hi) {
  const __nv_bfloat162 b = __floats2bfloat162_rn(lo, hi);  // .x (low) = lo
  return *reinterpret_cast<const unsigned*>(&b);
}
__device__ __forceinline__ void halfx2_to_float(unsigned w, float& lo, float& hi) {
  lo = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
  hi = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}
__device__ __forceinline__ unsigned float_to_halfx2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);  // .x (low) = lo
  return *reinterpret_cast<const unsigned*>(&h);
}
}  // namespace detail

template <>
__device__ __forceinline__ void Vec16<__nv_bfloat16>::unpack(const uint4& v, float (&out)[8]) {
  detail::bf16x2_to_float(v.x, out[0], out[1]);
  detail::bf16x2_to_float(v.y, out[2], out[3]);
  detail::bf16x2_to_float(v.z, out[4], out[5]);
  detail::bf16x2_to_float(v.w, out[6], out[7]);
}
template <>
__device__ __forceinline__ uint4 Vec16<__nv_bfloat16>::pack(const float (&in)[8]) {
  return make_uint4(detail::float_to_bf16x2(in[0], in[1]), detail::float_to_bf16x2(in[2], in[3]),
                    detail::float_to_bf16x2(in[4], in[5]), detail::float_to_bf16x2(in[6], in[7]));
}

template <>
__device__ __forceinline__ void Vec16<__half>::unpack(const uint4& v, float (&out)[8]) {
  detail::halfx2_to_float(v.x, out[0], out[1]);
  detail::halfx2_to_float(v.y, out[2], out[3]);
  detail::halfx2_to_float(v.z, out[4], out[5]);
  detail::halfx2_to_float(v.w, out[6], out[7]);
}
template <>
__device__ __forceinline__ uint4 Vec16<__half>::pack(const float (&in)[8]) {
  return make_uint4(detail::float_to_halfx2(in[0], in[1]), detail::float_to_halfx2(in[2], in[3]),
                    detail::float_to_halfx2(in[4], in[5]), detail::float_to_halfx2(in[6], in[7]));
}

// Elements before the first 16-byte boundary of p (p is element aligned).
template <typename T>
__device__ __forceinline__ int64_t elems_to_alignment(const T* p) {
  const auto mis = reinterpret_cast<uintptr_t>(p) & 15u;
  return static_cast<int64_t>(((16u - mis) & 15u) / sizeof(T));
}

// Asks L2 for bytes [0, n) of a row (one hint per 128-byte line, spread over the group's
// threads); loads nothing into registers and cannot fault. The host emulator (no
// __CUDA_ARCH__) reads one byte per line instead, so its bounds checks see the addresses.
__device__ __forceinline__ void prefetch_l2(const void* row, int64_t n, int lane, int gsize) {
  const auto* b = static_cast<const unsigned char*>(row);
  for (int64_t off = static_cast<int64_t>(lane) * 128; off < n;
       off += static_cast<int64_t>(gsize) * 128) {
#if defined(__CUDA_ARCH__)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(b + off));
#else
    (void)*static_cast<const volatile unsigned char*>(b + off);
#endif
  }
}

}  // namespace tlf::cuda
