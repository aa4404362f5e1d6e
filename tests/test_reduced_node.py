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
from torchloss_fused import _backend, _eager
from torchloss_fused._upstream_guess import MIN_ELEMENTS

from .helpers import random_logits, random_targets

pytestmark = pytest.mark.skipif(
    not _backend.EXTENSION_LOADED or not getattr(_backend.extension_module(),
                                                 "REDUCED_NODE", 0),
    reason="compiled extension with the node not loaded (or torch < 2.7: REDUCED_NODE 0)")

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


# ---- functional.cross_entropy's fast lane (_C.fast_cross_entropy) ----------------------------

_DEFAULTS = dict(weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
                 logit_scale=1.0, return_lse=False, inplace_backward=False)


def _fast(x, t, **changes):
    """_eager.fast_cross_entropy with functional.cross_entropy's arguments in its order."""
    a = {**_DEFAULTS, **changes}
    return _eager.fast_cross_entropy(x, t, *a.values())


def _slow_path(monkeypatch):
    monkeypatch.setattr(_eager, "fast_cross_entropy", lambda *args: None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target", ["int64", "int32-ignore-3", "uint8-ignore-big"])
def test_fast_lane_is_the_slow_path_bit_for_bit(monkeypatch, dtype, reduction, target):
    x = random_logits((9, 13), dtype, "cpu")
    t = random_targets((9,), 13, "cpu", ignore_frac=0.3)
    ignore_index = -100
    if target == "int32-ignore-3":
        t, ignore_index = t.clamp_min(3).to(torch.int32), 3
    elif target == "uint8-ignore-big":
        t, ignore_index = t.clamp_min(0).to(torch.uint8), 2**40
    upstream = torch.rand(9 if reduction == "none" else (), dtype=torch.float64) + 0.5
    assert _fast(x, t, ignore_index=ignore_index, reduction=reduction) is not None
    results = []
    for fast in (True, False):
        if not fast:
            _slow_path(monkeypatch)
        loss = tlf.cross_entropy(x, t, ignore_index=ignore_index, reduction=reduction)
        assert _is_node(loss)
        (grad,) = torch.autograd.grad(loss, x, upstream.to(loss.dtype))
        with torch.no_grad():
            no_grad = tlf.cross_entropy(x, t, ignore_index=ignore_index, reduction=reduction)
        results.append((loss.detach(), grad, no_grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("changes", [
    dict(weight=torch.ones(13)), dict(size_average=True), dict(reduce=False),
    dict(reduction="elementwise_mean"), dict(reduction="batchmean"),
    dict(label_smoothing=0.1), dict(label_smoothing=False), dict(label_smoothing=-0.5),
    dict(z_loss=1e-4), dict(softcap=30.0), dict(logit_scale=2.0), dict(return_lse=True),
    dict(inplace_backward=True), dict(ignore_index=True), dict(ignore_index=2.0),
    dict(ignore_index=2**63), dict(ignore_index=torch.tensor(3)),
], ids=lambda c: next(iter(c)) + "=" + repr(next(iter(c.values())))[:12])
def test_fast_lane_declines_other_arguments(changes):
    # (functional.py then checks them: its warnings and errors, and the options' paths)
    x = random_logits((5, 13), torch.float32, "cpu")
    t = random_targets((5,), 13, "cpu")
    assert _fast(x, t) is not None
    assert _fast(x, t, **changes) is None


def test_fast_lane_declines_other_tensors():
    x = random_logits((5, 13), torch.float32, "cpu")
    t = random_targets((5,), 13, "cpu")
    for xs, ts in [
        (x[0], t[0]),  # unbatched
        (x.reshape(5, 13, 1), t.reshape(5, 1)),  # (N, C, d)
        (x, torch.softmax(x.detach(), 1)),  # probabilities
        (x, t[:4]),  # another batch size (functional.py's error)
        (x, t.to(torch.int16)),  # a dtype F refuses
        (x.detach().to(torch.int64), t),
        (x.detach().to_sparse(), t),
    ]:
        assert _fast(xs, ts) is None, (tuple(xs.shape), ts.dtype)
    # (served: a Parameter, no classes with every target ignored)
    assert _fast(torch.nn.Parameter(x.detach()), t) is not None
    assert _fast(x[:, :0], torch.full_like(t, -100)) is not None


def test_fast_lane_declines_inside_transforms_modes_and_autocast():
    from torch.utils._python_dispatch import TorchDispatchMode

    x = random_logits((5, 13), torch.float32, "cpu")
    t = random_targets((5,), 13, "cpu")
    seen = []

    def record(d):
        seen.append(_fast(x, t))
        return d

    torch.func.vmap(record)(torch.zeros(2))  # (x and t from outside the transform)

    class Passing(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passing():
        seen.append(_fast(x, t))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seen.append(_fast(x, t))
    assert seen == [None] * 3
    # (a torch.func transform through the public function: the reference's gradient)
    (g,) = torch.func.grad(lambda z: tlf.cross_entropy(z, t))(x.detach()),
    x64 = x.detach().double().requires_grad_()
    F.cross_entropy(x64, t).backward()
    torch.testing.assert_close(g, x64.grad.float())


# ---- functional.focal_loss's fast lane (_C.fast_focal_loss) --------------------------------

_FOCAL_DEFAULTS = dict(gamma=2.0, alpha=None, ignore_index=-100, reduction="mean")


def _fast_focal(x, t, **changes):
    """_eager.fast_focal_loss with functional.focal_loss's arguments in its order."""
    a = {**_FOCAL_DEFAULTS, **changes}
    return _eager.fast_focal_loss(x, t, *a.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [
    dict(), dict(gamma=0), dict(gamma=1.0, alpha=0.25), dict(gamma=0.5, alpha=3),
    dict(gamma=2, ignore_index=3, target="int32"), dict(ignore_index=2**40, target="uint8"),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_focal_fast_lane_is_the_slow_path_bit_for_bit(monkeypatch, dtype, reduction, options):
    options = dict(options)
    target = options.pop("target", "int64")
    x = random_logits((9, 13), dtype, "cpu")
    t = random_targets((9,), 13, "cpu", ignore_frac=0.3)
    if target == "int32":
        t = t.clamp_min(3).to(torch.int32)
    elif target == "uint8":
        t = t.clamp_min(0).to(torch.uint8)
    upstream = torch.rand(9 if reduction == "none" else (), dtype=torch.float64) + 0.5
    assert _fast_focal(x, t, reduction=reduction, **options) is not None
    results = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(_eager, "fast_focal_loss", lambda *args: None)
        loss = tlf.focal_loss(x, t, reduction=reduction, **options)
        assert _is_node(loss)
        (grad,) = torch.autograd.grad(loss, x, upstream.to(loss.dtype))
        with torch.no_grad():
            no_grad = tlf.focal_loss(x, t, reduction=reduction, **options)
        results.append((loss.detach(), grad, no_grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("changes", [
    dict(gamma=-1.0), dict(gamma=float("nan")), dict(gamma=float("inf")), dict(gamma=True),
    dict(gamma=torch.tensor(2.0)), dict(gamma=10**400), dict(alpha=float("inf")),
    dict(alpha=False), dict(alpha=torch.tensor(0.25)), dict(alpha=torch.ones(13)),
    dict(reduction="elementwise_mean"), dict(reduction="batchmean"), dict(ignore_index=True),
    dict(ignore_index=2.0), dict(ignore_index=2**63), dict(ignore_index=torch.tensor(3)),
], ids=lambda c: next(iter(c)) + "=" + repr(next(iter(c.values())))[:12])
def test_focal_fast_lane_declines_other_arguments(changes):
    # (functional.py then checks them, and takes a tensor alpha's paths)
    x = random_logits((5, 13), torch.float32, "cpu")
    t = random_targets((5,), 13, "cpu")
    assert _fast_focal(x, t) is not None
    assert _fast_focal(x, t, **changes) is None


def test_focal_fast_lane_declines_other_tensors_modes_and_large_losses():
    x = random_logits((5, 13), torch.float32, "cpu")
    t = random_targets((5,), 13, "cpu")
    for xs, ts in [(x[0], t[0]), (x.reshape(5, 13, 1), t.reshape(5, 1)), (x, t[:4]),
                   (x, t.to(torch.int16)), (x, t.float())]:
        assert _fast_focal(xs, ts) is None, (tuple(xs.shape), ts.dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _fast_focal(x, t) is None
    # a reduced loss large enough for an upstream guess takes the Function, without grad
    # the lane serves it
    n = MIN_ELEMENTS // 13 + 1
    xl = random_logits((n, 13), torch.float32, "cpu")
    tl = random_targets((n,), 13, "cpu")
    assert _fast_focal(xl, tl) is None
    assert _fast_focal(xl, tl, reduction="none") is not None
    with torch.no_grad():
        assert _fast_focal(xl, tl) is not None


def test_focal_fast_lane_errors_are_functional_pys():
    x = random_logits((5, 13), torch.float32, "cpu")
    t = random_targets((5,), 13, "cpu")
    with pytest.raises(ValueError, match="gamma must be finite and >= 0"):
        tlf.focal_loss(x, t, gamma=-1.0)
    t[2] = 13
    with pytest.raises(IndexError, match="Target 13 is out of bounds"):
        tlf.focal_loss(x, t)
