"""The project's performance targets (issues 3-5), checked against a results JSON the
benchmark wrote: python -m benchmarks.targets [RESULTS.json ...]

Reads figures, never measures: run `python -m benchmarks.run --targets` first. Each target
is reported as met, MISSED, or "not measured" when the run lacks the rows it needs (another
device, sweep or dtype). A row the run has but could not measure (failed, error, skipped)
is a miss, with the row's message, as is a CUDA run whose loss was not the CUDA kernels'.
With no file named, the newest results JSON in benchmarks/results/ is read. Exit status 1
when a target was missed, else 0. With `--ops OP ...`, only those ops' targets are judged
and one not measured counts as missed (scripts/gpu_check.sh skips its launch sweep when the
first run passes that way).
"""

from __future__ import annotations

import argparse
import json
import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

from . import results_json
from .baselines import BOUND, COMPILE, EAGER, OURS, YARDSTICK

RESULTS_DIR = Path(__file__).resolve().parent / "results"

@dataclass(frozen=True)
class Target:
    device_kind: str  # "cuda" or "cpu"
    what: str
    op: str
    shape: tuple
    dtypes: tuple
    value: Callable[[Callable[[str], dict | None]], float | None]
    bound: float
    at_least: bool  # value >= bound (else value <= bound)
    unit: str = "x"
    needs: tuple = ()  # impl kinds whose rows the value was derived from (a speed-up's)


def _field(kind: str, key: str):
    """A figure of one row: `kind` is an impl kind, or (leading space) an impl name's
    suffix."""
    def value(row_of):
        row = row_of(kind)
        return None if row is None else row.get(key)
    return value


def _ratio(num_kind: str, den_kind: str, key: str):
    def value(row_of):
        a, b = row_of(num_kind), row_of(den_kind)
        if a is None or b is None or not b.get(key):
            return None
        return a[key] / b[key]
    return value


_GPU_CE = (16384, 128256)
_GPU_LM = (16384, 4096, 128256)
_CPU_CE = (4096, 32000)
_CPU_LM = (4096, 1024, 32000)
INPLACE = " inplace_backward"

TARGETS = [
    # Issue 3 (GPU, bf16).
    Target("cuda", "CE fwd+bwd, % of copy bandwidth", "ce_fwd_bwd", _GPU_CE, ("bf16",),
           _field(OURS, "pct_copy_bw"), 85.0, True, "%"),
    Target("cuda", "CE fwd+bwd, speed-up over eager", "ce_fwd_bwd", _GPU_CE, ("bf16",),
           _field(OURS, "speedup_vs_eager"), 3.0, True, needs=(EAGER,)),
    Target("cuda", "CE fwd+bwd, speed-up over torch.compile", "ce_fwd_bwd", _GPU_CE, ("bf16",),
           _field(OURS, "speedup_vs_compile"), 1.3, True, needs=(COMPILE,)),
    Target("cuda", "CE fwd+bwd, peak extra memory / logits", "ce_fwd_bwd", _GPU_CE, ("bf16",),
           _field(OURS, "peak_extra_ratio"), 1.05, False),
    Target("cuda", "CE fwd+bwd inplace_backward, peak extra / logits", "ce_fwd_bwd", _GPU_CE,
           ("bf16",), _field(INPLACE, "peak_extra_ratio"), 0.05, False),
    # (both timed in turns in the focal case: results before stop 40 lack the CE row there,
    # and their ratio of two cases timed apart is "not measured")
    Target("cuda", "focal fwd+bwd time / CE fwd+bwd time", "focal_fwd_bwd", _GPU_CE, ("bf16",),
           _ratio(OURS, YARDSTICK, "median_ms"), 1.1, False),
    # Issue 5 (GPU, bf16).
    Target("cuda", "linear CE peak extra / materialised path's", "linear_ce_fwd_bwd", _GPU_LM,
           ("bf16",), _ratio(OURS, EAGER, "peak_extra_bytes"), 0.10, False),
    Target("cuda", "linear CE time / the 3 matrix products'", "linear_ce_fwd_bwd", _GPU_LM,
           ("bf16",), _ratio(OURS, BOUND, "median_ms"), 1.2, False),
    # Issue 4 (CPU, fp32 and bf16).
    Target("cpu", "CE fwd+bwd, speed-up over eager", "ce_fwd_bwd", _CPU_CE, ("fp32", "bf16"),
           _field(OURS, "speedup_vs_eager"), 5.0, True, needs=(EAGER,)),
    Target("cpu", "CE fwd+bwd, speed-up over torch.compile", "ce_fwd_bwd", _CPU_CE,
           ("fp32", "bf16"), _field(OURS, "speedup_vs_compile"), 2.5, True, needs=(COMPILE,)),
    Target("cpu", "CE fwd+bwd, peak extra memory / logits", "ce_fwd_bwd", _CPU_CE,
           ("fp32", "bf16"), _field(OURS, "peak_extra_ratio"), 1.1, False),
    # Issue 5 (CPU, fp32 and bf16).
    Target("cpu", "linear CE peak extra / materialised path's", "linear_ce_fwd_bwd", _CPU_LM,
           ("fp32", "bf16"), _ratio(OURS, EAGER, "peak_extra_bytes"), 0.25, False),
    Target("cpu", "linear CE time / materialised path's", "linear_ce_fwd_bwd", _CPU_LM,
           ("fp32", "bf16"), _ratio(OURS, EAGER, "median_ms"), 1.0, False),
]
__all__ = ["TARGETS", "Target", "evaluate", "main"]


def _row_finder(results: dict, target: Target, dtype: str, ok_only: bool = True):
    rows = [r for r in results.get("rows", []) if (r.get("status") == "ok" or not ok_only)
            and r.get("dtype") == dtype and tuple(r.get("shape", ())) == target.shape
            and r.get("layout") is None]  # (targets are on (N, V) logits)

    def row_of(kind: str):
        for r in rows:
            if r["op"] != target.op:
                continue
            # Our plain row is kind "ours" whose name has no variant suffix.
            if kind.startswith(" ") and r["impl"].endswith(kind):
                return r
            if r["impl_kind"] == kind and not (kind == OURS and r["impl"].endswith(INPLACE)):
                return r
        return None

    return row_of


def _unusable(results: dict, target: Target, dtype: str) -> str:
    """The rows the target reads (and target.needs) that the run has but did not measure,
    as 'impl: status (message)'; empty when there are none."""
    find = _row_finder(results, target, dtype, ok_only=False)
    asked = []

    def recording(kind: str):
        row = find(kind)
        asked.append(row)
        return None  # (only which rows: their figures may be missing)

    target.value(recording)
    asked += [find(kind) for kind in target.needs]
    return "; ".join(f"{r['impl']}: {r['status']} ({(r.get('message') or '').strip()[:120]})"
                     for r in asked if r is not None and r.get("status") != "ok")


def evaluate(results: dict) -> list[dict]:
    """One verdict per (target, dtype) for the results' device kind: value, bound, met
    (True/False, or None when not measured) and a note saying why where a row is broken."""
    kind = results.get("device", {}).get("kind")
    implementation = (results.get("ours") or {}).get("implementation")
    verdicts = []
    for target in TARGETS:
        if target.device_kind != kind:
            continue
        for dtype in target.dtypes:
            value = target.value(_row_finder(results, target, dtype))
            met, note = None, _unusable(results, target, dtype)
            if value is not None:
                cmp = operator.ge if target.at_least else operator.le
                met = bool(cmp(value, target.bound))
            if note:
                met = False
            if kind == "cuda" and implementation not in (None, "cuda"):
                met, note = False, f"the loss ran on the {implementation} implementation"
            verdicts.append({"target": target.what, "op": target.op, "dtype": dtype,
                             "shape": "x".join(map(str, target.shape)), "value": value,
                             "bound": target.bound, "at_least": target.at_least,
                             "unit": target.unit, "met": met, "note": note})
    return verdicts


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}%" if unit == "%" else f"{v:#.3g}{unit}"


def report(results: dict, verdicts: list[dict]) -> str:
    head = (f"targets for {results.get('device', {}).get('name')} "
            f"({results.get('device', {}).get('kind')}), run of {results.get('date')}, "
            f"commit {results.get('git', {}).get('commit', '?')[:12]}")
    table = [[v["target"], v["dtype"], v["shape"], _fmt(v["value"], v["unit"]),
              ("≥ " if v["at_least"] else "≤ ") + _fmt(v["bound"], v["unit"]),
              {True: "met", False: "MISSED", None: "not measured"}[v["met"]]]
             for v in verdicts]
    if not table:
        return head + "\n(no targets are set for this device kind)"
    notes = [f"- {v['target']} ({v['dtype']}): {v['note']}" for v in verdicts if v.get("note")]
    return "\n".join([head, tabulate(table, ["target", "dtype", "shape", "measured", "target",
                                             "verdict"], tablefmt="github"), *notes])


def _newest_results() -> Path | None:
    """The benchmarks.run results file of the latest run, by the date it records (a
    checkout's file times are those of the checkout); other benchmarks' files, such as
    benchmarks.tensor_parallel's, have another schema and are passed over."""
    newest = None
    for path in RESULTS_DIR.glob("*.json"):
        try:
            doc = json.loads(path.read_text())
            if doc.get("schema") != results_json.SCHEMA:
                continue
            key = (str(doc.get("date", "")), path.name)
        except (OSError, ValueError, AttributeError):
            continue
        if newest is None or key > newest[0]:
            newest = (key, path)
    return None if newest is None else newest[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.targets",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*", type=Path,
                        help="results JSON files (default: the newest in benchmarks/results)")
    parser.add_argument("--ops", nargs="+", metavar="OP",
                        help="judge only the targets of these ops, and count one the run did "
                             "not measure as missed (exit 0 means: all measured and met)")
    args = parser.parse_args(argv)
    paths = args.results or [p for p in [_newest_results()] if p]
    if not paths:
        print("no results JSON found: run python -m benchmarks.run --targets first")
        return 0
    missed = False
    for path in paths:
        results = json.loads(Path(path).read_text())
        verdicts = evaluate(results)
        if args.ops:
            verdicts = [v for v in verdicts if v["op"] in args.ops]
            missed |= not verdicts or any(v["met"] is not True for v in verdicts)
        else:
            missed |= any(v["met"] is False for v in verdicts)
        print(f"{path}:\n{report(results, verdicts)}\n")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
