#include "ordered_sum.h"

#include <ATen/ATen.h>

namespace tlf {

at::Tensor ordered_sum(const at::Tensor& v) {
  if (!v.device().is_cpu() || v.numel() < kSerialSumElements) return v.sum();
  const at::Tensor flat = v.reshape({-1});
  const int64_t pad = (kSumBlock - flat.numel() % kSumBlock) % kSumBlock;
  // (the zeros added change no block's sum: ATen's starts from +0 anyway)
  const at::Tensor blocks = at::constant_pad_nd(flat, {0, pad}, 0).view({-1, kSumBlock});
  return ordered_sum(blocks.sum(1));
}

}  // namespace tlf
