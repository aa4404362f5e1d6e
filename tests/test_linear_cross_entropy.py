"""linear_cross_entropy against the materialised path (F.linear + F.cross_entropy, plus
z_loss/softcap written out) in float64: values and the gradients of hidden, weight and
bias over dtypes, reductions, options, shapes and chunk sizes; memory (no N x V tensor),
torch.compile, the ops, validation (DESIGN.md §6)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchloss_fused as tlf

# The module (the package's attribute of that name is the function).
from torchloss_fused.linear_ce import chunking
from torchloss_fused.linear_ce import ops as lce_ops

from .helpers import (
    assert_like_f_under_autocast,
    assert_matches,
    chunked_logits_tol,
    oracle_cross_entropy,
)

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
REDUCTIONS = ["mean", "sum", "none"]


def make(N, H, V, dtype, device, bias=False, ignore_frac=0.2, ignore_index=-100, lead=None):
    """Inputs scaled like an LM head (logits of std ~2), rounded to `dtype`."""
    shape = (N,) if lead is None else lead
    hidden = torch.randn(*shape, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64) * (2.0 / H ** 0.5)
    b = torch.randn(V, dtype=torch.float64) * 0.5 if bias else None
    target = torch.randint(0, V, shape)
    if ignore_frac:
        target[torch.rand(shape) < ignore_frac] = ignore_index

    def leaf(t):
        return None if t is None else t.to(device=device, dtype=dtype).requires_grad_()

    return leaf(hidden), leaf(weight), target.to(device), leaf(b)


def materialised(hidden, weight, target, bias, dtype, reduction="mean", ignore_index=-100,
                 label_smoothing=0.0, z_loss=0.0, softcap=None, class_weight=None):
    """The oracle (dtype=float64) or eager PyTorch's own answer (the input dtype): the full
    logits, then F.cross_entropy (+ z_loss, softcap) as tests/helpers.py writes them out,
    with class_weight as F.cross_entropy's weight."""
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    b = None if bias is None else bias.detach().to(dtype).requires_grad_()
    logits = F.linear(h, w, b)
    loss, _ = oracle_cross_entropy(logits.reshape(-1, w.shape[0]), target.flatten(),
                                   weight=class_weight, ignore_index=ignore_index,
                                   reduction=reduction, label_smoothing=label_smoothing,
                                   z_loss=z_loss, softcap=softcap, dtype=dtype)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return loss, [t for t in (h, w, b) if t is not None]


def linear_leaves(hidden, weight, bias, dtype):
    """Fresh leaf copies of hidden, weight (and bias) in `dtype`, and their logits, one row
    per token: (rows, V)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (hidden, weight, bias)
              if t is not None]
    b = leaves[2] if bias is not None else None
    return F.linear(leaves[0], leaves[1], b).reshape(-1, weight.shape[0]), leaves


def check(hidden, weight, target, bias=None, reduction="mean", grad_out=None, **kw):
    """Ours vs the float64 oracle (and eager PyTorch in the input dtype for bf16/fp16):
    the loss and every gradient. Returns (loss, grads)."""
    dtype = hidden.dtype
    ours = tlf.linear_cross_entropy(hidden, weight, target, bias, reduction=reduction, **kw)
    assert ours.dtype == dtype and ours.shape == (target.shape if reduction == "none" else ())
    if grad_out is None:
        grad_out = (torch.rand(ours.shape, dtype=torch.float64) + 0.5).to(ours.device)
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    g_ours = torch.autograd.grad(ours, leaves, grad_out.to(dtype))
    opts = {k: v for k, v in kw.items() if k not in ("chunk_size", "accum_dtype")}
    results = {}
    for name, compute in (("oracle", torch.float64), ("eager", dtype)):
        loss, ins = materialised(hidden, weight, target, bias, compute, reduction, **opts)
        grads = torch.autograd.grad(loss, ins, grad_out.to(compute))
        results[name] = (loss.detach(), grads)
    assert_matches(ours.detach(), results["oracle"][0], results["eager"][0], dtype, what="loss")
    for i, (name, g) in enumerate(zip(("grad_hidden", "grad_weight", "grad_bias"), g_ours)):
        assert g.dtype == dtype and g.shape == leaves[i].shape
        assert_matches(g, results["oracle"][1][i], results["eager"][1][i], dtype, what=name)
    return ours.detach(), g_ours


# ---- values and gradients -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_materialised(device, backend, dtype, reduction, bias):
    hidden, weight, target, b = make(37, 24, 67, dtype, device, bias=bias)
    check(hidden, weight, target, b, reduction, chunk_size=8)  # 8 does not divide 37


OPTIONS = [
    {"ignore_index": 3},
    {"label_smoothing": 0.1},
    {"label_smoothing": 1.0},
    {"z_loss": 1e-2},
    {"softcap": 3.0},
    {"softcap": 2.5, "z_loss": 1e-3, "label_smoothing": 0.2, "ignore_index": 0},
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_options(device, dtype, reduction, opts):
    ii = opts.get("ignore_index", -100)
    hidden, weight, target, b = make(29, 16, 41, dtype, device, bias=True, ignore_index=ii)
    if ii >= 0:
        assert (target == ii).any()
    check(hidden, weight, target, b, reduction, chunk_size=6, **opts)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 40, 1000, None])
def test_chunk_sizes_fp64(device, chunk_size):
    """Chunk size 1, sizes that do not divide N, exactly N (one chunk), larger than N, auto."""
    hidden, weight, target, b = make(40, 12, 33, torch.float64, device, bias=True)
    check(hidden, weight, target, b, "mean", chunk_size=chunk_size, z_loss=1e-3,
          label_smoothing=0.05)


def test_chunk_size_does_not_change_the_result_much(device):
    hidden, weight, target, _ = make(50, 32, 100, torch.float32, device)
    results = []
    for chunk in (1, 7, 50):
        loss = tlf.linear_cross_entropy(hidden, weight, target, chunk_size=chunk)
        results.append((loss, *torch.autograd.grad(loss, (hidden, weight))))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_3d_hidden(device, dtype, reduction):
    hidden, weight, target, b = make(0, 20, 53, dtype, device, bias=True, lead=(3, 11))
    check(hidden, weight, target, b, reduction, chunk_size=4)


@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_flattened_target_beside_3d_hidden(device, backend, prob, reduction):
    # F.linear + F.cross_entropy on flattened rows takes `labels.view(-1)` beside (B, T, H)
    # hidden states: so does this, with the same loss and gradients as the shaped target
    # (the unreduced loss and the lse then shaped (N,), as the target).
    hidden, weight, target, b = make(0, 20, 53, torch.float32, device, bias=True,
                                     lead=(3, 11))
    if prob:
        target = torch.softmax(torch.randn(3, 11, 53, device=device), -1)
    flat = target.flatten(0, 1) if prob else target.flatten()
    runs = []
    for t in (target, flat):
        loss, lse = tlf.linear_cross_entropy(hidden, weight, t, b, reduction=reduction,
                                             return_lse=True, chunk_size=4)
        assert loss.shape == ((33,) if t is flat else (3, 11)) or reduction != "none"
        assert lse.shape == ((33,) if t is flat else (3, 11))
        g = torch.autograd.grad(loss.sum(), (hidden, weight, b))
        runs.append((loss.flatten(), lse.flatten(), *g))
    for a, c in zip(*runs):
        assert torch.equal(a, c)
    with pytest.raises(ValueError, match="or be that flattened" if not prob else "flattened"):
        tlf.linear_cross_entropy(hidden, weight, flat[:-1], b)


def test_1d_hidden_is_one_row(device):
    hidden, weight, target, _ = make(0, 8, 13, torch.float64, device, ignore_frac=0, lead=())
    assert hidden.shape == (8,) and target.shape == ()
    check(hidden, weight, target, None, "none")
    check(hidden, weight, target, None, "mean")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_moderate_shape(device, dtype):
    """A vocabulary in the thousands, chunking on, the fp32 accumulator split in two."""
    hidden, weight, target, b = make(300, 64, 5003, dtype, device, bias=True, ignore_frac=0.1)
    check(hidden, weight, target, b, "mean", chunk_size=128)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_all_targets_ignored(device, backend, reduction, weighted):
    """mean: nan (0 / 0, also when the denominator sums class weights), as F gives."""
    hidden, weight, target, b = make(9, 8, 17, torch.float32, device, bias=True,
                                     ignore_frac=1.0)
    assert (target == -100).all()
    cw = class_weights(17, torch.float32, device) if weighted else None
    loss = tlf.linear_cross_entropy(hidden, weight, target, b, reduction=reduction,
                                    chunk_size=4, class_weight=cw)
    ref, _ = materialised(hidden, weight, target, b, torch.float64, reduction, class_weight=cw)
    if reduction == "mean":
        assert torch.isnan(loss) and torch.isnan(ref)
    else:
        assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(ref, torch.zeros_like(ref))
    grads = torch.autograd.grad(loss.sum(), (hidden, weight, b))
    for g, t in zip(grads, (hidden, weight, b)):
        assert g.shape == t.shape and torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_rows(device, reduction):
    hidden, weight, target, b = make(0, 8, 17, torch.float32, device, bias=True)
    loss = tlf.linear_cross_entropy(hidden, weight, target, b, reduction=reduction)
    ref = F.cross_entropy(F.linear(hidden, weight, b), target, reduction=reduction)
    assert loss.shape == ref.shape
    assert torch.equal(torch.isnan(loss), torch.isnan(ref))
    if reduction != "mean":
        assert torch.equal(loss, ref)
    grads = torch.autograd.grad(loss.sum(), (hidden, weight, b), allow_unused=True)
    assert grads[0].shape == (0, 8)
    assert torch.equal(grads[1], torch.zeros_like(weight))
    assert torch.equal(grads[2], torch.zeros_like(b))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("lead", [(5,), (2, 3), ()])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_empty_hidden_dimension(device, backend, reduction, lead, chunk_size):
    """H = 0, which F.linear takes: the logits are the bias (or zeros)."""
    hidden = torch.randn(*lead, 0, dtype=torch.float64, device=device, requires_grad=True)
    weight = torch.randn(7, 0, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, device=device, requires_grad=True)
    target = torch.randint(0, 7, lead, device=device)
    check(hidden, weight, target, b, reduction=reduction, chunk_size=chunk_size,
          z_loss=1e-2)


@pytest.mark.parametrize("dtype,accum", [
    (torch.bfloat16, None), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float64), (torch.float16, None), (torch.float32, torch.float64),
])
def test_accum_dtype(device, dtype, accum):
    """Every grad_weight accumulator: in place (same dtype), twice as wide (shares the
    gradient's storage; V odd so the halves differ), four times as wide (separate)."""
    hidden, weight, target, b = make(64, 16, 301, dtype, device, bias=True)
    if accum == dtype:  # narrow accumulation: a little worse than eager, still close
        loss = tlf.linear_cross_entropy(hidden, weight, target, b, chunk_size=8,
                                        accum_dtype=accum)
        grads = torch.autograd.grad(loss, (hidden, weight, b))
        ref, ins = materialised(hidden, weight, target, b, torch.float64)
        ref_grads = torch.autograd.grad(ref, ins)
        for g, r in zip(grads, ref_grads):
            assert g.dtype == dtype
            torch.testing.assert_close(g.double(), r, rtol=0.03, atol=2e-4)
        return
    check(hidden, weight, target, b, "mean", chunk_size=8, accum_dtype=accum)


def test_fp32_accumulation_beats_narrow_accumulation(device):
    """Many chunks in bf16: float32 accumulation of grad_weight is more accurate."""
    hidden, weight, target, _ = make(512, 16, 64, torch.bfloat16, device, ignore_frac=0)
    ref, ins = materialised(hidden, weight, target, None, torch.float64, "sum")
    ref_gw = torch.autograd.grad(ref, ins)[1]
    errs = {}
    for accum in (None, torch.bfloat16):
        loss = tlf.linear_cross_entropy(hidden, weight, target, reduction="sum",
                                        chunk_size=4, accum_dtype=accum)
        (gw,) = torch.autograd.grad(loss, weight)
        errs[accum] = float((gw.double() - ref_gw).abs().max())
    assert errs[None] < errs[torch.bfloat16] / 2, errs


def test_sum_for_gradient_accumulation(device):
    """reduction='sum' over micro-batches divided by the global count == one 'mean'."""
    hidden, weight, target, b = make(40, 12, 29, torch.float64, device, bias=True)
    count = (target != -100).sum()
    total = 0
    for rows in (slice(0, 13), slice(13, 40)):
        total = total + tlf.linear_cross_entropy(hidden[rows], weight, target[rows], b,
                                                 reduction="sum", chunk_size=5) / count
    grads = torch.autograd.grad(total, (hidden, weight, b))
    mean = tlf.linear_cross_entropy(hidden, weight, target, b, chunk_size=7)
    ref_grads = torch.autograd.grad(mean, (hidden, weight, b))
    torch.testing.assert_close(total, mean)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("weighted", [False, True])
def test_upstream_gradient_and_retain_graph(device, weighted):
    """backward of 3 * loss scales every gradient; a second backward through the same
    graph (retain_graph=True) recomputes and gives the same gradients."""
    hidden, weight, target, b = make(21, 10, 31, torch.float64, device, bias=True)
    cw = class_weights(31, torch.float64, device) if weighted else None
    loss = tlf.linear_cross_entropy(hidden, weight, target, b, chunk_size=4, class_weight=cw)
    ref, ins = materialised(hidden, weight, target, b, torch.float64, class_weight=cw)
    ref_grads = torch.autograd.grad(3 * ref, ins)
    first = torch.autograd.grad(3 * loss, (hidden, weight, b), retain_graph=True)
    second = torch.autograd.grad(3 * loss, (hidden, weight, b))
    for g1, g2, r in zip(first, second, ref_grads):
        torch.testing.assert_close(g1, r)
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_retain_graph_same_bits(device, dtype, reduction):
    """A second backward of a scaled loss recomputes the gradients: it must give the first
    backward's bits (it had divided the upstream by the count itself, rounding apart)."""
    hidden, weight, target, b = make(29, 12, 45, dtype, device, bias=True)
    target[::4] = -100
    loss = tlf.linear_cross_entropy(hidden, weight, target, b, chunk_size=8,
                                    reduction=reduction) * 0.3
    first = torch.autograd.grad(loss, (hidden, weight, b), retain_graph=True)
    second = torch.autograd.grad(loss, (hidden, weight, b))
    for g1, g2 in zip(first, second):
        assert torch.equal(g1, g2)


def test_backward_accumulates_into_grad(device):
    hidden, weight, target, b = make(15, 6, 11, torch.float64, device, bias=True)
    for _ in range(2):
        tlf.linear_cross_entropy(hidden, weight, target, b, chunk_size=4).backward()
    ref, ins = materialised(hidden, weight, target, b, torch.float64)
    ref_grads = torch.autograd.grad(2 * ref, ins)
    for t, r in zip((hidden, weight, b), ref_grads):
        torch.testing.assert_close(t.grad, r)


@pytest.mark.parametrize("which", ["hidden", "weight", "bias"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradient_for_one_input_only(device, which, reduction):
    hidden, weight, target, b = make(17, 8, 23, torch.float64, device, bias=True)
    leaves = {"hidden": hidden, "weight": weight, "bias": b}
    for name, t in leaves.items():
        t.requires_grad_(name == which)
    loss = tlf.linear_cross_entropy(hidden, weight, target, b, reduction=reduction,
                                    chunk_size=5)
    (g,) = torch.autograd.grad(loss.sum(), leaves[which])
    ref, ins = materialised(hidden, weight, target, b, torch.float64, reduction)
    r = torch.autograd.grad(ref.sum(), ins)[["hidden", "weight", "bias"].index(which)]
    torch.testing.assert_close(g, r)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_grad_values(device, reduction):
    hidden, weight, target, b = make(23, 8, 19, torch.float64, device, bias=True)
    with torch.no_grad():
        loss = tlf.linear_cross_entropy(hidden, weight, target, b, reduction=reduction,
                                        chunk_size=6, z_loss=1e-3)
    assert loss.grad_fn is None
    ref, _ = materialised(hidden, weight, target, b, torch.float64, reduction, z_loss=1e-3)
    torch.testing.assert_close(loss, ref.detach())


def test_layouts_and_target_dtypes(device):
    """Non-contiguous hidden and weight (a tied embedding's transpose), int32/uint8 targets."""
    base, weight, target, _ = make(26, 9, 12, torch.float64, device)
    hidden = base.detach()[::2].requires_grad_()
    w_t = weight.detach().t().contiguous().t().requires_grad_()
    assert not hidden.is_contiguous() or not w_t.is_contiguous()
    t = target[::2]
    for tt in (t, t.clamp_min(0).to(torch.int32), t.clamp_min(0).to(torch.uint8)):
        check(hidden, w_t, tt, None, "mean", chunk_size=3)


def _hidden_laid_out(how, B, T, H, make_values):
    """hidden (B*T, H) or (B, T, H), laid out as `how` says."""
    N = B * T
    return {
        "contiguous": lambda: make_values(N, H),
        "transposed": lambda: make_values(H, N).t(),  # column-major: F's gradient is too
        "sliced": lambda: make_values(N, H + 3)[:, :H],
        "3d": lambda: make_values(B, T, H),
        # (B, T) flatten to a view of strides (1, N): column-major, as "transposed"
        "3d-hidden-outermost": lambda: make_values(H, B, T).permute(1, 2, 0),
        # time-major: flattening copies, so F's gradient is contiguous
        "3d-time-major": lambda: make_values(T, B, H).transpose(0, 1),
    }[how]()


def _weight_laid_out(how, V, H, make_values):
    return {
        "contiguous": lambda: make_values(V, H),
        "transposed": lambda: make_values(H, V).t(),  # a tied embedding's, stored (H, V)
        "sliced": lambda: make_values(V, H + 2)[:, :H],
    }[how]()


@pytest.mark.parametrize("hidden_layout", ["contiguous", "transposed", "sliced", "3d",
                                           "3d-hidden-outermost", "3d-time-major"])
@pytest.mark.parametrize("weight_layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradient_strides_as_f_linear(device, backend, hidden_layout, weight_layout,
                                      reduction):
    """The gradients have the strides F.linear's backward gives them (mm_mat1_backward and
    mm_mat2_backward compute a column-major matrix's gradient in the transposed orientation):
    hidden's transposed where its (N, H) rows are column-major, weight's transposed unless
    the weight is contiguous (a transposed or sliced one's), bias's contiguous. They had
    always been contiguous. One chunk in float32; several in bfloat16, with a bias and the
    float32 grad_weight accumulator."""
    B, T, H, V = 3, 4, 8, 11
    for dtype, chunk_size, bias in ((torch.float32, None, False),
                                    (torch.bfloat16, 5, True)):
        def values(*shape, dtype=dtype):
            return torch.randn(*shape, device=device).to(dtype)

        h0 = _hidden_laid_out(hidden_layout, B, T, H, values)
        w0 = _weight_laid_out(weight_layout, V, H, values) * 0.5
        b0 = values(V) if bias else None
        target = torch.randint(0, V, h0.shape[:-1], device=device)
        target[..., 0] = -100
        results = []
        for fn in (tlf.linear_cross_entropy, "F"):
            leaves = [t.detach().requires_grad_() for t in (h0, w0, b0) if t is not None]
            h, w, *b = leaves
            b = b[0] if b else None
            if fn == "F":
                loss = F.cross_entropy(F.linear(h, w, b).flatten(0, -2), target.flatten(),
                                       reduction=reduction)
                loss = loss.view(target.shape) if reduction == "none" else loss
            else:
                loss = fn(h, w, target, b, reduction=reduction, chunk_size=chunk_size)
            up = (torch.rand(loss.shape, device=device) + 0.5).to(loss.dtype) \
                if not results else results[0][2]
            results.append((loss, torch.autograd.grad(loss, leaves, up), up))
        (_, ours, _), (_, ref, _) = results
        # (bfloat16: F's composition rounds the logits and their gradient, ours not; the
        # values are held to the float64 oracle by the tests above)
        tol = {"rtol": 5e-2, "atol": 3e-2} if dtype == torch.bfloat16 else {}
        for name, g, r in zip(("hidden", "weight", "bias"), ours, ref):
            torch.testing.assert_close(g.float(), r.float(), **tol)
            assert g.stride() == r.stride(), (name, dtype, g.stride(), r.stride())
        assert len(ours) == len(ref) == 2 + bias


def test_deterministic(device):
    hidden, weight, target, b = make(64, 16, 97, torch.float32, device, bias=True)
    runs = []
    for _ in range(2):
        loss = tlf.linear_cross_entropy(hidden, weight, target, b, chunk_size=9)
        runs.append((loss, *torch.autograd.grad(loss, (hidden, weight, b))))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


def test_module(device):
    hidden, weight, target, b = make(19, 8, 21, torch.float64, device, bias=True)
    mod = tlf.LinearCrossEntropyLoss(ignore_index=-100, reduction="sum", label_smoothing=0.1,
                                     z_loss=1e-3, softcap=4.0, chunk_size=5)
    assert "chunk_size=5" in repr(mod)
    out = mod(hidden, weight, target, b)
    ref = tlf.linear_cross_entropy(hidden, weight, target, b, reduction="sum",
                                   label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    oracle, _ = materialised(hidden, weight, target, b, torch.float64, "sum",
                             label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out, oracle)


def test_target_out_of_range_cpu():
    hidden, weight, target, _ = make(6, 4, 5, torch.float32, "cpu", ignore_frac=0)
    target[2] = 7
    with pytest.raises(IndexError, match="Target 7 is out of bounds"):
        tlf.linear_cross_entropy(hidden, weight, target)


# ---- class weights ------------------------------------------------------------------------


def class_weights(V, dtype, device):
    """Fresh per-class weights spread over [0.25, 2.75): no two classes count alike, and
    their mean, far from 1, keeps the targets' summed weights well apart from their count
    (`mean`'s denominator without weights)."""
    return (torch.rand(V, dtype=torch.float64) * 2.5 + 0.25).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("bias", [False, True])
def test_class_weight(device, backend, dtype, reduction, label_smoothing, z_loss, bias):
    """F.cross_entropy's weight: each row's loss and gradient weighted by its target's
    class (label smoothing's term by every class's), `mean` divided by the targets' summed
    weights, z_loss's term unweighted (as tlf.cross_entropy's); the ignored class 3 counts
    nowhere though it has a weight. 37 rows in chunks of 8."""
    hidden, weight, target, b = make(37, 16, 41, dtype, device, bias=bias, ignore_index=3)
    assert (target == 3).any()
    check(hidden, weight, target, b, reduction, chunk_size=8, ignore_index=3,
          label_smoothing=label_smoothing, z_loss=z_loss,
          class_weight=class_weights(41, dtype, device))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("chunk_size", [1, 7, 40, 1000, None])
def test_class_weight_chunk_sizes_fp64(device, reduction, chunk_size):
    """Chunk size 1, one that does not divide N, exactly N, more than N, auto; `none` also
    exercises the backward op, which recomputes the logits."""
    hidden, weight, target, b = make(40, 12, 33, torch.float64, device, bias=True)
    check(hidden, weight, target, b, reduction, chunk_size=chunk_size, z_loss=1e-3,
          label_smoothing=0.05, softcap=4.0, class_weight=class_weights(33, torch.float64, device))


def test_class_weight_3d_hidden_and_no_grad(device):
    hidden, weight, target, b = make(0, 10, 29, torch.float32, device, bias=True, lead=(3, 7))
    cw = class_weights(29, torch.float32, device)
    check(hidden, weight, target, b, "mean", chunk_size=4, class_weight=cw)
    with torch.no_grad():
        loss = tlf.linear_cross_entropy(hidden, weight, target, b, class_weight=cw,
                                        chunk_size=5, reduction="sum")
    ref, _ = materialised(hidden, weight, target, b, torch.float64, "sum", class_weight=cw)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1.3e-6, atol=1e-5)


def _weighted_loss_written_out(logits, target, cw, ignore_index, eps, z_loss, reduction):
    """The weighted loss with label smoothing and z_loss spelled out (F.cross_entropy has
    no gradient for its weight)."""
    lse = torch.logsumexp(logits, 1)
    valid = target != ignore_index
    safe = target.masked_fill(~valid, 0)
    w_t = cw[safe]
    nll = lse - logits.gather(1, safe[:, None])[:, 0]
    smooth = ((lse[:, None] - logits) * cw).sum(1)
    rows = (1 - eps) * w_t * nll + eps / logits.shape[1] * smooth + z_loss * lse * lse
    rows = torch.where(valid, rows, 0)
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / torch.where(valid, w_t, 0).sum()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_class_weight_requiring_grad(device, backend, reduction):
    """As tlf.cross_entropy's weight: it gets its gradient too (through the materialised
    logits, the reference code), and hidden's, weight's and bias's stay right."""
    hidden, weight, target, b = make(23, 8, 19, torch.float64, device, bias=True)
    cw = class_weights(19, torch.float64, device).requires_grad_()
    kw = {"label_smoothing": 0.1, "z_loss": 1e-2}
    loss = tlf.linear_cross_entropy(hidden, weight, target, b, reduction=reduction,
                                    chunk_size=5, class_weight=cw, **kw)
    g_out = torch.rand(loss.shape, dtype=torch.float64, device=device) + 0.5
    ours = torch.autograd.grad(loss, (hidden, weight, b, cw), g_out)
    logits = F.linear(hidden, weight, b)
    ref = _weighted_loss_written_out(logits, target, cw, -100, 0.1, 1e-2, reduction)
    oracle, _ = oracle_cross_entropy(logits, target, cw.detach(), reduction=reduction, **kw)
    torch.testing.assert_close(ref, oracle)  # (the formula written out is F's)
    torch.testing.assert_close(loss, ref)
    for g, r in zip(ours, torch.autograd.grad(ref, (hidden, weight, b, cw), g_out)):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_class_weight_is_a_buffer(device, dtype):
    hidden, weight, target, b = make(19, 8, 21, dtype, device, bias=True)
    cw = class_weights(21, torch.float32, device)
    mod = tlf.LinearCrossEntropyLoss(reduction="sum", label_smoothing=0.1, z_loss=1e-3,
                                     chunk_size=5, class_weight=cw)
    assert tlf.LinearCrossEntropyLoss().class_weight is None
    assert "class_weight" in dict(mod.named_buffers()) and "class_weight" in mod.state_dict()
    mod = mod.to(dtype)  # (a buffer follows the module's dtype)
    assert mod.class_weight.dtype == dtype
    out = mod(hidden, weight, target, b)
    ref = tlf.linear_cross_entropy(hidden, weight, target, b, reduction="sum",
                                   label_smoothing=0.1, z_loss=1e-3, class_weight=cw.to(dtype))
    oracle, ins = materialised(hidden, weight, target, b, torch.float64, "sum",
                               label_smoothing=0.1, z_loss=1e-3, class_weight=cw)
    torch.testing.assert_close(out, ref)
    assert_matches(out, oracle, what="loss")
    for g, r in zip(torch.autograd.grad(out, (hidden, weight, b)),
                    torch.autograd.grad(oracle, ins)):
        assert_matches(g, r, what="grad")


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_class_weight_under_autocast(device, backend, weight_dtype):
    """Under autocast F.cross_entropy casts logits and weight to float32: a float32 or
    bfloat16 class_weight goes with the bfloat16 logits, as F's weight would."""
    h = torch.randn(48, 32, device=device, requires_grad=True)
    w = (torch.randn(300, 32, device=device) * 0.3).requires_grad_()
    y = torch.randint(0, 300, (48,), device=device)
    cw = class_weights(300, weight_dtype, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        ours = tlf.linear_cross_entropy(h, w, y, class_weight=cw, label_smoothing=0.1)
        logits = F.linear(h, w)
        theirs = F.cross_entropy(logits, y, weight=cw, label_smoothing=0.1)
    assert ours.dtype == theirs.dtype == torch.float32
    oracle = F.cross_entropy(logits.detach().double(), y, weight=cw.double(), label_smoothing=0.1)
    assert_like_f_under_autocast(ours, theirs, oracle, device, chunked_logits_tol(device))
    for g_ours, g_theirs in zip(torch.autograd.grad(ours, (h, w)),
                                torch.autograd.grad(theirs, (h, w))):
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-2, atol=1e-4)


def test_unbatched_ignored_target_mean_is_fs_on_each_device(device, backend):
    """F.linear of a 1-D hidden gives unbatched logits; F's mean of those with the target
    ignored is nan on CPU and 0 on CUDA."""
    h = torch.randn(16, device=device, requires_grad=True)
    w = torch.randn(40, 16, device=device, requires_grad=True)
    y = torch.tensor(-100, device=device)
    ours = tlf.linear_cross_entropy(h, w, y)
    ref = F.cross_entropy(F.linear(h.detach(), w.detach()), y)
    torch.testing.assert_close(ours, ref, equal_nan=True)


# ---- memory: no N x V tensor ----------------------------------------------------------------


def largest_allowed_allocation(chunk, V, H):
    """A chunk of float32 logits or a float32 weight-sized buffer, with room for a matmul
    library's padding: oneDNN's bfloat16 product allocates its float32 result larger than
    it is (5% on an H200 machine's host with bfloat16 instructions; 17% under torch 2.4 on
    CI's machine). Logits-sized buffers are far larger still."""
    return int(max(chunk * V, V * H) * 4 * 1.25) + 65536


def _cpu_allocations(fn):
    """Sizes of every allocation PyTorch's CPU allocator made while fn ran (kernels'
    internal buffers included), and the running peak of allocated bytes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type().name == "CPU")
    sizes = [n for _, n in events if n > 0]
    current = peak = 0
    for _, n in events:
        current += n
        peak = max(peak, current)
    return sizes, peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_logits_sized_allocation_cpu(backend, dtype, reduction):
    """Every allocation (the matmul libraries' scratch included) is at most a chunk of
    logits or a weight-sized buffer, doubling N adds only N-sized rows (the grad_hidden
    rows), not N x V logits, and the peak is a fraction of the materialised path's."""
    H, V, chunk = 16, 3000, 64
    itemsize = dtype.itemsize
    peaks = {}
    for N in (1024, 2048):
        hidden, weight, target, b = make(N, H, V, dtype, "cpu", bias=True)

        def ours(hidden=hidden, weight=weight, target=target, b=b):
            loss = tlf.linear_cross_entropy(hidden, weight, target, b, reduction=reduction,
                                            chunk_size=chunk)
            loss.sum().backward()

        def base(hidden=hidden, weight=weight, target=target, b=b):
            loss = F.cross_entropy(F.linear(hidden, weight, b), target, reduction=reduction)
            loss.sum().backward()

        ours()
        hidden.grad = weight.grad = b.grad = None
        sizes, peaks[N] = _cpu_allocations(ours)
        hidden.grad = weight.grad = b.grad = None
        _, base_peak = _cpu_allocations(base)
        assert max(sizes) <= largest_allowed_allocation(chunk, V, H), max(sizes)
        # (the baseline's peak shows the method sees logits-sized buffers)
        assert base_peak >= 2 * N * V * itemsize, base_peak
        assert peaks[N] < base_peak / 4, (peaks[N], base_peak)
    growth = peaks[2048] - peaks[1024]
    assert growth <= 1024 * (H * itemsize + 64) + 4096, growth


def test_auto_chunk_keeps_the_buffer_small_cpu():
    N, H, V = 4096, 32, 32000
    for dtype in (torch.float32, torch.bfloat16):
        rows = chunking.auto_chunk_size(N, V, H, dtype, torch.device("cpu"))
        assert 1 <= rows < N
        assert rows * V * dtype.itemsize <= max(chunking.CPU_BUFFER_BYTES,
                                                chunking.CPU_MIN_ROWS * V * dtype.itemsize)
    assert chunking.auto_chunk_size(10, 100, 8, torch.float32, torch.device("cpu")) == 10
    assert chunking.auto_chunk_size(0, 100, 8, torch.float32, torch.device("cpu")) == 1


def test_auto_chunk_cuda_policy_without_a_gpu(monkeypatch):
    # The CUDA policy's arithmetic, with the device queries faked: rows from H, capped by
    # the memory budget; while a CUDA graph is captured, no free-memory query at all.
    GiB = 1 << 30
    free = {"bytes": 40 * GiB}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (free["bytes"], 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: type("Props", (), {"total_memory": 80 * GiB})())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cuda = torch.device("cuda")
    N, H, V = 16384, 4096, 128256
    assert chunking.auto_chunk_size(N, V, H, torch.bfloat16, cuda) == 2048
    free["bytes"] = 1 * GiB  # tight memory: the buffer stays under 1/8 of what is free
    rows = chunking.auto_chunk_size(N, V, H, torch.bfloat16, cuda)
    assert rows * V * 2 <= GiB // chunking.GPU_FREE_FRACTION and rows >= 1

    def refuse(_):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "mem_get_info", refuse)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert chunking.auto_chunk_size(N, V, H, torch.bfloat16, cuda) == 2048


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_logits_sized_allocation_cuda():
    N, H, V = 4096, 64, 32000
    hidden, weight, target, _ = make(N, H, V, torch.bfloat16, "cuda")
    def step():
        tlf.linear_cross_entropy(hidden, weight, target).backward()

    step()
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < N * V * 2 / 2, extra


# ---- torch.compile and the ops ------------------------------------------------------------


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_compile_fullgraph(device, compile_backend, weighted, prob):
    torch._dynamo.reset()

    def f(h, w, y, b, cw):
        a = tlf.linear_cross_entropy(h, w, y, b, z_loss=1e-3, label_smoothing=0.1,
                                     chunk_size=7, class_weight=cw)
        c = tlf.linear_cross_entropy(h, w, y, b, reduction="none", softcap=3.0,
                                     class_weight=cw)
        return a + (c * c).mean()

    hidden, weight, target, b = make(2, 16, 37, torch.float32, device, bias=True, lead=(2, 9))
    if prob:  # class probabilities (2, 9, 37)
        target = torch.softmax(torch.randn(2, 9, 37, device=device) * 2, -1)
    cw = class_weights(37, torch.float32, device) if weighted else None
    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
    out = compiled(hidden, weight, target, b, cw)
    g_out = torch.autograd.grad(out, (hidden, weight, b))
    eager = f(hidden, weight, target, b, cw)
    g_eager = torch.autograd.grad(eager, (hidden, weight, b))
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    for a, c in zip(g_out, g_eager):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    # and both against the float64 oracle of the same function
    h, w, bb = (t.detach().double().requires_grad_() for t in (hidden, weight, b))
    logits = F.linear(h, w, bb).flatten(0, -2)
    t = target.flatten(0, -2).double() if prob else target.flatten()
    a, _ = oracle_cross_entropy(logits, t, cw, z_loss=1e-3, label_smoothing=0.1)
    c, _ = oracle_cross_entropy(logits, t, cw, reduction="none", softcap=3.0)
    ref = a + (c * c).mean()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(g_out, torch.autograd.grad(ref, (h, w, bb))):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
def test_compile_one_opaque_op(device, weighted):
    """The graph holds our op, not a per-chunk unrolled loop."""
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    hidden, weight, target, _ = make(40, 8, 20, torch.float32, device)
    cw = class_weights(20, torch.float32, device) if weighted else None
    f = torch.compile(lambda h, w, y, c: tlf.linear_cross_entropy(h, w, y, chunk_size=3,
                                                                  class_weight=c),
                      fullgraph=True, backend=counter)
    f(hidden, weight, target, cw).backward()
    assert counter.frame_count == 1
    graph = counter.graphs[0]
    calls = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    ours = [c for c in calls if "torchloss_fused_py" in c]
    assert len(ours) == 1 and "linear_ce_fwd_grad" in ours[0], calls
    assert not any("mm" in c for c in calls), calls


@pytest.mark.parametrize("name", ["linear_ce_fwd", "linear_ce_fwd_grad", "_linear_ce_bwd"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
def test_opcheck(device, name, weighted, transposed):
    """(transposed: hidden and weight column-major, whose gradients are transposed too,
    the fake kernels' strides as the real ones')"""
    hidden, weight, target, b = make(9, 6, 11, torch.float32, device, bias=True)
    if transposed:
        hidden, weight = (t.detach().t().contiguous().t().requires_grad_()
                          for t in (hidden, weight))
    cw = class_weights(11, torch.float32, device) if weighted else None
    ce = (-100, 0.1, 1e-3, 0.0)
    ops = getattr(torch.ops, lce_ops.NAMESPACE)
    if name == "linear_ce_fwd":
        args = (hidden, weight, b, target, cw, *ce, 4, None)
    elif name == "linear_ce_fwd_grad":
        denom = (target != -100).sum().float()
        args = (hidden, weight, b, target, cw, denom, *ce, 4, None, True, True, True)
    else:
        with torch.no_grad():
            _, lse = ops.linear_ce_fwd(hidden, weight, b, target, cw, *ce, 4, None)
        g = torch.rand(9, device=device)
        g_lse = torch.randn(9, device=device) if weighted else None  # (return_lse)
        args = (g, g_lse, hidden.detach(), weight.detach(), b.detach(), target, cw, lse, *ce,
                4, None, True, True, True)
    torch.library.opcheck(getattr(ops, name).default, args)


# ---- validation -----------------------------------------------------------------------------

H_ = torch.randn(4, 3)
W_ = torch.randn(5, 3)
Y_ = torch.tensor([0, 1, 2, 3])

BAD_CALLS = [
    ("unknown reduction", ValueError, "reduction", {"reduction": "avg"}),
    ("hidden not a tensor", TypeError, "hidden must be a torch.Tensor", {"hidden": [1.0]}),
    ("hidden integer", TypeError, "hidden must be float", {"hidden": H_.long()}),
    ("hidden 0-dim", ValueError, "0-dim", {"hidden": torch.tensor(1.0)}),
    ("weight wrong H", ValueError, "weight must have shape", {"weight": torch.randn(5, 4)}),
    ("weight 1-d", ValueError, "weight must have shape", {"weight": torch.randn(3)}),
    ("weight empty vocabulary", ValueError, "vocabulary", {"weight": torch.randn(0, 3)}),
    ("weight dtype", TypeError, "weight must have hidden's dtype", {"weight": W_.double()}),
    ("bias shape", ValueError, "bias must have shape", {"bias": torch.randn(4)}),
    ("bias dtype", TypeError, "bias must have hidden's dtype",
     {"bias": torch.randn(5, dtype=torch.float64)}),
    ("target float without V (probabilities)", ValueError, "probability target must have shape",
     {"target": Y_.float()}),
    ("target complex", TypeError, "class indices", {"target": Y_.to(torch.complex64)}),
    ("target shape", ValueError, "target must have hidden's shape", {"target": Y_[:3]}),
    ("target extra dim", ValueError, "target must have hidden's shape", {"target": Y_[:, None]}),
    ("chunk_size 0", ValueError, "chunk_size must be >= 1", {"chunk_size": 0}),
    ("chunk_size float", TypeError, "chunk_size must be an int", {"chunk_size": 2.0}),
    ("chunk_size bool", TypeError, "chunk_size must be an int", {"chunk_size": True}),
    ("accum_dtype int", TypeError, "accum_dtype", {"accum_dtype": torch.int32}),
    ("accum_dtype narrower", ValueError, "accum_dtype", {"accum_dtype": torch.bfloat16}),
    ("label_smoothing > 1", ValueError, "label_smoothing", {"label_smoothing": 1.5}),
    ("label_smoothing inf", ValueError, "label_smoothing", {"label_smoothing": float("inf")}),
    ("z_loss < 0", ValueError, "z_loss", {"z_loss": -1.0}),
    ("softcap 0", ValueError, "softcap", {"softcap": 0.0}),
    ("softcap nan", ValueError, "softcap", {"softcap": float("nan")}),
    ("class_weight not a tensor", TypeError, "class_weight must be a torch.Tensor",
     {"class_weight": [1.0] * 5}),
    ("class_weight wrong length", ValueError, r"class_weight must hold one value per class \(5\)",
     {"class_weight": torch.ones(4)}),
    ("class_weight of H values", ValueError, "class_weight must hold one value per class",
     {"class_weight": torch.ones(3)}),
    ("class_weight 2-d", ValueError, "class_weight must hold one value per class",
     {"class_weight": torch.ones(5, 1)}),
    ("class_weight dtype", TypeError, "class_weight must have hidden's dtype",
     {"class_weight": torch.ones(5, dtype=torch.float64)}),
    ("class_weight integer", TypeError, "class_weight must be a floating-point",
     {"class_weight": torch.ones(5, dtype=torch.long)}),
    ("class_weight device", ValueError, "class_weight is on meta.*same device",
     {"class_weight": torch.ones(5, device="meta")}),
]


@pytest.mark.parametrize("what,exc,match,kw", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments(what, exc, match, kw):
    args = {"hidden": H_, "weight": W_, "target": Y_, **kw}
    with pytest.raises(exc, match=match):
        tlf.linear_cross_entropy(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_mismatch_cuda():
    with pytest.raises(ValueError, match="same device"):
        tlf.linear_cross_entropy(H_.cuda(), W_, Y_)
    with pytest.raises(ValueError, match="same device"):
        tlf.linear_cross_entropy(H_.cuda(), W_.cuda(), Y_)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bias_written_in_place_before_backward(reduction):
    """F's composed loss does not save the bias (its logits are saved), so an optimizer's
    step on the bias before backward is fine there. Ours: fine for a mean/sum loss's
    backward, which uses the gradients made in the forward (it raised autograd's error);
    where the bias's old value is needed (none, a second backward), that error."""
    torch.manual_seed(0)
    t = torch.randint(0, 11, (6,))
    h, w, b = torch.randn(6, 8), torch.randn(11, 8), torch.randn(11)

    def grads(loss_fn, twice=False):
        leaves = [v.clone().requires_grad_() for v in (h, w, b)]
        loss = loss_fn(*leaves)
        with torch.no_grad():
            leaves[2].add_(0.1)
        if twice:
            torch.autograd.grad(loss.sum(), leaves, retain_graph=True)
        return torch.autograd.grad(loss.sum(), leaves)

    want = grads(lambda h, w, b: F.cross_entropy(F.linear(h, w, b), t, reduction=reduction))
    ours = lambda h, w, b: tlf.linear_cross_entropy(h, w, t, b, reduction=reduction)  # noqa: E731
    if reduction == "none":
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            grads(ours)
        return
    for got, expected in zip(grads(ours), want, strict=True):
        torch.testing.assert_close(got, expected)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        grads(ours, twice=True)
