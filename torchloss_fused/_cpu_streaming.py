"""When the CPU kernels write a gradient with non-temporal (streaming) stores.

A plain store first reads the cache line it writes (a read for ownership). For a gradient
too large to stay in the caches that read is wasted traffic, a third of a fused forward +
backward's, so the kernels write a gradient with streaming stores once the logits and the
gradient together are larger than the last-level cache (csrc/cpu/kernels.h), unless it is
written over the logits (inplace_backward).
``TLF_CPU_STREAM_MIB`` (read at import; MiB, 0: always) sets another size.
"""

from __future__ import annotations

from . import _backend
from ._env import mib_from_env

ENV = "TLF_CPU_STREAM_MIB"

_THRESHOLD = mib_from_env(ENV)  # checked even where there is no extension to apply it to
if _backend.EXTENSION_LOADED:
    from . import _C

    if hasattr(_C, "set_cpu_stream_threshold"):
        _C.set_cpu_stream_threshold(-1 if _THRESHOLD is None else _THRESHOLD)  # -1: default
