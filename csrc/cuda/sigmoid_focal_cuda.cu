// Launch of the elementwise sigmoid focal loss kernels (16-byte accesses when aligned).
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

}  // namespace

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
