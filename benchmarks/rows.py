"""One table/JSON row: an implementation's figures on one case."""

from __future__ import annotations

from dataclasses import asdict, dataclass

OK, FAILED, ERROR, SKIPPED = "ok", "FAILED", "ERROR", "SKIPPED"


@dataclass
class Row:
    op: str
    op_label: str
    impl: str
    impl_kind: str  # ours | ours_compiled | eager | compile | peer | bound | yardstick
    dtype: str
    shape: list[int]
    logits_bytes: int
    bytes_moved: int
    input_sets: int
    status: str = OK
    message: str = ""
    median_ms: float | None = None
    iqr_ms: float | None = None
    runs: int | None = None
    peak_extra_bytes: int | None = None
    peak_extra_mib: float | None = None
    peak_extra_ratio: float | None = None
    gb_per_s: float | None = None
    pct_copy_bw: float | None = None
    speedup_vs_eager: float | None = None
    speedup_vs_compile: float | None = None
    check: dict | None = None
    # (N, C, H, W) logits only: their memory format ("nchw" | "channels_last"), cases.py's
    # Case.layout; None elsewhere, and then absent from the JSON row.
    layout: str | None = None

    def key(self) -> tuple:
        """The case this row belongs to."""
        key = (self.op, self.dtype, tuple(self.shape))
        return key if self.layout is None else (*key, self.layout)

    def to_json(self) -> dict:
        d = asdict(self)
        if d["layout"] is None:  # (the rows of (N, V) cases read as before it existed)
            del d["layout"]
        return d
