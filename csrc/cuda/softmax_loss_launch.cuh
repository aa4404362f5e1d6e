// Host-side choice of kernel, group shape, row cache and grid for the softmax-family ops
// and _rescale_grad_rows. Included once per dtype (softmax_loss_<dtype>.cu) so the kernel
// instantiations compile in parallel.
//
//   classes contiguous (sc == 1):  C <= 32            one thread per row
//                                  C * size <= 4 KiB  one warp per row, 8 rows per block
//                                  larger             one block per row (128-512 threads)
//   classes strided:               C <= 32 or many rows: one thread per row (neighbouring
//                                  rows are neighbours in memory when sd == 1, so loads
//                                  coalesce); else a warp or a block per row
// Vector (16-byte) loads need sc == 1: each row peels its first elements up to a 16-byte
// boundary, so any vocabulary size and row stride is vectorised. The gradient is stored
// with 16-byte stores when its layout has the same offset modulo 16 bytes in every row
// (true for the contiguous gradient of a contiguous input, and in place).
// The block-per-row path's block size, row-cache cap and next-row L2 prefetch follow the
// run-time settings of tuning.h (defaults: 512 threads, the largest cache, no prefetch).
// With tuning.h's cluster_blocks set, rows of at least kClusterMinUnits vectors per thread
// on sm_90 and newer take a thread block cluster each instead (cluster_group.cuh): 128
// threads per block, each block caching its share of the row. With its bulk_load set, the
// block and cluster kernels on sm_90 and newer have the bulk-copy engine fill the row
// cache (bulk_copy.cuh), the forward-only kernel and the backward getting one too.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../kernel_params.h"
#include "group_reduce.cuh"
#include "launch.h"
#include "launch_utils.cuh"
#include "rescale_grad_kernels.cuh"
#include "softmax_loss_kernels.cuh"
#include "tuning.h"
#include "vec_io.cuh"

namespace tlf::cuda {

namespace detail {

constexpr int64_t kThreadRowMaxC = 32;
constexpr int64_t kWarpRowMaxBytes = 4096;
constexpr int kRowsPerWarpBlock = 8;
constexpr size_t kSmemReserve = 1024;  // static shared memory of the block reductions
constexpr int64_t kClusterMinUnits = 4;

template <typename T>
bool same_alignment(int64_t a_elems, int64_t b_elems) {
  return ((a_elems - b_elems) * static_cast<int64_t>(sizeof(T))) % 16 == 0;
}

// Whether every gradient row can use 16-byte stores after the same number of peeled
// elements as the input row.
template <typename T>
bool grad_vector_ok(const SoftmaxLossParams& p, bool with_grad) {
  if (p.in.sc != 1 || !with_grad) return false;
  const RowLayout& g = p.grad_layout;
  if (g.sc != 1) return false;
  const auto a = reinterpret_cast<uintptr_t>(p.input);
  const auto b = reinterpret_cast<uintptr_t>(p.grad_input);
  if ((a & 15u) != (b & 15u)) return false;
  if (p.in.B > 1 && !same_alignment<T>(p.in.sb, g.sb)) return false;
  if (p.in.D > 1 && !same_alignment<T>(p.in.sd, g.sd)) return false;
  return true;
}

// 16-byte row-cache slots one block may hold: what the device grants past the reductions'
// static shared memory, within tuning.h's cap.
inline int64_t row_cache_budget(const DeviceProps& props, const BlockRowTuning& tune) {
  const auto reserve = static_cast<int64_t>(kSmemReserve);
  int64_t budget = (static_cast<int64_t>(props.smem_optin) - reserve) / 16;
  if (tune.row_cache_bytes >= 0) budget = std::min(budget, tune.row_cache_bytes / 16);
  return std::max<int64_t>(budget, 0);
}

template <typename T, Mode kMode, class G, bool kVec, bool kBulk = false>
cudaError_t launch_rows(const SoftmaxLossParams& p, int threads, int rows_per_block,
                        int64_t cache_vecs, bool grad_vec, cudaStream_t stream,
                        int64_t prefetch_bytes = 0) {
  auto kernel = softmax_loss_kernel<T, kMode, G, kVec, kBulk>;
  // Every group of the block has its own cache slots.
  const size_t groups = G::kUsesBarriers ? 1 : static_cast<size_t>(rows_per_block);
  const int64_t rows = p.in.B * p.in.D;
  for (;;) {
    const size_t smem = static_cast<size_t>(cache_vecs) * sizeof(uint4) * groups;
    int grid = 0;
    const cudaError_t err =
        persistent_grid(kernel, threads, smem, ceil_div(rows, rows_per_block), &grid);
    if (err == cudaSuccess) {
      kernel<<<grid, threads, smem, stream>>>(p, cache_vecs, grad_vec, prefetch_bytes);
      return cudaGetLastError();
    }
    // A device that grants less shared memory than it reports: a smaller cache (the
    // results do not depend on its size), down to none. Any error but such a refusal
    // (refused_configuration) is returned as it is.
    if (cache_vecs == 0 || !refused_configuration(err)) return err;
    (void)cudaGetLastError();  // the refused request is not this launch's error
    cache_vecs /= 2;
  }
}

// A cluster of `cluster` blocks per row (vector path). The row cache holds the whole row
// (each block its share, a whole number of slots per thread) within the cap of tuning.h
// and what the device grants, halved while no cluster fits or the launch is refused.
// cudaErrorNotSupported, with no error left pending, when no cluster fits or launches even
// without a cache, when the device refuses clusters of that size (refused_configuration:
// say a GPU without non-portable sizes, or one whose launches of them fail), or when the
// build has no sm_90 code for this GPU: the caller takes a block per row instead. Any
// other error is returned at once, uncleared and not retried.
template <typename T, Mode kMode, bool kBulk = false>
cudaError_t launch_clusters(const SoftmaxLossParams& p, const DeviceProps& props,
                            const BlockRowTuning& tune, bool two_pass, bool grad_vec,
                            cudaStream_t stream) {
  auto kernel = softmax_loss_kernel<T, kMode, ClusterGroup, true, kBulk>;
  bool sm90 = false;
  if (const cudaError_t err = has_sm90_code(kernel, &sm90); err != cudaSuccess) return err;
  if (!sm90) return cudaErrorNotSupported;
  constexpr int kThreads = GroupTraits<ClusterGroup>::kMaxThreads;
  const int cluster = tune.cluster_blocks;
  const int64_t rows = p.in.B * p.in.D;
  int64_t cache = 0;
  if (two_pass || kBulk) {  // bulk copies land in the cache
    const int64_t per_thread =
        ceil_div(ceil_div(p.in.C, Vec16<T>::kVec), int64_t{cluster} * kThreads);
    cache = std::min(per_thread, row_cache_budget(props, tune) / kThreads) * kThreads;
  }
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(cluster);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.blockDim = dim3(kThreads);
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  for (;;) {
    cfg.gridDim = dim3(static_cast<unsigned>(cluster));
    cfg.dynamicSmemBytes = static_cast<size_t>(cache) * sizeof(uint4);
    int resident = 0;  // 0 too where the runtime refuses this configuration
    cudaError_t err = resident_clusters(kernel, cfg, cluster, &resident);
    if (err != cudaSuccess) return err;
    if (resident > 0) {
      const int64_t clusters = std::min<int64_t>(rows, resident);
      cfg.gridDim = dim3(static_cast<unsigned>(clusters * cluster));
      err = cudaLaunchKernelEx(&cfg, kernel, p, cache, grad_vec, tune.prefetch_bytes);
      if (err == cudaSuccess) return cudaGetLastError();
      if (!refused_configuration(err)) return err;
      (void)cudaGetLastError();  // the refused request is not this launch's error
      refuse_clusters(kernel, cfg, cluster);
    }
    // A device that grants less shared memory than it reports, or runs fewer clusters than
    // the occupancy calculator counts: a smaller cache (the results do not depend on its
    // size), down to none; then a block per row.
    if (cache == 0) return cudaErrorNotSupported;
    cache = cache / (2 * kThreads) * kThreads;
  }
}

template <typename T, Mode kMode>
cudaError_t launch_mode(const SoftmaxLossParams& p, cudaStream_t stream) {
  const int64_t rows = p.in.B * p.in.D;
  if (rows == 0) return cudaSuccess;
  DeviceProps props;
  cudaError_t err = current_device_props(&props);
  if (err != cudaSuccess) return err;

  constexpr int kN = Vec16<T>::kVec;
  const int64_t C = p.in.C;
  // float64 (correctness only) keeps to the scalar kernels: half the instantiations.
  constexpr bool kHasVec = !std::is_same_v<T, double>;
  const bool vec = kHasVec && p.in.sc == 1;
  const bool gvec = grad_vector_ok<T>(p, kMode != Mode::Forward);
  // A second pass over the row: the row cache saves its DRAM traffic.
  const bool two_pass =
      kMode == Mode::Fused || (kMode == Mode::Forward && (p.prob_target || p.label_smoothing > 0));
  const bool many_rows = rows >= static_cast<int64_t>(props.sms) * 256;

  const bool thread_rows = C <= kThreadRowMaxC || (p.in.sc != 1 && many_rows);
  if (thread_rows) {
    return launch_rows<T, kMode, ThreadGroup, false>(p, 256, 256, 0, false, stream);
  }
  if (static_cast<int64_t>(sizeof(T)) * C <= kWarpRowMaxBytes) {
    constexpr int kThreads = 32 * kRowsPerWarpBlock;
    if constexpr (kHasVec) {
      if (vec) {
        const int64_t cache = two_pass ? ceil_div(C, kN) : 0;
        return launch_rows<T, kMode, WarpGroup, true>(p, kThreads, kRowsPerWarpBlock, cache,
                                                      gvec, stream);
      }
    }
    return launch_rows<T, kMode, WarpGroup, false>(p, kThreads, kRowsPerWarpBlock, 0, false,
                                                   stream);
  }
  // A block per row: 512 threads (one block per SM: the register file) for rows of at
  // least 8 units (vectors or elements) per thread; smaller blocks for smaller rows, so
  // that several blocks share an SM and one's reductions overlap another's loads.
  const BlockRowTuning tune = block_row_tuning();
  const int64_t units = vec ? C / kN : C;
  if constexpr (kHasVec) {
    const int64_t cluster_threads =
        int64_t{tune.cluster_blocks} * GroupTraits<ClusterGroup>::kMaxThreads;
    if (vec && tune.cluster_blocks > 1 && props.cc_major >= 9 &&
        units >= kClusterMinUnits * cluster_threads) {
      const cudaError_t err =
          tune.bulk_load != 0
              ? launch_clusters<T, kMode, true>(p, props, tune, two_pass, gvec, stream)
              : launch_clusters<T, kMode>(p, props, tune, two_pass, gvec, stream);
      if (err != cudaErrorNotSupported) return err;
    }
  }
  int threads = std::min(tune.max_threads, GroupTraits<BlockGroup>::kMaxThreads);
  while (threads > 128 && units < 8 * threads) threads /= 2;
  if constexpr (kHasVec) {
    if (vec) {
      const int64_t full = std::min<int64_t>(ceil_div(C, kN), row_cache_budget(props, tune));
      // Bulk loads land in the row cache, so every kernel gets one then.
      bool bulk = tune.bulk_load != 0 && props.cc_major >= 9;
      if (bulk) {
        err = has_sm90_code(softmax_loss_kernel<T, kMode, BlockGroup, true, true>, &bulk);
        if (err != cudaSuccess) return err;
      }
      if (bulk) {
        return launch_rows<T, kMode, BlockGroup, true, true>(p, threads, 1, full, gvec, stream,
                                                             tune.prefetch_bytes);
      }
      return launch_rows<T, kMode, BlockGroup, true>(p, threads, 1, two_pass ? full : 0, gvec,
                                                     stream, tune.prefetch_bytes);
    }
  }
  return launch_rows<T, kMode, BlockGroup, false>(p, threads, 1, 0, false, stream);
}

}  // namespace detail

template <typename T>
cudaError_t softmax_loss_t(const SoftmaxLossParams& p, Mode mode, cudaStream_t stream) {
  switch (mode) {
    case Mode::Forward:
      return detail::launch_mode<T, Mode::Forward>(p, stream);
    case Mode::Backward:
      return detail::launch_mode<T, Mode::Backward>(p, stream);
    case Mode::Fused:
    default:
      return detail::launch_mode<T, Mode::Fused>(p, stream);
  }
}

template <typename T>
cudaError_t rescale_grad_rows_t(T* grad, const RowLayout& layout, const RowVector& grad_loss,
                                const RowVector& grad_scale, cudaStream_t stream) {
  const int64_t rows = layout.B * layout.D;
  if (rows == 0 || layout.C == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  int grid = 0;
  cudaError_t err;
  if (layout.sc != 1) {
    auto kernel = rescale_grad_rows_kernel<T, ThreadGroup, false>;
    err = persistent_grid(kernel, kThreads, 0, ceil_div(rows, kThreads), &grid);
    if (err != cudaSuccess) return err;
    kernel<<<grid, kThreads, 0, stream>>>(grad, layout, grad_loss, grad_scale);
  } else if (static_cast<int64_t>(sizeof(T)) * layout.C <= 4 * detail::kWarpRowMaxBytes) {
    auto kernel = rescale_grad_rows_kernel<T, WarpGroup, true>;
    err = persistent_grid(kernel, kThreads, 0, ceil_div(rows, kThreads / 32), &grid);
    if (err != cudaSuccess) return err;
    kernel<<<grid, kThreads, 0, stream>>>(grad, layout, grad_loss, grad_scale);
  } else {
    auto kernel = rescale_grad_rows_kernel<T, BlockGroup, true>;
    err = persistent_grid(kernel, kThreads, 0, rows, &grid);
    if (err != cudaSuccess) return err;
    kernel<<<grid, kThreads, 0, stream>>>(grad, layout, grad_loss, grad_scale);
  }
  return cudaGetLastError();
}

}  // namespace tlf::cuda
