"""Median wall time of one benchmark step, and the device's copy bandwidth timed alike.

CPU: torch.utils.benchmark.Timer.blocked_autorange, with num_threads set to torch's
current thread count (Timer defaults to 1 thread, which would misreport every
multi-threaded kernel). CUDA: one pair of events around each step, synchronised before and
after the batch, so host overhead between steps is not counted but launch gaps within a
step are. Both ask for at least `min_runs` steps however slow a step is, since a median of
one or two samples says little.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.utils.benchmark as tbench

from . import bytes_model

MAX_CUDA_RUNS = 2000


@dataclass
class Settings:
    min_run_time: float = 0.5  # seconds of timed steps per row, at the least
    min_runs: int = 5
    warmup: int = 2  # calls before timing, counting the correctness and memory runs


@dataclass
class Timing:
    median_s: float
    iqr_s: float
    runs: int
    method: str


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(step: Callable[[], None], device: torch.device, count: int) -> float:
    """Runs `step` `count` times (at least once); returns the last run's seconds."""
    last = 0.0
    for _ in range(max(1, count)):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        last = time.perf_counter() - t0
    return last


def measure(step: Callable[[], None], device: torch.device, settings: Settings,
            estimate_s: float) -> Timing:
    """Times `step` (already warmed up; `estimate_s` is one run's duration from warm-up)."""
    budget = max(settings.min_run_time, settings.min_runs * estimate_s)
    if device.type == "cuda":
        return _measure_cuda(step, device, budget, settings.min_runs, estimate_s)
    return _measure_cpu(step, budget, settings.min_runs)


def _measure_cpu(step, budget: float, min_runs: int) -> Timing:
    timer = tbench.Timer(stmt="step()", globals={"step": step},
                         num_threads=torch.get_num_threads())
    parts = [timer.blocked_autorange(min_run_time=budget)]
    # A step slower than the warm-up suggested can leave too few samples: top up with blocks
    # of the same size and take the median over all of them.
    number = parts[0].number_per_run
    while sum(len(p.times) for p in parts) < min_runs:
        parts.append(timer.timeit(number))
    m = tbench.Measurement.merge(parts)[0]
    return Timing(m.median, m.iqr, len(m.times) * number,
                  "torch.utils.benchmark.Timer.blocked_autorange")


def _measure_cuda(step, device, budget: float, min_runs: int, estimate_s: float) -> Timing:
    runs = min(MAX_CUDA_RUNS, max(min_runs, math.ceil(budget / max(estimate_s, 1e-6))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    torch.cuda.synchronize(device)
    for start, end in zip(starts, ends):
        start.record()
        step()
        end.record()
    torch.cuda.synchronize(device)
    times = sorted(s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends))
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return Timing(statistics.median(times), q[2] - q[0], runs, "cuda-events")


@dataclass
class CopyBandwidth:
    tensor_bytes: int
    bytes_moved: int
    median_s: float
    gb_per_s: float


def copy_bandwidth(device: torch.device, tensor_bytes: int, settings: Settings) -> CopyBandwidth:
    """Bandwidth of dst.copy_(src) for a tensor much larger than the last-level cache."""
    n = tensor_bytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)

    def step():
        dst.copy_(src)

    est = warm_up(step, device, settings.warmup)  # also faults in dst's pages
    t = measure(step, device, settings, est)
    moved = bytes_model.copy_bytes_moved(n * 4)
    return CopyBandwidth(n * 4, moved, t.median_s, bytes_model.gb_per_s(moved, t.median_s))
