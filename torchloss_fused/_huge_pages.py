"""Large CPU buffers on transparent huge pages.

A fresh buffer of many MiB is mapped by the allocator and faulted in 4 KiB at a time on
first touch; on Linux, 2 MiB pages halve that cost (the kernels' own gradient buffers get
them in C++: csrc/tensor_params.h). Best effort: elsewhere, without the compiled extension,
or on other devices this is plain torch.empty.
"""

from __future__ import annotations

import torch

from . import _backend


def _advise_fn():
    if not _backend.EXTENSION_LOADED:
        return None
    from . import _C

    return getattr(_C, "advise_huge_pages", None)


_ADVISE = _advise_fn()


def empty(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, its memory advised onto huge pages when it is large and on the CPU."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if _ADVISE is not None and t.device.type == "cpu":
        _ADVISE(t.data_ptr(), t.nbytes)  # (ignores buffers under 8 MiB)
    return t
