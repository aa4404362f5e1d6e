"""Tensors made under torch.inference_mode() beside tensors that train, as F takes them.

F refuses an inference tensor it would save for backward (a class-index target, a
weight) with autograd's "Inference tensors cannot be saved for backward" and its
workaround; ours gives the same error (it had been "Inference tensors do not track
version counter", which names no cause). F.linear saves no bias, so F's composed loss
trains with a frozen inference-mode bias; so does linear_cross_entropy (it had raised for
every reduction). Found by a helper's probe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchloss_fused as tlf

from .helpers import random_logits, random_targets

INFERENCE_ERROR = "Inference tensors cannot be saved for backward"


def _made_in_inference_mode(t):
    with torch.inference_mode():
        return t.clone()


CALLS = {
    "ce target": lambda x, t, w: tlf.cross_entropy(x, _made_in_inference_mode(t)),
    "ce target, none": lambda x, t, w: tlf.cross_entropy(x, _made_in_inference_mode(t),
                                                         reduction="none"),
    "ce weight, smoothing": lambda x, t, w: tlf.cross_entropy(
        x, t, weight=_made_in_inference_mode(w), label_smoothing=0.1),
    "ce probability target": lambda x, t, w: tlf.cross_entropy(
        x, _made_in_inference_mode(torch.softmax(x.detach(), 1))),
    "focal target": lambda x, t, w: tlf.focal_loss(x, _made_in_inference_mode(t)),
    "focal alpha": lambda x, t, w: tlf.focal_loss(x, t, alpha=_made_in_inference_mode(w)),
    "sigmoid focal targets": lambda x, t, w: tlf.sigmoid_focal_loss(
        x, _made_in_inference_mode(torch.rand_like(x.detach())), reduction="mean"),
    "module weight": lambda x, t, w: tlf.CrossEntropyLoss(
        weight=_made_in_inference_mode(w))(x, t),
}
F_CALLS = {  # (F's own refusals of the same tensors)
    "ce target": lambda x, t, w: F.cross_entropy(x, _made_in_inference_mode(t)),
    "ce weight, smoothing": lambda x, t, w: F.cross_entropy(
        x, t, weight=_made_in_inference_mode(w), label_smoothing=0.1),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_inference_tensor_beside_trained_logits_is_autograds_error(device, backend, name):
    x = random_logits((6, 5), torch.float32, device)
    t = random_targets((6,), 5, device)
    w = torch.rand(5, device=device) + 0.5
    calls = [CALLS[name]] + ([F_CALLS[name]] if name in F_CALLS else [])
    for call in calls:
        with pytest.raises(RuntimeError, match=INFERENCE_ERROR) as info:
            call(x, t, w)
        assert "clone" in str(info.value)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_ce_trains_beside_an_inference_mode_bias(device, backend, reduction):
    torch.manual_seed(3)
    h = torch.randn(6, 4, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, device=device, requires_grad=True)
    with torch.inference_mode():
        b = torch.randn(7, dtype=torch.float64, device=device)
    t = random_targets((6,), 7, device)
    ours = tlf.linear_cross_entropy(h, w, t, b, reduction=reduction)
    ours.sum().backward()
    got = (ours.detach(), h.grad, w.grad)
    h.grad = w.grad = None
    theirs = F.cross_entropy(F.linear(h, w, b), t, reduction=reduction)
    theirs.sum().backward()
    for a, e in zip(got, (theirs.detach(), h.grad, w.grad)):
        torch.testing.assert_close(a, e)
    assert b.is_inference()
