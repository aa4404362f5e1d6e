"""Bad input gets a clear Python exception before any kernel runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import torchloss_fused as tlf
from torchloss_fused import _backend

X = torch.randn(4, 5)
Y = torch.tensor([0, 1, 2, 3])

CE_BAD_CALLS = [
    ("unknown reduction", ValueError, "not a valid value for reduction",
     lambda: tlf.cross_entropy(X, Y, reduction="avg")),
    ("label_smoothing > 1", ValueError, "label_smoothing",
     lambda: tlf.cross_entropy(X, Y, label_smoothing=1.5)),
    ("label_smoothing inf", ValueError, "label_smoothing",
     lambda: tlf.cross_entropy(X, Y, label_smoothing=float("inf"))),
    ("weight wrong length", ValueError, "one value per class",
     lambda: tlf.cross_entropy(X, Y, weight=torch.ones(4))),
    ("weight 2-d", ValueError, "one value per class",
     lambda: tlf.cross_entropy(X, Y, weight=torch.ones(5, 1))),
    ("weight wrong dtype", TypeError, "dtype",
     lambda: tlf.cross_entropy(X, Y, weight=torch.ones(5, dtype=torch.float64))),
    ("weight integer", TypeError, "floating-point",
     lambda: tlf.cross_entropy(X, torch.softmax(X, 1), weight=torch.ones(5, dtype=torch.long))),
    ("weight not a tensor", TypeError, "weight must be a torch.Tensor",
     lambda: tlf.cross_entropy(X, Y, weight=[1.0] * 5)),
    ("target batch mismatch", ValueError, "batch_size",
     lambda: tlf.cross_entropy(X, Y[:3])),
    ("target K-dim mismatch", ValueError, "Expected target size",
     lambda: tlf.cross_entropy(torch.randn(2, 5, 3), torch.zeros(2, 4, dtype=torch.long))),
    ("target extra dim", ValueError, "Expected target size",
     lambda: tlf.cross_entropy(X, Y[:, None])),
    ("prob target wrong shape", ValueError, "probability target",
     lambda: tlf.cross_entropy(X, torch.rand(4, 6))),
    ("prob target with ignore_index", ValueError, "ignore_index",
     lambda: tlf.cross_entropy(X, torch.rand(4, 5), ignore_index=1)),
    ("bool target", TypeError, "class-index target",
     lambda: tlf.cross_entropy(X, Y > 1)),
    ("int16 target", TypeError, "class-index target",
     lambda: tlf.cross_entropy(X, Y.short())),
    ("complex target", TypeError, "class-index target",
     lambda: tlf.cross_entropy(X, Y.to(torch.complex64))),
    ("target not a tensor", TypeError, "target must be a torch.Tensor",
     lambda: tlf.cross_entropy(X, [0, 1, 2, 3])),
    ("0-dim input", ValueError, "class dimension",
     lambda: tlf.cross_entropy(torch.tensor(1.0), torch.tensor(0))),
    ("integer input", TypeError, "float32, float64, bfloat16 or float16",
     lambda: tlf.cross_entropy(torch.ones(4, 5, dtype=torch.long), Y)),
    ("negative softcap", ValueError, "softcap",
     lambda: tlf.cross_entropy(X, Y, softcap=-1.0)),
    ("zero softcap", ValueError, "softcap",
     lambda: tlf.cross_entropy(X, Y, softcap=0.0)),
    ("negative z_loss", ValueError, "z_loss",
     lambda: tlf.cross_entropy(X, Y, z_loss=-1e-4)),
    ("inf logit_scale", ValueError, "logit_scale",
     lambda: tlf.cross_entropy(X, Y, logit_scale=float("inf"))),
    ("string z_loss", TypeError, "z_loss",
     lambda: tlf.cross_entropy(X, Y, z_loss="1e-4")),
    ("expanded input, in place", ValueError, "share memory",
     lambda: tlf.cross_entropy(torch.randn(1, 5, requires_grad=True).expand(4, 5), Y,
                               inplace_backward=True)),
    # (its values would become its gradient, and .grad the same memory: the optimizer
    # would then step a parameter made of its own gradient)
    # (as_strided rows that overlap: PyTorch's overlap test says "too hard" for them; they
    # were let through, and rows' gradients were written over logits others still read)
    ("overlapping rows, in place", ValueError, "share memory",
     lambda: tlf.cross_entropy((torch.randn(14, requires_grad=True) * 1).as_strided(
         (4, 5), (1, 1)), Y, inplace_backward=True)),
    ("probability target on the input's memory, in place", ValueError, "target lies in",
     lambda: (lambda h: tlf.cross_entropy(h, h.detach(), inplace_backward=True))(
         torch.randn(4, 5, requires_grad=True) * 1)),
    ("weight on the input's memory, in place", ValueError, "weight lies in",
     lambda: (lambda h: tlf.cross_entropy(h, Y, weight=h.detach()[0], inplace_backward=True))(
         torch.randn(4, 5, requires_grad=True) * 1)),
    ("parameter, in place", ValueError, "leaf tensor that requires grad",
     lambda: tlf.cross_entropy(torch.nn.Parameter(torch.randn(4, 5)), Y,
                               inplace_backward=True)),
    ("view of a parameter, in place", ValueError, "view of a leaf tensor",
     lambda: tlf.cross_entropy(torch.nn.Parameter(torch.randn(20)).view(4, 5), Y,
                               inplace_backward=True)),
    # (a leaf that is itself a view, of a tensor not requiring grad, and its slices: as
    # autograd's check_inplace refuses them; they had been overwritten)
    ("leaf view of a plain tensor, in place", ValueError, "leaf tensor that requires grad",
     lambda: tlf.cross_entropy(torch.randn(20).view(4, 5).requires_grad_(), Y,
                               inplace_backward=True)),
    ("slice of a leaf view, in place", ValueError, "view of a leaf tensor",
     lambda: tlf.cross_entropy(torch.randn(30).view(6, 5).requires_grad_()[1:5], Y,
                               inplace_backward=True)),
    ("leaf column slice of a buffer, in place", ValueError, "leaf tensor that requires grad",
     lambda: tlf.cross_entropy(torch.randn(4, 9)[:, 2:7].requires_grad_(), Y,
                               inplace_backward=True)),
    ("parameter, in place, module", ValueError, "leaf tensor that requires grad",
     lambda: tlf.CrossEntropyLoss(inplace_backward=True)(torch.randn(4, 5, requires_grad=True),
                                                         Y)),
]

BAD_IGNORE_INDEX = [
    ("float", TypeError, "ignore_index must be an int, got float", -100.5),
    ("bool", TypeError, "ignore_index must be an int, got bool", True),
    ("bool tensor", TypeError, "ignore_index must be an int, got bool", torch.tensor(True)),
    ("float tensor", TypeError, "ignore_index must be an int, got Tensor", torch.tensor(3.0)),
    ("string", TypeError, "ignore_index must be an int, got str", "-100"),
    ("beyond int64", ValueError, "ignore_index must fit in int64", 2**63),
    ("below int64", ValueError, "ignore_index must fit in int64", -(2**63) - 1),
]
LOSSES_WITH_IGNORE_INDEX = {
    "cross_entropy": lambda ii: tlf.cross_entropy(X, Y, ignore_index=ii),
    "focal_loss": lambda ii: tlf.focal_loss(X, Y, ignore_index=ii),
    "linear_cross_entropy": lambda ii: tlf.linear_cross_entropy(
        torch.randn(4, 3), torch.randn(5, 3), Y, ignore_index=ii),
}
CE_BAD_CALLS += [
    (f"{loss}: ignore_index {name}", exc, pattern, lambda call=call, value=value: call(value))
    for name, exc, pattern, value in BAD_IGNORE_INDEX
    for loss, call in LOSSES_WITH_IGNORE_INDEX.items()
] + [
    ("label_smoothing requiring grad", TypeError,
     "label_smoothing is a 0-dim tensor being differentiated",
     lambda: tlf.cross_entropy(X, Y, label_smoothing=torch.tensor(0.1, requires_grad=True))),
    ("label_smoothing 1-d tensor", TypeError, "label_smoothing must be a real number",
     lambda: tlf.cross_entropy(X, Y, label_smoothing=torch.tensor([0.1]))),
    ("label_smoothing tensor > 1", ValueError, "label_smoothing",
     lambda: tlf.cross_entropy(X, Y, label_smoothing=torch.tensor(1.5))),
]

FOCAL_BAD_CALLS = [
    ("negative gamma", ValueError, "gamma", lambda: tlf.focal_loss(X, Y, gamma=-1.0)),
    ("alpha wrong length", ValueError, "one value per class",
     lambda: tlf.focal_loss(X, Y, alpha=torch.ones(3))),
    ("alpha string", TypeError, "alpha", lambda: tlf.focal_loss(X, Y, alpha="0.25")),
    ("float target", TypeError, "class-index", lambda: tlf.focal_loss(X, torch.rand(4, 5))),
    ("bad reduction", ValueError, "reduction", lambda: tlf.focal_loss(X, Y, reduction="x")),
    ("target shape", ValueError, "batch_size", lambda: tlf.focal_loss(X, Y[:2])),
    ("sigmoid bad reduction", ValueError, "Invalid Value for arg 'reduction'",
     lambda: tlf.sigmoid_focal_loss(X, torch.rand(4, 5), reduction="avg")),
    ("sigmoid shape", ValueError, "must be the same as input size",
     lambda: tlf.sigmoid_focal_loss(X, torch.rand(4, 6))),
    ("sigmoid integer targets", TypeError, "floating-point",
     lambda: tlf.sigmoid_focal_loss(X, torch.ones(4, 5, dtype=torch.long))),
    ("sigmoid negative gamma", ValueError, "gamma",
     lambda: tlf.sigmoid_focal_loss(X, torch.rand(4, 5), gamma=-2.0)),
]


# Sparse tensors and other layouts than strided: a TypeError naming the argument, where F
# fails deep inside (NotImplementedError); cross_entropy's sparse probability target is the
# one F computes with, and is taken (test_cross_entropy.py).
H3, W53 = torch.randn(4, 3), torch.randn(5, 3)
LAYOUT_BAD_CALLS = [
    (f"{name} {layout}", TypeError, f"{arg} must be a dense \\(strided\\) tensor", call)
    for layout, convert in (("coo", torch.Tensor.to_sparse),
                            ("csr", torch.Tensor.to_sparse_csr))
    for name, arg, call in (
        ("ce input", "input", lambda c=convert: tlf.cross_entropy(c(X), Y)),
        ("ce index target", "target", lambda c=convert: tlf.cross_entropy(X, c(Y[:, None]))),
        ("ce weight", "weight", lambda c=convert: tlf.cross_entropy(X, Y, c(torch.rand(5)))),
        ("focal input", "input", lambda c=convert: tlf.focal_loss(c(X), Y)),
        ("focal target", "target", lambda c=convert: tlf.focal_loss(X, c(Y[:, None]))),
        ("focal alpha", "alpha", lambda c=convert: tlf.focal_loss(X, Y, alpha=c(torch.rand(5)))),
        ("sigmoid inputs", "inputs", lambda c=convert: tlf.sigmoid_focal_loss(c(X), X.sigmoid())),
        ("sigmoid targets", "targets",
         lambda c=convert: tlf.sigmoid_focal_loss(X, c(X.sigmoid()))),
        ("linear hidden", "hidden", lambda c=convert: tlf.linear_cross_entropy(c(H3), W53, Y)),
        ("linear weight", "weight", lambda c=convert: tlf.linear_cross_entropy(H3, c(W53), Y)),
        ("linear prob target", "target",
         lambda c=convert: tlf.linear_cross_entropy(H3, W53, c(X.softmax(1)))),
    )
    # (CSR needs two dimensions: not the 1-D weight and alpha vectors)
    if layout == "coo" or arg not in ("alpha", "weight") or name.startswith("linear")
]


@pytest.mark.parametrize("case", CE_BAD_CALLS + FOCAL_BAD_CALLS + LAYOUT_BAD_CALLS,
                         ids=lambda c: c[0])
def test_bad_input_raises(backend, case):
    _, exc, pattern, call = case
    with pytest.raises(exc, match=pattern):
        call()


@pytest.mark.parametrize("loss", sorted(LOSSES_WITH_IGNORE_INDEX))
def test_ignore_index_takes_what_f_takes(backend, loss):
    """NumPy ints and integer tensors of one element, as F's argument parser converts them."""
    call = LOSSES_WITH_IGNORE_INDEX[loss]
    torch.manual_seed(3)
    expected = call(3)
    for value in (np.int32(3), np.int64(3), torch.tensor(3), torch.tensor([3], dtype=torch.int32)):
        torch.manual_seed(3)
        assert torch.equal(call(value), expected), value
    for value in (np.int64(3), torch.tensor(3), torch.tensor([3])):
        assert torch.equal(F.cross_entropy(X, Y, ignore_index=value),
                           F.cross_entropy(X, Y, ignore_index=3))


def test_scalar_tensor_and_numpy_numbers_are_taken_as_f_takes_them(backend):
    expected = tlf.cross_entropy(X, Y, label_smoothing=0.25, z_loss=0.5)
    for value in (torch.tensor(0.25), torch.tensor(0.25, dtype=torch.float64), np.float32(0.25)):
        assert torch.equal(tlf.cross_entropy(X, Y, label_smoothing=value, z_loss=0.5), expected)
        torch.testing.assert_close(tlf.cross_entropy(X, Y, label_smoothing=value),
                                   F.cross_entropy(X, Y, label_smoothing=value))
    assert torch.equal(tlf.cross_entropy(X, Y, label_smoothing=0.25, z_loss=torch.tensor(0.5)),
                       expected)
    assert torch.equal(tlf.cross_entropy(X, Y, label_smoothing=torch.tensor(1)),
                       tlf.cross_entropy(X, Y, label_smoothing=1.0))
    assert torch.equal(tlf.focal_loss(X, Y, gamma=torch.tensor(2.0)), tlf.focal_loss(X, Y))


def test_meta_device_mismatch_raises_before_kernels():
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="same device"):
        tlf.cross_entropy(x, torch.zeros(4, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="same device"):
        tlf.cross_entropy(x, torch.zeros(4, dtype=torch.long), weight=torch.ones(5, device="meta"))
    with pytest.raises(ValueError, match="same device"):
        tlf.focal_loss(x, torch.zeros(4, dtype=torch.long), alpha=torch.ones(5, device="meta"))
    with pytest.raises(ValueError, match="same device"):
        tlf.sigmoid_focal_loss(x, torch.rand(4, 5, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_cuda_mismatch_raises():
    with pytest.raises(ValueError, match="same device"):
        tlf.cross_entropy(torch.randn(4, 5, device="cuda"), Y)


def test_direct_op_calls_are_checked_too():
    """The C++ ops check shapes themselves, so a direct call cannot read out of bounds."""
    ops = torch.ops.torchloss_fused
    x3 = torch.randn(4, 5, 1)
    with pytest.raises(RuntimeError, match="target must be"):
        ops.ce_fwd(x3, torch.zeros(3, 1, dtype=torch.long), None, -100, 0.0, 0.0, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="weight must have one value per class"):
        ops.ce_fwd(x3, torch.zeros(4, 1, dtype=torch.long), torch.ones(4), -100, 0.0, 0.0, 0.0,
                   1.0)
    with pytest.raises(RuntimeError, match="input must be a"):
        ops.ce_fwd(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), None, -100, 0.0, 0.0,
                   0.0, 1.0)
    with pytest.raises(RuntimeError, match="lse must be"):
        ops._ce_bwd(torch.ones(4, 1), None, x3, torch.zeros(4, 1, dtype=torch.long), None,
                    torch.zeros(4, 2), -100, 0.0, 0.0, 0.0, 1.0)
    with pytest.raises(IndexError, match="Target 7 is out of bounds"):
        ops.ce_fwd(x3, torch.full((4, 1), 7), None, -100, 0.0, 0.0, 0.0, 1.0)


_CE = (-100, 0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("namespace", ["torchloss_fused", "torchloss_fused_ref"])
def test_direct_op_calls_refuse_a_meta_argument_beside_real_ones(namespace):
    # The dispatcher sends such a call to the fake (Meta) kernel, not the CPU one: without
    # its own device check it returned uninitialised memory (out of place) or did nothing
    # (in place), with no error.
    if namespace == "torchloss_fused" and not _backend.EXTENSION_LOADED:
        pytest.skip("compiled extension not loaded")
    ops = getattr(torch.ops, namespace)
    x3 = torch.randn(2, 5, 3)
    t = torch.randint(0, 5, (2, 3))
    lse = torch.logsumexp(x3.double(), 1)
    calls = {
        "ce_fwd": lambda: ops.ce_fwd(x3, t.to("meta"), None, *_CE),
        "_ce_bwd_inplace": lambda: ops._ce_bwd_inplace(torch.ones(2, 3), None, x3.clone(), t,
                                                       None, lse.to("meta"), *_CE),
        "_accumulate_": lambda: ops._accumulate_(torch.zeros(4), torch.ones(4, device="meta")),
        "sigmoid_focal_fwd": lambda: ops.sigmoid_focal_fwd(
            torch.randn(4, 6), torch.rand(4, 6, device="meta"), 0.25, 2.0),
        "linear_ce_fwd": lambda: torch.ops.torchloss_fused_py.linear_ce_fwd(
            torch.randn(3, 4), torch.randn(5, 4), None, torch.zeros(3, dtype=torch.long,
                                                                      device="meta"),
            None, -100, 0.0, 0.0, 0.0, 0, None),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match="expected all tensors on one device"):
            call()
        assert name  # (the failing call's name shows in pytest's report)


@pytest.mark.skipif(not _backend.EXTENSION_LOADED, reason="compiled extension not loaded")
def test_inplace_backward_op_checks_before_writing():
    ops = torch.ops.torchloss_fused
    x3 = torch.randn(4, 5, 1)
    lse = torch.logsumexp(x3.double(), 1)
    g = torch.ones(4, 1)
    # An out-of-range class index: refused before any row is overwritten (the kernel's own
    # check raised mid-pass, rows before it already gradients).
    x = x3.clone()
    with pytest.raises(IndexError, match="Target 9 is out of bounds"):
        ops._ce_bwd_inplace(g, None, x, torch.tensor([[0], [1], [2], [9]]), None, lse, *_CE)
    assert torch.equal(x, x3)
    # Arguments it reads that share the input's memory: later rows would read values the
    # earlier rows' gradients overwrote.
    x = x3.clone()
    with pytest.raises(ValueError, match="weight shares memory with the input"):
        ops._ce_bwd_inplace(g, None, x, torch.zeros(4, 1, dtype=torch.long), x[1, :, 0],
                            lse, *_CE)
    with pytest.raises(ValueError, match="target shares memory with the input"):
        ops._ce_bwd_inplace(g, None, x, x[:1].expand(4, 5, 1), None, lse, *_CE)
    assert torch.equal(x, x3)
    # An input whose rows overlap (as_strided: "too hard" for PyTorch's own test).
    flat = torch.randn(9)
    before = flat.clone()
    with pytest.raises(RuntimeError, match="elements overlap"):
        ops._ce_bwd_inplace(g, None, flat.as_strided((4, 5, 1), (1, 1, 1)),
                            torch.zeros(4, 1, dtype=torch.long), None, lse, *_CE)
    assert torch.equal(flat, before)


@pytest.mark.parametrize("layout", ["row-strided", "column-major", "odd-offset"])
def test_inplace_backward_on_apart_strided_rows(backend, layout):
    """Views PyTorch's overlap test cannot decide but whose elements are apart: taken,
    with F's gradient, and the bytes between the rows left alone."""
    base = torch.randn(7, 13, dtype=torch.float64)
    views = {"row-strided": lambda b: b[:, 1:11], "column-major": lambda b: b.t()[:10, :6],
             "odd-offset": lambda b: b.view(-1)[3:73].view(7, 10)}
    rows, classes = views[layout](base).shape
    t = torch.randint(0, classes, (rows,))
    leaf = base.clone().requires_grad_()
    h = leaf * 1
    loss = tlf.cross_entropy(views[layout](h), t, inplace_backward=True)
    loss.backward()
    ref = base.clone().requires_grad_()
    torch.nn.functional.cross_entropy(views[layout](ref), t).backward()
    torch.testing.assert_close(leaf.grad, ref.grad)


def test_caller_tensors_are_not_modified(backend):
    x = torch.randn(6, 9, requires_grad=True)
    y = torch.randint(0, 9, (6,))
    w = torch.rand(9)
    copies = [t.detach().clone() for t in (x, y, w)]
    loss = tlf.cross_entropy(x, y, weight=w, label_smoothing=0.1, z_loss=1e-3, softcap=3.0)
    loss.backward()
    tlf.focal_loss(x, y).backward()
    for t, c in zip((x, y, w), copies):
        assert torch.equal(t.detach(), c)
