"""linear_cross_entropy(..., return_lse=True): each row's log-sum-exp of the (softcapped)
logits, against the float64 materialised path, and gradients that flow through it (alone or
with the loss's) on every path: the fused training forward, reduction="none", probability
targets, the materialised path, torch.compile, second order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchloss_fused as tlf

from .helpers import assert_matches, oracle_cross_entropy
from .test_linear_cross_entropy import class_weights, linear_leaves, make

REDUCTIONS = ["mean", "sum", "none"]


def reference(hidden, weight, target, bias, dtype, reduction, **opts):
    """(loss, lse, leaves): the materialised path in `dtype` (float64: the oracle)."""
    logits, leaves = linear_leaves(hidden, weight, bias, dtype)
    prob = target.is_floating_point()
    t = target.reshape(logits.shape).to(dtype) if prob else target.flatten()
    cw = opts.pop("class_weight", None)
    cw = None if cw is None else cw.to(dtype)
    loss, lse = oracle_cross_entropy(logits, t, cw, reduction=reduction, dtype=dtype, **opts)
    shape = hidden.shape[:-1]
    return (loss.reshape(shape) if reduction == "none" else loss), lse.reshape(shape), leaves


def combine(loss, lse, g_loss, g_lse):
    """A scalar using both outputs, with fresh weights (None: that output unused)."""
    total = 0
    if g_loss is not None:
        total = total + (loss * g_loss).sum()
    if g_lse is not None:
        total = total + (lse * g_lse).sum()
    return total


def check(hidden, weight, target, bias, reduction, use_loss=True, use_lse=True, **kw):
    dtype = hidden.dtype
    loss, lse = tlf.linear_cross_entropy(hidden, weight, target, bias, reduction=reduction,
                                         return_lse=True, **kw)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert lse.dtype == acc and lse.shape == hidden.shape[:-1]
    g_loss = (torch.rand(loss.shape, dtype=torch.float64) + 0.5) if use_loss else None
    g_lse = torch.randn(lse.shape, dtype=torch.float64) if use_lse else None

    def to(g, like):
        return None if g is None else g.to(device=like.device, dtype=like.dtype)

    leaves = [t for t in (hidden, weight, bias) if t is not None]
    ours = torch.autograd.grad(combine(loss, lse, to(g_loss, loss), to(g_lse, lse)), leaves)
    opts = {k: v for k, v in kw.items() if k != "chunk_size"}
    results = {}
    for name, compute in (("oracle", torch.float64), ("eager", dtype)):
        r_loss, r_lse, ins = reference(hidden, weight, target, bias, compute, reduction,
                                       **dict(opts))
        total = combine(r_loss, r_lse, to(g_loss, r_loss), to(g_lse, r_lse))
        results[name] = (r_loss.detach(), r_lse.detach(), torch.autograd.grad(total, ins))
    oracle, eager = results["oracle"], results["eager"]
    assert_matches(loss.detach(), oracle[0], eager[0], dtype, what="loss")
    # (bf16: the logits F.linear rounds to bf16 bound the lse's accuracy, as eager's)
    assert_matches(lse.detach(), oracle[1], eager[1], dtype, what="lse")
    for i, g in enumerate(ours):
        assert g.dtype == dtype and g.shape == leaves[i].shape
        assert_matches(g, oracle[2][i], eager[2][i], dtype, what=f"grad {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("uses", ["loss", "lse", "both"])
def test_lse_and_its_gradient(device, backend, dtype, reduction, uses):
    hidden, weight, target, b = make(37, 24, 67, dtype, device, bias=True)
    check(hidden, weight, target, b, reduction, use_loss=uses != "lse",
          use_lse=uses != "loss", chunk_size=8)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("opts", [
    {"label_smoothing": 0.1, "z_loss": 1e-2},
    {"softcap": 3.0, "ignore_index": 2},
    {"class_weight": "weights", "label_smoothing": 0.2},
], ids=["smoothing,z_loss", "softcap,ignore_index", "class_weight"])
def test_options(device, backend, reduction, opts):
    ii = opts.get("ignore_index", -100)
    hidden, weight, target, b = make(29, 16, 41, torch.float32, device, bias=True,
                                     ignore_index=ii)
    if opts.get("class_weight") == "weights":
        opts = {**opts, "class_weight": class_weights(41, torch.float32, device)}
    check(hidden, weight, target, b, reduction, chunk_size=6, **opts)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_probability_targets(device, backend, reduction):
    hidden, weight, _, b = make(23, 16, 31, torch.float32, device, bias=True)
    target = torch.softmax(torch.randn(23, 31, device=device) * 2, -1)
    check(hidden, weight, target, b, reduction, chunk_size=5, label_smoothing=0.1)


def test_materialised_path(device, backend):
    """A class_weight that requires grad takes the materialised path: the lse is the same,
    and gradients still flow through it."""
    hidden, weight, target, _ = make(17, 8, 19, torch.float64, device)
    cw = class_weights(19, torch.float64, device).requires_grad_()
    loss, lse = tlf.linear_cross_entropy(hidden, weight, target, class_weight=cw,
                                         return_lse=True)
    _, r_lse, _ = reference(hidden, weight, target, None, torch.float64, "mean",
                            class_weight=cw.detach())
    torch.testing.assert_close(lse, r_lse.detach())
    (loss + lse.sum()).backward()
    assert hidden.grad is not None and cw.grad is not None


def test_3d_hidden_and_no_grad(device):
    hidden, weight, target, _ = make(3, 8, 13, torch.float32, device, lead=(3, 5))
    with torch.no_grad():
        loss, lse = tlf.linear_cross_entropy(hidden, weight, target, return_lse=True)
    assert lse.shape == (3, 5)
    torch.testing.assert_close(lse.double(), torch.logsumexp(
        F.linear(hidden.detach().double(), weight.detach().double()), -1))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_an_unused_lse_keeps_the_gradients_made_in_forward(device, compiled):
    """mean/sum training computes the gradients in the forward pass; returning the lse
    (without differentiating it) must not make the backward recompute the logits."""
    torch._dynamo.reset()
    hidden, weight, target, _ = make(40, 8, 30, torch.float32, device)

    def f(h, w, y):
        return tlf.linear_cross_entropy(h, w, y, return_lse=True, chunk_size=8)[0]

    if compiled:
        f = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = f(hidden, weight, target)
    with torch.profiler.profile() as prof:
        loss.backward()
    names = {e.name for e in prof.events()}
    assert not any("_linear_ce_bwd" in n for n in names), names
    assert not any(n in ("aten::mm", "aten::addmm") for n in names), names


def test_retain_graph_then_lse(device):
    """Backward through the loss (fused gradients), then through the lse of the same call
    (recomputed): each matches the materialised path's."""
    hidden, weight, target, _ = make(21, 8, 17, torch.float64, device)
    loss, lse = tlf.linear_cross_entropy(hidden, weight, target, return_lse=True,
                                         chunk_size=4)
    r_loss, r_lse, (h, w) = reference(hidden, weight, target, None, torch.float64, "mean")
    for ours, theirs in ((loss, r_loss), (lse.sum(), r_lse.sum())):
        for a, c in zip(torch.autograd.grad(ours, (hidden, weight), retain_graph=True),
                        torch.autograd.grad(theirs, (h, w), retain_graph=True)):
            torch.testing.assert_close(a, c)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile(device, compile_backend):
    torch._dynamo.reset()

    def f(h, w, y):
        loss, lse = tlf.linear_cross_entropy(h, w, y, z_loss=1e-3, chunk_size=7,
                                             return_lse=True)
        return loss + 1e-2 * (lse * lse).mean()

    hidden, weight, target, _ = make(30, 16, 37, torch.float32, device)
    out = torch.compile(f, fullgraph=True, backend=compile_backend)(hidden, weight, target)
    g_out = torch.autograd.grad(out, (hidden, weight))
    eager = f(hidden, weight, target)
    for a, c in zip(g_out, torch.autograd.grad(eager, (hidden, weight))):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    r_loss, r_lse, ins = reference(hidden, weight, target, None, torch.float64, "mean",
                                   z_loss=1e-3)
    ref = r_loss + 1e-2 * (r_lse * r_lse).mean()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    for a, c in zip(g_out, torch.autograd.grad(ref, ins)):
        torch.testing.assert_close(a.double(), c, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_order_through_the_lse(device, backend, reduction):
    hidden, weight, target, _ = make(9, 4, 7, torch.float64, device)

    def ours(h, w):
        loss, lse = tlf.linear_cross_entropy(h, w, target, reduction=reduction,
                                             return_lse=True, chunk_size=4)
        return loss.sum() + (lse * lse).sum()

    def theirs(h, w):
        logits = F.linear(h, w)
        loss = F.cross_entropy(logits, target, reduction=reduction)
        return loss.sum() + (torch.logsumexp(logits, -1) ** 2).sum()

    h, w = hidden.detach(), weight.detach()
    v = (torch.randn_like(h), torch.randn_like(w))
    _, hvp_ours = torch.autograd.functional.hvp(ours, (h, w), v)
    _, hvp_theirs = torch.autograd.functional.hvp(theirs, (h, w), v)
    for a, c in zip(hvp_ours, hvp_theirs):
        torch.testing.assert_close(a, c)


def test_module(device):
    hidden, weight, target, _ = make(11, 8, 13, torch.float32, device)
    module = tlf.LinearCrossEntropyLoss(return_lse=True)
    assert "return_lse=True" in repr(module)
    loss, lse = module(hidden, weight, target)
    assert lse.shape == (11,)
