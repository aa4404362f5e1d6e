"""Softmax focal loss: values and gradients against a float64 formula, its laws (gamma=0
is cross-entropy exactly, FL <= CE, finite at saturation) and alpha per class."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchloss_fused as tlf

from .helpers import assert_matches, random_logits, random_targets

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
REDUCTIONS = ["mean", "sum", "none"]


def focal_oracle(x, target, gamma, alpha=None, ignore_index=-100, reduction="mean",
                 dtype=torch.float64):
    """-alpha_t (1 - p_t)^gamma log p_t written with plain autograd ops in `dtype`."""
    x = x.to(dtype)
    C = x.shape[1] if x.dim() > 1 else x.shape[0]
    logp = torch.log_softmax(x, dim=1 if x.dim() > 1 else 0)
    t = target.long()
    valid = t != ignore_index
    safe = t.masked_fill(~valid, 0)
    if x.dim() == 1:
        log_pt = logp[safe]
    else:
        log_pt = logp.gather(1, safe.unsqueeze(1)).squeeze(1)
    pt = log_pt.exp()
    # Clamped where p_t rounds to 1 (one class, say), so float64 autograd gives the
    # gradient 0 there, not 0 * inf = NaN. (1e-300 rounds to 0 below float64: no change.)
    loss = -((1 - pt).clamp_min(1e-300) ** gamma) * log_pt
    if isinstance(alpha, torch.Tensor):
        loss = loss * alpha.to(dtype)[safe]
    elif alpha is not None:
        loss = loss * alpha
    loss = torch.where(valid, loss, 0)
    del C
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.7])
@pytest.mark.parametrize("alpha", [None, 0.25, "per-class"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_against_oracle(device, backend, dtype, gamma, alpha, reduction):
    N, C = 40, 517
    x = random_logits((N, C), dtype, device, scale=2.0)
    y = random_targets((N,), C, device, ignore_frac=0.2)
    if alpha == "per-class":
        alpha = (torch.rand(C, dtype=torch.float64) + 0.1).to(device=device, dtype=dtype)
    ours = tlf.focal_loss(x, y, gamma=gamma, alpha=alpha, reduction=reduction)
    assert ours.dtype == dtype
    g_out = torch.rand_like(ours) + 0.5
    (g,) = torch.autograd.grad(ours, x, g_out)
    res = {}
    for name, dt in (("oracle", torch.float64), ("eager", dtype)):
        xr = x.detach().clone().requires_grad_()
        loss = focal_oracle(xr, y, gamma, alpha, reduction=reduction, dtype=dt)
        (gr,) = torch.autograd.grad(loss, xr, g_out.to(loss.dtype))
        res[name] = (loss.detach(), gr)
    assert_matches(ours.detach(), res["oracle"][0], res["eager"][0], dtype, what="loss")
    assert_matches(g, res["oracle"][1], res["eager"][1], dtype, what="grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 761), (4, 11, 3), (6,), (1000, 2)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gamma_zero_is_cross_entropy_exactly(device, backend, dtype, shape, reduction):
    C = shape[0] if len(shape) == 1 else shape[1]
    x = random_logits(shape, dtype, device)
    tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
    y = random_targets(tshape, C, device, ignore_frac=0.2 if tshape else 0.0)
    fl = tlf.focal_loss(x, y, gamma=0.0, reduction=reduction)
    ce = tlf.cross_entropy(x, y, reduction=reduction)
    assert torch.equal(fl, ce), (fl, ce)
    g_out = torch.rand_like(ce)
    (g_fl,) = torch.autograd.grad(fl, x, g_out)
    (g_ce,) = torch.autograd.grad(ce, x, g_out)
    assert torch.equal(g_fl, g_ce)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gamma_zero_is_cross_entropy_bitwise_at_certainty(device, backend, dtype):
    # p_t = 1 exactly: cross-entropy is lse - s_t = +0.0, and so must focal be (not -0.0).
    x = torch.tensor([[0.0, -200.0, -300.0], [5.0, -100.0, -120.0], [1.0, 2.0, 3.0]],
                     dtype=dtype, device=device)
    y = torch.tensor([0, 0, 2], device=device)
    fl = tlf.focal_loss(x, y, gamma=0.0, reduction="none")
    ce = tlf.cross_entropy(x, y, reduction="none")
    assert ce[0] == 0 and not ce[0].signbit()
    assert torch.equal(fl, ce) and torch.equal(fl.signbit(), ce.signbit()), (fl, ce)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 5.0])
def test_focal_at_most_cross_entropy(device, backend, dtype, gamma):
    x = random_logits((200, 50), dtype, device, scale=4.0, requires_grad=False)
    y = random_targets((200,), 50, device)
    fl = tlf.focal_loss(x, y, gamma=gamma, reduction="none")
    ce = tlf.cross_entropy(x, y, reduction="none")
    assert (fl <= ce).all()
    assert (fl >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 1.0, 2.0, 4.5])
@pytest.mark.parametrize("magnitude", [30.0, 100.0, 1e4])
def test_saturated_logits_stay_finite(device, backend, dtype, gamma, magnitude):
    C = 9
    mag = min(magnitude, torch.finfo(dtype).max / 4)
    y = torch.arange(6, device=device) % C
    x = torch.full((6, C), -mag, dtype=dtype, device=device)
    x[torch.arange(6), y] = mag  # confidently right
    x[3] = -x[3]  # confidently wrong on one row
    x[5] = mag  # a flat, huge row
    x.requires_grad_()
    loss = tlf.focal_loss(x, y, gamma=gamma, reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss)
    assert torch.isfinite(g).all()
    # right rows contribute (almost) nothing; the wrong row's loss is about 2*mag
    per_row = tlf.focal_loss(x.detach(), y, gamma=gamma, reduction="none")
    assert per_row[0] == 0
    assert per_row[3] > mag


def test_alpha_per_class_scales_rows(device, backend):
    x = random_logits((30, 8), torch.float32, device, requires_grad=False)
    y = random_targets((30,), 8, device)
    alpha = torch.linspace(0.1, 2.0, 8, device=device)
    plain = tlf.focal_loss(x, y, gamma=2.0, reduction="none")
    weighted = tlf.focal_loss(x, y, gamma=2.0, alpha=alpha, reduction="none")
    torch.testing.assert_close(weighted, plain * alpha[y])
    scalar = tlf.focal_loss(x, y, gamma=2.0, alpha=0.3, reduction="none")
    torch.testing.assert_close(scalar, plain * 0.3)


def test_mean_counts_non_ignored(device, backend):
    x = random_logits((10, 5), torch.float32, device, requires_grad=False)
    y = random_targets((10,), 5, device)
    y[:4] = -1
    none = tlf.focal_loss(x, y, ignore_index=-1, reduction="none")
    assert torch.equal(none[:4], torch.zeros(4, device=device))
    torch.testing.assert_close(tlf.focal_loss(x, y, ignore_index=-1), none.sum() / 6)
    all_ignored = torch.full_like(y, -1)
    assert torch.isnan(tlf.focal_loss(x, all_ignored, ignore_index=-1))


def test_alpha_tensor_requiring_grad(device, backend):
    x = random_logits((12, 6), torch.float64, device)
    y = random_targets((12,), 6, device)
    alpha = torch.rand(6, dtype=torch.float64, device=device, requires_grad=True)
    loss = tlf.focal_loss(x, y, alpha=alpha)
    ga, gx = torch.autograd.grad(loss, (alpha, x))
    a2 = alpha.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    ga2, gx2 = torch.autograd.grad(focal_oracle(x2, y, 2.0, a2), (a2, x2))
    torch.testing.assert_close(ga, ga2)
    torch.testing.assert_close(gx, gx2)


def test_alpha_0dim_tensor_is_a_number(device, backend):
    """A 0-dim alpha is the number it holds; requiring grad, it gets d loss / d alpha."""
    x = random_logits((12, 6), torch.float64, device)
    y = random_targets((12,), 6, device, ignore_frac=0.2)
    number = tlf.focal_loss(x, y, alpha=0.3)
    assert torch.equal(tlf.focal_loss(x, y, alpha=torch.tensor(0.3, dtype=torch.float64)),
                       number)
    alpha = torch.tensor(0.3, dtype=torch.float64, device=device, requires_grad=True)
    loss = tlf.focal_loss(x, y, alpha=alpha)
    ga, gx = torch.autograd.grad(loss, (alpha, x))
    a2 = alpha.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    ga2, gx2 = torch.autograd.grad(focal_oracle(x2, y, 2.0, a2.expand(6)), (a2, x2))
    torch.testing.assert_close(loss, number)
    torch.testing.assert_close(ga, ga2)
    torch.testing.assert_close(gx, gx2)


def test_focal_matches_cross_entropy_in_f_namespace_shape(device, backend):
    # sanity: shapes and dtype as F.cross_entropy(reduction="none") would give
    x = random_logits((2, 4, 3, 5), torch.float32, device, requires_grad=False)
    y = random_targets((2, 3, 5), 4, device)
    assert tlf.focal_loss(x, y, reduction="none").shape == F.cross_entropy(
        x, y, reduction="none").shape


def test_learned_alpha_gradient_of_a_confidently_wrong_row_is_accurate():
    """Through autograd of the reference (a learned alpha), d(1 - p_t) is -p_t itself:
    autograd's slope of expm1, expm1(x) + 1, cancels for a small p_t, and the input's
    gradient was up to 77 float32 eps off at gamma=10 (the kernels' within 3)."""
    x = torch.tensor([[0.0, 16.9]])
    t = torch.tensor([0])
    exact = x.double().requires_grad_()
    (want,) = torch.autograd.grad(tlf.focal_loss(exact, t, gamma=10.0), exact)
    leaf = x.clone().requires_grad_()
    alpha = torch.tensor(1.0, requires_grad=True)
    (got,) = torch.autograd.grad(tlf.focal_loss(leaf, t, gamma=10.0, alpha=alpha), leaf)
    err = (got.double() - want).abs().max() / want.abs().max()
    assert err <= 8 * torch.finfo(torch.float32).eps, err


def test_learnable_alpha_is_checked_as_a_number_is():
    """A 0-dim alpha that requires grad is refused where a number alpha is (NaN), and on a
    device other than the logits' (but the CPU: a CPU scalar goes with them); it had been
    taken, giving a NaN loss, or moved."""
    x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="alpha must be finite"):
        tlf.focal_loss(x, y, alpha=torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(ValueError, match="same device"):
        tlf.focal_loss(x, y, alpha=torch.tensor(0.5, device="meta", requires_grad=True))
    learned = torch.tensor(0.5, requires_grad=True)
    torch.testing.assert_close(tlf.focal_loss(x, y, alpha=learned), tlf.focal_loss(x, y, alpha=0.5))
