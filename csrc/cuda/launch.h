// Torch-free entry points of the CUDA kernels. The ops (csrc/loss_ops.h through
// ops_cuda.cu) fill the params with tensor_params.h, then call these on the tensor's device
// and current stream.
// Each returns the launch error, if any; none synchronises with the host.
#pragma once

#include <cuda_runtime_api.h>

#include "../kernel_params.h"

namespace tlf::cuda {

// Mode (forward, backward, fused) is tlf::Mode from kernel_params.h.

// Softmax-family losses (cross-entropy, focal); p says which and what to write.
cudaError_t softmax_loss(const SoftmaxLossParams& p, Dtype dt, Mode mode, cudaStream_t stream);

// grad row r *= grad_loss[r] / grad_scale[r], rows where the two are equal left untouched.
cudaError_t rescale_grad_rows(void* grad, const RowLayout& layout, const RowVector& grad_loss,
                              const RowVector& grad_scale, Dtype dt, cudaStream_t stream);

// Elementwise sigmoid focal loss (forward writes p.loss, backward p.grad_input).
cudaError_t sigmoid_focal(const SigmoidFocalParams& p, Dtype dt, bool backward,
                          cudaStream_t stream);

// scale * the sum of the elementwise sigmoid focal losses into *out (one float, or double
// for double input); writes the gradient of that value too when p.grad_input is set.
// `partials` is device scratch for kSigmoidSumBlocks accumulation-dtype values.
constexpr int kSigmoidSumBlocks = 1024;
cudaError_t sigmoid_focal_sum(const SigmoidFocalParams& p, Dtype dt, void* partials, void* out,
                              cudaStream_t stream);

// Per-dtype instantiations (softmax_loss_<dtype>.cu), dispatched by the functions above.
template <typename T>
cudaError_t softmax_loss_t(const SoftmaxLossParams& p, Mode mode, cudaStream_t stream);
template <typename T>
cudaError_t rescale_grad_rows_t(T* grad, const RowLayout& layout, const RowVector& grad_loss,
                                const RowVector& grad_scale, cudaStream_t stream);

}  // namespace tlf::cuda
