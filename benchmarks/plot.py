"""PNG of the sweep: per (op, dtype), median time and peak extra memory (in logits sizes)
for every implementation, against the number of classes where the sweep has several (lines)
or as bars where it has one, at the row count the sweep covers best. Returns None when
matplotlib is not installed."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .cases import DTYPES, OP_LABELS, OPS
from .rows import OK, Row

METRICS = (("median_ms", "median time (ms)"), ("peak_extra_ratio", "peak extra / logits bytes"))


def _panels(rows: list[Row]):
    for op in OPS:
        for dtype in DTYPES:
            ok = [r for r in rows if r.op == op and r.dtype == dtype and r.status == OK]
            if not ok:
                continue
            # Everything but the class count fixed: the leading dims seen most often.
            lead = Counter(tuple(r.shape[:-1]) for r in ok)
            fixed = max(lead, key=lambda k: (lead[k], k))
            yield op, dtype, fixed, [r for r in ok if tuple(r.shape[:-1]) == fixed]


def _lines(ax, prows: list[Row], attr: str) -> None:
    for impl in dict.fromkeys(r.impl for r in prows):  # first-seen order
        pts = sorted((r.shape[-1], getattr(r, attr)) for r in prows if r.impl == impl)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
    ax.set_xscale("log")
    ax.set_xlabel("classes (V)")
    ax.legend(fontsize=7)


def _bars(ax, prows: list[Row], attr: str) -> None:
    names = [r.impl for r in prows]
    ax.barh(range(len(prows)), [getattr(r, attr) for r in prows],
            color=[f"C{i}" for i in range(len(prows))])
    ax.set_yticks(range(len(prows)), names, fontsize=7)
    ax.invert_yaxis()


def plot(rows: list[Row], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = list(_panels(rows))
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 2, figsize=(13, 2.8 * len(panels) + 0.6),
                             squeeze=False)
    for (op, dtype, fixed, prows), pair in zip(panels, axes):
        several = len({r.shape[-1] for r in prows}) > 1
        where = f"N={'x'.join(map(str, fixed))}" + ("" if several else f", V={prows[0].shape[-1]}")
        for ax, (attr, label) in zip(pair, METRICS):
            (_lines if several else _bars)(ax, prows, attr)
            ax.set_title(f"{OP_LABELS[op]}, {dtype}, {where}", fontsize=9)
            (ax.set_ylabel if several else ax.set_xlabel)(label)
            ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.99))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
