#include "host_buffers.h"

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <vector>

#include "tensor_params.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace tlf {

namespace {

constexpr size_t kBlockAlign = size_t(2) << 20;  // a transparent huge page
// Blocks from this size are kBlockAlign multiples, kBlockAlign aligned and advised onto
// huge pages (advise_huge_pages's own limit); smaller ones are whole 4 KiB pages.
constexpr size_t kHugeBlockBytes = size_t(8) << 20;
constexpr size_t kPage = size_t(4) << 10;

size_t block_bytes(size_t n) {
  const size_t unit = n < kHugeBlockBytes ? kPage : kBlockAlign;
  return (n + unit - 1) / unit * unit;
}

struct Block {
  void* ptr;
  size_t bytes;
};

// Blocks are mapped and unmapped whole on Linux: from the C heap they could reuse pages
// that are already resident (glibc serves large requests from its heap once it has seen
// large frees), and freeing them would not give memory back to the OS.
void* map_block(size_t bytes) {
#if defined(__linux__)
  if (bytes < kHugeBlockBytes) {
    void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return m == MAP_FAILED ? nullptr : m;
  }
  const size_t span = bytes + kBlockAlign;
  void* m = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  const auto base = reinterpret_cast<uintptr_t>(m);
  const uintptr_t start = (base + kBlockAlign - 1) & ~(uintptr_t(kBlockAlign) - 1);
  if (start > base) munmap(m, start - base);
  const uintptr_t end = start + bytes;
  if (base + span > end) munmap(reinterpret_cast<void*>(end), base + span - end);
  return reinterpret_cast<void*>(start);
#else
  void* p = nullptr;
  return posix_memalign(&p, kBlockAlign, bytes) == 0 ? p : nullptr;
#endif
}

void unmap_block(void* p, size_t bytes) {
#if defined(__linux__)
  munmap(p, bytes);
#else
  (void)bytes;
  std::free(p);
#endif
}

class HostCache {
 public:
  // A block of `bytes` (block_bytes'): a cached one of that size, or fresh memory.
  Block take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end()) {
        Block b = it->second.block;
        erase(it);
        ++hits_;
        in_use_ += b.bytes;
        report(b.ptr, static_cast<int64_t>(b.bytes));
        return b;
      }
      if (limit_ > 0) ++misses_;
    }
    void* p = map_block(bytes);
    TORCH_CHECK(p != nullptr, "torchloss_fused: out of host memory allocating ", bytes,
                " bytes");
    advise_huge_pages(p, bytes);
    std::lock_guard<std::mutex> lock(mu_);
    in_use_ += bytes;
    report(p, static_cast<int64_t>(bytes));
    return Block{p, bytes};
  }

  // A block whose tensor was freed: kept for reuse, the least recently given back evicted
  // first while over the limit; freed when it alone is over the limit.
  void give_back(Block b) {
    std::vector<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      in_use_ -= b.bytes;
      report(b.ptr, -static_cast<int64_t>(b.bytes));
      if (b.bytes <= limit_) {
        evict_to(limit_ - b.bytes, evicted);
        free_.emplace(b.bytes, Entry{b, ++clock_});
        cached_ += b.bytes;
      } else {
        evicted.push_back(b);
      }
    }
    for (const Block& e : evicted) unmap_block(e.ptr, e.bytes);  // outside the lock
  }

  void clear() { shrink(0, false); }
  void set_limit(size_t bytes) { shrink(bytes, true); }

  HostCacheInfo info() {
    std::lock_guard<std::mutex> lock(mu_);
    HostCacheInfo i;
    i.cached_bytes = static_cast<int64_t>(cached_);
    i.cached_blocks = static_cast<int64_t>(free_.size());
    i.limit_bytes = static_cast<int64_t>(limit_);
    i.hits = hits_;
    i.misses = misses_;
    return i;
  }

  size_t limit() {
    std::lock_guard<std::mutex> lock(mu_);
    return limit_;
  }

  // Around fork(): a child (a DataLoader worker, say) must not inherit the lock held by a
  // thread that does not exist there.
  void lock_for_fork() { mu_.lock(); }
  void unlock_after_fork() { mu_.unlock(); }

 private:
  struct Entry {
    Block block;
    uint64_t freed_at;
  };
  using Map = std::multimap<size_t, Entry>;

  void erase(Map::iterator it) {
    cached_ -= it->second.block.bytes;
    free_.erase(it);
  }

  // Frees cached blocks until at most `keep` bytes stay; with set_limit, `keep` becomes the
  // limit.
  void shrink(size_t keep, bool set_limit) {
    std::vector<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (set_limit) limit_ = keep;
      evict_to(keep, evicted);
    }
    for (const Block& e : evicted) unmap_block(e.ptr, e.bytes);  // outside the lock
  }

  // Under the lock: evicts the least recently given back blocks until at most `bytes` stay.
  void evict_to(size_t bytes, std::vector<Block>& evicted) {
    while (cached_ > bytes) {
      auto oldest = free_.begin();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->second.freed_at < oldest->second.freed_at) oldest = it;
      }
      evicted.push_back(oldest->second.block);
      erase(oldest);
    }
  }

  // Under the lock: the profiler's memory events (torch.profiler(profile_memory=True)), as
  // PyTorch's CPU allocator reports them.
  void report(void* ptr, int64_t delta) {
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(ptr, delta, in_use_, in_use_ + cached_,
                                       c10::Device(c10::DeviceType::CPU));
    }
  }

  std::mutex mu_;
  Map free_;
  size_t cached_ = 0, in_use_ = 0;
  size_t limit_ = size_t(2) << 30;  // torchloss_fused/_host_buffers.py sets it at import
  uint64_t clock_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

// Never destroyed: a tensor freed during interpreter shutdown still gives its block back.
HostCache& cache() {
  static HostCache* c = [] {
    auto* made = new HostCache();
#if defined(__unix__) || defined(__APPLE__)
    pthread_atfork([] { cache().lock_for_fork(); }, [] { cache().unlock_after_fork(); },
                   [] { cache().unlock_after_fork(); });
#endif
    return made;
  }();
  return *c;
}

void give_back(void* ctx) {
  auto* b = static_cast<Block*>(ctx);
  cache().give_back(*b);
  delete b;
}

// The storage allocator of host_empty's tensors (so that resizing one, Tensor.resize_,
// takes memory the same way): large blocks from the cache, the rest (and everything while
// the cache is off) from PyTorch's CPU allocator, advised onto huge pages when large.
class HostCacheAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kHostCacheMinBytes || cache().limit() == 0) {
      c10::DataPtr p = c10::GetCPUAllocator()->allocate(n);
      advise_huge_pages(p.get(), n);
      return p;
    }
    auto* b = new Block(cache().take(block_bytes(n)));
    return {b->ptr, b, &give_back, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

HostCacheAllocator g_allocator;

}  // namespace

at::Tensor host_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::Tensor(at::detail::empty_generic(
      sizes, &g_allocator, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, std::nullopt));
}

HostCacheInfo host_cache_info() { return cache().info(); }

void host_cache_clear() { cache().clear(); }

void set_host_cache_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "torchloss_fused: the host cache limit must be >= 0, got ", bytes);
  cache().set_limit(static_cast<size_t>(bytes));
}

}  // namespace tlf
