"""PNG of the sweep: per (op, dtype), median time and peak extra memory (in logits sizes)
for every implementation, against the number of classes where the sweep has several (lines)
or as bars where it has one, at the row count the sweep covers best. Returns None when
matplotlib is not installed.

by_case (the small-classes sweep, whose cases differ in more than their class count):
every case of the (op, dtype) instead, ordered by class count C, one group of bars per
case (time on a log scale). The class count is C, dim 1, for (N, C, H, W) logits."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .cases import DTYPES, LAYOUTS, OP_LABELS, OPS
from .rows import OK, Row

METRICS = (("median_ms", "median time (ms)"), ("peak_extra_ratio", "peak extra / logits bytes"))


def _classes(r: Row) -> int:
    """The class count: dim 1 of (N, C, H, W) logits (a row with a layout), else the last."""
    return r.shape[1] if r.layout is not None else r.shape[-1]


def _fixed(r: Row) -> tuple:
    """Everything but the class count: the leading dims, or N, H, W and the layout."""
    if r.layout is not None:
        return (r.shape[0], *r.shape[2:], r.layout)
    return tuple(r.shape[:-1])


def _panels(rows: list[Row], by_case: bool = False):
    for op in OPS:
        for dtype in DTYPES:
            ok = [r for r in rows if r.op == op and r.dtype == dtype and r.status == OK]
            if not ok:
                continue
            if by_case:
                yield op, dtype, None, ok
                continue
            # Everything but the class count fixed: the leading dims seen most often.
            lead = Counter(_fixed(r) for r in ok)
            fixed = max(lead, key=lambda k: (lead[k], tuple(d for d in k if isinstance(d, int)),
                                             tuple(d for d in k if isinstance(d, str))))
            yield op, dtype, fixed, [r for r in ok if _fixed(r) == fixed]


def _lines(ax, prows: list[Row], attr: str) -> None:
    for impl in dict.fromkeys(r.impl for r in prows):  # first-seen order
        pts = sorted((_classes(r), getattr(r, attr)) for r in prows if r.impl == impl)
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


def _case_label(case: tuple) -> str:
    shape, layout = case
    text = f"C={_classes_of(shape, layout)}\n" + "x".join(map(str, shape))
    return f"{text}\n{layout}" if layout else text


def _classes_of(shape: tuple, layout: str | None) -> int:
    return shape[1] if layout is not None else shape[-1]


def _case_bars(ax, prows: list[Row], attr: str) -> None:
    """One group of bars per case, ordered by class count; one colour per implementation."""
    cases = sorted(dict.fromkeys((tuple(r.shape), r.layout) for r in prows),
                   key=lambda c: (_classes_of(*c), c[0], LAYOUTS.index(c[1]) if c[1] else -1))
    impls = list(dict.fromkeys(r.impl for r in prows))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        xs, ys = [], []
        for k, case in enumerate(cases):
            row = next((r for r in prows if r.impl == impl
                        and (tuple(r.shape), r.layout) == case), None)
            if row is not None:
                xs.append(k - 0.4 + (i + 0.5) * width)
                ys.append(getattr(row, attr))
        ax.bar(xs, ys, width=width, color=f"C{i}", label=impl)
    ax.set_xticks(range(len(cases)), [_case_label(c) for c in cases], fontsize=7)
    ax.set_xlabel("case, by class count C (dim 1 of N x C x H x W)", fontsize=8)
    if attr == "median_ms":
        ax.set_yscale("log")
    ax.legend(fontsize=6)


def plot(rows: list[Row], path: Path, title: str, by_case: bool = False) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = list(_panels(rows, by_case))
    if not panels:
        return None
    width = 13 if not by_case else max(13, 2.2 * max(
        len({(tuple(r.shape), r.layout) for r in p[3]}) for p in panels))
    fig, axes = plt.subplots(len(panels), 2, figsize=(width, 2.8 * len(panels) + 0.6
                                                      + (0.8 * len(panels) if by_case else 0)),
                             squeeze=False)
    for (op, dtype, fixed, prows), pair in zip(panels, axes):
        if by_case:
            for ax, (attr, label) in zip(pair, METRICS):
                _case_bars(ax, prows, attr)
                ax.set_title(f"{OP_LABELS[op]}, {dtype}, by class count", fontsize=9)
                ax.set_ylabel(label)
                ax.grid(True, alpha=0.3)
            continue
        several = len({_classes(r) for r in prows}) > 1
        lead = [str(d) for d in fixed if not isinstance(d, str)]
        layout = [d for d in fixed if isinstance(d, str)]
        where = (f"N={'x'.join(lead)}" + (f" {layout[0]}" if layout else "")
                 + ("" if several else f", V={_classes(prows[0])}"))
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
