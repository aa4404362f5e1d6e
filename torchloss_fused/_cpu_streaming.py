"""When the CPU kernels write a gradient with non-temporal (streaming) stores.

A plain store first reads the cache line it writes (a read for ownership). For a gradient
too large to stay in the caches that read is wasted traffic, a third of a fused forward +
backward's, so the fused forward writes its gradient with streaming stores once the logits
and the gradient together are larger than the last-level cache (csrc/cpu/kernels.h).
``TLF_CPU_STREAM_MIB`` (read at import; MiB, 0: always) sets another size.
"""

from __future__ import annotations

import os

from . import _backend

ENV = "TLF_CPU_STREAM_MIB"


def _threshold_from_env() -> int:
    """Bytes from the variable, or -1 (unset: the kernels' default)."""
    text = os.environ.get(ENV)
    if text is None:
        return -1
    try:
        mib = int(text)
    except ValueError:
        raise ValueError(f"{ENV} must be a whole number of MiB, got {text!r}") from None
    if mib < 0:
        raise ValueError(f"{ENV} must be >= 0, got {mib}")
    return mib << 20


_THRESHOLD = _threshold_from_env()  # checked even where there is no extension to apply it to
if _backend.EXTENSION_LOADED:
    from . import _C

    if hasattr(_C, "set_cpu_stream_threshold"):
        _C.set_cpu_stream_threshold(_THRESHOLD)
