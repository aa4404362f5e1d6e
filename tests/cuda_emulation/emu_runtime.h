// Host emulation of the CUDA features the kernels of csrc/cuda use, for a host compiler
// (g++) and the CUDA toolkit's own headers (cuda_runtime.h, cuda_bf16.h, cuda_fp16.h: their
// types and host conversion code). Force-included before the kernel sources, which the test
// copies into its build directory with the only three rewrites a host compiler needs
// (tests/test_cuda_emulated.py, rewrite_kernel_source):
//   extern __shared__ T name[];      ->  T* name = ::emu::dynamic_smem<T>();
//   __shared__ T name[N];            ->  auto& name = ::emu::block_shared<T[N]>([] {});
//   kernel<<<grid, block, smem, s>>>(args)  ->  kernel ->* ::emu::Config(grid, block, smem, s)(args)
// cudaLaunchKernelEx (thread block clusters) needs no rewrite: a macro below takes it over.
//
// Every CUDA thread of a block is a fiber (own stack) of one host thread; the blocks of a
// cluster (one block without clusters) run together, clusters one after another.
// __syncthreads(), the shuffles and the cluster barrier are barriers: a fiber runs until
// it reaches one, then the next fiber runs, so the outcome depends only on the kernel and on
// the schedule (fiber and block order, see emu::Schedule), never on the host's timing.
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
// The kernels' own emulator hooks (csrc/cuda/bulk_copy.cuh) key on this.
#define TLF_CUDA_EMULATOR 1

namespace emu {

// ---- the running fiber ---------------------------------------------------------------------
// Its block's rank in the cluster, and blocks per cluster (1 without clusters); threadIdx and
// friends below.
extern unsigned g_cluster_rank, g_cluster_size;

// ---- barriers ------------------------------------------------------------------------------
void syncthreads();  // the threads of the calling block
// All 32 lanes of the warp must arrive; returns the bits lane (lane ^ lane_mask), or lane
// src_lane, passed in.
uint64_t shfl_xor_bits(unsigned mask, uint64_t bits, int lane_mask, int width);
uint64_t shfl_idx_bits(unsigned mask, uint64_t bits, int src_lane, int width);
// The split cluster barrier: wait returns once every thread of every block of the cluster has
// arrived in the phase of the caller's arrive (a wait without an arrive is a device fault).
void cluster_arrive();
void cluster_wait();

// ---- shared memory -------------------------------------------------------------------------
// Every block of a cluster has its own copy of all of it (another block's through
// __cluster_map_shared_rank), filled with 0xff (NaN in every float format) at the start of
// every cluster, so a read before a write shows.
constexpr unsigned kMaxClusterBlocks = 16;
// The launch's dynamic shared memory of the running block: exactly its byte count.
void* dynamic_smem_ptr();
template <typename T>
inline T* dynamic_smem() {
  return static_cast<T*>(dynamic_smem_ptr());
}
// A static __shared__ variable: block r of the running cluster uses copy[r], each exactly
// `bytes` (ASan or canaries around it), 64-byte aligned.
struct SharedVar {
  size_t bytes;
  unsigned char* copy[kMaxClusterBlocks];
};
SharedVar& register_shared(size_t bytes);
// One variable per rewritten declaration (the lambda's type is unique to the declaration and
// to each template instantiation around it, as a __shared__ variable is).
template <typename T, typename Tag>
inline T& block_shared(Tag) {
  static_assert(alignof(T) <= 64);
  static SharedVar& var = register_shared(sizeof(T));
  return *reinterpret_cast<T*>(var.copy[g_cluster_rank]);
}
// The same byte of block `rank`'s copy of the caller's shared memory.
void* map_shared_rank(const void* p, unsigned rank);

// ---- bulk copies (sm_90 cp.async.bulk completing on an mbarrier; csrc/cuda/bulk_copy.cuh) --
// A phase's copies are performed at the first wait once all the bytes it was armed for are
// issued, so a read before its wait sees what shared memory held; a wait before then blocks
// (a deadlock if they never come). Misuse (an uninitialised barrier, a second arrival in
// one phase, a copy beyond the armed bytes or before the arming, a misaligned copy, a
// destination outside dynamic shared memory) is a device fault.
void mbar_init(void* bar);
void mbar_expect(void* bar, uint32_t bytes);
void bulk_load(void* dst, const void* src, uint32_t bytes, void* bar);
void mbar_wait(void* bar, uint32_t parity);

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
  unsigned cluster = 0;  // blocks per cluster; 0: a launch without clusters
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

// Runs body(ctx) once per thread of every block, or records a launch error; returns it (and
// sets it as the last error, as a GPU does).
cudaError_t run_grid(const void* kernel, const Config& cfg, void (*body)(void*), void* ctx);

template <typename K, typename Args>
cudaError_t launch(K* kernel, const Config& cfg, Args& args) {
  static_assert(std::is_function_v<K>, "a kernel launch needs a function");
  struct Ctx {
    K* kernel;
    Args* args;
  } ctx{kernel, &args};
  return run_grid(reinterpret_cast<const void*>(kernel), cfg,
                  [](void* c) {
                    auto* x = static_cast<Ctx*>(c);
                    std::apply(x->kernel, *x->args);  // every thread gets its own copies
                  },
                  &ctx);
}

template <typename K, typename... A>
void operator->*(K* kernel, Bound<A...>&& b) {
  launch(kernel, b.cfg, b.args);
}

// The launch attributes: *cluster is the cluster size, 0 without one. Any other attribute, or
// a cluster that is not (n, 1, 1), is recorded as a failed launch and returned.
cudaError_t launch_attributes(const void* kernel, const cudaLaunchConfig_t& config,
                              unsigned* cluster);

// cudaLaunchKernelEx: the arguments converted to the kernel's parameter types first, as CUDA's
// own template does.
template <typename... P, typename... A>
cudaError_t launch_ex(const cudaLaunchConfig_t* config, void (*kernel)(P...), A&&... args) {
  std::tuple<P...> params(std::forward<A>(args)...);
  Config cfg(config->gridDim, config->blockDim, config->dynamicSmemBytes, config->stream);
  const cudaError_t err =
      launch_attributes(reinterpret_cast<const void*>(kernel), *config, &cfg.cluster);
  return err != cudaSuccess ? err : launch(kernel, cfg, params);
}

template <typename T>
inline void check_aligned(const T* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) device_fault(what);
}

}  // namespace emu

// ---- built-in variables --------------------------------------------------------------------
// Set for the running fiber. Variables, not macros: a launcher's cudaLaunchConfig_t has
// members named gridDim and blockDim.
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

#define __assert_fail(msg, file, line, func) ::emu::device_assert(msg, file, line, func)

// cuda_runtime.h's template type-erases the arguments for cudaLaunchKernelExC, which the
// emulator could not call back: the launch is taken over by name (`::cudaLaunchKernelEx` too).
template <typename... P, typename... A>
inline cudaError_t emu_cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(P...),
                                          A&&... args) {
  return ::emu::launch_ex(config, kernel, std::forward<A>(args)...);
}
#define cudaLaunchKernelEx emu_cudaLaunchKernelEx

// ---- intrinsics ----------------------------------------------------------------------------
inline void __syncthreads() { ::emu::syncthreads(); }

namespace emu {
// A shuffle of any value of up to 8 bytes, as its bits.
template <typename T, typename Shuffle>
inline T shfl_value(T v, Shuffle shuffle) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = shuffle(bits);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
}  // namespace emu

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::emu::shfl_value(
      v, [&](uint64_t bits) { return ::emu::shfl_xor_bits(mask, bits, lane_mask, width); });
}

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return ::emu::shfl_value(
      v, [&](uint64_t bits) { return ::emu::shfl_idx_bits(mask, bits, src_lane, width); });
}

// Thread block clusters (sm_90): the built-ins of CUDA's crt/sm_90_rt.h.
inline unsigned __clusterRelativeBlockRank() { return ::emu::g_cluster_rank; }
inline unsigned __clusterSizeInBlocks() { return ::emu::g_cluster_size; }
inline void __cluster_barrier_arrive() { ::emu::cluster_arrive(); }
inline void __cluster_barrier_arrive_relaxed() { ::emu::cluster_arrive(); }  // memory is SC
inline void __cluster_barrier_wait() { ::emu::cluster_wait(); }
inline void* __cluster_map_shared_rank(const void* ptr, unsigned target_block_rank) {
  return ::emu::map_shared_rank(ptr, target_block_rank);
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
