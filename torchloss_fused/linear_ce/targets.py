"""Probability targets of linear cross-entropy: a float (..., V) tensor of class
probabilities (soft labels, distillation), as ``F.cross_entropy`` takes them.

Their dtype rules are ``F.cross_entropy``'s on the logits ``F.linear`` makes: the loss has
the promoted dtype of (hidden, target, class_weight). The logits stay in hidden's dtype
(``F.linear`` makes them so); a float64 target or class weight with lower-precision hidden
states makes ``F.cross_entropy`` compute in float64, and the chunk loop then does the same,
one chunk at a time. The kernels read a probability target in the logits' dtype or in
float32; any other dtype is converted one chunk at a time, never the whole (N, V) tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import vocab_parallel as vp


def is_prob(target: Tensor) -> bool:
    return target.is_floating_point()


def loss_dtype(hidden_dtype: torch.dtype, target: Tensor,
               class_weight: Tensor | None) -> torch.dtype:
    """The dtype F.cross_entropy returns for these logits (before autocast's float32)."""
    if not is_prob(target):
        return hidden_dtype
    dtype = torch.promote_types(hidden_dtype, target.dtype)
    if class_weight is not None:
        dtype = torch.promote_types(dtype, class_weight.dtype)
    return dtype


def compute_dtype(hidden_dtype: torch.dtype, target: Tensor,
                  class_weight: Tensor | None) -> torch.dtype:
    """The dtype the cross-entropy ops see the logits in: hidden's, unless a probability
    target or its class weights promote the computation to float64."""
    if loss_dtype(hidden_dtype, target, class_weight) == torch.float64:
        return torch.float64
    return hidden_dtype


def chunk(target: Tensor, dtype: torch.dtype) -> Tensor:
    """One chunk of a probability target in a dtype the kernels read for logits of `dtype`
    (theirs, or float32 below float64), as functional.cross_entropy converts it."""
    if target.dtype == dtype or (target.dtype == torch.float32 and dtype != torch.float64):
        return target
    return target.to(torch.float64 if dtype == torch.float64 else torch.float32)


def mean_denominator(rows: Tensor, acc: torch.dtype) -> Tensor:
    """F.cross_entropy's mean over probability targets divides by the number of rows,
    class weights or not. Made on the device from the shape (a DTensor's global one):
    nothing is copied from the host."""
    local = rows.to_local() if vp.is_dtensor(rows) else rows
    denom = torch.full((), float(rows.shape[0]), dtype=acc, device=local.device)
    return vp.replicated_like(denom, rows)


def check(target: Tensor, hidden: Tensor, V: int, ignore_index: int) -> None:
    expected = (*hidden.shape[:-1], V)
    if tuple(target.shape) != expected:
        raise ValueError(
            f"a probability target must have shape {expected} (hidden's shape with the "
            f"vocabulary size V={V} last), got {tuple(target.shape)}")
    if ignore_index >= 0:
        raise ValueError("ignore_index is not supported for floating point target")
