"""The __torch_function__ protocol for the public losses, as torch.nn.functional keeps it.

F.cross_entropy hands a call with a tensor-like argument that overrides
__torch_function__ (torch.fx's Proxy while symbolic_trace runs, a user's logging or
masking subclass) to that override, with F.cross_entropy itself as the function. These
losses do the same, with themselves as the function: an FX graph then holds one call of
the loss (run as the loss when the graph runs), and a subclass sees the loss, not the
tensor operations inside it. DTensor, nn.Parameter, FakeTensor and the other subclasses
that disable __torch_function__ never take this turn.
"""

from __future__ import annotations

import functools

from torch.overrides import handle_torch_function, has_torch_function

__all__ = ["dispatches_torch_function"]


def dispatches_torch_function(loss_fn):
    """The loss, handing a call to the __torch_function__ of any argument that overrides
    it. (F checks its tensor arguments only; the others here are numbers, None or strings,
    which never override it, and checking all of them costs less than picking some.)"""

    @functools.wraps(loss_fn)
    def loss(*args, **kwargs):
        if has_torch_function(args) or (kwargs and has_torch_function(tuple(kwargs.values()))):
            relevant = args + tuple(kwargs.values())
            return handle_torch_function(loss, relevant, *args, **kwargs)
        return loss_fn(*args, **kwargs)

    return loss
