"""linear_cross_entropy with probability targets (soft labels, distillation) against
F.cross_entropy(F.linear(...), probabilities) in float64: values and gradients over dtypes,
reductions, options, chunk sizes and target dtypes; F's dtype promotion; a target's own
gradient; memory, torch.compile, the ops and validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchloss_fused as tlf
from torchloss_fused.linear_ce import ops as lce_ops

from .helpers import assert_matches, oracle_cross_entropy
from .test_linear_cross_entropy import (
    _cpu_allocations,
    class_weights,
    largest_allowed_allocation,
    linear_leaves,
    make,
)

REDUCTIONS = ["mean", "sum", "none"]


def soft_target(shape, V, dtype, device, sharp=2.0):
    """Fresh class probabilities (rows sum to 1, no zeros), rounded to `dtype`."""
    logits = torch.randn(*shape, V, dtype=torch.float64) * sharp
    return torch.softmax(logits, -1).to(device=device, dtype=dtype)


def oracle(hidden, weight, target, bias, dtype, reduction, class_weight=None, **opts):
    """F.linear then F.cross_entropy (+ z_loss, softcap: tests/helpers.py) in `dtype`
    (float64: the oracle; the input's dtype: eager PyTorch). Returns (loss, leaves)."""
    logits, leaves = linear_leaves(hidden, weight, bias, dtype)
    t = target.detach().reshape(logits.shape)
    if dtype == torch.float64:
        t = t.double()
    cw = None if class_weight is None else class_weight.to(
        torch.float64 if dtype == torch.float64 else class_weight.dtype)
    # F computes in the promoted dtype of logits, target and weight
    compute = torch.promote_types(torch.promote_types(dtype, t.dtype),
                                  dtype if cw is None else cw.dtype)
    loss, _ = oracle_cross_entropy(logits, t, cw, reduction=reduction, dtype=compute, **opts)
    if reduction == "none":
        loss = loss.reshape(hidden.shape[:-1])
    return loss, leaves


def check(hidden, weight, target, bias=None, reduction="mean", class_weight=None,
          expect_dtype=None, **kw):
    """Ours against the float64 oracle (and eager PyTorch in the input dtype), the loss
    and the gradients of hidden, weight and bias, for a fresh upstream gradient."""
    dtype = hidden.dtype
    ours = tlf.linear_cross_entropy(hidden, weight, target, bias, reduction=reduction,
                                    class_weight=class_weight, **kw)
    assert ours.dtype == (expect_dtype or dtype)
    assert ours.shape == (hidden.shape[:-1] if reduction == "none" else ())
    grad_out = (torch.rand(ours.shape, dtype=torch.float64) + 0.5).to(ours.device)
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    g_ours = torch.autograd.grad(ours, leaves, grad_out.to(ours.dtype))
    opts = {k: v for k, v in kw.items() if k != "chunk_size"}
    results = {}
    for name, compute in (("oracle", torch.float64), ("eager", dtype)):
        loss, ins = oracle(hidden, weight, target, bias, compute, reduction, class_weight,
                           **opts)
        results[name] = (loss.detach(), torch.autograd.grad(loss, ins, grad_out.to(loss.dtype)))
    # (the loss's dtype may be wider than the input's: compare at the input's precision)
    assert_matches(ours.detach(), results["oracle"][0], results["eager"][0], dtype,
                   what="loss")
    for i, name in enumerate(("grad_hidden", "grad_weight", "grad_bias")[:len(leaves)]):
        assert g_ours[i].dtype == dtype and g_ours[i].shape == leaves[i].shape
        assert_matches(g_ours[i], results["oracle"][1][i], results["eager"][1][i], dtype,
                       what=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_materialised(device, backend, dtype, reduction, bias):
    hidden, weight, _, b = make(37, 24, 67, dtype, device, bias=bias)
    check(hidden, weight, soft_target((37,), 67, dtype, device), b, reduction, chunk_size=8)


OPTIONS = [
    {"label_smoothing": 0.1},
    {"label_smoothing": 1.0},
    {"z_loss": 1e-2},
    {"softcap": 3.0},
    {"softcap": 2.5, "z_loss": 1e-3, "label_smoothing": 0.2},
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_options(device, backend, dtype, reduction, weighted, opts):
    hidden, weight, _, b = make(29, 16, 41, dtype, device, bias=True)
    cw = class_weights(41, dtype, device) if weighted else None
    check(hidden, weight, soft_target((29,), 41, dtype, device), b, reduction,
          class_weight=cw, chunk_size=6, **opts)


@pytest.mark.parametrize("chunk_size", [1, 5, 40, 1000, None])
def test_chunk_sizes_fp64(device, chunk_size):
    hidden, weight, _, b = make(40, 12, 33, torch.float64, device, bias=True)
    check(hidden, weight, soft_target((40,), 33, torch.float64, device), b, "mean",
          class_weight=class_weights(33, torch.float64, device), chunk_size=chunk_size,
          z_loss=1e-3, label_smoothing=0.05)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float32_target_with_bf16_hidden_gives_a_float32_loss(device, backend, reduction):
    """A distillation target kept in float32 is read as such (no bf16 rounding of the
    probabilities); the loss is float32, as F.cross_entropy's is for these dtypes."""
    hidden, weight, _, b = make(31, 16, 45, torch.bfloat16, device, bias=True)
    target = soft_target((31,), 45, torch.float32, device)
    check(hidden, weight, target, b, reduction, expect_dtype=torch.float32, chunk_size=7,
          label_smoothing=0.1)


@pytest.mark.parametrize("hidden_dtype,target_dtype,cw_dtype,loss_dtype", [
    (torch.bfloat16, torch.float16, None, torch.float32),
    (torch.bfloat16, torch.float64, None, torch.float64),
    (torch.bfloat16, torch.bfloat16, torch.float64, torch.float64),
    (torch.float32, torch.float64, None, torch.float64),
    (torch.float64, torch.float32, torch.float32, torch.float64),
    (torch.float32, torch.bfloat16, torch.float16, torch.float32),
])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_dtype_promotion_as_f(device, backend, hidden_dtype, target_dtype, cw_dtype,
                              loss_dtype, reduction):
    """The loss has the dtype F.cross_entropy gives the promoted (logits, target, weight),
    and its values and gradients are F's: a float64 target or class weight makes F compute
    in float64 from the logits F.linear made in hidden's dtype, and so do we."""
    hidden, weight, _, _ = make(23, 8, 19, hidden_dtype, device)
    target = soft_target((23,), 19, target_dtype, device)
    cw = None if cw_dtype is None else class_weights(19, cw_dtype, device)
    ours = tlf.linear_cross_entropy(hidden, weight, target, reduction=reduction,
                                    class_weight=cw, chunk_size=5, label_smoothing=0.1)
    assert ours.dtype == loss_dtype
    theirs = F.cross_entropy(F.linear(hidden, weight), target, weight=cw, reduction=reduction,
                             label_smoothing=0.1)
    assert theirs.dtype == loss_dtype
    go = torch.rand(ours.shape, dtype=loss_dtype, device=device) + 0.5
    g_ours = torch.autograd.grad(ours, (hidden, weight), go)
    g_theirs = torch.autograd.grad(theirs, (hidden, weight), go)
    # The logits are F.linear's in hidden's dtype; made a chunk at a time, they may round
    # differently from one product of all rows. F also rounds a narrower target or weight's
    # smoothing in its own dtype before promoting; we promote first.
    tols = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 3e-2,
            torch.bfloat16: 3e-2}
    tol = max(tols[d] for d in (hidden_dtype, target_dtype, cw_dtype or hidden_dtype))
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    for a, c in zip(g_ours, g_theirs):
        assert a.dtype == hidden_dtype
        torch.testing.assert_close(a.double(), c.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_3d_hidden_and_no_grad(device, reduction):
    hidden, weight, _, b = make(3, 16, 29, torch.float32, device, bias=True, lead=(3, 7))
    target = soft_target((3, 7), 29, torch.float32, device)
    check(hidden, weight, target, b, reduction, chunk_size=4, z_loss=1e-3)
    with torch.no_grad():
        loss = tlf.linear_cross_entropy(hidden, weight, target, b, reduction=reduction)
    ref, _ = oracle(hidden, weight, target, b, torch.float64, reduction)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


def test_no_rows_mean_is_nan_as_f(device):
    hidden, weight, _, _ = make(0, 8, 11, torch.float32, device)
    target = torch.empty((0, 11), device=device)
    ours = tlf.linear_cross_entropy(hidden, weight, target)
    theirs = F.cross_entropy(F.linear(hidden, weight), target)
    assert torch.isnan(ours) and torch.isnan(theirs)
    gh, gw = torch.autograd.grad(ours, (hidden, weight))
    assert gh.shape == (0, 8) and torch.equal(gw, torch.zeros_like(gw))
    assert tlf.linear_cross_entropy(hidden, weight, target, reduction="sum") == 0


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_target_requiring_grad(device, backend, reduction):
    """A target that requires grad (a teacher trained jointly) gets F's gradient, with the
    gradients of hidden and weight, through the materialised path."""
    hidden, weight, _, _ = make(13, 8, 17, torch.float64, device)
    target = soft_target((13,), 17, torch.float64, device).requires_grad_()
    ours = tlf.linear_cross_entropy(hidden, weight, target, reduction=reduction,
                                    label_smoothing=0.1)
    theirs = F.cross_entropy(F.linear(hidden, weight), target, reduction=reduction,
                             label_smoothing=0.1)
    go = torch.rand(ours.shape, dtype=torch.float64, device=device)
    for a, c in zip(torch.autograd.grad(ours, (hidden, weight, target), go),
                    torch.autograd.grad(theirs, (hidden, weight, target), go)):
        torch.testing.assert_close(a, c)


def test_torch_func_grad(device):
    hidden, weight, _, _ = make(11, 6, 13, torch.float64, device)
    target = soft_target((11,), 13, torch.float64, device)

    def ours(h, w):
        return tlf.linear_cross_entropy(h, w, target, z_loss=1e-2)

    def theirs(h, w):
        logits = F.linear(h, w)
        return F.cross_entropy(logits, target) + 1e-2 * (torch.logsumexp(logits, -1) ** 2).mean()

    h, w = hidden.detach(), weight.detach()
    for a, c in zip(torch.func.grad(ours, (0, 1))(h, w), torch.func.grad(theirs, (0, 1))(h, w)):
        torch.testing.assert_close(a, c)


def test_one_hot_target_equals_index_target(device, backend):
    """One-hot probabilities give the class-index loss and gradients (without ignored
    rows; label smoothing is defined alike for both)."""
    hidden, weight, _, b = make(25, 12, 31, torch.float32, device, bias=True)
    index = torch.randint(0, 31, (25,), device=device)
    one_hot = F.one_hot(index, 31).float()
    results = []
    for t in (index, one_hot):
        loss = tlf.linear_cross_entropy(hidden, weight, t, b, label_smoothing=0.1, chunk_size=6)
        results.append((loss, *torch.autograd.grad(loss, (hidden, weight, b))))
    for a, c in zip(*results):
        torch.testing.assert_close(a, c, rtol=2e-6, atol=1e-6)


def test_target_is_not_modified(device):
    hidden, weight, _, b = make(17, 8, 23, torch.float32, device, bias=True)
    target = soft_target((17,), 23, torch.float16, device)
    before = target.clone()
    tlf.linear_cross_entropy(hidden, weight, target, b, chunk_size=4).backward()
    assert torch.equal(target, before)


def test_non_contiguous_target(device, backend):
    hidden, weight, _, _ = make(19, 8, 21, torch.float32, device)
    wide = soft_target((21,), 19, torch.float32, device).t()  # (19, 21), strides (1, 19)
    assert not wide.is_contiguous()
    check(hidden, weight, wide, None, "mean", chunk_size=5, label_smoothing=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_logits_sized_allocation_cpu(backend, dtype):
    """Besides the caller's (N, V) target, nothing N x V is allocated: every allocation is
    at most a chunk of logits (or of the target, converted) or a weight-sized buffer, and
    doubling N adds only the N-sized rows (grad_hidden), not N x V elements."""
    H, V, chunk = 16, 3000, 64
    peaks = {}
    for N in (1024, 2048):
        hidden, weight, _, b = make(N, H, V, dtype, "cpu", bias=True)
        target = soft_target((N,), V, torch.float16, "cpu")  # converted a chunk at a time

        def ours(hidden=hidden, weight=weight, target=target, b=b):
            tlf.linear_cross_entropy(hidden, weight, target, b, chunk_size=chunk).backward()

        ours()
        hidden.grad = weight.grad = b.grad = None
        sizes, peaks[N] = _cpu_allocations(ours)
        assert max(sizes) <= largest_allowed_allocation(chunk, V, H), max(sizes)
    growth = peaks[2048] - peaks[1024]
    assert growth <= 1024 * (H * dtype.itemsize + 64) + 4096, growth


@pytest.mark.parametrize("name", ["linear_ce_fwd", "linear_ce_fwd_grad", "_linear_ce_bwd"])
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.float64])
def test_opcheck(device, name, target_dtype):
    """The fake kernels give the real outputs' dtypes: float64 rows where a float64
    target makes the computation float64."""
    hidden, weight, _, b = make(9, 6, 11, torch.float32, device, bias=True)
    target = soft_target((9,), 11, target_dtype, device)
    ce = (-100, 0.1, 1e-3, 0.0)
    ops = getattr(torch.ops, lce_ops.NAMESPACE)
    if name == "linear_ce_fwd":
        args = (hidden, weight, b, target, None, *ce, 4, None)
    elif name == "linear_ce_fwd_grad":
        denom = torch.tensor(9.0, dtype=target_dtype, device=device)
        args = (hidden, weight, b, target, None, denom, *ce, 4, None, True, True, True)
    else:
        with torch.no_grad():
            loss, lse = ops.linear_ce_fwd(hidden, weight, b, target, None, *ce, 4, None)
        # (the ops keep lse in float64 whatever the computation's dtype, as cross_entropy's)
        assert loss.dtype == target_dtype and lse.dtype == torch.float64
        g = torch.rand(9, device=device)
        args = (g, torch.randn(9, device=device), hidden.detach(), weight.detach(), b.detach(),
                target, None, lse, *ce, 4, None, True, True, True)
    torch.library.opcheck(getattr(ops, name).default, args)


H_, W_ = torch.randn(4, 3), torch.randn(5, 3)
P_ = torch.softmax(torch.randn(4, 5), -1)


@pytest.mark.parametrize("what,exc,match,kw", [
    ("shape without V", ValueError, r"probability target must have shape \(4, 5\)",
     {"target": P_[:, 0]}),
    ("V wrong", ValueError, r"probability target must have shape \(4, 5\)",
     {"target": P_[:, :4]}),
    ("rows wrong", ValueError, r"probability target must have shape \(4, 5\)",
     {"target": P_[:3]}),
    ("ignore_index", ValueError, "ignore_index is not supported for floating point target",
     {"target": P_, "ignore_index": 0}),
    ("bool target", TypeError, "class indices .* or class probabilities",
     {"target": P_ > 0.2}),
    ("device", ValueError, "target is on meta.*same device", {"target": P_.to("meta")}),
], ids=lambda c: c if isinstance(c, str) else "")
def test_bad_arguments(what, exc, match, kw):
    with pytest.raises(exc, match=match):
        tlf.linear_cross_entropy(**{"hidden": H_, "weight": W_, **kw})
