"""focal_loss and sigmoid_focal_loss against their formulas in float64 over random calls
(hypothesis): shapes with and without spatial dims or batch, empty batches, layouts,
dtypes, gamma (0, fractional, large), alpha (none, a number, per class; torchvision's
alpha < 0), ignore_index also a real class with none, some or all targets ignored, binary
or soft sigmoid targets in another dtype, reductions and upstream gradients (negative and
zero included)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchloss_fused as tlf
from benchmarks.eager_losses import sigmoid_focal_elements

from .helpers import assert_matches, draw_index_targets
from .test_focal_loss import focal_oracle

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _layout(draw, x):
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    if layout == "transposed" and x.dim() >= 2:
        return x.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "sliced":
        big = torch.zeros([s + 2 for s in x.shape], dtype=x.dtype)
        return big[tuple(slice(1, 1 + s) for s in x.shape)].copy_(x)
    return x


def _check(ours, ref, eager, dtype, upstream, inputs, what):
    """Loss and input gradients of ours against the float64 formula, eager PyTorch's own
    error in `dtype` as the low-precision budget."""
    assert ours.dtype == eager.dtype and ours.shape == ref.shape, (ours.dtype, eager.dtype)
    assert_matches(ours.detach().cpu(), ref.detach(), eager.detach(), dtype, what=what)
    if ref.numel() == 0:
        return
    grads = []
    for out, x in zip((ours, ref, eager), inputs):
        g = torch.full(out.shape, upstream, dtype=torch.float64, device=x.device)
        (grad,) = torch.autograd.grad((out.double() * g).sum(), x)
        grads.append(grad.cpu())
    assert_matches(*grads, dtype, what=f"grad of {what}")


@st.composite
def focal_calls(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    C = draw(st.sampled_from([1, 2, 5, 33, 300]))
    no_batch = draw(st.integers(0, 5)) == 0
    N = draw(st.sampled_from([0, 1, 4, 17]))
    spatial = [] if no_batch else draw(st.lists(st.integers(1, 3), max_size=2))
    shape = [C] if no_batch else [N, C, *spatial]
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = _layout(draw, x * draw(st.sampled_from([0.1, 1.0, 4.0])))
    t, ii = draw_index_targets(draw, g, [] if no_batch else [N, *spatial], C)
    kind = draw(st.sampled_from(["none", "number", "tensor"]))
    alpha = {"none": None, "number": draw(st.sampled_from([0.25, 1.0, 2.0])),
             "tensor": torch.rand(C, generator=g, dtype=torch.float64) + 0.1}[kind]
    kw = {"gamma": draw(st.sampled_from([0.0, 0.5, 1.0, 2.0, 4.5])), "ignore_index": ii,
          "reduction": draw(st.sampled_from(["mean", "sum", "none"]))}
    return x, t, alpha, kw, draw(st.sampled_from(DTYPES)), \
        draw(st.sampled_from([1.0, 0.5, -2.0, 0.0]))


@SETTINGS
@given(focal_calls())
def test_focal_loss_matches_its_formula(device, backend, call):
    x, t, alpha, kw, dtype, upstream = call
    xd = x.to(dtype)
    ours_in = xd.to(device, copy=True).requires_grad_()
    ours_alpha = alpha.to(device, dtype) if isinstance(alpha, torch.Tensor) else alpha
    ours = tlf.focal_loss(ours_in, t.to(device), alpha=ours_alpha, **kw)
    ref_in = xd.double().requires_grad_()
    ref = focal_oracle(ref_in, t, alpha=alpha, **kw)
    eager_in = xd.clone().requires_grad_()
    eager = focal_oracle(eager_in, t, alpha=alpha, dtype=dtype, **kw)
    _check(ours, ref, eager, dtype, upstream, (ours_in, ref_in, eager_in), "focal_loss")


@st.composite
def sigmoid_calls(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    shape = draw(st.sampled_from([[0], [7], [5, 3], [4, 80], [2, 3, 33], [1, 1000]]))
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = _layout(draw, x * draw(st.sampled_from([0.1, 1.0, 4.0])))
    soft = draw(st.booleans())
    u = torch.rand(shape, generator=g, dtype=torch.float64)
    t = u if soft else (u < 0.3).double()
    kw = {"alpha": draw(st.sampled_from([0.25, 0.5, -1.0])),
          "gamma": draw(st.sampled_from([0.0, 0.5, 2.0, 4.5])),
          "reduction": draw(st.sampled_from(["none", "mean", "sum"]))}
    dtype = draw(st.sampled_from(DTYPES))
    t_dtype = draw(st.sampled_from([dtype, torch.float32]))
    return x, t, kw, dtype, t_dtype, draw(st.sampled_from([1.0, 0.5, -2.0, 0.0]))


def _torchvision_formula(x, t, alpha, gamma, reduction):
    loss = sigmoid_focal_elements(x, t, alpha, gamma)
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss


@SETTINGS
@given(sigmoid_calls())
def test_sigmoid_focal_loss_matches_torchvision_formula(device, backend, call):
    x, t, kw, dtype, t_dtype, upstream = call
    xd, td = x.to(dtype), t.to(t_dtype)
    ours_in = xd.to(device, copy=True).requires_grad_()
    ours = tlf.sigmoid_focal_loss(ours_in, td.to(device), **kw)
    ref_in = xd.double().requires_grad_()
    ref = _torchvision_formula(ref_in, td.double(), **kw)
    eager_in = xd.clone().requires_grad_()
    eager = _torchvision_formula(eager_in, td, **kw)
    _check(ours, ref, eager, dtype, upstream, (ours_in, ref_in, eager_in),
           "sigmoid_focal_loss")
