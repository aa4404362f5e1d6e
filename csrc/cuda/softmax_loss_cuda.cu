// Dtype dispatch of the softmax-family kernels (cross-entropy, focal, their fused forms)
// and of _rescale_grad_rows; the per-dtype instantiations live in softmax_loss_<dtype>.cu.
// Also holds the block-per-row launch settings (tuning.h) the launchers read.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <mutex>

#include "launch.h"
#include "tuning.h"

namespace tlf {

namespace cuda {

namespace {
std::mutex g_tuning_mu;
BlockRowTuning g_tuning;
}  // namespace

bool valid(const BlockRowTuning& t) {
  const bool threads_ok = t.max_threads == 128 || t.max_threads == 256 || t.max_threads == 512;
  const int n = t.cluster_blocks;
  const bool cluster_ok = n == 0 || n == 2 || n == 4 || n == 8 || n == 16;
  const bool bulk_ok = t.bulk_load == 0 || t.bulk_load == 1;
  return threads_ok && cluster_ok && bulk_ok && t.row_cache_bytes >= -1 && t.prefetch_bytes >= 0;
}

BlockRowTuning block_row_tuning() {
  std::lock_guard<std::mutex> lock(g_tuning_mu);
  return g_tuning;
}

bool set_block_row_tuning(const BlockRowTuning& t) {
  if (!valid(t)) return false;
  std::lock_guard<std::mutex> lock(g_tuning_mu);
  g_tuning = t;
  return true;
}

cudaError_t softmax_loss(const SoftmaxLossParams& p, Dtype dt, Mode mode, cudaStream_t stream) {
  switch (dt) {
    case Dtype::Float64:
      return softmax_loss_t<double>(p, mode, stream);
    case Dtype::BFloat16:
      return softmax_loss_t<__nv_bfloat16>(p, mode, stream);
    case Dtype::Float16:
      return softmax_loss_t<__half>(p, mode, stream);
    case Dtype::Float32:
    default:
      return softmax_loss_t<float>(p, mode, stream);
  }
}

cudaError_t rescale_grad_rows(void* grad, const RowLayout& layout, const RowVector& grad_loss,
                              const RowVector& grad_scale, Dtype dt, cudaStream_t stream) {
  switch (dt) {
    case Dtype::Float64:
      return rescale_grad_rows_t(static_cast<double*>(grad), layout, grad_loss, grad_scale,
                                 stream);
    case Dtype::BFloat16:
      return rescale_grad_rows_t(static_cast<__nv_bfloat16*>(grad), layout, grad_loss,
                                 grad_scale, stream);
    case Dtype::Float16:
      return rescale_grad_rows_t(static_cast<__half*>(grad), layout, grad_loss, grad_scale,
                                 stream);
    case Dtype::Float32:
    default:
      return rescale_grad_rows_t(static_cast<float*>(grad), layout, grad_loss, grad_scale,
                                 stream);
  }
}

}  // namespace cuda

}  // namespace tlf
