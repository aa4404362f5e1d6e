"""The __torch_function__ protocol for the public losses, as torch.nn.functional keeps it.

F.cross_entropy hands a call with a tensor-like argument that overrides
__torch_function__ (torch.fx's Proxy while symbolic_trace runs, a user's logging or
masking subclass, a TorchFunctionMode) to that override, with F.cross_entropy itself as
the function. These losses do the same, with themselves as the function: an FX graph then
holds one call of the loss (run as the loss when the graph runs), and a subclass sees the
loss, not the tensor operations inside it. DTensor, nn.Parameter, FakeTensor and the
other subclasses that disable __torch_function__ never take this turn.

The override gets the arguments laid out as F hands them: the leading tensors positional,
the rest by keyword (F's own keywords always, as F passes them; this library's extras
where the caller gave them), whichever way the caller wrote the call. So a handler written
for F.cross_entropy's arguments reads ours (under tlf.patch_torch() it cannot tell them
apart but by the function).
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, ParamSpec, TypeVar

from torch.overrides import handle_torch_function, has_torch_function

P = ParamSpec("P")
R = TypeVar("R")

__all__ = ["dispatches_torch_function"]


def dispatches_torch_function(
    positional: int, always: tuple[str, ...] = ()
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """A loss whose first `positional` parameters an override gets positionally, and the
    parameters `always` by keyword whether the caller gave them or not. (Typed so that type
    checkers see the loss's own signature through it.)"""
    def decorate(loss_fn: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(loss_fn)
        names = list(signature.parameters)
        keyword_names = names[positional:]

        def handed_over(loss, args, kwargs):
            bound = signature.bind(*args, **kwargs)  # (a TypeError for a call that is wrong)
            given = set(bound.arguments)
            bound.apply_defaults()
            values = bound.arguments
            leading = tuple(values[name] for name in names[:positional])
            keywords = {name: values[name] for name in keyword_names
                        if name in always or name in given}
            relevant = leading + tuple(keywords.values())
            return handle_torch_function(loss, relevant, *leading, **keywords)

        @functools.wraps(loss_fn)
        def loss(*args: P.args, **kwargs: P.kwargs) -> R:
            # (every argument checked: the others are numbers, None or strings, which never
            # override; that costs less than picking the tensors out)
            if has_torch_function(args) or (kwargs and has_torch_function(tuple(kwargs.values()))):
                return handed_over(loss, args, kwargs)
            return loss_fn(*args, **kwargs)

        return loss

    return decorate
