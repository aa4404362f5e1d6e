"""How many rows of tokens one chunk of the fused linear cross-entropy holds.

Per chunk of n rows the three products cost ~6 n V H flops, while accumulating grad_weight
reads and writes the V x H accumulator once: that overhead relative to the products falls
as 1/n, whatever V and H. The logits buffer costs n x V elements. So n is kept above a
floor that keeps the products efficient and below a memory budget.
"""

from __future__ import annotations

import torch

# CPU: rows from a fixed buffer budget, within bounds (measured at N=4096, H=1024,
# V=32000 on 2 cores: 512 rows beat 256 and 1024 in fp32 and bf16; more rows add memory,
# fewer add grad_weight accumulation passes). The floor: fp32 at N=1024, H=512, V=128256
# took ~1540 ms at the budget's 128 rows, ~1420 at 256 and ~1370 at 512 (bf16 there:
# the same at 256 and 512).
CPU_BUFFER_BYTES = 64 << 20
CPU_MIN_ROWS = 256
CPU_MAX_ROWS = 512
# CUDA: rows = H * GPU_ROWS_PER_HIDDEN (the buffer is then that fraction of the weight's
# bytes), at least GPU_MIN_ROWS, and the buffer at most 1/GPU_FREE_FRACTION of the free
# memory. Not yet tuned on a GPU.
GPU_ROWS_PER_HIDDEN = 0.5
GPU_MIN_ROWS = 256
GPU_FREE_FRACTION = 8
# Rows of the bf16/fp16 -> wider-dtype accumulation temporaries where no matmul writes the
# wider dtype directly (CPU): a block of the product in the input dtype, then converted.
ACCUM_BLOCK_BYTES = 4 << 20


def _round_rows(rows: int) -> int:
    return rows - rows % 64 if rows >= 128 else max(1, rows)


def _free_cuda_bytes(device: torch.device) -> int:
    if torch.cuda.is_current_stream_capturing():
        # No driver query while a CUDA graph is captured (global capture mode may refuse
        # it), and what is free now says little about replays: the device's size instead.
        return torch.cuda.get_device_properties(device).total_memory
    free, _ = torch.cuda.mem_get_info(device)  # a driver query, no stream synchronisation
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + max(0, cached)


def auto_chunk_size(N: int, V: int, H: int, dtype: torch.dtype,
                    device: torch.device) -> int:
    """Rows per chunk when ``chunk_size`` is not given (see the policy above)."""
    per_row = max(1, V * dtype.itemsize)
    if device.type == "cuda":
        budget = _free_cuda_bytes(device) // GPU_FREE_FRACTION
        rows = min(max(int(H * GPU_ROWS_PER_HIDDEN), GPU_MIN_ROWS), budget // per_row)
    else:
        rows = min(max(CPU_BUFFER_BYTES // per_row, CPU_MIN_ROWS), CPU_MAX_ROWS)
    return max(1, min(N, _round_rows(rows)))
