// One translation unit per dtype, as the real build's csrc/cuda/softmax_loss_<dtype>.cu:
// that file itself (the real launcher's instantiations), plus launches with a chosen shape.
// Built with -DEMU_DTYPE_FILE='"cuda/softmax_loss_f32.cu"' -DEMU_T=float (and so on).
#include EMU_DTYPE_FILE

#include <type_traits>

#include "harness.h"

namespace harness {

namespace {

using tlf::Mode;
using tlf::SoftmaxLossParams;
using namespace tlf::cuda;

template <typename T, Mode M, class G, bool V, bool kBulk = false>
cudaError_t launch(const SoftmaxLossParams& p, const Direct& d, bool grad_vec) {
  // As the launcher: no row cache for the plain backward, which has no first pass to fill
  // it.
  const int64_t cache = M == Mode::Backward && !kBulk ? 0 : d.cache;
  const size_t groups = G::kUsesBarriers               ? 1
                        : std::is_same_v<G, WarpGroup> ? static_cast<size_t>(d.threads / 32)
                                                       : static_cast<size_t>(d.threads);
  const size_t smem = static_cast<size_t>(cache) * sizeof(uint4) * groups;
  auto kernel = softmax_loss_kernel<T, M, G, V, kBulk>;
  if (smem > (48u << 10)) {
    const cudaError_t err =
        cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                             cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel ->* emu::Config(d.grid, d.threads, smem)(p, cache, grad_vec, d.prefetch);
  return cudaGetLastError();
}

// A cluster per row, launched as the launcher does (cudaLaunchKernelEx with a cluster
// dimension); the row cache is d.cache slots per block.
template <typename T, Mode M, bool kBulk = false>
cudaError_t launch_cluster(const SoftmaxLossParams& p, const Direct& d, bool grad_vec) {
  const int64_t cache = M == Mode::Backward && !kBulk ? 0 : d.cache;
  auto kernel = softmax_loss_kernel<T, M, ClusterGroup, true, kBulk>;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(d.cluster);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(d.grid));
  cfg.blockDim = dim3(static_cast<unsigned>(d.threads));
  cfg.dynamicSmemBytes = static_cast<size_t>(cache) * sizeof(uint4);
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  if (cfg.dynamicSmemBytes > (48u << 10)) {
    const cudaError_t err = cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(cfg.dynamicSmemBytes));
    if (err != cudaSuccess) return err;
  }
  const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, p, cache, grad_vec, d.prefetch);
  return err != cudaSuccess ? err : cudaGetLastError();
}

template <typename T, Mode M>
cudaError_t launch_mode(const SoftmaxLossParams& p, const Direct& d) {
  // The launcher's own test of whether the gradient can be stored 16 bytes at a time.
  const bool gvec = d.vec && detail::grad_vector_ok<T>(p, M != Mode::Forward);
  if constexpr (!std::is_same_v<T, double>) {
    if (d.vec && d.group == Group::Warp) return launch<T, M, WarpGroup, true>(p, d, gvec);
    if (d.vec && d.group == Group::Block) {
      if (d.bulk) return launch<T, M, BlockGroup, true, true>(p, d, gvec);
      return launch<T, M, BlockGroup, true>(p, d, gvec);
    }
    if (d.vec && d.group == Group::Cluster) {
      if (d.bulk) return launch_cluster<T, M, true>(p, d, gvec);
      return launch_cluster<T, M>(p, d, gvec);
    }
  }
  if (d.bulk) return cudaErrorInvalidValue;  // a block or cluster per row's vector path only
  if (d.group == Group::Cluster) return cudaErrorInvalidValue;  // vector rows only
  if (d.vec) return cudaErrorInvalidValue;  // not an instantiation the launcher has
  switch (d.group) {
    case Group::Thread:
      return launch<T, M, ThreadGroup, false>(p, d, false);
    case Group::Warp:
      return launch<T, M, WarpGroup, false>(p, d, false);
    default:
      return launch<T, M, BlockGroup, false>(p, d, false);
  }
}

}  // namespace

template <typename T>
cudaError_t softmax_direct(const SoftmaxLossParams& p, Mode mode, const Direct& d) {
  switch (mode) {
    case Mode::Forward:
      return launch_mode<T, Mode::Forward>(p, d);
    case Mode::Backward:
      return launch_mode<T, Mode::Backward>(p, d);
    default:
      return launch_mode<T, Mode::Fused>(p, d);
  }
}

template <typename T>
cudaError_t rescale_direct(T* grad, const tlf::RowLayout& layout, const tlf::RowVector& grad_loss,
                           const tlf::RowVector& grad_scale, const Direct& d) {
  // The three instantiations of rescale_grad_rows_t.
  switch (d.group) {
    case Group::Thread:
      rescale_grad_rows_kernel<T, ThreadGroup, false> ->* emu::Config(d.grid, d.threads)(
          grad, layout, grad_loss, grad_scale);
      break;
    case Group::Warp:
      rescale_grad_rows_kernel<T, WarpGroup, true> ->* emu::Config(d.grid, d.threads)(
          grad, layout, grad_loss, grad_scale);
      break;
    default:
      rescale_grad_rows_kernel<T, BlockGroup, true> ->* emu::Config(d.grid, d.threads)(
          grad, layout, grad_loss, grad_scale);
      break;
  }
  return cudaGetLastError();
}

template cudaError_t softmax_direct<EMU_T>(const SoftmaxLossParams&, Mode, const Direct&);
template cudaError_t rescale_direct<EMU_T>(EMU_T*, const tlf::RowLayout&, const tlf::RowVector&,
                                           const tlf::RowVector&, const Direct&);

}  // namespace harness
