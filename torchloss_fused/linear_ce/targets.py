"""Probability targets of linear cross-entropy: a float (..., V) tensor of class
probabilities (soft labels, distillation), as ``F.cross_entropy`` takes them.

Their dtype rules are ``cross_entropy``'s (functional.py's, shared) on the logits
``F.linear`` makes: the loss has the promoted dtype of (hidden, target, class_weight). The
logits stay in hidden's dtype (``F.linear`` makes them so); a float64 target or class
weight with lower-precision hidden states makes ``F.cross_entropy`` compute in float64,
and the chunk loop then does the same, one chunk at a time. The kernels read a
probability target in the logits' dtype or in float32; any other dtype is converted one
chunk at a time, never the whole (N, V) tensor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import reference
from ..functional import _compute_dtype as compute_dtype
from ..functional import _loss_dtype as loss_dtype
from ..functional import _prob_target_for as chunk  # (applied to one chunk of rows)

__all__ = ["acc_dtype", "check", "chunk", "compute_dtype", "flattened", "is_prob",
           "loss_dtype"]


def is_prob(target: Tensor) -> bool:
    return target.is_floating_point()


def acc_dtype(hidden_dtype: torch.dtype, target: Tensor,
              class_weight: Tensor | None) -> torch.dtype:
    """The dtype of the per-row loss and lse: float32, or float64 where the computation
    is."""
    return reference.acc_dtype(compute_dtype(hidden_dtype, target, class_weight))


def flattened(hidden: Tensor, target: Tensor) -> bool:
    """Whether target holds hidden's rows flattened, as the F.linear + F.cross_entropy call
    linear cross-entropy stands for takes them (`labels.view(-1)` beside (B, T, H) hidden
    states): (N,) class indices, or (N, V) probabilities."""
    return (hidden.dim() > 2 and target.dim() == 1 + is_prob(target)
            and target.shape[0] == math.prod(hidden.shape[:-1]))


def check(target: Tensor, hidden: Tensor, V: int, ignore_index: int) -> None:
    expected = (*hidden.shape[:-1], V)
    if tuple(target.shape) != expected and not (flattened(hidden, target)
                                                and target.shape[1] == V):
        raise ValueError(
            f"a probability target must have shape {expected} (hidden's shape with the "
            f"vocabulary size V={V} last, or that with the rows flattened), got "
            f"{tuple(target.shape)}")
    if ignore_index >= 0:
        raise ValueError("ignore_index is not supported for floating point target")
