// Every op of csrc/ops.cpp written once, over a device policy: the argument checks and
// params come from tensor_params.h, the outputs are allocated here, and the policy only
// runs the kernels. csrc/cpu/ops_cpu.cpp and csrc/cuda/ops_cuda.cu register these for their
// dispatch keys.
//
// A policy provides:
//   Guard                     constructed from the input's device for the op's duration
//   run(launch, input, Mode)  the softmax-family kernels for all rows
//   rescale(grad, grad_loss, grad_scale)   _rescale_grad_rows
//   sigmoid(params, input, backward)       the elementwise sigmoid focal kernels
//   sigmoid_sum(params, input, out)        the reduced sigmoid focal kernel: writes
//                                          scale * sum into the 0-dim out (and the
//                                          gradient when params.grad_input is set)
//   accumulate(acc, src)                   _accumulate_, arguments checked
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "tensor_params.h"

namespace tlf {

template <class Device>
struct LossOps {
  using Tensor = at::Tensor;
  using OptTensor = std::optional<at::Tensor>;

  static std::tuple<Tensor, Tensor> forward(SoftmaxLossLaunch l, const Tensor& input) {
    auto [loss, lse] = set_forward_outputs(l, input);
    Device::run(l, input, Mode::Forward);
    return {loss, lse};
  }

  static Tensor backward(const char* op, SoftmaxLossLaunch l, const Tensor& grad_loss,
                         const OptTensor& grad_lse, const Tensor& input, const Tensor& lse,
                         const Tensor& grad_input) {
    set_backward_args(op, l, input, grad_loss, grad_lse, lse, grad_input);
    Device::run(l, input, Mode::Backward);
    return grad_input;
  }

  static std::tuple<Tensor, Tensor, Tensor> fused(const char* op, SoftmaxLossLaunch l,
                                                  const Tensor& input,
                                                  const Tensor& grad_scale) {
    auto [loss, lse] = set_forward_outputs(l, input);
    Tensor grad = empty_output_like(input);
    set_fused_grad_args(op, l, input, grad_scale, grad);
    Device::run(l, input, Mode::Fused);
    return {loss, lse, grad};
  }

  static std::tuple<Tensor, Tensor> ce_fwd(const Tensor& input, const Tensor& target,
                                           const OptTensor& weight, int64_t ignore_index,
                                           double label_smoothing, double z_loss,
                                           double softcap, double logit_scale,
                                           bool /*inplace_backward: autograd's business*/) {
    typename Device::Guard guard(input.device());
    return forward(prepare_ce("ce_fwd", input, target, weight, ignore_index, label_smoothing,
                              z_loss, softcap, logit_scale),
                   input);
  }

  static Tensor ce_bwd(const Tensor& grad_loss, const OptTensor& grad_lse, const Tensor& input,
                       const Tensor& target, const OptTensor& weight, const Tensor& lse,
                       int64_t ignore_index, double label_smoothing, double z_loss,
                       double softcap, double logit_scale) {
    typename Device::Guard guard(input.device());
    return backward("_ce_bwd",
                    prepare_ce("_ce_bwd", input, target, weight, ignore_index, label_smoothing,
                               z_loss, softcap, logit_scale),
                    grad_loss, grad_lse, input, lse, empty_output_like(input));
  }

  // Safe in place on both devices: every element of a row is read before the kernel
  // overwrites it, and the target logit is taken before its row is written.
  static void ce_bwd_inplace(const Tensor& grad_loss, const OptTensor& grad_lse,
                             const Tensor& input, const Tensor& target, const OptTensor& weight,
                             const Tensor& lse, int64_t ignore_index, double label_smoothing,
                             double z_loss, double softcap, double logit_scale) {
    typename Device::Guard guard(input.device());
    SoftmaxLossLaunch l = prepare_ce("_ce_bwd_inplace", input, target, weight, ignore_index,
                                     label_smoothing, z_loss, softcap, logit_scale);
    check_inplace_backward("_ce_bwd_inplace", input, target, weight, lse, grad_loss, grad_lse,
                           ignore_index);
    backward("_ce_bwd_inplace", l, grad_loss, grad_lse, input, lse, input);
  }

  static std::tuple<Tensor, Tensor, Tensor> ce_fwd_grad(
      const Tensor& input, const Tensor& target, const OptTensor& weight, int64_t ignore_index,
      double label_smoothing, double z_loss, double softcap, double logit_scale,
      const Tensor& grad_scale) {
    typename Device::Guard guard(input.device());
    return fused("ce_fwd_grad",
                 prepare_ce("ce_fwd_grad", input, target, weight, ignore_index,
                            label_smoothing, z_loss, softcap, logit_scale),
                 input, grad_scale);
  }

  static std::tuple<Tensor, Tensor> focal_fwd(const Tensor& input, const Tensor& target,
                                              const OptTensor& alpha, double alpha_scale,
                                              double gamma, int64_t ignore_index) {
    typename Device::Guard guard(input.device());
    return forward(
        prepare_focal("focal_fwd", input, target, alpha, alpha_scale, gamma, ignore_index),
        input);
  }

  static Tensor focal_bwd(const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                          const OptTensor& alpha, const Tensor& lse, double alpha_scale,
                          double gamma, int64_t ignore_index) {
    typename Device::Guard guard(input.device());
    return backward(
        "_focal_bwd",
        prepare_focal("_focal_bwd", input, target, alpha, alpha_scale, gamma, ignore_index),
        grad_loss, std::nullopt, input, lse, empty_output_like(input));
  }

  static std::tuple<Tensor, Tensor, Tensor> focal_fwd_grad(
      const Tensor& input, const Tensor& target, const OptTensor& alpha, double alpha_scale,
      double gamma, int64_t ignore_index, const Tensor& grad_scale) {
    typename Device::Guard guard(input.device());
    return fused("focal_fwd_grad",
                 prepare_focal("focal_fwd_grad", input, target, alpha, alpha_scale, gamma,
                               ignore_index),
                 input, grad_scale);
  }

  static void rescale_grad_rows(const Tensor& grad, const Tensor& grad_loss,
                                const Tensor& grad_scale) {
    check_rescale_args(grad, grad_loss, grad_scale);
    typename Device::Guard guard(grad.device());
    Device::rescale(grad, grad_loss, grad_scale);
  }

  static Tensor sigmoid_focal_fwd(const Tensor& input, const Tensor& target, double alpha,
                                  double gamma) {
    typename Device::Guard guard(input.device());
    const Tensor x = input.contiguous(), t = target.contiguous();
    SigmoidFocalParams p = prepare_sigmoid_focal("sigmoid_focal_fwd", x, t, alpha, gamma);
    Tensor loss = empty_output_like(x);
    p.loss = loss.data_ptr();
    Device::sigmoid(p, x, /*backward=*/false);
    return loss;
  }

  static Tensor sigmoid_focal_bwd(const Tensor& grad_loss, const Tensor& input,
                                  const Tensor& target, double alpha, double gamma) {
    typename Device::Guard guard(input.device());
    const Tensor x = input.contiguous(), t = target.contiguous();
    SigmoidFocalParams p = prepare_sigmoid_focal("_sigmoid_focal_bwd", x, t, alpha, gamma);
    const Tensor g = set_sigmoid_grad_loss("_sigmoid_focal_bwd", p, x, grad_loss);
    Tensor grad = empty_output_like(x);
    p.grad_input = grad.data_ptr();
    Device::sigmoid(p, x, /*backward=*/true);
    return grad;
  }

  static Tensor sigmoid_focal_sum(const Tensor& input, const Tensor& target, double alpha,
                                  double gamma, int64_t divisor) {
    typename Device::Guard guard(input.device());
    return reduce_sigmoid_focal("sigmoid_focal_sum", input, target, alpha, gamma, divisor,
                                nullptr);
  }

  static std::tuple<Tensor, Tensor> sigmoid_focal_sum_grad(const Tensor& input,
                                                           const Tensor& target, double alpha,
                                                           double gamma, int64_t divisor) {
    typename Device::Guard guard(input.device());
    Tensor grad = empty_output_like(input);
    Tensor loss = reduce_sigmoid_focal("sigmoid_focal_sum_grad", input, target, alpha, gamma,
                                       divisor, &grad);
    return {loss, grad};
  }

  static void accumulate(Tensor& acc, const Tensor& src) {
    TORCH_CHECK(acc.device() == src.device(), "_accumulate_: acc is on ", acc.device(),
                " but src is on ", src.device());
    TORCH_CHECK(acc.sizes() == src.sizes(), "_accumulate_: acc has shape ", acc.sizes(),
                " but src has shape ", src.sizes());
    TORCH_CHECK(at::isFloatingType(acc.scalar_type()) && at::isFloatingType(src.scalar_type()),
                "_accumulate_: acc and src must be floating point, got ", acc.scalar_type(),
                " and ", src.scalar_type());
    typename Device::Guard guard(acc.device());
    Device::accumulate(acc, src);
  }

 private:
  static Tensor reduce_sigmoid_focal(const char* op, const Tensor& input, const Tensor& target,
                                     double alpha, double gamma, int64_t divisor,
                                     const Tensor* grad) {
    // (0: a mean over no elements, in a graph traced with a symbolic size; its scale is
    // inf, and the empty sum's 0 * inf the nan of torch's mean())
    TORCH_CHECK(divisor >= 0, op, ": divisor must be at least 0, got ", divisor);
    const Tensor x = input.contiguous(), t = target.contiguous();
    SigmoidFocalParams p = prepare_sigmoid_focal(op, x, t, alpha, gamma);
    p.scale = 1.0 / static_cast<double>(divisor);  // (as Python's 1.0 / divisor)
    if (grad != nullptr) p.grad_input = grad->data_ptr();
    Tensor out = at::empty({}, x.options().dtype(acc_dtype(x)));
    Device::sigmoid_sum(p, x, out);
    return out;
  }
};

template <class Device>
void register_loss_ops(torch::Library& m) {
  using Ops = LossOps<Device>;
  m.impl("ce_fwd", &Ops::ce_fwd);
  m.impl("_ce_bwd", &Ops::ce_bwd);
  m.impl("_ce_bwd_inplace", &Ops::ce_bwd_inplace);
  m.impl("ce_fwd_grad", &Ops::ce_fwd_grad);
  m.impl("focal_fwd", &Ops::focal_fwd);
  m.impl("_focal_bwd", &Ops::focal_bwd);
  m.impl("focal_fwd_grad", &Ops::focal_fwd_grad);
  m.impl("_rescale_grad_rows", &Ops::rescale_grad_rows);
  m.impl("sigmoid_focal_fwd", &Ops::sigmoid_focal_fwd);
  m.impl("_sigmoid_focal_bwd", &Ops::sigmoid_focal_bwd);
  m.impl("sigmoid_focal_sum", &Ops::sigmoid_focal_sum);
  m.impl("sigmoid_focal_sum_grad", &Ops::sigmoid_focal_sum_grad);
  m.impl("_accumulate_", &Ops::accumulate);
}

}  // namespace tlf
