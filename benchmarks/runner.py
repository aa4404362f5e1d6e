"""One case end to end: inputs, oracle, then per implementation check -> warm-up ->
peak memory -> timing, and the ratios against the baselines measured alongside."""

from __future__ import annotations

import gc
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import bytes_model, correctness, memory, oracle, problems, timing
from .baselines import COMPILE, EAGER, OURS_COMPILED, UNCHECKED_WHY, Impl, eager_fn
from .cases import LINEAR_OPS, OP_LABELS, Case
from .rows import ERROR, FAILED, OK, SKIPPED, Row

# Input sets are rotated until they span this many times the last-level cache, so a step
# never finds its data in cache; capped to bound the warm-up of tiny shapes.
CACHE_MULTIPLE = 4
MAX_INPUT_SETS = 16
# Peak memory of the greediest baseline in logits sizes, rounded up (eager CE fwd+bwd keeps
# log-probabilities, their gradient and the logits' gradient: 3x; eager sigmoid focal keeps
# a dozen elementwise intermediates): used to skip cases that cannot fit.
BASELINE_PEAK_LOGITS = {"sigmoid_focal_fwd_bwd": 20}
DEFAULT_BASELINE_PEAK_LOGITS = 4
MEMORY_HEADROOM = 0.9


@dataclass
class Context:
    device: torch.device
    settings: timing.Settings
    llc_bytes: int
    copy_gb_per_s: float
    memory_method: str
    seed: int = 0


def input_sets_for(case: Case, llc_bytes: int) -> int:
    nbytes = problems.input_set_nbytes(case)
    if nbytes >= CACHE_MULTIPLE * llc_bytes:
        return 1
    return min(MAX_INPUT_SETS, math.ceil(CACHE_MULTIPLE * llc_bytes / nbytes))


def rotation_leaves_cache(case: Case, llc_bytes: int) -> bool:
    """Whether the rotated input sets span CACHE_MULTIPLE times the cache, so a step finds
    its inputs out of it; tiny shapes, whose sets MAX_INPUT_SETS caps, find them in it."""
    nbytes = problems.input_set_nbytes(case)
    return input_sets_for(case, llc_bytes) * nbytes >= CACHE_MULTIPLE * llc_bytes


def memory_needed(case: Case, sets: int, device: torch.device) -> int:
    """A generous estimate of the bytes a case needs at once."""
    oracle_grads = 4 * problems.input_set_nbytes(case) // case.torch_dtype.itemsize
    if case.op in LINEAR_OPS:  # fp64 weight and its gradient
        _, h, v = case.shape
        oracle_grads += 2 * 8 * v * h
    return (sets * problems.input_set_nbytes(case) + oracle_grads
            + BASELINE_PEAK_LOGITS.get(case.op, DEFAULT_BASELINE_PEAK_LOGITS)
            * bytes_model.logits_bytes(case) + 4 * oracle.chunk_bytes(device))


def _available_bytes(device: torch.device) -> int | None:
    from .device_info import available_memory_bytes

    if device.type == "cuda":
        torch.cuda.empty_cache()
    return available_memory_bytes(device)


def make_step(fn: Callable, sets: list[tuple], backward: bool) -> Callable[[], None]:
    """One user iteration per call, cycling through the input sets."""
    if not backward:
        order = itertools.cycle(sets)
        return lambda: fn(*next(order))
    order = itertools.cycle([(s, problems.grad_inputs(s)) for s in sets])

    def step():
        args, leaves = next(order)
        fn(*args).backward()
        for t in leaves:  # the user's optimizer step would consume and drop it
            t.grad = None

    return step


class RestoringStep:
    """make_step's step for an implementation that overwrites its inputs, with `between`
    for timing.measure: it copies back every input set a step (or `dirty`) touched from a
    copy made before any call so that the next step finds its inputs as the other
    implementations do: the original values (not a gradient: a CPU's subnormals would slow
    it), and out of cache where theirs are (`flush`: the rotation leaves the cache), by
    writing a scratch buffer CACHE_MULTIPLE times the last-level cache. Where their sets
    stay in the cache (tiny shapes) the flush also evicted the interpreter's and the
    library's own data: (64, 1000) float32 in-place steps were timed at 0.87 ms against
    0.14 for the same call out of place (AMD EPYC, stop 42), 0.29 against 0.09 without it
    (stop 45); a steady loop of such calls (each after a multiply) took 0.23 against 0.12 ms, the
    in-place backward's second read of the logits and its Python path."""

    def __init__(self, fn: Callable, sets: list[tuple], backward: bool, llc_bytes: int,
                 device: torch.device, flush: bool = True):
        self._sets = sets
        self._pristine = [[t.detach().clone() for t in problems.grad_inputs(s)] for s in sets]
        self._scratch = (torch.empty(CACHE_MULTIPLE * llc_bytes // 4, dtype=torch.float32,
                                     device=device) if flush else None)
        self._fn, self._backward, self._next = fn, backward, 0
        self.dirty: set[int] = set()

    def __call__(self) -> None:
        k = self._next
        self._next = (k + 1) % len(self._sets)
        self.dirty.add(k)
        args = self._sets[k]
        loss = self._fn(*args)
        if self._backward:
            loss.backward()
            for t in problems.grad_inputs(args):
                t.grad = None

    def between(self) -> None:
        with torch.no_grad():
            for k in sorted(self.dirty):
                for t, saved in zip(problems.grad_inputs(self._sets[k]), self._pristine[k]):
                    t.copy_(saved)
            if self._scratch is not None:
                self._scratch.zero_()
        self.dirty.clear()


def _blank_row(case: Case, impl: Impl, sets: int) -> Row:
    return Row(op=case.op, op_label=OP_LABELS[case.op], impl=impl.name, impl_kind=impl.kind,
               dtype=case.dtype, shape=list(case.shape), layout=case.layout,
               logits_bytes=bytes_model.logits_bytes(case),
               bytes_moved=bytes_model.bytes_moved(case), input_sets=sets)


def _check(case: Case, fn: Callable, inputs: tuple, ref: oracle.Oracle,
           tol: tuple[float, float]) -> correctness.CheckResult:
    loss = fn(*inputs)
    grads = []
    if case.backward:
        loss.backward()
        grads = [t.grad for t in problems.grad_inputs(inputs)]
    result = correctness.compare(loss.detach(), grads, ref, tol)
    for t in problems.grad_inputs(inputs):
        t.grad = None
    return result


def _tolerances(case: Case, inputs: tuple, ref: oracle.Oracle) -> tuple[float, float]:
    """In bf16/fp16, eager PyTorch's own error on these inputs sets the bar."""
    if case.dtype not in correctness.LOW_PRECISION:
        return correctness.tolerances(case.dtype)
    eager = _check(case, eager_fn(case.op), inputs, ref, (math.inf, math.inf))
    return correctness.tolerances(case.dtype, eager)


def _prepare(row: Row, case: Case, impl: Impl, sets: list[tuple], ref, ctx: Context,
             tol: tuple[float, float]) -> tuple[Callable[[], None], float] | None:
    """Check, peak memory and warm-up: the step to time and one run's estimated seconds, or
    None when the row failed its check."""
    fn = impl.build()
    if impl.mutates_inputs:  # (its copies of the inputs are made before the check's call)
        step = RestoringStep(fn, sets, case.backward, ctx.llc_bytes, ctx.device,
                             flush=rotation_leaves_cache(case, ctx.llc_bytes))
        step.dirty.add(0)
    else:
        step = make_step(fn, sets, case.backward)
    if impl.checked:
        result = _check(case, fn, sets[0], ref, tol)  # first call: also compiles
        row.check = result.to_json()
        if not result.ok:
            row.status, row.message = FAILED, result.message
            return None
    else:
        step()  # (its first call only warms up)
        row.message = UNCHECKED_WHY[impl.kind]
    # The check was the first call (compiles, lazy init); the memory run is the second and
    # counts as warm-up too. Then every other input set once, so that all their pages are
    # resident before timing, and up to `warmup` calls in all; at least one, whose time
    # sizes the timing budget (the memory run is slower: it starts from a trimmed heap).
    peak = memory.peak_extra_bytes(step, ctx.device, ctx.memory_method)
    row.peak_extra_bytes = peak
    row.peak_extra_mib = peak / 2**20
    row.peak_extra_ratio = peak / row.logits_bytes
    more = max(len(sets) - 1, ctx.settings.warmup - 2, 1)
    return step, timing.warm_up(step, ctx.device, more)


def _record_timing(row: Row, t: timing.Timing, ctx: Context) -> None:
    row.median_ms, row.iqr_ms, row.runs = t.median_s * 1e3, t.iqr_s * 1e3, t.runs
    row.gb_per_s = bytes_model.gb_per_s(row.bytes_moved, t.median_s)
    row.pct_copy_bw = 100 * row.gb_per_s / ctx.copy_gb_per_s


def set_copy_bandwidth(rows: list[Row], gb_per_s: float) -> None:
    """The rows' % of copy bandwidth against `gb_per_s` (run.py: the faster of the run's
    measurements)."""
    for row in rows:
        if row.gb_per_s is not None:
            row.pct_copy_bw = 100 * row.gb_per_s / gb_per_s


def _error(row: Row, exc: Exception) -> None:
    row.status = ERROR
    row.message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _release(sets: list[tuple], device: torch.device) -> None:
    for s in sets:
        for t in problems.grad_inputs(s):
            t.grad = None
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()  # an OOM in one row must not starve the next
        except RuntimeError:  # (a kernel fault broke the context: the next call says so)
            pass


def _prepare_impl(case: Case, impl: Impl, sets: list[tuple], ref, ctx: Context,
                  tol: tuple[float, float]) -> tuple[Row, tuple | None]:
    row = _blank_row(case, impl, len(sets))
    try:
        return row, _prepare(row, case, impl, sets, ref, ctx, tol)
    except Exception as exc:  # noqa: BLE001  (one broken implementation must not end the run)
        _error(row, exc)
        return row, None
    finally:
        _release(sets, ctx.device)


def _time_in_turns(ready: list[tuple[Row, Callable[[], None], float]], sets: list[tuple],
                   ctx: Context) -> None:
    """Times the prepared steps in ctx.settings.rounds rounds, each step in turn within a
    round after one untimed call (which finds the allocator as the previous step left it),
    and records each row's merged timing. A step that raises is dropped from later rounds."""
    parts: dict[int, list[timing.Timing]] = {id(row): [] for row, _, _ in ready}
    live = list(ready)
    rounds = max(1, ctx.settings.rounds)
    for _ in range(rounds):
        for entry in list(live):
            row, step, estimate = entry
            try:
                between = getattr(step, "between", None)
                if between is not None:
                    between()
                timing.warm_up(step, ctx.device, 1)
                parts[id(row)].append(timing.measure(step, ctx.device, ctx.settings, estimate,
                                                     rounds, between))
            except Exception as exc:  # noqa: BLE001
                _error(row, exc)
                live.remove(entry)
                _release(sets, ctx.device)
    for row, _, _ in live:
        _record_timing(row, timing.merge(parts[id(row)]), ctx)
    _release(sets, ctx.device)


def _fill_ratios(rows: list[Row]) -> None:
    def median_of(kind):
        return next((r.median_ms for r in rows if r.impl_kind == kind and r.status == OK), None)

    eager, compiled = median_of(EAGER), median_of(COMPILE)
    for r in rows:
        if r.status != OK:
            continue
        r.speedup_vs_eager = eager / r.median_ms if eager else None
        r.speedup_vs_compile = compiled / r.median_ms if compiled else None


def run_case(case: Case, impls: list[Impl], ctx: Context,
             on_row: Callable[[Row], None] = lambda row: None) -> list[Row]:
    n_sets = input_sets_for(case, ctx.llc_bytes)
    need, avail = memory_needed(case, n_sets, ctx.device), _available_bytes(ctx.device)
    if avail is not None and need > MEMORY_HEADROOM * avail:
        rows = []
        for impl in impls:
            row = _blank_row(case, impl, n_sets)
            row.status = SKIPPED
            row.message = f"needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
            rows.append(row)
            on_row(row)
        return rows

    if any(impl.kind in (COMPILE, OURS_COMPILED) for impl in impls):
        torch._dynamo.reset()  # one compile per shape; no recompile limits across cases

    def build_sets():
        return [problems.make_inputs(case, ctx.device, ctx.seed + k) for k in range(n_sets)]

    sets = build_sets()
    ref = oracle.compute(case, sets[0])
    tol = _tolerances(case, sets[0], ref)
    # Implementations that leave the inputs intact are timed taking turns (see timing.py);
    # one that overwrites them (inplace_backward) is timed alone, its inputs restored before
    # each timed step (RestoringStep), and the sets are made afresh after it.
    rows: list[Row | None] = [None] * len(impls)
    steady = [k for k, impl in enumerate(impls) if not impl.mutates_inputs]
    ready, p = [], None
    for k in steady:
        rows[k], p = _prepare_impl(case, impls[k], sets, ref, ctx, tol)
        if p is not None:
            ready.append((rows[k], *p))
    _time_in_turns(ready, sets, ctx)
    del ready, p  # (the steps hold the input sets)
    for k in steady:
        on_row(rows[k])
    for k, impl in enumerate(impls):
        if not impl.mutates_inputs:
            continue
        rows[k], p = _prepare_impl(case, impl, sets, ref, ctx, tol)
        if p is not None:
            _time_in_turns([(rows[k], *p)], sets, ctx)
        on_row(rows[k])
        del sets, p
        gc.collect()
        sets = build_sets()
    _fill_ratios(rows)
    del sets, ref
    gc.collect()
    return rows
