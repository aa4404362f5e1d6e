"""What the benchmark sweeps: ops x dtypes x shapes, per sweep size and device kind.

Shapes are (N, V) rows x classes, except the linear cross-entropy ops: (N, H, V) tokens x
hidden x vocabulary, and the segmentation cases of the small-classes sweep: (N, C, H, W)
with the classes on dim 1, in the memory format their `layout` names ("nchw": contiguous,
or "channels_last"), class-index targets (N, H, W). linear_ce_soft_fwd_bwd is the same
loss with probability targets (a teacher's distribution: knowledge distillation). The
quick sweep is sized to finish in a few minutes on a 2-core CPU and holds (4096, 32000)
for cross-entropy because the project's CPU targets are stated on it. The small-classes
sweep measures the softmax losses where the class count is small: classification heads
(N, C) and a segmentation map (N, C, H, W) in both memory formats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OPS = ("ce_fwd", "ce_fwd_bwd", "focal_fwd_bwd", "sigmoid_focal_fwd_bwd", "linear_ce_fwd_bwd",
       "linear_ce_soft_fwd_bwd")
# Ops whose inputs are (hidden, weight, target) rather than logits.
LINEAR_OPS = ("linear_ce_fwd_bwd", "linear_ce_soft_fwd_bwd")

OP_LABELS = {
    "ce_fwd": "cross_entropy fwd",
    "ce_fwd_bwd": "cross_entropy fwd+bwd",
    "focal_fwd_bwd": "focal_loss fwd+bwd",
    "sigmoid_focal_fwd_bwd": "sigmoid_focal_loss fwd+bwd",
    "linear_ce_fwd_bwd": "linear_cross_entropy fwd+bwd",
    "linear_ce_soft_fwd_bwd": "linear_cross_entropy soft targets fwd+bwd",
}

# The public function names select all the benchmarked ops of that function.
OP_ALIASES = {
    "cross_entropy": ("ce_fwd", "ce_fwd_bwd"),
    "focal_loss": ("focal_fwd_bwd",),
    "sigmoid_focal_loss": ("sigmoid_focal_fwd_bwd",),
    "linear_cross_entropy": LINEAR_OPS,
}

# Ops whose timed iteration includes backward (inputs require grad, grads are dropped).
BACKWARD_OPS = frozenset(op for op in OPS if op.endswith("_bwd"))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_DTYPES = ("fp32", "bf16")

LM_VOCABS = (32000, 50257, 128256, 151936, 262144)

# The memory formats of (N, C, H, W) logits (Case.layout); (N, V) cases have none (None).
LAYOUTS = ("nchw", "channels_last")
MEMORY_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}

# The small-classes sweep: ops, classification (N, C) shapes, segmentation (N, C, H, W)
# shapes (each in every layout). PASCAL VOC's 21 classes at 128 x 128, a batch of 8.
SMALL_CLASSES_OPS = ("ce_fwd", "ce_fwd_bwd", "focal_fwd_bwd")
SMALL_CLASSES = ((65536, 2), (65536, 10), (4096, 100), (64, 1000))
SEGMENTATION = ((8, 21, 128, 128),)


@dataclass(frozen=True)
class Case:
    op: str
    dtype: str
    shape: tuple[int, ...]
    # (N, C, H, W) logits only: their memory format, a key of MEMORY_FORMATS.
    layout: str | None = None

    def __post_init__(self):
        if self.layout is not None and (self.layout not in LAYOUTS or len(self.shape) != 4):
            raise ValueError(f"layout {self.layout!r} needs a key of {LAYOUTS} and an "
                             f"(N, C, H, W) shape, not {self.shape}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def backward(self) -> bool:
        return self.op in BACKWARD_OPS

    @property
    def spatial(self) -> bool:
        """(N, C, H, W) logits, the classes on dim 1."""
        return self.layout is not None

    @property
    def classes(self) -> int:
        """The class/vocabulary count: the x axis of the plots."""
        return self.shape[1] if self.spatial else self.shape[-1]

    @property
    def rows(self) -> int:
        """The rows of the softmax: the target's element count (N, or N x H x W)."""
        if self.spatial:
            n, _, h, w = self.shape
            return n * h * w
        return self.shape[0]

    @property
    def memory_format(self) -> torch.memory_format:
        return MEMORY_FORMATS[self.layout or "nchw"]

    def shape_str(self) -> str:
        return shape_label(self.shape, self.layout)


def shape_label(shape, layout: str | None = None) -> str:
    """'4096x32000', or '8x21x128x128 channels_last' where the case has a layout."""
    text = "x".join(str(s) for s in shape)
    return f"{text} {layout}" if layout else text


def _grid(op: str, shapes, dtypes) -> list[Case]:
    # (a shape is a tuple of sizes, or (sizes, layout) for (N, C, H, W) logits)
    specs = [s if s and isinstance(s[0], tuple) else (s, None) for s in shapes]
    return [Case(op, dt, tuple(s), layout) for s, layout in specs for dt in dtypes]


def _small_classes():
    shapes = [*SMALL_CLASSES, *((s, layout) for s in SEGMENTATION for layout in LAYOUTS)]
    return {op: shapes for op in SMALL_CLASSES_OPS}


def _shapes(device_kind: str, size: str) -> dict[str, list]:
    if size == "tiny":
        # Seconds in total: for the harness's own tests.
        return {
            "ce_fwd": [(64, 1000)],
            "ce_fwd_bwd": [(64, 1000)],
            "focal_fwd_bwd": [(64, 1000)],
            "sigmoid_focal_fwd_bwd": [(256, 80)],
            "linear_ce_fwd_bwd": [(64, 32, 1000)],
            "linear_ce_soft_fwd_bwd": [(64, 32, 1000)],
        }
    if size == "quick":
        linear = [(256, 256, 32000)] if device_kind == "cpu" else [(4096, 2048, 32000)]
        return {
            "ce_fwd": [(4096, 32000)],
            "ce_fwd_bwd": [(4096, 32000)],
            "focal_fwd_bwd": [(16384, 1000)],
            # Dense detection-style heads: anchors x classes (COCO has 80).
            "sigmoid_focal_fwd_bwd": [(131072, 80)],
            "linear_ce_fwd_bwd": linear,
            "linear_ce_soft_fwd_bwd": linear,
        }
    if size == "targets":
        # Exactly the cases the project's performance targets are stated on (issues 3-5),
        # so a GPU session short of time measures those first.
        if device_kind == "cuda":
            ce, linear = (16384, 128256), (16384, 4096, 128256)
        else:
            ce, linear = (4096, 32000), (4096, 1024, 32000)
        return {"ce_fwd": [ce], "ce_fwd_bwd": [ce], "focal_fwd_bwd": [ce],
                "sigmoid_focal_fwd_bwd": [(131072, 80)], "linear_ce_fwd_bwd": [linear]}
    if size == "small-classes":
        return _small_classes()
    if size != "full":
        raise ValueError(f"unknown sweep size {size!r}")
    if device_kind == "cuda":
        rows, focal_rows = (4096, 16384, 65536), (4096, 16384, 65536)
        # (16384, 4096, 128256): the LM-head case the linear cross-entropy targets are set on
        linear = [(8192, 4096, v) for v in (32000, 128256, 262144)] + [(16384, 4096, 128256)]
    else:
        rows, focal_rows = (1024, 4096, 8192), (4096, 16384)
        # (4096, 1024, 32000): the CPU case the linear cross-entropy targets are set on
        linear = [(1024, 512, 128256), (4096, 1024, 32000)]
    soft = linear[-1:]  # one LM head: the soft-target cost next to the index-target one
    lm = [(n, v) for v in LM_VOCABS for n in rows]
    return {
        "ce_fwd": lm,
        "ce_fwd_bwd": lm,
        "focal_fwd_bwd": [(n, c) for c in (1000, 32000, 128256) for n in focal_rows],
        # COCO (80 classes) at two anchor counts, and LVIS (1203 classes).
        "sigmoid_focal_fwd_bwd": [(131072, 80), (524288, 80), (65536, 1203)],
        "linear_ce_fwd_bwd": linear,
        "linear_ce_soft_fwd_bwd": soft,
    }


def sweep(device_kind: str, size: str, ops=OPS, dtypes=DEFAULT_DTYPES) -> list[Case]:
    """The cases of a sweep, in table order (op, shape, dtype); an op a sweep size lists
    no shape for (the soft-target linear CE has no performance target) is left out."""
    shapes = _shapes(device_kind, size)
    return [case for op in ops for case in _grid(op, shapes.get(op, ()), dtypes)]
