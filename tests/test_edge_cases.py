"""The edge cases of DESIGN.md §5, each against what F.cross_entropy does."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import torchloss_fused as tlf
from torchloss_fused import reference

from .helpers import oracle_cross_entropy, random_logits, random_targets


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


# mean over no counted target is NaN (0 / 0), yet F's gradient is exactly zero whatever the
# upstream gradient (its backward never touches ignored rows). A negative, zero or NaN
# upstream gradient once gave NaN rows here (-inf / +inf in the fused gradient's rescale).
@pytest.mark.parametrize("path", ["fused", "return_lse", "no_grad", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_smoothed_mean_over_zero_weight_is_nan_like_pytorch(device, backend, path, dtype):
    # Counted targets whose class weights are all 0: F takes the label-smoothed mean of its
    # NLL term (0/0 = nan) and of its smoothing term (x/0 = inf) apart, and returns nan;
    # one combined sum over 0 would be inf. Gradients: nan where F's are (ignored rows 0).
    x = random_logits((5, 3), dtype, device)
    t = torch.tensor([0, -100, 1, 1, 0], device=device)
    w = torch.tensor([0.0, 0.0, 1.0], dtype=dtype, device=device)
    kw = {"label_smoothing": 0.3}
    if path == "linear":
        h = random_logits((5, 4), dtype, device)
        W = random_logits((3, 4), dtype, device)
        loss = tlf.linear_cross_entropy(h, W, t, class_weight=w, **kw)
        want = F.cross_entropy(h @ W.t(), t, weight=w, **kw)
        inputs, want_inputs = (h, W), (h, W)
    else:
        with torch.set_grad_enabled(path != "no_grad"):
            loss = tlf.cross_entropy(x, t, weight=w, return_lse=path == "return_lse", **kw)
        loss = loss[0] if path == "return_lse" else loss
        want = F.cross_entropy(x, t, weight=w, **kw)
        inputs = want_inputs = (x,)
    assert torch.isnan(want) and torch.isnan(loss), (loss, want)
    if path == "no_grad":
        return
    grads = torch.autograd.grad(loss, inputs)
    want_grads = torch.autograd.grad(want, want_inputs)
    for g, wg in zip(grads, want_grads):
        assert torch.equal(g.isnan(), wg.isnan())
        assert torch.equal(g[~g.isnan()], wg[~wg.isnan()])


@pytest.mark.parametrize("upstream", [1.0, 0.7, -2.0, 0.0, float("nan")])
@pytest.mark.parametrize("case", ["ce", "ce_smooth_weight", "ce_inplace", "focal", "linear"])
def test_mean_all_ignored_gradient_is_zero(device, backend, case, upstream):
    x = random_logits((6, 9), torch.float32, device).requires_grad_(True)
    y = torch.full((6,), 4, device=device)
    w = torch.rand(9, device=device) + 0.5
    if case == "linear":
        h = torch.randn(6, 5, device=device, requires_grad=True)
        head = torch.randn(9, 5, device=device, requires_grad=True)
        loss = tlf.linear_cross_entropy(h, head, y, ignore_index=4, class_weight=w)
        inputs = (h, head)
    else:
        fn = {"ce": lambda: tlf.cross_entropy(x, y, ignore_index=4),
              "ce_smooth_weight": lambda: tlf.cross_entropy(x, y, weight=w, ignore_index=4,
                                                            label_smoothing=0.2),
              "ce_inplace": lambda: tlf.cross_entropy(x * 1, y, ignore_index=4,
                                                      inplace_backward=True),
              "focal": lambda: tlf.focal_loss(x, y, gamma=2.0, ignore_index=4)}[case]
        loss, inputs = fn(), (x,)
        ref = F.cross_entropy(x, y, ignore_index=4)
        (g_ref,) = torch.autograd.grad(ref * upstream, x)
        assert torch.equal(g_ref, torch.zeros_like(x))  # (what F does)
    assert torch.isnan(loss)
    for g in torch.autograd.grad(loss * upstream, inputs):
        assert torch.equal(g, torch.zeros_like(g)), g


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


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(3, 0), (0, 0), (0,)])
def test_no_classes_all_ignored(device, backend, shape, smoothing, reduction):
    """No classes, so every target is ignored. With label smoothing F's loss is nan in every
    row and reduction (it scales the masked smoothing term by label_smoothing / C)."""
    x = random_logits(shape, torch.float32, device)
    y = torch.full(shape[:-1], -100, device=device)
    kw = {"reduction": reduction, "label_smoothing": smoothing}
    ours = tlf.cross_entropy(x, y, **kw)
    ref = F.cross_entropy(x.detach(), y, **kw)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    assert torch.equal(ours.isnan(), ref.isnan())
    assert torch.equal(ours.nan_to_num(), ref.nan_to_num())
    loss, lse = tlf.cross_entropy(x, y, return_lse=True, **kw)
    assert torch.equal(loss.isnan(), ref.isnan()) and lse.shape == shape[:-1]
    (g,) = torch.autograd.grad(ours.sum(), x)
    assert g.shape == x.shape


# A nan or infinite upstream gradient (a sum divided by a count of 0: Hugging Face's
# `/ num_items_in_batch` for a batch whose labels are all masked, a per-sequence mean of a
# padded sequence) leaves F's gradient zero on the ignored rows: nll_loss's backward never
# writes them, and F.linear's products of zero rows are zero. Here the fused gradient's
# rescale once made them nan (0 * inf), which an optimizer step spreads to every weight.
@pytest.mark.parametrize("upstream", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("all_ignored", [False, True], ids=["some-ignored", "all-ignored"])
@pytest.mark.parametrize("case", ["ce", "ce_smooth_weight", "ce_lse", "ce_inplace", "focal",
                                  "linear"])
def test_ignored_rows_stay_zero_whatever_the_upstream(device, backend, case, all_ignored,
                                                      reduction, upstream):
    x = random_logits((6, 9), torch.float32, device)
    y = random_targets((6,), 9, device)
    y[::2] = 4 if case != "ce_smooth_weight" else -100
    ignore = 4 if case != "ce_smooth_weight" else -100
    if all_ignored:
        y.fill_(ignore)
    w = torch.rand(9, device=device) + 0.5
    h = torch.randn(6, 5, device=device, requires_grad=True)
    head = torch.randn(9, 5, device=device, requires_grad=True)
    kw = {"reduction": reduction, "ignore_index": ignore}
    if case == "linear":
        loss, inputs = tlf.linear_cross_entropy(h, head, y, **kw), (h, head)
    else:
        loss = {"ce": lambda: tlf.cross_entropy(x, y, **kw),
                "ce_smooth_weight": lambda: tlf.cross_entropy(x, y, weight=w,
                                                              label_smoothing=0.2, **kw),
                "ce_lse": lambda: tlf.cross_entropy(x, y, return_lse=True, **kw)[0],
                "ce_inplace": lambda: tlf.cross_entropy(x * 1, y, inplace_backward=True, **kw),
                "focal": lambda: tlf.focal_loss(x, y, **kw)}[case]()
        inputs = (x,)
    g = torch.full(loss.shape, upstream, device=device)
    if reduction == "none":
        g[1] = 1.5  # (a row with a finite upstream beside them)
    grads = torch.autograd.grad(loss, inputs, g)
    ignored = y == ignore
    # (F's, for the record: zero on the ignored rows)
    ref_loss = F.cross_entropy(x, y, ignore_index=ignore, reduction=reduction)
    (g_ref,) = torch.autograd.grad(ref_loss, x, g)
    assert torch.equal(g_ref[ignored], torch.zeros_like(g_ref[ignored]))
    assert torch.equal(grads[0][ignored], torch.zeros_like(grads[0][ignored])), grads[0]
    if all_ignored:  # (linear: the head's gradient is a sum of zero rows, zero in F too)
        for grad in grads:
            assert torch.equal(grad, torch.zeros_like(grad)), grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(3, 0), (0, 4), (2, 0, 3), (0, 0)])
def test_empty_input_probability_targets(device, backend, reduction, shape):
    """F's mean over probability targets divides by input.numel() / C and is nan for an
    empty input, also when only the class dimension is empty (rows, but no classes)."""
    x = random_logits(shape, torch.float32, device)
    p = torch.rand(shape, device=device)
    ours = tlf.cross_entropy(x, p, reduction=reduction)
    ref = F.cross_entropy(x.detach(), p, reduction=reduction)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    assert torch.equal(ours.isnan(), ref.isnan())
    assert torch.equal(ours.nan_to_num(), ref.nan_to_num())


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


@pytest.mark.parametrize("tdtype, ignore_index", [(torch.uint8, -100),
                                                   (torch.int32, 2**32 + 3)])
def test_narrow_targets_count_as_the_kernels_count_them(device, backend, tdtype, ignore_index):
    # Compared in its own dtype, a uint8 target would wrap -100 to 156 (and an int32 one
    # 2**32 + 3 to 3): the mean's denominator would drop rows whose loss the kernels add.
    x = random_logits((6, 200), torch.float64, device)
    y = torch.tensor([156, 3, 156, 7, 3, 0], device=device)
    w = torch.rand(200, dtype=torch.float64, device=device) + 0.5
    hidden = random_logits((6, 16), torch.float64, device)
    head = random_logits((200, 16), torch.float64, device)
    losses = [
        lambda t: tlf.cross_entropy(x, t, ignore_index=ignore_index),
        lambda t: tlf.cross_entropy(x, t, weight=w, ignore_index=ignore_index),
        lambda t: tlf.focal_loss(x, t, ignore_index=ignore_index),
        lambda t: tlf.linear_cross_entropy(hidden, head, t, ignore_index=ignore_index),
    ]
    for loss in losses:
        with torch.no_grad():
            want = loss(y)
            assert torch.equal(loss(y.to(tdtype)), want)
        assert torch.equal(loss(y.to(tdtype)).detach(), want)
    assert torch.equal(tlf.cross_entropy(x, y.to(tdtype), ignore_index=ignore_index).detach(),
                       F.cross_entropy(x.detach(), y))


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


@pytest.mark.parametrize("fill", ["nan", "inf", "all_nan", "all_inf", "all_neg_inf"])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1},
                                     {"return_lse": True}, {"inplace_backward": True}])
def test_ignored_row_gradient_is_zero_whatever_its_logits(device, backend, fill, options):
    """An ignored row contributes nothing, so its gradient is exactly zero, also when its
    logits hold NaN, +inf or only -inf (masked padding). (F.cross_entropy gives NaN there:
    its log_softmax backward multiplies the row's NaN probabilities by zero.) The other
    rows are unaffected."""
    x = random_logits((4, 7), torch.float32, device, requires_grad=False)
    value = {"nan": float("nan"), "inf": float("inf")}.get(fill.removeprefix("all_"),
                                                             float("-inf"))
    if fill.startswith("all_"):
        x[1] = value
    else:
        x[1, 3] = value
    y = torch.tensor([2, -100, 5, 0], device=device)
    x = x.requires_grad_()
    out = tlf.cross_entropy(x * 1, y, reduction="none", **options)
    loss = out[0] if options.get("return_lse") else out
    (g,) = torch.autograd.grad(loss.sum(), x, retain_graph=True)
    assert torch.equal(g[1], torch.zeros_like(g[1])), g[1]
    keep = [0, 2, 3]
    xr = x[keep].detach().double().requires_grad_()
    (g_ref,) = torch.autograd.grad(F.cross_entropy(
        xr, y[keep], reduction="none",
        label_smoothing=options.get("label_smoothing", 0)).sum(), xr)
    torch.testing.assert_close(g[keep].double(), g_ref, rtol=1e-5, atol=1e-6)
    if options.get("return_lse"):
        # a zero lse gradient leaves the row zero; a nonzero one reaches it
        (g2,) = torch.autograd.grad(loss.sum() + (out[1] * 0).sum(), x, retain_graph=True)
        assert torch.equal(g2[1], g[1]), g2[1]
        torch.testing.assert_close(g2, g)
        (g3,) = torch.autograd.grad(out[1].sum(), x)
        assert not torch.equal(g3[1], torch.zeros_like(g3[1]))


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
    # float32 p_t - 1 near p_t = 1: a few ulps of 1 (seen on CUDA: 4.6e-7)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=1e-6)


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


def test_reference_rows_are_contiguous_as_the_fake_kernels_say(backend):
    """The reference ops' per-row outputs are contiguous whatever the target's strides, as
    their fake kernels promise (torch.compile and opcheck check it; one chunk's rows had
    kept a transposed target's strides)."""
    x3 = torch.randn(4, 5, 3)
    t = torch.randint(0, 5, (3, 4)).t()  # (4, 3), not contiguous
    for loss, lse in (reference.ce_fwd(x3, t, None, -100, 0.0, 0.0, 0.0, 1.0),
                      reference.focal_fwd(x3, t, None, 1.0, 2.0, -100)):
        assert loss.is_contiguous() and lse.is_contiguous()


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("case", ["ce", "ce_lse", "focal"])
def test_target_written_before_backward_raises_as_in_f(device, backend, case, reduction):
    """A class-index target written in place between forward and backward (a reused label
    buffer): F raises autograd's version error. Ours kept the target as a plain attribute
    and rescaled by its new ignored rows: those kept the gradient made for an upstream of
    1, a third of the right one here."""
    x = random_logits((6, 5), torch.float32, device)
    t = random_targets((6,), 5, device)
    calls = {"ce": lambda: tlf.cross_entropy(x * 1, t, reduction=reduction),
             "ce_lse": lambda: tlf.cross_entropy(x * 1, t, reduction=reduction,
                                                 return_lse=True)[0],
             "focal": lambda: tlf.focal_loss(x * 1, t, reduction=reduction)}
    loss = calls[case]()
    t[:3] = -100
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss.sum() * 3).backward()
    t2 = random_targets((6,), 5, device)
    f_loss = F.cross_entropy(x * 1, t2, reduction=reduction)
    t2[:3] = -100
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (f_loss.sum() * 3).backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("path", ["fused", "inplace", "return_lse"])
@pytest.mark.parametrize("targets", ["zero_weight", "all_ignored"])
@pytest.mark.parametrize("extra", ["label_smoothing", "z_loss"])
def test_weighted_two_term_mean_over_zero_weight_is_nan_with_f_gradient(
        backend, extra, targets, path, scale, dtype):
    """Counted targets that weigh 0 in all, with label smoothing or a z-loss: the mean is
    nan (F's mean is 0/0, whatever the other term's) and so is F's gradient on the counted
    rows, elementwise; an ignored row keeps its zeros (all of them where every target is
    ignored). inplace_backward's path had given every row a zero gradient with smoothing;
    with a z-loss the mean was inf on every path, and then the fused path's counted rows
    (the C++ and the reference kernels, with or without return_lse) got inf where F's are
    nan (1/0 times the z term's gradient, nan only at the target)."""
    torch.manual_seed(0)
    x = torch.randn(5, 5, dtype=dtype)
    t = torch.tensor([0, 0, 2, -100, 2]) if targets == "zero_weight" else torch.full((5,), -100)
    w = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0], dtype=dtype)
    opts = {"label_smoothing": 0.5} if extra == "label_smoothing" else {"z_loss": 1e-3}
    ref = x.to(torch.float64, copy=True).requires_grad_()
    (oracle_cross_entropy(ref, t, weight=w, **opts)[0] * scale).backward()
    leaf = x.clone().requires_grad_()
    out = tlf.cross_entropy(leaf * 1, t, weight=w, inplace_backward=path == "inplace",
                            return_lse=path == "return_lse", **opts)
    loss = out[0] if path == "return_lse" else out
    (loss * scale).backward()
    assert torch.isnan(loss)
    counted = t != -100
    assert torch.isnan(ref.grad[counted]).all() and (ref.grad[~counted] == 0).all()
    torch.testing.assert_close(leaf.grad, ref.grad.to(dtype), equal_nan=True)
    assert not torch.signbit(leaf.grad[~counted]).any()  # +0, as F's


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("targets", ["zero_weight", "all_ignored"])
@pytest.mark.parametrize("extra", ["label_smoothing", "z_loss"])
def test_linear_ce_weighted_two_term_mean_over_zero_weight_is_nan(backend, extra, targets,
                                                                  scale):
    """linear_cross_entropy's mean in the case above: nan, as the composed F's, and so are
    its gradients, elementwise (an ignored row's hidden gradient zero). With a z-loss the
    head's gradient had -inf where F's is nan (from the logits' inf gradient)."""
    torch.manual_seed(3)  # (a draw where the head's gradient had -inf beside nan)
    h = torch.randn(5, 4, dtype=torch.float64)
    head = torch.randn(5, 4, dtype=torch.float64)
    t = torch.tensor([0, 0, 2, -100, 2]) if targets == "zero_weight" else torch.full((5,), -100)
    w = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    opts = {"label_smoothing": 0.5} if extra == "label_smoothing" else {"z_loss": 1e-3}
    ref_h, ref_w = h.clone().requires_grad_(), head.clone().requires_grad_()
    ref = oracle_cross_entropy(ref_h @ ref_w.T, t, weight=w, **opts)[0]
    (ref * scale).backward()
    leaf_h, leaf_w = h.clone().requires_grad_(), head.clone().requires_grad_()
    loss = tlf.linear_cross_entropy(leaf_h, leaf_w, t, class_weight=w, **opts)
    (loss * scale).backward()
    assert torch.isnan(ref) and torch.isnan(loss)
    assert ref_w.grad.isnan().all() == (targets == "zero_weight")
    torch.testing.assert_close(leaf_h.grad, ref_h.grad, equal_nan=True)
    torch.testing.assert_close(leaf_w.grad, ref_w.grad, equal_nan=True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("learned", ["alpha", "prob-target", "weight"])
def test_empty_batch_keeps_learned_arguments_in_the_graph(backend, reduction, learned):
    """A batch of no rows (a rank's empty share): the loss still depends on a learned
    alpha, probability target or weight, as F's formula does, and backward runs (the loss
    had been detached, and backward() raised)."""
    x = torch.zeros(0, 3, dtype=torch.float64)
    index = torch.zeros(0, dtype=torch.long)
    if learned == "alpha":
        leaf = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        loss = tlf.focal_loss(x, index, alpha=leaf, reduction=reduction)
    elif learned == "prob-target":
        leaf = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
        loss = tlf.cross_entropy(x, leaf, reduction=reduction)
    else:
        leaf = torch.ones(3, dtype=torch.float64, requires_grad=True)
        loss = tlf.cross_entropy(x, index, weight=leaf, reduction=reduction)
    assert loss.requires_grad
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    assert grad.shape == leaf.shape


@pytest.mark.parametrize("written", ["weight", "prob-target", "alpha"])
def test_weight_or_probability_target_written_before_backward_raises(backend, written):
    """A weight, alpha or probability target written in place between forward and backward
    raises autograd's error on every step, as F's saved ones do. The fused path, whose
    backward does not unpack them, had raised only on the steps whose upstream guess was
    wrong (they recompute), so a crash depended on the history of loss scales."""
    x = random_logits((64, 2048), torch.float32, "cpu")
    w = torch.rand(2048) + 0.5
    index = random_targets((64,), 2048, "cpu")
    prob = torch.softmax(torch.randn(64, 2048), 1)
    for scale in (1 / 3, 1 / 4, 1 / 4, 1 / 4, 1 / 3):
        leaf = x.clone().requires_grad_()
        if written == "weight":
            loss, arg = tlf.cross_entropy(leaf, index, weight=w), w
        elif written == "alpha":
            loss, arg = tlf.focal_loss(leaf, index, alpha=w), w
        else:
            loss, arg = tlf.cross_entropy(leaf, prob), prob
        with torch.no_grad():
            arg.mul_(0.9)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            (loss * scale).backward()


@pytest.mark.parametrize("row", ["nan", "-inf", "+inf"])
@pytest.mark.parametrize("path", ["learned-alpha", "learned-weight", "func-grad"])
def test_ignored_non_finite_row_through_autograd_of_the_reference(row, path):
    """An ignored row holding NaN or infinite logits (masked padding) gets exact zeros, and
    a learned alpha or weight a finite gradient, where autograd runs through the reference
    code (a learned alpha or weight, torch.func): the loss masks the row after, but its
    NaN had reached the gradients as 0 * nan, where the kernels write zeros."""
    value = {"nan": math.nan, "-inf": -math.inf, "+inf": math.inf}[row]
    x = torch.tensor([[value, value if row == "-inf" else 1.0, 2.0], [1.0, 2.0, 3.0]],
                     dtype=torch.float64)
    t = torch.tensor([-100, 1])
    leaf = x.clone().requires_grad_()
    if path == "func-grad":
        grads = (torch.func.grad(lambda z: tlf.cross_entropy(z, t))(x),)
    else:
        learned = torch.tensor([0.3, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
        loss = (tlf.focal_loss(leaf, t, alpha=learned) if path == "learned-alpha"
                else tlf.cross_entropy(leaf, t, weight=learned))
        assert loss.isfinite()
        grads = torch.autograd.grad(loss, (leaf, learned))
        assert grads[1].isfinite().all()
    assert torch.equal(grads[0][0], torch.zeros(3, dtype=torch.float64))
    assert grads[0][1].isfinite().all()
