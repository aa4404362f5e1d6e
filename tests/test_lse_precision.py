"""float32 logits far from 0: loss and gradient as accurate as F.cross_entropy's.

F works relative to each row's maximum M; the kernels keep each row's lse as the float64
M + log S (csrc/kernel_params.h, RowLse), so rounding lse to float32 (an error of about
an ulp of M) no longer enters the loss or the gradient. Each case measures F's own float32
error against the float64 oracle and allows ours twice that plus a few ulp of the value.

CPU only: the CUDA kernels' fast-math exp and log have errors of their own beside F's
accurate ones, whatever lse does; scripts/gpu_check.sh runs benchmarks/precision.py on
the GPU, and the emulated CUDA kernels are checked against reference.py's split lse
(tests/test_cuda_emulated.py, its "far" layout for logits far from 0).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchloss_fused as tlf
from torchloss_fused import reference

from .helpers import _max_err, assert_as_accurate_as_f

OFFSETS = [30.0, 1000.0, 1e5]


def _logits(offset: float, rows: int = 64, classes: int = 1000) -> torch.Tensor:
    x = torch.randn(rows, classes, dtype=torch.float64) * 3 + offset
    return x.float()


def _loss_and_grad(fn, x, *args, **kwargs):
    leaf = x.detach().clone().requires_grad_()
    loss = fn(leaf, *args, **kwargs)
    (g,) = torch.autograd.grad(loss.sum(), leaf)
    return loss.detach(), g


def _check(fn, ref_fn, x, *args, **kwargs):
    """ours and F (ref_fn) in float32 against ref_fn in float64, value and gradient."""
    ours = _loss_and_grad(fn, x, *args, **kwargs)
    theirs = _loss_and_grad(ref_fn, x, *args, **kwargs)
    exact = _loss_and_grad(ref_fn, x.double(), *args, **kwargs)
    for what, a, f, o in zip(("loss", "gradient"), ours, theirs, exact):
        assert_as_accurate_as_f(a, f, o, what)


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("kwargs", [{"reduction": "none"}, {"reduction": "mean"},
                                    {"reduction": "none", "label_smoothing": 0.1},
                                    {"reduction": "sum", "weight": True}],
                         ids=["none", "mean", "smoothing", "weight"])
def test_cross_entropy_far_from_zero(backend, offset, kwargs):
    kwargs = dict(kwargs)
    x = _logits(offset)
    y = torch.randint(0, x.shape[1], (x.shape[0],))
    if kwargs.pop("weight", False):
        w = torch.rand(x.shape[1]) + 0.5
        _check(lambda v, t: tlf.cross_entropy(v, t, weight=w.to(v.dtype), **kwargs),
               lambda v, t: F.cross_entropy(v, t, weight=w.to(v.dtype), **kwargs), x, y)
    else:
        _check(tlf.cross_entropy, F.cross_entropy, x, y, **kwargs)


@pytest.mark.parametrize("offset", OFFSETS)
def test_probability_targets_far_from_zero(backend, offset):
    x = _logits(offset, rows=16, classes=300)
    t = torch.softmax(torch.randn(16, 300), 1)
    _check(lambda v, q: tlf.cross_entropy(v, q.to(v.dtype), reduction="none"),
           lambda v, q: F.cross_entropy(v, q.to(v.dtype), reduction="none"), x, t)


@pytest.mark.parametrize("offset", OFFSETS)
def test_focal_loss_far_from_zero(backend, offset):
    x = _logits(offset)
    y = torch.randint(0, x.shape[1], (x.shape[0],))

    def eager_focal(v, t):  # the float64 formula of the focal loss, in v's dtype
        log_pt = torch.log_softmax(v, 1).gather(1, t[:, None]).squeeze(1)
        return -(1 - log_pt.exp()) ** 2 * log_pt

    _check(lambda v, t: tlf.focal_loss(v, t, gamma=2.0, reduction="none"), eager_focal, x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_logits_keep_their_loss(backend, dtype):
    # An ulp of 1e8 in float32 is 8: a float32 lse had made this loss 0 (and the
    # gradient 0); F gives log 3 and (1/3 - 1, 1/3, 1/3).
    x = torch.full((1, 3), 1e8).to(dtype)
    y = torch.tensor([0])
    loss, g = _loss_and_grad(tlf.cross_entropy, x, y)
    rel = 1e-6 if dtype == torch.float32 else 1e-2  # (the loss has the input's dtype)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(3.0)).item(), rel=rel)
    expect = torch.tensor([[-2 / 3, 1 / 3, 1 / 3]])
    torch.testing.assert_close(g.float(), expect, rtol=rel, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_ops_keep_lse_in_float64_and_return_lse_in_the_accumulation_dtype(backend, dtype):
    x = (torch.randn(5, 7, 1) * 3 + 1000).to(dtype)
    y = torch.randint(0, 7, (5, 1))
    ops = torch.ops.torchloss_fused_ref if backend == "reference" else torch.ops.torchloss_fused
    loss, lse = ops.ce_fwd(x, y, None, -100, 0.0, 0.0, 0.0, 1.0, False)
    assert lse.dtype == torch.float64 and loss.dtype == reference.acc_dtype(dtype)
    exact = torch.logsumexp(x.double().squeeze(-1), 1).unsqueeze(-1)
    # within a float64 rounding of M + log S, log S rounded to float32 (M itself exact)
    assert _max_err(lse, exact) <= (1e-12 if dtype == torch.float64 else 4e-7)
    xs = x.squeeze(-1).requires_grad_()
    _, user_lse = tlf.cross_entropy(xs, y.squeeze(-1), return_lse=True)
    assert user_lse.dtype == reference.acc_dtype(dtype)
    torch.testing.assert_close(user_lse, lse.squeeze(-1).to(user_lse.dtype), rtol=0, atol=0)


def test_backward_op_takes_the_forward_lse_bitwise(backend):
    """The separate backward from the saved float64 lse is the fused gradient, bitwise, also
    where lo matters (a retain_graph second backward recomputes it so)."""
    x = _logits(1000.0, rows=8, classes=200).requires_grad_()
    y = torch.randint(0, 200, (8,))
    loss = tlf.cross_entropy(x, y)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    assert torch.equal(g1, g2)
    _, g_ref = _loss_and_grad(F.cross_entropy, x.detach().double(), y)
    assert _max_err(g1, g_ref) < 1e-7


def _linear_ce_grads(fn, leaves, target, **kwargs):
    leaves = [v.detach().clone().requires_grad_() for v in leaves]
    loss = fn(*leaves, target, **kwargs)
    return [loss.detach(), *torch.autograd.grad(loss.sum(), leaves)]


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("kwargs", [{"reduction": "none"}, {"reduction": "mean"},
                                    {"reduction": "mean", "label_smoothing": 0.1}],
                         ids=["none", "mean", "smoothing"])
def test_linear_cross_entropy_far_from_zero(backend, offset, kwargs):
    """The logits' offset comes from the bias. reduction="none" takes the separate backward
    op (from the saved lse), "mean" the gradients made during the forward."""
    N, H, V = 48, 16, 600
    hidden = torch.randn(N, H)
    weight = torch.randn(V, H) * (3 / H ** 0.5)
    bias = torch.full((V,), offset)
    y = torch.randint(0, V, (N,))

    def ours(h, w, b, t, **kw):
        return tlf.linear_cross_entropy(h, w, t, b, chunk_size=16, **kw)

    def theirs(h, w, b, t, **kw):
        return F.cross_entropy(F.linear(h, w, b), t, **kw)

    got = _linear_ce_grads(ours, (hidden, weight, bias), y, **kwargs)
    f32 = _linear_ce_grads(theirs, (hidden, weight, bias), y, **kwargs)
    exact = _linear_ce_grads(theirs, [v.double() for v in (hidden, weight, bias)], y, **kwargs)
    for what, a, f, o in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, f32,
                             exact):
        assert_as_accurate_as_f(a, f, o, what)


def test_linear_cross_entropy_ops_keep_lse_in_float64(backend):
    hidden, weight = torch.randn(6, 4), torch.randn(9, 4)
    bias = torch.full((9,), 1000.0)
    y = torch.randint(0, 9, (6,))
    loss, lse = tlf.linear_cross_entropy(hidden, weight, y, bias, reduction="none",
                                         return_lse=True)
    assert loss.dtype == lse.dtype == torch.float32
    from torchloss_fused.linear_ce import ops as lce_ops
    ops = getattr(torch.ops, lce_ops.NAMESPACE)
    _, op_lse = ops.linear_ce_fwd(hidden, weight, bias, y, None, -100, 0.0, 0.0, 0.0, 0, None)
    assert op_lse.dtype == torch.float64
    torch.testing.assert_close(lse, op_lse.float(), rtol=0, atol=0)
    # of the float32 logits (F.linear's product, as the op's), exact but for log S's rounding
    exact = torch.logsumexp(F.linear(hidden, weight, bias).double(), 1)
    assert _max_err(op_lse, exact) <= 4e-7


@pytest.mark.parametrize("offset", [1e5, 1e12, 1e16], ids=str)
@pytest.mark.parametrize("kwargs", [{}, {"label_smoothing": 0.1}, {"reduction": "none"}],
                         ids=str)
def test_float64_training_far_from_zero(backend, offset, kwargs):
    """float64 logits far from 0, eager training (the fused kernel, forward-only loss): as
    exact as F's. The kernels and the reference keep a double row's lse as hi + lo too; as
    one double M + log S the loss and gradient were off by about an ulp of M (a row of two
    logits 1e16 gave loss 0 and gradient [0, 1] where F gives log 2 and [-0.5, 0.5])."""
    torch.manual_seed(0)
    x = torch.randn(64, 50, dtype=torch.float64) * 3 + offset
    t = torch.randint(0, 50, (64,))
    shifted = (x - offset).requires_grad_()  # (exact: Sterbenz)
    f_loss = F.cross_entropy(shifted, t, **kwargs)
    (f_grad,) = torch.autograd.grad(f_loss.sum(), shifted)
    leaf = x.clone().requires_grad_()
    loss = tlf.cross_entropy(leaf, t, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    torch.testing.assert_close(loss, f_loss, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(grad, f_grad, rtol=1e-14, atol=1e-16)
    with torch.no_grad():
        torch.testing.assert_close(tlf.cross_entropy(x, t, **kwargs), f_loss.detach(),
                                   rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype,offset", [
    (torch.float32, 1e12), (torch.float32, 1e20), (torch.float32, 3e38),
    (torch.bfloat16, 1e12), (torch.bfloat16, 3e38),
    (torch.float64, 1e5), (torch.float64, 1e12), (torch.float64, 1e300)], ids=str)
@pytest.mark.parametrize("route", ["inplace_backward", "compile", "focal-compile"])
def test_split_backward_far_from_zero(backend, dtype, offset, route):
    """A backward computed apart from the forward reads the stored float64 lse, which
    cannot hold hi + lo far from 0: those rows take their lse from their logits again, as
    exact as the forward. (Rows of equal logits, p_c = 1/C, show it most: near 1e20 the
    float32 gradient had every p_c = 1.)"""
    torch.manual_seed(0)
    x = torch.randn(16, 40, dtype=torch.float64) * 3 + offset
    x[::2] = offset  # rows of equal logits
    x = x.to(dtype)
    t = torch.randint(0, 40, (16,))
    exact = x.detach().double().clone().requires_grad_()
    if route == "focal-compile":
        ref = tlf.focal_loss(exact, t, gamma=0.0, reduction="sum")  # (== CE, float64)
    else:
        ref = F.cross_entropy(exact, t, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, exact)
    leaf = x.clone().requires_grad_()
    h = leaf * 1  # (inplace_backward takes no leaf)
    if route == "inplace_backward":
        loss = tlf.cross_entropy(h, t, reduction="sum", inplace_backward=True)
    elif route == "focal-compile":
        loss = torch.compile(lambda z: tlf.focal_loss(z, t, gamma=0.0, reduction="sum"))(h)
    else:
        loss = torch.compile(lambda z: tlf.cross_entropy(z, t, reduction="sum"))(h)
    loss.backward()
    tol = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float64: 1e-13}[dtype]
    torch.testing.assert_close(leaf.grad.double(), ref_grad, rtol=0, atol=tol)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=tol, atol=tol * 16)
