"""Rows of 33 to kChunkClasses (1024) classes go through the CPU row kernels' fused forward
a chunk of kRowChunk rows at a time (csrc/cpu/kernels_impl.h, softmax_loss_fwd_rows):
each row's max-and-sum pass, then each row's log, loss and gradient. Checked: a row's
loss, lse and gradient are bitwise those of the same row alone (a call of one row has a
chunk of one) whatever its neighbours, on every path through the loop (the one-exp path,
the others with label smoothing or a soft cap, focal rows, ignored rows, no gradient);
an out-of-range target anywhere in a chunk is reported as the first one, before any
gradient is handed out; results match F."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchloss_fused as tlf
from torchloss_fused import _backend

pytestmark = pytest.mark.skipif(not _backend.has_kernels("cpu"),
                                reason="the chunked loop is the compiled CPU kernels'")

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# above the column kernels' short rows (32), up to the chunks' limit (1024), and beyond it
CLASSES = [33, 100, 1024, 1025]
OPTIONS = {
    "plain": {},
    "ignore": {"ignore_index": 3},
    "weight+z_loss": {"weight": True, "z_loss": 1e-3},
    "smoothing": {"label_smoothing": 0.1},
    "softcap": {"softcap": 4.0},
    "focal": {"gamma": 2.0},
}


def _inputs(N, C, dtype, opts, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = torch.randint(0, C, (N,), generator=g)
    kw = {k: v for k, v in opts.items() if k != "weight"}
    if "ignore_index" in kw:
        t[1::3] = kw["ignore_index"]
    if opts.get("weight"):
        kw["weight"] = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return x, t, kw


def _loss_fn(kw):
    if "gamma" in kw:
        return tlf.focal_loss
    return tlf.cross_entropy


def _rows(x, t, kw, reduction):
    x = x.detach().clone().requires_grad_()
    loss = _loss_fn(kw)(x, t, reduction=reduction, **kw)
    (loss.sum() if reduction == "none" else loss).backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", CLASSES)
@pytest.mark.parametrize("opt", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_a_row_is_the_same_alone_as_in_its_chunk(dtype, C, opt, reduction):
    N = 11  # chunks of 4, 4 and 3 on one thread; other splits on two
    x, t, kw = _inputs(N, C, dtype, OPTIONS[opt], seed=C)
    loss, grad = _rows(x, t, kw, reduction)
    for i in range(N):
        li, gi = _rows(x[i:i + 1], t[i:i + 1], kw, reduction)
        assert torch.equal(gi[0], grad[i]), (opt, i)
        if reduction == "none":
            assert torch.equal(li[0], loss[i]), (opt, i)
    with torch.no_grad():  # the forward without a gradient: no kept exp terms
        plain = _loss_fn(kw)(x, t, reduction="none", **kw)
        alone = torch.cat([_loss_fn(kw)(x[i:i + 1], t[i:i + 1], reduction="none", **kw)
                           for i in range(N)])
    assert torch.equal(plain, alone)
    if reduction == "none":
        assert torch.equal(plain, loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("C", [33, 100])
def test_lse_is_the_same_alone_as_in_its_chunk(dtype, C):
    x, t, _ = _inputs(9, C, dtype, {}, seed=1)
    x = x.requires_grad_()
    _, lse = tlf.cross_entropy(x, t, reduction="none", return_lse=True)
    for i in range(9):
        _, li = tlf.cross_entropy(x[i:i + 1], t[i:i + 1], reduction="none", return_lse=True)
        assert torch.equal(li[0], lse[i])


@pytest.mark.parametrize("C", [33, 100, 1025])
@pytest.mark.parametrize("opt", ["plain", "ignore", "smoothing"])
def test_matches_f_in_float64(C, opt):
    x, t, kw = _inputs(10, C, torch.float64, OPTIONS[opt], seed=7)
    loss, grad = _rows(x, t, kw, "mean")
    xr = x.detach().clone().requires_grad_()
    ref = F.cross_entropy(xr, t, **kw)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, xr.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad_rows", [(5,), (2, 6), (0,), (8,)])
@pytest.mark.parametrize("with_grad", [True, False])
def test_first_out_of_range_target_is_reported(bad_rows, with_grad):
    x, t, _ = _inputs(9, 100, torch.float32, {}, seed=3)
    x.requires_grad_(with_grad)
    for k, r in enumerate(bad_rows):
        t[r] = 100 + k  # each its own value, so the message names the row
    with pytest.raises(IndexError, match=f"Target {100} is out of bounds"):
        tlf.cross_entropy(x, t, reduction="none")
    assert x.grad is None
