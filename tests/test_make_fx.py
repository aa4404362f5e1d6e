"""make_fx (torch.fx.experimental.proxy_tensor) and what traces under it
(torch.func.linearize): in its default "real" mode the values can be read while tracing,
and the graph keeps what the host computed from them as constants. The losses take the
registered ops there, as under torch.compile, so the graph divides by its inputs' count
of ignored targets (it had divided by the traced one: 0.73 where F gives 1.83) and
differentiates (the fast path's backward had failed to trace)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import torchloss_fused as tlf

from .helpers import random_logits, random_targets

LOSSES = {
    "ce": lambda x, y: tlf.cross_entropy(x, y),
    "ce_smooth_weight": lambda x, y: tlf.cross_entropy(
        x, y, weight=torch.linspace(0.5, 2, x.shape[1], dtype=x.dtype, device=x.device),
        label_smoothing=0.1),
    "focal": lambda x, y: tlf.focal_loss(x, y, gamma=2.0),
    "linear": lambda x, y: tlf.linear_cross_entropy(x[:, :4], x.T[:, :4].contiguous(), y),
}
ORACLES = {
    "ce": lambda x, y: F.cross_entropy(x, y),
    "ce_smooth_weight": lambda x, y: F.cross_entropy(
        x, y, weight=torch.linspace(0.5, 2, x.shape[1], dtype=x.dtype, device=x.device),
        label_smoothing=0.1),
    "linear": lambda x, y: F.cross_entropy(F.linear(x[:, :4], x.T[:, :4]), y),
}


def _loss_and_grad(loss_fn):
    def step(x, y):
        x = x.detach().requires_grad_()
        loss = loss_fn(x, y)
        return loss, torch.autograd.grad(loss, x)[0]
    return step


@pytest.mark.parametrize("mode", ["real", "fake", "symbolic"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_graph_counts_its_own_ignored_targets(device, backend, name, mode):
    x = random_logits((6, 6), torch.float32, device).detach()
    y = random_targets((6,), 6, device)
    graph = make_fx(_loss_and_grad(LOSSES[name]), tracing_mode=mode)(x, y)
    y_run = y.clone()
    y_run[:4] = -100
    loss, g = graph(x, y_run)
    want_loss, want_g = _loss_and_grad(LOSSES[name])(x, y_run)
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(g, want_g)
    if name in ORACLES:
        torch.testing.assert_close(loss, ORACLES[name](x, y_run))


@pytest.mark.parametrize("name", list(LOSSES))
def test_linearize_matches_jvp(device, backend, name):
    x = random_logits((5, 6), torch.float64, device).detach()
    y = random_targets((5,), 6, device)
    tangent = torch.randn_like(x)
    value, jvp_fn = torch.func.linearize(lambda a: LOSSES[name](a, y), x)
    want_value, want_jvp = torch.func.jvp(lambda a: LOSSES[name](a, y), (x,), (tangent,))
    torch.testing.assert_close(value, want_value)
    torch.testing.assert_close(jvp_fn(tangent), want_jvp)


@pytest.mark.parametrize("empty", [(0, 6), (5, 0)])
def test_symbolic_sigmoid_focal_mean_of_an_empty_input_is_nan(device, backend, empty):
    """A graph traced with symbolic sizes (make_fx, torch.export with a dynamic dim) run on
    an empty input: the mean is nan, as eagerly and as torchvision's loss.mean() gives it,
    with an empty gradient. The kernels' divisor (the element count) is then 0; it had
    been refused ("divisor must be at least 1"). A graph of the forward alone, as export
    makes, and one with the gradient."""
    def loss_fn(x, t):
        return tlf.sigmoid_focal_loss(x, t, reduction="mean")

    x = random_logits((5, 6), torch.float32, device).detach()
    t = torch.rand(5, 6, device=device)
    forward = make_fx(loss_fn, tracing_mode="symbolic")(x, t)
    both = make_fx(_loss_and_grad(loss_fn), tracing_mode="symbolic")(x, t)
    xe, te = torch.randn(empty, device=device), torch.rand(empty, device=device)
    assert loss_fn(xe, te).isnan()
    assert forward(xe, te).isnan()
    loss, g = both(xe, te)
    assert loss.isnan() and g.shape == xe.shape
    torch.testing.assert_close(forward(x, t), loss_fn(x, t))
