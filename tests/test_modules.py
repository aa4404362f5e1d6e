"""nn.Module wrappers: constructor arguments, buffers, and the functional results."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import torchloss_fused as tlf


def test_cross_entropy_loss_module_mirrors_torch():
    w = torch.rand(7) + 0.1
    ours = tlf.CrossEntropyLoss(weight=w, ignore_index=2, reduction="sum", label_smoothing=0.1)
    ref = torch.nn.CrossEntropyLoss(weight=w, ignore_index=2, reduction="sum",
                                    label_smoothing=0.1)
    x, y = torch.randn(9, 7), torch.randint(0, 7, (9,))
    torch.testing.assert_close(ours(x, y), ref(x, y))
    assert "weight" in dict(ours.named_buffers())
    assert ours.to(torch.float64).weight.dtype == torch.float64
    assert "label_smoothing=0.1" in repr(ours)


def test_cross_entropy_loss_module_is_torchs_kind():
    # Code that checks isinstance(criterion, nn.CrossEntropyLoss) (or _WeightedLoss) takes
    # ours, and state dicts go both ways.
    ours = tlf.CrossEntropyLoss(weight=torch.rand(5), z_loss=1e-3)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert isinstance(ours, torch.nn.modules.loss._WeightedLoss)
    ref = torch.nn.CrossEntropyLoss(weight=torch.rand(5))
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    assert torch.equal(ours.weight, ref.weight)
    ref.load_state_dict(tlf.CrossEntropyLoss(weight=torch.ones(5)).state_dict())
    assert torch.equal(ref.weight, torch.ones(5))
    x, y = torch.randn(3, 5), torch.randint(0, 5, (3,))
    assert torch.equal(ours(x, y), tlf.cross_entropy(x, y, weight=ours.weight, z_loss=1e-3))


def test_cross_entropy_loss_module_extras():
    m = tlf.CrossEntropyLoss(z_loss=1e-3, softcap=5.0, logit_scale=0.5, return_lse=True)
    x, y = torch.randn(4, 6), torch.randint(0, 6, (4,))
    loss, lse = m(x, y)
    l2, lse2 = tlf.cross_entropy(x, y, z_loss=1e-3, softcap=5.0, logit_scale=0.5,
                                 return_lse=True)
    assert torch.equal(loss, l2) and torch.equal(lse, lse2)


def test_focal_modules():
    x, y = torch.randn(5, 4), torch.randint(0, 4, (5,))
    alpha = torch.rand(4)
    m = tlf.FocalLoss(gamma=1.5, alpha=alpha, reduction="none")
    assert "alpha" in dict(m.named_buffers())
    assert torch.equal(m(x, y), tlf.focal_loss(x, y, gamma=1.5, alpha=alpha, reduction="none"))
    assert torch.equal(tlf.FocalLoss(alpha=0.3)(x, y), tlf.focal_loss(x, y, alpha=0.3))
    t = torch.rand(5, 4)
    s = tlf.SigmoidFocalLoss(alpha=-1, gamma=0.5, reduction="mean")
    assert torch.equal(s(x, t), tlf.sigmoid_focal_loss(x, t, -1, 0.5, "mean"))


def test_legacy_reduction_arguments():
    m = tlf.CrossEntropyLoss(size_average=False)
    assert m.reduction == "sum"


MODULES = {
    "CrossEntropyLoss": lambda: tlf.CrossEntropyLoss(weight=torch.rand(5) + 0.5,
                                                     label_smoothing=0.1, z_loss=1e-3),
    "FocalLoss": lambda: tlf.FocalLoss(gamma=1.5, alpha=torch.rand(5)),
    "SigmoidFocalLoss": lambda: tlf.SigmoidFocalLoss(alpha=0.3, reduction="mean"),
    "LinearCrossEntropyLoss": lambda: tlf.LinearCrossEntropyLoss(
        class_weight=torch.rand(5) + 0.5, chunk_size=2),
}


def _call(name, module):
    torch.manual_seed(1)
    x, y = torch.randn(4, 5), torch.randint(0, 5, (4,))
    if name == "SigmoidFocalLoss":
        return module(x, torch.rand(4, 5))
    if name == "LinearCrossEntropyLoss":
        return module(torch.randn(4, 3), torch.randn(5, 3), y)
    return module(x, y)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_copy_save_and_load(name, tmp_path):
    # deepcopy (model averaging, EMA copies), torch.save of the whole module and of its
    # state_dict: the copies compute what the original does.
    module = MODULES[name]()
    expected = _call(name, module)
    torch.save(module, tmp_path / "m.pt")
    fresh = MODULES[name]()
    fresh.load_state_dict(module.state_dict())
    for copy_ in (copy.deepcopy(module), torch.load(tmp_path / "m.pt", weights_only=False),
                  fresh):
        assert type(copy_) is type(module)
        assert torch.equal(_call(name, copy_), expected)


@pytest.mark.parametrize("name", sorted(MODULES))
@pytest.mark.parametrize("listed", [False, True], ids=["unlisted", "jit-ignored"])
def test_torchscript_warns_and_keeps_held_losses(name, listed):
    # A scripted module calling the loss cannot compile (a warning says why first); one
    # that only holds it scripts as with torch.nn's, listed in __jit_ignored_attributes__
    # or not (unlisted, scripting had failed on the loss's Python).
    class Calls(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.loss = MODULES[name]()

        def forward(self, x, y):
            return self.loss(x, y)

    class Holds(torch.nn.Module):
        __jit_ignored_attributes__ = ["loss"] if listed else []

        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3, 5)
            self.loss = MODULES[name]()

        def forward(self, x):
            return self.head(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (2.13: torch.jit.script's)
        with pytest.warns(UserWarning, match=f"torchloss_fused.{name} cannot be compiled by "
                          "TorchScript"), pytest.raises(
                              (RuntimeError, ValueError, torch.jit.frontend.FrontendError)):
            torch.jit.script(Calls())
        model = Holds()
        with pytest.warns(UserWarning, match="cannot be compiled by TorchScript"):
            scripted = torch.jit.script(model)
    x = torch.randn(2, 3)
    assert torch.equal(scripted(x), model(x))
    assert type(model.loss) is type(MODULES[name]())  # (the model's own loss untouched)


def test_repr_shows_every_setting_that_changes_the_result():
    # Default-constructed, a module prints as torch.nn's does ("CrossEntropyLoss()"); any
    # setting away from its default is shown, a tensor by its shape (FocalLoss(alpha=0.25)
    # and return_lse=True printed as the defaults).
    assert repr(tlf.CrossEntropyLoss()) == repr(torch.nn.CrossEntropyLoss())
    assert repr(tlf.FocalLoss()) == "FocalLoss()"
    assert repr(tlf.SigmoidFocalLoss()) == "SigmoidFocalLoss()"
    assert repr(tlf.LinearCrossEntropyLoss()) == "LinearCrossEntropyLoss()"
    variants = [
        tlf.CrossEntropyLoss(), tlf.CrossEntropyLoss(return_lse=True),
        tlf.CrossEntropyLoss(inplace_backward=True), tlf.CrossEntropyLoss(weight=torch.ones(5)),
        tlf.CrossEntropyLoss(ignore_index=0), tlf.CrossEntropyLoss(reduction="sum"),
        tlf.CrossEntropyLoss(label_smoothing=0.1), tlf.CrossEntropyLoss(z_loss=1e-3),
        tlf.CrossEntropyLoss(softcap=30.0), tlf.CrossEntropyLoss(logit_scale=0.5),
        tlf.FocalLoss(), tlf.FocalLoss(alpha=0.25), tlf.FocalLoss(alpha=torch.rand(5)),
        tlf.FocalLoss(gamma=1.0), tlf.FocalLoss(ignore_index=0), tlf.FocalLoss(reduction="sum"),
        tlf.SigmoidFocalLoss(), tlf.SigmoidFocalLoss(alpha=-1), tlf.SigmoidFocalLoss(gamma=1.0),
        tlf.SigmoidFocalLoss(reduction="mean"),
        tlf.LinearCrossEntropyLoss(), tlf.LinearCrossEntropyLoss(z_loss=1e-3),
        tlf.LinearCrossEntropyLoss(accum_dtype=torch.float32),
        tlf.LinearCrossEntropyLoss(class_weight=torch.ones(5)),
    ]
    reprs = [repr(m) for m in variants]
    assert len(set(reprs)) == len(reprs), reprs
    assert "return_lse=True" in reprs[1] and "inplace_backward=True" in reprs[2]
    assert "alpha=0.25" in reprs[11] and "reduction='sum'" in reprs[5]


def test_focal_alpha_assigned_later_is_a_buffer():
    """A tensor alpha is a buffer whether given to the constructor or assigned after (it
    had been a plain attribute: a reloaded module lost it, .to() left it); a number
    assigned over it is a plain attribute again."""
    x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    module = tlf.FocalLoss()
    module.alpha = torch.tensor([0.1, 0.5, 2.0])
    assert list(module.state_dict()) == ["alpha"]
    loaded = tlf.FocalLoss(alpha=torch.zeros(3))
    loaded.load_state_dict(module.state_dict(), strict=True)
    assert torch.equal(loaded(x, y), module(x, y))
    assert module.double().alpha.dtype == torch.float64
    module.alpha = 0.25
    assert module.alpha == 0.25 and list(module.state_dict()) == []
    torch.testing.assert_close(module(x, y), tlf.FocalLoss(alpha=0.25)(x, y))


def test_repr_of_an_array_setting():
    """A NumPy alpha (refused at the call, as a non-tensor sequence) still prints: its
    comparison with the default is elementwise, and print(model) had raised."""
    np = pytest.importorskip("numpy")
    assert "alpha=array(" in repr(tlf.FocalLoss(alpha=np.array([0.2, 0.3, 0.5])))
    assert "alpha=array(" in repr(tlf.SigmoidFocalLoss(alpha=np.array([0.9])))


def test_legacy_reduction_warning_points_at_the_caller():
    """size_average/reduce's deprecation warning names the caller's line, as the module's
    does (it had named the DTensor wrapper inside the package)."""
    x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    with pytest.warns(UserWarning, match="size_average and reduce") as caught:
        tlf.cross_entropy(x, y, size_average=False)
        tlf.CrossEntropyLoss(reduce=False)
    assert [w.filename for w in caught] == [__file__] * 2


def test_focal_alpha_parameter_is_learned_with_the_model():
    """An nn.Parameter alpha is a parameter of FocalLoss (torch's losses make a weight
    Parameter a buffer, which model.parameters() leaves out: it had been one here too),
    stays a leaf through .double(), and gets its gradient."""
    module = tlf.FocalLoss(alpha=torch.nn.Parameter(torch.tensor(0.25)))
    assert [name for name, _ in module.named_parameters()] == ["alpha"]
    assert list(module.state_dict()) == ["alpha"]
    module.double()
    assert module.alpha.is_leaf and module.alpha.dtype == torch.float64
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 3, (4,))
    module(x, y).backward()
    assert module.alpha.grad is not None and module.alpha.grad != 0
    module.alpha = torch.tensor([0.1, 0.2, 0.3])  # a plain tensor: a buffer again
    assert not list(module.parameters()) and list(module.state_dict()) == ["alpha"]
