"""The benchmark CLI: python -m benchmarks.run [--full | --targets | --small-classes | --tiny]
[--device ...] [--help]

Runs each case on the best available device (or --device), prints the report and writes
<out>/<device-slug>-<UTC stamp>.json and .png plus <out>/<device-slug>-latest.md (the
printed report; runs other than the default sweep name their selection in it). Exits 1
when a torchloss_fused row FAILED its correctness check or raised; 2 on bad arguments,
including a selection that leaves nothing to run (checked before anything is measured).
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import signal
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import (
    baselines,
    bytes_model,
    device_info,
    memory,
    plot,
    report,
    results_json,
    runner,
    timing,
)
from .arg_types import nonnegative_float, output_dir, positive_float, positive_int, seed
from .cases import DEFAULT_DTYPES, DTYPES, LINEAR_OPS, OP_ALIASES, OPS, sweep
from .rows import ERROR, FAILED

DEFAULT_OUT = Path(__file__).resolve().parent / "results"

# Per sweep size: timing settings, and the size of the tensor copied for bandwidth.
SETTINGS = {
    "tiny": timing.Settings(min_run_time=0.01, min_runs=2, warmup=2),
    "quick": timing.Settings(min_run_time=0.5, min_runs=5, warmup=2),
    "full": timing.Settings(min_run_time=1.0, min_runs=10, warmup=5),
    "targets": timing.Settings(min_run_time=1.0, min_runs=10, warmup=5),
    "small-classes": timing.Settings(min_run_time=0.5, min_runs=5, warmup=2),
}


# Why a sweep size holds no shape of an op (cases.py), for the message that says so.
NO_SHAPE_WHY = {"targets": "no performance target is set on it",
                "small-classes": "it measures the softmax losses (cross_entropy, focal_loss)"}


def _names(parser, values, allowed, flag, aliases=None):
    """Space- or comma-separated names, checked against `allowed` (or an alias of some);
    none at all (`--ops ,`, an empty shell variable) is an error, not an empty run."""
    aliases = aliases or {}
    names = [n for v in values for n in v.split(",") if n]
    bad = [n for n in names if n not in allowed and n not in aliases]
    if bad:
        choices = ", ".join([*allowed, *aliases])
        parser.error(f"argument {flag}: unknown {bad}; choose from {choices}")
    if not names:
        parser.error(f"argument {flag}: no name given")
    expanded = [m for n in names for m in aliases.get(n, (n,))]
    return tuple(dict.fromkeys(expanded))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                description="Benchmark torchloss_fused against PyTorch "
                                            "and peer libraries.")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda when available, else cpu")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="size", action="store_const", const="quick",
                      help="default: a few minutes on a 2-core CPU")
    size.add_argument("--full", dest="size", action="store_const", const="full",
                      help="LM vocabularies 32000..262144 at several row counts")
    size.add_argument("--targets", dest="size", action="store_const", const="targets",
                      help="only the shapes the project's performance targets are set on")
    size.add_argument("--small-classes", dest="size", action="store_const",
                      const="small-classes",
                      help="cross_entropy and focal_loss with few classes: (N, C) heads "
                           "and (8, 21, 128, 128) segmentation logits, NCHW and "
                           "channels_last")
    size.add_argument("--tiny", dest="size", action="store_const", const="tiny",
                      help="small shapes, few runs, no torch.compile: for tests")
    p.set_defaults(size="quick")
    p.add_argument("--ops", nargs="+", default=list(OPS),
                   help=f"subset of {', '.join(OPS)}, or function names ({', '.join(OP_ALIASES)})")
    p.add_argument("--dtypes", nargs="+", default=list(DEFAULT_DTYPES),
                   help=f"subset of {', '.join(DTYPES)}")
    p.add_argument("--out", type=output_dir, default=DEFAULT_OUT,
                   help="results directory (made if missing)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    compile_group = p.add_mutually_exclusive_group()
    compile_group.add_argument("--no-compile", dest="compile", action="store_false",
                               default=None, help="skip the torch.compile baselines")
    compile_group.add_argument("--compile", dest="compile", action="store_true",
                               help="keep the torch.compile baselines with --tiny")
    p.add_argument("--no-peers", action="store_true", help="skip peer libraries")
    p.add_argument("--min-run-time", type=positive_float,
                   help="seconds of timed runs per row (> 0)")
    p.add_argument("--min-runs", type=positive_int, help="timed runs per row, at the least")
    p.add_argument("--prefault-gib", type=nonnegative_float,
                   help="CPU: touch this much fresh memory before timing, so first-touch "
                        "page costs of a virtual machine hit no row (default: 4x the "
                        "largest case's logits, at least 1 GiB, at most 1/3 of free memory; "
                        "none with --tiny, whose runs last seconds)")
    p.add_argument("--seed", type=seed, default=0, help="0 <= SEED < 2**63")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = _parser()
    args = p.parse_args(argv)
    args.ops = _names(p, args.ops, OPS, "--ops", OP_ALIASES)
    args.dtypes = _names(p, args.dtypes, tuple(DTYPES), "--dtypes")
    if args.compile is None:
        args.compile = args.size != "tiny"  # compiling costs seconds per shape
    return args


def _settings(args) -> timing.Settings:
    base = SETTINGS[args.size]
    return timing.Settings(
        min_run_time=base.min_run_time if args.min_run_time is None else args.min_run_time,
        min_runs=base.min_runs if args.min_runs is None else args.min_runs,
        warmup=base.warmup, rounds=base.rounds)


def _copy_tensor_bytes(device: torch.device, size: str, llc: int) -> int:
    if size == "tiny":
        return 32 * 2**20
    floor = 2**30 if device.type == "cuda" else 256 * 2**20
    want = max(floor, 8 * llc)
    avail = device_info.available_memory_bytes(device)
    return min(want, avail // 8) if avail else want


def _prefault_bytes(args, device: torch.device, cases) -> int:
    if device.type != "cpu":
        return 0
    if args.prefault_gib is not None:
        return int(args.prefault_gib * 2**30)
    if args.size == "tiny":  # (seconds of runs, for tests: not worth a GiB of page faults)
        return 0
    largest = max(bytes_model.logits_bytes(case) for case in cases)
    want = max(2**30, 4 * largest)
    avail = device_info.available_memory_bytes(device)
    return min(want, avail // 3) if avail else want


def _progress(total: int, disable: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety: run without it
        return None
    return tqdm(total=total, unit="row", disable=disable or None, dynamic_ncols=True)


def _ours_info(device):
    tlf = baselines.ours_module()
    return tlf.backend_info(device) if tlf is not None and hasattr(tlf, "backend_info") else None


class _Terminated(BaseException):
    """SIGTERM (a time limit's kill, as gpu_check.sh's timeout sends): the run stops and
    writes what it has."""


def _terminate(signum, frame):
    raise _Terminated(f"stopped by signal {signum}")


def _sweep(plan, ctx: runner.Context, no_progress: bool, rows: list, on_case) -> None:
    """Appends each case's rows to `rows` and calls on_case() after it. A case that fails
    outside its implementations' own guards (its inputs, the oracle, eager PyTorch's
    accuracy check, or a CUDA context a kernel fault broke) gets ERROR rows, and the run
    goes on: a run that stopped there had written nothing."""
    bar = _progress(sum(len(impls) for _, impls in plan), no_progress)
    for case, impls in plan:
        if bar is not None:
            bar.set_description(f"{case.op} {case.dtype} {case.shape_str()}")
        try:
            rows += runner.run_case(case, impls, ctx,
                                    on_row=(lambda row: bar.update(1)) if bar is not None
                                    else (lambda row: None))
        except Exception as exc:  # noqa: BLE001  (not _Terminated, a BaseException: main)
            for impl in impls:
                row = runner._blank_row(case, impl, 0)
                runner._error(row, exc)
                rows.append(row)
        on_case()
    if bar is not None:
        bar.close()


def _document(args, argv, started, device, settings, bws, mem_method, probe, rows,
              load_start, prefault, described: tuple, complete: bool = True) -> dict:
    argv_list = [sys.executable.rsplit("/", 1)[-1], "-m", "benchmarks.run",
                 *(sys.argv[1:] if argv is None else argv)]
    return {
        "schema": results_json.SCHEMA,
        "schema_version": results_json.SCHEMA_VERSION,
        "date": started.isoformat().replace("+00:00", "Z"),
        "command": shlex.join(argv_list),
        "argv": argv_list,
        "sweep": args.size,
        "device": described[0],
        "software": device_info.software(),
        "git": device_info.git_state(),
        "ours": described[1],
        "copy_bandwidth": _copy_bandwidth_doc(bws),
        "timing": {"method": ("cuda-events" if device.type == "cuda"
                              else "torch.utils.benchmark.Timer.blocked_autorange")
                   + RESTORED_TIMING,
                   "min_run_time_s": settings.min_run_time, "min_runs": settings.min_runs,
                   "warmup": settings.warmup, "rounds": settings.rounds},
        "memory": {"method": mem_method, "probe": probe, "prefault": prefault},
        "load_average": {"start": load_start, "end": device_info.load_average()},
        "rows": [r.to_json() for r in rows],
        # (False: written after each case while the run went on, or the run was stopped)
        "complete": complete,
    }


# (runner.RestoringStep, timing.measure's `between`)
RESTORED_TIMING = ("; rows that overwrite their inputs: one step at a time, the inputs "
                   "restored untimed before each (and the cache flushed where the other "
                   "rows' rotation of input sets leaves it)")


def _copy_bandwidth_doc(bws: list) -> dict:
    """The copy bandwidth the % columns are of: the faster of the run's measurements (at
    its start and, once every case ran, at its end), so a device that slowed down or sped
    up during the run (clocks, a neighbour) flatters no row; both are recorded."""
    best = max(bws, key=lambda bw: bw.gb_per_s)
    return {"tensor_bytes": best.tensor_bytes, "bytes_moved": best.bytes_moved,
            "median_ms": best.median_s * 1e3, "gb_per_s": best.gb_per_s,
            "start_gb_per_s": bws[0].gb_per_s,
            "end_gb_per_s": bws[1].gb_per_s if len(bws) > 1 else None}


def latest_name(slug: str, size: str, ops, dtypes, compile: bool | None = None,
                peers: bool = True) -> str:
    """<slug>-latest.md for the default run (quick sweep, every op and default dtype,
    compile and peer rows); other selections get their own file, naming what differs, so a
    partial run never replaces the default table. Ops and dtypes count as sets (named in
    cases.py's order): the same selection in another order is the same table. compile:
    None for the sweep's default (none with --tiny)."""
    parts = [slug]
    if size != "quick":
        parts.append(size)
    if set(ops) != set(OPS):
        parts.append("+".join(op for op in OPS if op in ops))
    if set(dtypes) != set(DEFAULT_DTYPES):
        parts.append("+".join(dt for dt in DTYPES if dt in dtypes))
    if compile is not None and compile != (size != "tiny"):
        parts.append("compile" if compile else "no-compile")
    if not peers:
        parts.append("no-peers")
    return "-".join(parts) + "-latest.md"


def _plan(args, device: torch.device) -> tuple[list, dict]:
    """(case, implementations) pairs to run, and {op: why it is left out} for the selected
    ops that have none."""
    cases = sweep(device.type, args.size, args.ops, args.dtypes)
    plan = [(case, baselines.impls_for(case.op, device, args.compile, not args.no_peers,
                                       spatial=case.spatial))
            for case in cases]
    left_out = {}
    for op in args.ops:
        if not any(case.op == op for case in cases):
            why = NO_SHAPE_WHY.get(args.size)
            left_out[op] = f"the {args.size} sweep has no shape of it" + (
                f": {why}" if why else "")
        elif op in LINEAR_OPS and not any(impls for case, impls in plan if case.op == op):
            # (baselines.impls_for: linear CE is measured only beside ours)
            left_out[op] = "torchloss_fused.linear_cross_entropy is not available here"
    return [(case, impls) for case, impls in plan if impls], left_out


def _stem(out: Path, slug: str, started) -> Path:
    return out / f"{slug}-{started.strftime('%Y%m%dT%H%M%SZ')}"


def _write(doc: dict, text: str, rows, out: Path, started, with_plot: bool,
           latest_file: str, plot_by_case: bool = False) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = _stem(out, doc["device"]["slug"], started)
    results_json.write(doc, stem.with_suffix(".json"))
    latest = out / latest_file
    latest.write_text(text + "\n")  # exactly as printed
    written = [stem.with_suffix(".json"), latest]
    if with_plot:
        png = plot.plot(rows, stem.with_suffix(".png"), f"{doc['device']['name']} - {doc['date']}",
                        by_case=plot_by_case)
        if png is not None:
            written.append(png)
    return written


def main(argv=None) -> int:
    args = parse_args(argv)
    device = device_info.resolve_device(args.device)
    settings = _settings(args)
    started = datetime.now(timezone.utc).replace(microsecond=0)
    load_start = device_info.load_average()
    llc = device_info.llc_bytes(device)

    plan, left_out = _plan(args, device)
    left = "left out " + "; ".join(f"{op} ({why})" for op, why in left_out.items())
    if not plan:
        _parser().error(f"nothing to run: {left}")
    if left_out:
        print(left, file=sys.stderr)
    try:  # before measuring: a run that cannot be saved should not start
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _parser().error(f"argument --out: {e}")
    if importlib.util.find_spec("tabulate") is None:  # (the report's tables need it)
        _parser().error("the report needs tabulate: pip install -e '.[bench]' "
                        "(scripts/bench.sh installs it)")

    prefault_bytes = _prefault_bytes(args, device, [case for case, _ in plan])
    prefault = {"bytes": prefault_bytes, "seconds": memory.prefault(prefault_bytes)}
    mem_method = memory.method_for(device)
    probe = memory.probe(device, mem_method)
    copy_bytes = _copy_tensor_bytes(device, args.size, llc)
    bws = [timing.copy_bandwidth(device, copy_bytes, settings)]
    ctx = runner.Context(device, settings, llc, bws[0].gb_per_s, mem_method, args.seed)
    # (before any of our kernels runs: a fault would leave the CUDA context unusable)
    described = (device_info.describe(device), _ours_info(device))
    rows: list = []

    def document(complete: bool) -> dict:
        return _document(args, argv, started, device, settings, bws, mem_method, probe, rows,
                         load_start, prefault, described, complete)

    def save_so_far():  # (the final write replaces it)
        results_json.write(document(False),
                           _stem(args.out, described[0]["slug"], started).with_suffix(".json"))

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    stopped = None
    try:
        _sweep(plan, ctx, args.no_progress, rows, save_so_far)
        bws.append(timing.copy_bandwidth(device, copy_bytes, settings))
        runner.set_copy_bandwidth(rows, max(bw.gb_per_s for bw in bws))
    except _Terminated as exc:
        stopped = str(exc)
        print(f"benchmark {stopped}: writing the rows measured so far", file=sys.stderr)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)

    doc = document(stopped is None)
    text = report.render(doc, rows)
    print(text)
    latest_file = latest_name(doc["device"]["slug"], args.size, args.ops, args.dtypes,
                              compile=args.compile, peers=not args.no_peers)
    # (the small-classes sweep's cases differ in more than their class count: a bar group
    # per case, by class count, rather than lines over the classes of one row count)
    written = _write(doc, text, rows, args.out, started, not args.no_plot, latest_file,
                     plot_by_case=args.size == "small-classes")
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    ours_broken = any(r.impl_kind == baselines.OURS and r.status in (FAILED, ERROR)
                      for r in rows)
    return 1 if ours_broken or stopped else 0


if __name__ == "__main__":
    sys.exit(main())
