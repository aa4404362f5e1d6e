// Torch-free descriptions of one kernel launch: raw pointers, sizes, element strides and
// options. Launchers fill these from tensors; CPU and CUDA kernel bodies read only these,
// so kernel translation units never include a torch header.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

// Helpers below run on the host (CPU kernels, launchers) and on the device (CUDA kernels).
#if defined(__CUDACC__)
#define TLF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TLF_HOST_DEVICE inline
#endif

namespace tlf {

// Element type of the logits (kernels accumulate in float, or double for Float64).
enum class Dtype : int32_t { Float32 = 0, Float64 = 1, BFloat16 = 2, Float16 = 3 };

// What a softmax-family launch computes.
enum class Mode : int32_t {
  Forward = 0,   // per-row loss and lse
  Backward = 1,  // the gradient, from a saved lse
  Fused = 2      // loss, lse and the gradient of sum_r grad_scale_r * loss_r
};

// Integer type of a class-index target.
enum class IndexType : int32_t { Int64 = 0, Int32 = 1, UInt8 = 2 };

// Rows of a (B, C, D) view: row r = b * D + d holds classes c at
// b * sb + c * sc + d * sd (element strides, 64-bit so B*C*D may exceed 2^31).
struct RowLayout {
  int64_t B = 0, C = 0, D = 1;
  int64_t sb = 0, sc = 1, sd = 0;

  TLF_HOST_DEVICE int64_t rows() const { return B * D; }
  TLF_HOST_DEVICE int64_t row_offset(int64_t r) const {
    if (D == 1) return r * sb;  // the common case skips a 64-bit division
    return (r / D) * sb + (r % D) * sd;
  }
};

// Strided (B, D) per-row tensor (targets, grad_output); stride 0 broadcasts.
struct RowVector {
  const void* ptr = nullptr;
  int64_t sb = 0, sd = 0;
  int64_t D = 1;

  TLF_HOST_DEVICE int64_t offset(int64_t r) const {
    if (D == 1) return r * sb;
    return (r / D) * sb + (r % D) * sd;
  }
};

// What a softmax-family row loss needs. `acc` below is float for fp32/bf16/fp16 inputs
// and double for fp64 inputs; pointers to acc values point to that type.
struct SoftmaxLossParams {
  // Logits (input dtype) in a (B, C, D) layout.
  const void* input = nullptr;
  RowLayout in;

  // Class-index target: (B, D) integers. Probability target: (B, C, D) floats with
  // strides prob_target_layout (dtype = input dtype, or float32 if target_is_float32).
  bool prob_target = false;
  RowVector index_target;
  IndexType index_type = IndexType::Int64;
  const void* prob_target_ptr = nullptr;
  RowLayout prob_target_layout;
  bool target_is_float32 = false;

  int64_t ignore_index = -100;

  // Per-class weights (acc, contiguous, C) or null; weight_sum points to sum_c w_c (acc)
  // in the same memory space as the kernel (host for CPU, device for CUDA).
  const void* weight = nullptr;
  const void* weight_sum = nullptr;

  // Cross-entropy options.
  double label_smoothing = 0.0;
  double z_loss = 0.0;
  double softcap = 0.0;  // 0 = off
  double logit_scale = 1.0;

  // Focal options (used when focal is true): alpha_t = alpha_scale * (alpha ? alpha[t] : 1).
  bool focal = false;
  double gamma = 0.0;
  const void* alpha = nullptr;  // acc, contiguous C, or null
  double alpha_scale = 1.0;

  // Forward outputs: per-row loss (acc) and log-sum-exp (double: RowLse), contiguous,
  // B * D.
  void* loss = nullptr;
  void* lse = nullptr;

  // Backward inputs and output. A fused forward (with_grad) also writes grad_input, using
  // grad_loss as the per-row scale of the gradient and its own lse.
  bool with_grad = false;
  const void* lse_in = nullptr;  // as lse, contiguous
  RowVector grad_loss;           // acc, strided
  RowVector grad_lse;            // double (as lse), strided; ptr null when absent
  void* grad_input = nullptr;    // input dtype, in grad_layout
  RowLayout grad_layout;
  // Fused forward, CPU kernels, D == 1 only: each gradient value is stored as
  // _rescale_grad_rows would leave it after multiplying the stored value by this (an acc
  // value): round(round(g) * post_scale) (the eager path's upstream guess:
  // reduced_loss.cpp). 1: off.
  double post_scale = 1.0;
};

// Elementwise sigmoid focal loss over n contiguous elements (input and target share the
// input dtype; loss is written in that dtype too).
struct SigmoidFocalParams {
  const void* input = nullptr;
  const void* target = nullptr;
  int64_t n = 0;
  double alpha = 0.25;  // < 0 disables the alpha term
  double gamma = 2.0;
  void* loss = nullptr;
  // Backward: grad_loss is contiguous n values, or one value broadcast when scalar_grad.
  const void* grad_loss = nullptr;
  bool scalar_grad = false;
  void* grad_input = nullptr;
  // Reduced forms (sigmoid_focal_sum, sigmoid_focal_sum_grad): no elementwise loss is
  // written; the result is scale * (sum of the losses), and when grad_input is set the same
  // pass writes grad = scale * d loss / dx (the gradient of that result).
  double scale = 1.0;
};

// A row's log-sum-exp lse = M + log S (M its largest logit) as the kernels use it. A row
// accumulated in float (float32, bf16, fp16 logits) stores it as the double M + log S (two
// floats: the sum is exact), so that nothing rounds lse to float32: an ulp of lse near a
// large M is far above F's error, which works relative to M. The kernels take it as
// hi + lo, hi its float rounding and lo the rest rounded (0 where hi is not finite), hi per
// element and lo per row: exp(s - lse) = exp(s - hi) exp(-lo) and lse - s = (hi - s) + lo.
// (A bf16 row's results are then still its float32 row's, rounded once.) float64 rows
// store their double lse, lo = 0; a zero lo changes no bit of any formula: each subtracts
// +0 (x - (+0) is x, -0 included) or multiplies by 1. No formula branches on lo: a row's
// lo is 0 about half the time (log S's last bit below hi's ulp), and a branch on it was
// mispredicted as often, a fifth of a 10-class row's time.
template <typename acc_t>
struct RowLse {
  acc_t hi = 0, lo = 0;
  // lse - s, as (hi - s) - (0 - lo)
  TLF_HOST_DEVICE acc_t minus(acc_t s) const { return (hi - s) - (acc_t(0) - lo); }
  // s - lse (log p of a logit s)
  TLF_HOST_DEVICE acc_t log_p(acc_t s) const { return (s - hi) - lo; }
  // exp(-lo), the factor from exp(s - hi) to p; 1 exactly for lo = 0. No exp per row for
  // ordinary logits (short rows would feel one): 1 - lo where |lo| < 2^-16 (|hi| below
  // 512; the dropped lo^2 / 2 is below 2^-33), one operation on the row's way to its
  // gradient loop; 1 - lo + lo^2 / 2 where |lo| < 2^-12 (|hi| below 8192; within 2^-38).
  TLF_HOST_DEVICE acc_t correction() const {
    if constexpr (std::is_same_v<acc_t, double>) {
      // (a double row's lo reaches 2^-16 near |hi| of 1e11, where the series' dropped
      // terms exceed a double's precision)
      return lo == 0 ? acc_t(1) : std::exp(-lo);
    }
    const acc_t a = lo < 0 ? -lo : lo;
    if (a < acc_t(0x1p-16)) return acc_t(1) - lo;
    if (a < acc_t(0x1p-12)) return (acc_t(1) - lo) + acc_t(0.5) * lo * lo;
    return std::exp(-lo);
  }
};

// M + log S of a row as hi + lo: hi their float sum, lo its rounding error, exactly
// (Knuth's two-sum: Dekker's faster one needs the larger magnitude first, and a select on
// that cost a 10-class row more than the two operations it saves).
template <bool kSplit, typename acc_t>
TLF_HOST_DEVICE RowLse<acc_t> lse_of(acc_t M, acc_t log_s) {
  RowLse<acc_t> l;
  l.hi = M + log_s;
  if (kSplit && l.hi - l.hi == acc_t(0)) {  // (0 only for a finite hi)
    const acc_t b = l.hi - M, a = l.hi - b;
    l.lo = (M - a) + (log_s - b);
  }
  return l;
}

// The stored lse (a double for every dtype): for rows accumulated in float the double
// hi + lo (exact, and split_lse gives back the same hi and lo, since float(hi + lo) is the
// rounding of M + log S, hi); float64 rows store hi.
template <bool kSplit, typename acc_t>
TLF_HOST_DEVICE double stored_lse(const RowLse<acc_t>& l) {
  if constexpr (kSplit) {
    return static_cast<double>(l.hi) + static_cast<double>(l.lo);
  } else {
    return l.hi;
  }
}

// A stored lse as hi + lo (kSplit: a row accumulated in float).
template <bool kSplit, typename acc_t>
TLF_HOST_DEVICE RowLse<acc_t> split_lse(double v) {
  RowLse<acc_t> l;
  l.hi = static_cast<acc_t>(v);
  // v - hi is exact in double; hi - hi is 0 only for a finite hi
  if (kSplit && l.hi - l.hi == acc_t(0)) l.lo = static_cast<acc_t>(v - static_cast<double>(l.hi));
  return l;
}

// Whether a backward computed apart from the forward may take a row's lse from its stored
// double: split_lse gives back hi and lo to within half an ulp of hi in double, which is
// below float's rounding (6e-8) while |hi| < 2^30, and for float64 rows (whose stored lse
// is hi alone, lo dropped) 3e-14 while |hi| < 2^8. Beyond (logits of 1e12 made the float32
// gradient 1e-5 off, of 1e20 every p_c 1), the backward recomputes the row's lse from its
// logits: one more read of the row, the forward's hi and lo. NaN and inf rows keep theirs.
template <typename acc_t>
TLF_HOST_DEVICE bool stored_lse_suffices(acc_t hi) {
  const acc_t limit = std::is_same_v<acc_t, double> ? acc_t(0x1p8) : acc_t(0x1p30);
  return !(hi >= limit || hi <= -limit) || hi - hi != acc_t(0);
}

// Value of row r of a per-row vector of acc_t (float or double).
template <typename acc_t>
TLF_HOST_DEVICE acc_t read_row_value(const RowVector& v, int64_t r) {
  return static_cast<const acc_t*>(v.ptr)[v.offset(r)];
}

// The class-index target of row r, whatever its integer type.
TLF_HOST_DEVICE int64_t read_index(const SoftmaxLossParams& p, int64_t r) {
  const int64_t off = p.index_target.offset(r);
  switch (p.index_type) {
    case IndexType::Int32:
      return static_cast<const int32_t*>(p.index_target.ptr)[off];
    case IndexType::UInt8:
      return static_cast<const uint8_t*>(p.index_target.ptr)[off];
    case IndexType::Int64:
    default:
      return static_cast<const int64_t*>(p.index_target.ptr)[off];
  }
}

}  // namespace tlf
