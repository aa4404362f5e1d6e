"""Run-time launch settings of the CUDA kernels' block-per-row path (large vocabularies):
block size, row-cache cap, an L2 prefetch of the next row, thread block clusters and
bulk copies into shared memory (csrc/cuda/tuning.h).

They exist so that one GPU session can compare several launch shapes, one benchmark process
each, without a rebuild (scripts/gpu_check.sh's `sweep` stage). Set them with the
environment variable read once at import::

    TLF_CUDA_TUNING="block_threads=256,row_cache_kib=108,prefetch_kib=32"
    TLF_CUDA_TUNING="cluster_blocks=8"
    TLF_CUDA_TUNING="bulk_load=1,prefetch_kib=256"

Keys (any subset; the rest keep their defaults, which are the launcher's own choice):

- ``block_threads``: 128, 256 or 512 (default 512) threads per row's block; the launcher
  still halves it for short rows.
- ``row_cache_kib``: cap on a block's shared-memory row cache in KiB, or ``max`` (default:
  as much as the device grants one block). Below about half the SM's shared memory two
  blocks share an SM; what does not fit is re-read from L2.
- ``prefetch_kib``: KiB of the next row each block asks L2 for before its gradient pass
  (default 0: none).
- ``cluster_blocks``: 2, 4, 8 or 16 blocks of a thread block cluster per row, on sm_90 and
  newer, for rows of at least 4 vectors per thread of the cluster (default 0: none). Each
  block of 128 threads caches its share of the row (``row_cache_kib`` caps a block's
  share), so several rows share an SM; ``block_threads`` does not apply to them. 16 is a
  non-portable cluster size: a device that cannot fit one falls back to a block per row.
- ``bulk_load``: 0 or 1 (default 0: off). 1: on sm_90 and newer, each block of a block or
  a cluster per row (rows of contiguous classes) has the bulk-copy engine
  (``cp.async.bulk``, completing on mbarriers) bring the part of the row its shared-memory
  cache holds into it, for the forward's first pass and for the separate backward's one
  pass, instead of each thread loading it through registers. Older devices are unaffected.

No setting changes what is computed; ``block_threads`` and ``cluster_blocks`` change the
order of a row's sums, so the last bits can differ between settings (never between runs
with one setting); ``bulk_load`` changes nothing, not even the last bits (the same sums in
the same order). A malformed value raises ValueError at import. The benchmark records the
variable in its results (software.env), and ``backend_info("cuda")`` names a non-default
setting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from ._env import MAX_BYTES, whole_number

ENV = "TLF_CUDA_TUNING"
THREADS = (128, 256, 512)
CLUSTERS = (0, 2, 4, 8, 16)
BULK_LOADS = (0, 1)


@dataclass(frozen=True)
class CudaTuning:
    block_threads: int = 512
    row_cache_kib: int | None = None  # None: the largest cache the device grants
    prefetch_kib: int = 0
    cluster_blocks: int = 0
    bulk_load: int = 0  # 1: bulk copies (cp.async.bulk) fill the row cache on sm_90+

    def c_args(self) -> tuple[int, int, int, int, int]:
        """(max_threads, row_cache_bytes (-1: no cap), prefetch_bytes, cluster_blocks,
        bulk_load) for _C."""
        cache = -1 if self.row_cache_kib is None else self.row_cache_kib * 1024
        return (self.block_threads, cache, self.prefetch_kib * 1024, self.cluster_blocks,
                self.bulk_load)

    def describe(self) -> str:
        cache = "max" if self.row_cache_kib is None else self.row_cache_kib
        return (f"block_threads={self.block_threads},row_cache_kib={cache},"
                f"prefetch_kib={self.prefetch_kib},cluster_blocks={self.cluster_blocks},"
                f"bulk_load={self.bulk_load}")


DEFAULT = CudaTuning()


def _kib(key: str, text: str) -> int:
    return whole_number(text, f"{ENV}: {key}", "KiB", MAX_BYTES >> 10)


def parse(spec: str) -> CudaTuning:
    """The settings a TLF_CUDA_TUNING value names ("" or blanks: the defaults)."""
    values: dict = {}
    names = {f.name for f in fields(CudaTuning)}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, text = (part.strip() for part in item.partition("="))
        if not sep or not text:
            raise ValueError(f"{ENV}: expected key=value, got {item!r}")
        if key not in names:
            raise ValueError(f"{ENV}: unknown key {key!r}; known: {', '.join(sorted(names))}")
        if key in values:
            raise ValueError(f"{ENV}: {key} given twice")
        if key == "block_threads":
            if text not in {str(t) for t in THREADS}:
                raise ValueError(f"{ENV}: block_threads must be one of {THREADS}, got {text!r}")
            values[key] = int(text)
        elif key == "cluster_blocks":
            if text not in {str(n) for n in CLUSTERS}:
                raise ValueError(f"{ENV}: cluster_blocks must be one of {CLUSTERS}, got {text!r}")
            values[key] = int(text)
        elif key == "bulk_load":
            if text not in {str(n) for n in BULK_LOADS}:
                raise ValueError(f"{ENV}: bulk_load must be 0 or 1, got {text!r}")
            values[key] = int(text)
        elif key == "row_cache_kib" and text == "max":
            values[key] = None
        else:
            values[key] = _kib(key, text)
    return CudaTuning(**values)


def from_env() -> CudaTuning | None:
    """The settings TLF_CUDA_TUNING names, or None when it is unset."""
    spec = os.environ.get(ENV)
    return None if spec is None else parse(spec)


def apply(tuning: CudaTuning) -> None:
    """Makes every later CUDA launch use `tuning` (needs a build with CUDA kernels)."""
    from torchloss_fused import _C

    _C.set_cuda_tuning(*tuning.c_args())


def current() -> CudaTuning:
    """The settings the CUDA launches use now (needs a build with CUDA kernels)."""
    from torchloss_fused import _C

    threads, cache, prefetch, cluster, bulk = _C.cuda_tuning()
    return CudaTuning(threads, None if cache < 0 else cache // 1024, prefetch // 1024, cluster,
                      bulk)
