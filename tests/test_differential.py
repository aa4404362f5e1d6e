"""tlf.cross_entropy against F.cross_entropy in float64 over random calls: hypothesis draws
the shape (no batch dim, (N, C), K spatial dims, N = 0), the layout (contiguous,
transposed, a slice of a larger tensor), the dtype, every F option (weight, ignore_index
also a real class, label_smoothing up to 1, probability targets, reduction), non-finite
logits, ignored targets (all of them, sometimes) and the upstream gradient (negative, zero
and NaN included), and each call must give F's values, dtype and gradient.

The one documented difference (README): an ignored row's gradient is exactly zero, where
F's is NaN when the row holds a NaN, a +inf or only -inf."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchloss_fused as tlf

from .helpers import as_f_on_device, draw_index_targets

TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 5e-2, torch.float16: 5e-3}


@st.composite
def calls(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    no_batch = draw(st.booleans()) and draw(st.booleans())
    C = draw(st.sampled_from([1, 2, 3, 7, 33, 100, 257, 1000]))
    N = draw(st.sampled_from([0, 1, 2, 5, 17]))
    spatial = [] if no_batch else draw(st.lists(st.integers(1, 3), max_size=2))
    shape = [C] if no_batch else [N, C, *spatial]
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x * draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    if x.numel() and draw(st.integers(0, 9)) == 0:
        x.view(-1)[int(torch.randint(x.numel(), (1,), generator=g))] = draw(
            st.sampled_from([math.inf, -math.inf, math.nan]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    if layout == "transposed" and x.dim() >= 2:
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    elif layout == "sliced":
        x = torch.zeros([s + 2 for s in shape], dtype=torch.float64)[
            tuple(slice(1, 1 + s) for s in shape)].copy_(x)
    kw = {"reduction": draw(st.sampled_from(["mean", "sum", "none"])),
          "label_smoothing": draw(st.sampled_from([0.0, 0.1, 0.5, 1.0, -0.2]))}
    tshape = [] if no_batch else [N, *spatial]
    if draw(st.integers(0, 3)) == 0:  # probability targets
        t = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64),
                          0 if no_batch else 1)
        ignored = torch.zeros(tshape, dtype=torch.bool)
    else:
        t, kw["ignore_index"] = draw_index_targets(draw, g, tshape, C)
        ii = kw["ignore_index"]
        ignored = t == ii
    if draw(st.booleans()):
        kw["weight"] = torch.rand(C, generator=g, dtype=torch.float64) + 0.1
    upstream = draw(st.sampled_from([1.0, 0.5, -2.0, 0.0, math.nan]))
    dtype = draw(st.sampled_from(list(TOL)))
    return x, t, ignored, kw, upstream, dtype


def _same(ours: torch.Tensor, ref: torch.Tensor, tol: float) -> bool:
    ours = ours.double()
    if not torch.equal(ours.isnan(), ref.isnan()):
        return False
    inf = ref.isinf() | ours.isinf()
    if not torch.equal(ours[inf], ref[inf]):
        return False
    fin = ~(ref.isnan() | inf)
    return bool(((ours[fin] - ref[fin]).abs() <= tol * (1 + ref[fin].abs())).all())


# (the backend fixture only picks the implementation: the same for every example)
@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls())
def test_matches_f_cross_entropy(device, backend, call):
    x, t, ignored, kw, upstream, dtype = call
    prob = t.is_floating_point()
    xd = x.to(dtype)
    ours_kw = dict(kw)
    if "weight" in kw:
        ours_kw["weight"] = kw["weight"].to(dtype)
    lowp = F.cross_entropy(xd, t.to(dtype) if prob else t, **ours_kw)
    if "weight" in kw:
        ours_kw["weight"] = ours_kw["weight"].to(device)
    a = xd.to(device, copy=True).requires_grad_()
    ours = tlf.cross_entropy(a, (t.to(dtype) if prob else t).to(device), **ours_kw)
    assert ours.dtype == lowp.dtype and ours.shape == lowp.shape
    xr = xd.double().clone().requires_grad_()
    ref = F.cross_entropy(xr, t, **kw)
    ref = as_f_on_device(ref, device, x.dim() == 1, prob, kw, ignored)
    assert _same(ours.detach().cpu(), ref.detach(), TOL[dtype]), (ours, ref)
    if ref.numel() == 0:
        return
    g = torch.full(ref.shape, upstream, dtype=torch.float64)
    (ref * g).sum().backward()
    (ours.double() * g.to(device)).sum().backward()
    expect, got = xr.grad, a.grad.cpu()
    if not prob:  # (the documented difference: ignored rows are exactly zero)
        rows = ignored.unsqueeze(0 if x.dim() == 1 else 1).expand_as(expect)
        expect = expect.masked_fill(rows, 0)
        if math.isnan(upstream):
            # A NaN upstream gradient may reach ignored rows too (F leaves them 0): the
            # gradient is not finite either way.
            got = got.masked_fill(rows, 0)
        assert torch.equal(got[rows], torch.zeros_like(got[rows]))
    assert _same(got, expect, TOL[dtype])
