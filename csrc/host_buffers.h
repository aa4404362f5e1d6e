// Large CPU buffers (the kernels' gradients, linear cross-entropy's work buffers) from a
// cache of blocks that earlier calls' tensors gave back when they were freed.
//
// A fresh buffer of hundreds of MiB is faulted in page by page on first touch, and the OS
// zeroes every page before the kernel overwrites it: on a 2-core Xeon VM that was a third
// of a float32 cross-entropy forward + backward step (4096 x 32000: 79 ms with fresh pages,
// 52 ms on reused ones). A training loop frees its gradients every step and asks for the
// same sizes again, so the blocks are kept (up to a limit, least recently freed evicted
// first) and handed out again whole. Blocks of 8 MiB or more are 2 MiB multiples, 2 MiB
// aligned and advised onto transparent huge pages; smaller ones are whole 4 KiB pages.
// From 1 MiB: a (4096, 100) float32 gradient (1.6 MB) from PyTorch's allocator was, in
// some processes, faulted in afresh on every step (up to about 185 page faults a step:
// glibc's heap gave the pages back); a forward+backward step took a median 941 us that way
// and 692 from the cache (AMD EPYC, 1 thread, stop 45).
// The profiler sees every allocation and release, as with PyTorch's own CPU allocator; a
// process's resident memory keeps the cached blocks until host_cache_clear()
// (torchloss_fused.empty_cpu_cache()).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>

namespace tlf {

// Below this a buffer comes from PyTorch's allocator as usual.
constexpr size_t kHostCacheMinBytes = size_t(1) << 20;

// A contiguous CPU tensor of `sizes` and `dtype`, uninitialised: from the cache when it is
// at least kHostCacheMinBytes and the cache is on (limit > 0), else at::empty (advised onto
// huge pages when large).
at::Tensor host_empty(at::IntArrayRef sizes, at::ScalarType dtype);

struct HostCacheInfo {
  int64_t cached_bytes = 0;   // held for reuse now
  int64_t cached_blocks = 0;
  int64_t limit_bytes = 0;    // the most it holds; 0: off
  int64_t hits = 0;           // allocations served from the cache, since the start
  int64_t misses = 0;         // cacheable allocations that needed fresh memory
};
HostCacheInfo host_cache_info();

// Frees every cached block (blocks in use stay theirs and are cached when freed).
void host_cache_clear();

// Sets the limit (bytes, >= 0; 0 turns caching off), freeing blocks above it.
void set_host_cache_limit(int64_t bytes);

}  // namespace tlf
