"""Higher-order derivatives and torch.func transforms.

To autograd, a kernel's gradient is a plain tensor. Differentiated again (a backward with
``create_graph=True``: gradient penalties, MAML, Hessian-vector products) it would count as
a constant and the second-order terms would silently vanish; and torch.func's transforms
cannot use the autograd formulas of custom ops at all (pytorch/pytorch#168393,
#179652). In both cases the losses run the pure-PyTorch reference code instead, which
autograd and torch.func differentiate and batch like any PyTorch code: exact
derivatives of every order, at the reference's speed. Ordinary training never comes here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad


def transform_active(*tensors: Tensor | None) -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, jacrev, hessian, ...) is running, or
    forward-mode AD carries a tangent for one of `tensors`. Always False under torch.compile,
    where this cannot be told (torch.compile of a torch.func transform of these losses is
    not supported)."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    if forward_ad._current_level < 0:
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def unwrapped(t: Tensor) -> Tensor:
    """t without torch.func's wrappers (a transformed input's underlying tensor); t itself
    under torch.compile, which traces no such wrapper (transform_active says why)."""
    if torch.compiler.is_compiling():
        return t
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def carries_derivative(t: Tensor) -> bool:
    """Whether t itself is differentiated: it requires grad, is batched or wrapped by a
    torch.func transform, or carries a forward-mode tangent (reading it as a number, as
    .item() does, would silently drop that derivative). Under torch.compile: whether it
    requires grad (transform_active says why)."""
    if torch.compiler.is_compiling():
        return t.requires_grad
    ft = torch._C._functorch  # (not functionalize's wrappers: they carry no derivative)
    return (t.requires_grad or ft.is_batchedtensor(t) or ft.is_gradtrackingtensor(t)
            or (forward_ad._current_level >= 0 and forward_ad.unpack_dual(t).tangent is not None))


def reference_backward(*grads: Tensor | None) -> bool:
    """Inside a backward formula: whether the gradient must come from autograd through the
    reference forward. Yes when the caller asked for a differentiable gradient
    (create_graph=True runs the formulas with grad mode on), and when the incoming
    gradients are batched by vmap (autograd.grad(is_grads_batched=True),
    torch.autograd.functional.jacobian(vectorize=True)), which the kernels cannot take."""
    if torch.compiler.is_compiling():
        return False
    return torch.is_grad_enabled() or any(g is not None and _batched(g) for g in grads)


def _batched(t: Tensor) -> bool:
    # autograd.grad(is_grads_batched=True) batches with the legacy vmap, invisible to
    # functorch's wrapper checks.
    ft = torch._C._functorch
    return ft.is_functorch_wrapped_tensor(t) or ft.is_legacy_batchedtensor(t)


def differentiable_grads(
    forward: Callable[..., Sequence[Tensor]],
    inputs: Sequence[Tensor | None],
    needs: Sequence[bool],
    grad_outputs: Sequence[Tensor | None],
) -> tuple[Tensor | None, ...]:
    """Gradients of ``forward(*inputs)`` (a tuple of outputs) for the inputs marked in
    `needs`, given the outputs' incoming gradients (None: no gradient), recorded by autograd
    so that they can be differentiated again, with respect to the inputs and to
    `grad_outputs` alike."""
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_() if need and not x.requires_grad else x
                  for x, need in zip(inputs, needs)]
        outputs = forward(*leaves)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None]
        wrt = [x for x, need in zip(leaves, needs) if need]
        grads = iter(torch.autograd.grad(
            [o for o, _ in pairs], wrt, [g for _, g in pairs], create_graph=True,
            allow_unused=True, materialize_grads=True))
    return tuple(next(grads) if need else None for need in needs)
