// CUDA launchers of the elementwise sigmoid focal loss.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../tensor_params.h"
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

namespace {

void run(const SigmoidFocalParams& p, const at::Tensor& input, bool backward) {
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.device().index()).stream();
  C10_CUDA_CHECK(cuda::sigmoid_focal(p, kernel_dtype(input), backward, stream));
}

at::Tensor sigmoid_focal_fwd_cuda(const at::Tensor& input, const at::Tensor& target,
                                  double alpha, double gamma) {
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous(), t = target.contiguous();
  SigmoidFocalParams p = prepare_sigmoid_focal("sigmoid_focal_fwd", x, t, alpha, gamma);
  at::Tensor loss = at::empty(x.sizes(), x.options());
  p.loss = loss.data_ptr();
  run(p, x, false);
  return loss;
}

at::Tensor sigmoid_focal_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& input,
                                  const at::Tensor& target, double alpha, double gamma) {
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous(), t = target.contiguous();
  SigmoidFocalParams p = prepare_sigmoid_focal("_sigmoid_focal_bwd", x, t, alpha, gamma);
  TORCH_CHECK(grad_loss.sizes() == x.sizes() && grad_loss.scalar_type() == x.scalar_type() &&
                  grad_loss.device() == x.device(),
              "_sigmoid_focal_bwd: grad_loss must match the input");
  // A reduced loss sends back one value expanded over every element: read it once.
  at::Tensor g = grad_loss;
  bool scalar = false;
  if (g.numel() > 0 && !g.is_contiguous()) {
    scalar = true;
    for (int64_t s : g.strides()) scalar = scalar && s == 0;
    if (!scalar) g = g.contiguous();
  }
  p.grad_loss = g.data_ptr();
  p.scalar_grad = scalar;
  at::Tensor grad = at::empty(x.sizes(), x.options());
  p.grad_input = grad.data_ptr();
  run(p, x, true);
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchloss_fused, CUDA, m) {
  m.impl("sigmoid_focal_fwd", &sigmoid_focal_fwd_cuda);
  m.impl("_sigmoid_focal_bwd", &sigmoid_focal_bwd_cuda);
}

}  // namespace tlf
