"""cross_entropy against F.cross_entropy in float64: values and gradients over dtypes,
shapes, reductions and options (DESIGN.md §6)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchloss_fused as tlf

from .helpers import assert_matches, oracle_cross_entropy, random_logits, random_targets

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
REDUCTIONS = ["mean", "sum", "none"]


def check(x, target, reduction="mean", grad_out=None, **kw):
    """Runs ours, the float64 oracle and eager PyTorch (for low precision); compares
    values and input gradients. Returns our loss."""
    dtype = x.dtype
    ours = tlf.cross_entropy(x, target, reduction=reduction, **kw)
    assert ours.dtype == (dtype if not target.is_floating_point()
                          else torch.promote_types(dtype, target.dtype)), ours.dtype
    if grad_out is None:
        grad_out = torch.rand_like(ours, dtype=torch.float64).to(ours.dtype) + 0.5
    results = {}
    for name, compute in (("oracle", torch.float64), ("eager", dtype)):
        xr = x.detach().clone().requires_grad_()
        loss, _ = oracle_cross_entropy(xr, target, reduction=reduction, dtype=compute, **kw)
        (g,) = torch.autograd.grad(loss, xr, grad_out.to(loss.dtype)) if loss.numel() else (
            torch.zeros_like(xr),)
        results[name] = (loss.detach(), g)
    (g_ours,) = torch.autograd.grad(ours, x, grad_out) if ours.numel() else (
        torch.zeros_like(x),)
    assert g_ours.dtype == x.dtype and g_ours.shape == x.shape
    assert_matches(ours.detach(), results["oracle"][0], results["eager"][0], dtype, what="loss")
    assert_matches(g_ours, results["oracle"][1], results["eager"][1], dtype, what="grad")
    return ours


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [0, 1, 7, 1000])
@pytest.mark.parametrize("V", [1, 2, 3, 761])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_small_grid(device, backend, dtype, N, V, reduction):
    x = random_logits((N, V), dtype, device)
    y = random_targets((N,), V, device)
    check(x, y, reduction)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 32000), (1, 32000), (7, 32000), (1000, 32000),
                                   (0, 128256), (1, 128256), (7, 128256), (2, 262147)])
def test_large_shapes(device, backend, dtype, shape):
    # (1000 x 128256 is left out: its float64 oracle alone needs 2 GiB and minutes on CI.)
    if backend == "reference" and shape[0] * shape[1] > 4_000_000:
        pytest.skip("the fallback is covered on the smaller large shapes")
    x = random_logits(shape, dtype, device)
    y = random_targets(shape[:1], shape[1], device, ignore_frac=0.1)
    check(x, y, "mean")
    check(x, y, "none")


OPTIONS = [
    {},
    {"ignore_index": 3},
    {"weight": "w"},
    {"label_smoothing": 0.1},
    {"label_smoothing": 1.0},
    {"weight": "w", "label_smoothing": 0.25, "ignore_index": 0},
    {"z_loss": 1e-3},
    {"softcap": 5.0},
    {"logit_scale": 0.5},
    {"softcap": 2.0, "logit_scale": 1.7, "z_loss": 0.01, "label_smoothing": 0.2, "weight": "w"},
]


def _materialise(opts, C, dtype, device):
    opts = dict(opts)
    if opts.get("weight") == "w":
        opts["weight"] = (torch.rand(C, dtype=torch.float64) + 0.1).to(device=device, dtype=dtype)
    return opts


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(sorted(o)) or "plain")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_options(device, backend, dtype, opts, reduction):
    N, C = 64, 761
    opts = _materialise(opts, C, dtype, device)
    x = random_logits((N, C), dtype, device)
    y = random_targets((N,), C, device, ignore_index=opts.get("ignore_index", -100),
                       ignore_frac=0.2)
    check(x, y, reduction, **opts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5,), (4, 11, 3), (2, 7, 3, 5), (3, 6, 0)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_class_dim_layouts(device, backend, dtype, shape, reduction):
    C = shape[0] if len(shape) == 1 else shape[1]
    x = random_logits(shape, dtype, device)
    tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
    y = random_targets(tshape, C, device, ignore_frac=0.2)
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype)
    check(x, y, reduction)
    check(x, y, reduction, weight=w, label_smoothing=0.1)


@pytest.mark.parametrize("tdtype", [torch.int64, torch.int32, torch.uint8])
def test_target_dtypes(device, backend, tdtype):
    x = random_logits((9, 200), torch.float32, device)
    y = random_targets((9,), 200, device, dtype=tdtype)
    ours = check(x, y, "mean")
    ref = tlf.cross_entropy(x.detach(), y.long())
    assert torch.equal(ours.detach(), ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tdtype", ["same", torch.float32, torch.float64])
@pytest.mark.parametrize("opts", [{}, {"weight": "w"}, {"label_smoothing": 0.3},
                                  {"weight": "w", "label_smoothing": 0.1, "z_loss": 1e-2}],
                         ids=lambda o: "-".join(sorted(o)) or "plain")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_probability_targets(device, backend, dtype, tdtype, opts, reduction):
    N, C = 33, 300
    tdtype = dtype if tdtype == "same" else tdtype
    opts = _materialise(opts, C, dtype, device)
    x = random_logits((N, C), dtype, device)
    t = torch.softmax(torch.randn(N, C, dtype=torch.float64) * 2, 1).to(device=device,
                                                                       dtype=tdtype)
    check(x, t, reduction, **opts)


# F smooths a probability target in the target's own dtype (`target * (1 - ls) + ls / C`,
# each step rounded to it). Beside wider logits those roundings are far above the logits'
# error (a float16 target beside float32 logits: about 2e-4 of the loss), so ours rounds
# the same way where it converts the target anyway; the compared values are then F's to
# the logits' precision. The target's own gradient goes through the same steps.
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float16),
                                    (torch.float32, torch.bfloat16),
                                    (torch.float64, torch.float32),
                                    (torch.float64, torch.bfloat16)],
                         ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("case", ["plain", "weight", "kdim", "target_grad", "linear"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_smoothed_narrower_probability_target_rounds_as_f(device, backend, dtypes, case,
                                                          reduction):
    xdtype, tdtype = dtypes
    shape = (4, 7, 3) if case == "kdim" else (6, 7)
    x = random_logits(shape, xdtype, device)
    t = torch.softmax(torch.randn(shape, dtype=torch.float64) * 2, 1).to(device=device,
                                                                         dtype=tdtype)
    t.requires_grad_(case == "target_grad")
    kw = {"label_smoothing": 0.3, "reduction": reduction}
    if case == "weight":
        kw["weight"] = torch.rand(7, dtype=xdtype, device=device) + 0.5
    inputs = (x, t) if case == "target_grad" else (x,)
    if case == "linear":
        h = torch.randn(6, 5, dtype=xdtype, device=device, requires_grad=True)
        head = torch.randn(7, 5, dtype=xdtype, device=device)
        ours = tlf.linear_cross_entropy(h, head, t, **kw)
        ref = F.cross_entropy(F.linear(h, head), t, **kw)
        inputs = (h,)
    else:
        ours, ref = tlf.cross_entropy(x, t, **kw), F.cross_entropy(x, t, **kw)
    eps = torch.finfo(xdtype).eps
    assert ours.dtype == ref.dtype
    torch.testing.assert_close(ours, ref, rtol=16 * eps, atol=16 * eps)
    g = torch.rand_like(ours)
    for a, b in zip(torch.autograd.grad(ours, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(a, b, rtol=16 * eps, atol=16 * eps)


@pytest.mark.parametrize("dtype", DTYPES)
def test_probability_targets_kdim_and_unnormalised(device, backend, dtype):
    x = random_logits((3, 5, 4, 2), dtype, device)
    t = torch.rand(3, 5, 4, 2, dtype=torch.float64).mul(3).to(device=device, dtype=dtype)
    check(x, t, "mean")
    check(x, t, "none", label_smoothing=0.2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_return_lse(device, backend, dtype):
    x = random_logits((6, 4, 3), dtype, device)
    y = random_targets((6, 3), 4, device, ignore_frac=0.3)
    loss, lse = tlf.cross_entropy(x, y, return_lse=True, softcap=3.0, logit_scale=2.0)
    _, ref_lse = oracle_cross_entropy(x.detach(), y, softcap=3.0, logit_scale=2.0)
    assert lse.shape == (6, 3)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    # Gradients flow through lse too (e.g. a user's own z-loss on it).
    (g,) = torch.autograd.grad(loss + (lse**2).sum() * 0.1, x)
    xr = x.detach().double().requires_grad_()
    ref_loss, ref_lse = oracle_cross_entropy(xr, y, softcap=3.0, logit_scale=2.0)
    (g_ref,) = torch.autograd.grad(ref_loss + (ref_lse**2).sum() * 0.1, xr)
    tol = 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5
    torch.testing.assert_close(g.double(), g_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3}],
                         ids=["plain", "smooth-z"])
def test_inplace_backward(device, backend, dtype, reduction, opts):
    x0 = random_logits((17, 333), dtype, device, requires_grad=False)
    y = random_targets((17,), 333, device, ignore_frac=0.2)
    leaf = x0.clone().requires_grad_()
    expected_loss = tlf.cross_entropy(leaf, y, reduction=reduction, **opts)
    g_out = torch.rand_like(expected_loss) + 0.5
    (expected,) = torch.autograd.grad(expected_loss, leaf, g_out)

    logits_src = x0.clone().requires_grad_()
    logits = logits_src * 1.0  # non-leaf, as an LM head's output would be
    loss = tlf.cross_entropy(logits, y, reduction=reduction, inplace_backward=True, **opts)
    assert torch.equal(loss.detach(), expected_loss.detach())
    assert torch.equal(logits.detach(), x0), "forward must not touch the input"
    loss.backward(g_out)
    # (not bitwise: the out-of-place path may rescale a gradient made in the forward)
    torch.testing.assert_close(logits_src.grad, expected)
    assert torch.equal(logits.detach(), logits_src.grad), "the gradient lives in the input"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", [{}, {"weight": "w", "label_smoothing": 0.1, "logit_scale": 0.7}],
                         ids=["plain", "w-smooth-scale"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
def test_rows_spanning_several_blocks(device, backend, dtype, opts, inplace):
    """Rows longer than the CPU kernels' 2048-class blocks, with a partial last vector:
    the gradient passes convert one block at a time, and in place they must read each
    block before writing it."""
    N, C = 6, 2 * 2048 + 37
    opts = _materialise(opts, C, dtype, device)
    x0 = random_logits((N, C), dtype, device, requires_grad=False)
    y = random_targets((N,), C, device, ignore_frac=0.2)
    y[0] = C - 1  # the target in the last, partial vector
    logits = x0.clone().requires_grad_()
    if inplace:  # a non-leaf, as an LM head's output would be
        logits = logits * 1.0
    loss = tlf.cross_entropy(logits, y, reduction="none", inplace_backward=inplace, **opts)
    g_out = torch.rand_like(loss) + 0.5
    (g,) = torch.autograd.grad(loss, logits, g_out)
    if inplace:
        assert g.data_ptr() == logits.data_ptr()
    results = {}
    for name, compute in (("oracle", torch.float64), ("eager", dtype)):
        xr = x0.clone().requires_grad_()
        ref, _ = oracle_cross_entropy(xr, y, reduction="none", dtype=compute, **opts)
        results[name] = (ref.detach(), torch.autograd.grad(ref, xr, g_out.to(ref.dtype))[0])
    assert_matches(loss.detach(), results["oracle"][0], results["eager"][0], dtype, what="loss")
    assert_matches(g, results["oracle"][1], results["eager"][1], dtype, what="grad")


def test_no_grad_leaves_input_untouched(device, backend):
    x = random_logits((8, 50), torch.float32, device, requires_grad=False)
    y = random_targets((8,), 50, device)
    before = x.clone()
    with torch.no_grad():
        tlf.cross_entropy(x, y, inplace_backward=True)
    xg = x.clone().requires_grad_()
    tlf.cross_entropy(xg, y).backward()
    assert torch.equal(x, before) and torch.equal(xg.detach(), before)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("scale", [1.0, 2.5, 0.0])
def test_upstream_gradient_scales(device, backend, reduction, scale):
    """The gradient computed by the forward is rescaled when backward receives another
    grad_output (loss scaling, averaging over micro-batches)."""
    x = random_logits((12, 97), torch.float32, device)
    y = random_targets((12,), 97, device, ignore_frac=0.25)
    loss = tlf.cross_entropy(x, y, reduction=reduction)
    g_out = torch.full_like(loss, scale)
    (g,) = torch.autograd.grad(loss, x, g_out)
    xr = x.detach().double().requires_grad_()
    ref, _ = oracle_cross_entropy(xr, y, reduction=reduction)
    (g_ref,) = torch.autograd.grad(ref, xr, g_out.double())
    torch.testing.assert_close(g.double(), g_ref, rtol=1.3e-6, atol=1e-6)


def test_retain_graph_backward_twice(device, backend):
    x = random_logits((10, 64), torch.float32, device)
    y = random_targets((10,), 64, device)
    loss = tlf.cross_entropy(x, y) * 3.0
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first)
    x.grad = None
    xr = x.detach().double().requires_grad_()
    (oracle_cross_entropy(xr, y)[0] * 3.0).backward()
    torch.testing.assert_close(first.double(), xr.grad, rtol=1e-6, atol=1e-7)


def test_size_average_and_reduce_legacy(device, backend):
    x = random_logits((5, 7), torch.float32, device)
    y = random_targets((5,), 7, device)
    with pytest.warns(UserWarning):
        s = tlf.cross_entropy(x, y, size_average=False)
    torch.testing.assert_close(s, tlf.cross_entropy(x, y, reduction="sum"))
    with pytest.warns(UserWarning):
        n = tlf.cross_entropy(x, y, None, None, -100, False)
    assert n.shape == (5,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_fn", ["ce", "focal"])
def test_deterministic_and_retained_graph_repeats_bitwise(device, backend, dtype, loss_fn):
    x = random_logits((37, 5000), dtype, device)
    y = random_targets((37,), 5000, device, ignore_frac=0.1)
    f = (lambda a: tlf.cross_entropy(a, y, z_loss=1e-4)) if loss_fn == "ce" else (
        lambda a: tlf.focal_loss(a, y, gamma=1.5))
    loss = f(x)
    first = torch.autograd.grad(loss, x, retain_graph=True)[0]
    second = torch.autograd.grad(loss, x)[0]  # recomputed by the separate backward
    again = torch.autograd.grad(f(x), x)[0]
    assert torch.equal(first, second) and torch.equal(first, again)
    assert torch.equal(loss, f(x))


SPARSE_LAYOUTS = {
    "coo": lambda p: p.to_sparse(),
    "coo_hybrid": lambda p: p.to_sparse(1),  # (sparse rows, dense class values)
    "csr": lambda p: p.to_sparse_csr(),
}


@pytest.mark.parametrize("layout", sorted(SPARSE_LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, {"reduction": "none"},
                                {"reduction": "sum", "label_smoothing": 0.2},
                                {"weight": True}, {"z_loss": 1e-3}],
                         ids=["mean", "none", "sum_smoothing", "weight", "z_loss"])
def test_sparse_probability_target_is_its_dense_copy(device, backend, layout, dtype, kw):
    # F.cross_entropy takes a sparse probability target (mean and sum, forward only); here
    # it gives the dense target's bits for every option, the backward included.
    x = random_logits((6, 9), dtype, device)
    p = torch.rand(6, 9, device=device).to(dtype)
    p[torch.rand(6, 9, device=device) < 0.6] = 0
    if kw.get("weight"):
        kw = {"weight": torch.rand(9, device=device).to(dtype) + 0.5}
    sparse = SPARSE_LAYOUTS[layout](p)
    assert sparse.layout != torch.strided
    ours, dense = tlf.cross_entropy(x, sparse, **kw), tlf.cross_entropy(x, p, **kw)
    grad_out = torch.rand_like(ours) + 0.5
    (g_ours,), (g_dense,) = (torch.autograd.grad(v, x, grad_out) for v in (ours, dense))
    assert torch.equal(ours, dense) and torch.equal(g_ours, g_dense)
    assert sparse.to_dense().equal(p)  # (the caller's target untouched)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sparse_probability_target_matches_f(device, reduction):
    # Where F.cross_entropy computes it: the value, and the gradient of a sparse target
    # (F's is dense, ours sparse with every class: the same values).
    x = random_logits((5, 8), torch.float64, device, requires_grad=False)
    p = torch.rand(5, 8, dtype=torch.float64, device=device)
    p[p < 0.5] = 0
    ours_t, f_t = (p.to_sparse().requires_grad_() for _ in range(2))
    ours, theirs = tlf.cross_entropy(x, ours_t, reduction=reduction), F.cross_entropy(
        x, f_t, reduction=reduction)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    (g_ours,), (g_f,) = torch.autograd.grad(ours, ours_t), torch.autograd.grad(theirs, f_t)
    torch.testing.assert_close(g_ours.to_dense(), g_f.to_dense(), rtol=1e-12, atol=1e-12)


def _ulps(a: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|a - ref| in units in the last place (of `dtype`) at the float64 oracle's value."""
    r = ref.to(dtype).abs()
    ulp = (torch.nextafter(r, torch.full_like(r, float("inf"))) - r).double()
    finite = torch.isfinite(ref)
    return torch.where(finite, (a.double() - ref).abs() / ulp, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("path", ["fused", "inplace", "return_lse", "sum", "none"])
@pytest.mark.parametrize("opts", [{}, {"weight": True}, {"label_smoothing": 0.2},
                                  {"weight": True, "label_smoothing": 0.2},
                                  {"prob": True}, {"logit_scale": 1.7, "softcap": 50.0}],
                         ids=["index", "weight", "smoothing", "weight-smoothing", "prob",
                              "transform"])
def test_one_class_z_loss_gradient_as_accurate_as_f(device, backend, dtype, path, opts):
    """One class (V = 1): lse = s, so the cross-entropy and smoothing terms are 0 for every
    finite logit and the gradient is the z-loss's alone, 2 z lse ds/dx (F's composition
    forms it so, its p - 1 exactly 0). Ours had formed it as (w + 2 z lse) p - w, whose
    cancellation left it up to 5e5 float32 ulps off (z = 1e-4). Non-finite logits give
    nan where F's do."""
    z = 1e-4
    x = (torch.randn(256, 1, dtype=torch.float64) * 3).to(dtype)
    x[:3, 0] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    x = x.to(device)
    kw = {k: v for k, v in opts.items() if k not in ("weight", "prob")}
    if opts.get("weight"):
        kw["weight"] = torch.tensor([0.7], dtype=dtype, device=device)
    if opts.get("prob"):
        target = (torch.rand(256, 1, dtype=torch.float64) + 0.5).to(dtype).to(device)
    else:
        target = torch.zeros(256, dtype=torch.long, device=device)
        target[3:40:7] = -100
    reduction = path if path in ("sum", "none") else "mean"
    grad_out = torch.rand(256, dtype=torch.float64, device=device) + 0.5
    grad_out = grad_out.to(dtype) if reduction == "none" else grad_out[0].to(dtype)
    grads = {}
    for name, compute in (("oracle", torch.float64), ("f", dtype)):
        xr = x.clone().requires_grad_()
        loss, _ = oracle_cross_entropy(xr, target, reduction=reduction, dtype=compute,
                                       z_loss=z, **kw)
        (grads[name],) = torch.autograd.grad(loss, xr, grad_out.to(loss.dtype))
    leaf = x.clone().requires_grad_()
    out = tlf.cross_entropy(leaf * 1, target, reduction=reduction, z_loss=z,
                            inplace_backward=path == "inplace",
                            return_lse=path == "return_lse", **kw)
    loss = out[0] if path == "return_lse" else out
    (ours,) = torch.autograd.grad(loss, leaf, grad_out)
    assert torch.equal(ours.isnan(), grads["oracle"].isnan())
    ulps_ours = float(_ulps(ours, grads["oracle"], dtype).max())
    ulps_f = float(_ulps(grads["f"], grads["oracle"], dtype).max())
    assert ulps_ours <= max(2 * ulps_f, 8.0), (ulps_ours, ulps_f)  # (was up to 5e5)
