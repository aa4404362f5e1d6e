// Host emulation of the CUDA features the kernels of csrc/cuda use, for a host compiler
// (g++) and the CUDA toolkit's own headers (cuda_runtime.h, cuda_bf16.h, cuda_fp16.h: their
// types and host conversion code). Force-included before the kernel sources, which the test
// copies into its build directory with the only three rewrites a host compiler needs
// (tests/test_cuda_emulated.py, rewrite_kernel_source):
//   extern __shared__ T name[];      ->  T* name = ::emu::dynamic_smem<T>();
//   __shared__ T name[N];            ->  auto& name = ::emu::block_shared<T[N]>([] {});
//   kernel<<<grid, block, smem, s>>>(args)  ->  kernel ->* ::emu::Config(grid, block, smem, s)(args)
//
// Every CUDA thread of a block is a fiber (own stack) of one host thread; the blocks of a grid
// run one after another. __syncthreads() and __shfl_xor_sync() are barriers: a fiber runs
// until it reaches one, then the next fiber runs, so the outcome depends only on the kernel
// and on the schedule (fiber and block order, see emu::Schedule), never on the host's timing.
#pragma once

#include <assert.h>  // before the macro below: glibc declares __assert_fail here

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- CUDA keywords -------------------------------------------------------------------------
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#undef __grid_constant__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __grid_constant__
// A __shared__ declaration the build-time rewrite did not turn into emulated shared memory
// stops the build here (extend rewrite_kernel_source in tests/test_cuda_emulated.py).
#define __shared__ EMU_UNREWRITTEN_SHARED_DECLARATION

namespace emu {

// ---- the running fiber ---------------------------------------------------------------------
extern unsigned g_thread, g_block, g_block_dim, g_grid_dim;

inline uint3 thread_idx() { return uint3{g_thread, 0u, 0u}; }
inline uint3 block_idx() { return uint3{g_block, 0u, 0u}; }
inline dim3 block_dim() { return dim3(g_block_dim, 1u, 1u); }
inline dim3 grid_dim() { return dim3(g_grid_dim, 1u, 1u); }

// ---- barriers ------------------------------------------------------------------------------
void syncthreads();
// All 32 lanes of the warp must arrive; returns the bits lane (lane ^ lane_mask) passed in.
uint64_t shfl_xor_bits(unsigned mask, uint64_t bits, int lane_mask, int width);

// ---- shared memory -------------------------------------------------------------------------
// The launch's dynamic shared memory: exactly its byte count, filled with 0xff (NaN in every
// float format) at the start of every block, so a read before a write shows.
void* dynamic_smem_ptr();
template <typename T>
inline T* dynamic_smem() {
  return static_cast<T*>(dynamic_smem_ptr());
}
// Registers a static __shared__ variable; it is refilled with 0xff at the start of each block.
void register_shared(void* p, size_t bytes);
// One object per rewritten declaration (the lambda's type is unique to the declaration and
// to each template instantiation around it, as a __shared__ variable is).
template <typename T, typename Tag>
inline T& block_shared(Tag) {
  static T storage;
  static const bool registered = (register_shared(&storage, sizeof(T)), true);
  (void)registered;
  return storage;
}

// ---- device-side failures ------------------------------------------------------------------
// A device assert: recorded (the test expects it for bad targets) and the thread goes on, so
// the code after the assert must not touch memory it should not.
void device_assert(const char* msg, const char* file, unsigned line, const char* func);
// Any other emulated device fault (misaligned vector access, barrier divergence, deadlock):
// reported, and the case fails.
[[noreturn]] void device_fault(const char* what);

// ---- fast-math intrinsics ------------------------------------------------------------------
// bias 0: libm. bias -1 / +1: libm pushed to the edge of the documented error bound of
// __expf / __logf (CUDA C Programming Guide, intrinsic functions), downwards / upwards.
extern int g_fastmath_bias;
float fast_expf(float x);
float fast_logf(float x);

// ---- launches ------------------------------------------------------------------------------
struct Config {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  Config(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr)
      : grid(g), block(b), smem(s), stream(st) {}
  template <typename... A>
  auto operator()(A&&... a) const;
};

template <typename... A>
struct Bound {
  Config cfg;
  std::tuple<A...> args;
};

template <typename... A>
auto Config::operator()(A&&... a) const {
  return Bound<std::decay_t<A>...>{*this, std::tuple<std::decay_t<A>...>(std::forward<A>(a)...)};
}

// Runs body(ctx) once per thread of every block (or records a launch error).
void run_grid(const void* kernel, const Config& cfg, void (*body)(void*), void* ctx);

template <typename K, typename... A>
void operator->*(K* kernel, Bound<A...>&& b) {
  static_assert(std::is_function_v<K>, "a kernel launch needs a function");
  struct Ctx {
    K* kernel;
    std::tuple<A...>* args;
  } ctx{kernel, &b.args};
  run_grid(reinterpret_cast<const void*>(kernel), b.cfg,
           [](void* c) {
             auto* x = static_cast<Ctx*>(c);
             std::apply(x->kernel, *x->args);  // every thread gets its own copies
           },
           &ctx);
}

template <typename T>
inline void check_aligned(const T* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) device_fault(what);
}

}  // namespace emu

// ---- built-in variables --------------------------------------------------------------------
#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())

#define __assert_fail(msg, file, line, func) ::emu::device_assert(msg, file, line, func)

// ---- intrinsics ----------------------------------------------------------------------------
inline void __syncthreads() { ::emu::syncthreads(); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = ::emu::shfl_xor_bits(mask, bits, lane_mask, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

inline float __expf(float x) { return ::emu::fast_expf(x); }
inline float __logf(float x) { return ::emu::fast_logf(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }

inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline double __hiloint2double(int hi, int lo) {
  return std::bit_cast<double>((static_cast<uint64_t>(static_cast<uint32_t>(hi)) << 32) |
                               static_cast<uint32_t>(lo));
}
inline int __double2loint(double d) {
  return static_cast<int>(static_cast<uint32_t>(std::bit_cast<uint64_t>(d)));
}
inline int __double2hiint(double d) {
  return static_cast<int>(static_cast<uint32_t>(std::bit_cast<uint64_t>(d) >> 32));
}

// Cache-hinted accesses: a GPU faults on a misaligned address.
template <typename T>
inline T __ldcs(const T* p) {
  ::emu::check_aligned(p, "misaligned address in __ldcs");
  return *p;
}
template <typename T>
inline void __stcs(T* p, T v) {
  ::emu::check_aligned(p, "misaligned address in __stcs");
  *p = v;
}

// libdevice functions the kernels call by name (accurate, not affected by fast math).
extern "C" float __nv_tanhf(float);
extern "C" float __nv_powf(float, float);
extern "C" float __nv_log1pf(float);
extern "C" float __nv_expf(float);
