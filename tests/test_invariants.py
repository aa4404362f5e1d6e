"""Laws the losses must obey, checked on random inputs (hypothesis drives the shapes)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchloss_fused as tlf

from .helpers import oracle_cross_entropy

SETTINGS = settings(max_examples=25, deadline=None)


def floats(low, high):
    # No subnormals: code compiled with -ffast-math elsewhere in the process (older
    # torch.compile C++ kernels) can switch them off, and hypothesis then refuses to run.
    return st.floats(low, high, allow_subnormal=False)


@st.composite
def problems(draw):
    n = draw(st.integers(1, 12))
    c = draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 3, 30]))
    y = torch.randint(0, c, (n,), generator=g)
    return x, y


@SETTINGS
@given(problems(), floats(-50, 50), st.sampled_from(["mean", "sum", "none"]))
def test_shift_invariance(p, shift, reduction):
    x, y = p
    a = tlf.cross_entropy(x.float(), y, reduction=reduction)
    b = tlf.cross_entropy((x + shift).float(), y, reduction=reduction)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * (1 + abs(shift)))


@SETTINGS
@given(problems(), floats(0, 1), st.sampled_from(["mean", "sum", "none"]))
def test_one_hot_probability_target_equals_index_target(p, eps, reduction):
    x, y = p
    one_hot = torch.nn.functional.one_hot(y, x.shape[1]).double()
    a = tlf.cross_entropy(x, y, reduction=reduction, label_smoothing=eps)
    b = tlf.cross_entropy(x, one_hot, reduction=reduction, label_smoothing=eps)
    torch.testing.assert_close(a, b)


@SETTINGS
@given(problems(), st.sampled_from(["mean", "sum", "none"]))
def test_unit_weights_equal_no_weights(p, reduction):
    x, y = p
    a = tlf.cross_entropy(x.float(), y, reduction=reduction, label_smoothing=0.1)
    b = tlf.cross_entropy(x.float(), y, reduction=reduction, label_smoothing=0.1,
                          weight=torch.ones(x.shape[1]))
    torch.testing.assert_close(a, b)


@SETTINGS
@given(problems(), floats(0.1, 10))
def test_weights_scale_free_under_mean(p, k):
    x, y = p
    w = torch.rand(x.shape[1], dtype=torch.float64) + 0.1
    a = tlf.cross_entropy(x, y, weight=w)
    b = tlf.cross_entropy(x, y, weight=w * k)
    torch.testing.assert_close(a, b)


@SETTINGS
@given(problems(), floats(0, 5))
def test_focal_bounded_by_cross_entropy(p, gamma):
    x, y = p
    fl = tlf.focal_loss(x, y, gamma=gamma, reduction="none")
    ce = tlf.cross_entropy(x, y, reduction="none")
    assert (fl <= ce + 1e-12).all() and (fl >= 0).all()


@SETTINGS
@given(problems(), floats(0, 1e-2), floats(0.5, 50), floats(0.25, 4))
def test_extras_match_their_definition(p, z, cap, scale):
    x, y = p
    ours, lse = tlf.cross_entropy(x, y, z_loss=z, softcap=cap, logit_scale=scale,
                                  return_lse=True)
    ref, ref_lse = oracle_cross_entropy(x, y, z_loss=z, softcap=cap, logit_scale=scale)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(lse, ref_lse)


@SETTINGS
@given(problems())
def test_gradient_rows_sum_to_zero(p):
    """Softmax gradients of a counted row sum to zero (probabilities sum to one)."""
    x, y = p
    x = x.requires_grad_()
    (g,) = torch.autograd.grad(tlf.cross_entropy(x, y, label_smoothing=0.3), x)
    torch.testing.assert_close(g.sum(1), torch.zeros(x.shape[0], dtype=x.dtype),
                               atol=1e-12, rtol=0)
