"""Higher-order gradients (backward with create_graph=True) and torch.func transforms
(grad, vmap, jacrev, hessian, jvp) and forward-mode AD, against the same computations on
F.cross_entropy and the float64 oracles. Before this was supported, a second-order term
through the loss silently vanished (the kernels' gradient was a constant to autograd)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import grad, hessian, jacrev, jvp, vmap

import torchloss_fused as tlf
from torchloss_fused import _backend, reference
from torchloss_fused.reference import sigmoid_focal_loss_torchvision

from .helpers import oracle_cross_entropy, random_logits, random_targets
from .test_focal_loss import focal_oracle

F64 = torch.float64


def _hvp(loss_fn, inputs, vs):
    """Gradient with create_graph, then the gradient of <gradient, v>: a Hessian-vector
    product; also differentiates through the incoming gradient (a 1.7 scale)."""
    loss = loss_fn(*inputs)
    if loss.dim():
        loss = (loss * torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype,
                                      device=loss.device).view(loss.shape)).sum()
    scale = torch.tensor(1.7, dtype=loss.dtype, device=loss.device, requires_grad=True)
    grads = torch.autograd.grad(loss * scale, inputs, create_graph=True)
    inner = sum((g * v).sum() for g, v in zip(grads, vs))
    second = torch.autograd.grad(inner, (*inputs, scale))
    return [g.detach() for g in grads], list(second)


def _assert_same_hvp(ours, ref, inputs, rtol=1e-9, atol=1e-11):
    vs = [torch.randn_like(x) for x in inputs]
    leaves = [[x.detach().clone().requires_grad_() for x in inputs] for _ in range(2)]
    g1, h1 = _hvp(ours, leaves[0], vs)
    g2, h2 = _hvp(ref, leaves[1], vs)
    for a, b in zip(g1 + h1, g2 + h2):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


CE_CASES = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.15},
    {"weight": True, "ignore_index": 2},
    {"weight": True, "label_smoothing": 0.1, "reduction": "sum"},
    {"z_loss": 1e-2, "softcap": 4.0, "logit_scale": 0.8},
    {"prob": True},
    {"prob": True, "label_smoothing": 0.2, "weight": True},
]


@pytest.mark.parametrize("case", CE_CASES, ids=lambda c: "-".join(map(str, c.items())) or "plain")
@pytest.mark.parametrize("kdim", [False, True], ids=["2d", "kdim"])
def test_cross_entropy_second_order_matches_pytorch(case, kdim, device, backend):
    case = dict(case)
    shape = (5, 7, 3) if kdim else (9, 7)
    x = random_logits(shape, F64, device, requires_grad=False)
    if case.pop("prob", False):
        t = torch.softmax(torch.randn(shape, dtype=F64), 1).to(device)
    else:
        t = random_targets((shape[0], *shape[2:]), 7, device, ignore_index=2, ignore_frac=0.2)
        t[0] = 2
    if case.pop("weight", False):
        case["weight"] = torch.rand(7, dtype=F64, device=device) + 0.5
    extras = {k: case.pop(k) for k in ("z_loss", "softcap", "logit_scale") if k in case}

    def oracle(a):
        return oracle_cross_entropy(a, t, **case, **extras)[0]

    _assert_same_hvp(lambda a: tlf.cross_entropy(a, t, **case, **extras), oracle, [x])


def test_inplace_backward_with_create_graph_leaves_input_intact(device, backend):
    x = random_logits((6, 11), F64, device, requires_grad=False)
    t = random_targets((6,), 11, device)
    # (logits computed from the leaf: a leaf itself is refused, its values would become
    # its gradient in the usual backward)
    _assert_same_hvp(lambda a: tlf.cross_entropy(a * 1, t, inplace_backward=True),
                     lambda a: F.cross_entropy(a, t), [x])
    leaf = x.clone().requires_grad_()
    logits = leaf * 1
    (g,) = torch.autograd.grad(tlf.cross_entropy(logits, t, inplace_backward=True), leaf,
                               create_graph=True)
    assert torch.equal(logits.detach(), x) and g.requires_grad


@pytest.mark.parametrize("gamma,alpha", [(0.0, None), (2.0, 0.25), (1.5, "vec")])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_focal_second_order_matches_oracle(gamma, alpha, reduction, device, backend):
    x = random_logits((8, 6), F64, device, requires_grad=False)
    t = random_targets((8,), 6, device, ignore_frac=0.2)
    if alpha == "vec":
        alpha = torch.rand(6, dtype=F64, device=device)
    _assert_same_hvp(lambda a: tlf.focal_loss(a, t, gamma, alpha, reduction=reduction),
                     lambda a: focal_oracle(a, t, gamma, alpha, reduction=reduction), [x])


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_sigmoid_focal_second_order_matches_torchvision(reduction, device, backend):
    x = random_logits((7, 5), F64, device, requires_grad=False)
    t = (torch.rand(7, 5) > 0.6).to(device, F64)
    _assert_same_hvp(lambda a: tlf.sigmoid_focal_loss(a, t, 0.3, 1.5, reduction),
                     lambda a: sigmoid_focal_loss_torchvision(a, t, 0.3, 1.5, reduction), [x])


def _routes(loss_fn, x, *, target=None):
    """d loss / dx through each route that differentiates the reference code (create_graph,
    torch.func.grad, a target requiring grad), beside the eager one."""
    out = {}
    xx = x.clone().requires_grad_()
    out["eager"] = torch.autograd.grad(loss_fn(xx, target), xx)[0]
    xx = x.clone().requires_grad_()
    out["create_graph"] = torch.autograd.grad(loss_fn(xx, target), xx, create_graph=True)[0]
    out["func"] = grad(lambda a: loss_fn(a, target))(x)
    if target is not None and target.is_floating_point():
        xx = x.clone().requires_grad_()
        out["target_grad"] = torch.autograd.grad(
            loss_fn(xx, target.clone().requires_grad_()), xx)[0]
    return {k: v.detach() for k, v in out.items()}


@pytest.mark.parametrize("alpha,gamma", [(-1.0, 0.0), (0.25, 2.0), (0.5, 0.5)])
def test_sigmoid_focal_gradient_at_zero_logits(alpha, gamma, device, backend):
    # At x = 0 exactly (a zero-initialised head) the reference code's |x| had slope 0 while
    # its clamp_min(x, 0) had slope 1: d/dx came out 0.5 too high on every route through it.
    x = torch.zeros(3, 4, dtype=F64, device=device)
    x[1] = torch.tensor([0.0, 1.0, -2.0, 0.0])
    t = torch.tensor([0.0, 0.5, 1.0, 0.25], dtype=F64, device=device).expand(3, 4)
    xx = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(sigmoid_focal_loss_torchvision(xx, t, alpha, gamma, "sum"),
                                  xx)
    routes = _routes(lambda a, tt: tlf.sigmoid_focal_loss(a, tt, alpha, gamma, "sum"), x,
                     target=t)
    for name, got in routes.items():
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("gamma", [0.25, 0.5, 0.9])
def test_saturated_logits_keep_finite_gradients_on_every_route(gamma, device, backend):
    # README: values and gradients stay finite at saturated logits for every gamma >= 0.
    # Through the reference code (create_graph, torch.func) pow's slope at 1 - p_t = 0,
    # inf for gamma < 1, made them nan; the limit is 0, as the kernels compute.
    x = torch.tensor([[50.0, 0.0, -50.0], [0.3, -0.2, 0.1]], dtype=F64, device=device)
    t = torch.tensor([0, 2], device=device)
    focal = _routes(lambda a, _: tlf.focal_loss(a, t, gamma=gamma), x)
    xs = torch.tensor([800.0, -800.0, 0.4], dtype=F64, device=device)
    ts = torch.tensor([1.0, 0.0, 1.0], dtype=F64, device=device)
    sig = _routes(lambda a, tt: tlf.sigmoid_focal_loss(a, tt, 0.25, gamma, "sum"), xs,
                  target=ts)
    for routes in (focal, sig):
        for name, got in routes.items():
            assert got.isfinite().all(), (name, got)
            torch.testing.assert_close(got, routes["eager"], rtol=1e-10, atol=1e-14,
                                       msg=name)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_linear_cross_entropy_second_order(reduction, with_bias, weighted, prob, device,
                                           backend):
    h = torch.randn(10, 4, dtype=F64, device=device)
    w = torch.randn(9, 4, dtype=F64, device=device)
    b = torch.randn(9, dtype=F64, device=device)
    t = random_targets((10,), 9, device, ignore_frac=0.2)
    if prob:
        t = torch.softmax(torch.randn(10, 9, dtype=F64, device=device) * 2, -1)
    cw = torch.rand(9, dtype=F64, device=device) * 2.5 + 0.25 if weighted else None
    inputs = [h, w, b] if with_bias else [h, w]

    def ours(h, w, b=None):
        return tlf.linear_cross_entropy(h, w, t, b, reduction=reduction, label_smoothing=0.1,
                                        chunk_size=3, class_weight=cw)

    def ref(h, w, b=None):
        return F.cross_entropy(F.linear(h, w, b), t, weight=cw, reduction=reduction,
                               label_smoothing=0.1)

    _assert_same_hvp(ours, ref, inputs)


def test_gradgradcheck_every_loss(device, backend):
    """Numerical second derivatives, including the extras F.cross_entropy lacks."""
    x = random_logits((4, 5), F64, device)
    t = random_targets((4,), 5, device)
    xs = random_logits((3, 4), F64, device)
    ts = (torch.rand(3, 4) > 0.5).to(device, F64)
    h, w = (torch.randn(s, dtype=F64, device=device, requires_grad=True) for s in ((4, 3), (5, 3)))
    checks = [
        (lambda a: tlf.cross_entropy(a, t, z_loss=0.05, softcap=2.0, logit_scale=1.3,
                                     label_smoothing=0.1), (x,)),
        (lambda a: tlf.focal_loss(a, t, gamma=2.5, alpha=0.5, reduction="sum"), (x,)),
        (lambda a: tlf.sigmoid_focal_loss(a, ts, -1.0, 2.0, "mean"), (xs,)),
        (lambda a, b: tlf.linear_cross_entropy(a, b, t, z_loss=0.1, softcap=3.0), (h, w)),
    ]
    for fn, inputs in checks:
        assert torch.autograd.gradgradcheck(fn, inputs)


def test_meta_gradient_through_an_inner_step(device, backend):
    """MAML: the outer gradient flows through the inner step's gradient of the loss."""
    torch.manual_seed(1)
    x = torch.randn(16, 8, dtype=F64, device=device)
    t = random_targets((16,), 5, device)

    def outer_grad(loss_fn):
        w = torch.randn(5, 8, dtype=F64, device=device, generator=None)
        w = w.requires_grad_()
        (g,) = torch.autograd.grad(loss_fn(x @ w.T, t), w, create_graph=True)
        w_adapted = w - 0.5 * g
        (outer,) = torch.autograd.grad(loss_fn(x @ w_adapted.T, t), w)
        return outer

    torch.manual_seed(2)
    ours = outer_grad(tlf.cross_entropy)
    torch.manual_seed(2)
    ref = outer_grad(F.cross_entropy)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


# ---- torch.func and forward-mode AD ---------------------------------------------------------


def _no_fallback_warnings():
    # The custom ops would run under vmap through a slow per-sample fallback with a warning.
    return warnings.catch_warnings(record=True)


def test_per_sample_gradients_with_vmap_grad(device, backend):
    x = random_logits((6, 9), F64, device, requires_grad=False)
    t = random_targets((6,), 9, device)
    xs = random_logits((6, 4), F64, device, requires_grad=False)
    ts = (torch.rand(6, 4) > 0.5).to(device, F64)
    pairs = [
        (lambda a, b: tlf.cross_entropy(a[None], b[None], label_smoothing=0.1),
         lambda a, b: F.cross_entropy(a[None], b[None], label_smoothing=0.1), x, t),
        (lambda a, b: tlf.focal_loss(a[None], b[None], 2.0),
         lambda a, b: focal_oracle(a[None], b[None], 2.0), x, t),
        (lambda a, b: tlf.sigmoid_focal_loss(a, b, reduction="mean"),
         lambda a, b: sigmoid_focal_loss_torchvision(a, b, reduction="mean"), xs, ts),
    ]
    with _no_fallback_warnings() as caught:
        warnings.simplefilter("always")
        for ours, ref, a, b in pairs:
            torch.testing.assert_close(vmap(grad(ours))(a, b), vmap(grad(ref))(a, b))
    assert not [w for w in caught if "performance drop" in str(w.message)]


def test_func_transforms_match_pytorch(device, backend):
    x = random_logits((5, 6), F64, device, requires_grad=False)
    t = random_targets((5,), 6, device, ignore_frac=0.3)
    v = torch.randn_like(x)
    w = torch.rand(6, dtype=F64, device=device) + 0.5

    def ours(a, **kw):
        return tlf.cross_entropy(a, t, weight=w, **kw)

    def ref(a, **kw):
        return F.cross_entropy(a, t, weight=w, **kw)

    torch.testing.assert_close(grad(ours)(x), grad(ref)(x))
    torch.testing.assert_close(hessian(ours)(x), hessian(ref)(x))
    torch.testing.assert_close(jacrev(lambda a: ours(a, reduction="none"))(x),
                               jacrev(lambda a: ref(a, reduction="none"))(x))
    torch.testing.assert_close(jvp(ours, (x,), (v,)), jvp(ref, (x,), (v,)))
    batch = random_logits((3, 5, 6), F64, device, requires_grad=False)
    torch.testing.assert_close(vmap(ours)(batch), vmap(ref)(batch))


def test_forward_mode_ad(device, backend):
    x = random_logits((5, 6), F64, device, requires_grad=False)
    t = random_targets((5,), 6, device)
    v = torch.randn_like(x)
    xs, ts = x[:, :4], (torch.rand(5, 4) > 0.5).to(device, F64)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, v)
        pairs = [
            (tlf.cross_entropy(dual, t, reduction="none"),
             F.cross_entropy(dual, t, reduction="none")),
            (tlf.focal_loss(dual, t, 2.0), focal_oracle(dual, t, 2.0)),
            (tlf.sigmoid_focal_loss(fwAD.make_dual(xs, v[:, :4]), ts, reduction="sum"),
             sigmoid_focal_loss_torchvision(fwAD.make_dual(xs, v[:, :4]), ts, reduction="sum")),
        ]
        for ours, ref in pairs:
            torch.testing.assert_close(fwAD.unpack_dual(ours).tangent,
                                       fwAD.unpack_dual(ref).tangent)


@pytest.mark.parametrize("weighted", [False, True])
def test_linear_cross_entropy_under_func_transforms(device, backend, weighted):
    h = torch.randn(6, 4, dtype=F64, device=device)
    w = torch.randn(7, 4, dtype=F64, device=device)
    t = random_targets((6,), 7, device, ignore_frac=0.2)
    cw = torch.rand(7, dtype=F64, device=device) * 2.5 + 0.25 if weighted else None

    def ours(h, w):
        return tlf.linear_cross_entropy(h, w, t, z_loss=1e-2, class_weight=cw)

    def ref(h, w):
        logits = F.linear(h, w)
        return oracle_cross_entropy(logits, t, cw, z_loss=1e-2)[0]

    for a, b in zip(grad(ours, argnums=(0, 1))(h, w), grad(ref, argnums=(0, 1))(h, w)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(hessian(ours)(h, w), hessian(ref)(h, w))


def test_ordinary_training_never_takes_the_reference_route(device, monkeypatch):
    """The transform checks must not send plain eager training to the slow path."""
    if not _backend.has_kernels(device.type):
        pytest.skip("no compiled kernels for this device")

    def fail(*args, **kwargs):
        raise AssertionError("reference path taken")

    monkeypatch.setattr(reference, "ce_fwd", fail)
    monkeypatch.setattr(reference, "focal_fwd", fail)
    x = random_logits((4, 10), torch.float32, device)
    t = random_targets((4,), 10, device)
    (tlf.cross_entropy(x, t) + tlf.focal_loss(x, t)).backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_batched_upstream_gradients(reduction, device, backend):
    """autograd.grad(is_grads_batched=True) and vectorised autograd.functional, which batch
    the incoming gradients with vmap."""
    x = random_logits((5, 6), F64, device)
    t = random_targets((5,), 6, device, ignore_frac=0.2)
    xs = random_logits((5, 6), F64, device)
    ts = (torch.rand(5, 6) > 0.5).to(device, F64)
    h = torch.randn(5, 3, dtype=F64, device=device, requires_grad=True)
    w = torch.randn(6, 3, dtype=F64, device=device, requires_grad=True)
    pairs = [
        (tlf.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1),
         F.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1), x),
        (tlf.focal_loss(x, t, 2.0, reduction=reduction),
         focal_oracle(x, t, 2.0, reduction=reduction), x),
        (tlf.sigmoid_focal_loss(xs, ts, reduction=reduction).reshape(-1)[:5],
         sigmoid_focal_loss_torchvision(xs, ts, reduction=reduction).reshape(-1)[:5], xs),
        (tlf.linear_cross_entropy(h, w, t, reduction=reduction),
         F.cross_entropy(F.linear(h, w), t, reduction=reduction), w),
    ]
    for ours, ref, wrt in pairs:
        basis = torch.randn(3, *ours.shape, dtype=F64, device=device)
        (g1,) = torch.autograd.grad(ours, wrt, basis, retain_graph=True, is_grads_batched=True)
        (g2,) = torch.autograd.grad(ref, wrt, basis, retain_graph=True, is_grads_batched=True)
        assert g1.shape == (3, *wrt.shape)
        torch.testing.assert_close(g1, g2)

    def ours_fn(a):
        return tlf.cross_entropy(a, t, reduction=reduction)

    def ref_fn(a):
        return F.cross_entropy(a, t, reduction=reduction)

    jac = torch.autograd.functional.jacobian
    a = x.detach()
    torch.testing.assert_close(jac(ours_fn, a, vectorize=True), jac(ref_fn, a, vectorize=True))
    if reduction == "mean":
        hes = torch.autograd.functional.hessian
        torch.testing.assert_close(hes(ours_fn, a, vectorize=True),
                                   hes(ref_fn, a, vectorize=True))


def test_scalar_tensor_alpha_under_every_mode_of_differentiation(device, backend):
    """focal_loss's 0-dim tensor alpha gets its derivative from forward mode (jacfwd, dual
    tensors) and vmap as from reverse mode: it had been read as a number, a tangent of 0."""
    x = random_logits((5, 6), F64, device).detach()
    y = random_targets((5,), 6, device)
    alpha = torch.tensor(0.7, dtype=F64, device=device)
    expected = tlf.focal_loss(x, y, 2.0, alpha=1.0)  # (the loss is linear in alpha)

    def loss(a):
        return tlf.focal_loss(x, y, 2.0, alpha=a)

    torch.testing.assert_close(grad(loss)(alpha), expected)
    torch.testing.assert_close(torch.func.jacfwd(loss)(alpha), expected)
    with fwAD.dual_level():
        dual = fwAD.make_dual(alpha, torch.ones((), dtype=F64, device=device))
        torch.testing.assert_close(fwAD.unpack_dual(loss(dual)).tangent, expected)
    alphas = torch.tensor([0.2, 0.5], dtype=F64, device=device)
    torch.testing.assert_close(vmap(loss)(alphas), alphas * expected)


@pytest.mark.parametrize("name", ["z_loss", "logit_scale", "softcap"])
def test_scalar_options_being_differentiated_are_refused(name, device, backend):
    """A 0-dim tensor option carrying a derivative is refused in forward mode as in reverse
    mode (reading it as a number would drop the derivative silently)."""
    x = random_logits((4, 5), F64, device).detach()
    y = random_targets((4,), 5, device)
    value = torch.tensor(1.5, dtype=F64, device=device)
    assert torch.isfinite(tlf.cross_entropy(x, y, **{name: value}))  # (a plain one is taken)
    with pytest.raises(TypeError, match=name):
        tlf.cross_entropy(x, y, **{name: value.clone().requires_grad_()})
    with fwAD.dual_level(), pytest.raises(TypeError, match=name):
        tlf.cross_entropy(x, y, **{name: fwAD.make_dual(value, torch.ones_like(value))})
    with pytest.raises(TypeError, match=name):
        torch.func.jacfwd(lambda v: tlf.cross_entropy(x, y, **{name: v}))(value)


def test_functionalize_takes_tensor_options(device, backend):
    """torch.func.functionalize wraps its inputs without differentiating them: a 0-dim
    tensor option is a number there, as in eager (it had been refused as differentiated)."""
    x = random_logits((4, 5), F64, device).detach()
    y = random_targets((4,), 5, device)
    z = torch.tensor(0.1, dtype=F64, device=device)
    got = torch.func.functionalize(lambda a, v: tlf.cross_entropy(a, y, z_loss=v))(x, z)
    torch.testing.assert_close(got, tlf.cross_entropy(x, y, z_loss=0.1))
