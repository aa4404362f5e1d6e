// CPU launchers of the softmax-family ops (cross-entropy, focal): checks, params, threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <limits>

#include "../tensor_params.h"
#include "kernels.h"

namespace tlf {

namespace {

using RowKernel = int64_t (*)(const SoftmaxLossParams&, Dtype, int64_t, int64_t, int64_t*);

// Runs `kernel` over all rows on PyTorch's intra-op threads. An out-of-range class index
// raises IndexError naming the target of the lowest such row, as PyTorch's CPU loss does.
void run_rows(const SoftmaxLossLaunch& l, const at::Tensor& input, RowKernel kernel) {
  const int64_t rows = l.rows();
  if (rows == 0) return;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(l.p.in.C, 1));
  const Dtype dt = kernel_dtype(input);
  std::atomic<int64_t> bad_row{std::numeric_limits<int64_t>::max()};
  std::atomic<int64_t> bad_target{0};
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    int64_t target = 0;
    const int64_t r = kernel(l.p, dt, begin, end, &target);
    if (r < 0) return;
    int64_t seen = bad_row.load();
    while (r < seen && !bad_row.compare_exchange_weak(seen, r)) {
    }
    if (bad_row.load() == r) bad_target.store(target);
  });
  TORCH_CHECK_INDEX(bad_row.load() == std::numeric_limits<int64_t>::max(), "Target ",
                    bad_target.load(), " is out of bounds.");
}

at::Tensor backward(const char* op, SoftmaxLossLaunch l, const at::Tensor& grad_loss,
                    const std::optional<at::Tensor>& grad_lse, const at::Tensor& input,
                    const at::Tensor& lse, const at::Tensor& grad_input) {
  set_backward_args(op, l, input, grad_loss, grad_lse, lse, grad_input);
  run_rows(l, input, cpu::kernel_table().softmax_loss_bwd);
  return grad_input;
}

std::tuple<at::Tensor, at::Tensor> ce_fwd_cpu(const at::Tensor& input, const at::Tensor& target,
                                              const std::optional<at::Tensor>& weight,
                                              int64_t ignore_index, double label_smoothing,
                                              double z_loss, double softcap,
                                              double logit_scale, bool /*inplace_backward*/) {
  auto l = prepare_ce("ce_fwd", input, target, weight, ignore_index, label_smoothing, z_loss,
                      softcap, logit_scale);
  auto [loss, lse] = set_forward_outputs(l, input);
  run_rows(l, input, cpu::kernel_table().softmax_loss_fwd);
  return {loss, lse};
}

at::Tensor ce_bwd_cpu(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                      const at::Tensor& input, const at::Tensor& target,
                      const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                      int64_t ignore_index, double label_smoothing, double z_loss,
                      double softcap, double logit_scale) {
  auto l = prepare_ce("_ce_bwd", input, target, weight, ignore_index, label_smoothing, z_loss,
                      softcap, logit_scale);
  return backward("_ce_bwd", std::move(l), grad_loss, grad_lse, input, lse,
                  empty_grad_like(input));
}

void ce_bwd_inplace_cpu(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                        const at::Tensor& input, const at::Tensor& target,
                        const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                        int64_t ignore_index, double label_smoothing, double z_loss,
                        double softcap, double logit_scale) {
  auto l = prepare_ce("_ce_bwd_inplace", input, target, weight, ignore_index, label_smoothing,
                      z_loss, softcap, logit_scale);
  // Safe in place: each block of logits is copied into the kernel's buffer before its
  // gradient is stored over it, and no two blocks or rows share an element.
  backward("_ce_bwd_inplace", std::move(l), grad_loss, grad_lse, input, lse, input);
}

std::tuple<at::Tensor, at::Tensor> focal_fwd_cpu(const at::Tensor& input,
                                                 const at::Tensor& target,
                                                 const std::optional<at::Tensor>& alpha,
                                                 double alpha_scale, double gamma,
                                                 int64_t ignore_index) {
  auto l = prepare_focal("focal_fwd", input, target, alpha, alpha_scale, gamma, ignore_index);
  auto [loss, lse] = set_forward_outputs(l, input);
  run_rows(l, input, cpu::kernel_table().softmax_loss_fwd);
  return {loss, lse};
}

at::Tensor focal_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& input,
                         const at::Tensor& target, const std::optional<at::Tensor>& alpha,
                         const at::Tensor& lse, double alpha_scale, double gamma,
                         int64_t ignore_index) {
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
  run_rows(l, input, cpu::kernel_table().softmax_loss_fwd);
  return {loss, lse, grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_fwd_grad_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
    double logit_scale, const at::Tensor& grad_scale) {
  auto l = prepare_ce("ce_fwd_grad", input, target, weight, ignore_index, label_smoothing,
                      z_loss, softcap, logit_scale);
  return fused("ce_fwd_grad", std::move(l), input, grad_scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> focal_fwd_grad_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& alpha,
    double alpha_scale, double gamma, int64_t ignore_index, const at::Tensor& grad_scale) {
  auto l = prepare_focal("focal_fwd_grad", input, target, alpha, alpha_scale, gamma,
                         ignore_index);
  return fused("focal_fwd_grad", std::move(l), input, grad_scale);
}

void rescale_grad_rows_cpu(const at::Tensor& grad, const at::Tensor& grad_loss,
                           const at::Tensor& grad_scale) {
  check_rescale_args(grad, grad_loss, grad_scale);
  // Reading two per-row vectors on the host is free on CPU; skip the pass when nothing
  // differs (loss.backward() on a mean or sum, the usual case).
  const at::Tensor differs = grad_loss.ne(grad_scale);
  if (!differs.any().item<bool>()) return;
  const at::Tensor factor = at::where(differs, grad_loss / grad_scale, 1.0);
  grad.mul_(factor.unsqueeze(1));
}

}  // namespace

TORCH_LIBRARY_IMPL(torchloss_fused, CPU, m) {
  m.impl("ce_fwd_grad", &ce_fwd_grad_cpu);
  m.impl("focal_fwd_grad", &focal_fwd_grad_cpu);
  m.impl("_rescale_grad_rows", &rescale_grad_rows_cpu);
  m.impl("ce_fwd", &ce_fwd_cpu);
  m.impl("_ce_bwd", &ce_bwd_cpu);
  m.impl("_ce_bwd_inplace", &ce_bwd_inplace_cpu);
  m.impl("focal_fwd", &focal_fwd_cpu);
  m.impl("_focal_bwd", &focal_bwd_cpu);
}

}  // namespace tlf
