"""Public loss functions: validate arguments, pick the path, reduce.

Kernels return per-row values; every policy (argument checks, reductions, denominators,
result dtypes) lives here, so all backends share it.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import sys
import warnings
from typing import Literal, overload

import torch
from torch import Tensor
from torch._prims_common import compute_elementwise_output_logical_to_physical_perm
from torch.autograd import forward_ad

from . import _eager, _reduction, reference, vocab_parallel
from ._higher_order import carries_derivative, transform_active, unwrapped
from ._overrides import dispatches_torch_function
from ._tracing import recording

__all__ = ["cross_entropy", "focal_loss", "sigmoid_focal_loss"]

_REDUCTIONS = ("none", "mean", "sum")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int64, torch.int32, torch.uint8)


# ---- argument checks ------------------------------------------------------------------------


def _check_reduction(reduction) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")


# Frames a warning is not attributed to: this package's, and torch's (nn.Module's call,
# torch.nn.CrossEntropyLoss.forward under patch_torch, torch.compiler.disable's wrapper).
_INNER_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                    for m in (sys.modules[__package__], torch))


def _warn_at_caller(message: str) -> None:
    """warnings.warn attributed to the caller's line, however many wrappers and modules lie
    between (so the default filter shows it once per call site), or to the outermost frame
    if all are inner ones."""
    if torch.compiler.is_compiling():
        return  # (fullgraph=True refuses warnings.warn; an eager call shows it)
    frame, level = sys._getframe(0), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INNER_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def _f_reduction(reduction) -> str:
    """F.cross_entropy's reductions: ours, and the deprecated "elementwise_mean", which F
    still takes as "mean" with a warning (torch.nn._reduction.get_enum's words)."""
    if reduction == "elementwise_mean":
        _warn_at_caller("reduction='elementwise_mean' is deprecated. "
                        "Please use reduction='mean' instead.")
        return "mean"
    _check_reduction(reduction)
    return reduction


def _check_label_smoothing(value) -> float:
    """label_smoothing as F takes it: above 1 is an error; F smooths only when it is above
    0, so a negative value (-inf too) or nan means no smoothing, which we follow (raising
    would break code that runs with F), with a warning, since whoever passed one expected
    it to act (negative label smoothing is a published method that F does not implement).
    F's parser also takes a bool, as 0 or 1: Python's, NumPy's, a 0-dim bool tensor."""
    if type(value) is not float and (type(value) is bool or _numpy_bool(value) or (
            isinstance(value, Tensor) and value.dtype == torch.bool and value.dim() == 0)):
        value = float(bool(value))
    value = _real_number(value, "label_smoothing")
    if value > 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {value}")
    if not value > 0.0:
        if value != 0.0:
            _warn_at_caller(
                f"label_smoothing={value} applies no smoothing: F.cross_entropy smooths only "
                "with a value in (0, 1], and this loss does the same")
        return 0.0
    return value


def _numpy_bool(value) -> bool:
    """Whether value is NumPy's bool scalar (not an array: F refuses those), without
    importing NumPy."""
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.bool_)


def _check_tensor(x, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        # (The kernels and the reference's views read strided memory; F fails on these too,
        # deep inside with NotImplementedError, but for sparse probability targets.)
        raise TypeError(
            f"{name} must be a dense (strided) tensor, got layout {x.layout}; "
            "convert it with .to_dense()"
        )


def _dense_prob_target(target):
    """F.cross_entropy takes a sparse (COO, CSR...) probability target, in its forward:
    taken here as its dense copy, which the kernels read like any probability target (one
    logits-sized tensor), with every option and the backward. F's gives no gradient for
    the input, fails with label smoothing, and with reduction="none" fails for CSR and
    returns a sparse loss for COO (ours is dense). masked_grad=False: a target requiring
    grad gets every class's gradient, as from F."""
    if isinstance(target, Tensor) and target.layout != torch.strided and \
            target.is_floating_point():
        return target.to_dense(masked_grad=False)
    return target


def _legacy_reduction_string(size_average, reduce) -> str:
    """torch.nn._reduction.legacy_get_string, with its warning in eager calls: torch.compile
    records a call of torch's own function into its graph as an op, and this one returns a
    str (fullgraph=True failed; F's call, inside torch, is traced through)."""
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    reduction = "mean" if size_average and reduce else "sum" if reduce else "none"
    # (at the caller's line, through the DTensor wrapper or a module's constructor;
    # _warn_at_caller also says nothing under Dynamo, which cannot trace warnings.warn here)
    _warn_at_caller("size_average and reduce args will be deprecated, please use "
                    f"reduction='{reduction}' instead.")
    return reduction


def _check_logits(input, name: str = "input") -> None:
    _check_tensor(input, name)
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, float64, bfloat16 or float16, got {input.dtype}"
        )
    if input.dim() == 0:
        raise ValueError(
            f"{name} has no class dimension: expected shape (C), (N, C) or "
            "(N, C, d1, ..., dK), got a 0-dim tensor"
        )


def _check_device(input: Tensor, other: Tensor, name: str) -> None:
    dtensor = vocab_parallel.is_dtensor(input)
    if dtensor != vocab_parallel.is_dtensor(other):
        # (Under a torch.func transform the input may be a wrapper around a DTensor, and a
        # DTensor target from outside the transform is not wrapped: compared unwrapped,
        # only here, off the common path.)
        input, other = unwrapped(input), unwrapped(other)
        dtensor = vocab_parallel.is_dtensor(input)
    if dtensor != vocab_parallel.is_dtensor(other):
        kinds = ("a DTensor", "a plain tensor")
        a, b = kinds if dtensor else kinds[::-1]
        raise TypeError(
            f"input is {a} but {name} is {b}; make both DTensors on the same mesh "
            "(distribute_tensor, or DTensor.from_local with the placements they have)"
        )
    if dtensor and other.device_mesh != input.device_mesh:
        raise ValueError(
            f"{name} is a DTensor on {other.device_mesh} but input is on "
            f"{input.device_mesh}; put both on the same device mesh"
        )
    if other.device != input.device:
        raise ValueError(
            f"{name} is on {other.device} but input is on {input.device}; "
            "move them to the same device"
        )


def _may_overlap(x: Tensor) -> bool:
    """Whether two elements of x may share memory: unless each stride, smallest first,
    passes the reach of the dims inside it. (PyTorch's own test answers "too hard" for
    views such as as_strided or unfold: those had been let through, and the backward wrote
    rows' gradients over logits other rows had still to read.)"""
    reach = 0
    for stride, size in sorted((st, sz) for st, sz in zip(x.stride(), x.shape) if sz > 1):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def _spans(x: Tensor, *others: Tensor | None) -> list[tuple[int, int] | None]:
    """The bytes from each tensor's first element to one past its last; None for one
    without elements, on another device, or with no memory (meta, fake)."""
    out = []
    for t in (x, *others):
        if not isinstance(t, Tensor) or t.numel() == 0 or t.device != x.device:
            out.append(None)
            continue
        try:
            start = t.data_ptr()
        except RuntimeError:  # (a fake tensor has none)
            start = 0
        last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        out.append((start, start + (last + 1) * t.element_size()) if start else None)
    return out


def _check_inplace_target(input: Tensor, x3: Tensor, **others: Tensor | None) -> None:
    """inplace_backward=True writes the gradient over the input's storage: refused where
    that would corrupt something, as PyTorch refuses an in-place op on such a tensor;
    `others` (the target, the weight), where they lie among the input's bytes, here
    rather than in the backward. (Under torch.compile only the leaf test: a compiled
    backward writes into the input too, and copies the result back to a parameter.)"""
    if not recording() and not vocab_parallel.is_dtensor(x3) and x3.device.type != "meta":
        if _may_overlap(x3):
            raise ValueError(
                "inplace_backward=True writes the gradient into the input, but elements of "
                "this input share memory (an expanded tensor?); clone it or use "
                "inplace_backward=False"
            )
        x_span, *spans = _spans(x3, *others.values())
        for name, span in zip(others, spans):
            if x_span and span and span[0] < x_span[1] and x_span[0] < span[1]:
                raise ValueError(
                    f"inplace_backward=True writes the gradient into the input, but the "
                    f"{name} lies in the input's memory, which the gradient overwrites; "
                    f"pass a copy of it"
                )
    # A leaf that requires grad (a parameter), or a view of one: its values would become
    # its own gradient, and .grad the same memory, which the optimizer then steps with.
    # As autograd's check_inplace: a view (requiring grad, as the input here does) whose
    # base is a leaf, whether the base requires grad or not (randn(N * V).view(N, V) made
    # to require grad is itself a leaf; its slices are views of the same base).
    base = input._base
    if input.is_leaf or (base is not None and base.is_leaf):
        what = "is a leaf tensor" if input.is_leaf else "is a view of a leaf tensor"
        raise ValueError(
            f"inplace_backward=True writes the gradient into the input, but the input {what} "
            "that requires grad (a parameter?), whose values would become its gradient; use "
            "inplace_backward=False, or pass logits computed from it"
        )


def _real_number(value, name: str) -> float:
    if type(value) is not float:  # (the common case skips the slow ABC check)
        if isinstance(value, Tensor) and value.dim() == 0:
            # F's argument parser takes these too, and syncs alike; one being differentiated
            # is refused: converting would cut its derivative, in reverse mode, forward mode
            # or torch.func alike. A bool or complex one fails below.
            if carries_derivative(value):
                raise TypeError(
                    f"{name} is a 0-dim tensor being differentiated (it requires grad, "
                    "carries a forward-mode tangent or is batched by torch.func), and as a "
                    "number its derivative would be lost: pass a number, or .detach() it")
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        value = float(value)
    return value


def _check_number(value, name: str, low: float | None = None, high: float | None = None,
                  low_open: bool = False) -> float:
    value = _real_number(value, name)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and value > high
    finite = value == value and abs(value) != math.inf  # (math.isfinite breaks tracing)
    if not finite or below or above:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"<= {high}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        raise ValueError(f"{name} must be finite{' and ' + bounds if bounds else ''}, got {value}")
    return value


def _check_ignore_index(value) -> int:
    """An int as F takes it: Python or NumPy ints and integer tensors of one element; not a
    bool or a float (int() would truncate -100.5 to -100), and within int64."""
    if type(value) is not int:
        if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
            raise TypeError("ignore_index must be an int, got bool")
        try:
            value = operator.index(value)
        except TypeError:
            raise TypeError(
                f"ignore_index must be an int, got {type(value).__name__}") from None
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {value}")
    return value


def _one_element_target(logits_dim: int, num_classes: int, target: Tensor) -> bool:
    """Whether an index target of shape (1,) stands for the 0-dim one, as F takes it: for
    unbatched (C,) logits (F's forward does; its backward fails), but for C = 1, where F
    reads the pair as probabilities, which an index target is not."""
    return logits_dim == 1 and tuple(target.shape) == (1,) and num_classes != 1


def _check_index_target(input: Tensor, target: Tensor, out_shape: tuple) -> None:
    if target.dtype not in _INDEX_DTYPES:
        raise TypeError(
            "class-index target must be int64, int32 or uint8 (or a floating-point "
            f"tensor of class probabilities shaped like input), got {target.dtype}"
        )
    if tuple(target.shape) == out_shape:
        return
    if _one_element_target(input.dim(), input.shape[0], target):
        return
    if input.dim() == 2 and target.dim() == 1:
        raise ValueError(
            f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
            f"({target.shape[0]})."
        )
    raise ValueError(f"Expected target size {list(out_shape)}, got {list(target.shape)}")


def _check_class_vector(input: Tensor, v, name: str, num_classes: int | None = None) -> None:
    """v: one floating-point value per class, where input is. num_classes: C when input
    has no class dim to read it from (linear cross-entropy's hidden states)."""
    _check_tensor(v, name)
    _check_device(input, v, name)
    C = num_classes if num_classes is not None else (
        input.shape[0] if input.dim() == 1 else input.shape[1])
    if v.dim() != 1 or v.shape[0] != C:
        raise ValueError(
            f"{name} must hold one value per class ({C}), got shape {tuple(v.shape)}"
        )
    if not v.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")


def _check_index_weight_dtype(weight: Tensor, dtype: torch.dtype, autocast: bool,
                              name: str = "weight", input_name: str = "the input") -> None:
    # (Autocast casts both to float32 for F.cross_entropy, so any such pair is fine.)
    if weight.dtype != dtype and not (
            autocast and weight.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        raise TypeError(
            f"{name} must have {input_name}'s dtype {dtype} (as F.cross_entropy requires "
            f"for class-index targets), got {weight.dtype}"
        )


def _loss_dtype(input_dtype: torch.dtype, target: Tensor, weight: Tensor | None) -> torch.dtype:
    """F.cross_entropy's result dtype (before autocast): the input's for class indices,
    promoted over a probability target and the class weights otherwise."""
    if not target.is_floating_point():
        return input_dtype
    dtype = torch.promote_types(input_dtype, target.dtype)
    return dtype if weight is None else torch.promote_types(dtype, weight.dtype)


def _compute_dtype(input_dtype: torch.dtype, target: Tensor,
                   weight: Tensor | None) -> torch.dtype:
    """The dtype the kernels see the logits in: the input's, unless a float64 probability
    target or weight makes F compute in float64 (rare)."""
    if _loss_dtype(input_dtype, target, weight) == torch.float64:
        return torch.float64
    return input_dtype


def _prob_target_for(t: Tensor, dtype: torch.dtype, label_smoothing: float = 0.0,
                     autocast: bool = False) -> tuple[Tensor, float]:
    """A (B, C, ...) probability target in a dtype the kernels read beside logits of
    `dtype` (theirs, or float32 below float64), and the label smoothing left for the
    kernels to apply. A target that is converted gets F's smoothing first, as F computes
    it: `t * (1 - ls) + ls / C` in t's own dtype, each step rounded to it (for a float16 or
    bfloat16 target beside float32 logits those roundings move the loss by about 2e-4 of
    itself). One read as it is gets it in the kernels, unrounded, with no tensor of its
    size made for it. Under autocast (`autocast`: it is on for the device) F casts a
    float16 or bfloat16 target to float32 before smoothing it, and so does this."""
    if t.dtype == dtype or (t.dtype == torch.float32 and dtype != torch.float64):
        return t, label_smoothing
    if autocast and dtype != torch.float64 and t.dtype in (torch.float16, torch.bfloat16):
        return t.float(), label_smoothing
    if label_smoothing > 0 and t.shape[1] > 0:
        t = t.mul(1 - label_smoothing).add_(label_smoothing / t.shape[1])
    return t.to(torch.float64 if dtype == torch.float64 else torch.float32), 0.0


def _count_denominator(count: int, like: Tensor, acc: torch.dtype) -> Tensor:
    """A mean's denominator known on the host (a row count), made on `like`'s device: no
    host-to-device copy, which CUDA graph capture forbids. Replicated where `like` is a
    DTensor. Under torch.jit.trace sizes are traced 0-dim tensors, and so is `count`: kept
    as one, so the traced graph divides by its inputs' count (float() would freeze it).
    Under torch.export a SymInt, handed to torch.full as it is: float() would specialize
    the program to this call's size."""
    local = like.to_local() if vocab_parallel.is_dtensor(like) else like
    denom = (count.to(device=local.device, dtype=acc) if isinstance(count, Tensor)
             else torch.full((), count, dtype=acc, device=local.device))
    return vocab_parallel.replicated_like(denom, like)


def _reshaped(t: Tensor, shape: tuple) -> Tensor:
    """t.reshape(shape), but t itself where the shape is t's, and t.unsqueeze(-1) where it
    only gains a trailing 1: views DTensor takes under any layout, where it refuses a
    reshape of a sharded dim of 0 rows."""
    shape = tuple(shape)
    if tuple(t.shape) == shape:
        return t
    if (*t.shape, 1) == shape:
        return t.unsqueeze(-1)
    return t.reshape(shape)


def _rows_view(input: Tensor) -> tuple[Tensor, tuple]:
    """(N, C, d1..dK) -> (N, C, d1*...*dK) and the unreduced loss shape (N, d1..dK)."""
    if input.dim() == 1:
        return input.reshape(1, input.shape[0], 1), ()
    N, C, *rest = input.shape
    return _reshaped(input, (N, C, math.prod(rest))), (N, *rest)


def _autocast_to_float32(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether F.cross_entropy would compute in float32 here: under autocast on the device,
    losses are on autocast's float32 list, so float16/bfloat16 inputs give float32 results.
    The kernels accumulate in float32 anyway: matching that costs no memory."""
    return dtype in (torch.float16, torch.bfloat16) and _autocast_enabled(device)


def _autocast_enabled(device: torch.device) -> bool:
    """Whether autocast is on for the device's type. `torch.is_autocast_enabled` raises for
    a type autocast does not know (meta, used to trace shapes), where F just runs; asking
    first breaks torch 2.11's fullgraph tracing, hence only for other types than these."""
    if device.type in ("cpu", "cuda"):
        return torch.is_autocast_enabled(device.type)
    return (torch.amp.is_autocast_available(device.type)
            and torch.is_autocast_enabled(device.type))


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _may_want_grad(t: Tensor | None) -> bool:
    """_wants_grad(t) for a weight, alpha or probability target, whose gradient only the
    reference code gives; under torch.jit.trace any such tensor: the traced graph must not
    depend on grad mode (its check traces again without gradients), and may run later with
    t requiring grad."""
    return t is not None and (torch.jit.is_tracing() or _wants_grad(t))


def _fused_path(x: Tensor, inplace_backward: bool = False, compiled: bool = False) -> bool:
    """Compute the gradient in the forward pass (logits read once): eager training, and
    traced code where `compiled` says the fused op is cheaper there too.

    Under torch.compile a backward cannot skip the rescale pass the fused path may need: it
    scales the saved gradient out of place (an in-place rescale of the saved buffer is
    functionalized, and Inductor does not reinplace a mutation of a backward graph input,
    so it would copy the whole gradient). For the softmax losses that makes four
    logits-sized passes where the split forward/backward ops make three, with the same
    exponentials computed, so they trace the split ops. The sigmoid focal loss's split ops
    move as many bytes as fused + scaling (inputs and targets read twice, against a
    gradient read and written once more) but compute each element's terms twice: it passes
    compiled=True (on the 2-core CPU, about 1.5x faster compiled forward+backward).

    Never under torch.jit.trace: its check traces again without gradients (_check_trace
    is @torch.no_grad), and the graph must not depend on that; the split op's registered
    backward serves the traced graph's gradients.
    """
    return (_wants_grad(x) and not inplace_backward and not torch.jit.is_tracing()
            and (compiled or not torch.compiler.is_compiling()))


# ---- reductions -----------------------------------------------------------------------------


def _index_denominator(t2: Tensor, weight: Tensor | None, ignore_index: int, C: int,
                       acc: torch.dtype, unbatched: bool = False) -> Tensor:
    """Sum of the targets' weights over non-ignored rows (their count without weights).
    unbatched: the logits had no batch dim and there is no label smoothing. F on CUDA then
    gives 0, not CPU's 0/0 = nan, as the mean when the one target is ignored: a
    denominator of 1 over that row's zero loss gives the same."""
    valid = _reduction.counted(t2, ignore_index)
    if weight is None or C == 0:
        denom = valid.sum().to(acc)
    else:
        # Clamped so an out-of-range target reaches the kernel, which reports it by value.
        w_t = weight.to(acc).gather(0, t2.long().clamp(0, C - 1).flatten()).view_as(t2)
        denom = _reduction.ordered_sum(torch.where(valid, w_t, 0))
    if unbatched and t2.device.type == "cuda":
        denom = torch.where(valid.reshape(()), denom, denom.new_ones(()))
    return denom


def _grad_scale(reduction: str, denom: Tensor | None, x3: Tensor, acc: torch.dtype) -> Tensor:
    """The grad_loss backward will see per row of (B, C, D) logits when the caller
    backpropagates the loss unscaled: _reduction.rows_grad of a unit gradient, as
    autograd will compute it, so the common case matches bitwise and backward skips its
    rescale pass."""
    shape = (x3.shape[0], x3.shape[2])
    if vocab_parallel.is_dtensor(x3):  # (a DTensor, laid out as the rows: no mixing)
        one = x3.new_empty(shape, dtype=acc).new_ones(())
    else:
        one = x3.new_ones((), dtype=acc) if denom is None else denom.new_ones(())
    return _reduction.rows_grad(one, reduction, denom, shape, acc)


def _fused_reduced_loss(kind: int, reduction: str, unbatched: bool, x3: Tensor, t: Tensor,
                        w: Tensor | None, args: tuple, dtype: torch.dtype, out_shape: tuple,
                        logits: Tensor | None):
    """The eager loss of a fused op, denominator to reduction in one C++ call
    (_eager.FusedReduced.loss); None where that path does not serve (no compiled kernels
    for the device, traced code...). logits: the input x3 is _rows_view of, or None where
    x3 was converted."""
    fast = _eager.ops_for(x3.device).fused_reduced
    return None if fast is None else fast.loss(kind, reduction, unbatched, x3, t, w, args,
                                               dtype, out_shape, logits)


# ---- cross-entropy ------------------------------------------------------------------------

# The keywords F.cross_entropy hands a __torch_function__ override (_overrides.py).
_F_KEYWORDS = ("weight", "size_average", "ignore_index", "reduce", "reduction",
               "label_smoothing")


# (for type checkers: the loss alone, or (loss, lse) with return_lse=True)
@overload
def cross_entropy(
    input: Tensor, target: Tensor, weight: Tensor | None = ..., size_average: bool | None = ...,
    ignore_index: int = ..., reduce: bool | None = ..., reduction: str = ...,
    label_smoothing: float = ..., *, z_loss: float = ..., softcap: float | None = ...,
    logit_scale: float = ..., return_lse: Literal[False] = ..., inplace_backward: bool = ...,
) -> Tensor: ...
@overload
def cross_entropy(
    input: Tensor, target: Tensor, weight: Tensor | None = ..., size_average: bool | None = ...,
    ignore_index: int = ..., reduce: bool | None = ..., reduction: str = ...,
    label_smoothing: float = ..., *, z_loss: float = ..., softcap: float | None = ...,
    logit_scale: float = ..., return_lse: Literal[True], inplace_backward: bool = ...,
) -> tuple[Tensor, Tensor]: ...
@overload
def cross_entropy(
    input: Tensor, target: Tensor, weight: Tensor | None = ..., size_average: bool | None = ...,
    ignore_index: int = ..., reduce: bool | None = ..., reduction: str = ...,
    label_smoothing: float = ..., *, z_loss: float = ..., softcap: float | None = ...,
    logit_scale: float = ..., return_lse: bool = ..., inplace_backward: bool = ...,
) -> Tensor | tuple[Tensor, Tensor]: ...
@dispatches_torch_function(2, _F_KEYWORDS)
@vocab_parallel.eager_under_compile_when(vocab_parallel.input_class_sharded)
def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_lse: bool = False,
    inplace_backward: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Fused softmax cross-entropy: a drop-in for ``torch.nn.functional.cross_entropy``.

    Accepts every call ``F.cross_entropy`` accepts (same positional order, including the
    deprecated ``size_average``/``reduce``) and returns the same values, dtype and
    gradients. Keyword-only extras, all off by default:

    - ``z_loss``: adds ``z_loss * lse**2`` for each counted row (PaLM's auxiliary loss).
    - ``softcap``: logits become ``softcap * tanh(x / softcap)`` before the softmax (Gemma 2).
    - ``logit_scale``: multiplies the logits before the softmax (and before ``softcap``).
    - ``return_lse``: also return the per-row log-sum-exp (float32; float64 where the loss
      is computed in float64), shaped like the unreduced loss: ``(loss, lse)``.
    - ``inplace_backward``: the backward writes the gradient into ``input``'s storage,
      saving a logits-sized buffer. This DESTROYS the input's values during backward;
      use it only when nothing else needs the logits afterwards.
    """
    # F's own call on plain CPU tensors, checked and run in one C++ call (most of a small
    # loss's time was these checks in Python); None for any other call. (Not traced, nor
    # with forward-mode tangents, which the C++ cannot see; it rules out the rest.)
    if not torch.compiler.is_compiling() and forward_ad._current_level < 0:
        loss = _eager.fast_cross_entropy(
            input, target, weight, size_average, ignore_index, reduce, reduction,
            label_smoothing, z_loss, softcap, logit_scale, return_lse, inplace_backward)
        if loss is not None:
            return loss
    if size_average is not None or reduce is not None:
        reduction = _legacy_reduction_string(size_average, reduce)
    reduction = _f_reduction(reduction)
    _check_logits(input)
    target = _dense_prob_target(target)
    _check_tensor(target, "target")
    _check_device(input, target, "target")
    label_smoothing = _check_label_smoothing(label_smoothing)
    z_loss = _check_number(z_loss, "z_loss", 0.0)
    softcap = 0.0 if softcap is None else _check_number(softcap, "softcap", 0.0, low_open=True)
    logit_scale = _check_number(logit_scale, "logit_scale")
    ignore_index = _check_ignore_index(ignore_index)

    x3, out_shape = _rows_view(input)
    # torch.func and forward-mode AD: the reference code, which they see through.
    transformed = transform_active(input, weight, target if target.is_floating_point() else None)
    if inplace_backward and _wants_grad(x3) and not transformed:
        _check_inplace_target(input, x3, target=target, weight=weight)
    if inplace_backward and vocab_parallel.is_dtensor(x3) and not vocab_parallel.class_sharded(x3):
        # Not applied to DTensor logits on the row path: its in-place op runs under
        # DTensor's dispatch, which may hand it a redistributed copy of the logits (rows
        # fewer than the ranks, a replicated input beside sharded targets) and the gradient
        # returned was then the untouched logits. The vocab-parallel path writes each
        # rank's slice itself.
        inplace_backward = False
    prob = target.is_floating_point()
    if prob:
        if tuple(target.shape) != tuple(input.shape):
            raise ValueError(
                "a probability target must have the input's shape "
                f"{tuple(input.shape)}, got {tuple(target.shape)}"
            )
        if ignore_index >= 0:
            raise ValueError("ignore_index is not supported for floating point target")
        t = _reshaped(target, x3.shape)
    else:
        _check_index_target(input, target, out_shape)
        t = _reshaped(target, (x3.shape[0], x3.shape[2]))
        if vocab_parallel.is_dtensor(t):
            vocab_parallel.check_targets(t, x3.shape[1], ignore_index)
        if label_smoothing > 0 and x3.shape[1] == 0:
            return _smoothed_without_classes(
                cross_entropy(input, target, weight, ignore_index=ignore_index,
                              reduction=reduction, z_loss=z_loss,
                              softcap=softcap or None, logit_scale=logit_scale,
                              return_lse=return_lse, inplace_backward=inplace_backward))
    autocast = _autocast_to_float32(input.dtype, input.device)
    if weight is not None:
        _check_class_vector(input, weight, "weight")
        if not prob:
            # (Under autocast F casts float32, float16 and bfloat16 inputs and weights alike
            # to float32, float32 logits beside a bfloat16 weight included.)
            _check_index_weight_dtype(weight, input.dtype, autocast or (
                input.dtype == torch.float32 and _autocast_enabled(input.device)))

    dtype = _loss_dtype(input.dtype, target, weight)
    rows_of = input  # (what x3 is _rows_view of; None once converted)
    if prob:
        compute_dtype = _compute_dtype(input.dtype, target, weight)
        if compute_dtype != x3.dtype:
            x3, rows_of = x3.to(compute_dtype), None
        t, label_smoothing = _prob_target_for(t, x3.dtype, label_smoothing,
                                              _autocast_enabled(input.device))

    if autocast and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    args = (ignore_index, label_smoothing, z_loss, softcap, logit_scale)
    reference_grads = transformed or _may_want_grad(weight) or (prob and _may_want_grad(target))
    unbatched = input.dim() == 1 and label_smoothing == 0
    if not (return_lse or reference_grads or (inplace_backward and _wants_grad(x3))):
        kind = _eager.CE_PROB if prob else _eager.CE_INDEX
        loss = _fused_reduced_loss(kind, reduction, unbatched, x3, t, weight, args, dtype,
                                   out_shape, rows_of)
        if loss is not None:
            return loss

    acc = reference.acc_dtype(x3.dtype)
    C = x3.shape[1]
    split_terms = _reduction.splits_terms(weight, prob, label_smoothing, z_loss)
    if reduction != "mean":
        denom = None
    elif prob:
        # F divides by input.numel() / C, and gives nan when the input is empty: C = 0 too.
        denom = _count_denominator(x3.shape[0] * x3.shape[2] if C else 0, x3, acc)
    else:
        denom = _reduction.mean_denominator(
            _index_denominator(t, weight, ignore_index, C, acc, unbatched=unbatched),
            split_terms)

    if reference_grads:
        # Gradients for the weight or the target, torch.func: autograd through the reference.
        loss_rows, lse = reference.ce_fwd(vocab_parallel.gather_classes(x3), t, weight, *args)
    elif vocab_parallel.class_sharded(x3):
        loss_rows, lse = vocab_parallel.ce_rows(x3, t, weight, *args, inplace_backward)
    else:
        ops = _eager.ops_for(x3.device)
        if _fused_path(x3, inplace_backward):
            fused = (x3, t, weight, *args, _grad_scale(reduction, denom, x3, acc))
            if reduction != "none" and not return_lse:
                return ops.reduced("ce_fwd_grad", (reduction, denom, out_shape, dtype),
                                   *fused)
            loss_rows, lse, _ = ops.ce_fwd_grad(*fused)
        else:
            loss_rows, lse = ops.ce_fwd(x3, t, weight, *args, inplace_backward)

    loss = _reduction.reduce(loss_rows, reduction, denom, out_shape, dtype)
    if return_lse:  # (float32 for float32 logits, whose lse the ops keep in float64)
        return loss, lse.reshape(out_shape).to(acc)
    return loss


def _smoothed_without_classes(result):
    """F's loss with label smoothing and no classes (C = 0, so every target is ignored):
    it scales the masked smoothing term by label_smoothing / C, 0 * inf, nan in every row
    and in every reduction; the loss's other term, and the gradient, are those without
    smoothing (an empty gradient)."""
    if isinstance(result, tuple):
        return (result[0] + math.nan, *result[1:])
    return result + math.nan


# ---- softmax focal loss -------------------------------------------------------------------


@dispatches_torch_function(2)
@vocab_parallel.eager_under_compile_when(vocab_parallel.input_class_sharded)
def focal_loss(
    input: Tensor,
    target: Tensor,
    gamma: float = 2.0,
    alpha: float | Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Softmax focal loss ``-alpha_t * (1 - p_t)**gamma * log p_t`` over C classes.

    ``input`` is shaped like ``F.cross_entropy``'s, ``target`` holds class indices.
    ``alpha`` is None, a number (a 0-dim tensor too, which may require grad), or a per-class
    tensor indexed by the target. ``mean`` divides by the number of non-ignored targets.
    With ``gamma=0`` and ``alpha=None`` it equals ``cross_entropy`` exactly, in value and
    gradient; values and gradients stay finite at saturated logits for every ``gamma >= 0``.
    """
    # The commonest call on plain CPU tensors in one C++ call, as in cross_entropy.
    if not torch.compiler.is_compiling() and forward_ad._current_level < 0:
        loss = _eager.fast_focal_loss(input, target, gamma, alpha, ignore_index, reduction)
        if loss is not None:
            return loss
    _check_reduction(reduction)
    _check_logits(input)
    _check_tensor(target, "target")
    _check_device(input, target, "target")
    gamma = _check_number(gamma, "gamma", 0.0)
    ignore_index = _check_ignore_index(ignore_index)
    x3, out_shape = _rows_view(input)
    if target.is_floating_point():
        raise TypeError(
            f"focal_loss takes class-index targets (int64, int32 or uint8), got {target.dtype}"
        )
    _check_index_target(input, target, out_shape)
    t = _reshaped(target, (x3.shape[0], x3.shape[2]))
    if vocab_parallel.is_dtensor(t):
        vocab_parallel.check_targets(t, x3.shape[1], ignore_index)
    alpha_vec, alpha_scale = None, 1.0
    if isinstance(alpha, Tensor) and alpha.dim() == 0 and (
            carries_derivative(alpha) or (recording() and alpha.is_floating_point())):
        # A number to learn: the per-class path's grad. In traced code too, which cannot
        # read it as a number (torch.compile broke the graph there, fullgraph=True failed).
        if type(alpha) is Tensor and not recording() and \
                not torch._C._functorch.is_functorch_wrapped_tensor(alpha):
            # (a CPU scalar goes with the logits, as PyTorch takes CPU scalars beside other
            # devices' tensors, and is checked as a number alpha is; another device's is
            # not read: that would wait for the device)
            if alpha.device.type != "cpu":
                _check_device(input, alpha, "alpha")
            else:
                _check_number(alpha.detach(), "alpha")
        alpha = alpha.to(input.device).expand(x3.shape[1])
    if isinstance(alpha, Tensor) and alpha.dim() > 0:
        _check_class_vector(input, alpha, "alpha")
        alpha_vec = alpha
    elif alpha is not None:
        alpha_scale = _check_number(alpha, "alpha")

    dtype = torch.float32 if _autocast_to_float32(input.dtype, input.device) else input.dtype
    args = (alpha_scale, gamma, ignore_index)
    reference_grads = _may_want_grad(alpha_vec) or transform_active(input, alpha_vec)
    if not reference_grads:
        loss = _fused_reduced_loss(_eager.FOCAL, reduction, False, x3, t, alpha_vec, args,
                                   dtype, out_shape, input)
        if loss is not None:
            return loss

    acc = reference.acc_dtype(x3.dtype)
    denom = _reduction.counted(t, ignore_index).sum().to(acc) if reduction == "mean" else None
    if reference_grads:
        loss_rows, _ = reference.focal_fwd(vocab_parallel.gather_classes(x3), t, alpha_vec,
                                           *args)
    elif vocab_parallel.class_sharded(x3):
        loss_rows, _ = vocab_parallel.focal_rows(x3, t, alpha_vec, *args)
    else:
        ops = _eager.ops_for(x3.device)
        if _fused_path(x3):
            fused = (x3, t, alpha_vec, *args, _grad_scale(reduction, denom, x3, acc))
            if reduction != "none":
                return ops.reduced("focal_fwd_grad", (reduction, denom, out_shape, dtype), *fused)
            loss_rows, _, _ = ops.focal_fwd_grad(*fused)
        else:
            loss_rows, _ = ops.focal_fwd(x3, t, alpha_vec, *args)
    return _reduction.reduce(loss_rows, reduction, denom, out_shape, dtype)


# ---- sigmoid focal loss -------------------------------------------------------------------


def _memory_order(x: Tensor) -> list[int] | None:
    """x's dims from outermost to innermost in memory where that is not their own order
    (channels_last, a transpose): the kernels then walk x as it lies, without a contiguous
    copy, and the gradient keeps its layout, as PyTorch's elementwise ops do (the order
    TensorIterator gives an elementwise op of x alone, e.g. for an expanded x). None for a
    contiguous x, a DTensor, or code being traced (whose layouts are decided there)."""
    if x.dim() < 2 or recording() or vocab_parallel.is_dtensor(x) or x.is_contiguous():
        return None
    order = compute_elementwise_output_logical_to_physical_perm(x)
    if isinstance(order, tuple):  # (torch 2.5 and later: the order and a flag)
        order = order[0]
    return None if list(order) == sorted(order) else list(order)


_inverse, _with_layout = reference.inverse_order, reference.with_layout


@dispatches_torch_function(2)
def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> Tensor:
    """``torchvision.ops.sigmoid_focal_loss``, fused: the same arguments, values and
    gradients (``alpha < 0`` disables the alpha term), without importing torchvision.
    Arguments torchvision's formula computes with anyway are refused: ``gamma`` must be
    finite and at least 0, ``alpha`` a finite real number, not a bool."""
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"Invalid Value for arg 'reduction': '{reduction} \n Supported reduction modes: "
            "'none', 'mean', 'sum'"
        )
    _check_tensor(inputs, "inputs")
    _check_tensor(targets, "targets")
    if inputs.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"inputs must be float32, float64, bfloat16 or float16, got {inputs.dtype}"
        )
    if not targets.is_floating_point():
        raise TypeError(f"targets must be a floating-point tensor, got {targets.dtype}")
    _check_device(inputs, targets, "targets")
    if targets.shape != inputs.shape:
        raise ValueError(
            f"Target size ({targets.shape}) must be the same as input size ({inputs.shape})"
        )
    alpha = _check_number(alpha, "alpha")
    gamma = _check_number(gamma, "gamma", 0.0)

    dtype = torch.promote_types(inputs.dtype, targets.dtype)
    if _autocast_to_float32(dtype, inputs.device):
        # torchvision's formula runs binary_cross_entropy_with_logits, on autocast's float32
        # list: the loss is float32. Reductions stay in the input dtype (the kernel sums in
        # float32); the elementwise loss is computed in float32 to be returned as such.
        dtype = torch.float32 if reduction == "none" else dtype
        out_dtype = torch.float32
    else:
        out_dtype = dtype
    x, t = inputs.to(dtype), targets.to(dtype)
    # Gradients for the target, torch.func: autograd through the reference code; so too
    # under torch.jit.trace (_may_want_grad), where the mean below divides by a traced size
    # (the kernels' reduction takes the element count as a number, which a trace would freeze).
    transformed = transform_active(x, t)
    use_reference = _may_want_grad(t) or transformed
    order = None if use_reference else _memory_order(x)
    # torchvision's unreduced loss has the layout its BCE's `1 - targets` gives (an
    # elementwise op of the targets alone: TensorIterator's order of their strides, that of
    # the targets as given, also where they are converted here), and so has the targets'
    # gradient; the input's gradient has the input's (`order`)
    laid_out = _memory_order(targets) if reduction == "none" or use_reference else None
    if order is not None:
        x, t = x.permute(order), t.permute(order)
    # autograd through the formula, laid out as torchvision's (not where traced or
    # transformed code, or DTensor's rules, decide the layouts)
    autograd_laid_out = use_reference and not (
        transformed or recording() or vocab_parallel.is_dtensor(x))
    if reduction == "none" or x.numel() == 0 or use_reference:
        if autograd_laid_out:
            t = t if t is targets else _with_layout(t, laid_out)  # (converted: laid out)
            loss = reference.sigmoid_focal_fwd_laid_out(x, t, alpha, gamma, laid_out)
        else:
            fwd = reference.sigmoid_focal_fwd if use_reference else (
                _eager.ops_for(x.device).sigmoid_focal_fwd)
            loss = fwd(x, t, alpha, gamma)
        if order is not None:
            loss = loss.permute(_inverse(order))
        if reduction == "none" and not use_reference:
            loss = _with_layout(loss, laid_out)
        if reduction != "none" and autograd_laid_out:
            # the targets' gradient laid out as behind torchvision's sum() / mean()
            loss = _reduction.ordered_total(loss, reduction == "mean")
        elif reduction == "mean":
            # (nan for an empty input, as mean() gives)
            loss = _reduction.ordered_sum(loss) / loss.numel()
        elif reduction == "sum":
            loss = _reduction.ordered_sum(loss)
        return loss.to(out_dtype)
    # Reduced in the kernel, in the accumulation dtype: no elementwise loss tensor; eager
    # training also gets the gradient from the same pass (the inputs are read once).
    ops = _eager.ops_for(x.device)
    # (the count as an int: torch.compile keeps it symbolic, where a float made of it
    # would recompile for every input size)
    divisor = x.numel() if reduction == "mean" else 1
    if _fused_path(x, compiled=True):
        loss, _ = ops.sigmoid_focal_sum_grad(x, t, alpha, gamma, divisor)
    else:
        loss = ops.sigmoid_focal_sum(x, t, alpha, gamma, divisor)
    return loss.to(out_dtype)
