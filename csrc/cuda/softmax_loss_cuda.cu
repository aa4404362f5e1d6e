// CUDA launchers of the softmax-family ops (cross-entropy, focal, their fused forms and
// _rescale_grad_rows): the same argument checks and params as the CPU launchers
// (tensor_params.h), then one kernel launch on the input's device and current stream.
// Nothing here reads device memory on the host, so every op can be captured in a CUDA
// graph; an out-of-range class index is a device-side assertion, as in PyTorch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../tensor_params.h"
#include "launch.h"

namespace tlf {

namespace cuda {

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

namespace {

cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// The caller holds a CUDAGuard for input.device().
void run(const SoftmaxLossLaunch& l, const at::Tensor& input, cuda::Mode mode) {
  C10_CUDA_CHECK(cuda::softmax_loss(l.p, kernel_dtype(input), mode, stream_of(input)));
}

at::Tensor backward(const char* op, SoftmaxLossLaunch l, const at::Tensor& grad_loss,
                    const std::optional<at::Tensor>& grad_lse, const at::Tensor& input,
                    const at::Tensor& lse, const at::Tensor& grad_input) {
  set_backward_args(op, l, input, grad_loss, grad_lse, lse, grad_input);
  run(l, input, cuda::Mode::Backward);
  return grad_input;
}

std::tuple<at::Tensor, at::Tensor> ce_fwd_cuda(const at::Tensor& input, const at::Tensor& target,
                                               const std::optional<at::Tensor>& weight,
                                               int64_t ignore_index, double label_smoothing,
                                               double z_loss, double softcap,
                                               double logit_scale, bool /*inplace_backward*/) {
  const c10::cuda::CUDAGuard guard(input.device());
  auto l = prepare_ce("ce_fwd", input, target, weight, ignore_index, label_smoothing, z_loss,
                      softcap, logit_scale);
  auto [loss, lse] = set_forward_outputs(l, input);
  run(l, input, cuda::Mode::Forward);
  return {loss, lse};
}

at::Tensor ce_bwd_cuda(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                       const at::Tensor& input, const at::Tensor& target,
                       const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                       int64_t ignore_index, double label_smoothing, double z_loss,
                       double softcap, double logit_scale) {
  const c10::cuda::CUDAGuard guard(input.device());
  auto l = prepare_ce("_ce_bwd", input, target, weight, ignore_index, label_smoothing, z_loss,
                      softcap, logit_scale);
  return backward("_ce_bwd", std::move(l), grad_loss, grad_lse, input, lse,
                  empty_grad_like(input));
}

void ce_bwd_inplace_cuda(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                         const at::Tensor& input, const at::Tensor& target,
                         const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                         int64_t ignore_index, double label_smoothing, double z_loss,
                         double softcap, double logit_scale) {
  const c10::cuda::CUDAGuard guard(input.device());
  auto l = prepare_ce("_ce_bwd_inplace", input, target, weight, ignore_index, label_smoothing,
                      z_loss, softcap, logit_scale);
  // Safe in place: the backward kernel makes one pass in which each element is read and
  // then overwritten by the same thread, and the cross-entropy gradient never re-reads
  // another element (the target logit is taken from the same pass).
  backward("_ce_bwd_inplace", std::move(l), grad_loss, grad_lse, input, lse, input);
}

std::tuple<at::Tensor, at::Tensor> focal_fwd_cuda(const at::Tensor& input,
                                                  const at::Tensor& target,
                                                  const std::optional<at::Tensor>& alpha,
                                                  double alpha_scale, double gamma,
                                                  int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(input.device());
  auto l = prepare_focal("focal_fwd", input, target, alpha, alpha_scale, gamma, ignore_index);
  auto [loss, lse] = set_forward_outputs(l, input);
  run(l, input, cuda::Mode::Forward);
  return {loss, lse};
}

at::Tensor focal_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& input,
                          const at::Tensor& target, const std::optional<at::Tensor>& alpha,
                          const at::Tensor& lse, double alpha_scale, double gamma,
                          int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(input.device());
  auto l = prepare_focal("_focal_bwd", input, target, alpha, alpha_scale, gamma, ignore_index);
  return backward("_focal_bwd", std::move(l), grad_loss, std::nullopt, input, lse,
                  empty_grad_like(input));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused(const char* op, SoftmaxLossLaunch l,
                                                     const at::Tensor& input,
                                                     const at::Tensor& grad_scale) {
  auto [loss, lse] = set_forward_outputs(l, input);
  at::Tensor grad = empty_grad_like(input);
  set_fused_grad_args(op, l, input, grad_scale, grad);
  run(l, input, cuda::Mode::Fused);
  return {loss, lse, grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_fwd_grad_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
    double logit_scale, const at::Tensor& grad_scale) {
  const c10::cuda::CUDAGuard guard(input.device());
  auto l = prepare_ce("ce_fwd_grad", input, target, weight, ignore_index, label_smoothing,
                      z_loss, softcap, logit_scale);
  return fused("ce_fwd_grad", std::move(l), input, grad_scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> focal_fwd_grad_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& alpha,
    double alpha_scale, double gamma, int64_t ignore_index, const at::Tensor& grad_scale) {
  const c10::cuda::CUDAGuard guard(input.device());
  auto l = prepare_focal("focal_fwd_grad", input, target, alpha, alpha_scale, gamma,
                         ignore_index);
  return fused("focal_fwd_grad", std::move(l), input, grad_scale);
}

void rescale_grad_rows_cuda(const at::Tensor& grad, const at::Tensor& grad_loss,
                            const at::Tensor& grad_scale) {
  check_rescale_args(grad, grad_loss, grad_scale);
  const c10::cuda::CUDAGuard guard(grad.device());
  const RowLayout layout{grad.size(0), grad.size(1), grad.size(2),
                         grad.stride(0), grad.stride(1), grad.stride(2)};
  auto row_vector = [](const at::Tensor& t) {
    RowVector v;
    v.ptr = t.data_ptr();
    v.sb = t.stride(0);
    v.sd = t.stride(1);
    v.D = t.size(1);
    return v;
  };
  C10_CUDA_CHECK(cuda::rescale_grad_rows(grad.data_ptr(), layout, row_vector(grad_loss),
                                         row_vector(grad_scale), kernel_dtype(grad),
                                         stream_of(grad)));
}

}  // namespace

TORCH_LIBRARY_IMPL(torchloss_fused, CUDA, m) {
  m.impl("ce_fwd", &ce_fwd_cuda);
  m.impl("_ce_bwd", &ce_bwd_cuda);
  m.impl("_ce_bwd_inplace", &ce_bwd_inplace_cuda);
  m.impl("focal_fwd", &focal_fwd_cuda);
  m.impl("_focal_bwd", &focal_bwd_cuda);
  m.impl("ce_fwd_grad", &ce_fwd_grad_cuda);
  m.impl("focal_fwd_grad", &focal_fwd_grad_cuda);
  m.impl("_rescale_grad_rows", &rescale_grad_rows_cuda);
}

}  // namespace tlf
