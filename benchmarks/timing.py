"""Median wall time of one benchmark step, and the device's copy bandwidth timed alike.

CPU: torch.utils.benchmark.Timer.blocked_autorange, with num_threads set to torch's
current thread count (Timer defaults to 1 thread, which would misreport every
multi-threaded kernel). CUDA: one pair of events around each step, synchronised before and
after the batch, so host overhead between steps is not counted but launch gaps within a
step are. Both ask for at least `min_runs` steps however slow a step is, since a median of
one or two samples says little.

A step that overwrites its inputs (inplace_backward, Liger's gradient in the logits) is
measured with `between`: an untimed call before each step that restores its inputs, so
every timed step sees the inputs the others see, not the gradient a previous step left.
Each sample is then one step: CUDA events around it alone; on the CPU its perf_counter
time.

The implementations of one case are timed in `rounds` rounds, taking turns within each
(runner.py), and each one's samples are merged (`merge`): a machine whose speed drifts
while a case runs then slows all of them alike instead of whichever ran during the slow
spell.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.utils.benchmark as tbench

from . import bytes_model

MAX_CUDA_RUNS = 2000
MAX_STEP_RUNS = 2000  # steps timed one by one (`between`): a cap for the tiny shapes


@dataclass
class Settings:
    min_run_time: float = 0.5  # seconds of timed steps per row, at the least
    min_runs: int = 5
    warmup: int = 2  # calls before timing, counting the correctness and memory runs
    rounds: int = 3  # turns each implementation of a case takes at being timed


@dataclass
class Timing:
    median_s: float
    iqr_s: float
    runs: int
    method: str
    # Per-step seconds the median is taken over (CPU: each a block's mean per step).
    samples_s: list[float] = field(default_factory=list, repr=False)


def _summary(samples: list[float], runs: int, method: str) -> Timing:
    times = sorted(samples)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return Timing(statistics.median(times), q[2] - q[0], runs, method, times)


def merge(parts: list[Timing]) -> Timing:
    """One Timing from several rounds' timings of the same step: the median over all
    their samples."""
    return _summary([s for p in parts for s in p.samples_s], sum(p.runs for p in parts),
                    parts[0].method)


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
            estimate_s: float, rounds: int = 1,
            between: Callable[[], None] | None = None) -> Timing:
    """Times `step` (already warmed up; `estimate_s` is one run's duration from warm-up):
    one round's share, 1/rounds, of the time and runs the settings ask for. `between`, if
    given, runs untimed before every step (see the module's docstring)."""
    rounds = max(1, rounds)
    budget = max(settings.min_run_time, settings.min_runs * estimate_s) / rounds
    min_runs = math.ceil(settings.min_runs / rounds)
    if between is not None:
        return _measure_steps(step, between, device, budget, min_runs, estimate_s)
    if device.type == "cuda":
        return _measure_cuda(step, device, budget, min_runs, estimate_s)
    return _measure_cpu(step, budget, min_runs)


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
    return _summary(list(m.times), len(m.times) * number,
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
    return _summary([s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)], runs,
                    "cuda-events")


def _measure_steps(step, between, device, budget: float, min_runs: int,
                   estimate_s: float) -> Timing:
    runs = min(MAX_STEP_RUNS, max(min_runs, math.ceil(budget / max(estimate_s, 1e-6))))
    if device.type == "cuda":
        # (queued without a sync, as _measure_cuda's steps: between's kernels run before
        # each start event, and the host's work on a step overlaps the device's on the last)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(runs)]
        torch.cuda.synchronize(device)
        for start, end in events:
            between()
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        samples = [start.elapsed_time(end) / 1e3 for start, end in events]
        method = "cuda-events"
    else:
        samples = []
        for _ in range(runs):
            between()
            t0 = time.perf_counter()
            step()
            samples.append(time.perf_counter() - t0)
        method = "perf_counter"
    return _summary(samples, runs, f"{method}, one step at a time, inputs restored between")


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
