"""One table from the results of a launch-tuning sweep (scripts/gpu_check.sh's `sweep`
stage: the same benchmark run once per TLF_CUDA_TUNING value, torchloss_fused/_cuda_tuning.py).

    python -m benchmarks.tuning_sweep RESULTS.json [RESULTS.json ...]

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

from .baselines import OURS

HEADERS = ["op", "dtype", "shape", "impl", "TLF_CUDA_TUNING", "median ms", "% copy BW",
           "vs default"]


def rows_of(paths: list[Path]) -> list[dict]:
    """Our ok rows of each file, tagged with the setting its run used."""
    out = []
    for path in paths:
        results = json.loads(path.read_text())
        tuning = results.get("software", {}).get("env", {}).get("TLF_CUDA_TUNING") or "default"
        for row in results.get("rows", []):
            if row.get("impl_kind") == OURS and row.get("status") == "ok":
                out.append(dict(row, tuning=tuning))
    return out


def table(rows: list[dict]) -> list[list]:
    def key(r):
        return r["op"], r["dtype"], tuple(r["shape"]), r["impl"]

    default_ms = {key(r): r["median_ms"] for r in rows if r["tuning"] == "default"}
    lines = []
    for r in sorted(rows, key=lambda r: (key(r), r["median_ms"])):
        base = default_ms.get(key(r))
        rel = f"{r['median_ms'] / base:.3f}x" if base else "-"
        pct = r.get("pct_copy_bw")
        lines.append([r["op"], r["dtype"], "x".join(map(str, r["shape"])), r["impl"],
                      r["tuning"], f"{r['median_ms']:.3f}",
                      "-" if pct is None else f"{pct:.1f}", rel])
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path)
    args = ap.parse_args(argv)
    rows = rows_of(args.results)
    if not rows:
        print("no ok rows of ours in these files")
        return 1
    print(tabulate(table(rows), headers=HEADERS, disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
