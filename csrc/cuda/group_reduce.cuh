// Groups of threads that cooperate on one row: a thread, a warp, or a whole block. Each
// group walks rows r = first(), first() + stride(), ... (a persistent grid), and reduces
// per-thread partials in a fixed order (butterfly shuffles, then warp partials read in
// warp order), never with atomics, so results are bitwise the same run to run and every
// thread of the group receives the same value.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "device_math.cuh"

namespace tlf::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// Where a group keeps vector v of its row in its shared-memory row cache (softmax kernels):
// cache_cover(cap), how many of the row's vectors (the first ones) a cache of cap 16-byte
// slots holds; cache_slot(v), the slot of vector v < cache_cover(cap); cache_step(), the
// slot distance between a thread's vectors v and v + size(). A thread, a warp or a block
// caches its whole row in order: slot v.
template <class G>
struct CacheByVector {
  __device__ __forceinline__ int64_t cache_cover(int64_t cap) const { return cap; }
  __device__ __forceinline__ int64_t cache_slot(int64_t v) const { return v; }
  __device__ __forceinline__ int64_t cache_step() const {
    return static_cast<const G*>(this)->size();
  }
};

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max_nan(acc_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = max_nan(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

// Merges the warp's states: the common maximum first, then one rescale per lane and a
// plain sum, which keeps the dependent chain short (one exp instead of one per step).
template <typename acc_t>
__device__ __forceinline__ void warp_merge(LseState<acc_t>& st) {
  const acc_t M = warp_max_nan(st.m);
  st.s = warp_sum(st.rescaled(M));
  st.m = M;
}

// One thread per row: for tiny class counts, or strided classes with many rows.
struct ThreadGroup : CacheByVector<ThreadGroup> {
  static constexpr bool kUsesBarriers = false;
  __device__ __forceinline__ int lane() const { return 0; }
  __device__ __forceinline__ int size() const { return 1; }
  __device__ __forceinline__ int slot() const { return threadIdx.x; }
  __device__ __forceinline__ int64_t first() const {
    return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  }
  __device__ __forceinline__ int64_t stride() const {
    return static_cast<int64_t>(gridDim.x) * blockDim.x;
  }
  template <typename acc_t>
  __device__ __forceinline__ acc_t sum(acc_t v) const {
    return v;
  }
  template <typename acc_t>
  __device__ __forceinline__ void merge(LseState<acc_t>&) const {}
};

// One warp per row: rows of up to a few thousand classes.
struct WarpGroup : CacheByVector<WarpGroup> {
  static constexpr bool kUsesBarriers = false;
  __device__ __forceinline__ int lane() const { return threadIdx.x & 31; }
  __device__ __forceinline__ int size() const { return 32; }
  __device__ __forceinline__ int slot() const { return threadIdx.x >> 5; }
  __device__ __forceinline__ int64_t first() const {
    return static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  }
  __device__ __forceinline__ int64_t stride() const {
    return static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  }
  template <typename acc_t>
  __device__ __forceinline__ acc_t sum(acc_t v) const {
    return warp_sum(v);
  }
  template <typename acc_t>
  __device__ __forceinline__ void merge(LseState<acc_t>& st) const {
    warp_merge(st);
  }
};

// One block per row (blockDim.x a multiple of 32, at most 1024): large vocabularies.
struct BlockGroup : CacheByVector<BlockGroup> {
  static constexpr bool kUsesBarriers = true;
  __device__ __forceinline__ int lane() const { return threadIdx.x; }
  __device__ __forceinline__ int size() const { return blockDim.x; }
  __device__ __forceinline__ int slot() const { return 0; }
  __device__ __forceinline__ int64_t first() const { return blockIdx.x; }
  __device__ __forceinline__ int64_t stride() const { return gridDim.x; }
  // The block's run of each size()-vector segment of a row (bulk copies): all of it.
  __device__ __forceinline__ int64_t block_share_offset() const { return 0; }
  __device__ __forceinline__ int64_t block_share_length() const { return blockDim.x; }

  template <typename acc_t>
  __device__ __forceinline__ acc_t sum(acc_t v) const {
    acc_t* part = scratch<acc_t>();
    v = warp_sum(v);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    acc_t total = part[0];
    const int warps = blockDim.x >> 5;
    for (int w = 1; w < warps; ++w) total += part[w];
    __syncthreads();  // the scratch is reused by the next reduction
    return total;
  }

  template <typename acc_t>
  __device__ __forceinline__ void merge(LseState<acc_t>& st) const {
    acc_t* part = scratch<acc_t>();
    warp_merge(st);
    if ((threadIdx.x & 31) == 0) {
      part[threadIdx.x >> 5] = st.m;
      part[32 + (threadIdx.x >> 5)] = st.s;
    }
    __syncthreads();
    const int warps = blockDim.x >> 5;
    acc_t M = part[0];
    for (int w = 1; w < warps; ++w) M = max_nan(M, part[w]);
    acc_t S = 0;
    for (int w = 0; w < warps; ++w) {
      LseState<acc_t> wst;
      wst.m = part[w];
      wst.s = part[32 + w];
      S += wst.rescaled(M);
    }
    __syncthreads();
    st.m = M;
    st.s = S;
  }

 private:
  template <typename acc_t>
  static __device__ __forceinline__ acc_t* scratch() {
    __shared__ double buf[64];  // 32 warps x (m, s), room for double
    return reinterpret_cast<acc_t*>(buf);
  }
};

}  // namespace tlf::cuda
