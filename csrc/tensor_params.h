// Turns op arguments (tensors) into the torch-free kernel params, checking every shape,
// dtype and device first so that no kernel can read out of bounds. Shared by the CPU and
// CUDA launchers; Python validates earlier with friendlier messages, these checks guard
// direct calls of torch.ops.torchloss_fused.*.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "kernel_params.h"

namespace tlf {

Dtype kernel_dtype(const at::Tensor& input);
at::ScalarType acc_dtype(const at::Tensor& input);
// The dtype of a forward's lse output and a backward's lse and grad_lse inputs, whatever
// the input's (kernel_params.h, RowLse).
constexpr at::ScalarType kLseDtype = at::kDouble;

// Layouts of a (B, C, D) tensor and a (B, D) per-row tensor, in element strides.
RowLayout layout_of(const at::Tensor& t);
RowVector row_vector_of(const at::Tensor& t);

// Params plus the small tensors they point into (weights converted to the accumulation
// dtype, their sum), which must outlive the launch.
struct SoftmaxLossLaunch {
  SoftmaxLossParams p;
  at::Tensor weight_acc, weight_sum, alpha_acc;
  int64_t rows() const { return p.in.rows(); }
};

SoftmaxLossLaunch prepare_ce(const char* op, const at::Tensor& input, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight, int64_t ignore_index,
                             double label_smoothing, double z_loss, double softcap,
                             double logit_scale);

SoftmaxLossLaunch prepare_focal(const char* op, const at::Tensor& input,
                                const at::Tensor& target, const std::optional<at::Tensor>& alpha,
                                double alpha_scale, double gamma, int64_t ignore_index);

// Forward outputs: contiguous (B, D) loss and lse in the accumulation dtype.
std::pair<at::Tensor, at::Tensor> set_forward_outputs(SoftmaxLossLaunch& l,
                                                      const at::Tensor& input);

// Backward inputs; grad_input is written in its own layout (the input itself when in place).
void set_backward_args(const char* op, SoftmaxLossLaunch& l, const at::Tensor& input,
                       const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                       const at::Tensor& lse, const at::Tensor& grad_input);

// Calls fn(k) for each class index of a CPU target (int64, int32 or uint8), as int64, in
// memory order of its contiguous copy; returns false, calling nothing, for another dtype.
template <class Fn>
bool for_each_host_index(const at::Tensor& target, Fn&& fn) {
  const at::Tensor t = target.contiguous();
  auto each = [&](const auto* v) {
    for (int64_t i = 0; i < t.numel(); ++i) fn(static_cast<int64_t>(v[i]));
  };
  switch (t.scalar_type()) {
    case at::kLong: each(t.const_data_ptr<int64_t>()); return true;
    case at::kInt: each(t.const_data_ptr<int32_t>()); return true;
    case at::kByte: each(t.const_data_ptr<uint8_t>()); return true;
    default: return false;
  }
}

// _ce_bwd_inplace's own checks, before its kernel overwrites the input: no argument it
// reads shares memory with the input (the rows written first would be read later), and on
// the CPU no class index is out of range (the kernel's own check raises mid-pass, with
// the rows before it already overwritten).
void check_inplace_backward(const char* op, const at::Tensor& input, const at::Tensor& target,
                            const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                            const at::Tensor& grad_loss,
                            const std::optional<at::Tensor>& grad_lse, int64_t ignore_index);

// Fused forward: also write the gradient of sum_r grad_scale_r * loss_r into grad_input
// (then times the post scale of a PostScaleScope on this thread, on CPU).
void set_fused_grad_args(const char* op, SoftmaxLossLaunch& l, const at::Tensor& input,
                         const at::Tensor& grad_scale, const at::Tensor& grad_input);

// While it lives, the fused forwards this thread runs on CPU (D == 1) multiply each
// gradient row by `factor` as the backward's rescale would (SoftmaxLossParams::post_scale).
// A scope, not an op argument: only reduced_loss.cpp's eager path sets it, and the ops'
// schemas, fake kernels and autograd formulas stay as they are.
class PostScaleScope {
 public:
  explicit PostScaleScope(double factor);
  ~PostScaleScope();
  PostScaleScope(const PostScaleScope&) = delete;
  PostScaleScope& operator=(const PostScaleScope&) = delete;

 private:
  double previous_;
};

// Checks the arguments of _rescale_grad_rows: grad (B, C, D) and two (B, D) row vectors.
void check_rescale_args(const at::Tensor& grad, const at::Tensor& grad_loss,
                        const at::Tensor& grad_scale);

// On Linux, asks for transparent huge pages on the whole 2 MiB pages of a CPU buffer of at
// least 8 MiB, before its first touch: faulting 4 KiB pages in costs more than the kernel
// that fills them (best effort; does nothing elsewhere).
void advise_huge_pages(const void* data, size_t bytes);

// An input-sized output (a gradient, sigmoid focal's elementwise loss) shaped like
// `input`, contiguous; a CPU one from the host buffer cache (host_buffers.h) when large.
at::Tensor empty_output_like(const at::Tensor& input);

SigmoidFocalParams prepare_sigmoid_focal(const char* op, const at::Tensor& input,
                                         const at::Tensor& target, double alpha, double gamma);

// Checks the sigmoid backward's grad_loss and points p at it. A reduced loss sends back one
// value expanded over every element: that is read as a single value, anything else
// contiguously. Returns the tensor p points into (keep it alive for the launch).
at::Tensor set_sigmoid_grad_loss(const char* op, SigmoidFocalParams& p, const at::Tensor& input,
                                 const at::Tensor& grad_loss);

}  // namespace tlf
