#include "tensor_params.h"

#include "host_buffers.h"
#include "ordered_sum.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace tlf {

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// Whether elements of t may share memory. has_internal_overlap's "too hard" (as_strided,
// unfold, also a plain row slice) is decided by the strides, smallest first: apart while
// each passes the reach of the dims inside it. (An overlapping view had been let through,
// and rows' gradients were written over logits other rows had still to read.)
bool may_overlap(const at::Tensor& t) {
  const at::MemOverlap status = at::has_internal_overlap(t);
  if (status != at::MemOverlap::TooHard) return status == at::MemOverlap::Yes;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;
  for (const auto& [stride, size] : dims) {
    if (stride <= reach) return true;
    reach += (size - 1) * stride;
  }
  return false;
}

}  // namespace

RowLayout layout_of(const at::Tensor& t) {
  RowLayout l;
  l.B = t.size(0);
  l.C = t.size(1);
  l.D = t.size(2);
  l.sb = t.stride(0);
  l.sc = t.stride(1);
  l.sd = t.stride(2);
  return l;
}

RowVector row_vector_of(const at::Tensor& t) {
  RowVector v;
  v.ptr = t.data_ptr();
  v.sb = t.stride(0);
  v.sd = t.stride(1);
  v.D = t.size(1);
  return v;
}

namespace {

void check_input(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.dim() == 3, op, ": input must be a (B, C, D) view, got ", input.dim(),
              " dims");
  TORCH_CHECK(is_supported_float(input.scalar_type()), op,
              ": input must be float32, float64, bfloat16 or float16, got ",
              input.scalar_type());
}

void check_same_device(const char* op, const at::Tensor& a, const at::Tensor& b,
                       const char* name) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", name, " is on ", b.device(),
              " but input is on ", a.device());
}

// A per-class vector (weight, alpha) converted to the accumulation dtype, contiguous.
at::Tensor class_vector(const char* op, const at::Tensor& input, const at::Tensor& v,
                        const char* name) {
  check_same_device(op, input, v, name);
  TORCH_CHECK(v.dim() == 1 && v.size(0) == input.size(1), op, ": ", name,
              " must have one value per class (", input.size(1), "), got shape ", v.sizes());
  TORCH_CHECK(at::isFloatingType(v.scalar_type()), op, ": ", name,
              " must be floating point, got ", v.scalar_type());
  return v.to(acc_dtype(input)).contiguous();
}

void set_index_target(const char* op, SoftmaxLossParams& p, const at::Tensor& input,
                      const at::Tensor& target) {
  const auto t = target.scalar_type();
  TORCH_CHECK(t == at::kLong || t == at::kInt || t == at::kByte, op,
              ": class-index target must be int64, int32 or uint8, got ", t);
  TORCH_CHECK(target.dim() == 2 && target.size(0) == input.size(0) &&
                  target.size(1) == input.size(2),
              op, ": target must be (B, D) = (", input.size(0), ", ", input.size(2),
              "), got ", target.sizes());
  p.index_target = row_vector_of(target);
  p.index_type = t == at::kLong ? IndexType::Int64
                 : t == at::kInt ? IndexType::Int32
                                 : IndexType::UInt8;
}

void set_prob_target(const char* op, SoftmaxLossParams& p, const at::Tensor& input,
                     const at::Tensor& target) {
  TORCH_CHECK(target.sizes() == input.sizes(), op,
              ": probability target must have the input's shape ", input.sizes(), ", got ",
              target.sizes());
  const bool same = target.scalar_type() == input.scalar_type();
  const bool f32 = target.scalar_type() == at::kFloat && input.scalar_type() != at::kDouble;
  TORCH_CHECK(same || f32, op, ": probability target must be ", input.scalar_type(),
              " or float32, got ", target.scalar_type());
  p.prob_target = true;
  p.prob_target_ptr = target.data_ptr();
  p.prob_target_layout = layout_of(target);
  p.target_is_float32 = target.scalar_type() == at::kFloat;
}

SoftmaxLossLaunch prepare_common(const char* op, const at::Tensor& input,
                                 const at::Tensor& target, int64_t ignore_index) {
  check_input(op, input);
  check_same_device(op, input, target, "target");
  SoftmaxLossLaunch l;
  l.p.input = input.data_ptr();
  l.p.in = layout_of(input);
  l.p.ignore_index = ignore_index;
  if (at::isFloatingType(target.scalar_type())) {
    set_prob_target(op, l.p, input, target);
  } else {
    set_index_target(op, l.p, input, target);
  }
  return l;
}

void check_per_row(const char* op, const at::Tensor& input, const at::Tensor& t,
                   const char* name, at::ScalarType dtype) {
  check_same_device(op, input, t, name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == input.size(0) && t.size(1) == input.size(2), op,
              ": ", name, " must be (B, D) = (", input.size(0), ", ", input.size(2), "), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
              t.scalar_type());
}

void check_per_row(const char* op, const at::Tensor& input, const at::Tensor& t,
                   const char* name) {
  check_per_row(op, input, t, name, acc_dtype(input));
}

}  // namespace

Dtype kernel_dtype(const at::Tensor& input) {
  switch (input.scalar_type()) {
    case at::kDouble:
      return Dtype::Float64;
    case at::kBFloat16:
      return Dtype::BFloat16;
    case at::kHalf:
      return Dtype::Float16;
    default:
      return Dtype::Float32;
  }
}

at::ScalarType acc_dtype(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

SoftmaxLossLaunch prepare_ce(const char* op, const at::Tensor& input, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight, int64_t ignore_index,
                             double label_smoothing, double z_loss, double softcap,
                             double logit_scale) {
  SoftmaxLossLaunch l = prepare_common(op, input, target, ignore_index);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(std::isfinite(z_loss), op, ": z_loss must be finite, got ", z_loss);
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap), op,
              ": softcap must be finite and >= 0 (0 = off), got ", softcap);
  TORCH_CHECK(std::isfinite(logit_scale), op, ": logit_scale must be finite, got ",
              logit_scale);
  if (weight.has_value()) {
    l.weight_acc = class_vector(op, input, *weight, "weight");
    l.weight_sum = ordered_sum(l.weight_acc);
    l.p.weight = l.weight_acc.data_ptr();
    l.p.weight_sum = l.weight_sum.data_ptr();
  }
  l.p.label_smoothing = label_smoothing;
  l.p.z_loss = z_loss;
  l.p.softcap = softcap;
  l.p.logit_scale = logit_scale;
  return l;
}

SoftmaxLossLaunch prepare_focal(const char* op, const at::Tensor& input,
                                const at::Tensor& target, const std::optional<at::Tensor>& alpha,
                                double alpha_scale, double gamma, int64_t ignore_index) {
  SoftmaxLossLaunch l = prepare_common(op, input, target, ignore_index);
  TORCH_CHECK(!l.p.prob_target, op, ": focal loss takes class-index targets, got ",
              target.scalar_type());
  TORCH_CHECK(gamma >= 0.0 && std::isfinite(gamma), op, ": gamma must be finite and >= 0, got ",
              gamma);
  TORCH_CHECK(std::isfinite(alpha_scale), op, ": alpha must be finite, got ", alpha_scale);
  l.p.focal = true;
  l.p.gamma = gamma;
  l.p.alpha_scale = alpha_scale;
  if (alpha.has_value()) {
    l.alpha_acc = class_vector(op, input, *alpha, "alpha");
    l.p.alpha = l.alpha_acc.data_ptr();
  }
  return l;
}

std::pair<at::Tensor, at::Tensor> set_forward_outputs(SoftmaxLossLaunch& l,
                                                      const at::Tensor& input) {
  auto opts = input.options().dtype(acc_dtype(input));
  at::Tensor loss = at::empty({input.size(0), input.size(2)}, opts);
  at::Tensor lse = at::empty({input.size(0), input.size(2)}, opts.dtype(kLseDtype));
  l.p.loss = loss.data_ptr();
  l.p.lse = lse.data_ptr();
  return {loss, lse};
}

void set_backward_args(const char* op, SoftmaxLossLaunch& l, const at::Tensor& input,
                       const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                       const at::Tensor& lse, const at::Tensor& grad_input) {
  check_per_row(op, input, grad_loss, "grad_loss");
  check_per_row(op, input, lse, "lse", kLseDtype);
  TORCH_CHECK(lse.is_contiguous(), op, ": lse must be contiguous");
  l.p.grad_loss = row_vector_of(grad_loss);
  if (grad_lse.has_value()) {
    check_per_row(op, input, *grad_lse, "grad_lse", kLseDtype);
    l.p.grad_lse = row_vector_of(*grad_lse);
  }
  l.p.lse_in = lse.data_ptr();
  TORCH_CHECK(grad_input.sizes() == input.sizes() &&
                  grad_input.scalar_type() == input.scalar_type(),
              op, ": gradient buffer must match the input");
  TORCH_CHECK(!may_overlap(grad_input), op,
              ": cannot write the gradient into a tensor whose elements overlap (e.g. an "
              "expanded tensor); use inplace_backward=False");
  l.p.grad_input = grad_input.data_ptr();
  l.p.grad_layout = layout_of(grad_input);
}

namespace {
thread_local double thread_post_scale = 1.0;  // (PostScaleScope)
}  // namespace

void check_inplace_backward(const char* op, const at::Tensor& input, const at::Tensor& target,
                            const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                            const at::Tensor& grad_loss,
                            const std::optional<at::Tensor>& grad_lse, int64_t ignore_index) {
  auto apart = [&](const at::Tensor& t, const char* name) {
    // (get_overlap_status says "too hard" for any expanded tensor, whatever its storage:
    // only a tensor on the input's own storage is asked)
    if (!t.has_storage() || !input.has_storage() ||
        !input.storage().is_alias_of(t.storage())) {
      return;
    }
    TORCH_CHECK_VALUE(at::get_overlap_status(input, t) == at::MemOverlapStatus::No, op, ": ",
                      name, " shares memory with the input, which the gradient overwrites; "
                      "pass a copy");
  };
  apart(target, "target");
  if (weight.has_value()) apart(*weight, "weight");
  apart(lse, "lse");
  apart(grad_loss, "grad_loss");
  if (grad_lse.has_value()) apart(*grad_lse, "grad_lse");
  if (!input.is_cpu()) return;  // (CUDA: a device assert)
  const int64_t C = input.size(1);
  for_each_host_index(target, [&](int64_t k) {  // (probabilities: nothing to check)
    TORCH_CHECK_INDEX(k == ignore_index || (k >= 0 && k < C), "Target ", k,
                      " is out of bounds.");
  });
}

void set_fused_grad_args(const char* op, SoftmaxLossLaunch& l, const at::Tensor& input,
                         const at::Tensor& grad_scale, const at::Tensor& grad_input) {
  check_per_row(op, input, grad_scale, "grad_scale");
  TORCH_CHECK(grad_input.sizes() == input.sizes() &&
                  grad_input.scalar_type() == input.scalar_type(),
              op, ": gradient buffer must match the input");
  l.p.with_grad = true;
  l.p.grad_loss = row_vector_of(grad_scale);
  l.p.grad_input = grad_input.data_ptr();
  l.p.grad_layout = layout_of(grad_input);
  if (input.is_cpu() && l.p.grad_layout.D == 1) l.p.post_scale = thread_post_scale;
}

PostScaleScope::PostScaleScope(double factor) : previous_(thread_post_scale) {
  thread_post_scale = factor;
}

PostScaleScope::~PostScaleScope() { thread_post_scale = previous_; }

void check_rescale_args(const at::Tensor& grad, const at::Tensor& grad_loss,
                        const at::Tensor& grad_scale) {
  const char* op = "_rescale_grad_rows";
  check_input(op, grad);
  check_per_row(op, grad, grad_loss, "grad_loss");
  check_per_row(op, grad, grad_scale, "grad_scale");
}

void advise_huge_pages(const void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHuge = size_t(2) << 20;
  if (bytes < 4 * kHuge) return;
  // Advise only whole 2 MiB pages inside the buffer; the allocator owns the ends.
  const auto start = reinterpret_cast<uintptr_t>(data);
  const uintptr_t first = (start + kHuge - 1) & ~(uintptr_t(kHuge) - 1);
  const uintptr_t last = (start + bytes) & ~(uintptr_t(kHuge) - 1);
  if (last > first) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // best effort
  }
#else
  (void)data;
  (void)bytes;
#endif
}

at::Tensor empty_output_like(const at::Tensor& input) {
  if (input.device().is_cpu()) return host_empty(input.sizes(), input.scalar_type());
  return at::empty(input.sizes(), input.options());
}

SigmoidFocalParams prepare_sigmoid_focal(const char* op, const at::Tensor& input,
                                         const at::Tensor& target, double alpha, double gamma) {
  TORCH_CHECK(is_supported_float(input.scalar_type()), op,
              ": input must be float32, float64, bfloat16 or float16, got ",
              input.scalar_type());
  check_same_device(op, input, target, "target");
  TORCH_CHECK(target.sizes() == input.sizes(), op, ": target must have the input's shape ",
              input.sizes(), ", got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == input.scalar_type(), op, ": target must be ",
              input.scalar_type(), ", got ", target.scalar_type());
  TORCH_CHECK(input.is_contiguous() && target.is_contiguous(), op,
              ": input and target must be contiguous");
  TORCH_CHECK(gamma >= 0.0 && std::isfinite(gamma), op, ": gamma must be finite and >= 0, got ",
              gamma);
  TORCH_CHECK(std::isfinite(alpha), op, ": alpha must be finite, got ", alpha);
  SigmoidFocalParams p;
  p.input = input.data_ptr();
  p.target = target.data_ptr();
  p.n = input.numel();
  p.alpha = alpha;
  p.gamma = gamma;
  return p;
}

at::Tensor set_sigmoid_grad_loss(const char* op, SigmoidFocalParams& p, const at::Tensor& input,
                                 const at::Tensor& grad_loss) {
  TORCH_CHECK(grad_loss.sizes() == input.sizes() &&
                  grad_loss.scalar_type() == input.scalar_type() &&
                  grad_loss.device() == input.device(),
              op, ": grad_loss must match the input");
  at::Tensor g = grad_loss;
  bool scalar = false;
  if (g.numel() > 0 && !g.is_contiguous()) {
    scalar = true;
    for (int64_t s : g.strides()) scalar = scalar && s == 0;
    if (!scalar) g = g.contiguous();
  }
  p.grad_loss = g.data_ptr();
  p.scalar_grad = scalar;
  return g;
}

}  // namespace tlf
