"""Element offsets past 2^31 without 2^31 elements of memory: the tensors are views of a
huge allocation that is never touched except where they lie (on CPU, untouched pages cost
no memory; on CUDA the allocation is real, 4 GiB). An offset computed in 32 bits reads or
writes the wrong place, which these tests see as wrong values. (test_cuda_only.py also
runs a real N x V > 2^31 problem on the GPU.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchloss_fused as tlf
from benchmarks.problems import as_model_output

from .helpers import assert_matches, oracle_cross_entropy
from .test_focal_loss import focal_oracle

FAR = 2**30 + 7  # rows this many elements apart: the third row starts past 2^31


def _far(shape, strides, values, device):
    """`values` (in their dtype) laid out with `strides` inside an otherwise untouched
    allocation that reaches past 2^31 elements."""
    span = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
    assert span > 2**31
    storage = torch.empty(span, dtype=values.dtype, device=device)
    out = storage.as_strided(shape, strides)
    with torch.no_grad():
        out.copy_(values)
    return out


def _cpu_ce(x, t, dtype, **kw):
    """(loss, grad) of helpers.oracle_cross_entropy on CPU in `dtype` (float64: the oracle;
    the logits' dtype: eager PyTorch's error budget), reduction none, unit upstream."""
    xr = x.detach().cpu().to(dtype).requires_grad_()
    kw = {k: v.cpu() if torch.is_tensor(v) else v for k, v in kw.items()}
    loss, _ = oracle_cross_entropy(xr, t.cpu(), reduction="none", dtype=dtype, **kw)
    loss.sum().backward()
    return loss.detach(), xr.grad


def _oracle(x, t, **kw):
    return _cpu_ce(x, t, torch.float64, **kw)


def _eager(x, t, **kw):
    return _cpu_ce(x, t, x.dtype, **kw)


@pytest.fixture
def logits(device):
    def make(dtype=torch.bfloat16, C=1000, rows=3):
        values = (torch.randn(rows, C, dtype=torch.float64) * 3).to(dtype)
        return _far((rows, C), (FAR, 1), values, device)
    return make


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "weight": True}])
def test_rows_past_2_31_forward_and_fused_gradient(device, backend, logits, options):
    x = logits()
    t = torch.tensor([5, 999, 0], device=device)
    kw = dict(options)
    if kw.pop("weight", False):
        kw["weight"] = (torch.rand(1000, dtype=torch.float64) + 0.5).to(x.dtype)
    ours_kw = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()}
    xg = x.detach().requires_grad_()
    loss, lse = tlf.cross_entropy(xg, t, reduction="none", return_lse=True, **ours_kw)
    loss.sum().backward()
    ref, ref_grad = _oracle(x, t, **kw)
    eager, eager_grad = _eager(x, t, **kw)
    assert_matches(loss.detach().cpu(), ref, eager, x.dtype, what="loss")
    assert_matches(xg.grad.cpu(), ref_grad, eager_grad, x.dtype, what="grad")
    torch.testing.assert_close(lse.cpu().double(), torch.logsumexp(x.cpu().double(), 1),
                               rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # the forward-only kernel
        assert torch.equal(tlf.cross_entropy(x, t, reduction="none", **ours_kw), loss.detach())


def test_inplace_backward_writes_rows_past_2_31(device, backend, logits):
    x = logits(torch.float32)
    t = torch.tensor([1, -100, 998], device=device)
    ref, ref_grad = _oracle(x, t)
    x.requires_grad_()
    # (through an op's output on x's storage, as a model's logits: x itself, a leaf view
    # requiring grad, is refused, as autograd refuses an in-place op on it)
    loss = tlf.cross_entropy(as_model_output(x), t, reduction="sum", inplace_backward=True)
    loss.backward()
    torch.testing.assert_close(loss.detach().cpu().double(), ref.sum())
    # The kernel wrote the gradient into the logits' own storage, the third row past 2^31
    # (x.grad is AccumulateGrad's dense copy of it: x is not dense).
    torch.testing.assert_close(x.detach().cpu().double(), ref_grad, rtol=1e-5, atol=1e-7)
    assert torch.equal(x.grad, x.detach())


def test_probability_target_rows_past_2_31(device, backend, logits):
    x = logits(torch.float32, C=300)
    p = torch.randn(3, 300, dtype=torch.float64).softmax(1).float()
    t = _far((3, 300), (FAR, 1), p, device)
    xg = x.detach().requires_grad_()
    loss = tlf.cross_entropy(xg, t, reduction="none", label_smoothing=0.2)
    loss.sum().backward()
    ref, ref_grad = _oracle(x, t, label_smoothing=0.2)
    torch.testing.assert_close(loss.detach().cpu().double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xg.grad.cpu().double(), ref_grad, rtol=1e-5, atol=1e-7)


def test_classes_strided_past_2_31(device, backend):
    # (N, C, d) with the class dimension strided 2^23 apart: class 299 of the last
    # position lies past 2^31.
    N, C, d = 1, 300, 2
    values = torch.randn(N, C, d, dtype=torch.float64) * 2
    x = _far((N, C, d), (C * 2**23, 2**23, 1), values.float(), device)
    t = torch.tensor([[7, 299]], device=device)
    xg = x.detach().requires_grad_()
    loss = tlf.cross_entropy(xg, t, reduction="none", z_loss=1e-3)
    (grad,) = torch.autograd.grad(loss.sum(), xg)
    ref, ref_grad = _oracle(values.float(), t, z_loss=1e-3)
    torch.testing.assert_close(loss.detach().cpu().double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=1e-5, atol=1e-7)


def test_focal_loss_rows_past_2_31(device, backend, logits):
    x = logits(torch.float32)
    t = torch.tensor([0, 500, 999], device=device)
    xg = x.detach().requires_grad_()
    loss = tlf.focal_loss(xg, t, gamma=2.0, reduction="none")
    loss.sum().backward()
    xr = x.detach().cpu().double().requires_grad_()
    ref = focal_oracle(xr, t.cpu(), 2.0, reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(loss.detach().cpu().double(), ref.detach(), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(xg.grad.cpu().double(), xr.grad, rtol=1e-5, atol=1e-7)


def test_linear_cross_entropy_rows_past_2_31(device, backend):
    # hidden states whose rows lie far apart (a slice of a huge activation buffer).
    H, V = 16, 50
    h = _far((3, H), (FAR, 1), torch.randn(3, H, dtype=torch.float64).float(), device)
    w = (torch.randn(V, H, device=device) * 0.3).requires_grad_()
    t = torch.tensor([3, 49, 0], device=device)
    hg = h.detach().requires_grad_()
    loss = tlf.linear_cross_entropy(hg, w, t, reduction="sum", chunk_size=2)
    loss.backward()
    hr = h.detach().cpu().double().requires_grad_()
    wr = w.detach().cpu().double().requires_grad_()
    ref = F.cross_entropy(F.linear(hr, wr), t.cpu(), reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss.detach().cpu().double(), ref.detach(), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(hg.grad.cpu().double(), hr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.cpu().double(), wr.grad, rtol=1e-5, atol=1e-6)
