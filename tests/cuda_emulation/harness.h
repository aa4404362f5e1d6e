// Launches with a chosen group shape (thread / warp / block / cluster per row), vector path,
// grid, block size, cluster size and row cache, for the softmax-family and _rescale_grad_rows kernels: every
// instantiation the real launcher can pick, at sizes small enough to emulate. Defined once
// per dtype in kernels_softmax.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_params.h"

namespace harness {

enum class Group : int { Thread = 0, Warp = 1, Block = 2, Cluster = 3 };

struct Direct {
  Group group = Group::Thread;
  bool vec = false;  // the 16-byte path (classes contiguous; not for float64)
  int grid = 1, threads = 32;
  int cluster = 1;  // blocks per cluster (Group::Cluster: a power of two; grid a multiple)
  int64_t cache = 0;  // row-cache slots (16 bytes) per group
  int64_t prefetch = 0;  // bytes of the next row to prefetch into L2 (vector path)
  bool bulk = false;  // Group::Block or Cluster, vec: the bulk-copy kernel
};

template <typename T>
cudaError_t softmax_direct(const tlf::SoftmaxLossParams& p, tlf::Mode mode, const Direct& d);

template <typename T>
cudaError_t rescale_direct(T* grad, const tlf::RowLayout& layout, const tlf::RowVector& grad_loss,
                           const tlf::RowVector& grad_scale, const Direct& d);

}  // namespace harness
