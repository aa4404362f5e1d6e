"""Fused linear + cross-entropy for LM heads: the loss of ``F.linear(hidden, weight, bias)``
without ever materialising the N x V logits.

    loss = tlf.linear_cross_entropy(hidden, lm_head.weight, target)

How: rows (tokens) are processed in chunks. For each chunk, one matrix product writes its
logits into a (chunk, V) buffer allocated once per call; the cross-entropy ops of
`_backend.ops_for(device)` compute the per-row loss and log-sum-exp and then write the
gradient of the logits over that same buffer; two more products turn it into the chunk's
rows of grad_hidden and its contribution to grad_weight (and grad_bias). For
``reduction="mean"``/``"sum"`` all of this happens in the forward pass (the gradient scale,
1/number of counted targets or 1/their summed class weights, is a device tensor known
before the loop), and backward only rescales the three gradients by the upstream gradient:
three matrix products in all. For ``reduction="none"`` the per-row upstream gradients are
known only in backward, which recomputes the logits chunk by chunk (four products).

Memory model (besides the inputs and the gradients autograd hands back): one (chunk, V)
logits buffer in the input dtype, plus, when grad_weight accumulates in a wider dtype than
the weight's (bf16/fp16 weights: float32 by default), that accumulator. A float32
accumulator for a bf16/fp16 weight shares its first half with the returned gradient's
storage, which it is converted into in place at the end, so the accumulator and the
gradient together cost V x H x 4 bytes, not 6. No tensor of N x V elements is allocated.

Targets: class indices (N,) or class probabilities (N, V); targets.py holds the rules of
the latter (dtype promotion, shape checks) and the loop reads them a chunk of
rows at a time.

DTensor inputs: tokens split over ranks with the head replicated run these ops on local
rows (sharding rules in ../_sharding.py); a head split over the vocabulary takes
vocab_parallel.py's path, which keeps it split (a probability target's columns are split
as the vocabulary).

The chunked loops are custom ops (namespace ``torchloss_fused_py``) with fake kernels and
autograd formulas, so ``torch.compile(fullgraph=True)`` sees one opaque op. Nothing
synchronises with the host: chunk sizes come from shapes (and, on CUDA, the free memory the
driver reports), the mean denominator stays on the device.
"""

from __future__ import annotations

import math
from typing import Literal, overload

import torch
from torch import Tensor, nn

from .. import _reduction
from .._higher_order import transform_active
from .._overrides import dispatches_torch_function
from ..functional import (
    _FLOAT_DTYPES,
    _INDEX_DTYPES,
    _autocast_enabled,
    _check_class_vector,
    _check_device,
    _check_ignore_index,
    _check_index_weight_dtype,
    _check_label_smoothing,
    _check_number,
    _check_tensor,
    _count_denominator,
    _f_reduction,
    _index_denominator,
    _may_want_grad,
    _one_element_target,
    _reshaped,
    _wants_grad,
)
from ..modules import settings_repr, warn_torchscript
from ..vocab_parallel import replicated_like
from . import targets, vocab_parallel
from .chunking import auto_chunk_size
from .ops import EAGER, materialised_rows

__all__ = ["LinearCrossEntropyLoss", "auto_chunk_size", "linear_cross_entropy"]


def _rows_shape(hidden: Tensor, target: Tensor) -> tuple:
    """The shape of the unreduced loss and of the lse: hidden's without its last dimension,
    or (N,) for a flattened target (targets.flattened)."""
    return tuple(target.shape[:1]) if targets.flattened(hidden, target) else \
        tuple(hidden.shape[:-1])


def _check_args(hidden, weight, target, bias, class_weight, ignore_index, chunk_size,
                accum_dtype, autocast: bool) -> None:
    _check_tensor(hidden, "hidden")
    _check_tensor(weight, "weight")
    _check_tensor(target, "target")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"hidden must be float32, float64, bfloat16 or float16, got {hidden.dtype}")
    if hidden.dim() == 0:
        raise ValueError("hidden must have shape (..., H), got a 0-dim tensor")
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(
            f"weight must have shape (V, H) = (vocabulary, {H}) as in nn.Linear, got "
            f"{tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight has no rows: the vocabulary size V must be at least 1")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    _check_device(hidden, weight, "weight")
    if bias is not None:
        _check_tensor(bias, "bias")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
        _check_device(hidden, bias, "bias")
    _check_device(hidden, target, "target")
    prob = targets.is_prob(target)
    if prob:
        targets.check(target, hidden, weight.shape[0], ignore_index)
    elif target.dtype not in _INDEX_DTYPES:
        raise TypeError(
            "target must hold class indices (int64, int32 or uint8) or class probabilities "
            f"(a floating-point tensor of shape (..., V)), got {target.dtype}")
    elif tuple(target.shape) != tuple(hidden.shape[:-1]) and \
            not _one_element_target(hidden.dim(), weight.shape[0], target) and \
            not targets.flattened(hidden, target):
        raise ValueError(
            f"target must have hidden's shape without its last dimension, "
            f"{tuple(hidden.shape[:-1])}, or be that flattened, got {tuple(target.shape)}")
    if class_weight is not None:
        _check_class_vector(hidden, class_weight, "class_weight", weight.shape[0])
        if not prob:  # (probability targets promote, as F.cross_entropy's)
            _check_index_weight_dtype(class_weight, hidden.dtype, autocast, "class_weight",
                                      "hidden")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if accum_dtype is not None:
        if not isinstance(accum_dtype, torch.dtype) or accum_dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"accum_dtype must be None or a floating-point torch.dtype, got {accum_dtype!r}")
        if accum_dtype != hidden.dtype and accum_dtype.itemsize <= hidden.dtype.itemsize:
            raise ValueError(
                f"accum_dtype must be the weight's dtype ({hidden.dtype}) or wider, got "
                f"{accum_dtype}")


def _autocast_inputs(hidden, weight, bias):
    """Under autocast, F.linear runs in the autocast dtype and F.cross_entropy returns
    float32: cast the same way (float32 weights get a low-precision copy, as F.linear makes
    one) and say which dtype the loss takes (None: the input's)."""
    if not (isinstance(hidden, Tensor) and hidden.dtype != torch.float64
            and hidden.is_floating_point() and _autocast_enabled(hidden.device)):
        return hidden, weight, bias, None

    low = torch.get_autocast_dtype(hidden.device.type)

    def cast(v):
        eligible = isinstance(v, Tensor) and v.is_floating_point() and v.dtype != torch.float64
        return v.to(low) if eligible else v

    return cast(hidden), cast(weight), cast(bias), torch.float32


# (for type checkers: the loss alone, or (loss, lse) with return_lse=True)
@overload
def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = ...,
    ignore_index: int = ..., reduction: str = ..., label_smoothing: float = ..., *,
    class_weight: Tensor | None = ..., z_loss: float = ..., softcap: float | None = ...,
    chunk_size: int | None = ..., accum_dtype: torch.dtype | None = ...,
    return_lse: Literal[False] = ...,
) -> Tensor: ...
@overload
def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = ...,
    ignore_index: int = ..., reduction: str = ..., label_smoothing: float = ..., *,
    class_weight: Tensor | None = ..., z_loss: float = ..., softcap: float | None = ...,
    chunk_size: int | None = ..., accum_dtype: torch.dtype | None = ...,
    return_lse: Literal[True],
) -> tuple[Tensor, Tensor]: ...
@overload
def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = ...,
    ignore_index: int = ..., reduction: str = ..., label_smoothing: float = ..., *,
    class_weight: Tensor | None = ..., z_loss: float = ..., softcap: float | None = ...,
    chunk_size: int | None = ..., accum_dtype: torch.dtype | None = ...,
    return_lse: bool = ...,
) -> Tensor | tuple[Tensor, Tensor]: ...
@dispatches_torch_function(3)
@vocab_parallel.vp.eager_under_compile_when(vocab_parallel.head_vocab_sharded)
def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    class_weight: Tensor | None = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``F.cross_entropy(F.linear(hidden, weight, bias).flatten(0, -2), target.flatten(), ...)``
    without materialising the logits.

    ``hidden`` is (..., H), ``weight`` (V, H) as in ``nn.Linear``, ``bias`` (V,) or None,
    ``target`` class indices shaped like ``hidden`` without its last dimension, or those
    flattened to (N,) (a 1-D ``hidden`` also takes a (1,) target, as F.cross_entropy its
    logits), or class probabilities (soft labels, a teacher's distribution) shaped
    (..., V) or (N, V), as
    ``F.cross_entropy`` takes them: any float dtype (the loss has F's promoted dtype of
    hidden, target and class_weight), no ``ignore_index``. A float32 target with bf16/fp16
    hidden states is read as float32; other dtypes are converted a chunk at a time. Only the
    caller's target is N x V. Gradients flow to hidden, weight and bias (and to a target
    that requires grad, through the materialised logits). ``mean`` divides by the number of
    non-ignored targets of the whole call (with ``class_weight``: the sum of their classes'
    weights; probability targets: the number of rows; all as ``F.cross_entropy``); ``sum``
    is for gradient accumulation, where the caller divides by a token count across
    micro-batches; ``none`` returns the loss shaped like ``hidden`` without its last
    dimension ((N,) for a flattened target).

    Keyword-only: ``class_weight`` (per-class weights (V,) in hidden's dtype, any float
    dtype with probability targets: the ``weight`` of ``F.cross_entropy``, renamed since
    ``weight`` is the LM head's here; ``z_loss``'s term is not weighted, as in
    ``cross_entropy``). A ``class_weight`` that requires grad gets
    its gradient as in ``cross_entropy``, through plain PyTorch, which materialises the
    N x V logits. Extras: ``z_loss`` (adds ``z_loss * lse**2`` per counted row), ``softcap``
    (logits become ``softcap * tanh(logits / softcap)``), ``chunk_size`` (rows per chunk;
    default: chosen from the shapes and, on CUDA, free memory) and ``accum_dtype`` (dtype of
    the grad_weight/grad_bias accumulator: float32 for bf16/fp16 inputs by default, else the
    input dtype; pass the input dtype to save memory) and ``return_lse`` (also return each
    row's log-sum-exp, differentiable, as ``cross_entropy``'s: ``(loss, lse)``, the lse
    float32 (float64 where the computation is) shaped like the unreduced loss (``hidden``
    without its last dimension, or (N,) beside a flattened target); e.g. to log the
    z-loss term. With mean/sum, a gradient through the lse makes the backward recompute
    logits and gradients, three more products; ``z_loss`` trains with the lse's square
    without them).
    """
    reduction = _f_reduction(reduction)
    hidden, weight, bias, autocast_dtype = _autocast_inputs(hidden, weight, bias)
    ignore_index = _check_ignore_index(ignore_index)
    _check_args(hidden, weight, target, bias, class_weight, ignore_index, chunk_size,
                accum_dtype, autocast=autocast_dtype is not None)
    label_smoothing = _check_label_smoothing(label_smoothing)
    z_loss = _check_number(z_loss, "z_loss", 0.0)
    softcap = 0.0 if softcap is None else _check_number(softcap, "softcap", 0.0, low_open=True)

    H, V = hidden.shape[-1], weight.shape[0]
    prob = targets.is_prob(target)
    if prob and autocast_dtype is not None and target.dtype in (torch.float16, torch.bfloat16):
        # (F casts it to float32 under autocast, before smoothing it: functional's
        # _prob_target_for says why)
        target = target.float()
    rows_shape = _rows_shape(hidden, target)
    # (the rows counted, not -1: that cannot be inferred beside H = 0, which F.linear takes)
    h2 = _reshaped(hidden, (math.prod(hidden.shape[:-1]), H))
    t1 = _reshaped(target, (h2.shape[0], V) if prob else (h2.shape[0],))
    if vocab_parallel.vp.is_dtensor(t1) and not prob:
        vocab_parallel.vp.check_targets(t1, V, ignore_index)
    out_dtype = targets.loss_dtype(hidden.dtype, target, class_weight)
    if autocast_dtype is not None and out_dtype != torch.float64:
        out_dtype = autocast_dtype
    acc = targets.acc_dtype(hidden.dtype, target, class_weight)
    ce_args = (ignore_index, label_smoothing, z_loss, softcap)
    chunk = 0 if chunk_size is None else chunk_size
    denom = None
    if reduction == "mean" and prob:
        denom = _count_denominator(h2.shape[0], h2, acc)  # (F: the number of rows)
    elif reduction == "mean":
        denom = _reduction.mean_denominator(
            _index_denominator(t1, class_weight, ignore_index, V, acc,
                               unbatched=hidden.dim() == 1 and label_smoothing == 0),
            _reduction.splits_terms(class_weight, prob, label_smoothing, z_loss))

    needs = (_wants_grad(hidden), _wants_grad(weight), _wants_grad(bias))
    if (bias is not None and any(needs) and not torch.compiler.is_compiling()
            and bias.is_inference()):  # (Dynamo refuses is_inference())
        # A frozen bias made under inference_mode, beside a hidden or head that trains:
        # F.linear saves no bias, but the backward here may recompute the logits, and
        # autograd can neither save an inference tensor nor version it. A copy (V values).
        bias = bias.clone()
    if transform_active(hidden, weight, bias, class_weight, target if prob else None) or \
            _may_want_grad(class_weight) or (prob and _may_want_grad(target)):
        # torch.func / forward-mode AD see through this, not through the custom ops; and
        # autograd differentiates it for the gradient of a class_weight or a probability
        # target, as cross_entropy's.
        loss_rows, lse = materialised_rows(h2, weight, bias, t1, class_weight, *ce_args)
    elif vocab_parallel.vocab_sharded(weight):
        # A ColwiseParallel LM head: the vocabulary stays split (see vocab_parallel.py).
        loss_rows, lse = vocab_parallel.loss_rows(h2, weight, bias, t1, class_weight,
                                                  *ce_args, chunk, accum_dtype)
    elif reduction != "none" and any(needs) and not torch.jit.is_tracing():
        # (Not under torch.jit.trace, whose check traces again without gradients: the graph
        # must not depend on them. functional._fused_path says the same.)
        loss, lse, *_ = EAGER["linear_ce_fwd_grad"](h2, weight, bias, t1, class_weight,
                                                    denom, *ce_args, chunk, accum_dtype,
                                                    *needs)
        return _with_lse(loss.to(out_dtype), lse, rows_shape, return_lse, acc)
    else:
        loss_rows, lse = EAGER["linear_ce_fwd"](h2, weight, bias, t1, class_weight,
                                                *ce_args, chunk, accum_dtype)
    loss = _reduction.reduce(loss_rows, reduction, denom, rows_shape, out_dtype)
    return _with_lse(loss, lse, rows_shape, return_lse, acc)


def _with_lse(loss: Tensor, lse: Tensor, rows_shape: tuple, return_lse: bool,
              acc: torch.dtype):
    # (the ops keep lse in float64, as cross_entropy's; the user gets it in acc, as there)
    return (loss, lse.reshape(rows_shape).to(acc)) if return_lse else loss


class LinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`linear_cross_entropy`: ``loss(hidden, weight, target, bias)``.

    The LM head's weight (and bias) stay with the model; pass them to ``forward``.
    ``class_weight`` is a buffer (as ``CrossEntropyLoss``'s ``weight``); given DTensor
    inputs, a plain buffer is used as a replicated DTensor on their mesh.
    """

    __prepare_scriptable__ = warn_torchscript

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        class_weight: Tensor | None = None,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
        accum_dtype: torch.dtype | None = None,
        return_lse: bool = False,
    ) -> None:
        super().__init__()
        self.register_buffer("class_weight", class_weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.accum_dtype = accum_dtype
        self.return_lse = return_lse

    @torch.jit.unused  # (see warn_torchscript)
    def forward(self, hidden: Tensor, weight: Tensor, target: Tensor,
                bias: Tensor | None = None):
        return linear_cross_entropy(
            hidden, weight, target, bias, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing,
            class_weight=replicated_like(self.class_weight, hidden), z_loss=self.z_loss,
            softcap=self.softcap, chunk_size=self.chunk_size, accum_dtype=self.accum_dtype,
            return_lse=self.return_lse)

    def extra_repr(self) -> str:
        return settings_repr(self, LinearCrossEntropyLoss.__init__, (
            "class_weight", "ignore_index", "reduction", "label_smoothing", "z_loss",
            "softcap", "chunk_size", "accum_dtype", "return_lse"))
