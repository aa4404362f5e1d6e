"""tlf.patch_torch(): torch.nn.functional.cross_entropy, and so nn.CrossEntropyLoss, made
this library's, and put back."""

from __future__ import annotations

import threading

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


@pytest.mark.skipif(not tlf.backend_info("cpu")["implementation"] == "cpp",
                    reason="the graph shows our ops where the kernels serve")
def test_compiled_graph_under_the_patch_holds_our_ops():
    """torch.compile of code calling F.cross_entropy under the patch traces ours (its ops
    in the graph), not PyTorch's: a patch that Dynamo unwrapped to the replaced function
    (stop 40's TorchScript wrapper) had compiled PyTorch's loss."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append({str(node.target) for node in gm.graph.nodes})
        return gm.forward

    x, y = torch.randn(4, 10), torch.randint(0, 10, (4,))
    with tlf.patch_torch():
        torch.compiler.reset()
        torch.compile(lambda a, b: F.cross_entropy(a, b), backend=backend,
                      fullgraph=True)(x, y)
    torch.compiler.reset()
    assert graphs and any("torchloss_fused" in target for target in graphs[0]), graphs


def test_code_compiled_before_the_patch_after_a_reset(calls):
    # (Dynamo does not guard torch.nn.functional's attributes: code compiled before the
    # patch keeps torch's function until torch.compiler.reset(), as README says)
    x, y = torch.randn(5, 9), torch.randint(0, 9, (5,))
    torch.compiler.reset()
    compiled = torch.compile(lambda x, y: torch.nn.CrossEntropyLoss()(x, y),
                             backend="aot_eager")
    compiled(x, y)
    with tlf.patch_torch():
        torch.compiler.reset()
        got = compiled(x, y)
        assert calls
    torch.compiler.reset()
    torch.testing.assert_close(got, ORIGINAL(x, y))


def test_patches_count_and_restore_in_any_order():
    outer = tlf.patch_torch()
    inner = tlf.patch_torch()
    outer.restore()  # (out of order: the inner patch still holds)
    assert F.cross_entropy is functional.cross_entropy and inner.active and not outer.active
    outer.restore()  # (a second restore does nothing)
    assert F.cross_entropy is functional.cross_entropy
    inner.restore()
    assert F.cross_entropy is ORIGINAL


def test_threads_leaving_their_blocks_in_either_order():
    # Thread a enters first and leaves first, while b is still inside its block.
    a_in, a_leave, b_checked = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with tlf.patch_torch():
            a_in.set()
            a_leave.wait(10)

    def b():
        a_in.wait(10)
        with tlf.patch_torch():
            a_leave.set()
            thread_a.join(10)
            seen["inside b, after a left"] = F.cross_entropy is functional.cross_entropy
            b_checked.set()

    thread_a, thread_b = threading.Thread(target=a), threading.Thread(target=b)
    thread_a.start()
    thread_b.start()
    thread_b.join(20)
    assert b_checked.is_set() and seen == {"inside b, after a left": True}
    assert F.cross_entropy is ORIGINAL


def test_restore_refuses_to_undo_a_later_replacement():
    patch = tlf.patch_torch()

    def someone_elses(*args, **kwargs):
        return ORIGINAL(*args, **kwargs)

    try:
        torch.nn.functional.cross_entropy = someone_elses
        with pytest.raises(RuntimeError, match="replaced by something else"):
            patch.restore()
        assert F.cross_entropy is someone_elses and patch.active
        torch.nn.functional.cross_entropy = functional.cross_entropy
        patch.restore()
        assert F.cross_entropy is ORIGINAL
    finally:
        torch.nn.functional.cross_entropy = ORIGINAL


def test_a_copied_or_pickled_patch_is_not_another_live_one():
    """copy, deepcopy or pickle of an object holding a patch (a trainer's state): the copy
    is the same patch (restored once), and unpickled it is a restored one; a copy had
    restored a second time, leaving the counter at -1 and the next patch a no-op."""
    import copy
    import pickle

    original = torch.nn.functional.cross_entropy
    patch = tlf.patch_torch()
    assert copy.copy(patch) is patch and copy.deepcopy({"p": patch})["p"] is patch
    unpickled = pickle.loads(pickle.dumps(patch))
    assert not unpickled.active
    unpickled.restore()
    assert torch.nn.functional.cross_entropy is functional.cross_entropy
    copy.copy(patch).restore()
    patch.restore()
    assert torch.nn.functional.cross_entropy is original
    with tlf.patch_torch():
        assert torch.nn.functional.cross_entropy is functional.cross_entropy
    assert torch.nn.functional.cross_entropy is original


@pytest.mark.parametrize("raised", [None, KeyError])
def test_a_block_whose_function_was_replaced_inside_ends_its_patch(raised):
    """Someone else's replacement inside a `with` block: the block's patch ends, leaving
    their function; the block's own exception is the one raised (else a RuntimeError
    says what happened); a later patch applies. The patch had stayed live with no handle
    to restore it, every later one a no-op, and the block's exception was replaced."""
    def someone_elses(*args, **kwargs):
        return ORIGINAL(*args, **kwargs)

    try:
        with pytest.raises(raised or RuntimeError, match="user error" if raised else
                           "replaced by something else inside"):
            with pytest.warns(RuntimeWarning, match="left as it is") if raised else \
                    _no_warning():
                with tlf.patch_torch() as patch:
                    torch.nn.functional.cross_entropy = someone_elses
                    if raised:
                        raise raised("user error")
        assert not patch.active and F.cross_entropy is someone_elses
        torch.nn.functional.cross_entropy = ORIGINAL  # (they undo theirs)
        with tlf.patch_torch():
            assert F.cross_entropy is functional.cross_entropy
        assert F.cross_entropy is ORIGINAL
    finally:
        torch.nn.functional.cross_entropy = ORIGINAL


def _no_warning():
    import contextlib

    return contextlib.nullcontext()


def test_a_function_taken_while_patched_pickles():
    """A model that stored F.cross_entropy while patched (self.loss_fn = F.cross_entropy)
    saves and loads: the patch's function pickles by reference (as tlf.cross_entropy)."""
    import pickle

    with tlf.patch_torch():
        fn = F.cross_entropy
    assert pickle.loads(pickle.dumps(fn)) is fn
    x, y = torch.randn(3, 4), torch.randint(0, 4, (3,))
    torch.testing.assert_close(fn(x, y), ORIGINAL(x, y))
