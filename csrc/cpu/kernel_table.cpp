#include <ATen/Version.h>
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

#include <algorithm>
#include <atomic>

#include "kernels.h"

namespace tlf::cpu {

namespace {

int64_t last_level_cache_bytes() {
  long bytes = 0;
#if defined(_SC_LEVEL3_CACHE_SIZE)
  bytes = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (bytes <= 0) bytes = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
  return bytes > 0 ? static_cast<int64_t>(bytes) : int64_t{32} << 20;
}

std::atomic<int64_t> stream_threshold{-1};  // -1: the default

}  // namespace

int64_t stream_threshold_bytes() {
  static const int64_t kDefault = last_level_cache_bytes();
  const int64_t t = stream_threshold.load(std::memory_order_relaxed);
  return t < 0 ? kDefault : t;
}

int64_t map_stream_threshold_bytes() {
  constexpr int64_t kMapDefault = int64_t{4} << 20;
  const int64_t t = stream_threshold.load(std::memory_order_relaxed);
  return t < 0 ? std::min(stream_threshold_bytes(), kMapDefault) : t;
}

void set_stream_threshold_bytes(int64_t bytes) {
  stream_threshold.store(bytes < 0 ? -1 : bytes, std::memory_order_relaxed);
}

const KernelTable& kernel_table() {
  // at::get_cpu_capability() is PyTorch's own choice for its kernels: the best instruction
  // set this CPU has, lowered by ATEN_CPU_CAPABILITY when set.
  static const KernelTable* table = [] {
#if defined(TLF_X86_KERNELS)
    const std::string cap = at::get_cpu_capability();
    if (cap.rfind("AVX512", 0) == 0) return &AVX512::kTable;
    if (cap == "AVX2") return &AVX2::kTable;
#endif
    return &DEFAULT::kTable;
  }();
  return *table;
}

}  // namespace tlf::cpu
