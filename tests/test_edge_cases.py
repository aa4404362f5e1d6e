"""The edge cases of DESIGN.md §5, each against what F.cross_entropy does."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import torchloss_fused as tlf

from .helpers import random_logits, random_targets


@pytest.mark.parametrize("weight", [False, True])
def test_all_targets_ignored(device, backend, weight):
    x = random_logits((6, 9), torch.float32, device)
    y = torch.full((6,), -100, device=device)
    w = torch.rand(9, device=device) if weight else None
    mean = tlf.cross_entropy(x, y, weight=w)
    assert torch.isnan(mean)
    assert tlf.cross_entropy(x, y, weight=w, reduction="sum").item() == 0
    none = tlf.cross_entropy(x, y, weight=w, reduction="none")
    assert torch.equal(none, torch.zeros(6, device=device))
    for reduction in ("sum", "none"):
        loss = tlf.cross_entropy(x, y, weight=w, reduction=reduction, label_smoothing=0.1)
        (g,) = torch.autograd.grad(loss.sum(), x)
        assert torch.equal(g, torch.zeros_like(x))
    # mean: PyTorch's gradient is 0/0 there too; ours must be zeros or NaN like it, never junk
    (g,) = torch.autograd.grad(mean, x)
    (g_ref,) = torch.autograd.grad(F.cross_entropy(x, y, weight=w), x)
    assert torch.equal(torch.nan_to_num(g), torch.nan_to_num(g_ref)) or (g == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(0, 5), (0, 5, 3), (4, 5, 0)])
def test_empty_batch(device, backend, reduction, shape):
    x = random_logits(shape, torch.float32, device)
    tshape = (shape[0], *shape[2:])
    y = torch.zeros(tshape, dtype=torch.long, device=device)
    ours = tlf.cross_entropy(x, y, reduction=reduction)
    ref = F.cross_entropy(x.detach(), y, reduction=reduction)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    assert torch.equal(ours.isnan(), ref.isnan())
    if reduction == "sum":
        assert ours.item() == 0
    (g,) = torch.autograd.grad(ours.sum(), x)
    assert g.shape == x.shape


def test_no_classes_all_ignored(device, backend):
    x = random_logits((3, 0), torch.float32, device)
    y = torch.full((3,), -100, device=device)
    ours = tlf.cross_entropy(x, y, reduction="none")
    assert torch.equal(ours, F.cross_entropy(x.detach(), y, reduction="none"))


@pytest.mark.parametrize("bad", [5, -3, 1000])
@pytest.mark.parametrize("tdtype", [torch.int64, torch.int32])
def test_target_out_of_range_raises_index_error(backend, bad, tdtype):
    x = random_logits((4, 5), torch.float32, "cpu")
    y = torch.tensor([0, 1, bad, 2], dtype=tdtype)
    with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
        tlf.cross_entropy(x, y)
    with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
        tlf.cross_entropy(x, y, weight=torch.ones(5), reduction="none")
    with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
        tlf.focal_loss(x, y)
    with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
        with torch.no_grad():
            tlf.cross_entropy(x, y)


def test_uint8_target_out_of_range(backend):
    x = random_logits((2, 5), torch.float32, "cpu")
    with pytest.raises(IndexError, match="Target 200 is out of bounds"):
        tlf.cross_entropy(x, torch.tensor([1, 200], dtype=torch.uint8))


def test_ignore_index_inside_class_range(device, backend):
    x = random_logits((50, 7), torch.float32, device)
    y = random_targets((50,), 7, device)
    ours = tlf.cross_entropy(x, y, ignore_index=2)
    ref = F.cross_entropy(x.detach(), y, ignore_index=2)
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_nan_and_inf_logits(device, backend, dtype):
    x = random_logits((6, 6), dtype, device, requires_grad=False)
    x[0, 2] = float("nan")  # poisons row 0
    x[1, :3] = float("-inf")  # partly -inf: finite
    x[2, :] = float("-inf")  # all -inf: NaN, as in PyTorch
    x[3, 4] = float("inf")  # +inf: NaN, as in PyTorch
    x[5, 0] = float("inf")  # +inf off the target: NaN too (not +inf)
    y = torch.tensor([1, 4, 0, 4, 5, 3], device=device)
    x.requires_grad_()
    ours = tlf.cross_entropy(x, y, reduction="none")
    ref = F.cross_entropy(x.detach().double(), y, reduction="none")
    assert torch.equal(ours.isnan(), ref.isnan()), (ours, ref)
    torch.testing.assert_close(ours[[1, 4]].double(), ref[[1, 4]], rtol=1e-2, atol=1e-2)
    (g,) = torch.autograd.grad(ours.sum(), x)
    assert g[0].isnan().all() and torch.isfinite(g[[1, 4]]).all()
    assert g[5].isnan().all(), g[5]  # as F.cross_entropy's gradient
    assert (g[1, :3] == 0).all()


def test_partly_neg_inf_with_smoothing_is_inf_like_pytorch(device, backend):
    x = random_logits((2, 6), torch.float32, device, requires_grad=False)
    x[0, 0] = float("-inf")
    y = torch.tensor([1, 2], device=device)
    ours = tlf.cross_entropy(x, y, reduction="none", label_smoothing=0.1)
    ref = F.cross_entropy(x, y, reduction="none", label_smoothing=0.1)
    assert torch.equal(ours.isinf(), ref.isinf())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_input_and_target(device, backend, dtype):
    base = random_logits((40, 30), dtype, device, requires_grad=False)
    x = base.t().contiguous().t()[::2, 1:].requires_grad_()  # row stride 2*40, class stride 1?
    x2 = random_logits((29, 41), dtype, device, requires_grad=False).t().requires_grad_()
    for xi in (x, x2):
        C = xi.shape[1]
        yb = random_targets((xi.shape[0] * 3,), C, device)
        y = yb[::3]  # strided target
        ours = tlf.cross_entropy(xi, y, label_smoothing=0.1, weight=torch.rand(C, dtype=dtype,
                                                                               device=device))
        (g,) = torch.autograd.grad(ours, xi)
        xr = xi.detach().contiguous().requires_grad_()
        ref = tlf.cross_entropy(xr, y.contiguous(), label_smoothing=0.1,
                                weight=torch.rand(C, dtype=dtype, device=device).copy_(
                                    torch.rand(C)))
        del ref
        xo = xi.detach().double().requires_grad_()
        w = torch.ones(C, dtype=torch.float64, device=device)
        oracle = F.cross_entropy(xo, y, weight=w, label_smoothing=0.1)
        (g_or,) = torch.autograd.grad(oracle, xo)
        assert g.shape == xi.shape
        if dtype == torch.float32:
            plain = tlf.cross_entropy(xi, y, label_smoothing=0.1)
            (gp,) = torch.autograd.grad(plain, xi)
            torch.testing.assert_close(plain.double(), oracle.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(gp.double(), g_or, rtol=1e-5, atol=1e-7)


def test_expanded_target_and_stride0_grad_output(device, backend):
    x = random_logits((8, 5, 4), torch.float32, device)
    y = torch.randint(0, 5, (1, 4), device=device).expand(8, 4)  # stride 0 on the batch
    loss = tlf.cross_entropy(x, y, reduction="none")
    g_out = torch.rand((), device=device).expand(8, 4)  # stride-0 grad_output
    (g,) = torch.autograd.grad(loss, x, g_out)
    xr = x.detach().double().requires_grad_()
    ref = F.cross_entropy(xr, y, reduction="none")
    (g_ref,) = torch.autograd.grad(ref, xr, g_out.double())
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=1e-7)


def test_expanded_probability_target(device, backend):
    x = random_logits((6, 10), torch.float32, device)
    t = torch.softmax(torch.randn(1, 10, device=device), 1).expand(6, 10)
    ours = tlf.cross_entropy(x, t)
    ref = F.cross_entropy(x.detach().double(), t.double())
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)


def test_one_class(device, backend):
    x = random_logits((4, 1), torch.float32, device)
    y = torch.zeros(4, dtype=torch.long, device=device)
    ours = tlf.cross_entropy(x, y)
    assert ours.item() == 0
    (g,) = torch.autograd.grad(ours, x)
    assert torch.equal(g, torch.zeros_like(g))


def test_probability_target_with_requires_grad(device, backend):
    x = random_logits((5, 7), torch.float64, device)
    t = torch.softmax(torch.randn(5, 7, dtype=torch.float64, device=device), 1).requires_grad_()
    gx, gt = torch.autograd.grad(tlf.cross_entropy(x, t, label_smoothing=0.2), (x, t))
    x2, t2 = x.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    gx2, gt2 = torch.autograd.grad(F.cross_entropy(x2, t2, label_smoothing=0.2), (x2, t2))
    torch.testing.assert_close(gx, gx2)
    torch.testing.assert_close(gt, gt2)


def test_weight_requiring_grad_is_supported(device, backend):
    x = random_logits((9, 4), torch.float64, device)
    y = random_targets((9,), 4, device)
    w = torch.rand(4, dtype=torch.float64, device=device, requires_grad=True)
    loss = tlf.cross_entropy(x, y, weight=w, label_smoothing=0.1)
    gw, gx = torch.autograd.grad(loss, (w, x))
    w2, x2 = w.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    # F.cross_entropy cannot differentiate its weight: the same loss written out.
    logp = torch.log_softmax(x2, 1)
    denom = w2[y].sum()
    nll = -(w2[y] * logp.gather(1, y[:, None]).squeeze(1)).sum() / denom
    smooth = -(logp * w2).sum() / denom
    ref = 0.9 * nll + 0.1 / 4 * smooth
    gw2, gx2 = torch.autograd.grad(ref, (w2, x2))
    torch.testing.assert_close(gw, gw2)
    torch.testing.assert_close(gx, gx2)


def test_inplace_backward_conflict_fails_loudly(device, backend):
    """If another op saved the logits and runs its backward after ours, the in-place
    gradient must raise the usual version error, never give silently wrong gradients."""
    x = random_logits((4, 6), torch.float32, device)
    logits = x * 1.0
    y = random_targets((4,), 6, device)
    other = logits.sin().sum()  # saves logits; its backward runs after the loss's
    loss = tlf.cross_entropy(logits, y, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (other + loss).backward()


def test_huge_label_smoothing_extremes(device, backend):
    x = random_logits((7, 13), torch.float32, device)
    y = random_targets((7,), 13, device)
    for ls in (0.0, 1.0):
        torch.testing.assert_close(
            tlf.cross_entropy(x, y, label_smoothing=ls),
            F.cross_entropy(x, y, label_smoothing=ls))
    assert math.isfinite(tlf.cross_entropy(x, y, label_smoothing=1.0).item())
