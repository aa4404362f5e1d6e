// One row per thread block cluster (sm_90 and newer), for the softmax kernels' largest rows.
// A block per row with the whole row in its shared memory fills an SM alone, so while it
// reduces or writes, nothing on that SM reads DRAM. Spread over the n blocks of a cluster,
// each block keeps only its share of the row, several rows' blocks share an SM and overlap
// their phases, and the logits still come from DRAM once.
//
// Reductions: each block's partial as a BlockGroup's, published in the block's shared
// memory; after one cluster barrier, lane b of every warp reads block b's partial through
// distributed shared memory (one round trip, not one per block), and the warp combines them
// in rank order through shuffles, so every block of the cluster gets the same bits, run
// after run. The partials alternate between two slots, so a slot is written again only two
// reductions later, after a barrier that every reader of it has passed: one cluster barrier
// per reduction, and one more before the blocks exit (finish()), after which no block reads
// another's shared memory. Blocks and clusters are sized in powers of two.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "device_math.cuh"
#include "group_reduce.cuh"

// CUDA declares the cluster built-ins for sm_90 and newer device code and for the host pass;
// a launcher only picks clusters on such a device. The emulator (tests/cuda_emulation)
// defines them.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define TLF_HAS_CLUSTERS 1
#else
#define TLF_HAS_CLUSTERS 0
#endif

namespace tlf::cuda {

// Every thread of every block of the cluster: writes before it (shared memory included)
// are visible to reads after it, in any block of the cluster.
__device__ __forceinline__ void cluster_sync() {
#if TLF_HAS_CLUSTERS
  __cluster_barrier_arrive();
  __cluster_barrier_wait();
#else
  __trap();
#endif
}

// The same shared variable in block `rank` of the cluster.
template <typename T>
__device__ __forceinline__ T* cluster_peer(T* p, unsigned rank) {
#if TLF_HAS_CLUSTERS
  return static_cast<T*>(__cluster_map_shared_rank(p, rank));
#else
  __trap();
  return p;
#endif
}

__device__ __forceinline__ int log2_of_pow2(unsigned v) {
  int l = 0;
  while ((1u << l) < v) ++l;
  return l;
}

struct ClusterGroup {
  static constexpr bool kUsesBarriers = true;

  __device__ __forceinline__ ClusterGroup() {
#if TLF_HAS_CLUSTERS
    rank_ = __clusterRelativeBlockRank();
    blocks_ = __clusterSizeInBlocks();
#else
    __trap();
#endif
    lg_threads_ = log2_of_pow2(blockDim.x);
    lg_blocks_ = log2_of_pow2(blocks_);
  }

  __device__ __forceinline__ int lane() const {
    return static_cast<int>((rank_ << lg_threads_) + threadIdx.x);
  }
  __device__ __forceinline__ int size() const { return 1 << (lg_threads_ + lg_blocks_); }
  __device__ __forceinline__ int slot() const { return 0; }
  // Cluster k is blocks k n .. k n + n - 1 of the 1-D grid.
  __device__ __forceinline__ int64_t first() const { return blockIdx.x >> lg_blocks_; }
  __device__ __forceinline__ int64_t stride() const { return gridDim.x >> lg_blocks_; }

  // Thread i of a block holds the row's vectors lane, lane + size(), ... in its slots i,
  // i + blockDim.x, ...: a block's cache of cap slots covers the row's first
  // (cap / blockDim.x) size() vectors.
  __device__ __forceinline__ int64_t cache_cover(int64_t cap) const {
    return (cap >> lg_threads_) << (lg_threads_ + lg_blocks_);
  }
  __device__ __forceinline__ int64_t cache_slot(int64_t v) const {
    return ((v >> (lg_threads_ + lg_blocks_)) << lg_threads_) + threadIdx.x;
  }
  __device__ __forceinline__ int64_t cache_step() const { return blockDim.x; }
  // The block's run of each size()-vector segment of a row (bulk copies): its threads'
  // vectors, blockDim.x of them from rank * blockDim.x.
  __device__ __forceinline__ int64_t block_share_offset() const {
    return static_cast<int64_t>(rank_) << lg_threads_;
  }
  __device__ __forceinline__ int64_t block_share_length() const { return blockDim.x; }

  template <typename acc_t>
  __device__ __forceinline__ acc_t sum(acc_t v) const {
    acc_t* x = exchange<acc_t>();
    const acc_t part = block_.sum(v);
    if (threadIdx.x == 0) x[0] = part;
    cluster_sync();
    const acc_t mine = peer_value(x);
    acc_t total = __shfl_sync(kFullMask, mine, 0);
    for (unsigned b = 1; b < blocks_; ++b) total += __shfl_sync(kFullMask, mine, b);
    return total;
  }

  template <typename acc_t>
  __device__ __forceinline__ void merge(LseState<acc_t>& st) const {
    acc_t* x = exchange<acc_t>();
    block_.merge(st);
    if (threadIdx.x == 0) {
      x[0] = st.m;
      x[1] = st.s;
    }
    cluster_sync();
    const acc_t m = peer_value(x), s = peer_value(x + 1);
    acc_t M = __shfl_sync(kFullMask, m, 0);
    for (unsigned b = 1; b < blocks_; ++b) M = max_nan(M, __shfl_sync(kFullMask, m, b));
    acc_t S = 0;
    for (unsigned b = 0; b < blocks_; ++b) {
      LseState<acc_t> bst;
      bst.m = __shfl_sync(kFullMask, m, b);
      bst.s = __shfl_sync(kFullMask, s, b);
      S += bst.rescaled(M);
    }
    st.m = M;
    st.s = S;
  }

  // Before the kernel's blocks exit: every block's last partial has been read.
  __device__ __forceinline__ void finish() const { cluster_sync(); }

 private:
  BlockGroup block_;
  unsigned rank_ = 0, blocks_ = 1;
  int lg_threads_ = 0, lg_blocks_ = 0;
  mutable unsigned phase_ = 0;  // which exchange slot the next reduction writes

  // This block's exchange slot for the next reduction (and the one after it alternates).
  template <typename acc_t>
  __device__ __forceinline__ acc_t* exchange() const {
    __shared__ double xch[4];  // two slots, each this block's (m, s) or sum
    phase_ ^= 1u;
    return reinterpret_cast<acc_t*>(xch + 2 * phase_);
  }

  // The value at `x` in block (lane mod 32) of the cluster, for lanes below the cluster size.
  template <typename acc_t>
  __device__ __forceinline__ acc_t peer_value(acc_t* x) const {
    const unsigned lane = threadIdx.x & 31u;
    return lane < blocks_ ? *cluster_peer(x, lane) : acc_t(0);
  }
};

}  // namespace tlf::cuda
