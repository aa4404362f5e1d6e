"""A loss's reduction of its per-row values, and the per-row gradient autograd gives it.

The eager fused path (_eager.py's reduced calls) reduces inside its own autograd node. Its
backward must hand the kernels' formulas exactly the per-row gradient that autograd's
ToCopy, Div and Sum nodes would have made from the loss's gradient: the arithmetic below
is theirs, step for step, so the result is bitwise the same, and the common case (an
upstream gradient of 1) still matches the scale the forward computed the gradient for.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._tracing import recording

# csrc/ordered_sum.h's constants: ATen sums a CPU tensor of fewer elements than this on one
# thread; a larger one here goes in blocks of _SUM_BLOCK.
_SERIAL_SUM_ELEMENTS = 32768
_SUM_BLOCK = 16384


def ordered_sum(v: Tensor) -> Tensor:
    """v.sum(), the same bits whatever torch.set_num_threads says, as F.cross_entropy's
    CPU mean is: ATen splits a large CPU sum among the threads, so its rounding changes
    with their number. The steps of csrc/ordered_sum.cpp (see there), so the C++ and the
    Python paths agree bitwise. Traced code, tensor subclasses (DTensor, fake and
    functorch tensors) and other devices get v.sum() itself."""
    # (traced first: the size test would put a guard on a symbolic size)
    if (recording() or type(v) is not torch.Tensor
            or torch._C._functorch.is_functorch_wrapped_tensor(v) or v.device.type != "cpu"
            or v.numel() < _SERIAL_SUM_ELEMENTS):
        return v.sum()
    flat = v.reshape(-1)
    blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % _SUM_BLOCK))
    return ordered_sum(blocks.view(-1, _SUM_BLOCK).sum(1))


def counted(t: Tensor, ignore_index: int) -> Tensor:
    """The class-index targets other than ignore_index, compared as int64 as the kernels
    compare them: a uint8 or int32 tensor compared with the number itself would wrap it to
    its own dtype first (-100 to 156 for uint8), and miss or add rows."""
    return t.long() != ignore_index


def reduce(loss_rows: Tensor, reduction: str, denom: Tensor | None, out_shape: tuple,
           dtype: torch.dtype) -> Tensor:
    """The loss from its per-row values (in the accumulation dtype): "none", "sum", or
    "mean" over `denom` (mean_denominator's); returned in `dtype`."""
    if reduction == "none":
        return loss_rows.reshape(out_shape).to(dtype)
    total = ordered_sum(loss_rows)
    if reduction == "sum":
        return total.to(dtype)
    # (F's value, NaN or inf when no target counts; _rescale_grad_rows keeps the fused
    # gradient's ignored rows exactly zero there)
    return (total / denom).to(dtype)


def splits_terms(weight: Tensor | None, prob_target: bool, label_smoothing: float,
                 z_loss: float = 0.0) -> bool:
    """Whether the mean of this cross-entropy is that of two terms taken apart
    (mean_denominator): class weights and class-index targets, with label smoothing (F divides
    its NLL and smoothing terms apart) or a z-loss (F's mean plus the z term's)."""
    return weight is not None and not prob_target and (label_smoothing > 0 or z_loss != 0)


def mean_denominator(denom: Tensor, split_terms: bool) -> Tensor:
    """A mean's denominator. split_terms: a cross-entropy with class weights whose mean is
    that of two terms taken apart (F's NLL and smoothing terms; F's mean and the
    z-loss's): where the counted targets weigh 0 in all, F's NLL term is 0/0, so its mean
    and its gradient are nan, where one combined sum over 0 would be inf (or 0/0 only at
    some elements of its gradient: a z-loss's rows had inf). A nan denominator makes the
    mean nan, and the gradient every path makes from 1/denom (the fused forward's
    grad_scale, the rows' gradient, linear CE's row scale) nan on the counted rows; rows
    whose target is ignored keep their zeros (the kernels write them whatever the
    upstream, and the rescales leave rows made for a non-finite scale as made). Not
    taken where a target counts with a nonzero weight: there the division is the same."""
    return torch.where(denom == 0, math.nan, denom) if split_terms else denom


def rows_grad(grad: Tensor, reduction: str, denom: Tensor | None, rows_shape: torch.Size,
              rows_dtype: torch.dtype) -> Tensor:
    """The gradient of the per-row values given the gradient of
    reduce(rows, reduction, denom, ...), as autograd computes it (for "none", a gradient
    shaped like the loss is reshaped to the rows'; a 0-dim one is expanded)."""
    grad = grad.to(rows_dtype)  # ToCopyBackward (no-op when the dtypes agree)
    if reduction == "none" and grad.dim():
        return grad.reshape(rows_shape)  # ViewBackward
    if reduction == "mean":
        grad = grad / denom  # DivBackward0
    return grad.expand(rows_shape)  # SumBackward0


class _OrderedTotal(torch.autograd.Function):
    """ordered_sum(v), divided by v.numel() for a mean, whose backward is autograd's
    SumBackward / MeanBackward: the upstream expanded to v's shape (a mean's then divided,
    a dense contiguous tensor). The gradients made behind it are then laid out as behind
    v.sum() / v.mean() (ordered_sum's reshape and padding of a large tensor, and the Div
    node before a Sum, would hand v a gradient of another layout); the same values."""

    @staticmethod
    def forward(ctx, v: Tensor, mean: bool) -> Tensor:
        ctx.shape, ctx.count = v.shape, v.numel() if mean else None
        total = ordered_sum(v)
        return total / v.numel() if mean else total  # (nan for an empty mean, as mean())

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.expand(ctx.shape)
        return (grad if ctx.count is None else grad / ctx.count), None


def ordered_total(v: Tensor, mean: bool) -> Tensor:
    """ordered_sum(v) (/ v.numel() for a mean) for autograd through an elementwise loss,
    laid out behind as v.sum() / v.mean() (_OrderedTotal)."""
    return _OrderedTotal.apply(v, mean)
