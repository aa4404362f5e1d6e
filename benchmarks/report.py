"""The printed report: a header and one table per op, in markdown (tabulate's "github"
format), so the same text is printed and written to <device-slug>-latest.md."""

from __future__ import annotations

from .cases import OP_LABELS, OPS, shape_label
from .correctness import EAGER_FACTOR
from .rows import OK, Row

COLUMNS = ["dtype", "shape", "impl", "median ms", "extra MiB", "extra/logits", "GB/s",
           "% copy BW", "vs eager", "vs compile", "status"]
MAX_STATUS = 70


def _ms(v: float) -> str:
    return f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 1000 else f"{v:.0f}"


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def _cells(r: Row) -> list[str]:
    head = [r.dtype, shape_label(r.shape, r.layout), r.impl]
    if r.status != OK:
        status = f"{r.status}: {r.message}" if r.message else r.status
        if len(status) > MAX_STATUS:
            status = status[: MAX_STATUS - 3] + "..."
        return head + [""] * 7 + [status]
    return head + [
        _ms(r.median_ms), f"{r.peak_extra_mib:.1f}", _x(r.peak_extra_ratio),
        f"{r.gb_per_s:.1f}", f"{r.pct_copy_bw:.0f}%", _x(r.speedup_vs_eager),
        _x(r.speedup_vs_compile), OK,
    ]


def tables(rows: list[Row]) -> str:
    from tabulate import tabulate  # the `bench` extra

    parts = []
    for op in OPS:
        op_rows = [r for r in rows if r.op == op]
        if op_rows:
            table = tabulate([_cells(r) for r in op_rows], headers=COLUMNS, tablefmt="github",
                             disable_numparse=True)
            parts.append(f"### {OP_LABELS[op]}\n\n{table}")
    return "\n\n".join(parts)


def header(doc: dict) -> str:
    dev, git, sw = doc["device"], doc["git"], doc["software"]
    bw, mem = doc["copy_bandwidth"], doc["memory"]
    commit = git["commit"][:12] + (" (dirty)" if git["dirty"] else "")
    where = f"{dev['kind']}, {dev['threads']} threads" if dev["kind"] == "cpu" else dev["kind"]
    ours = doc["ours"]
    ours_line = (f"{ours['implementation']}: {ours['detail']}" if ours
                 else "not importable")
    probe = mem["probe"]
    seen = 100 * probe["seen_bytes"] / probe["expected_bytes"]
    load = doc["load_average"]
    load_line = (f"; load average {load['start'][0]:.2f} at start, {load['end'][0]:.2f} at end"
                 if load["start"] and load["end"] else "")
    env = " ".join(f"{k}={v}" for k, v in sw["env"].items())
    lines = [
        f"## torchloss_fused benchmark: {dev['name']} ({where})",
        "",
        f"- date: {doc['date']}; commit {commit}; torch {sw['torch']}; python {sw['python']}",
        f"- command: `{doc['command']}` (sweep: {doc['sweep']}){load_line}",
        f"- torchloss_fused: {ours_line}",
        (f"- environment: {env or 'no performance variables set'}; transparent hugepages: "
         f"{sw['transparent_hugepage']}"),
        (f"- copy bandwidth: {bw['gb_per_s']:.1f} GB/s (copy_ of a "
         f"{bw['tensor_bytes'] / 2**20:.0f} MiB tensor, median {bw['median_ms']:.2f} ms"
         f"{_bandwidth_ends(bw)})"),
        *_prefault_line(mem),
        (f"- timing: {doc['timing']['method']}, median{_rounds(doc['timing'])}; memory: "
         f"{mem['method']} "
         f"(saw {seen:.0f}% of a {probe['expected_bytes'] / 2**20:.0f} MiB allocation made "
         "inside a C++ op)"),
        ("- GB/s from benchmarks/bytes_model.py; extra/logits = peak extra memory / logits "
         "bytes; vs eager / vs compile = speed-up over those rows"),
        ("- every row is checked against an fp64 oracle before timing (bf16/fp16: error at "
         f"most {EAGER_FACTOR:g}x eager PyTorch's own); a miss is FAILED, with no figures"),
    ]
    return "\n".join(lines)


def _bandwidth_ends(bw: dict) -> str:
    if "start_gb_per_s" not in bw:  # (files before schema 4 measured it once)
        return ""
    end = bw.get("end_gb_per_s")
    if end is None:
        return "; measured at the start only: the run was stopped"
    return (f"; the faster of {bw['start_gb_per_s']:.1f} GB/s at the start and {end:.1f} "
            "at the end")


def _rounds(t: dict) -> str:
    n = t.get("rounds", 1)  # (files before schema 3 timed each implementation at once)
    return f" over {n} rounds, the implementations of a shape taking turns" if n > 1 else ""


def _prefault_line(mem: dict) -> list[str]:
    pre = mem.get("prefault") or {}
    if not pre.get("bytes"):
        return []
    return [f"- before timing, {pre['bytes'] / 2**30:.1f} GiB of fresh memory was touched once "
            f"({pre['seconds']:.1f} s), so first-touch page costs hit no row"]


def render(doc: dict, rows: list[Row]) -> str:
    return f"{header(doc)}\n\n{tables(rows)}"
