// The CPU device policy of csrc/loss_ops.h: rows (or elements) split over PyTorch's
// intra-op threads, kernels from the table for this CPU's instruction set.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <vector>

#include "../loss_ops.h"
#include "kernels.h"

namespace tlf {

namespace {

// The first (lowest) row whose class index is out of range, over all threads.
class BadTarget {
 public:
  void report(int64_t row, int64_t target) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (row < row_) {
      row_ = row;
      target_ = target;
    }
  }
  // IndexError naming the target, as PyTorch's CPU loss raises.
  void raise_if_any() const {
    TORCH_CHECK_INDEX(row_ == std::numeric_limits<int64_t>::max(), "Target ", target_,
                      " is out of bounds.");
  }

 private:
  std::mutex mutex_;
  int64_t row_ = std::numeric_limits<int64_t>::max();
  int64_t target_ = 0;
};

// Per-row factors grad_loss / grad_scale for the rows whose gradient was made for another
// grad_loss than they received, 1 for the others (and for rows made for a non-finite
// scale, which stay as made: 1/0, a mean over no counted target, and nan, a weighted
// two-term mean's over targets weighing 0, _reduction.mean_denominator, whose counted
// rows are nan already and whose ignored ones keep their zeros); undefined when no row
// needs one.
template <typename T>
at::Tensor row_factors(const at::Tensor& grad_loss, const at::Tensor& grad_scale) {
  const auto g = grad_loss.accessor<T, 2>();
  const auto s = grad_scale.accessor<T, 2>();
  const int64_t B = g.size(0), D = g.size(1);
  // One value each, expanded (loss.backward() of a mean or a sum): one comparison stands
  // for every row's (the loop over a (65536, 10) loss's rows was ~5% of its backward).
  const auto uniform = [](const at::Tensor& t) { return t.stride(0) == 0 && t.stride(1) == 0; };
  if (B > 0 && D > 0 && uniform(grad_loss) && uniform(grad_scale) &&
      (g[0][0] == s[0][0] || !std::isfinite(s[0][0]))) {
    return at::Tensor();
  }
  at::Tensor factor;  // allocated at the first row that needs a factor
  T* f = nullptr;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t d = 0; d < D; ++d) {
      // (a NaN grad_loss: NaN != NaN, scaled)
      if (g[b][d] == s[b][d] || !std::isfinite(s[b][d])) continue;
      if (f == nullptr) {
        factor = at::ones({B, D}, grad_loss.options());
        f = factor.data_ptr<T>();
      }
      f[b * D + d] = g[b][d] / s[b][d];
    }
  }
  return factor;
}

struct Cpu {
  struct Guard {
    explicit Guard(c10::Device) {}
  };

  static void run(const SoftmaxLossLaunch& l, const at::Tensor& input, Mode mode) {
    const int64_t rows = l.rows();
    if (rows == 0) return;
    const auto& table = cpu::kernel_table();
    const auto kernel = mode == Mode::Backward ? table.softmax_loss_bwd : table.softmax_loss_fwd;
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(l.p.in.C, 1));
    const Dtype dt = kernel_dtype(input);
    BadTarget bad;
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      int64_t target = 0;
      const int64_t r = kernel(l.p, dt, begin, end, &target);
      if (r >= 0) bad.report(r, target);
    });
    bad.raise_if_any();
  }

  static void rescale(const at::Tensor& grad, const at::Tensor& grad_loss,
                      const at::Tensor& grad_scale) {
    // Reading two per-row vectors on the host costs nothing on CPU: skip the pass when no
    // row differs (loss.backward() on a mean or a sum, the usual case). A plain loop: ATen
    // ops here would cost ~10 us of dispatch, most of a tiny loss's backward.
    const at::Tensor factor = AT_DISPATCH_FLOATING_TYPES(
        grad_loss.scalar_type(), "rescale",
        [&] { return row_factors<scalar_t>(grad_loss, grad_scale); });
    if (!factor.defined()) return;
    // The kernel skips the rows that keep their values and widens a bf16/fp16 gradient in
    // vectors, where ATen's mixed-dtype mul_ ran element by element (a bf16 (4096, 32000)
    // gradient: about 330 ms, the fused forward 27). mul_ keeps what the kernel does not take
    // (elements sharing memory, which it rejects; another factor dtype than acc_dtype).
    if (factor.scalar_type() != acc_dtype(grad) ||
        at::has_internal_overlap(grad) != at::MemOverlap::No) {
      grad.mul_(factor.unsqueeze(1));
      return;
    }
    const RowLayout l = layout_of(grad);
    const auto fn = cpu::kernel_table().scale_rows;
    const Dtype dt = kernel_dtype(grad);
    void* g = grad.data_ptr();
    const void* f = factor.const_data_ptr();
    // (B units either way: rows where D is 1, (C, D) planes otherwise)
    at::parallel_for(0, l.B, std::max<int64_t>(1, 32768 / std::max<int64_t>(l.C * l.D, 1)),
                     [&](int64_t begin, int64_t end) { fn(g, l, dt, f, begin, end); });
  }

  static void sigmoid(const SigmoidFocalParams& p, const at::Tensor& input, bool backward) {
    const auto& table = cpu::kernel_table();
    const auto kernel = backward ? table.sigmoid_focal_bwd : table.sigmoid_focal_fwd;
    const Dtype dt = kernel_dtype(input);
    at::parallel_for(0, p.n, 16384,
                     [&](int64_t begin, int64_t end) { kernel(p, dt, begin, end); });
  }

  static void sigmoid_sum(const SigmoidFocalParams& p, const at::Tensor& input,
                          const at::Tensor& out) {
    // A fixed partition summed in order: the same bits whatever the thread count.
    constexpr int64_t kChunk = 16384;
    const auto kernel = cpu::kernel_table().sigmoid_focal_sum;
    const Dtype dt = kernel_dtype(input);
    std::vector<double> part((p.n + kChunk - 1) / kChunk, 0.0);
    at::parallel_for(0, static_cast<int64_t>(part.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        part[c] = kernel(p, dt, c * kChunk, std::min(p.n, (c + 1) * kChunk));
      }
    });
    double sum = 0;
    for (double v : part) sum += v;
    out.fill_(sum * p.scale);
  }

  static void accumulate(at::Tensor& acc, const at::Tensor& src) {
    const auto st = src.scalar_type();
    const bool kernel = acc.scalar_type() == at::kFloat &&
                        (st == at::kFloat || st == at::kBFloat16 || st == at::kHalf) &&
                        acc.is_contiguous() && src.is_contiguous();
    // Partly shared memory: PyTorch's add_ raises its overlap error. (Fully shared is an
    // elementwise doubling, which the kernel does right.)
    const auto overlap = at::get_overlap_status(acc, src);
    if (!kernel || (overlap != at::MemOverlapStatus::No &&
                    overlap != at::MemOverlapStatus::Full)) {
      acc.add_(src);
      return;
    }
    const auto fn = cpu::kernel_table().accumulate;
    float* a = acc.data_ptr<float>();
    const void* s = src.const_data_ptr();
    const Dtype dt = kernel_dtype(src);
    // (Unaligned loads and stores: any split of the range is correct.)
    at::parallel_for(0, acc.numel(), 65536,
                     [&](int64_t begin, int64_t end) { fn(a, s, dt, begin, end); });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(torchloss_fused, CPU, m) {
  register_loss_ops<Cpu>(m);
}

}  // namespace tlf
