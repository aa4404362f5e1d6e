"""Rows laid across memory: (N, C, H, W) logits, classes H * W apart, take the CPU column
kernels (csrc/cpu/column_rows_impl.h: tiles of adjacent rows, a lane each), which were
3-8x slower than F through the row kernels' strided gathers; so do short rows (C <= 32) of
any layout, gathered lane by lane (a (65536, 2) forward+backward was 0.6x F's). Checked:
every option against F and against the pure-PyTorch reference in float64 on the same logits laid
out as (N*H*W, C) rows;
the fused forward's gradient bitwise the split backward's (the tests' retain_graph and
`none` paths); a row's bits independent of where the tiles fall (views shifted by a row,
thread counts); in-place backward; out-of-range targets; non-finite rows; focal loss;
probability targets (in their own layout, float32 beside reduced logits)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import torchloss_fused as tlf
from torchloss_fused import _backend

pytestmark = pytest.mark.skipif(not _backend.has_kernels("cpu"),
                                reason="the column kernels are the compiled CPU kernels'")

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (N, C, H, W): one tile and a part, several tiles per plane and tiles cut by planes, one
# class, the most classes the column kernels take (256) and one beyond (the row kernels)
SHAPES = [(2, 5, 3, 7), (3, 21, 4, 9), (2, 3, 1, 70), (2, 1, 5, 5), (1, 256, 2, 5),
          (1, 257, 2, 5)]
OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "smoothing": {"label_smoothing": 0.1},
    "weight+smoothing+ignore": {"weight": True, "label_smoothing": 0.2, "ignore": True},
    "z_loss": {"z_loss": 1e-3},
    "softcap+scale": {"softcap": 3.0, "logit_scale": 0.7},
    "ignore": {"ignore": True},
}
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _inputs(shape, dtype, opts, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, C, H, W = shape
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, C, (N, H, W), generator=g)
    kw = {k: v for k, v in opts.items() if k in ("label_smoothing", "z_loss", "softcap",
                                                 "logit_scale")}
    if opts.get("ignore"):
        t.view(-1)[::3] = -100
    if opts.get("weight"):
        kw["weight"] = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return x.to(dtype), t, kw


def _loss_and_grad(fn, x, t, reduction, **kw):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, t, reduction=reduction, **kw)
    (loss.sum() if reduction == "none" else loss).backward()
    return loss.detach(), x.grad


def _as_rows(x):
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _laid_out(x, layout):
    """x (N, C, H, W) as the layout asks: the same values, other strides."""
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "transposed rows":  # (N*H*W, C) rows stored class-major: classes apart
        return x.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    return x


def _reference_rows(x, t, reduction, kw, fn=tlf.cross_entropy, dtype=torch.float64):
    """The same values as (N*H*W, C) rows (float64 by default), through the pure-PyTorch
    reference (reference.py: no kernel, column or row, is involved)."""
    kw = {k: (v.to(dtype) if torch.is_tensor(v) else v) for k, v in kw.items()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_backend, "_HAS_KERNELS", {})
        loss, grad = _loss_and_grad(fn, _as_rows(x).to(dtype), t.reshape(-1), reduction, **kw)
    N, C, H, W = x.shape
    return loss, grad.reshape(N, H, W, C).permute(0, 3, 1, 2)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("opt", list(OPTIONS))
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "transposed rows"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_f_and_the_reference(dtype, shape, layout, opt, reduction):
    x, t, kw = _inputs(shape, dtype, OPTIONS[opt])
    x = _laid_out(x, layout)
    loss, grad = _loss_and_grad(tlf.cross_entropy, x, t, reduction, **kw)
    rows_loss, rows_grad = _reference_rows(x, t, reduction, kw)
    kw64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    tol = TOL[dtype]
    torch.testing.assert_close(loss.double().reshape(-1), rows_loss.reshape(-1),
                               rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double(), rows_grad, rtol=tol, atol=tol)
    if not {"softcap", "logit_scale", "z_loss"} & set(kw):  # (F has none of them)
        f_loss, _ = _loss_and_grad(F.cross_entropy, x.double(), t, reduction, **kw64)
        torch.testing.assert_close(loss.double(), f_loss, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opt", ["plain", "weight+smoothing+ignore", "softcap+scale"])
def test_fused_gradient_is_the_split_backwards(dtype, opt):
    """A second backward (retain_graph) recomputes through the split backward: bitwise
    the first's, fused in the forward; so is `none`'s (split) gradient of the same rows."""
    x, t, kw = _inputs((2, 21, 5, 13), dtype, OPTIONS[opt], seed=1)
    _assert_fused_is_split(x, t, kw)


def _assert_fused_is_split(x, t, kw):
    xg = x.clone().requires_grad_()
    loss = tlf.cross_entropy(xg, t, reduction="sum", **kw)
    (first,) = torch.autograd.grad(loss, xg, retain_graph=True)
    (second,) = torch.autograd.grad(loss, xg)
    assert torch.equal(first, second)
    _, split = _loss_and_grad(tlf.cross_entropy, x, t, "none", **kw)
    assert torch.equal(first, split)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_through_the_lse(dtype):
    """return_lse with the lse differentiated too: the split backward's lse-gradient term
    (and ignored rows' zeros), against F and torch.logsumexp."""
    x, t, _ = _inputs((2, 7, 3, 11), dtype, {"ignore": True})
    xg = x.clone().requires_grad_()
    loss, lse = tlf.cross_entropy(xg, t, reduction="none", return_lse=True)
    (loss.sum() + 0.5 * lse.sum()).backward()
    x64 = x.double().requires_grad_()
    ref = F.cross_entropy(x64, t, reduction="none") + 0.5 * torch.logsumexp(x64, 1)
    ref.sum().backward()
    torch.testing.assert_close(xg.grad.double(), x64.grad, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_rows_bits_do_not_depend_on_its_tile(dtype):
    """The same rows in views that shift where the tiles start, and under 1 and 2
    threads (which split the rows elsewhere): bitwise the same losses and gradients."""
    x, t, kw = _inputs((2, 9, 1, 150), dtype, OPTIONS["weight+smoothing+ignore"])
    x3, t2 = x[:, :, 0], t[:, 0]  # (N, C, L)
    full_loss, full_grad = _loss_and_grad(tlf.cross_entropy, x3, t2, "none", **kw)
    for shift in (1, 5, 17):
        loss, grad = _loss_and_grad(tlf.cross_entropy, x3[:, :, shift:], t2[:, shift:], "none",
                                    **kw)
        assert torch.equal(loss, full_loss[:, shift:])
        assert torch.equal(grad, full_grad[:, :, shift:])
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            big, bt, bkw = _inputs((4, 21, 64, 64), dtype, OPTIONS["smoothing"], seed=2)
            results = [_loss_and_grad(tlf.cross_entropy, big, bt, r, **bkw)
                       for r in ("mean", "none")]
            if n == 1:
                first = results
            else:
                for (a, ga), (b, gb) in zip(first, results):
                    assert torch.equal(a, b) and torch.equal(ga, gb)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.7])
@pytest.mark.parametrize("shape", [(2, 10, 3, 11), (90, 10, 1, 1)])
def test_focal_loss(dtype, gamma, shape):
    """Focal's terms are formed a vector of lanes at a time (FocalLanes: gamma 1 and 2 by
    products, others by pow; 1 - p_t by expm1 near p_t = 1): a map's rows and short rows
    against the reference's rows, p_t on both sides of 1/2."""
    x, t, _ = _inputs(shape, dtype, {"ignore": True}, seed=3)
    alpha = torch.rand(10, dtype=torch.float64).to(dtype) + 0.1
    for reduction in ("mean", "none"):
        loss, grad = _loss_and_grad(tlf.focal_loss, x, t, reduction, gamma=gamma, alpha=alpha)
        rows_loss, rows_grad = _reference_rows(x, t, reduction, {"gamma": gamma, "alpha": alpha},
                                               fn=tlf.focal_loss)
        torch.testing.assert_close(loss.double().reshape(-1), rows_loss.reshape(-1),
                                   rtol=TOL[dtype], atol=TOL[dtype])
        torch.testing.assert_close(grad.double(), rows_grad, rtol=TOL[dtype], atol=TOL[dtype])
    if gamma == 0.0:  # focal at gamma 0 without alpha: cross-entropy's bits
        a = _loss_and_grad(tlf.focal_loss, x, t, "sum", gamma=0.0)
        b = _loss_and_grad(tlf.cross_entropy, x, t, "sum")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward(dtype):
    x, t, kw = _inputs((2, 21, 6, 7), dtype, OPTIONS["weight+smoothing+ignore"], seed=4)
    _, want = _loss_and_grad(tlf.cross_entropy, x, t, "mean", **kw)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1  # (a model's output: inplace_backward refuses a leaf)
    tlf.cross_entropy(logits, t, inplace_backward=True, **kw).backward()
    assert torch.equal(leaf.grad, want)
    assert logits.untyped_storage().data_ptr() != 0 and torch.equal(logits.detach(), want)


def test_out_of_range_target_raises():
    x, t, _ = _inputs((2, 5, 3, 7), torch.float32, {})
    for bad in (5, -3):
        t2 = t.clone()
        t2[1, 2, 4] = bad
        with pytest.raises((IndexError, RuntimeError), match="out of bounds|Target"):
            tlf.cross_entropy(x.requires_grad_(), t2)


def test_non_finite_rows_as_the_reference():
    """-inf everywhere but one class, all -inf, NaN and +inf rows: the same NaN/inf
    positions as the reference gives for those rows."""
    x, t, _ = _inputs((1, 4, 1, 40), torch.float32, {})
    x = x.clone()
    x[0, 1:, 0, 0] = float("-inf")
    x[0, :, 0, 1] = float("-inf")
    x[0, 2, 0, 2] = float("nan")
    x[0, 3, 0, 3] = float("inf")
    for reduction in ("none", "sum"):
        loss, grad = _loss_and_grad(tlf.cross_entropy, x, t, reduction)
        rows_loss, rows_grad = _reference_rows(x, t, reduction, {}, dtype=torch.float32)
        torch.testing.assert_close(loss.reshape(-1), rows_loss.reshape(-1), equal_nan=True)
        torch.testing.assert_close(grad, rows_grad, equal_nan=True)


def test_every_index_dtype():
    x, t, _ = _inputs((2, 6, 3, 5), torch.float32, {"ignore": True})
    want = _loss_and_grad(tlf.cross_entropy, x, t, "none", ignore_index=-100)
    for idx in (torch.int32, torch.uint8):
        t2 = t.clone()
        t2[t2 < 0] = 200  # (uint8 holds no -100)
        got = _loss_and_grad(tlf.cross_entropy, x, t2.to(idx), "none", ignore_index=200)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_unused_dims():
    """Combinations the shapes above do not reach: every dtype on a 5-D map."""
    for dtype, red in itertools.product(DTYPES, ("mean", "sum")):
        x = (torch.randn(2, 4, 3, 2, 5, dtype=torch.float64) * 2).to(dtype)
        t = torch.randint(0, 4, (2, 3, 2, 5))
        loss, grad = _loss_and_grad(tlf.cross_entropy, x, t, red)
        f_loss, f_grad = _loss_and_grad(F.cross_entropy, x.double(), t, red)
        torch.testing.assert_close(loss.double(), f_loss, rtol=TOL[dtype], atol=TOL[dtype])
        torch.testing.assert_close(grad.double(), f_grad, rtol=TOL[dtype], atol=TOL[dtype])


# Probability targets (soft labels: mixup, distillation) take the column kernels as well:
# the target's tile is gathered as the logits' is, in its own layout.
PROB_OPTIONS = {
    "plain": {},
    "weight+smoothing": {"weight": True, "label_smoothing": 0.2},
    "z_loss": {"z_loss": 1e-3},
    "softcap+scale": {"softcap": 3.0, "logit_scale": 0.7},
}


def _prob_target(shape, dtype, layout, seed=5):
    g = torch.Generator().manual_seed(seed)
    p = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).softmax(1)
    return _laid_out(p.to(dtype), layout)


def _reference_prob_rows(x, target, reduction, kw, dtype=torch.float64):
    kw = {k: (v.to(dtype) if torch.is_tensor(v) else v) for k, v in kw.items()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_backend, "_HAS_KERNELS", {})
        loss, grad = _loss_and_grad(tlf.cross_entropy, _as_rows(x).to(dtype),
                                    _as_rows(target).to(dtype), reduction, **kw)
    N, C, H, W = x.shape
    return loss, grad.reshape(N, H, W, C).permute(0, 3, 1, 2)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("opt", list(PROB_OPTIONS))
@pytest.mark.parametrize("target_layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "transposed rows"])
@pytest.mark.parametrize("shape", SHAPES + [(40, 10, 1, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_probability_targets(dtype, shape, layout, target_layout, opt, reduction):
    x, _, kw = _inputs(shape, dtype, PROB_OPTIONS[opt])
    x = _laid_out(x, layout)
    target = _prob_target(shape, dtype, target_layout)
    loss, grad = _loss_and_grad(tlf.cross_entropy, x, target, reduction, **kw)
    rows_loss, rows_grad = _reference_prob_rows(x, target, reduction, kw)
    tol = TOL[dtype]
    torch.testing.assert_close(loss.double().reshape(-1), rows_loss.reshape(-1),
                               rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double(), rows_grad, rtol=tol, atol=tol)
    if not {"softcap", "logit_scale", "z_loss"} & set(kw):  # (F has none of them)
        kw64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
        f_loss, f_grad = _loss_and_grad(F.cross_entropy, x.double(), target.double(), reduction,
                                        **kw64)
        torch.testing.assert_close(loss.double(), f_loss, rtol=tol, atol=tol)
        torch.testing.assert_close(grad.double(), f_grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opt", ["plain", "weight+smoothing", "softcap+scale"])
def test_probability_targets_fused_gradient_is_the_split_backwards(dtype, opt):
    x, _, kw = _inputs((2, 21, 5, 13), dtype, PROB_OPTIONS[opt], seed=6)
    _assert_fused_is_split(x, _prob_target((2, 21, 5, 13), dtype, "nchw"), kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_probability_targets_in_float32_beside_reduced_logits(dtype):
    """A float32 target with bf16/fp16 logits is read as float32 (not rounded to the
    logits' dtype), on a map and on short rows."""
    for shape in ((2, 7, 3, 11), (50, 5, 1, 1)):
        x, _, _ = _inputs(shape, dtype, {})
        target = _prob_target(shape, torch.float32, "nchw")
        loss, grad = _loss_and_grad(tlf.cross_entropy, x, target, "none")
        rows_loss, rows_grad = _reference_prob_rows(x, target, "none", {})
        torch.testing.assert_close(loss.double().reshape(-1), rows_loss.reshape(-1),
                                   rtol=TOL[dtype], atol=TOL[dtype])
        torch.testing.assert_close(grad.double(), rows_grad, rtol=TOL[dtype], atol=TOL[dtype])


def test_probability_targets_non_finite_as_the_reference():
    """A NaN or infinite target probability, and -inf/NaN logits: the same NaN/inf
    positions as the reference's rows."""
    x, _, _ = _inputs((1, 4, 1, 40), torch.float32, {})
    target = _prob_target((1, 4, 1, 40), torch.float32, "nchw").clone()
    x = x.clone()
    target[0, 1, 0, 0] = float("nan")
    target[0, 2, 0, 1] = float("inf")
    x[0, 1:, 0, 2] = float("-inf")
    x[0, :, 0, 3] = float("-inf")
    x[0, 2, 0, 4] = float("nan")
    for reduction in ("none", "sum"):
        loss, grad = _loss_and_grad(tlf.cross_entropy, x, target, reduction)
        rows_loss, rows_grad = _reference_prob_rows(x, target, reduction, {},
                                                    dtype=torch.float32)
        torch.testing.assert_close(loss.reshape(-1), rows_loss.reshape(-1), equal_nan=True)
        torch.testing.assert_close(grad, rows_grad, equal_nan=True)
