"""Calls F.cross_entropy takes that look wrong but run: a drop-in (and patch_torch) must
run them too, with F's result. Each case here was refused before (a ValueError)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import torchloss_fused as tlf

from .helpers import random_logits, random_targets

NO_SMOOTHING = [-0.1, -5.0, float("-inf"), float("nan"), np.float64(-1.0), torch.tensor(-0.25)]


def _loss_and_grad(loss_fn, x, *args, **kwargs):
    loss = loss_fn(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss, grad


def _same_bits(a, b) -> bool:
    return a.shape == b.shape and torch.equal(a.nan_to_num(), b.nan_to_num()) and \
        torch.equal(a.isnan(), b.isnan())


def _targets(prob: bool, x, C):
    if prob:
        return torch.softmax(torch.randn(x.shape, dtype=torch.float64), 1).to(x.dtype)
    return random_targets((x.shape[0],), C, x.device, ignore_frac=0.25)


@pytest.mark.parametrize("value", NO_SMOOTHING, ids=str)
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_smoothing_not_above_zero_smooths_nothing_as_in_f(backend, value, prob, reduction):
    """F smooths only for a value above 0: a negative one (or -inf, or nan) is the same as 0.
    Ours gives exactly the result of 0 (F's in float64), and warns, since whoever passed it
    expected some effect."""
    x = random_logits((6, 7), torch.float64, "cpu")
    t = _targets(prob, x, 7)
    w = torch.rand(7, dtype=torch.float64) + 0.1
    with pytest.warns(UserWarning, match="applies no smoothing") as record:
        loss, grad = _loss_and_grad(tlf.cross_entropy, x, t, weight=w, reduction=reduction,
                                    label_smoothing=value)
    assert record[0].filename == __file__  # (attributed to the call, not to the package)
    loss0, grad0 = _loss_and_grad(tlf.cross_entropy, x, t, weight=w, reduction=reduction)
    assert _same_bits(loss, loss0) and _same_bits(grad, grad0)
    f_loss, f_grad = _loss_and_grad(F.cross_entropy, x, t, weight=w, reduction=reduction,
                                    label_smoothing=value)
    torch.testing.assert_close(loss, f_loss)
    torch.testing.assert_close(grad, f_grad)


def test_label_smoothing_zero_and_bools_do_not_warn(backend):
    x = random_logits((5, 4), torch.float32, "cpu", requires_grad=False)
    t = random_targets((5,), 4, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for value in (0.0, -0.0, 0, False):
            assert torch.equal(tlf.cross_entropy(x, t, label_smoothing=value),
                               tlf.cross_entropy(x, t))
        # F's parser takes a bool as a number: True is 1.0.
        assert torch.equal(tlf.cross_entropy(x, t, label_smoothing=True),
                           tlf.cross_entropy(x, t, label_smoothing=1.0))
        torch.testing.assert_close(tlf.cross_entropy(x, t, label_smoothing=True),
                                   F.cross_entropy(x, t, label_smoothing=True))


def test_label_smoothing_takes_numpy_and_tensor_bools_as_f(backend):
    """F's parser reads any bool as 0 or 1: NumPy's and a 0-dim bool tensor too."""
    x = random_logits((5, 4), torch.float32, "cpu", requires_grad=False)
    t = random_targets((5,), 4, "cpu")
    for value in (np.bool_(True), np.bool_(False), torch.tensor(True), torch.tensor(False)):
        torch.testing.assert_close(tlf.cross_entropy(x, t, label_smoothing=value),
                                   F.cross_entropy(x, t, label_smoothing=value))
    for array in (np.array(True), np.array([True]), np.array([True, False])):  # (F: no)
        with pytest.raises(TypeError):
            F.cross_entropy(x, t, label_smoothing=array)
        with pytest.raises(TypeError, match="label_smoothing must be a real number"):
            tlf.cross_entropy(x, t, label_smoothing=array)


@pytest.mark.parametrize("value", [1.5, float("inf"), torch.tensor(1.01)], ids=str)
def test_label_smoothing_above_one_is_refused_as_by_f(value):
    x, t = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match="label_smoothing"):
        F.cross_entropy(x, t, label_smoothing=value)
    with pytest.raises(ValueError, match="label_smoothing must be between 0.0 and 1.0"):
        tlf.cross_entropy(x, t, label_smoothing=value)
    with pytest.raises(ValueError, match="label_smoothing must be between 0.0 and 1.0"):
        tlf.linear_cross_entropy(torch.randn(3, 2), torch.randn(4, 2), t, label_smoothing=value)


def test_module_and_linear_ce_take_negative_smoothing(backend):
    h = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    head = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    t = random_targets((6,), 5, "cpu", ignore_frac=0.25)
    with pytest.warns(UserWarning, match="applies no smoothing"):
        loss = tlf.linear_cross_entropy(h, head, t, label_smoothing=-0.3)
    assert torch.equal(loss, tlf.linear_cross_entropy(h, head, t))
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(h, head), t, label_smoothing=-0.3))
    x = random_logits((6, 5), torch.float32, "cpu")
    with pytest.warns(UserWarning, match="applies no smoothing") as record:
        loss = tlf.CrossEntropyLoss(label_smoothing=-0.3)(x, t)
    # (attributed to this line, not to nn.Module's call: torch's frames are skipped too)
    assert record[0].filename == __file__
    assert torch.equal(loss, tlf.CrossEntropyLoss()(x, t))
    torch.testing.assert_close(loss, torch.nn.CrossEntropyLoss(label_smoothing=-0.3)(x, t))
    with tlf.patch_torch(), pytest.warns(UserWarning, match="no smoothing") as record:
        patched = torch.nn.CrossEntropyLoss(label_smoothing=-0.3)(x, t)
    assert record[0].filename == __file__ and torch.equal(patched, loss)


def test_negative_smoothing_compiles_with_fullgraph():
    x = random_logits((6, 5), torch.float32, "cpu")
    t = random_targets((6,), 5, "cpu")
    compiled = torch.compile(lambda a, b: tlf.cross_entropy(a, b, label_smoothing=-0.1),
                             fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, t), tlf.cross_entropy(x, t), rtol=0, atol=0)


def test_elementwise_mean_is_mean_with_fs_warning(backend):
    """F still takes the pre-1.0 reduction name, as "mean", with a deprecation warning."""
    x = random_logits((6, 5), torch.float64, "cpu")
    t = random_targets((6,), 5, "cpu", ignore_frac=0.25)
    with pytest.warns(UserWarning, match="elementwise_mean' is deprecated") as record:
        loss, grad = _loss_and_grad(tlf.cross_entropy, x, t, reduction="elementwise_mean")
    assert record[0].filename == __file__
    assert all(torch.equal(a, b) for a, b in zip(
        (loss, grad), _loss_and_grad(tlf.cross_entropy, x, t)))
    with pytest.warns(UserWarning, match="deprecated"):
        f_loss = F.cross_entropy(x, t, reduction="elementwise_mean")
    torch.testing.assert_close(loss, f_loss)
    with pytest.warns(UserWarning, match="deprecated"):
        module_loss = tlf.CrossEntropyLoss(reduction="elementwise_mean")(x, t)
    assert torch.equal(module_loss, loss)
    h, head = torch.randn(6, 3), torch.randn(5, 3)
    with pytest.warns(UserWarning, match="deprecated"):
        linear = tlf.linear_cross_entropy(h, head, t, reduction="elementwise_mean")
    assert torch.equal(linear, tlf.linear_cross_entropy(h, head, t))
    # focal_loss is not F's: its reductions stay the three.
    with pytest.raises(ValueError, match="not a valid value for reduction"):
        tlf.focal_loss(x, t, reduction="elementwise_mean")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target_value", [2, -100])
def test_unbatched_input_takes_a_one_element_target(backend, reduction, target_value):
    """F takes a (C,) input with a (1,) target as with the 0-dim one, in its forward (its
    backward and label smoothing fail there; torch 2.4.1's forward refuses it); ours
    gives the 0-dim target's results bitwise, the gradient and every option included,
    and the 0-dim loss F gives."""
    x = random_logits((5,), torch.float64, "cpu")
    t1 = torch.tensor([target_value])
    options = ({}, {"weight": torch.rand(5, dtype=torch.float64)}, {"label_smoothing": 0.2})
    for kwargs in options:
        loss, grad = _loss_and_grad(tlf.cross_entropy, x, t1, reduction=reduction, **kwargs)
        loss0, grad0 = _loss_and_grad(tlf.cross_entropy, x, t1[0], reduction=reduction,
                                      **kwargs)
        assert loss.shape == () and _same_bits(loss, loss0) and _same_bits(grad, grad0)
        torch.testing.assert_close(loss, F.cross_entropy(x, t1[0], reduction=reduction,
                                                         **kwargs), equal_nan=True)
        if "label_smoothing" not in kwargs:
            try:  # (torch 2.4.1's F refuses it: "size mismatch"; 2.13's takes it)
                f_loss = F.cross_entropy(x, t1, reduction=reduction, **kwargs)
            except RuntimeError:
                continue
            torch.testing.assert_close(loss, f_loss, equal_nan=True)
    focal, focal_grad = _loss_and_grad(tlf.focal_loss, x, t1, reduction=reduction)
    focal0, focal_grad0 = _loss_and_grad(tlf.focal_loss, x, t1[0], reduction=reduction)
    assert _same_bits(focal, focal0) and _same_bits(focal_grad, focal_grad0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target_value", [2, -100])
def test_linear_ce_of_a_1d_hidden_takes_a_one_element_target(backend, reduction, target_value):
    """As cross_entropy of the (V,) logits F.linear makes of it."""
    h = torch.randn(4, dtype=torch.float64, requires_grad=True)
    head = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t1 = torch.tensor([target_value])
    for kwargs in ({}, {"label_smoothing": 0.1},
                   {"class_weight": torch.rand(5, dtype=torch.float64)}):
        loss = tlf.linear_cross_entropy(h, head, t1, reduction=reduction, **kwargs)
        grads = torch.autograd.grad(loss, (h, head))
        loss0 = tlf.linear_cross_entropy(h, head, t1[0], reduction=reduction, **kwargs)
        grads0 = torch.autograd.grad(loss0, (h, head))
        assert loss.shape == () and _same_bits(loss, loss0)
        assert all(_same_bits(a, b) for a, b in zip(grads, grads0))
    with pytest.raises(ValueError, match="target must have hidden's shape"):
        tlf.linear_cross_entropy(h, head, torch.tensor([1, 2]))


def test_unbatched_input_refuses_a_longer_target():
    # A (1,) input with a (1,) target: F reads it as probabilities, which need floats.
    with pytest.raises(RuntimeError, match="floating point type"):
        F.cross_entropy(torch.randn(1), torch.tensor([0]))
    with pytest.raises(ValueError, match="Expected target size"):
        tlf.cross_entropy(torch.randn(1), torch.tensor([0]))
    with pytest.raises(ValueError, match="target must have hidden's shape"):
        tlf.linear_cross_entropy(torch.randn(3), torch.randn(1, 3), torch.tensor([0]))
    x = torch.randn(5)
    with pytest.raises(ValueError, match="Expected target size"):
        tlf.cross_entropy(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="Expected target size"):
        tlf.cross_entropy(x, torch.tensor([[1]]))
