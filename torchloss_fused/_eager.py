"""Eager calls of the loss ops without torch.library's Python autograd wrapper.

A custom op whose autograd formula is registered with torch.library runs, on every eager
call, a Python wrapper around its kernel (even when no gradient is wanted), and again
around its backward. For a small loss that wrapper is a large part of the whole call's
time. Here, for plain tensors in eager mode, the same formulas (_ops.py's setup_context
and backward, unchanged) run in a torch.autograd.Function of our own, and calls that want
no gradient go straight to the kernel below the autograd key: the same arithmetic, the
same saved tensors, the same graph node behaviour, less Python.

The fused forward+gradient ops also have a reduced call, for losses reduced to a "sum" or
a "mean": one autograd node runs the op and the reduction, and its backward turns the
loss's gradient into the per-row one exactly as autograd's reduction nodes would
(_reduction.rows_grad) before the op's own formula: one node where there were up to four
(the op's, the sum's, the mean's division and a cast), about 10% of a small loss's
forward+backward time on CPU.

With the compiled extension, cross_entropy and focal_loss (reduced to a "sum" or a "mean",
or not reduced) go further (FusedReduced below): the mean's denominator, the op and the
reduction (or reshape) are one C++ call (csrc/reduced_loss.h), and so is the backward's
rescale: the same ATen ops in the same order, without a Python binding around each, for
about half a small loss's time. On CPU the forward may also write the gradient for the
upstream gradient its backward is likely to get, so that rescale has nothing to do
(_upstream_guess.py).

Everything else keeps the registered op: torch.compile (it traces the op and its
registered formulas), tensor subclasses such as DTensor (their dispatch rules see the
op), and torch.func's wrapped tensors (functional.py routes transforms to the reference
code anyway).
"""

from __future__ import annotations

import weakref
from types import SimpleNamespace

import torch

from . import _backend, _ops, _reduction, _upstream_guess
from ._higher_order import reference_backward
from ._tracing import recording
from ._upstream_guess import GUESSES

_any_requires_grad = getattr(
    torch._C, "_any_requires_grad",
    lambda *args: any(isinstance(a, torch.Tensor) and a.requires_grad for a in args))
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def traced() -> bool:
    """torch.compile, torch.jit.trace or make_fx at work (_tracing.py): they must see the
    registered ops. A tracer would record this module's autograd.Functions as opaque
    Python calls, and the C++ reduced loss (FusedReduced) computes its mean's denominator
    on the host, which a trace would keep as a constant: a model traced with no ignored
    target would divide by the full count ever after."""
    return recording()


def _op_forward(op, setup_context):
    # setup_context is called from forward, as torch.library's wrapper calls it: a
    # Function that defines setup_context itself binds its arguments with inspect on
    # every call, which costs more than the wrapper it replaces.
    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            output = op(*args)
        setup_context(ctx, args, output)
        return output

    return forward


def _function(name: str, forward, backward):
    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(backward),
    })


def _eager_function(op, name: str, backward, setup_context):
    return _function(f"{name}_eager", _op_forward(op, setup_context), backward)


def _eager_reduced_function(op, name: str, backward, setup_context):
    op_forward = _op_forward(op, setup_context)

    # The last forward argument is the reduction (kind, denominator, loss shape and dtype:
    # _reduction.reduce's arguments after the rows); the op's
    # formulas see its own arguments, as in _eager_function.
    def forward(ctx, *args):
        *args, spec = args
        reduction, denom = spec[:2]
        output = op_forward(ctx, *args)
        ctx.reduction = (reduction, denom, output[0].shape, output[0].dtype)
        return _reduction.reduce(output[0], *spec)

    def reduced_backward(ctx, grad):
        # (grad is None where autograd passes an undefined gradient: the op's formula
        # takes None for "no gradient" as well)
        return (*_rows_backward(backward, ctx, grad), None)

    return _function(f"{name}_reduced_eager", forward, reduced_backward)


def _eager_path(args, n_args: int) -> bool:
    x = args[0]
    return not (traced() or len(args) != n_args
                or type(x) is not torch.Tensor or _wrapped(x))


def eager_call(op, name: str, backward, setup_context):
    """`op` (an OpOverload whose autograd formula is `backward` and `setup_context`, as
    registered with torch.library) as a call that runs that formula in an autograd.Function
    of its own for plain tensors in eager mode, and the op itself otherwise."""
    n_args = len(op._schema.arguments)
    function = _eager_function(op, name, backward, setup_context)

    def call(*args):
        if not _eager_path(args, n_args):
            return op(*args)
        if torch.is_grad_enabled() and _any_requires_grad(*args):
            return function.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    call.__name__ = name
    return call


def _eager_call(namespace: str, name: str):
    op = getattr(getattr(torch.ops, namespace), name).default
    return eager_call(op, name, *_ops._AUTOGRAD[name](namespace))


def _reduced_call(namespace: str, name: str, plain_call):
    """call(reduction, *args): the loss, reduce(op(*args)[0], *reduction), in one autograd
    node where _eager_call would make one for the op; plain_call and a separate reduction
    otherwise."""
    op = getattr(getattr(torch.ops, namespace), name).default
    n_args = len(op._schema.arguments)
    function = _eager_reduced_function(op, name, *_ops._AUTOGRAD[name](namespace))

    def call(reduction, *args):
        if (reduction[0] != "none" and _eager_path(args, n_args) and torch.is_grad_enabled()
                and _any_requires_grad(*args)):
            return function.apply(*args, reduction)
        return _reduction.reduce(plain_call(*args)[0], *reduction)

    return call


# The fused forward+gradient ops whose first output is the per-row loss.
_REDUCIBLE = ("ce_fwd_grad", "focal_fwd_grad")

_REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2}
_REDUCTION_NAMES = tuple(_REDUCTION_CODES)

# FusedReduced's kinds of loss (_C.reduced_loss's codes), and the fused op of each.
CE_INDEX, CE_PROB, FOCAL = 0, 1, 2
_KIND_OPS = ("ce_fwd_grad", "ce_fwd_grad", "focal_fwd_grad")


def _rows_backward(backward, ctx, grad):
    """A reduced call's backward through the op's own formula: the loss's gradient made
    the rows' as autograd's reduction nodes make it (_reduction.rows_grad), then
    `backward`'s gradients for the op's arguments."""
    rows = None if grad is None else _reduction.rows_grad(grad, *ctx.reduction)
    return backward(ctx, rows, None, None)


def _plain(*tensors) -> bool:
    return all(t is None or type(t) is torch.Tensor for t in tensors)


def _watch(x: torch.Tensor) -> tuple:
    """What _changed needs of the logits x: weak references to x and to its base, and its
    version. Views and their base share one version counter, and a live view keeps its
    base alive: the base answers while any view of the caller's logits lives, also where
    saved-tensor hooks hold a new alias of the row view x, which then dies (a pack hook
    `lambda t: t.detach()`)."""
    base = x._base
    return (weakref.ref(x), None if base is None else weakref.ref(base), x._version)


def _changed(logits: tuple) -> bool:
    """Whether the logits _watch kept were written in place since. (All gone: nothing can
    write them, and saved-tensor hooks hold them packed as they were.)"""
    *refs, version = logits
    for ref in refs:
        x = None if ref is None else ref()
        if x is not None:
            return x._version != version
    return False


class FusedReduced:
    """A fused op's loss, reduced ("sum", "mean") or not ("none"), the extension's C++ doing
    each way's tensor work in one call: `loss(...)` returns None where that does not apply
    (traced or transformed code, tensor subclasses), for the caller's general path."""

    def __init__(self, namespace: str, extension):
        self._c = extension
        self._functions = {name: self._function(name, *_ops._AUTOGRAD[name](namespace))
                           for name in _REDUCIBLE}
        self._backwards = {name: _ops._AUTOGRAD[name](namespace)[0] for name in _REDUCIBLE}
        # The C++ node (csrc/reduced_loss_node.h) serves CPU calls that keep no upstream
        # guess; its rare cases come back to node_backward. (Not under torch before 2.7,
        # whose compiled autograd refuses it: REDUCED_NODE is 0 there.)
        in_use = getattr(extension, "REDUCED_NODE", 0)
        self._node = getattr(extension, "reduced_loss_node", None) if in_use else None
        self._fast_ce = getattr(extension, "fast_cross_entropy", None) if in_use else None
        self._fast_focal = getattr(extension, "fast_focal_loss", None) if in_use else None
        if self._node is not None:
            extension.set_reduced_node_backward(self.node_backward)

    def cross_entropy(self, *args):
        """functional.cross_entropy(*args) for its commonest eager call, F's own with the
        defaults on (N, C) CPU logits, straight to the C++ node (csrc/reduced_loss_node.h:
        fast_cross_entropy, which checks the call); None for any other call."""
        fast = self._fast_ce
        return None if fast is None else fast(*args, _upstream_guess.MIN_ELEMENTS)

    def focal_loss(self, *args):
        """functional.focal_loss(*args) for its commonest eager call ((N, C) CPU logits, a
        number alpha or none) as cross_entropy above (fast_focal_loss); None otherwise."""
        fast = self._fast_focal
        return None if fast is None else fast(*args, _upstream_guess.MIN_ELEMENTS)

    def node_backward(self, kind: int, reduction: int, grad, saved, scalars: tuple,
                      grad_scale, denom, buffer, target, weight, target_version: int,
                      weight_version: int):
        """The C++ node's backward where it does not rescale its buffer itself: the
        Function's (reduced_backward's) formula path, from the same state, with a context
        rebuilt from what the node kept. saved: its unpacked saved tensors (input, target,
        weight, lse), None where the target or weight changed since the forward (this
        raises autograd's error for them)."""
        # (_ops._save_fused's: a class-index target's ignored rows; a float target and the
        # weight or alpha as read tensors)
        ignored = () if kind == CE_PROB else (target, scalars[2 if kind == FOCAL else 0])
        read = (((target, target_version),) if kind == CE_PROB else ()) + (
            () if weight is None else ((weight, weight_version),))
        ctx = SimpleNamespace(
            saved_tensors=saved, args=scalars, needs_input_grad=(True,), fused_grad=buffer,
            grad_scale=grad_scale, ignored=ignored, ignored_version=target_version,
            read_versions=read,
            reduction=(_REDUCTION_NAMES[reduction], denom, grad_scale.shape, grad_scale.dtype))
        _ops.check_ignored_unchanged(ctx)
        if saved is None:  # (the C++ node found a version changed that this did not)
            raise RuntimeError("torchloss_fused: a saved tensor changed; versions disagree")
        from .functional import _rows_view  # (functional imports this module)

        logits = saved[0]
        with torch.enable_grad():  # (the rows a view of the logits, as the Function's were)
            ctx.saved_tensors = (_rows_view(logits)[0], *saved[1:])
        grad = _rows_backward(self._backwards[_KIND_OPS[kind]], ctx, grad)[0]
        return None if grad is None else grad.reshape(logits.shape)

    def _function(self, name: str, backward, setup_context):
        c = self._c

        # Arguments: the op's input, target and weight (alpha), its scalars as a tuple, and
        # (kind, reduction, unbatched, dtype, out_shape) as _C.reduced_loss takes them.
        def forward(ctx, x, t, w, scalars, spec):
            kind, reduction, unbatched, dtype, out_shape = spec
            code = _REDUCTION_CODES[reduction]
            key = GUESSES.key(kind, code, x, dtype)
            guess = GUESSES.guess(key)
            loss, lse, grad, grad_scale, denom, post = c.reduced_loss(
                kind, code, True, unbatched, x, t, w, scalars, dtype, out_shape, guess)
            setup_context(ctx, (x, t, w, *scalars, grad_scale), (None, lse, grad))
            # (the rows' gradient in the loss rows' dtype, grad_scale's: lse may be wider)
            ctx.reduction = (reduction, denom, lse.shape, grad_scale.dtype)
            ctx.guess = (key, guess if post != 1.0 else None, post)
            if post != 1.0:  # (weak references: saved-tensor hooks may move the logits)
                ctx.logits = _watch(x)
            # (the target kept as a plain attribute, as the buffer, by setup_context's
            # _ops._save_fused: unpacking the saved target would make a checkpointed loss
            # recompute its forward; see _ops._fused_backward)
            return loss

        def reduced_backward(ctx, grad):
            _ops.check_ignored_unchanged(ctx)
            buffer = ctx.fused_grad
            reduction, denom, _, _ = ctx.reduction
            key, guessed, post = ctx.guess
            formula = grad is None or reference_backward(grad)
            right = key is not None and not formula and GUESSES.observe(key, grad, guessed)
            scale = ctx.grad_scale  # the rows' upstream the buffer was written for
            if guessed is not None and not formula and not right:
                if _changed(ctx.logits):
                    # Changed in place since the forward (another loss's inplace_backward,
                    # an in-place op under no_grad): the buffer is all there is, as F needs
                    # no logits in its backward. Rescaled from the guessed upstream: one
                    # more rounding than an unguessed step's, and no error.
                    scale = ctx.grad_scale * post
                else:
                    # Recomputed below from the logits, as a second backward would, so a
                    # wrong guess changes no bit (a forward pass where the rescale cost
                    # a pass).
                    ctx.fused_grad = buffer = None
            if formula or buffer is None:
                # A second backward, a differentiable or batched gradient: the op's formula.
                return _rows_backward(backward, ctx, grad)[0], None, None, None, None
            ctx.fused_grad = None
            if guessed is None or not right:  # (a right guess left no row to rescale)
                # (the target: its ignored rows stay zero whatever the upstream)
                c.rescale_reduced(buffer, grad, _REDUCTION_CODES[reduction], denom, scale,
                                  *ctx.ignored)
            return buffer, None, None, None, None

        return _function(f"{name}_reduced_fast_eager", forward, reduced_backward)

    def loss(self, kind: int, reduction: str, unbatched: bool, x, t, w, scalars: tuple,
             dtype: torch.dtype, out_shape: tuple, logits=None):
        """reduce(op(x, t, w, *scalars, grad_scale)[0]) as functional.py computes it, with
        its gradient for x where autograd wants one; None where this path does not serve.
        kind: CE_INDEX, CE_PROB or FOCAL (see reduced_loss.h). logits: the caller's tensor
        whose _rows_view x is, or None (x was converted)."""
        if traced() or not _plain(x, t, w) or _wrapped(x):
            return None
        if torch.is_grad_enabled() and x.requires_grad:
            code = _REDUCTION_CODES[reduction]
            if (self._node is not None and logits is not None and x.device.type == "cpu"
                    and GUESSES.key(kind, code, x, dtype) is None):
                loss = self._node(kind, code, unbatched, logits, t, w, scalars, dtype,
                                  out_shape)
                if loss is not None:
                    return loss
            spec = (kind, reduction, unbatched, dtype, out_shape)
            return self._functions[_KIND_OPS[kind]].apply(x, t, w, scalars, spec)
        return self._c.reduced_loss(kind, _REDUCTION_CODES[reduction], False, unbatched,
                                    x, t, w, scalars, dtype, out_shape)


class _Ops:
    """An op namespace's differentiable ops as eager calls (the others as they are)."""

    def __init__(self, namespace: str):
        self._namespace = getattr(torch.ops, namespace)
        for name in _ops._AUTOGRAD:
            setattr(self, name, _eager_call(namespace, name))
        self._reduced = {name: _reduced_call(namespace, name, getattr(self, name))
                         for name in _REDUCIBLE}
        extension = _backend.extension_module() if namespace != _ops.REF_NAMESPACE else None
        # (None also for an extension built before _C.reduced_loss existed)
        self.fused_reduced = (FusedReduced(namespace, extension)
                              if hasattr(extension, "reduced_loss") else None)

    def reduced(self, name: str, reduction: tuple, *args):
        """The loss reduce(op(*args)[0], *reduction) (_reduction.reduce's arguments after
        the rows), for a fused op `name`."""
        return self._reduced[name](reduction, *args)

    def __getattr__(self, name):  # the ops without autograd formulas
        return getattr(self._namespace, name)


# Built at import: traced code (torch.compile) only reads this dict.
_NAMESPACES = {ns: _Ops(ns) for ns in (_ops.REF_NAMESPACE, "torchloss_fused")
               if ns == _ops.REF_NAMESPACE or _backend.EXTENSION_LOADED}


def _fast_lane() -> FusedReduced | None:
    """The FusedReduced of the namespace that serves CPU tensors (ops_for's), or None where
    that is not the extension's, or has the fused reduced path switched off (as tests do)."""
    if not _backend.has_kernels("cpu"):
        return None
    return _NAMESPACES["torchloss_fused"].fused_reduced


def fast_cross_entropy(*args):
    """_fast_lane()'s cross_entropy, or None."""
    fast = _fast_lane()
    return None if fast is None else fast.cross_entropy(*args)


def fast_focal_loss(*args):
    """_fast_lane()'s focal_loss, or None."""
    fast = _fast_lane()
    return None if fast is None else fast.focal_loss(*args)


def ops_for(device: torch.device):
    """_backend.ops_for(device), with eager calls for the differentiable ops."""
    return _NAMESPACES[_backend.ops_for(device).name]
