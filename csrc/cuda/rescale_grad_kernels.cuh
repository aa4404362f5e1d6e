// Kernel body of _rescale_grad_rows: the backward of the fused ops. Each group reads
// grad_loss[r] and grad_scale[r] on the device and leaves the row untouched when they are
// equal (the usual case), so the op never needs the host to look at either vector.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../kernel_params.h"
#include "device_math.cuh"
#include "group_reduce.cuh"
#include "softmax_row_math.cuh"
#include "vec_io.cuh"

namespace tlf::cuda {

template <typename T, class G, bool kVec>
__global__ void __launch_bounds__(256)
    rescale_grad_rows_kernel(T* grad, const RowLayout layout, const RowVector grad_loss,
                             const RowVector grad_scale) {
  using acc_t = acc_of<T>;
  using V = Vec16<T>;
  constexpr int kN = V::kVec;
  const G grp;
  const int lane = grp.lane(), gsize = grp.size();
  const int64_t rows = layout.B * layout.D, C = layout.C;
  for (int64_t r = grp.first(); r < rows; r += grp.stride()) {
    const acc_t a = read_row_value<acc_t>(grad_loss, r);
    const acc_t b = read_row_value<acc_t>(grad_scale, r);
    // NaN != NaN: a NaN grad_loss still reaches the row. A row made for a non-finite
    // scale (a mean over no counted target: 1/0; a nan one, _reduction.mean_denominator's)
    // stays as made: any factor would be NaN, and an ignored row's zeros must stay.
    if (a == b || !is_finite(b)) continue;
    const acc_t f = div_rn(a, b);
    T* row = grad + layout.row_offset(r);
    auto scale1 = [&](T* e) { *e = from_acc<T>(to_acc(*e) * f); };
    if (kVec) {
      int64_t head = elems_to_alignment(row);
      if (head > C) head = C;
      const int64_t nvec = (C - head) / kN, tail = head + nvec * kN;
      if (lane < head) scale1(row + lane);
      if (tail + lane < C) scale1(row + tail + lane);
      T* rv = row + head;
      for (int64_t v = lane; v < nvec; v += gsize) {
        acc_t e[kN];
        V::unpack(V::load(rv + v * kN), e);
#pragma unroll
        for (int j = 0; j < kN; ++j) e[j] = e[j] * f;
        V::store(rv + v * kN, V::pack(e));
      }
    } else {
      for (int64_t c = lane; c < C; c += gsize) scale1(row + c * layout.sc);
    }
  }
}

}  // namespace tlf::cuda
