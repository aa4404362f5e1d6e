"""Peak extra memory of one benchmark step: bytes allocated above what existed before it.

Inputs already exist before the step, so they are excluded; whatever the step allocates
(outputs, saved activations, the gradient, buffers inside C++/CUDA kernels) is counted
even when it is freed again before the step returns.

- CUDA: the caching allocator's own counters: reset_peak_memory_stats, then
  max_memory_allocated() - memory_allocated() before the step.
- CPU, Linux: the process's peak resident set. Writing "5" to /proc/self/clear_refs resets
  VmHWM to the current RSS; after the step VmHWM - RSS-before is the peak growth. It sees
  every allocation a kernel makes in C++, whichever allocator made it, but only pages that
  are touched (a gradient is written, so it counts; an untouched torch.empty does not).
  Before the reset the C heap is trimmed (glibc malloc_trim) and torchloss_fused's CPU
  buffer cache emptied, so that memory freed by an earlier step but still resident cannot
  be reused unseen.
- CPU elsewhere: torch.profiler(profile_memory=True), replaying its allocation events to
  find the running peak (sees allocations made through PyTorch's allocator only).

`probe()` checks the method on a known case: F.cross_entropy's forward allocates a
log-softmax buffer the size of its input inside C++ and frees it before returning.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(key: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise KeyError(key)


def _load_malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_MALLOC_TRIM = _load_malloc_trim()


def _reset_peak_rss() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def rss_available() -> bool:
    return _STATUS.exists() and _reset_peak_rss()


def cpu_method() -> str:
    return "peak-rss" if rss_available() else "profiler"


def method_for(device: torch.device) -> str:
    return "cuda-allocator" if device.type == "cuda" else cpu_method()


def peak_extra_bytes(fn: Callable[[], object], device: torch.device,
                     method: str | None = None) -> int:
    """Peak bytes allocated by `fn()` above the memory in use before it."""
    method = method or method_for(device)
    gc.collect()
    if method == "cuda-allocator":
        return _peak_cuda(fn, device)
    if method == "peak-rss":
        return _peak_rss(fn)
    if method == "profiler":
        return _peak_profiler(fn, device)
    raise ValueError(f"unknown memory method {method!r}")


def _peak_cuda(fn, device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - before)


def _empty_caches() -> None:
    """Gives freed memory held for reuse back first (the C heap's, torchloss_fused's CPU
    buffer cache), so that what a step allocates shows as growth."""
    try:
        import torchloss_fused

        getattr(torchloss_fused, "empty_cpu_cache", lambda: None)()
    except ImportError:
        pass
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _peak_rss(fn) -> int:
    _empty_caches()
    if not _reset_peak_rss():
        raise OSError("cannot write /proc/self/clear_refs")
    before = _status_bytes("VmRSS")
    fn()
    return max(0, _status_bytes("VmHWM") - before)


def _peak_profiler(fn, device) -> int:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    # Allocation (+) and free (-) records in time order; their running sum peaks at the
    # peak extra memory. Per-op memory totals would net an alloc and free inside one op.
    want = "CPU" if device.type == "cpu" else "CUDA"
    records = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type().name == want
    )
    current = peak = 0
    for _, nbytes in records:
        current += nbytes
        peak = max(peak, current)
    return peak


def prefault(nbytes: int) -> float:
    """Touches `nbytes` of fresh host memory once and frees it; returns the seconds taken.

    The first touch of memory a process has never had is slow on virtual machines (the
    host backs guest pages lazily: here about a second per GiB), and it would land on
    whichever rows run first. Touching it up front lets every row, ours and the
    baselines alike, run in the steady state a long training process sees.
    """
    if nbytes <= 0:
        return 0.0
    import time

    start = time.perf_counter()
    block = torch.empty(nbytes // 4, dtype=torch.float32)
    block.fill_(1.0)
    del block
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
    return time.perf_counter() - start


def probe(device: torch.device, method: str | None = None,
          nbytes: int = 64 * 2**20) -> dict:
    """How much of a known C++-internal allocation of `nbytes` the method sees."""
    rows = 1024
    x = torch.randn(rows, nbytes // (4 * rows), device=device)
    y = torch.zeros(rows, dtype=torch.long, device=device)
    F.cross_entropy(x, y)  # warm-up: first calls allocate lazily initialised state
    seen = peak_extra_bytes(lambda: F.cross_entropy(x, y), device, method)
    return {"expected_bytes": x.numel() * 4, "seen_bytes": seen}
