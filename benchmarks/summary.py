"""One line per machine, dtype and shape of one op, from benchmark results files: ours
against the baselines and peers timed beside it in the same run.

    python -m benchmarks.summary RESULTS.json [RESULTS.json ...]
    python -m benchmarks.summary --op focal_fwd_bwd RESULTS.json [...]

README's "Results so far" table is this command's output over the committed runs it
names. Reads figures, never measures: a cell is empty where the run had no such row (a
peer that did not import, a baseline left out) or the row did not pass its check.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tabulate import tabulate

from .baselines import OURS, PEER
from .cases import OPS, shape_label
from .report import _ms, _x
from .targets import INPLACE

HEADERS = ["machine", "run", "dtype", "shape", "torchloss_fused ms", "% copy BW",
           "vs eager", "vs compile", "fastest peer, ms", "extra/logits",
           "extra/logits, inplace_backward"]


def _ok(rows: list[dict], pred) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok" and pred(r)]


def _pct(v: float | None) -> str:
    return "" if v is None else f"{v:.0f}%"


def lines_of(results: dict, op: str) -> list[list[str]]:
    """The table lines of one results file: one per (dtype, shape) that has our row."""
    rows = [r for r in results.get("rows", []) if r.get("op") == op]
    machine = results.get("device", {}).get("name", "?")
    run = f"{results.get('date', '?')[:10]} {results.get('git', {}).get('commit', '?')[:7]}"
    out = []
    # ((N, C, H, W) logits: one line per memory format, the layout beside the shape)
    cases = dict.fromkeys((r["dtype"], tuple(r["shape"]), r.get("layout")) for r in rows)
    for dtype, shape, layout in cases:
        case = [r for r in rows if r["dtype"] == dtype and tuple(r["shape"]) == shape
                and r.get("layout") == layout]
        ours = _ok(case, lambda r: r["impl_kind"] == OURS and not r["impl"].endswith(INPLACE))
        if not ours:
            continue
        ours = ours[0]
        in_place = _ok(case, lambda r: r["impl"].endswith(INPLACE))
        peers = sorted(_ok(case, lambda r: r["impl_kind"] == PEER), key=lambda r: r["median_ms"])
        out.append([
            machine, run, dtype, shape_label(shape, layout), _ms(ours["median_ms"]),
            _pct(ours.get("pct_copy_bw")),
            _x(ours.get("speedup_vs_eager")), _x(ours.get("speedup_vs_compile")),
            f"{peers[0]['impl']} {_ms(peers[0]['median_ms'])}" if peers else "",
            _x(ours.get("peak_extra_ratio")),
            _x(in_place[0]["peak_extra_ratio"]) if in_place else "",
        ])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.summary",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results JSON files")
    parser.add_argument("--op", default="ce_fwd_bwd", choices=OPS,
                        help="the op to summarise (default: ce_fwd_bwd)")
    args = parser.parse_args(argv)
    lines = []
    for path in args.results:
        lines += lines_of(json.loads(path.read_text()), args.op)
    if not lines:
        print(f"no {args.op} row of torchloss_fused passed in these files")
        return 1
    print(tabulate(lines, HEADERS, tablefmt="github", disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
