"""Fake kernels and autograd formulas for every op, in both op namespaces.

`torchloss_fused::*` ops come from the compiled extension (csrc/ops.cpp). The same ops are
defined here in the `torchloss_fused_ref` namespace on top of `reference.py`, so the
pure-PyTorch fallback goes through exactly the same dispatcher, fake-tensor and autograd
machinery (torch.compile, opcheck) as the kernels. Their schemas must match ops.cpp; a
test compares the two.
"""

from __future__ import annotations

import functools

import torch

from . import _backend, _reduction, _sharding, reference, vocab_parallel
from ._higher_order import differentiable_grads, reference_backward
from ._schemas import SCHEMAS
from ._tracing import recording

REF_NAMESPACE = "torchloss_fused_ref"


_REFERENCE_IMPLS = {
    "ce_fwd": reference.ce_fwd,
    "_ce_bwd": reference.ce_bwd,
    "_ce_bwd_inplace": reference.ce_bwd_inplace,
    "focal_fwd": reference.focal_fwd,
    "_focal_bwd": reference.focal_bwd,
    "ce_fwd_grad": reference.ce_fwd_grad,
    "focal_fwd_grad": reference.focal_fwd_grad,
    "_rescale_grad_rows": reference.rescale_grad_rows,
    "sigmoid_focal_fwd": reference.sigmoid_focal_fwd,
    "_sigmoid_focal_bwd": reference.sigmoid_focal_bwd,
    "sigmoid_focal_sum": reference.sigmoid_focal_sum,
    "sigmoid_focal_sum_grad": reference.sigmoid_focal_sum_grad,
    "_accumulate_": reference.accumulate_,
}

_MUTATED = {"_ce_bwd_inplace": ("input",), "_rescale_grad_rows": ("grad",),
            "_accumulate_": ("acc",)}


def _define_reference_ops() -> None:
    for name, schema in SCHEMAS.items():
        torch.library.custom_op(
            f"{REF_NAMESPACE}::{name}",
            _REFERENCE_IMPLS[name],
            mutates_args=_MUTATED.get(name, ()),
            schema=schema,
        )


# ---- fake kernels (shapes, dtypes, strides of the real outputs) ------------------------


def _per_row(input: torch.Tensor, lse: bool = False) -> torch.Tensor:
    B, _, D = input.shape
    dtype = reference.LSE_DTYPE if lse else reference.acc_dtype(input.dtype)
    return input.new_empty((B, D), dtype=dtype)


def _grad_like(input: torch.Tensor) -> torch.Tensor:
    return input.new_empty(input.shape)  # contiguous, as the kernels allocate it


def _fake_fwd(input, *args, **kwargs):
    return _per_row(input), _per_row(input, lse=True)


def _fake_fwd_grad(input, *args, **kwargs):
    return _per_row(input), _per_row(input, lse=True), _grad_like(input)


def _fake_bwd(grad_loss, grad_lse, input, *args):
    return _grad_like(input)


def _fake_focal_bwd(grad_loss, input, *args):
    return _grad_like(input)


def _fake_mutating(*args):
    return None


def _fake_sigmoid_fwd(input, target, alpha, gamma):
    return input.new_empty(input.shape)


def _fake_sigmoid_bwd(grad_loss, input, target, alpha, gamma):
    return input.new_empty(input.shape)


def _fake_sigmoid_sum(input, *args):
    return input.new_empty((), dtype=reference.acc_dtype(input.dtype))


def _fake_sigmoid_sum_grad(input, *args):
    return _fake_sigmoid_sum(input), _grad_like(input)


_FAKES = {
    "ce_fwd": _fake_fwd,
    "_ce_bwd": _fake_bwd,
    "_ce_bwd_inplace": _fake_mutating,
    "focal_fwd": _fake_fwd,
    "_focal_bwd": _fake_focal_bwd,
    "ce_fwd_grad": _fake_fwd_grad,
    "focal_fwd_grad": _fake_fwd_grad,
    "_rescale_grad_rows": _fake_mutating,
    "sigmoid_focal_fwd": _fake_sigmoid_fwd,
    "_sigmoid_focal_bwd": _fake_sigmoid_bwd,
    "sigmoid_focal_sum": _fake_sigmoid_sum,
    "sigmoid_focal_sum_grad": _fake_sigmoid_sum_grad,
    "_accumulate_": _fake_mutating,
}


# ---- autograd -----------------------------------------------------------------------------


def _ns(namespace: str):
    return getattr(torch.ops, namespace)


def _zeros_if_none(grad, lse, input):
    """grad_loss, or zeros like lse in the accumulation dtype of `input`."""
    if grad is not None:
        return grad
    return torch.zeros_like(lse, dtype=reference.acc_dtype(input.dtype))


# Each loss's reference forward, from a backward's ctx (the plain and the fused op save the
# input first, the same tensors after it, and the same scalar arguments).
def _ce_reference(x, ctx):
    _, target, weight, _ = ctx.saved_tensors
    return reference.ce_fwd(x, target, weight, *ctx.args)


def _focal_reference(x, ctx):
    _, target, alpha, _ = ctx.saved_tensors
    return reference.focal_fwd(x, target, alpha, *ctx.args)


def _sigmoid_reference(x, ctx):
    return (reference.sigmoid_focal_fwd(x, ctx.saved_tensors[1], *ctx.args),)


def _sigmoid_sum_reference(x, ctx):
    return (reference.sigmoid_focal_sum(x, ctx.saved_tensors[1], *ctx.args),)


def _graph_grad(ctx, reference_forward, *grad_outputs):
    """The input's gradient recorded by autograd through the loss's reference forward:
    differentiable again, and batchable by vmap (see reference_backward)."""
    return differentiable_grads(lambda x: reference_forward(x, ctx), ctx.saved_tensors[:1],
                                (True,), grad_outputs)[0]


def _make_ce_autograd(namespace: str):
    def setup_context(ctx, inputs, output):
        input, target, weight, *args, inplace = inputs
        ctx.save_for_backward(input, target, weight, output[1])
        ctx.args = tuple(args)
        ctx.inplace = inplace
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss, grad_lse):
        input, target, weight, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (grad_loss is None and grad_lse is None):
            return (None,) * 9
        if reference_backward(grad_loss, grad_lse):  # (out of place even when inplace)
            return (_graph_grad(ctx, _ce_reference, grad_loss, grad_lse),) + (None,) * 8
        grad_loss = _zeros_if_none(grad_loss, lse, input)
        ops = _ns(namespace)
        # Not when traced (torch.compile, AOTAutograd, make_fx: _tracing.py): a compiled
        # backward has no version counters, so a later backward that saved the same logits
        # (an auxiliary loss on them) would read the gradient silently where eager raises;
        # and AOTAutograd cannot partition a graph that also returns the logits. Traced,
        # the gradient gets a buffer of its own.
        if ctx.inplace and not recording():
            ops._ce_bwd_inplace(grad_loss, grad_lse, input, target, weight, lse, *ctx.args)
            if namespace != REF_NAMESPACE:
                # Ops from TORCH_LIBRARY do not bump version counters themselves (custom_op
                # ops do). Bumping makes a later backward that saved these logits fail
                # loudly instead of reading gradients.
                torch.autograd.graph.increment_version(input)
            grad = input
        else:
            grad = ops._ce_bwd(grad_loss, grad_lse, input, target, weight, lse, *ctx.args)
        return (grad,) + (None,) * 8

    return backward, setup_context


def _save_fused(ctx, grad: torch.Tensor, grad_scale: torch.Tensor,
                ignored: tuple = (), read: tuple = ()) -> None:
    # Kept outside save_for_backward: backward rescales the buffer in place and hands it
    # on (a detached alias, so no reference cycle through the output's grad_fn).
    # `ignored`: (class-index target, ignore_index), for _fused_backward's ignored rows; a
    # plain attribute too, since unpacking saved tensors makes a checkpointed loss
    # recompute its forward, which the buffer spares it. `read`: the other arguments the
    # gradient was made from (weight or alpha, a float target), whose versions
    # check_ignored_unchanged compares, as unpacking them would.
    ctx.fused_grad = grad.detach()
    ctx.grad_scale = grad_scale
    keep_ignored(ctx, ignored)
    ctx.read_versions = tuple((t, saved_version(t)) for t in read
                              if t is not None and t.is_floating_point())
    ctx.set_materialize_grads(False)


def keep_ignored(ctx, ignored: tuple) -> None:
    """ctx.ignored (_index_target's), and its target's version for check_ignored_unchanged."""
    ctx.ignored = ignored
    ctx.ignored_version = saved_version(ignored[0]) if ignored else None


def saved_version(tensor: torch.Tensor) -> int:
    """The version of a tensor the backward may read, kept outside the saved tensors: an
    inference tensor has none, and autograd refuses to save one: its error, as F gives it
    for the same target or weight (the version's own error names no cause)."""
    if not torch.compiler.is_compiling() and tensor.is_inference():
        raise RuntimeError(
            "Inference tensors cannot be saved for backward. Please do not use Tensors "
            "created in inference mode in computation tracked by autograd. To work around "
            "this, you can make a clone to get a normal tensor and use it in autograd, or "
            "use `torch.no_grad()` instead of `torch.inference_mode()`. (Here: a "
            "torchloss_fused loss's target, weight or alpha.)")
    return tensor._version


def check_ignored_unchanged(ctx) -> None:
    """The version check autograd makes of a saved tensor, for the target kept in
    ctx.ignored (a plain attribute: see _save_fused): a target written in place between
    forward and backward raises, as F's does, instead of the rescale reading its new
    ignored rows (their gradients would be those made for another upstream gradient).
    Likewise the weight (alpha) and a float target (ctx.read_versions), which the backward
    does not unpack unless it recomputes: written in place, they had raised only on such
    steps (a wrong upstream guess, a second backward), so whether training crashed
    depended on the history of loss scales; F's saved ones raise at every backward."""
    if torch.compiler.is_compiling():
        return
    if ctx.ignored:
        check_version(ctx.ignored[0], ctx.ignored_version,
                      "the class-index target of a torchloss_fused loss")
    for tensor, version in ctx.read_versions:
        check_version(tensor, version,
                      "the weight, alpha or float target of a torchloss_fused loss")


def check_version(tensor: torch.Tensor, version: int, what: str, why: str = "") -> None:
    """Autograd's check of a saved tensor, for one kept outside the saved tensors with its
    version at the forward: its error, naming `what` (and `why`, if given)."""
    if tensor._version != version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an "
            f"inplace operation: [{tensor.type()} {list(tensor.shape)}] ({what}) is at "
            f"version {tensor._version}; expected version {version} instead.{why}")


def _index_target(target: torch.Tensor, ignore_index: int) -> tuple:
    """_save_fused's `ignored` for a fused op's target: () for a probability target."""
    return () if target.is_floating_point() else (target, ignore_index)


def _fused_backward(ctx, namespace, grad_loss, grad_lse, redo_forward, recompute,
                    as_rows=None, reference_forward=None):
    """Backward of a *_fwd_grad op: the forward computed the gradient for an expected
    grad_loss (grad_scale); rows that received another grad_loss are rescaled in place.

    The buffer is handed on once. A second backward through the same graph
    (retain_graph=True) runs the fused forward again (`redo_forward`) and the same rescale,
    so it repeats the first bitwise; a backward that also carries a gradient for lse
    computes it with the separate backward op (`recompute`). `as_rows` maps (grad,
    grad_loss, grad_scale) to the (B, C, D), (B, D), (B, D) views the rescale works on,
    when the op's outputs are not already shaped so. With create_graph=True or batched
    gradients, it comes from autograd through `reference_forward` (see _graph_grad).
    Rows whose target is ignore_index (ctx.ignored, _save_fused's) keep a zero gradient
    whatever their grad_loss, as F's do: a nan or infinite one (a sum divided by a count
    of 0) would make the rescale's 0 * f nan."""
    if not ctx.needs_input_grad[0] or (grad_loss is None and grad_lse is None):
        return None
    check_ignored_unchanged(ctx)
    if reference_backward(grad_loss, grad_lse):
        ctx.fused_grad = None
        return _graph_grad(ctx, reference_forward, grad_loss, grad_lse)
    if grad_lse is not None:
        return recompute(grad_loss, grad_lse)
    grad, ctx.fused_grad = ctx.fused_grad, None
    if grad is None:
        grad = redo_forward(ctx.grad_scale)
    if ctx.ignored:  # (such rows get the upstream they were made for: left as they are)
        target, ignore_index = ctx.ignored
        grad_loss = torch.where(_reduction.counted(target, ignore_index), grad_loss,
                                ctx.grad_scale)
    if as_rows is None and _rescale_dtensor(namespace, grad, grad_loss, ctx.grad_scale):
        return grad
    rows, g, scale = (as_rows or (lambda *views: views))(grad, grad_loss, ctx.grad_scale)
    if torch.compiler.is_compiling() or type(grad) is not torch.Tensor:
        # Traced graphs (fake/functional tensors) must not mutate a saved forward output:
        # scale out of place. (functional.py does not pick the fused ops under
        # torch.compile; this keeps direct calls of them correct there.)
        # (== rather than !=: DTensor of torch <= 2.11 has no rule for aten.ne.Tensor.
        # Rows made for a non-finite scale stay as made, as _rescale_grad_rows leaves them.)
        factor = torch.where((g == scale) | ~scale.isfinite(), 1.0, g / scale)
        return (rows * factor.unsqueeze(1)).to(grad.dtype).view(grad.shape)
    _ns(namespace)._rescale_grad_rows(rows, g, scale)
    return grad


def _rescale_dtensor(namespace, grad, grad_loss, grad_scale) -> bool:
    """A DTensor gradient whose rows are split (or replicated) as the sharding rules lay
    them out: rescaled in place on each rank's own rows, as a plain tensor is, instead of
    copied whole by the out-of-place scaling below. False where that does not apply."""
    if torch.compiler.is_compiling() or not vocab_parallel.is_dtensor(grad):
        return False
    if not all(p.is_replicate() or (type(p) is vocab_parallel.Shard and p.dim in (0, 2))
               for p in grad.placements):
        return False
    rows = vocab_parallel.rows_placements(grad.placements)

    def local(t):
        return t.redistribute(grad.device_mesh, rows).to_local()

    _ns(namespace)._rescale_grad_rows(grad.to_local(), local(grad_loss), local(grad_scale))
    return True


def _make_ce_fwd_grad_autograd(namespace: str):
    def setup_context(ctx, inputs, output):
        input, target, weight, *args, grad_scale = inputs
        ctx.save_for_backward(input, target, weight, output[1])
        ctx.args = tuple(args)
        _save_fused(ctx, output[2], grad_scale, _index_target(target, args[0]),
                    (target, weight))

    def backward(ctx, grad_loss, grad_lse, _unused):
        def redo_forward(grad_scale):
            input, target, weight, _ = ctx.saved_tensors
            return _ns(namespace).ce_fwd_grad(input, target, weight, *ctx.args, grad_scale)[2]

        def recompute(g, g_lse):
            input, target, weight, lse = ctx.saved_tensors
            g = _zeros_if_none(g, lse, input)
            return _ns(namespace)._ce_bwd(g, g_lse, input, target, weight, lse, *ctx.args)

        grad = _fused_backward(ctx, namespace, grad_loss, grad_lse, redo_forward, recompute,
                               reference_forward=_ce_reference)
        return (grad,) + (None,) * 8

    return backward, setup_context


def _make_focal_autograd(namespace: str):
    def setup_context(ctx, inputs, output):
        input, target, alpha, *args = inputs
        ctx.save_for_backward(input, target, alpha, output[1])
        ctx.args = tuple(args)
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss, grad_lse):
        input, target, alpha, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or grad_loss is None:
            return (None,) * 6
        if reference_backward(grad_loss):
            return (_graph_grad(ctx, _focal_reference, grad_loss),) + (None,) * 5
        grad = _ns(namespace)._focal_bwd(grad_loss, input, target, alpha, lse, *ctx.args)
        return (grad,) + (None,) * 5

    return backward, setup_context


def _make_focal_fwd_grad_autograd(namespace: str):
    def setup_context(ctx, inputs, output):
        input, target, alpha, *args, grad_scale = inputs
        ctx.save_for_backward(input, target, alpha, output[1])
        ctx.args = tuple(args)
        _save_fused(ctx, output[2], grad_scale, _index_target(target, args[2]), (alpha,))

    def backward(ctx, grad_loss, grad_lse, _unused):
        # focal_loss does not expose lse: a gradient for it can only be zero, and is ignored.
        def redo_forward(grad_scale):
            input, target, alpha, _ = ctx.saved_tensors
            return _ns(namespace).focal_fwd_grad(input, target, alpha, *ctx.args, grad_scale)[2]

        if grad_loss is None:
            return (None,) * 7
        grad = _fused_backward(ctx, namespace, grad_loss, None, redo_forward, None,
                               reference_forward=_focal_reference)
        return (grad,) + (None,) * 6

    return backward, setup_context


def _make_sigmoid_autograd(namespace: str):
    def setup_context(ctx, inputs, output):
        input, target, alpha, gamma = inputs
        ctx.save_for_backward(input, target)
        ctx.args = (alpha, gamma)

    def backward(ctx, grad_loss):
        input, target = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 4
        if reference_backward(grad_loss):
            return _graph_grad(ctx, _sigmoid_reference, grad_loss), None, None, None
        grad = _ns(namespace)._sigmoid_focal_bwd(grad_loss, input, target, *ctx.args)
        return grad, None, None, None

    return backward, setup_context


def _elementwise_as_rows(grad, grad_loss, grad_scale):
    """A contiguous elementwise gradient as (rows, C, 1), with one scalar grad_loss and
    grad_scale broadcast to every row: rows of 4096 when they divide it, so a GPU
    rescale has many rows to spread over."""
    n = grad.numel()
    if isinstance(n, torch.SymInt) and not vocab_parallel.is_dtensor(grad):
        # (traced with symbolic sizes, scaled out of place: any rows do, and one element
        # per row divides by no size that may be 0 when the graph runs)
        c = 1
    else:
        c = 4096 if n % 4096 == 0 else (grad.shape[-1] if grad.dim() and n else 1)
    rows = grad.view(n // c, c, 1)
    return (rows, grad_loss.reshape(1, 1).expand(n // c, 1),
            grad_scale.reshape(1, 1).expand(n // c, 1))


def _make_sigmoid_sum_autograd(namespace: str):
    def setup_context(ctx, inputs, output):
        input, target, *args = inputs
        ctx.save_for_backward(input, target)
        ctx.args = tuple(args)

    def backward(ctx, grad_loss):
        input, target = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 5
        if reference_backward(grad_loss):
            return _graph_grad(ctx, _sigmoid_sum_reference, grad_loss), None, None, None, None
        alpha, gamma, divisor = ctx.args
        g = (grad_loss * reference.reciprocal(divisor)).to(input.dtype).expand(input.shape)
        grad = _ns(namespace)._sigmoid_focal_bwd(g, input, target, alpha, gamma)
        return grad, None, None, None, None

    return backward, setup_context


def _make_sigmoid_sum_grad_autograd(namespace: str):
    def setup_context(ctx, inputs, output):
        input, target, *args = inputs
        ctx.save_for_backward(input, target)
        ctx.args = tuple(args)
        # The buffer is d(output)/dx itself: backward rescales it by grad_loss unless 1.
        _save_fused(ctx, output[1], torch.ones_like(output[0]), read=(target,))

    def backward(ctx, grad_loss, _unused):
        def redo_forward(_):
            input, target = ctx.saved_tensors
            return _ns(namespace).sigmoid_focal_sum_grad(input, target, *ctx.args)[1]

        if grad_loss is None:
            return (None,) * 5
        grad = _fused_backward(ctx, namespace, grad_loss, None, redo_forward, None,
                               as_rows=_elementwise_as_rows,
                               reference_forward=_sigmoid_sum_reference)
        return (grad,) + (None,) * 4

    return backward, setup_context


_AUTOGRAD = {
    "ce_fwd": _make_ce_autograd,
    "ce_fwd_grad": _make_ce_fwd_grad_autograd,
    "focal_fwd": _make_focal_autograd,
    "focal_fwd_grad": _make_focal_fwd_grad_autograd,
    "sigmoid_focal_fwd": _make_sigmoid_autograd,
    "sigmoid_focal_sum": _make_sigmoid_sum_autograd,
    "sigmoid_focal_sum_grad": _make_sigmoid_sum_grad_autograd,
}


def one_device(qualname: str, fake):
    """`fake` (a fake kernel), first checking that every tensor argument is on one device.
    A meta-device argument beside tensors on a real device sends the call to the fake
    kernel rather than to that device's (the dispatcher picks Meta): the kernels' own
    device checks never run, and out-of-place ops returned uninitialised memory while
    in-place ones did nothing."""
    @functools.wraps(fake)
    def checked(*args, **kwargs):
        devices = {a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
        if len(devices) > 1:
            raise RuntimeError(f"{qualname}: expected all tensors on one device, got "
                               f"{', '.join(sorted(map(str, devices)))}")
        return fake(*args, **kwargs)

    return checked


def _register(namespace: str) -> None:
    for name, fake in _FAKES.items():
        qualname = f"{namespace}::{name}"
        torch.library.register_fake(qualname, one_device(qualname, fake))
    for name, make in _AUTOGRAD.items():
        backward, setup_context = make(namespace)
        torch.library.register_autograd(
            f"{namespace}::{name}", backward, setup_context=setup_context
        )


_define_reference_ops()
_register(REF_NAMESPACE)
if _backend.EXTENSION_LOADED:
    _register("torchloss_fused")

_sharding.register(REF_NAMESPACE)
if _backend.EXTENSION_LOADED:
    _sharding.register("torchloss_fused")
