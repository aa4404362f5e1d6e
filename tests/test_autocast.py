"""Under torch.autocast the losses behave as PyTorch's do there: F.cross_entropy and
binary_cross_entropy_with_logits are on autocast's float32 list, so float16/bfloat16 logits
give a float32 loss (our kernels read them as they are and accumulate in float32), and
F.linear runs in the autocast dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchloss_fused as tlf
from torchloss_fused.reference import sigmoid_focal_loss_torchvision as torchvision_formula

from .helpers import assert_like_f_under_autocast, chunked_logits_tol


def _autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


@pytest.mark.parametrize("kw", [{}, {"reduction": "none"}, {"reduction": "sum"},
                                {"weight": "float32"}, {"weight": "bfloat16"},
                                {"label_smoothing": 0.1, "ignore_index": 3}],
                         ids=str)
def test_cross_entropy_matches_f_cross_entropy_under_autocast(device, backend, kw):
    kw = dict(kw)
    if "weight" in kw:
        kw["weight"] = (torch.rand(300, device=device) + 0.5).to(getattr(torch, kw["weight"]))
    x = (torch.randn(40, 300, device=device) * 3).bfloat16().requires_grad_()
    y = torch.randint(0, 300, (40,), device=device)
    with _autocast(device):
        ours = tlf.cross_entropy(x, y, **kw)
        theirs = F.cross_entropy(x, y, **kw)
    assert ours.dtype == theirs.dtype == torch.float32
    oracle_kw = {k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()}
    oracle = F.cross_entropy(x.detach().double(), y, **oracle_kw)
    assert_like_f_under_autocast(ours, theirs, oracle, device)
    g = torch.rand_like(ours)
    g_ours, = torch.autograd.grad(ours, x, g)
    g_theirs, = torch.autograd.grad(theirs, x, g)
    assert g_ours.dtype == torch.bfloat16
    xo = x.detach().double().requires_grad_()
    g_oracle, = torch.autograd.grad(F.cross_entropy(xo, y, **oracle_kw), xo, g.double())
    # Ours: a float32 gradient rounded once to bfloat16.
    torch.testing.assert_close(g_ours.double(), g_oracle, rtol=1e-2, atol=1e-5)
    if device.type == "cuda":
        # F's probabilities come from bfloat16 log-probabilities there: up to half an ulp of
        # |log p| <= 16 (3.2% of p), at most about 2e-3 in absolute terms where p is large.
        torch.testing.assert_close(g_ours.float(), g_theirs.float(), rtol=5e-2, atol=3e-3)
    else:
        torch.testing.assert_close(g_ours.float(), g_theirs.float(), rtol=1e-2, atol=1e-5)


def test_probability_targets_and_focal_under_autocast(device, backend):
    x = torch.randn(16, 50, device=device).bfloat16()
    p = torch.softmax(torch.randn(16, 50, device=device), 1)
    y = torch.randint(0, 50, (16,), device=device)
    with _autocast(device):
        ours, theirs = tlf.cross_entropy(x, p), F.cross_entropy(x, p)
        focal = tlf.focal_loss(x, y, gamma=0.0)
        ce = tlf.cross_entropy(x, y)
    assert ours.dtype == theirs.dtype == torch.float32
    assert_like_f_under_autocast(ours, theirs, F.cross_entropy(x.double(), p.double()), device)
    assert focal.dtype == torch.float32 and torch.equal(focal, ce)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_sigmoid_focal_loss_is_float32_under_autocast(device, backend, reduction):
    x = (torch.randn(64, 80, device=device) * 3).bfloat16().requires_grad_()
    t = (torch.rand(64, 80, device=device) < 0.2).bfloat16()
    with _autocast(device):
        ours = tlf.sigmoid_focal_loss(x, t, reduction=reduction)
    oracle = torchvision_formula(x.detach().double(), t.double(), reduction=reduction)
    assert ours.dtype == torch.float32
    # float32 arithmetic on the bfloat16 inputs: close to the float64 oracle.
    torch.testing.assert_close(ours.double(), oracle, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(ours.sum(), x)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g).all()


def test_linear_cross_entropy_casts_like_f_linear_under_autocast(device, backend):
    h = torch.randn(64, 32, device=device, requires_grad=True)
    w = (torch.randn(500, 32, device=device) * 0.3).requires_grad_()
    b = torch.randn(500, device=device, requires_grad=True)
    y = torch.randint(0, 500, (64,), device=device)
    with _autocast(device):
        ours = tlf.linear_cross_entropy(h, w, y, b)
        logits = F.linear(h, w, b)
        theirs = F.cross_entropy(logits, y)
    assert logits.dtype == torch.bfloat16 and ours.dtype == theirs.dtype == torch.float32
    oracle = F.cross_entropy(logits.detach().double(), y)
    assert_like_f_under_autocast(ours, theirs, oracle, device, chunked_logits_tol(device))
    for g_ours, g_theirs in zip(torch.autograd.grad(ours, (h, w, b)),
                                torch.autograd.grad(theirs, (h, w, b))):
        assert g_ours.dtype == torch.float32
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("target_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_linear_cross_entropy_probability_target_under_autocast(device, backend,
                                                                target_dtype):
    """Autocast's float32 for F.cross_entropy; a float64 target keeps F's float64."""
    h = torch.randn(48, 32, device=device, requires_grad=True)
    w = (torch.randn(300, 32, device=device) * 0.3).requires_grad_()
    y = torch.softmax(torch.randn(48, 300, device=device) * 2, -1).to(target_dtype)
    with _autocast(device):
        ours = tlf.linear_cross_entropy(h, w, y, label_smoothing=0.1)
        logits = F.linear(h, w)
        theirs = F.cross_entropy(logits, y, label_smoothing=0.1)
    expected = torch.float64 if target_dtype == torch.float64 else torch.float32
    assert ours.dtype == theirs.dtype == expected
    oracle = F.cross_entropy(logits.detach().double(), y.double(), label_smoothing=0.1)
    assert_like_f_under_autocast(ours, theirs, oracle, device, chunked_logits_tol(device))
    for g_ours, g_theirs in zip(torch.autograd.grad(ours, (h, w)),
                                torch.autograd.grad(theirs, (h, w))):
        assert g_ours.dtype == torch.float32
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-2, atol=1e-4)


def test_float32_logits_take_a_half_precision_weight_under_autocast(device, backend):
    """F casts the weight to float32 under autocast, float32 logits beside a bfloat16 or
    float16 weight included (a model cast to bf16, its logits upcast): ours refused it."""
    x = torch.randn(16, 50, device=device, requires_grad=True)
    y = torch.randint(0, 50, (16,), device=device)
    for dtype in (torch.bfloat16, torch.float16):
        w = (torch.rand(50, device=device) + 0.5).to(dtype)
        with _autocast(device):
            ours = tlf.cross_entropy(x, y, weight=w, label_smoothing=0.1)
            theirs = F.cross_entropy(x, y, weight=w, label_smoothing=0.1)
        assert ours.dtype == theirs.dtype == torch.float32
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(torch.autograd.grad(ours, x), torch.autograd.grad(theirs, x))


@pytest.mark.parametrize("logits_dtype, target_dtype", [
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
    (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)], ids=str)
def test_narrower_probability_target_is_smoothed_as_float32_under_autocast(
        device, backend, logits_dtype, target_dtype):
    """Under autocast F casts a float16/bfloat16 target to float32 before smoothing it, so
    its smoothing is not rounded to the target's dtype (outside autocast it is: ours
    followed that rule there too, 4e-4 of the loss away from F)."""
    x = (torch.randn(32, 300, device=device) * 3).to(logits_dtype)
    p = torch.softmax(torch.randn(32, 300, device=device) * 2, -1).to(target_dtype)
    with _autocast(device):
        ours = tlf.cross_entropy(x, p, label_smoothing=0.2)
        theirs = F.cross_entropy(x, p, label_smoothing=0.2)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=0)
    h = torch.randn(32, 16, device=device)
    w = torch.randn(300, 16, device=device) * 0.3
    with _autocast(device):
        ours = tlf.linear_cross_entropy(h, w, p, label_smoothing=0.2)
        theirs = F.cross_entropy(F.linear(h, w), p, label_smoothing=0.2)
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=0)
