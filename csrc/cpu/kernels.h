// The CPU kernel table. kernels_impl.h is compiled once per CPU capability (DEFAULT, AVX2,
// AVX512: see setup.py), each copy in its own namespace; the launchers pick a table at run
// time from at::get_cpu_capability(), so one portable build is fast on every x86 CPU.
// Kernels work on a range of rows so the launcher owns threading and error reporting.
#pragma once

#include <cstdint>

#include "../kernel_params.h"

namespace tlf::cpu {

// Row kernels return -1, or the first row in [begin, end) whose class-index target is out
// of range (neither in [0, C) nor ignore_index); *bad_target receives that target.
struct KernelTable {
  const char* name;
  int64_t (*softmax_loss_fwd)(const SoftmaxLossParams&, Dtype, int64_t begin, int64_t end,
                              int64_t* bad_target);
  int64_t (*softmax_loss_bwd)(const SoftmaxLossParams&, Dtype, int64_t begin, int64_t end,
                              int64_t* bad_target);
  void (*sigmoid_focal_fwd)(const SigmoidFocalParams&, Dtype, int64_t begin, int64_t end);
  void (*sigmoid_focal_bwd)(const SigmoidFocalParams&, Dtype, int64_t begin, int64_t end);
  // Unscaled sum of the losses of elements [begin, end); writes their scaled gradient too
  // when p.grad_input is set.
  double (*sigmoid_focal_sum)(const SigmoidFocalParams&, Dtype, int64_t begin, int64_t end);
  // acc[i] += src[i] for i in [begin, end): src float32, bfloat16 or float16, widened
  // exactly, added in float32.
  void (*accumulate)(float* acc, const void* src, Dtype, int64_t begin, int64_t end);
  // The backward's rescale: each row (b, d) of a (B, C, D) gradient times factor[b * D + d]
  // (float; double for float64), the product rounded once to the gradient's dtype, as
  // grad.mul_(factor) rounds it. Rows whose factor is 1 are not touched (the same bits).
  // [begin, end) counts rows where D is 1, and b (whole (C, D) planes) otherwise.
  void (*scale_rows)(void* grad, const RowLayout&, Dtype, const void* factor, int64_t begin,
                     int64_t end);
};

namespace DEFAULT {
extern const KernelTable kTable;
}
namespace AVX2 {
extern const KernelTable kTable;
}
namespace AVX512 {
extern const KernelTable kTable;
}

// The table for this CPU (honours ATEN_CPU_CAPABILITY, as PyTorch's own kernels do).
const KernelTable& kernel_table();

// Gradients not written over their logits are written with non-temporal stores when the
// logits and the gradient together take more than this many bytes: by default the last-level cache's size
// (32 MiB where the system does not say), since a gradient that large would not stay in
// the caches anyway. set_stream_threshold_bytes(-1) restores the default.
int64_t stream_threshold_bytes();
void set_stream_threshold_bytes(int64_t bytes);
// The same for the column kernels' (N, C, H, W) maps, whose tiles write each of C planes
// at the same offset (a 128 x 128 map's planes are 64 KiB apart: the same cache sets), so
// that plain stores' reads for ownership cost more than a row's: by default 4 MiB (or the
// threshold above, if smaller); a threshold that was set applies as it is.
int64_t map_stream_threshold_bytes();

}  // namespace tlf::cpu
