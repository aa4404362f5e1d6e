"""The C++ autograd node of small CPU training calls (csrc/reduced_loss_node.h): it stands
where _eager.FusedReduced's autograd.Function stood, so what the graph offers around a node
must still work on it, and its few Python cases (create_graph, batched upstream gradients,
a second backward, a target written in place) must reach Python. Values and gradients
against the general path: test_fused_reduced.py."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import torchloss_fused as tlf
from torchloss_fused import _backend
from torchloss_fused._upstream_guess import MIN_ELEMENTS

from .helpers import random_logits, random_targets

pytestmark = pytest.mark.skipif(
    not _backend.EXTENSION_LOADED or not hasattr(_backend.extension_module(),
                                                 "reduced_loss_node"),
    reason="compiled extension with reduced_loss_node not loaded")

NODE_TYPES = {"ce_fwd_grad_reduced_fast_eagerBackward",
              "focal_fwd_grad_reduced_fast_eagerBackward"}


def _node_loss(shape=(8, 11), loss=tlf.cross_entropy, **kwargs):
    x = random_logits(shape, torch.float32, "cpu")
    if len(shape) == 1:  # (unbatched: one target, not ignored)
        t = random_targets((), shape[0], "cpu")
    else:
        t = random_targets((shape[0], *shape[2:]), shape[1], "cpu", ignore_frac=0.2)
    return x, t, loss(x, t, **kwargs)


def _is_node(loss) -> bool:
    fn = loss.grad_fn
    return type(fn).__name__ in NODE_TYPES and "CppNode" in fn.name()


@pytest.mark.parametrize("shape", [(11,), (8, 11), (4, 11, 3), (2, 11, 3, 2)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_node_takes_the_logits_without_a_view_node(shape, reduction):
    # The gradient reaches the caller's logits directly (no squeeze or view node), shaped
    # like them, and equals F's.
    x, t, loss = _node_loss(shape, reduction=reduction)
    assert _is_node(loss)
    assert type(loss.grad_fn.next_functions[0][0]).__name__ == "AccumulateGrad"
    upstream = torch.rand_like(loss) + 0.5
    loss.backward(upstream)
    x64 = x.detach().double().requires_grad_()
    F.cross_entropy(x64, t, reduction=reduction).backward(upstream.double())
    assert x.grad.shape == x.shape
    torch.testing.assert_close(x.grad, x64.grad.float())


def test_node_serves_focal_loss_and_not_large_or_inplace_calls():
    _, _, focal = _node_loss(loss=tlf.focal_loss, gamma=2.0)
    assert type(focal.grad_fn).__name__ == "focal_fwd_grad_reduced_fast_eagerBackward"
    # (large CPU losses keep the Function, which guesses the upstream gradient)
    x = torch.randn(MIN_ELEMENTS // 64, 64, requires_grad=True)
    t = torch.randint(0, 64, (x.shape[0],))
    assert not _is_node(tlf.cross_entropy(x, t))
    small = torch.randn(8, 64, requires_grad=True)
    assert not _is_node(tlf.cross_entropy(small * 1, t[:8], inplace_backward=True))
    with torch.no_grad():
        assert tlf.cross_entropy(x[:8], t[:8]).grad_fn is None


def test_node_hooks_and_anomaly_mode():
    x, t, loss = _node_loss()
    seen = []
    loss.grad_fn.register_prehook(lambda grads: seen.append("pre"))
    loss.grad_fn.register_hook(lambda grads_in, grads_out: seen.append("post"))
    with torch.autograd.detect_anomaly():
        loss.backward()
    assert seen == ["pre", "post"]
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_node_backward_twice_and_a_freed_graph():
    # The buffer is handed on once; a second backward (retain_graph) recomputes through
    # Python with the same bits; after a graph is freed, autograd's own error.
    x, t, loss = _node_loss()
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x, retain_graph=False)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(loss, x)


def test_node_reports_a_target_written_in_place():
    x, t, loss = _node_loss()
    t.add_(0)
    with pytest.raises(RuntimeError, match="class-index target of a torchloss_fused loss"):
        loss.backward()


def test_node_create_graph_gives_second_derivatives():
    x, t, loss = _node_loss()
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    v = torch.randn_like(x)
    (hv,) = torch.autograd.grad(g, x, v)
    x64 = x.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(F.cross_entropy(x64, t), x64, create_graph=True)
    (hv64,) = torch.autograd.grad(g64, x64, v.double())
    torch.testing.assert_close(hv, hv64.float())


def test_node_backward_on_another_thread():
    x, t, loss = _node_loss()
    errors = []

    def run():
        try:
            loss.backward()
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert not errors
    x64 = x.detach().double().requires_grad_()
    F.cross_entropy(x64, t).backward()
    torch.testing.assert_close(x.grad, x64.grad.float())


def _compiled_autograd():
    ca = pytest.importorskip("torch._dynamo.compiled_autograd")
    enable = getattr(ca, "_enable", None) or getattr(ca, "enable", None)
    if enable is None:
        pytest.skip("this torch has no compiled autograd context")
    return enable(torch.compile(backend="eager"))


@pytest.mark.filterwarnings("ignore")
def test_node_under_compiled_autograd():
    # A C++ custom function: compiled autograd calls it opaquely, with the same gradient.
    torch._dynamo.reset()
    x, t, loss = _node_loss()
    assert _is_node(loss)
    with _compiled_autograd():
        loss.backward()
    x64 = x.detach().double().requires_grad_()
    F.cross_entropy(x64, t).backward()
    torch.testing.assert_close(x.grad, x64.grad.float())
    torch._dynamo.reset()
