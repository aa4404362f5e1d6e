// Run-time launch settings of the block-per-row softmax kernels (the large-vocabulary path),
// so that one GPU session can compare several in separate benchmark processes without a
// rebuild: torchloss_fused/_cuda_tuning.py reads TLF_CUDA_TUNING at import and sets them
// through _C.set_cuda_tuning. The defaults are the launcher's own choice. Torch- and
// CUDA-free, so csrc/ops.cpp (a C++ file) can include it.
//
// None of them changes what is computed; block_threads changes the order of a row's sums
// (as the launcher's own choice of block size does between vocabulary sizes), so the last
// bits can differ between settings, never between runs with one setting.
#pragma once

#include <cstdint>

namespace tlf::cuda {

struct BlockRowTuning {
  int max_threads = 512;         // threads of a block per row: 128, 256 or 512
  int64_t row_cache_bytes = -1;  // cap on a block's shared-memory row cache; -1: no cap
  int64_t prefetch_bytes = 0;    // L2 prefetch of the next row's first bytes; 0: none
  // Blocks of a thread block cluster per row on sm_90 and newer (cluster_group.cuh): 2, 4, 8
  // or 16; 0: none. Long rows only; elsewhere, and on older devices, a block per row.
  int cluster_blocks = 0;
  // Each block of a block or cluster per row (sm_90 and newer, vector rows) has the
  // bulk-copy engine (cp.async.bulk) bring the part of the row its cache holds into shared
  // memory, for pass 1 or the backward's one pass, instead of each thread loading it
  // through registers: 0 off, 1 on.
  int bulk_load = 0;
};

// Valid: max_threads in {128, 256, 512}, row_cache_bytes >= -1, prefetch_bytes >= 0,
// cluster_blocks in {0, 2, 4, 8, 16}, bulk_load in {0, 1}.
bool valid(const BlockRowTuning& t);

// The settings every later launch uses (a copy, read under a lock). set returns false and
// changes nothing when `t` is not valid.
BlockRowTuning block_row_tuning();
bool set_block_row_tuning(const BlockRowTuning& t);

}  // namespace tlf::cuda
