"""Large CPU buffers from the extension's host buffer cache (csrc/host_buffers.h).

A fresh buffer of hundreds of MiB is faulted in page by page on first touch and zeroed by
the OS before a kernel overwrites it; on a 2-core Xeon VM that was a third of a float32
cross-entropy forward + backward step. The kernels' gradients and linear_cross_entropy's
buffers (8 MiB and more) therefore come from blocks that earlier calls' tensors gave back
when they were freed, as PyTorch's CUDA caching allocator does on a GPU. Fresh blocks are
mapped 2 MiB aligned (on Linux straight from the OS, and unmapped when evicted) and advised
onto transparent huge pages.

The cache holds at most ``TLF_CPU_CACHE_MIB`` MiB of freed blocks (read at import; default
2048; 0 turns it off), the least recently freed evicted first. ``empty_cpu_cache()`` gives
them back to the OS; ``cpu_cache_info()`` says what it holds. Without the compiled
extension, or on other devices, buffers are plain torch.empty.
"""

from __future__ import annotations

import torch

from . import _backend
from ._env import mib_from_env

ENV = "TLF_CPU_CACHE_MIB"
DEFAULT_MIB = 2048


def _extension():
    if not _backend.EXTENSION_LOADED:
        return None
    from . import _C

    return _C if hasattr(_C, "host_empty") else None


# Checked even where there is no extension to apply it to.
_LIMIT = mib_from_env(ENV)
if _LIMIT is None:
    _LIMIT = DEFAULT_MIB << 20
_C = _extension()
if _C is not None:
    _C.set_host_cache_limit(_LIMIT)


def empty(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty (contiguous), from the host buffer cache when large and on the CPU."""
    if _C is not None and torch.device(device).type == "cpu":
        sizes = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
        return _C.host_empty(sizes, torch.empty((), dtype=dtype))
    return torch.empty(shape, dtype=dtype, device=device)


def empty_cpu_cache() -> None:
    """Frees the CPU buffers torchloss_fused keeps for reuse (blocks of gradients and work
    buffers that were freed). Tensors in use are not affected."""
    if _C is not None:
        _C.host_cache_clear()


def cpu_cache_info() -> dict:
    """What the CPU buffer cache holds: ``cached_bytes``, ``cached_blocks``, ``limit_bytes``
    (0: off), and ``hits`` / ``misses`` (large allocations served from it / needing fresh
    memory) since the start of the process."""
    keys = ("cached_bytes", "cached_blocks", "limit_bytes", "hits", "misses")
    if _C is None:
        return dict.fromkeys(keys, 0)
    return dict(zip(keys, _C.host_cache_info()))
