"""The eager calls of _eager.py: for plain tensors they skip torch.library's autograd
wrapper, and must give exactly what the registered op and its formulas give."""

from __future__ import annotations

import itertools

import pytest
import torch

import torchloss_fused as tlf
from torchloss_fused import _eager, _ops, _reduction

from .test_ops import NAMESPACES, _ce_samples, _focal_samples


def _calls(device):
    """(op name, args) for every differentiable op, inputs requiring grad."""
    for args in _ce_samples(device, True):
        yield "ce_fwd", args + (False,)
        B, _, D = args[0].shape
        yield "ce_fwd_grad", args + (torch.full((B, D), 0.3, device=device),)
    for args in _focal_samples(device, True):
        B, _, D = args[0].shape
        yield "focal_fwd", args
        yield "focal_fwd_grad", args + (torch.ones(B, D, device=device),)
    x = torch.randn(7, 5, device=device, requires_grad=True)
    t = torch.rand(7, 5, device=device)
    yield "sigmoid_focal_fwd", (x, t, 0.25, 2.0)
    yield "sigmoid_focal_sum", (x, t, 0.25, 2.0, 35)
    yield "sigmoid_focal_sum_grad", (x, t, -1.0, 0.5, 1)


def _outputs_and_grad(fn, args):
    x = args[0]
    out = fn(*args)
    out = out if isinstance(out, tuple) else (out,)
    # Random upstream gradients on the loss only (the fused ops' other outputs get none in
    # training), so the fused backward has rows to rescale.
    g = torch.rand_like(out[0]) + 0.5
    (grad,) = torch.autograd.grad(out[0], x, g)
    return [o.detach() for o in out], grad, out[0].grad_fn


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_eager_calls_equal_the_registered_ops(device, namespace):
    eager = _eager._NAMESPACES[namespace]
    ops = getattr(torch.ops, namespace)
    n = 0
    for name, args in _calls(device):
        torch.manual_seed(1)
        got, grad, node = _outputs_and_grad(getattr(eager, name), args)
        torch.manual_seed(1)
        want, want_grad, want_node = _outputs_and_grad(getattr(ops, name), args)
        for a, b in zip(got, want):
            assert torch.equal(a, b), name
        assert torch.equal(grad, want_grad), name
        # The eager call really is the shortcut, and the op the registered wrapper.
        assert type(node).__name__ == f"{name}_eagerBackward", name
        assert type(want_node).__name__ != type(node).__name__, name
        n += 1
    assert n == 8 * 2 + 3 * 2 + 3


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_eager_calls_without_grad_skip_autograd(device, namespace):
    eager = _eager._NAMESPACES[namespace]
    ops = getattr(torch.ops, namespace)
    for name, args in _calls(device):
        with torch.no_grad():
            got = getattr(eager, name)(*args)
            want = getattr(ops, name)(*args)
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        for a, b in zip(got, want):
            assert a.grad_fn is None and torch.equal(a, b), name


def _reduced_calls(device):
    """(op name, reduction, args) for the fused ops with a reduced call: both reductions,
    a loss dtype that needs a cast (bfloat16) and one that does not, grad_scale as
    functional.py makes it for that reduction."""
    samples = [("ce_fwd_grad", a) for a in _ce_samples(device, True)]
    samples += [("focal_fwd_grad", a) for a in _focal_samples(device, True)]
    for (name, args), reduction, dtype in itertools.product(
            samples, ("mean", "sum"), (torch.float32, torch.bfloat16)):
        B, _, D = args[0].shape
        denom = torch.full((), 6.0, device=device) if reduction == "mean" else None
        one = torch.ones((), device=device)
        scale = (one / denom if reduction == "mean" else one).expand(B, D)
        yield name, (reduction, denom, (B, D), dtype), args + (scale,)


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("upstream", [1.0, 2.5])
def test_reduced_calls_equal_the_op_and_a_separate_reduction(device, namespace, upstream):
    # One node for the op and the reduction: the same loss and, through its backward, the
    # bitwise same gradient as autograd's own reduction nodes give (an upstream gradient
    # of 1 is the case the forward computed the gradient for; 2.5 rescales every row). A
    # second backward (retain_graph) repeats the first.
    eager = _eager._NAMESPACES[namespace]
    ops = getattr(torch.ops, namespace)
    n = 0
    for name, reduction, args in _reduced_calls(device):
        x = args[0]
        got = eager.reduced(name, reduction, *args)
        assert type(got.grad_fn).__name__ == f"{name}_reduced_eagerBackward", name
        want = _reduction.reduce(getattr(ops, name)(*args)[0], *reduction)
        assert got.dtype == want.dtype == reduction[3] and torch.equal(got, want), name
        g = torch.full((), upstream, dtype=got.dtype, device=device)
        (grad,) = torch.autograd.grad(got, x, g, retain_graph=True)
        (again,) = torch.autograd.grad(got, x, g)
        (want_grad,) = torch.autograd.grad(want, x, g)
        assert torch.equal(grad, want_grad) and torch.equal(again, want_grad), name
        n += 1
    assert n == (8 + 3) * 2 * 2


def test_reduced_calls_fall_back_without_grad_and_for_none(device):
    eager = _eager.ops_for(torch.device(device))
    name, reduction, args = next(_reduced_calls(device))
    with torch.no_grad():
        assert eager.reduced(name, reduction, *args).grad_fn is None
    B, _, D = args[0].shape
    rows = eager.reduced(name, ("none", None, (B * D,), torch.float32), *args)
    assert rows.shape == (B * D,) and type(rows.grad_fn).__name__ == "ViewBackward0"
    # An in-place change of an unreduced loss stays allowed, as for F.cross_entropy's.
    rows.mul_(2.0)


class _Subclass(torch.Tensor):
    pass


def test_tensor_subclasses_keep_the_registered_op():
    x = torch.randn(4, 6, 1).as_subclass(_Subclass).requires_grad_()
    t = torch.randint(0, 6, (4, 1))
    args = (x, t, None, -100, 0.0, 0.0, 0.0, 1.0, torch.ones(4, 1))
    loss = _eager.ops_for(x.device).ce_fwd_grad(*args)[0]
    assert not type(loss.grad_fn).__name__.endswith("_eagerBackward")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    want = torch.ops.torchloss_fused_ref.ce_fwd_grad(*args)[2]
    torch.testing.assert_close(grad.as_subclass(torch.Tensor), want.as_subclass(torch.Tensor))


def test_public_losses_take_the_eager_calls(backend):
    x = torch.randn(8, 10, requires_grad=True)
    y = torch.randint(0, 10, (8,))
    for loss in (tlf.cross_entropy(x, y), tlf.focal_loss(x, y),
                 tlf.sigmoid_focal_loss(x, torch.rand(8, 10), reduction="mean")):
        node = loss.grad_fn
        while node is not None and not type(node).__name__.endswith("_eagerBackward"):
            node = node.next_functions[0][0] if node.next_functions else None
        assert node is not None, loss.grad_fn


def test_shortcut_ops_are_the_registered_autograd_ops():
    # Every op with an autograd formula has its eager call, and no other op is wrapped.
    for namespace in NAMESPACES:
        eager = _eager._NAMESPACES[namespace]
        for name in _ops.SCHEMAS:
            wrapped = name in vars(eager)
            assert wrapped == (name in _ops._AUTOGRAD), name


def test_linear_ce_eager_calls_equal_the_registered_ops(device):
    # linear_cross_entropy's ops too skip torch.library's wrapper: the same outputs and,
    # for a rescaled upstream gradient, the same gradients; a second backward works.
    from torchloss_fused.linear_ce import ops as lce

    h = torch.randn(10, 6, device=device, requires_grad=True)
    w = torch.randn(13, 6, device=device, requires_grad=True)
    b = torch.randn(13, device=device, requires_grad=True)
    t = torch.randint(0, 13, (10,), device=device)
    t[3] = -100
    ce = (-100, 0.1, 1e-3, 0.0)
    calls = {"linear_ce_fwd": (h, w, b, t, None, *ce, 4, None),
             "linear_ce_fwd_grad": (h, w, b, t, None, torch.full((), 9.0, device=device),
                                    *ce, 4, None, True, True, True)}
    for name, args in calls.items():
        got = lce.EAGER[name](*args)
        want = getattr(getattr(torch.ops, lce.NAMESPACE), name)(*args)
        assert type(got[0].grad_fn).__name__ == f"{name}_eagerBackward", name
        assert type(want[0].grad_fn).__name__ != type(got[0].grad_fn).__name__, name
        for a, c in zip(got, want):
            assert torch.equal(a, c), name
        g = torch.rand_like(got[0]) + 0.5
        first = torch.autograd.grad(got[0], (h, w, b), g, retain_graph=True)
        again = torch.autograd.grad(got[0], (h, w, b), g)
        expected = torch.autograd.grad(want[0], (h, w, b), g)
        for x, y, z in zip(first, again, expected):
            # (a second backward recomputes the products: equal up to rounding)
            assert torch.equal(x, z), name
            torch.testing.assert_close(y, z, msg=name)
    loss = tlf.linear_cross_entropy(h, w, t, b)
    assert type(loss.grad_fn).__name__ == "linear_ce_fwd_grad_eagerBackward"
