"""The fused reduced path (_eager.FusedReduced over csrc/reduced_loss.cpp): cross_entropy
and focal_loss reduced to a "sum" or a "mean" or not reduced, denominator to reduction in
one C++ call each way. It must give bitwise what the general eager path gives
(denominators in Python, the op's reduced call, or the op and a reshape): the loss, its
gradient for any upstream gradient, a second backward's, a differentiable one's, and the
loss without grad."""

from __future__ import annotations

import pytest
import torch

import torchloss_fused as tlf
from torchloss_fused import _backend, _eager

from .helpers import random_logits, random_targets

pytestmark = pytest.mark.skipif(not _backend.EXTENSION_LOADED,
                                reason="compiled extension not loaded")

C = 37


def _cases(device, dtype):
    """(name, loss of x) for the options that change the C++ path's steps."""
    t = random_targets((12,), C, device, ignore_frac=0.3)
    t3 = random_targets((4, 3), C, device, ignore_frac=0.3)
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype)
    prob = torch.softmax(torch.randn(12, C, dtype=torch.float64), 1).to(device)
    ignored = torch.full((12,), -100, device=device)
    yield "ce", (12, C), lambda x, r: tlf.cross_entropy(x, t, reduction=r)
    yield "ce-int32", (12, C), lambda x, r: tlf.cross_entropy(
        x, t.clamp_min(0).to(torch.int32), ignore_index=5, reduction=r)
    yield "ce-weight", (12, C), lambda x, r: tlf.cross_entropy(x, t, weight=w, reduction=r)
    yield "ce-options", (12, C), lambda x, r: tlf.cross_entropy(
        x, t, weight=w, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, logit_scale=0.7,
        reduction=r)
    yield "ce-prob", (12, C), lambda x, r: tlf.cross_entropy(x, prob.to(x.dtype), reduction=r)
    yield "ce-3d", (4, C, 3), lambda x, r: tlf.cross_entropy(x, t3, reduction=r)
    yield "ce-unbatched", (C,), lambda x, r: tlf.cross_entropy(x, t[0], reduction=r)
    yield "ce-all-ignored", (12, C), lambda x, r: tlf.cross_entropy(x, ignored, reduction=r)
    yield "focal", (12, C), lambda x, r: tlf.focal_loss(x, t, reduction=r)
    yield "focal-alpha", (12, C), lambda x, r: tlf.focal_loss(
        x, t, gamma=0.5, alpha=0.25, reduction=r)
    yield "focal-alpha-vector", (12, C), lambda x, r: tlf.focal_loss(
        x, t, gamma=1.0, alpha=w, reduction=r)


@pytest.fixture
def general_path(monkeypatch):
    """Switches the fused reduced path off: the losses take the general eager path."""
    def off():
        monkeypatch.setattr(_eager._NAMESPACES["torchloss_fused"], "fused_reduced", None)
    return off


def _run(loss_fn, x, reduction, upstream):
    loss = loss_fn(x, reduction)
    node = type(loss.grad_fn).__name__
    g = torch.full(loss.shape, upstream, dtype=loss.dtype, device=x.device)
    if upstream != 1 and g.dim():
        g.view(-1)[::2] = -0.75  # (rows with other gradients than their neighbours)
    (grad,) = torch.autograd.grad(loss, x, g, retain_graph=True)
    (again,) = torch.autograd.grad(loss, x, g)
    with torch.no_grad():
        no_grad = loss_fn(x, reduction)
    return node, [loss.detach(), grad, again, no_grad]


def _assert_bitwise(got, want, what):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_reduced_equals_the_general_path(device, general_path, dtype, reduction):
    runs = {}
    for fast in (True, False):
        if not fast:
            general_path()
        torch.manual_seed(3)
        for name, shape, loss_fn in _cases(device, dtype):
            x = random_logits(shape, dtype, device)
            for upstream in (1.0, 2.5):
                runs[fast, name, upstream] = _run(loss_fn, x, reduction, upstream)
    for (fast, name, upstream), (node, got) in runs.items():
        if not fast:
            continue
        want_node, want = runs[False, name, upstream]
        what = f"{name} upstream={upstream}"
        # (the two really are different paths, so the comparison means something)
        assert node.endswith("_reduced_fast_eagerBackward"), what
        assert not want_node.endswith("_reduced_fast_eagerBackward"), what
        _assert_bitwise(got, want, what)


@pytest.mark.parametrize("name", ["ce-options", "focal-alpha-vector"])
def test_fused_reduced_differentiates_twice(device, general_path, name):
    # create_graph=True: the gradient comes from autograd through the reference code, and a
    # Hessian-vector product through it equals the general path's.
    results = []
    for fast in (True, False):
        if not fast:
            general_path()
        torch.manual_seed(5)
        _, shape, loss_fn = next(c for c in _cases(device, torch.float64) if c[0] == name)
        x = random_logits(shape, torch.float64, device)
        v = torch.randn_like(x)
        loss = loss_fn(x, "mean")
        assert type(loss.grad_fn).__name__.endswith("_reduced_fast_eagerBackward") == fast
        (grad,) = torch.autograd.grad(loss, x, create_graph=True)
        (hvp,) = torch.autograd.grad((grad * v).sum(), x)
        results.append([grad.detach(), hvp])
    _assert_bitwise(*results, name)
    assert results[0][1].abs().sum() > 0  # second-order terms are there


def test_fused_reduced_serves_only_plain_eager_calls(device):
    x = random_logits((6, C), torch.float32, device)
    t = random_targets((6,), C, device)
    fast = "ce_fwd_grad_reduced_fast_eagerBackward"
    assert type(tlf.cross_entropy(x, t).grad_fn).__name__ == fast
    assert type(tlf.cross_entropy(x, t, reduction="none").grad_fn).__name__ == fast
    # With the lse, with gradients for the weight, in place: the general path.
    w = torch.rand(C, device=device, requires_grad=True)
    for loss in (tlf.cross_entropy(x, t, return_lse=True)[0],
                 tlf.cross_entropy(x, t, weight=w),
                 tlf.cross_entropy(x.clone(), t, inplace_backward=True)):
        node = loss.grad_fn
        while node is not None:
            assert type(node).__name__ != fast
            node = node.next_functions[0][0] if node.next_functions else None


def test_fused_reduced_reports_bad_targets(device):
    if device.type != "cpu":
        pytest.skip("a device-side assertion on CUDA")
    x = random_logits((3, 5), torch.float32, device)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(IndexError, match="Target 9 is out"):
            tlf.cross_entropy(x, torch.tensor([1, 9, 2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_unreduced_loss_is_a_tensor_of_its_own(device, dtype):
    # F's unreduced loss may be modified in place before backward; an output of a custom
    # Function that is a view (of the op's rows) may not, so the C++ reshape is untracked.
    x = random_logits((6, C), dtype, device)
    t = random_targets((6,), C, device)
    loss = tlf.cross_entropy(x, t, reduction="none")
    assert type(loss.grad_fn).__name__ == "ce_fwd_grad_reduced_fast_eagerBackward"
    assert not loss._is_view() and loss.shape == (6,) and loss.dtype == dtype
    loss.mul_(2)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    (want,) = torch.autograd.grad(2 * tlf.cross_entropy(x, t, reduction="none").sum(), x)
    torch.testing.assert_close(grad, want, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("rows", [8, 2048])
def test_fused_reduced_loss_under_compiled_autograd(rows):
    # A loss made eagerly, its backward compiled (compiled autograd): the C++ node of small
    # CPU losses (torch >= 2.7; the Function before), the Function of large ones, each with
    # F's gradient.
    ca = pytest.importorskip("torch._dynamo.compiled_autograd")
    enable = getattr(ca, "_enable", None) or getattr(ca, "enable", None)
    if enable is None:
        pytest.skip("this torch has no compiled autograd context")
    torch._dynamo.reset()
    x = random_logits((rows, 64), torch.float32, "cpu")
    t = random_targets((rows,), 64, "cpu", ignore_frac=0.2)
    loss = tlf.cross_entropy(x, t)
    assert type(loss.grad_fn).__name__ == "ce_fwd_grad_reduced_fast_eagerBackward"
    with enable(torch.compile(backend="eager")):
        loss.backward()
    x64 = x.detach().double().requires_grad_()
    torch.nn.functional.cross_entropy(x64, t).backward()
    torch.testing.assert_close(x.grad, x64.grad.float())
    torch._dynamo.reset()
