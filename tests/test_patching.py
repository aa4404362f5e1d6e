"""tlf.patch_torch(): torch.nn.functional.cross_entropy, and so nn.CrossEntropyLoss, made
this library's, and put back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchloss_fused as tlf
from torchloss_fused import functional

ORIGINAL = F.cross_entropy


@pytest.fixture
def calls(monkeypatch):
    """The calls that reach torchloss_fused's cross_entropy through the patch."""
    seen = []
    inner = functional.cross_entropy

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return inner(*args, **kwargs)

    monkeypatch.setattr("torchloss_fused.patching.cross_entropy", spy)
    yield seen
    torch.nn.functional.cross_entropy = ORIGINAL  # (whatever a failed test left)


def _pytorch_callers(x, y):
    """What code that does not know this library calls: the module and the function, as
    looked up at call time."""
    return (torch.nn.CrossEntropyLoss(label_smoothing=0.1)(x, y),
            torch.nn.functional.cross_entropy(x, y, reduction="sum", ignore_index=2))


def test_patch_routes_pytorch_callers_and_restores(device, calls):
    x = torch.randn(9, 13, device=device, requires_grad=True)
    y = torch.randint(0, 13, (9,), device=device)
    want = _pytorch_callers(x, y)
    want_grads = torch.autograd.grad(sum(want), x)
    with tlf.patch_torch() as patch:
        assert patch.active
        got = _pytorch_callers(x, y)
        assert len(calls) == 2 and calls[0]["label_smoothing"] == 0.1
        got_grads = torch.autograd.grad(sum(got), x)
    assert not patch.active and F.cross_entropy is ORIGINAL
    for g, w in zip((*got, *got_grads), (*want, *want_grads), strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w)
    _pytorch_callers(x, y)
    assert len(calls) == 2  # (restored: no more calls reach it)


def test_patch_under_torch_compile(calls):
    x = torch.randn(6, 10, requires_grad=True)
    y = torch.randint(0, 10, (6,))
    with tlf.patch_torch():
        torch._dynamo.reset()
        compiled = torch.compile(lambda x, y: torch.nn.CrossEntropyLoss()(x, y),
                                 backend="aot_eager", fullgraph=True)
        got = compiled(x, y)
    assert calls  # (traced through the patched function)
    torch.testing.assert_close(got, ORIGINAL(x, y))


def test_patches_nest_and_restore_in_reverse_order():
    outer = tlf.patch_torch()
    inner = tlf.patch_torch()
    inner.restore()
    assert F.cross_entropy is functional.cross_entropy  # (the outer patch still holds)
    inner.restore()  # (a second restore does nothing)
    outer.restore()
    assert F.cross_entropy is ORIGINAL


def test_restore_refuses_to_undo_a_later_replacement():
    patch = tlf.patch_torch()

    def someone_elses(*args, **kwargs):
        return ORIGINAL(*args, **kwargs)

    try:
        torch.nn.functional.cross_entropy = someone_elses
        with pytest.raises(RuntimeError, match="replaced again"):
            patch.restore()
        assert F.cross_entropy is someone_elses and patch.active
        torch.nn.functional.cross_entropy = functional.cross_entropy
        patch.restore()
        assert F.cross_entropy is ORIGINAL
    finally:
        torch.nn.functional.cross_entropy = ORIGINAL
