"""The bytes each benchmarked op must move at the least: the numerator of achieved GB/s.

A memory-bound loss cannot do better than reading its inputs once and writing its outputs
once, so GB/s = these bytes / median time, and % of copy bandwidth compares that against a
plain tensor copy timed the same way in the same run. Per op:

- cross_entropy / focal_loss forward:        logits read once + targets read once.
  (N, C, H, W) logits (the small-classes sweep's segmentation cases): N x C x H x W
  elements, N x H x W targets, in either memory format.
- cross_entropy / focal_loss forward+backward: logits read once + gradient (same dtype and
  shape as the logits) written once + targets read once.
- sigmoid_focal_loss forward+backward: inputs + targets (both N x C in the input dtype)
  read once + gradient written once.
- linear_cross_entropy forward+backward: hidden and weight read once + their gradients
  written once + targets (soft targets: the N x V probabilities, read once). This op is
  compute-bound (two N x H x V matmuls per pass), so its GB/s is low by nature; the logits
  it avoids materialising are not counted.
- copy bandwidth: a copy reads and writes the tensor: 2 x its bytes.

Per-row outputs (loss, lse: N floats) and the scalar loss are left out: they are a
vanishing fraction of N x V and no implementation can avoid them.
"""

from __future__ import annotations

import math

from .cases import Case

TARGET_BYTES = 8  # class-index targets are int64


def _itemsize(case: Case) -> int:
    return case.torch_dtype.itemsize


def logits_bytes(case: Case) -> int:
    """Bytes of the N x V logits (for linear CE: the logits a naive version materialises;
    for (N, C, H, W) logits, all N x C x H x W of them)."""
    if case.spatial:
        return math.prod(case.shape) * _itemsize(case)
    n, v = case.shape[0], case.shape[-1]
    return n * v * _itemsize(case)


def bytes_moved(case: Case) -> int:
    size = _itemsize(case)
    if case.op == "sigmoid_focal_fwd_bwd":
        n, c = case.shape
        return 3 * n * c * size  # inputs + targets read, gradient written
    if case.op == "linear_ce_fwd_bwd":
        n, h, v = case.shape
        return 2 * (n * h + v * h) * size + n * TARGET_BYTES
    if case.op == "linear_ce_soft_fwd_bwd":
        n, h, v = case.shape
        return 2 * (n * h + v * h) * size + n * v * size
    # (N, V), or (N, C, H, W): the logits' elements, and one target per row (N x H x W)
    logits, rows = logits_bytes(case), case.rows
    if case.op == "ce_fwd":
        return logits + rows * TARGET_BYTES
    if case.op in ("ce_fwd_bwd", "focal_fwd_bwd"):
        return 2 * logits + rows * TARGET_BYTES
    raise ValueError(f"no bytes model for op {case.op!r}")


def copy_bytes_moved(tensor_bytes: int) -> int:
    return 2 * tensor_bytes


def gb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9
