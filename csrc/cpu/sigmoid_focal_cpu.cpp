// CPU launchers of the elementwise sigmoid focal loss.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../tensor_params.h"
#include "kernels.h"

namespace tlf {

namespace {

constexpr int64_t kGrain = 16384;

at::Tensor sigmoid_focal_fwd_cpu(const at::Tensor& input, const at::Tensor& target,
                                 double alpha, double gamma) {
  const at::Tensor x = input.contiguous(), t = target.contiguous();
  SigmoidFocalParams p = prepare_sigmoid_focal("sigmoid_focal_fwd", x, t, alpha, gamma);
  at::Tensor loss = at::empty(x.sizes(), x.options());
  p.loss = loss.data_ptr();
  const Dtype dt = kernel_dtype(x);
  at::parallel_for(0, p.n, kGrain, [&](int64_t begin, int64_t end) {
    cpu::kernel_table().sigmoid_focal_fwd(p, dt, begin, end);
  });
  return loss;
}

at::Tensor sigmoid_focal_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& input,
                                 const at::Tensor& target, double alpha, double gamma) {
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
  at::Tensor grad = empty_grad_like(x);
  p.grad_input = grad.data_ptr();
  const Dtype dt = kernel_dtype(x);
  at::parallel_for(0, p.n, kGrain, [&](int64_t begin, int64_t end) {
    cpu::kernel_table().sigmoid_focal_bwd(p, dt, begin, end);
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchloss_fused, CPU, m) {
  m.impl("sigmoid_focal_fwd", &sigmoid_focal_fwd_cpu);
  m.impl("_sigmoid_focal_bwd", &sigmoid_focal_bwd_cpu);
}

}  // namespace tlf
