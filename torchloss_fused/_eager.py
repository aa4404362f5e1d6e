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

Everything else keeps the registered op: torch.compile (it traces the op and its
registered formulas), tensor subclasses such as DTensor (their dispatch rules see the
op), and torch.func's wrapped tensors (functional.py routes transforms to the reference
code anyway).
"""

from __future__ import annotations

import torch

from . import _backend, _ops, _reduction

_any_requires_grad = getattr(
    torch._C, "_any_requires_grad",
    lambda *args: any(isinstance(a, torch.Tensor) and a.requires_grad for a in args))
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


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

    # The last forward argument is the reduction (kind, denominator, loss shape, dtype);
    # the op's formulas see its own arguments, as in _eager_function.
    def forward(ctx, *args):
        *args, (reduction, denom, out_shape, dtype) = args
        output = op_forward(ctx, *args)
        ctx.reduction = (reduction, denom, output[0].shape, output[0].dtype)
        return _reduction.reduce(output[0], reduction, denom, out_shape, dtype)

    def reduced_backward(ctx, grad):
        # (grad is None where autograd passes an undefined gradient: the op's formula
        # takes None for "no gradient" as well)
        rows = None if grad is None else _reduction.rows_grad(grad, *ctx.reduction)
        return (*backward(ctx, rows, None, None), None)

    return _function(f"{name}_reduced_eager", forward, reduced_backward)


def _eager_path(args, n_args: int) -> bool:
    x = args[0]
    return not (torch.compiler.is_compiling() or len(args) != n_args
                or type(x) is not torch.Tensor or _wrapped(x))


def _eager_call(namespace: str, name: str):
    op = getattr(getattr(torch.ops, namespace), name).default
    n_args = len(op._schema.arguments)
    function = _eager_function(op, name, *_ops._AUTOGRAD[name](namespace))

    def call(*args):
        if not _eager_path(args, n_args):
            return op(*args)
        if torch.is_grad_enabled() and _any_requires_grad(*args):
            return function.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    call.__name__ = name
    return call


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


class _Ops:
    """An op namespace's differentiable ops as eager calls (the others as they are)."""

    def __init__(self, namespace: str):
        self._namespace = getattr(torch.ops, namespace)
        for name in _ops._AUTOGRAD:
            setattr(self, name, _eager_call(namespace, name))
        self._reduced = {name: _reduced_call(namespace, name, getattr(self, name))
                         for name in _REDUCIBLE}

    def reduced(self, name: str, reduction: tuple, *args):
        """The loss reduce(op(*args)[0], *reduction) (_reduction.reduce's arguments after
        the rows), for a fused op `name`."""
        return self._reduced[name](reduction, *args)

    def __getattr__(self, name):  # the ops without autograd formulas
        return getattr(self._namespace, name)


# Built at import: traced code (torch.compile) only reads this dict.
_NAMESPACES = {ns: _Ops(ns) for ns in (_ops.REF_NAMESPACE, "torchloss_fused")
               if ns == _ops.REF_NAMESPACE or _backend.EXTENSION_LOADED}


def ops_for(device: torch.device):
    """_backend.ops_for(device), with eager calls for the differentiable ops."""
    return _NAMESPACES[_backend.ops_for(device).name]
