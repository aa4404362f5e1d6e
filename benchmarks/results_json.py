"""The results file: one JSON document per run, schema "torchloss_fused-benchmark" v1.

Top level (all keys required):
  schema          "torchloss_fused-benchmark"
  schema_version  4 (int; bumped on any incompatible change)
  date            ISO 8601 UTC, e.g. "2026-11-21T12:00:00Z"
  command         the command line as run (str); argv: list[str]
  sweep           "tiny" | "quick" | "full" | "targets" | "small-classes"
  device          {kind: "cpu"|"cuda", name, slug, cpu_model: str, gpu_name: str|null,
                   cores: int, threads: int, cpu_capability: str, llc_bytes: int,
                   memory_bytes: int|null}
  software        {torch, python, platform: str, cuda: str|null, env: {name: value} of the
                   performance-relevant variables set (device_info.PERF_ENV),
                   transparent_hugepage: str|null (the kernel's THP mode)}
  git             {commit: str ("unknown" outside a checkout), dirty: bool|null}
  ours            torchloss_fused.backend_info(device) ({device, implementation, detail,
                  reason}) or null when the package does not import
  copy_bandwidth  {tensor_bytes: int, bytes_moved: int, median_ms: float, gb_per_s: float,
                   start_gb_per_s: float, end_gb_per_s: float|null}: gb_per_s (what
                   pct_copy_bw is of) and median_ms are the faster of the measurements at
                   the run's start and end (null: the run was stopped before it)
  timing          {method: str, min_run_time_s: float, min_runs: int, warmup: int,
                   rounds: int (turns each implementation of a case took at being timed)}
  memory          {method: "peak-rss"|"profiler"|"cuda-allocator",
                   probe: {expected_bytes: int, seen_bytes: int},
                   prefault: {bytes: int, seconds: float}: fresh memory touched once before
                   timing (CPU; 0 bytes elsewhere)}
  load_average    {start, end: [1-min, 5-min, 15-min] | null}: host load around the run
  rows            list of rows:
    op, op_label, impl, dtype: str
    impl_kind: "ours"|"ours_compiled"|"eager"|"compile"|"peer"|"bound"|"yardstick"
    shape: list[int]; logits_bytes, bytes_moved, input_sets: int
    layout: "nchw"|"channels_last", only in the rows of (N, C, H, W) logits (the classes
            on dim 1; small-classes sweep): their memory format. Absent: (N, V) logits
    status: "ok"|"FAILED"|"ERROR"|"SKIPPED"; message: str (why, when not ok)
    median_ms, iqr_ms: float|null; runs: int|null
    peak_extra_bytes: int|null; peak_extra_mib, peak_extra_ratio: float|null
    gb_per_s, pct_copy_bw, speedup_vs_eager, speedup_vs_compile: float|null
    check: {ok: bool, loss_err: float|null, grad_err: float|null, loss_tol: float,
            grad_tol: float|null, message: str} | null (null when the row never ran)
  Figures are null unless status is "ok"; a FAILED row keeps its check.
"""

from __future__ import annotations

import json
from pathlib import Path

SCHEMA = "torchloss_fused-benchmark"
SCHEMA_VERSION = 4  # 2: memory.prefault; 3: timing.rounds; 4: copy_bandwidth at both ends

_STR, _INT, _FLOAT, _BOOL = (str,), (int,), (int, float), (bool,)
_NONE = (type(None),)

TOP_LEVEL = {
    "schema": _STR, "schema_version": _INT, "date": _STR, "command": _STR, "argv": (list,),
    "sweep": _STR, "device": (dict,), "software": (dict,), "git": (dict,),
    "ours": (dict,) + _NONE, "copy_bandwidth": (dict,), "timing": (dict,),
    "memory": (dict,), "load_average": (dict,), "rows": (list,),
}
NESTED = {
    "device": {"kind": _STR, "name": _STR, "slug": _STR, "cpu_model": _STR,
               "gpu_name": _STR + _NONE, "cores": _INT, "threads": _INT,
               "cpu_capability": _STR, "llc_bytes": _INT, "memory_bytes": _INT + _NONE},
    "software": {"torch": _STR, "python": _STR, "platform": _STR, "cuda": _STR + _NONE,
                 "env": (dict,), "transparent_hugepage": _STR + _NONE},
    "git": {"commit": _STR, "dirty": _BOOL + _NONE},
    "copy_bandwidth": {"tensor_bytes": _INT, "bytes_moved": _INT, "median_ms": _FLOAT,
                       "gb_per_s": _FLOAT, "start_gb_per_s": _FLOAT,
                       "end_gb_per_s": _FLOAT + _NONE},
    "timing": {"method": _STR, "min_run_time_s": _FLOAT, "min_runs": _INT, "warmup": _INT,
               "rounds": _INT},
    "memory": {"method": _STR, "probe": (dict,), "prefault": (dict,)},
    "load_average": {"start": (list,) + _NONE, "end": (list,) + _NONE},
}
ROW = {
    "op": _STR, "op_label": _STR, "impl": _STR, "impl_kind": _STR, "dtype": _STR,
    "shape": (list,), "logits_bytes": _INT, "bytes_moved": _INT, "input_sets": _INT,
    "status": _STR, "message": _STR,
    "median_ms": _FLOAT + _NONE, "iqr_ms": _FLOAT + _NONE, "runs": _INT + _NONE,
    "peak_extra_bytes": _INT + _NONE, "peak_extra_mib": _FLOAT + _NONE,
    "peak_extra_ratio": _FLOAT + _NONE, "gb_per_s": _FLOAT + _NONE,
    "pct_copy_bw": _FLOAT + _NONE, "speedup_vs_eager": _FLOAT + _NONE,
    "speedup_vs_compile": _FLOAT + _NONE, "check": (dict,) + _NONE,
}
ROW_STATUSES = ("ok", "FAILED", "ERROR", "SKIPPED")
ROW_LAYOUTS = ("nchw", "channels_last")  # (cases.LAYOUTS) the optional key "layout"


class SchemaError(ValueError):
    """A results document that does not follow the schema."""


def _check_keys(obj: dict, spec: dict, where: str) -> None:
    for key, types in spec.items():
        if key not in obj:
            raise SchemaError(f"{where}: missing key {key!r}")
        value = obj[key]
        # bool is an int in Python; only accept it where bool is meant.
        if isinstance(value, bool) and bool not in types:
            raise SchemaError(f"{where}.{key}: expected {types}, got bool")
        if not isinstance(value, types):
            raise SchemaError(f"{where}.{key}: expected {types}, got {type(value).__name__}")


def validate(doc: dict) -> None:
    """Raises SchemaError (a ValueError) when `doc` does not follow the schema."""
    _check_keys(doc, TOP_LEVEL, "results")
    if doc["schema"] != SCHEMA or doc["schema_version"] != SCHEMA_VERSION:
        raise SchemaError(f"not a {SCHEMA} v{SCHEMA_VERSION} document")
    for key, spec in NESTED.items():
        _check_keys(doc[key], spec, key)
    if doc["device"]["kind"] not in ("cpu", "cuda"):
        raise SchemaError(f"device.kind: {doc['device']['kind']!r}")
    for i, row in enumerate(doc["rows"]):
        _check_keys(row, ROW, f"rows[{i}]")
        if row["status"] not in ROW_STATUSES:
            raise SchemaError(f"rows[{i}].status: {row['status']!r}")
        if row["status"] == "ok" and row["median_ms"] is None:
            raise SchemaError(f"rows[{i}]: an ok row needs median_ms")
        if not all(isinstance(s, int) for s in row["shape"]):
            raise SchemaError(f"rows[{i}].shape: expected list[int]")
        if "layout" in row and (row["layout"] not in ROW_LAYOUTS or len(row["shape"]) != 4):
            raise SchemaError(f"rows[{i}].layout: {row['layout']!r} (one of {ROW_LAYOUTS}, "
                              "for an (N, C, H, W) shape)")


def dumps(doc: dict) -> str:
    """The file's text. allow_nan=False: a NaN/inf would make the file unreadable to strict
    JSON parsers (non-finite figures are written as null). Also tensor_parallel's."""
    return json.dumps(doc, indent=1, allow_nan=False) + "\n"


def write(doc: dict, path: Path) -> None:
    validate(doc)
    path.write_text(dumps(doc))
