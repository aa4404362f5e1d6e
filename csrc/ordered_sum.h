// A sum whose rounding does not depend on the number of CPU threads.
//
// ATen sums a CPU tensor of fewer than at::internal::GRAIN_SIZE (32768) elements on one
// thread; a larger one is split among the threads, each summing its share, so the result's
// last bits change with torch.set_num_threads (and between machines with different core
// counts). F.cross_entropy's CPU mean does not: nll_loss sums its rows in one fixed order.
// ordered_sum cuts a large CPU tensor into blocks of a fixed size, sums each block (one
// thread each: a reduction over a contiguous inner dim is split among threads by outputs),
// then sums the block sums the same way. _reduction.ordered_sum is the same steps in
// Python, so the C++ and Python paths give the same bits.
#pragma once

#include <ATen/core/Tensor.h>

namespace tlf {

// Below this many elements ATen's own CPU sum runs on one thread.
constexpr int64_t kSerialSumElements = 32768;
// Elements per block of a larger sum.
constexpr int64_t kSumBlock = 16384;

// v.sum() (every element, v's dtype), the same bits whatever the thread count.
at::Tensor ordered_sum(const at::Tensor& v);

}  // namespace tlf
