"""One table from the results of a launch-tuning sweep (scripts/gpu_check.sh's `sweep`
stage: the same benchmark run once per TLF_CUDA_TUNING value, torchloss_fused/_cuda_tuning.py).

    python -m benchmarks.tuning_sweep RESULTS.json [RESULTS.json ...]
    python -m benchmarks.tuning_sweep --best ce_fwd_bwd RESULTS.json [...]

With --best OP it prints only the setting whose torchloss_fused row of OP (first dtype and
shape in the files) beats the default setting's by more than the noise (--margin, default
2%, or the spread of the default's runs if wider, plus the rows' interquartile ranges:
best_setting), or nothing when none does (or the default did not run): what
scripts/gpu_check.sh reruns the main benchmark under.

Reads figures, never measures. Each file's setting is the TLF_CUDA_TUNING its run recorded
(software.env; "default" when unset). Rows: our implementations' ok rows, per op, dtype and
shape, fastest first, with the time relative to the default setting's row of the same
implementation in these files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tabulate import tabulate

from .arg_types import nonnegative_float
from .baselines import OURS
from .cases import shape_label

HEADERS = ["op", "dtype", "shape", "impl", "TLF_CUDA_TUNING", "median ms", "% copy BW",
           "vs default"]


def _read(path: Path) -> dict:
    """A results document; ValueError, naming the file, for one that is not."""
    try:
        results = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(results, dict):
        raise ValueError(f"{path}: not a benchmark results file (a JSON object)")
    return results


def rows_of(paths: list[Path]) -> list[dict]:
    """Our ok rows of each file, tagged with the setting its run used."""
    out = []
    for path in paths:
        results = _read(path)
        tuning = results.get("software", {}).get("env", {}).get("TLF_CUDA_TUNING") or "default"
        for row in results.get("rows", []):
            if row.get("impl_kind") == OURS and row.get("status") == "ok":
                out.append(dict(row, tuning=tuning))
    return out


def table(rows: list[dict]) -> list[list]:
    def key(r):
        return r["op"], r["dtype"], tuple(r["shape"]), r.get("layout") or "", r["impl"]

    default_ms = {key(r): r["median_ms"] for r in rows if r["tuning"] == "default"}
    lines = []
    for r in sorted(rows, key=lambda r: (key(r), r["median_ms"])):
        base = default_ms.get(key(r))
        rel = f"{r['median_ms'] / base:.3f}x" if base else "-"
        pct = r.get("pct_copy_bw")
        lines.append([r["op"], r["dtype"], shape_label(r["shape"], r.get("layout")), r["impl"],
                      r["tuning"], f"{r['median_ms']:.3f}",
                      "-" if pct is None else f"{pct:.1f}", rel])
    return lines


def best_setting(rows: list[dict], op: str, margin: float) -> str | None:
    """The TLF_CUDA_TUNING value whose plain torchloss_fused row of `op` is fastest, if it
    beats the default's row of the same dtype and shape by more than the noise; else None.

    The noise: `margin` (a fraction), or the spread of the default's runs where there are
    several (gpu_check.sh passes benchmark 1's results beside the sweep's: the same setting
    measured twice, minutes apart) when that is wider; and the winner's median must lie
    below the fastest default's by more than half the two rows' interquartile ranges."""
    mine = [r for r in rows if r["op"] == op and r["impl"] == "torchloss_fused"]
    if not mine:
        return None
    first = mine[0]["dtype"], tuple(mine[0]["shape"]), mine[0].get("layout")
    mine = [r for r in mine if (r["dtype"], tuple(r["shape"]), r.get("layout")) == first]
    defaults = [r for r in mine if r["tuning"] == "default"]
    best = min(mine, key=lambda r: r["median_ms"])
    if not defaults or best["tuning"] == "default":
        return None
    base = min(defaults, key=lambda r: r["median_ms"])
    drift = max(r["median_ms"] for r in defaults) / base["median_ms"] - 1
    spread = (best.get("iqr_ms") or 0.0) / 2 + (base.get("iqr_ms") or 0.0) / 2
    bar = base["median_ms"] * (1 - max(margin, drift)) - spread
    return best["tuning"] if best["median_ms"] < bar else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tuning_sweep",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--best", metavar="OP", help="print only the winning setting for OP")
    ap.add_argument("--margin", type=nonnegative_float, default=0.02,
                    help="how much faster than the default a winner must be (fraction)")
    args = ap.parse_args(argv)
    try:
        rows = rows_of(args.results)
    except ValueError as e:
        ap.error(str(e))
    if args.best:
        best = best_setting(rows, args.best, args.margin)
        if best is not None:
            print(best)
        return 0
    if not rows:
        print("no ok rows of ours in these files")
        return 1
    print(tabulate(table(rows), headers=HEADERS, disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
