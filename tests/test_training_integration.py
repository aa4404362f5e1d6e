"""The losses inside the training machinery users wrap them in: activation checkpointing
(both implementations) and torch.export. The fused path keeps its gradient outside
save_for_backward, so checkpointing must neither lose it nor see different saved tensors
when it recomputes the region."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import torchloss_fused as tlf

N, H, C = 24, 16, 37


def _region(name, target):
    """A small model ending in the loss: what a user checkpoints."""

    def run(h, weight, bias):
        if name == "linear_cross_entropy":
            return tlf.linear_cross_entropy(h.tanh(), weight, target, bias=bias, chunk_size=10,
                                            label_smoothing=0.1)
        logits = F.linear(h, weight, bias).tanh() * 4
        if name == "cross_entropy":
            return tlf.cross_entropy(logits, target, label_smoothing=0.1, z_loss=1e-3)
        if name == "soft_cross_entropy":
            return tlf.cross_entropy(logits, target)
        if name == "focal_loss":
            return tlf.focal_loss(logits, target, gamma=2.0)
        return tlf.sigmoid_focal_loss(logits, target, reduction="mean")

    return run


def _target(name, device, n=N):
    if name == "soft_cross_entropy":
        return torch.randn(n, C, device=device).softmax(dim=1)
    if name == "sigmoid_focal_loss":
        return (torch.rand(n, C, device=device) < 0.3).float()
    t = torch.randint(0, C, (n,), device=device)
    t[::5] = -100
    return t


LOSSES = ["cross_entropy", "soft_cross_entropy", "focal_loss", "sigmoid_focal_loss",
          "linear_cross_entropy"]


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(device, backend, name,
                                                           use_reentrant):
    params = [torch.randn(N, H, device=device), torch.randn(C, H, device=device) * 0.3,
              torch.randn(C, device=device)]
    params = [p.requires_grad_() for p in params]
    run = _region(name, _target(name, device))

    plain = run(*params)
    plain.backward(torch.tensor(1.7, device=device))  # (not 1: the fused path rescales)
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    loss = checkpoint(run, *params, use_reentrant=use_reentrant)
    loss.backward(torch.tensor(1.7, device=device))
    # The same kernels on the same values: bitwise, whether the region's forward ran with
    # the fused gradient (non-reentrant) or without it, then again in backward (reentrant).
    assert torch.equal(loss, plain)
    for p, g in zip(params, expected):
        assert torch.equal(p.grad, g)


def test_checkpointed_loss_backward_twice_with_retain_graph(device, backend):
    x = (torch.randn(N, C, device=device) * 3).requires_grad_()
    t = _target("cross_entropy", device)
    loss = checkpoint(lambda x: tlf.cross_entropy(x.tanh(), t), x, use_reentrant=False)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    xr = x.detach().double().requires_grad_()
    (gr,) = torch.autograd.grad(F.cross_entropy(xr.tanh(), t), xr)
    assert torch.equal(g1, g2)
    torch.testing.assert_close(g1, gr.float(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["cross_entropy", "focal_loss"])
@pytest.mark.parametrize("upstream", [1.0, 0.25, math.inf])
def test_checkpointed_loss_is_not_recomputed(device, backend, name, upstream):
    # The fused gradient is kept outside the saved tensors, and the backward's common path
    # unpacks none of them (the target of the ignored rows included), so a non-reentrant
    # checkpoint around the loss never reruns its forward: one pass over the logits, not
    # two. (Ops that save nothing surround it here, so only the loss could trigger it.)
    x = (torch.randn(N, C, device=device) * 3).requires_grad_()
    t = _target(name, device)
    t[::3] = -100
    calls = []

    def region(x):
        calls.append(1)
        return getattr(tlf, name)(x * 2, t) * upstream

    loss = checkpoint(region, x, use_reentrant=False)
    (g,) = torch.autograd.grad(loss, x)
    assert len(calls) == 1
    assert torch.equal(g[::3], torch.zeros_like(g[::3]))


class _Head(torch.nn.Module):
    def __init__(self, name):
        super().__init__()
        self.name = name
        self.proj = torch.nn.Linear(H, C)

    def forward(self, h, target):
        if self.name == "linear_cross_entropy":
            return tlf.linear_cross_entropy(h, self.proj.weight, target, bias=self.proj.bias,
                                            reduction="sum", chunk_size=10)
        logits = self.proj(h)
        if self.name in ("cross_entropy", "soft_cross_entropy"):
            return tlf.cross_entropy(logits, target, label_smoothing=0.05)
        if self.name == "focal_loss":
            return tlf.focal_loss(logits, target, gamma=1.5, reduction="sum")
        return tlf.sigmoid_focal_loss(logits, target, reduction="mean")


@pytest.mark.parametrize("name", LOSSES)
def test_torch_export_round_trip(device, backend, name):
    # The exported graph calls the loss ops by name; saved and loaded again (the ops are
    # registered by importing torchloss_fused) it gives the eager values.
    model = _Head(name).to(device)
    h = torch.randn(N, H, device=device)
    target = _target(name, device)
    expected = model(h, target)
    program = torch.export.export(model, (h, target))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any(op.startswith("torchloss_fused") for op in ops), ops
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    h2, target2 = torch.randn(N, H, device=device), _target(name, device)
    torch.testing.assert_close(loaded(h, target), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loaded(h2, target2), model(h2, target2), rtol=1e-6, atol=1e-6)
    # The exported program trains too: its ops keep their autograd formulas.
    params = list(model.parameters())
    grads = torch.autograd.grad(model(h2, target2), params)
    loaded_params = [dict(loaded.named_parameters())[n] for n, _ in model.named_parameters()]
    loaded_grads = torch.autograd.grad(loaded(h2, target2), loaded_params)
    for a, b in zip(loaded_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", LOSSES)
def test_torch_export_with_a_dynamic_batch_size(device, backend, name):
    """Exported with the rows as a Dim, the program runs other batch sizes: no loss makes
    the exporter specialize on the size (the sigmoid focal mean once handed its kernel
    1 / numel as a float)."""
    model = _Head(name).to(device)
    rows = torch.export.Dim("rows", min=2)
    program = torch.export.export(model, (torch.randn(N, H, device=device), _target(name, device)),
                                  dynamic_shapes={"h": {0: rows}, "target": {0: rows}})
    for n in (7, 50):
        h, target = torch.randn(n, H, device=device), _target(name, device, n)
        torch.testing.assert_close(program.module()(h, target), model(h, target),
                                   rtol=1e-6, atol=1e-6)
