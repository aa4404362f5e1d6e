// The CUDA device policy of csrc/loss_ops.h: each op is one kernel launch on the input's
// device and its current stream. Nothing reads device memory on the host, so every op can
// be captured in a CUDA graph; an out-of-range class index is a device-side assertion, as
// in PyTorch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../loss_ops.h"
#include "launch.h"

namespace tlf {

namespace {

cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

struct Cuda {
  using Guard = c10::cuda::CUDAGuard;

  static void run(const SoftmaxLossLaunch& l, const at::Tensor& input, Mode mode) {
    C10_CUDA_CHECK(cuda::softmax_loss(l.p, kernel_dtype(input), mode, stream_of(input)));
  }

  static void rescale(const at::Tensor& grad, const at::Tensor& grad_loss,
                      const at::Tensor& grad_scale) {
    C10_CUDA_CHECK(cuda::rescale_grad_rows(grad.data_ptr(), layout_of(grad),
                                           row_vector_of(grad_loss), row_vector_of(grad_scale),
                                           kernel_dtype(grad), stream_of(grad)));
  }

  static void sigmoid(const SigmoidFocalParams& p, const at::Tensor& input, bool backward) {
    C10_CUDA_CHECK(cuda::sigmoid_focal(p, kernel_dtype(input), backward, stream_of(input)));
  }

  static void sigmoid_sum(const SigmoidFocalParams& p, const at::Tensor& input,
                          const at::Tensor& out) {
    // Scratch from the caching allocator, on the current stream: capturable in a graph.
    const at::Tensor partials = at::empty({cuda::kSigmoidSumBlocks}, out.options());
    C10_CUDA_CHECK(cuda::sigmoid_focal_sum(p, kernel_dtype(input), partials.data_ptr(),
                                           out.data_ptr(), stream_of(input)));
  }

  // PyTorch's own mixed-dtype add already streams at bandwidth on a GPU (and CUDA's
  // linear_cross_entropy accumulates inside addmm, so nothing hot calls this).
  static void accumulate(at::Tensor& acc, const at::Tensor& src) { acc.add_(src); }
};

}  // namespace

TORCH_LIBRARY_IMPL(torchloss_fused, CUDA, m) {
  register_loss_ops<Cuda>(m);
}

}  // namespace tlf
