// Launch of the elementwise sigmoid focal loss kernels (16-byte accesses when aligned).
#include <algorithm>
#include <cstdint>

#include "launch.h"
#include "launch_utils.cuh"
#include "sigmoid_focal_kernels.cuh"

namespace tlf {

namespace cuda {

namespace {

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

template <typename T, bool kBackward>
cudaError_t launch_sigmoid_focal(const SigmoidFocalParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  constexpr int kN = Vec16<T>::kVec;
  const void* out = kBackward ? p.grad_input : p.loss;
  const bool vec = aligned16(p.input) && aligned16(p.target) && aligned16(out) &&
                   (!kBackward || p.scalar_grad || aligned16(p.grad_loss));
  const int64_t units = vec ? ceil_div(p.n, kN) : p.n;
  int grid = 0;
  cudaError_t err;
  if (vec) {
    auto kernel = sigmoid_focal_kernel<T, true, kBackward>;
    err = persistent_grid(kernel, kThreads, 0, ceil_div(units, kThreads), &grid);
    if (err != cudaSuccess) return err;
    kernel<<<grid, kThreads, 0, stream>>>(p);
  } else {
    auto kernel = sigmoid_focal_kernel<T, false, kBackward>;
    err = persistent_grid(kernel, kThreads, 0, ceil_div(units, kThreads), &grid);
    if (err != cudaSuccess) return err;
    kernel<<<grid, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_sigmoid_focal(const SigmoidFocalParams& p, bool backward,
                                 cudaStream_t stream) {
  return backward ? launch_sigmoid_focal<T, true>(p, stream)
                  : launch_sigmoid_focal<T, false>(p, stream);
}

template <typename T>
cudaError_t launch_sigmoid_focal_sum(const SigmoidFocalParams& p, void* partials, void* out,
                                     cudaStream_t stream) {
  using acc_t = acc_of<T>;
  constexpr int kThreads = 256;
  constexpr int kN = Vec16<T>::kVec;
  auto* part = static_cast<acc_t*>(partials);
  const bool grad = p.grad_input != nullptr;
  const bool vec = aligned16(p.input) && aligned16(p.target) && (!grad || aligned16(p.grad_input));
  const int64_t units = vec ? ceil_div(p.n, kN) : p.n;
  // A grid that depends on n alone, not on the device: the same sum on every GPU.
  const int grid = static_cast<int>(std::min<int64_t>(ceil_div(units, kThreads),
                                                      kSigmoidSumBlocks));
  if (grid > 0) {
    if (vec) {
      (grad ? sigmoid_focal_sum_kernel<T, true, true> : sigmoid_focal_sum_kernel<T, true, false>)
          <<<grid, kThreads, 0, stream>>>(p, part);
    } else {
      (grad ? sigmoid_focal_sum_kernel<T, false, true>
            : sigmoid_focal_sum_kernel<T, false, false>)<<<grid, kThreads, 0, stream>>>(p, part);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  sum_partials_kernel<acc_t><<<1, kThreads, 0, stream>>>(part, grid, p.scale,
                                                         static_cast<acc_t*>(out));
  return cudaGetLastError();
}

}  // namespace

cudaError_t sigmoid_focal_sum(const SigmoidFocalParams& p, Dtype dt, void* partials, void* out,
                              cudaStream_t stream) {
  switch (dt) {
    case Dtype::Float64:
      return launch_sigmoid_focal_sum<double>(p, partials, out, stream);
    case Dtype::BFloat16:
      return launch_sigmoid_focal_sum<__nv_bfloat16>(p, partials, out, stream);
    case Dtype::Float16:
      return launch_sigmoid_focal_sum<__half>(p, partials, out, stream);
    case Dtype::Float32:
    default:
      return launch_sigmoid_focal_sum<float>(p, partials, out, stream);
  }
}

cudaError_t sigmoid_focal(const SigmoidFocalParams& p, Dtype dt, bool backward,
                          cudaStream_t stream) {
  switch (dt) {
    case Dtype::Float64:
      return launch_sigmoid_focal<double>(p, backward, stream);
    case Dtype::BFloat16:
      return launch_sigmoid_focal<__nv_bfloat16>(p, backward, stream);
    case Dtype::Float16:
      return launch_sigmoid_focal<__half>(p, backward, stream);
    case Dtype::Float32:
    default:
      return launch_sigmoid_focal<float>(p, backward, stream);
  }
}

}  // namespace cuda

}  // namespace tlf
