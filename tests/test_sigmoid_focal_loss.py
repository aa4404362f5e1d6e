"""sigmoid_focal_loss against torchvision.ops.sigmoid_focal_loss's formula in float64."""

from __future__ import annotations

import pytest
import torch

import torchloss_fused as tlf
from torchloss_fused.reference import sigmoid_focal_loss_torchvision as torchvision_formula

from .helpers import assert_matches

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _inputs(shape, dtype, device, soft=False):
    x = (torch.randn(shape, dtype=torch.float64) * 3).to(device=device, dtype=dtype)
    t = torch.rand(shape, dtype=torch.float64) if soft else (
        torch.rand(shape, dtype=torch.float64) < 0.3).double()
    return x.requires_grad_(), t.to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [0.25, -1.0, 0.9])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.3])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("soft", [False, True], ids=["binary", "soft"])
def test_against_torchvision_formula(device, backend, dtype, alpha, gamma, reduction, soft):
    x, t = _inputs((37, 23), dtype, device, soft)
    ours = tlf.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction=reduction)
    assert ours.dtype == dtype and ours.shape == (() if reduction != "none" else x.shape)
    g_out = torch.rand_like(ours) + 0.5
    (g,) = torch.autograd.grad(ours, x, g_out)
    res = {}
    for name, dt in (("oracle", torch.float64), ("eager", dtype)):
        xr = x.detach().to(dt).requires_grad_()
        loss = torchvision_formula(xr, t.to(dt), alpha, gamma, reduction)
        (gr,) = torch.autograd.grad(loss, xr, g_out.to(dt))
        res[name] = (loss.detach(), gr)
    assert_matches(ours.detach(), res["oracle"][0], res["eager"][0], dtype, what="loss")
    assert_matches(g, res["oracle"][1], res["eager"][1], dtype, what="grad")


@pytest.mark.parametrize("shape", [(0,), (1,), (5, 0), (3, 4, 5), (100_003,)])
def test_shapes(device, backend, shape):
    x, t = _inputs(shape, torch.float32, device)
    ours = tlf.sigmoid_focal_loss(x, t)
    ref = torchvision_formula(x.detach().double(), t.double())
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.isnan(tlf.sigmoid_focal_loss(x, t, reduction="mean")) == (x.numel() == 0)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_saturated_inputs_finite_gradients(device, backend, gamma):
    x = torch.tensor([-200.0, -50.0, 50.0, 200.0, 0.0], device=device, requires_grad=True)
    t = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0], device=device)
    loss = tlf.sigmoid_focal_loss(x, t, gamma=gamma, reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(g).all()


def test_non_contiguous_and_targets_requiring_grad(device, backend):
    base = torch.randn(8, 12, dtype=torch.float64, device=device)
    x = base.t().requires_grad_()  # non-contiguous
    t = torch.rand(12, 8, dtype=torch.float64, device=device).requires_grad_()
    loss = tlf.sigmoid_focal_loss(x, t, reduction="sum")
    gx, gt = torch.autograd.grad(loss, (x, t))
    x2, t2 = x.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    gx2, gt2 = torch.autograd.grad(torchvision_formula(x2, t2, reduction="sum"), (x2, t2))
    torch.testing.assert_close(gx, gx2)
    torch.testing.assert_close(gt, gt2)


def test_mixed_dtypes_promote(device, backend):
    x, _ = _inputs((6, 5), torch.bfloat16, device)
    t = (torch.rand(6, 5, device=device) < 0.5).float()
    loss = tlf.sigmoid_focal_loss(x, t)
    assert loss.dtype == torch.float32
    ref = torchvision_formula(x.detach().double(), t.double())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("path", ["training", "no-grad", "split-ops"])
def test_reduced_paths(device, backend, dtype, reduction, path):
    """The three ways a reduced loss is computed: eager training (loss and gradient from
    one pass, backward() with a unit gradient skips the rescale), without autograd, and
    the split ops that torch.compile traces (sum, then a separate backward)."""
    x, t = _inputs((300, 257), dtype, device)  # several of the CPU's fixed chunks
    oracle_x = x.detach().double().requires_grad_()
    oracle = torchvision_formula(oracle_x, t.double(), 0.25, 2.0, reduction)
    oracle.backward()
    eager_x = x.detach().requires_grad_()
    eager = torchvision_formula(eager_x, t, 0.25, 2.0, reduction)
    eager.backward()
    if path == "no-grad":
        with torch.no_grad():
            ours = tlf.sigmoid_focal_loss(x, t, reduction=reduction)
        assert ours.grad_fn is None
    else:
        if path == "training":
            ours = tlf.sigmoid_focal_loss(x, t, reduction=reduction)
        else:
            ops = torch.ops.torchloss_fused_ref if backend == "reference" else (
                torch.ops.torchloss_fused)
            divisor = x.numel() if reduction == "mean" else 1
            ours = ops.sigmoid_focal_sum(x, t, 0.25, 2.0, divisor).to(dtype)
        ours.backward()
        assert_matches(x.grad, oracle_x.grad, eager_x.grad, dtype, what="grad")
    assert ours.dtype == dtype
    assert_matches(ours.detach(), oracle.detach(), eager.detach(), dtype, what="loss")


def _analytic_float64(x, t, alpha, gamma):
    """Loss and d loss / dx in float64 from formulas that stay relatively accurate for
    confident elements (torchvision's 1 - p_t and autograd's sigmoid backward cancel
    there, even in float64)."""
    x, t = x.double(), t.double()
    p, q = torch.sigmoid(x), torch.sigmoid(-x)
    ce = x.clamp_min(0) - x * t + torch.log1p(torch.exp(-x.abs()))
    m = t * q + (1 - t) * p
    a = alpha * t + (1 - alpha) * (1 - t)
    loss = a * ce * m**gamma
    d = (1 - t) * p - t * q
    if gamma:
        d = d * m**gamma + ce * gamma * m ** (gamma - 1) * p * q * (1 - 2 * t)
    return loss, a * d


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_confident_elements_keep_relative_accuracy(device, backend, gamma):
    """A confident element's loss is about exp(-|x|) and its gradient as small: both must
    be right relative to their size, not only next to the loss of an uncertain one."""
    x = torch.linspace(-80, 80, 64001, device=device).repeat(2)
    t = torch.arange(x.numel(), device=device).ge(64001).float()  # each x as 0, then 1
    xr = x.clone().requires_grad_()
    loss = tlf.sigmoid_focal_loss(xr, t, alpha=0.25, gamma=gamma, reduction="none")
    (g,) = torch.autograd.grad(loss, xr, torch.ones_like(loss))
    ref_loss, ref_g = _analytic_float64(x, t, 0.25, gamma)
    for what, ours, ref in (("loss", loss, ref_loss), ("grad", g, ref_g)):
        ref = ref.cpu()
        keep = ref.abs() > 1e-25  # (smaller ones go subnormal in float32 on the way)
        rel = ((ours.detach().cpu().double() - ref).abs() / ref.abs())[keep]
        assert rel.max() < 1e-6, f"{what}: max relative error {rel.max():.3g}"


def test_reduced_retain_graph_repeats_bitwise(device, backend):
    x, t = _inputs((64, 80), torch.float32, device)
    loss = tlf.sigmoid_focal_loss(x, t, reduction="mean")
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g3,) = torch.autograd.grad(loss, x, torch.tensor(2.0, device=device))
    assert torch.equal(g1, g2)
    torch.testing.assert_close(g3, 2 * g1, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reduced_sum_independent_of_thread_count(backend, dtype):
    # The CPU kernel sums a fixed partition in order: the thread count cannot change a bit.
    if backend != "kernels":
        pytest.skip("a property of the C++ kernel")
    x, t = _inputs((513, 301), dtype, "cpu")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            loss = tlf.sigmoid_focal_loss(x, t, reduction="sum")
            (g,) = torch.autograd.grad(loss, x)
            results.append((loss, g))
    finally:
        torch.set_num_threads(threads)
    for loss, g in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(g, results[0][1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_infinite_inputs_as_torchvision(device, backend, dtype, reduction):
    """+inf with a target below 1 is an infinite loss, as torchvision's; +inf with target 1
    and -inf with target 0 are nan in both (0 * inf). -inf with a target above 0 is inf
    here, where torchvision's (1 - t) x - logsigmoid(x) is inf - inf (README says so)."""
    inf = float("inf")
    x = torch.tensor([inf, inf, inf, -inf, 1.5], dtype=dtype, device=device)
    t = torch.tensor([0.0, 0.3, 1.0, 0.0, 0.2], dtype=dtype, device=device)
    for i in range(x.numel()):
        xi, ti = x[i:i + 1].clone().requires_grad_(), t[i:i + 1]
        ours = tlf.sigmoid_focal_loss(xi, ti, reduction=reduction)
        ref = torchvision_formula(xi.detach().double(), ti.double(), reduction=reduction)
        torch.testing.assert_close(ours.double(), ref, equal_nan=True, rtol=1e-2, atol=0,
                                   msg=lambda m, i=i: f"element {i}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [2.0, 3.3])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_confidently_wrong_inputs_near_the_range_edge(device, backend, dtype, gamma,
                                                      reduction):
    """The gradient of x -> +-0.6 max with the opposite target is alpha_t (p - t) = +-alpha_t
    (the modulating factor is 1, its slope 0): finite. ce * gamma m^(gamma - 1) overflowed
    first, and times p q = 0 gave nan."""
    big = 0.6 * torch.finfo(dtype).max
    x = torch.tensor([big, -big, 2.0], dtype=dtype, device=device, requires_grad=True)
    t = torch.tensor([0.0, 1.0, 0.0], dtype=dtype, device=device)
    loss = tlf.sigmoid_focal_loss(x, t, alpha=0.25, gamma=gamma, reduction=reduction)
    (g,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    scale = 1 / 3 if reduction == "mean" else 1.0
    p2 = torch.sigmoid(torch.tensor(2.0, dtype=torch.float64))
    g2 = 0.75 * (p2 ** gamma * (p2 - 0) + gamma * p2 ** (gamma - 1) * p2 * (1 - p2)
                 * torch.nn.functional.softplus(torch.tensor(2.0, dtype=torch.float64)))
    expect = torch.tensor([0.75, -0.25, g2.item()], dtype=torch.float64) * scale
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-5)
    torch.testing.assert_close(g.double().cpu(), expect, rtol=tol, atol=0)


def _layouts(device):
    base = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device)
    return {
        "channels_last": base.to(memory_format=torch.channels_last),
        "transposed": base[0, 0].t(),
        "strided": base[:, :, :, ::2],
        "transposed-strided": base[0].transpose(0, 2)[:, ::2],
        "contiguous": base,
    }


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "strided",
                                    "transposed-strided", "contiguous"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("same_target_layout", [True, False])
def test_loss_and_gradient_keep_the_input_layout(device, backend, layout, reduction,
                                                 same_target_layout):
    """As torchvision's elementwise ops do: the loss (reduction='none') and the gradient
    have the input's layout, with torchvision's values."""
    x = _layouts(device)[layout].float().requires_grad_()
    t = torch.rand_like(x) if same_target_layout else torch.rand(x.shape, device=device)
    ours = tlf.sigmoid_focal_loss(x, t, reduction=reduction)
    g_out = torch.rand_like(ours) + 0.5
    (g,) = torch.autograd.grad(ours, x, g_out)
    x2 = x.detach().clone().requires_grad_()
    ref = torchvision_formula(x2, t, reduction=reduction)
    (g2,) = torch.autograd.grad(ref, x2, g_out)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g2, rtol=1e-5, atol=1e-6)
    assert g.stride() == g2.stride()
    assert ours.stride() == ref.stride()


def _layouts_4d(shape, device, make):
    """A (2, 3, 4, 5) tensor laid out in several ways; `make(size)` draws the values."""
    n, c, h, w = shape
    return {
        "contiguous": make((n, c, h, w)),
        "channels_last": make((n, c, h, w)).to(memory_format=torch.channels_last),
        "transposed": make((w, h, c, n)).permute(3, 2, 1, 0),
        # stride 0 in two dims, the others not in dim order: TensorIterator's output
        # order for it is neither contiguous nor channels_last
        "expanded": make((w, 1, c, 1)).permute(3, 2, 1, 0).expand(n, c, h, w),
    }


@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("t_layout", ["contiguous", "channels_last", "transposed", "expanded"])
@pytest.mark.parametrize("t_grad", [False, True], ids=["t", "t_grad"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_layouts_of_inputs_and_targets_as_torchvision(device, backend, x_layout, t_layout,
                                                       t_grad, reduction):
    """torchvision's composition lays out the unreduced loss as an elementwise op of the
    targets alone (its BCE's `1 - targets`), the targets' gradient likewise (contiguous
    behind a mean, whose backward is dense), and the inputs' gradient as the inputs:
    ours the same, with the targets requiring grad too (autograd through the formula had
    laid everything out as the inputs) and with an expanded target (the unreduced loss had
    taken the inputs' order where the target's strides are 0)."""
    shape = (2, 3, 4, 5)
    x0 = _layouts_4d(shape, device, lambda s: torch.randn(s, device=device) * 3)[x_layout]
    t0 = _layouts_4d(shape, device, lambda s: torch.rand(s, device=device))[t_layout]
    g_out = torch.rand(shape, device=device) + 0.5
    results = []
    for fn in (tlf.sigmoid_focal_loss, torchvision_formula):
        x, t = x0.detach().requires_grad_(), t0.detach().requires_grad_(t_grad)
        loss = fn(x, t, reduction=reduction)
        # (the upstream gradient laid out as the loss, as ones_like(loss) would be)
        up = torch.empty_like(loss).copy_(g_out) if reduction == "none" else None
        results.append((loss, torch.autograd.grad(loss, (x, t) if t_grad else x, up)))
    (ours, our_grads), (ref, ref_grads) = results
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert ours.stride() == ref.stride()
    for g, g2 in zip(our_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, g2, rtol=1e-5, atol=1e-6)
        assert g.stride() == g2.stride()
