"""On the CPU a loss gives the same bits whatever the number of threads, as
F.cross_entropy's does (nll_loss sums its rows in one order).

ATen splits a sum of 32768 or more CPU elements among the threads, so the rows' total of a
mean or sum, the summed weights of a weighted mean and the class weights' sum (label
smoothing) changed in their last bits with torch.set_num_threads, and so did the gradient
through the last two: _reduction.ordered_sum and csrc/ordered_sum.cpp sum such tensors in
blocks of a fixed size. The sizes below are past that threshold.
"""

from __future__ import annotations

import pytest
import torch

import torchloss_fused as tlf
from torchloss_fused import _backend, _eager, _reduction

from .helpers import random_logits, random_targets

THREAD_COUNTS = (1, 2, 3)
ROWS = 100000  # rows of a loss (and elements of a sigmoid one): over 32768
WIDE = 40000  # classes: the class weights' sum, over 32768 too


def _cases(dtype):
    """(name, logits shape or the logits, loss of x): each sum that a thread count could
    change."""
    t = random_targets((ROWS,), 7, "cpu", ignore_frac=0.2)
    w = torch.rand(7, dtype=torch.float64).add(0.5).to(dtype)
    # (weights spread over e^±12, drawn so that ATen's own sum of them rounded differently on
    # 1, 2 and 3 threads in both dtypes: checked on the code before ordered_sum)
    g = torch.Generator().manual_seed(5)
    t_wide = torch.randint(0, WIDE, (16,), generator=g)
    w_wide = torch.randn(WIDE, dtype=torch.float64, generator=g).mul(4).exp().to(dtype)
    x_wide = torch.randn(16, WIDE, dtype=torch.float64, generator=g).mul(3).to(dtype)
    prob = torch.softmax(torch.randn(ROWS, 5, dtype=torch.float64), 1).to(dtype)
    t3 = random_targets((4, 25000), 5, "cpu", ignore_frac=0.1)
    yield "ce-mean", (ROWS, 7), lambda x: tlf.cross_entropy(x, t)
    yield "ce-sum", (ROWS, 7), lambda x: tlf.cross_entropy(x, t, reduction="sum")
    yield "ce-weight", (ROWS, 7), lambda x: tlf.cross_entropy(x, t, weight=w)
    yield "ce-wide-weight-smoothing", x_wide, lambda x: tlf.cross_entropy(
        x, t_wide, weight=w_wide, label_smoothing=0.1)
    yield "ce-prob", (ROWS, 5), lambda x: tlf.cross_entropy(x, prob)
    yield "ce-3d", (4, 5, 25000), lambda x: tlf.cross_entropy(x, t3, label_smoothing=0.2)
    yield "focal-alpha", (ROWS, 7), lambda x: tlf.focal_loss(x, t, alpha=w)
    yield "focal-sum", (ROWS, 7), lambda x: tlf.focal_loss(x, t, reduction="sum")


def _logits(shape_or_logits, dtype):
    if isinstance(shape_or_logits, torch.Tensor):
        return shape_or_logits.detach().requires_grad_()
    return random_logits(shape_or_logits, dtype, "cpu")


def _at_each_thread_count(fn):
    threads = torch.get_num_threads()
    try:
        results = []
        for n in THREAD_COUNTS:
            torch.set_num_threads(n)
            results.append(fn())
        return results
    finally:
        torch.set_num_threads(threads)


def _assert_same_bits(results, what):
    for n, got in zip(THREAD_COUNTS[1:], results[1:]):
        for a, b in zip(results[0], got):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True,
                                       msg=f"{what}: {n} threads against 1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_losses_do_not_depend_on_the_thread_count(backend, dtype):
    for name, shape, loss_fn in _cases(dtype):
        x = _logits(shape, dtype)

        def step(x=x, loss_fn=loss_fn):
            loss = loss_fn(x)
            (grad,) = torch.autograd.grad(loss, x)
            with torch.no_grad():
                return loss.detach(), grad, loss_fn(x)

        _assert_same_bits(_at_each_thread_count(step), f"{backend} {name}")


def test_sigmoid_and_linear_losses_do_not_depend_on_the_thread_count(backend):
    # The sigmoid loss's reference path (a target requiring grad) sums its elements in
    # Python; the kernels' sums had a fixed order already. Linear cross-entropy's products
    # (H = 16) are split among threads by outputs, its rows' total is the one above.
    x = random_logits((ROWS,), torch.float32, "cpu")
    p = torch.rand(ROWS, requires_grad=True)
    N, H, V = ROWS, 16, 50
    hidden = torch.randn(N, H, requires_grad=True)
    head = torch.randn(V, H, requires_grad=True)
    t = random_targets((N,), V, "cpu", ignore_frac=0.1)

    def step():
        out = []
        for reduction in ("mean", "sum"):
            loss = tlf.sigmoid_focal_loss(x, p, reduction=reduction)
            out += [loss.detach(), *torch.autograd.grad(loss, (x, p))]
        loss = tlf.linear_cross_entropy(hidden, head, t)
        return out + [loss.detach(), *torch.autograd.grad(loss, (hidden, head))]

    _assert_same_bits(_at_each_thread_count(step), backend)


@pytest.mark.skipif(not _backend.EXTENSION_LOADED, reason="compiled extension not loaded")
def test_the_cpp_and_python_paths_sum_alike(monkeypatch):
    # The eager C++ reduced path (csrc/ordered_sum.cpp) and the general Python path
    # (_reduction.ordered_sum) must keep giving the same bits past the block size too.
    runs = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(_eager._NAMESPACES["torchloss_fused"], "fused_reduced", None)
        torch.manual_seed(7)
        out = []
        for _, shape, loss_fn in _cases(torch.float32):
            x = _logits(shape, torch.float32)
            loss = loss_fn(x)
            out += [loss.detach(), *torch.autograd.grad(loss, x, torch.tensor(2.5))]
        runs.append(out)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("n", [0, 1, 1000, 32767, 32768, 16384 * 5 + 3, "two levels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ordered_sum(n, dtype, monkeypatch):
    if n == "two levels":
        # So many blocks that their sums are summed in blocks again (smaller ones here than
        # the real 16384, which would take 2^28 elements).
        monkeypatch.setattr(_reduction, "_SUM_BLOCK", 64)
        n = 64 * 32768 + 5
    v = torch.randn(n, dtype=dtype).exp_()
    got = _at_each_thread_count(lambda: (_reduction.ordered_sum(v),))
    _assert_same_bits(got, f"n={n}")
    if n < 32768:  # (what ATen sums on one thread anyway: its own bits)
        assert torch.equal(got[0][0], v.sum())
    exact = v.double().sum()
    torch.testing.assert_close(got[0][0].double(), exact, rtol=20 * torch.finfo(dtype).eps,
                               atol=0)
    # An element's inf or nan is the total's, as in v.sum().
    if n >= 2:
        v[n // 2] = float("inf")
        assert _reduction.ordered_sum(v).item() == float("inf")
        v[n // 3] = float("nan")
        assert _reduction.ordered_sum(v).isnan()
