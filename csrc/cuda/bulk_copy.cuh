// The Hopper bulk-copy engine (cp.async.bulk, sm_90 and newer): one thread asks for a whole
// span of global memory to be copied into shared memory, and a shared-memory barrier
// (mbarrier) counts the bytes as they land. The loads in flight are then not limited by the
// registers of the threads that would otherwise carry them, which on a block per row with one
// block per SM is what keeps pass 1 from reading DRAM at full speed.
//
// Protocol (each barrier completes one phase per use; its parity alternates 0, 1, 0, ...):
//   mbar_init by one thread, then mbar_init_fence and a block barrier;
//   bulk_load by one thread (arms the barrier with the byte count, then starts the copy);
//   mbar_wait(bar, parity) by every thread that reads the copied bytes;
//   before a later bulk_load overwrites bytes that threads read, a block barrier (they are
//   done) and, by the issuing thread, async_proxy_fence.
// Sizes and both addresses are multiples of 16 bytes.
//
// The host emulator (tests/cuda_emulation, TLF_CUDA_EMULATOR) has these calls of its own: it
// performs a barrier's copies at the first wait on it, so a read before its wait sees stale
// shared memory, and a wait with no copy armed is a deadlock fault.
#pragma once

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

// Copies `bytes` (a multiple of 16, below 2^20) from global `src` to shared `dst`; `bar`'s
// current phase completes when they have landed. One thread per barrier and phase.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes,
                                          uint64_t* bar) {
#if defined(TLF_HAS_BULK_COPY)
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
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

// Returns once `bar`'s phase of parity `parity` has completed: the bytes of the copy armed on
// it are in shared memory and visible to this thread.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
#if defined(TLF_HAS_BULK_COPY)
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (!done);
#elif defined(TLF_CUDA_EMULATOR)
  ::emu::mbar_wait(bar, parity);
#else
  (void)bar, (void)parity;
  __trap();
#endif
}

}  // namespace tlf::cuda
