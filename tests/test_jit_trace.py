"""torch.jit.trace of a model ending in a loss: the traced graph (and the one saved and
loaded again) computes what the model computes for other inputs, including another batch
size and another number of ignored targets.

The trace records the registered ops (torchloss_fused::ce_fwd...) and the tensor
arithmetic around them; what Python computed from values or sizes is frozen into the
graph. Before these tests the eager fast path's denominator (the C++ reduced loss counts
the non-ignored targets on the host) was frozen: a model traced with no ignored target
divided by the full count ever after.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F

import torchloss_fused as tlf

C, H = 37, 8


def _soft(y):
    return F.one_hot(y.clamp(min=0), C).float() * 0.8 + 0.2 / C


LOSSES = {
    "ce": lambda z, y: tlf.cross_entropy(z, y, label_smoothing=0.1),
    "ce_weight_sum": lambda z, y: tlf.cross_entropy(
        z, y, weight=torch.linspace(0.5, 1.5, C, device=z.device), reduction="sum"),
    "ce_extras": lambda z, y: tlf.cross_entropy(z, y, z_loss=1e-3, softcap=5.0,
                                                logit_scale=1.5),
    "ce_lse": lambda z, y: sum(v.sum() for v in tlf.cross_entropy(z, y, return_lse=True)),
    "ce_none": lambda z, y: tlf.cross_entropy(z, y, reduction="none").sum(),
    "ce_inplace": lambda z, y: tlf.cross_entropy(z * 1.0, y, inplace_backward=True),
    "ce_prob": lambda z, y: tlf.cross_entropy(z, _soft(y)),
    "ce_spatial": lambda z, y: tlf.cross_entropy(z.unflatten(0, (-1, 2)).transpose(1, 2),
                                                 y.unflatten(0, (-1, 2))),
    "focal": lambda z, y: tlf.focal_loss(z, y, gamma=1.5),
    "sigmoid_focal": lambda z, y: tlf.sigmoid_focal_loss(z, _soft(y), reduction="mean"),
}


class Model(torch.nn.Module):
    def __init__(self, loss):
        super().__init__()
        self.head = torch.nn.Linear(H, C)
        self.loss = loss

    def forward(self, h, y):
        if self.loss is None:  # (linear cross-entropy takes the head's weight itself)
            return tlf.linear_cross_entropy(h, self.head.weight, y, self.head.bias,
                                            label_smoothing=0.1, chunk_size=4)
        return self.loss(self.head(h), y)


def _loss_and_grads(model, h, y):
    model.zero_grad()
    loss = model(h, y)
    loss.backward()
    return loss.detach(), model.head.weight.grad.clone(), model.head.bias.grad.clone()


@pytest.mark.parametrize("check_trace", [True, False])
@pytest.mark.parametrize("name", [*sorted(LOSSES), "linear_ce"])
def test_traced_model_computes_the_models_loss(device, backend, name, check_trace):
    # (check_trace=False: the trace taken once, as with grad; a value frozen in it shows in
    # the results below rather than in the tracer's own check)
    model = Model(LOSSES.get(name)).to(device)
    h = torch.randn(16, H, device=device)
    y = torch.randint(0, C, (16,), device=device)  # (no target ignored while tracing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch.jit's deprecation, tracer warnings)
        # (the check traces again, without grad, and compares the graphs)
        traced = torch.jit.trace(model, (h, y), check_trace=check_trace)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer, map_location=device)
    for n in (16, 10):
        h = torch.randn(n, H, device=device)
        y = torch.randint(0, C, (n,), device=device)
        y[: n // 3] = -100
        expected = _loss_and_grads(model, h, y)
        for module in (traced, loaded):
            for got, want in zip(_loss_and_grads(module, h, y), expected, strict=True):
                torch.testing.assert_close(got, want)


def _learned(shape, device):
    return torch.nn.Parameter(torch.rand(shape, device=device) + 0.5)


LEARNED = {  # (a loss of (logits, target, learned tensor); the learned tensor's shape)
    "ce_weight": (lambda z, y, w: tlf.cross_entropy(z, y, weight=w), (C,)),
    "ce_prob_target": (lambda z, y, p: tlf.cross_entropy(z, p.softmax(1)), (16, C)),
    "focal_alpha": (lambda z, y, a: tlf.focal_loss(z, y, alpha=a), (C,)),
    "sigmoid_targets": (lambda z, y, p: tlf.sigmoid_focal_loss(z, p.sigmoid(), reduction="sum"),
                        (16, C)),
    "linear_ce_class_weight": (None, (C,)),
}


class LearnedModel(torch.nn.Module):
    def __init__(self, name, device):
        super().__init__()
        self.head = torch.nn.Linear(H, C).to(device)
        self.loss, shape = LEARNED[name]
        self.learned = _learned(shape, device)

    def forward(self, h, y):
        if self.loss is None:
            return tlf.linear_cross_entropy(h, self.head.weight, y, self.head.bias,
                                            class_weight=self.learned, chunk_size=4)
        return self.loss(self.head(h), y, self.learned)


@pytest.mark.parametrize("traced_without_grad", [False, True])
@pytest.mark.parametrize("name", sorted(LEARNED))
def test_traced_model_learns_weights_and_targets(device, backend, name, traced_without_grad):
    # The gradient of a class weight, an alpha or a probability target comes from the
    # reference code: a graph traced under no_grad must record it too (it had recorded the
    # kernels, which give none: the gradient came back None), and the trace's check (which
    # traces again without gradients) must pass.
    model = LearnedModel(name, device)
    h = torch.randn(16, H, device=device)
    y = torch.randint(0, C, (16,), device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if traced_without_grad:
            with torch.no_grad():
                traced = torch.jit.trace(model, (h, y), check_trace=False)
        else:
            traced = torch.jit.trace(model, (h, y))
    grads = []
    for module in (model, traced):  # (the traced module shares the model's parameters)
        module.zero_grad(set_to_none=True)
        module(h, y).backward()
        grads.append(module.learned.grad)
        assert grads[-1] is not None
        grads[-1] = grads[-1].clone()
    torch.testing.assert_close(grads[1], grads[0])
