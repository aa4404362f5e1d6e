"""Operator-level checks: schemas, torch.library.opcheck, gradcheck, and the compiled
kernels agreeing with the pure-PyTorch reference ops."""

from __future__ import annotations

import itertools

import pytest
import torch

import torchloss_fused as tlf
from torchloss_fused import _backend, _ops

NAMESPACES = ["torchloss_fused_ref"] + (["torchloss_fused"] if _backend.EXTENSION_LOADED else [])
needs_ext = pytest.mark.skipif(not _backend.EXTENSION_LOADED, reason="extension not loaded")


@needs_ext
@pytest.mark.parametrize("name", sorted(_ops.SCHEMAS))
def test_reference_schemas_match_the_extension(name):
    ext = str(getattr(torch.ops.torchloss_fused, name).default._schema)
    ref = str(getattr(torch.ops.torchloss_fused_ref, name).default._schema)
    assert ext.split("::", 1)[1] == ref.split("::", 1)[1]


def _ce_samples(device, requires_grad):
    B, C, D = 5, 11, 3
    x = torch.randn(B, C, D, device=device, requires_grad=requires_grad)
    idx = torch.randint(0, C, (B, D), device=device)
    idx[0, 0] = -100
    prob = torch.softmax(torch.randn(B, C, D, device=device), 1)
    w = torch.rand(C, device=device) + 0.1
    for target, weight, opts in itertools.product(
        (idx, prob), (None, w), ((0.0, 0.0, 0.0, 1.0), (0.1, 1e-2, 3.0, 0.7))
    ):
        yield x, target, weight, -100, *opts


def _focal_samples(device, requires_grad):
    x = torch.randn(6, 9, 2, device=device, requires_grad=requires_grad)
    y = torch.randint(0, 9, (6, 2), device=device)
    y[1, 1] = -1
    for alpha, gamma in ((None, 0.0), (torch.rand(9, device=device), 2.0), (None, 0.5)):
        yield x, y, alpha, 0.7, gamma, -1


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck_forward_ops(device, namespace, requires_grad):
    ops = getattr(torch.ops, namespace)
    for args in _ce_samples(device, requires_grad):
        torch.library.opcheck(ops.ce_fwd.default, args)
        scale = torch.full((), 0.3, device=device).expand(args[0].shape[0], args[0].shape[2])
        torch.library.opcheck(ops.ce_fwd_grad.default, args + (scale,))
    for args in _focal_samples(device, requires_grad):
        torch.library.opcheck(ops.focal_fwd.default, args)
        scale = torch.ones((), device=device).expand(args[0].shape[0], args[0].shape[2])
        torch.library.opcheck(ops.focal_fwd_grad.default, args + (scale,))
    x = torch.randn(7, 5, device=device, requires_grad=requires_grad)
    t = torch.rand(7, 5, device=device)
    for alpha, gamma in ((0.25, 2.0), (-1.0, 0.5)):
        torch.library.opcheck(ops.sigmoid_focal_fwd.default, (x, t, alpha, gamma))
        for divisor in (1, 35):
            torch.library.opcheck(ops.sigmoid_focal_sum.default, (x, t, alpha, gamma, divisor))
            torch.library.opcheck(ops.sigmoid_focal_sum_grad.default,
                                  (x, t, alpha, gamma, divisor))


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_opcheck_backward_ops(device, namespace):
    ops = getattr(torch.ops, namespace)
    for x, target, weight, *args in _ce_samples(device, False):
        loss, lse = ops.ce_fwd(x, target, weight, *args)
        g = torch.rand_like(loss)
        for grad_lse in (None, torch.rand_like(lse)):
            torch.library.opcheck(ops._ce_bwd.default,
                                  (g, grad_lse, x, target, weight, lse, *args))
            torch.library.opcheck(ops._ce_bwd_inplace.default,
                                  (g, grad_lse, x.clone(), target, weight, lse, *args))
    for x, y, alpha, *args in _focal_samples(device, False):
        loss, lse = ops.focal_fwd(x, y, alpha, *args)
        torch.library.opcheck(ops._focal_bwd.default,
                              (torch.rand_like(loss), x, y, alpha, lse, *args))
    grad = torch.randn(4, 6, 2, device=device)
    gl = torch.rand(4, 2, device=device)
    torch.library.opcheck(ops._rescale_grad_rows.default, (grad, gl, gl * 2))
    x = torch.randn(7, 5, device=device)
    t = torch.rand(7, 5, device=device)
    torch.library.opcheck(ops._sigmoid_focal_bwd.default, (torch.rand_like(x), x, t, 0.25, 2.0))


GRADCHECK_CE_OPTIONS = [
    {},
    {"weight": True, "ignore_index": 1},
    {"label_smoothing": 0.2, "weight": True},
    {"z_loss": 0.1, "softcap": 2.0, "logit_scale": 1.5},
    {"reduction": "none"},
    {"reduction": "sum", "prob": True, "label_smoothing": 0.1, "weight": True},
]


@pytest.mark.parametrize("opts", GRADCHECK_CE_OPTIONS, ids=str)
def test_gradcheck_cross_entropy(device, backend, opts):
    opts = dict(opts)
    C = 6
    x = torch.randn(4, C, 2, dtype=torch.float64, device=device, requires_grad=True)
    if opts.pop("prob", False):
        y = torch.softmax(torch.randn(4, C, 2, dtype=torch.float64, device=device), 1)
    else:
        y = torch.randint(0, C, (4, 2), device=device)
    if opts.pop("weight", False):
        opts["weight"] = torch.rand(C, dtype=torch.float64, device=device) + 0.2
    torch.autograd.gradcheck(lambda x: tlf.cross_entropy(x, y, **opts), (x,))
    # through lse as well
    torch.autograd.gradcheck(
        lambda x: tlf.cross_entropy(x, y, return_lse=True, **opts)[1], (x,))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_gradcheck_focal(device, backend, gamma):
    x = torch.randn(5, 7, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.randint(0, 7, (5,), device=device)
    alpha = torch.rand(7, dtype=torch.float64, device=device)
    torch.autograd.gradcheck(lambda x: tlf.focal_loss(x, y, gamma=gamma, alpha=alpha), (x,))
    torch.autograd.gradcheck(
        lambda x: tlf.focal_loss(x, y, gamma=gamma, reduction="none"), (x,))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("alpha", [0.25, -1.0])
def test_gradcheck_sigmoid_focal(device, backend, gamma, alpha):
    x = torch.randn(4, 6, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.rand(4, 6, dtype=torch.float64, device=device)
    torch.autograd.gradcheck(
        lambda x: tlf.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction="sum"), (x,))


def _close(a, b, dtype):
    if a is None or b is None:
        assert a is None and b is None
        return
    if dtype in (torch.bfloat16, torch.float16):
        torch.testing.assert_close(a.double(), b.double(), rtol=1.6e-2, atol=1e-3)
    else:
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16])
def test_kernels_agree_with_reference_ops(device, dtype):
    ext, ref = torch.ops.torchloss_fused, torch.ops.torchloss_fused_ref
    for x, target, weight, *args in _ce_samples(device, False):
        x = (x * 4).to(dtype)
        if target.is_floating_point():
            target = target.to(dtype)
        if weight is not None:
            weight = weight.to(dtype)
        outs = [op.ce_fwd(x, target, weight, *args) for op in (ext, ref)]
        for a, b in zip(*outs):
            _close(a, b, torch.float32 if dtype != torch.float64 else dtype)
        loss, lse = outs[0]
        g, gl = torch.rand_like(loss), torch.rand_like(lse)
        grads = [op._ce_bwd(g, gl, x, target, weight, lse, *args) for op in (ext, ref)]
        _close(*grads, dtype)
        fused = [op.ce_fwd_grad(x, target, weight, *args, g) for op in (ext, ref)]
        for a, b in zip(*fused):
            _close(a, b, dtype if a.dtype == dtype else torch.float32)
        xi = [x.clone(), x.clone()]
        for op, xc in zip((ext, ref), xi):
            op._ce_bwd_inplace(g, None, xc, target, weight, lse, *args)
        _close(*xi, dtype)
    for x, y, alpha, *args in _focal_samples(device, False):
        x = (x * 4).to(dtype)
        outs = [op.focal_fwd(x, y, alpha, *args) for op in (ext, ref)]
        for a, b in zip(*outs):
            _close(a, b, torch.float32 if dtype != torch.float64 else dtype)
        g = torch.rand_like(outs[0][0])
        grads = [op._focal_bwd(g, x, y, alpha, outs[0][1], *args) for op in (ext, ref)]
        _close(*grads, dtype)
    x = (torch.randn(33, 17, device=device) * 4).to(dtype)
    t = torch.rand(33, 17, device=device).to(dtype)
    for alpha, gamma in ((0.25, 2.0), (-1.0, 0.0), (0.6, 1.5)):
        _close(ext.sigmoid_focal_fwd(x, t, alpha, gamma), ref.sigmoid_focal_fwd(x, t, alpha, gamma),
               dtype)
        g = torch.rand_like(x)
        _close(ext._sigmoid_focal_bwd(g, x, t, alpha, gamma),
               ref._sigmoid_focal_bwd(g, x, t, alpha, gamma), dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        sums = [op.sigmoid_focal_sum(x, t, alpha, gamma, 3) for op in (ext, ref)]
        _close(*sums, acc)
        fused = [op.sigmoid_focal_sum_grad(x, t, alpha, gamma, 3) for op in (ext, ref)]
        _close(fused[0][0], sums[0], acc)
        _close(fused[0][1], fused[1][1], dtype)


# ---- _accumulate_ (linear_cross_entropy's grad_weight sum over row chunks) -------------

ACCUMULATE_CASES = [  # (acc dtype, src dtype)
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
    (torch.float32, torch.float32), (torch.float64, torch.bfloat16),
    (torch.float64, torch.float32),
]


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("acc_dtype,src_dtype", ACCUMULATE_CASES, ids=str)
@pytest.mark.parametrize("shape", [(3, 37), (300, 1031), (1,), (0, 5)], ids=str)
def test_accumulate_matches_add(device, namespace, acc_dtype, src_dtype, shape):
    """acc += src, bitwise as PyTorch's add_: the vector body, the scalar tail (37, 1031
    are no multiple of a vector) and several threads' parts (300 x 1031 elements)."""
    acc = torch.randn(shape, device=device, dtype=acc_dtype) * 3
    src = torch.randn(shape, device=device).to(src_dtype)
    expected = acc.clone().add_(src)
    getattr(torch.ops, namespace)._accumulate_(acc, src)
    assert torch.equal(acc, expected)
    assert expected.numel() == 0 or not torch.equal(expected, src.to(acc_dtype))


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_accumulate_strided_and_aliased(device, namespace):
    op = getattr(torch.ops, namespace)._accumulate_
    base = torch.randn(40, 70, device=device)
    acc = base.t()  # not contiguous: PyTorch's add_ serves it
    src = torch.randn(70, 40, device=device).bfloat16()
    expected = acc + src.float()
    op(acc, src)
    assert torch.equal(base.t(), expected)
    whole = torch.randn(1000, device=device)  # the same memory: doubled, as add_ does
    doubled = whole * 2
    op(whole, whole)
    assert torch.equal(whole, doubled)


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_accumulate_rejects_bad_arguments(device, namespace):
    op = getattr(torch.ops, namespace)._accumulate_
    acc = torch.zeros(4, 6, device=device)
    with pytest.raises(RuntimeError, match="shape"):
        op(acc, torch.ones(4, 5, device=device))
    with pytest.raises(RuntimeError, match="shape"):
        op(acc, torch.ones(6, device=device))  # no broadcasting
    with pytest.raises(RuntimeError, match="floating point"):
        op(acc, torch.ones(4, 6, device=device, dtype=torch.int32))
    buf = torch.zeros(100, device=device)
    with pytest.raises(RuntimeError, match="memory location"):
        op(buf[:60], buf[40:])  # partly the same memory
    assert torch.count_nonzero(buf) == 0


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_opcheck_accumulate(device, namespace):
    op = getattr(torch.ops, namespace)._accumulate_.default
    torch.library.opcheck(op, (torch.randn(5, 33, device=device),
                               torch.randn(5, 33, device=device).bfloat16()))


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_one_class_backward_with_another_rows_lse(device, namespace):
    """The backward op on rows of one class, handed a larger lse than their own (as
    vocab_parallel's _kernel_grad hands a class slice the global lse, with z = 0): p < 1,
    and the gradient is g (p - 1) + g_lse p. The one-class rows' z-loss formula (B = 0,
    for p = 1) had dropped g (p - 1) when it also took rows without a z-loss."""
    ops = getattr(torch.ops, namespace)
    x = torch.randn(6, 1, 1, dtype=torch.float64, device=device)
    t = torch.zeros(6, 1, dtype=torch.long, device=device)
    lse = x[:, 0] + torch.rand(6, 1, dtype=torch.float64, device=device) + 0.5
    g = torch.rand(6, 1, dtype=torch.float64, device=device) + 0.5
    g_lse = torch.rand(6, 1, dtype=torch.float64, device=device)
    p = torch.exp(x[:, 0] - lse)
    got = ops._ce_bwd(g, g_lse, x, t, None, lse, -1, 0.0, 0.0, 0.0, 1.0)
    torch.testing.assert_close(got[:, 0], g * (p - 1) + g_lse * p)
