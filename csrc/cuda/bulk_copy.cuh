// The Hopper bulk-copy engine (cp.async.bulk, sm_90 and newer): one thread asks for a whole
// span of global memory to be copied into shared memory, and a shared-memory barrier
// (mbarrier) counts the bytes as they land. The loads in flight are then not limited by the
// registers of the threads that would otherwise carry them, which on a block per row with one
// block per SM is what keeps pass 1 from reading DRAM at full speed.
//
// Protocol (each barrier completes one phase per use; its parity alternates 0, 1, 0, ...):
//   mbar_init by one thread, then mbar_init_fence and a block barrier;
//   mbar_expect by one thread (arms the barrier with the bytes to come), then its bulk_loads;
//   mbar_wait(bar, parity) by every thread that reads the copied bytes;
//   before a later bulk_load overwrites bytes that threads read, a block barrier (they are
//   done) and, by the issuing thread, async_proxy_fence.
// Sizes and both addresses are multiples of 16 bytes.
//
// The host emulator (tests/cuda_emulation, TLF_CUDA_EMULATOR) has these calls of its own: it
// performs a phase's copies at the first wait after they are all issued, so a read before
// its wait sees stale shared memory, and a wait on a phase that never completes is a
// deadlock fault.
#pragma once

#include <assert.h>  // declares __assert_fail for device code too
#include <cuda_runtime.h>

#include <cstdint>

namespace tlf::cuda {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define TLF_HAS_BULK_COPY 1
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

__device__ __forceinline__ void mbar_init(uint64_t* bar) {
#if defined(TLF_HAS_BULK_COPY)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)) : "memory");
#elif defined(TLF_CUDA_EMULATOR)
  ::emu::mbar_init(bar);
#else
  (void)bar;
  __trap();
#endif
}

// The barriers' initialisation is visible to the bulk-copy engine (then a block barrier makes
// it visible to the other threads).
__device__ __forceinline__ void mbar_init_fence() {
#if defined(TLF_HAS_BULK_COPY)
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

// Orders this block's earlier generic accesses to shared memory (the reads of the previous
// row, ordered here by a block barrier) before the bulk copies this thread starts next.
__device__ __forceinline__ void async_proxy_fence() {
#if defined(TLF_HAS_BULK_COPY)
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

// Arms `bar`'s current phase for `bytes` (below 2^20; 0: the phase completes at once) of
// copies, which bulk_load then starts. One thread per barrier and phase.
__device__ __forceinline__ void mbar_expect(uint64_t* bar, uint32_t bytes) {
#if defined(TLF_HAS_BULK_COPY)
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
#elif defined(TLF_CUDA_EMULATOR)
  ::emu::mbar_expect(bar, bytes);
#else
  (void)bar, (void)bytes;
  __trap();
#endif
}

// Copies `bytes` (a positive multiple of 16) from global `src` to shared `dst`, counted on
// `bar`'s armed phase, which completes once all the bytes it expects have landed.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes,
                                          uint64_t* bar) {
#if defined(TLF_HAS_BULK_COPY)
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
#elif defined(TLF_CUDA_EMULATOR)
  ::emu::bulk_load(dst, src, bytes, bar);
#else
  (void)dst, (void)src, (void)bytes, (void)bar;
  __trap();
#endif
}

#if defined(TLF_HAS_BULK_COPY)
__device__ __forceinline__ bool mbar_try_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      " selp.u32 %0, 1, 0, p;\n}"
      : "=r"(done)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
  return done != 0;
}

// The GPU's global nanosecond timer (%globaltimer): one clock for every SM, in wall time.
__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// A wait this long (about 137 s) means a copy that will never land (a bug): a device assert
// ends the kernel with an error instead of hanging the process. Timed by %globaltimer, not
// clock64(), which counts the cycles of one SM at whatever clock it runs: a thread that
// preemption resumes on another SM (PTX ISA, %smid) would compare two SMs'
// counters. A copy takes microseconds; the bound leaves room for compute-sanitizer's
// slowdown and time-slicing with other processes (DeepEP's waits give up after about
// 100 s). Only a debugger halted at a breakpoint mid-wait for longer can trip it spuriously.
constexpr uint64_t kBulkWaitNs = uint64_t{1} << 37;
#endif

// Returns once `bar`'s phase of parity `parity` has completed: the bytes of the copy armed on
// it are in shared memory and visible to this thread.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
#if defined(TLF_HAS_BULK_COPY)
  if (mbar_try_wait(bar, parity)) return;
  const uint64_t t0 = global_ns();
  while (!mbar_try_wait(bar, parity)) {
    if (global_ns() - t0 > kBulkWaitNs) {
      __assert_fail("bulk copy never completed (mbarrier wait timed out)", __FILE__, __LINE__,
                    __func__);
    }
  }
#elif defined(TLF_CUDA_EMULATOR)
  ::emu::mbar_wait(bar, parity);
#else
  (void)bar, (void)parity;
  __trap();
#endif
}

}  // namespace tlf::cuda
