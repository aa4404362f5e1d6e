"""The DTensor cases, run by every rank of a CPU process group (gloo).

`python -m tests.dtensor_worker OUT_DIR [WORLD]` starts WORLD processes (4 by default:
a 1-D mesh of 4 ranks and a 2x2 mesh); each runs every case in CASES in the same order and
writes OUT_DIR/rank<r>.json mapping the case name to "ok" or the failure's traceback.
tests/test_dtensor.py runs it once and turns each case into a test.

Every rank builds the same full tensors from the same seed, so each can compare the
gathered DTensor results with F.cross_entropy (and the other oracles) on the whole tensors
in float64.
"""

from __future__ import annotations

import json
import os
import random
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

import torchloss_fused as tlf
from benchmarks.problems import as_model_output
from tests.helpers import assert_as_accurate_as_f, oracle_cross_entropy
from tests.test_focal_loss import focal_oracle
from torchloss_fused import reference

CASES = {}


def case(name):
    def register(fn):
        CASES[name] = fn
        return fn
    return register


class Ctx:
    def __init__(self, rank: int, world: int):
        from torch.distributed.device_mesh import init_device_mesh
        self.rank, self.world = rank, world
        self.mesh = init_device_mesh("cpu", (world,))
        self.mesh2d = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))


def _dist(t, mesh, placements, requires_grad=False):
    d = distribute_tensor(t, mesh, placements)
    return d.requires_grad_() if requires_grad else d


def _close(ours, oracle, dtype, what):
    ours = ours.full_tensor() if isinstance(ours, DTensor) else ours
    tol = {} if dtype in (torch.float32, torch.float64) else {"rtol": 2e-2, "atol": 2e-2}
    if dtype == torch.float32:
        tol = {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(ours.double(), oracle.double(), equal_nan=True, msg=lambda m: (
        f"{what}: {m}"), **tol)


def _row_inputs(seed, N, C=10):
    """float64 (N, C) logits, class-index targets and a positive per-class vector."""
    torch.manual_seed(seed)
    return (torch.randn(N, C, dtype=torch.float64), torch.randint(0, C, (N,)),
            torch.rand(C, dtype=torch.float64))


def _upstream(loss, mesh):
    """A random upstream gradient laid out like the loss (ones for a scalar)."""
    if loss.dim() == 0:
        return None, torch.ones((), dtype=torch.float64)
    g = torch.rand(loss.shape, dtype=torch.float64) + 0.5
    return distribute_tensor(g.to(loss.dtype), mesh, loss.placements), g


def check_ce(ctx, placements, shape=(12, 10), dtype=torch.float64, prob=False,
             target_placements=None, mesh=None, reduction="mean", seed=0, fn=None,
             oracle=None, expect_grad_placements=None, **kwargs):
    """tlf.cross_entropy on DTensors equals the oracle on the whole tensors, in value and
    gradient; the gradient keeps the input's layout."""
    mesh = mesh or ctx.mesh
    torch.manual_seed(seed)
    C = shape[1] if len(shape) > 1 else shape[0]
    x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
    if prob:
        t = torch.softmax(torch.randn(shape, dtype=torch.float64), dim=1 if len(shape) > 1 else 0)
    else:
        t_shape = (shape[0],) + tuple(shape[2:]) if len(shape) > 1 else ()
        t = torch.randint(0, C, t_shape)
        if "ignore_index" in kwargs and t.dim():
            t[torch.rand(t.shape) < 0.3] = kwargs["ignore_index"]
    w = kwargs.pop("weight", None)
    xd = _dist(x, mesh, placements, requires_grad=True)
    tp = target_placements or [p if (p.is_shard(0) or prob) else Replicate() for p in placements]
    td = _dist(t, mesh, tp)
    wd = None if w is None else _dist(w.to(dtype), mesh, [Replicate()] * mesh.ndim)
    # (inplace_backward refuses a leaf: the logits as a model's output, on its storage)
    xin = as_model_output(xd) if kwargs.get("inplace_backward") else xd
    loss = (fn or tlf.cross_entropy)(xin, td, weight=wd, reduction=reduction, **kwargs)
    if isinstance(loss, tuple):
        loss, lse = loss
    else:
        lse = None
    gd, g = _upstream(loss, mesh)
    (loss.backward() if gd is None else (loss * gd).sum().backward())

    x64 = x.double().requires_grad_()
    ref_kwargs = {k: v for k, v in kwargs.items() if k not in ("return_lse", "inplace_backward")}
    ref, ref_lse = (oracle or oracle_cross_entropy)(x64, t, weight=w, reduction=reduction,
                                                    **ref_kwargs)
    (ref * g).sum().backward()
    _close(loss, ref, dtype, "loss")
    _close(xd.grad, x64.grad, dtype, "grad")
    if lse is not None:
        _close(lse, ref_lse, dtype, "lse")
    want = expect_grad_placements or xd.placements
    if want is not ...:  # (...: any layout)
        assert tuple(xd.grad.placements) == tuple(want), (xd.grad.placements, want)
    return xd, loss


# ---- logits sharded on the class dim (vocab-parallel) ----------------------------------------

VOCAB = [Shard(1)]

for _red in ("mean", "sum", "none"):
    case(f"vocab_plain_{_red}")(lambda ctx, r=_red: check_ce(ctx, VOCAB, reduction=r))
case("vocab_uneven_classes")(lambda ctx: check_ce(ctx, VOCAB, shape=(9, 10)))
case("vocab_empty_slice")(lambda ctx: check_ce(ctx, VOCAB, shape=(7, 3)))
case("vocab_single_sample")(lambda ctx: check_ce(ctx, [Shard(0)], shape=(11,),
                                                 target_placements=[Replicate()]))
case("vocab_kdim")(lambda ctx: check_ce(ctx, VOCAB, shape=(4, 10, 3, 2), reduction="none"))
case("vocab_weight")(lambda ctx: check_ce(ctx, VOCAB, weight=torch.rand(10) + 0.2))
case("vocab_ignore_index")(lambda ctx: check_ce(ctx, VOCAB, ignore_index=-100))
# An ignore_index that is a class of one slice: its rows must count nowhere.
case("vocab_ignore_index_inside_a_slice")(lambda ctx: check_ce(ctx, VOCAB, ignore_index=4))
case("vocab_label_smoothing")(lambda ctx: check_ce(ctx, VOCAB, label_smoothing=0.2))
case("vocab_weight_smoothing_ignore")(lambda ctx: check_ce(
    ctx, VOCAB, weight=torch.rand(10) + 0.2, label_smoothing=0.1, ignore_index=2,
    reduction="sum"))
case("vocab_prob_target")(lambda ctx: check_ce(ctx, VOCAB, prob=True))
case("vocab_prob_target_weight_smoothing")(lambda ctx: check_ce(
    ctx, VOCAB, prob=True, weight=torch.rand(10) + 0.2, label_smoothing=0.3,
    reduction="none"))
case("vocab_z_loss")(lambda ctx: check_ce(ctx, VOCAB, z_loss=1e-2, weight=torch.rand(10)))
case("vocab_softcap_scale")(lambda ctx: check_ce(ctx, VOCAB, softcap=4.0, logit_scale=1.5,
                                                  label_smoothing=0.1))
case("vocab_prob_z_loss_softcap")(lambda ctx: check_ce(ctx, VOCAB, prob=True, z_loss=1e-3,
                                                        softcap=3.0))
case("vocab_return_lse")(lambda ctx: check_ce(ctx, VOCAB, return_lse=True, reduction="none"))
case("vocab_bf16")(lambda ctx: check_ce(ctx, VOCAB, shape=(16, 70), dtype=torch.bfloat16))
case("vocab_fp32")(lambda ctx: check_ce(ctx, VOCAB, shape=(16, 70), dtype=torch.float32,
                                        label_smoothing=0.1))
case("vocab_target_sharded_on_rows")(lambda ctx: check_ce(ctx, VOCAB,
                                                          target_placements=[Shard(0)]))
case("vocab_2d_mesh_rows_and_classes")(lambda ctx: check_ce(
    ctx, [Shard(0), Shard(1)], mesh=ctx.mesh2d, label_smoothing=0.1, ignore_index=-100))
case("vocab_2d_mesh_classes_twice")(lambda ctx: check_ce(
    ctx, [Shard(1), Shard(1)], mesh=ctx.mesh2d, weight=torch.rand(10) + 0.2,
    target_placements=[Replicate(), Replicate()]))
case("vocab_2d_mesh_replicate_and_classes")(lambda ctx: check_ce(
    ctx, [Replicate(), Shard(1)], mesh=ctx.mesh2d, reduction="none"))


@case("vocab_only_all_reduces_per_row_stats")
def _(ctx):
    """No rank ever gathers the logits: the collectives are all-reduces of (k, rows)."""
    torch.manual_seed(0)
    N, C = 32, 4096
    xd = _dist(torch.randn(N, C), ctx.mesh, VOCAB, requires_grad=True)
    td = _dist(torch.randint(0, C, (N,)), ctx.mesh, [Replicate()])
    with CommDebugMode() as comm:
        tlf.cross_entropy(xd, td, label_smoothing=0.1).backward()
    counts = {str(k): v for k, v in comm.get_comm_counts().items()}
    assert not any("gather" in k or "scatter" in k for k in counts), counts
    assert xd.grad.to_local().shape == xd.to_local().shape


def _vocab_memory(ctx, label_smoothing):
    """Per rank, forward+backward allocates the gradient of its own slice and per-row
    vectors (the fallback: also bounded float32 chunks), nothing of the whole logits' size
    (128 MiB slices of 512 MiB logits)."""
    from benchmarks import memory
    from torchloss_fused import _backend
    N, V = 2048, 65536
    local = torch.randn(N, V // ctx.world)
    xd = DTensor.from_local(local, ctx.mesh, VOCAB).requires_grad_()
    td = _dist(torch.randint(0, V, (N,)), ctx.mesh, [Replicate()])

    def step():
        tlf.cross_entropy(xd, td, label_smoothing=label_smoothing).backward()
        xd.grad = None

    step()
    # (The profiler counts allocations exactly; resident-set peaks of 4 processes on 2
    # cores are noisy.)
    peak = memory.peak_extra_bytes(step, torch.device("cpu"), method="profiler")
    local_bytes = local.numel() * local.element_size()
    kernels = _backend.has_kernels("cpu")
    slack = (4 if kernels else 96) * 2**20
    assert peak <= local_bytes + slack, (peak / 2**20, local_bytes / 2**20)


case("vocab_memory_is_the_local_gradient")(lambda ctx: _vocab_memory(ctx, 0.0))
case("vocab_memory_is_the_local_gradient_smoothing")(lambda ctx: _vocab_memory(ctx, 0.1))


def _vocab_inplace(ctx, **kwargs):
    xd, _ = check_ce(ctx, VOCAB, shape=(12, 10), inplace_backward=True, **kwargs)
    # The gradient was written over the input's own local slice.
    assert xd.grad.to_local().data_ptr() == xd.to_local().data_ptr(), (
        xd.grad.to_local().data_ptr(), xd.to_local().data_ptr(), xd.to_local().stride(),
        xd.grad.to_local().stride())


# (without label smoothing the kernels write the gradient; with it, the chunked path)
case("vocab_inplace_backward")(lambda ctx: _vocab_inplace(ctx, weight=torch.rand(10),
                                                          z_loss=1e-2, ignore_index=1))
case("vocab_inplace_backward_smoothing")(lambda ctx: _vocab_inplace(ctx, label_smoothing=0.1))
case("vocab_inplace_backward_bf16")(lambda ctx: _vocab_inplace(ctx, dtype=torch.bfloat16,
                                                               softcap=5.0))


@case("vocab_non_finite_rows")
def _(ctx):
    x = torch.randn(4, 10, dtype=torch.float64)
    x[0, :] = -float("inf")
    x[0, 7] = 1.0  # partly -inf: finite
    x[1, 2] = float("nan")  # NaN poisons its row only
    x[2, 8] = float("inf")
    t = torch.tensor([7, 3, 1, 5])
    xd = _dist(x, ctx.mesh, VOCAB)
    td = _dist(t, ctx.mesh, [Replicate()])
    # (Label smoothing sums every logit of a slice: row 0 leaves some slices all -inf.)
    w = torch.rand(10, dtype=torch.float64) + 0.2
    for kw in ({}, {"label_smoothing": 0.2}, {"label_smoothing": 0.1, "weight": w}):
        wd = _dist(w, ctx.mesh, [Replicate()]) if "weight" in kw else None
        ours = tlf.cross_entropy(xd, td, reduction="none", **{**kw, "weight": wd}).full_tensor()
        ref = F.cross_entropy(x, t, reduction="none", **kw)
        torch.testing.assert_close(ours, ref, equal_nan=True)


@case("random_calls_match_f")
def _(ctx):
    """Random calls (the same on every rank: one seed), each against F.cross_entropy on the
    whole tensors in float64: layout (classes over 4 ranks, rows over 4, rows x classes on
    the 2x2 mesh, classes over both mesh dims), C not divisible by the ranks, dtype, weight,
    ignore_index (also a real class), label_smoothing, reduction, return_lse, in-place
    backward, some or all targets ignored, upstream gradients of either sign or zero."""
    rng = random.Random(1234)
    layouts = [("vocab", lambda: ctx.mesh, [Shard(1)], [Replicate()]),
               ("rows", lambda: ctx.mesh, [Shard(0)], [Shard(0)]),
               ("rows_x_vocab", lambda: ctx.mesh2d, [Shard(0), Shard(1)],
                [Shard(0), Replicate()]),
               ("vocab_2d", lambda: ctx.mesh2d, [Shard(1), Shard(1)],
                [Replicate(), Replicate()])]
    for i in range(40):
        name, mesh, xp, tp = rng.choice(layouts)
        N, C = rng.choice([4, 8, 12]), rng.choice([5, 9, 16, 37])
        dtype = rng.choice([torch.float64, torch.float32, torch.bfloat16])
        g = torch.Generator().manual_seed(i)
        x = torch.randn(N, C, generator=g, dtype=torch.float64) * rng.choice([0.3, 3.0])
        ii = rng.choice([-100, 2])
        t = torch.randint(0, C, (N,), generator=g)
        t[: rng.choice([0, 1, N // 2, N])] = ii
        kw = {"ignore_index": ii, "reduction": rng.choice(["mean", "sum", "none"]),
              "label_smoothing": rng.choice([0.0, 0.0, 0.2])}
        w = torch.rand(C, generator=g, dtype=torch.float64) + 0.2 if rng.random() < 0.4 \
            else None
        inplace = rng.random() < 0.25
        upstream = rng.choice([1.0, -1.5, 0.0])
        what = f"call {i} ({name} {dtype} N={N} C={C} w={w is not None} {kw} " \
               f"inplace={inplace} upstream={upstream})"
        xd = _dist(x.to(dtype), mesh(), xp, requires_grad=True)
        td = _dist(t, mesh(), tp)
        wd = None if w is None else _dist(w.to(dtype), mesh(), [Replicate()] * len(xp))
        inp = xd * 1 if inplace else xd
        ours = tlf.cross_entropy(inp, td, weight=wd, inplace_backward=inplace, **kw)
        xr = x.to(dtype).double().requires_grad_()
        ref = F.cross_entropy(xr, t, weight=w, **kw)
        _close(ours, ref, dtype, what + " loss")
        (ours * upstream).sum().backward()
        (ref * upstream).sum().backward()
        expect = xr.grad.masked_fill((t == ii)[:, None], 0)
        _close(xd.grad, expect, dtype, what + " grad")


@case("random_focal_and_linear_calls_match_oracles")
def _(ctx):
    """As random_calls_match_f for focal_loss (gamma, scalar or per-class alpha, against
    focal_oracle) and linear_cross_entropy (tokens split with the head replicated, or the
    head split over the vocabulary; bias, class_weight, smoothing, class-index or
    probability targets, the returned lse and (some calls) its gradient; against F.linear +
    F.cross_entropy), upstream gradients of either sign or zero."""
    rng = random.Random(99)
    seen = set()
    for i in range(30):
        g = torch.Generator().manual_seed(1000 + i)
        dtype = rng.choice([torch.float64, torch.float32])
        red = rng.choice(["mean", "sum", "none"])
        upstream = rng.choice([1.0, -0.5, 0.0])
        ii = rng.choice([-100, 1])
        if i % 2 == 0:  # focal
            N, C = rng.choice([4, 8]), rng.choice([5, 9, 16])
            x = torch.randn(N, C, generator=g, dtype=torch.float64) * 2
            t = torch.randint(0, C, (N,), generator=g)
            t[: rng.choice([0, 1, N])] = ii
            gamma = rng.choice([0.0, 1.0, 2.0])
            alpha = rng.choice([None, 0.25, "vec"])
            if alpha == "vec":
                alpha = torch.rand(C, generator=g, dtype=torch.float64) + 0.2
            layout = rng.choice([[Shard(1)], [Shard(0)]])
            tp = [Replicate()] if layout[0].dim == 1 else [Shard(0)]
            what = f"focal {i} {layout} {dtype} {red} gamma={gamma} alpha={alpha is not None}"
            xd = _dist(x.to(dtype), ctx.mesh, layout, requires_grad=True)
            ad = _dist(alpha.to(dtype), ctx.mesh, [Replicate()]) \
                if isinstance(alpha, torch.Tensor) else alpha
            ours = tlf.focal_loss(xd, _dist(t, ctx.mesh, tp), gamma=gamma, alpha=ad,
                                  ignore_index=ii, reduction=red)
            xr = x.to(dtype).double().requires_grad_()
            ref = focal_oracle(xr, t, gamma, alpha, ii, red)
            inputs, refs = (xd,), (xr,)
        else:  # linear cross-entropy
            N, H, V = rng.choice([4, 8]), 3, rng.choice([5, 9])
            h = torch.randn(N, H, generator=g, dtype=torch.float64)
            w = torch.randn(V, H, generator=g, dtype=torch.float64)
            b = torch.randn(V, generator=g, dtype=torch.float64) if rng.random() < 0.5 \
                else None
            cw = torch.rand(V, generator=g, dtype=torch.float64) + 0.2 \
                if rng.random() < 0.5 else None
            prob = i % 4 == 1  # class probabilities (N, V), no ignore_index
            if prob:
                t = torch.softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2, -1)
                ii = -100
            else:
                t = torch.randint(0, V, (N,), generator=g)
                t[: rng.choice([0, 1, N])] = ii
            ls = rng.choice([0.0, 0.1])
            hp, wp = rng.choice([([Shard(0)], [Replicate()]), VOCAB_HEAD])
            tp = hp if hp[0].is_shard() else [Replicate()]
            if prob and not hp[0].is_shard():  # (columns split as the head's, or not)
                tp = rng.choice([[Replicate()], [Shard(1)]])
            what = f"linear {i} {hp}/{wp} {dtype} {red} bias={b is not None} " \
                   f"cw={cw is not None} ls={ls} prob={prob} {tp}"
            seen.add((prob, hp[0].is_shard()))
            hd = _dist(h.to(dtype), ctx.mesh, hp, requires_grad=True)
            wd = _dist(w.to(dtype), ctx.mesh, wp, requires_grad=True)
            bd = None if b is None else _dist(b.to(dtype), ctx.mesh, wp, requires_grad=True)
            cwd = None if cw is None else _dist(cw.to(dtype), ctx.mesh, [Replicate()])
            ours, lse = tlf.linear_cross_entropy(hd, wd, _dist(t, ctx.mesh, tp), bd,
                                                 ignore_index=ii, reduction=red,
                                                 label_smoothing=ls, class_weight=cwd,
                                                 return_lse=True)
            refs = tuple(None if v is None else v.to(dtype).double().requires_grad_()
                         for v in (h, w, b))
            ref = F.cross_entropy(F.linear(*refs), t, weight=cw, ignore_index=ii,
                                  reduction=red, label_smoothing=ls)
            ref_lse = torch.logsumexp(F.linear(*refs), -1)
            _close(lse, ref_lse, dtype, what + " lse")
            if i % 3 == 0:  # a gradient through the lse too
                # (a sum over numel, not .mean(): torch 2.11's DTensor cannot add the
                # Partial(avg) a mean of row-sharded values gives to the loss's Partial(sum))
                ours = ours + 0.1 * (lse * lse).sum() / lse.numel()
                ref = ref + 0.1 * (ref_lse ** 2).mean()
            inputs = (hd, wd, bd)
        _close(ours, ref, dtype, what + " loss")
        (ours * upstream).sum().backward()
        (ref * upstream).sum().backward()
        for k, (a, r) in enumerate(zip(inputs, refs)):
            if a is None:
                continue
            expect = r.grad
            if k == 0 and i % 2 == 0:
                expect = expect.masked_fill((t == ii)[:, None], 0)
            _close(a.grad, expect, dtype, f"{what} grad {k}")
    assert seen == {(p, r) for p in (False, True) for r in (False, True)}, seen


@case("vocab_target_out_of_range")
def _(ctx):
    xd = _dist(torch.randn(4, 10), ctx.mesh, VOCAB)
    td = _dist(torch.tensor([1, 10, 2, 3]), ctx.mesh, [Replicate()])
    try:
        tlf.cross_entropy(xd, td)
    except IndexError as e:
        assert "10" in str(e), e
    else:
        raise AssertionError("an out-of-range target raised nothing")


def _expect_index_error(fn, *args):
    try:
        fn(*args)
    except IndexError as e:
        return str(e)
    raise AssertionError("an out-of-range target raised nothing on this rank")


@case("target_out_of_range_raises_on_every_rank")
def _(ctx):
    """Rows split over ranks: the ranks whose rows are fine raise too, instead of waiting in
    the loss's next collective for the ranks that raised."""
    t = torch.randint(0, 10, (8,))
    t[0] = 10
    for placements in ([Shard(0), Shard(1)], [Shard(0), Replicate()]):
        xd = _dist(torch.randn(8, 10), ctx.mesh2d, placements, requires_grad=True)
        td = _dist(t, ctx.mesh2d, [Shard(0), Replicate()])
        _expect_index_error(tlf.cross_entropy, xd, td)
        _expect_index_error(tlf.focal_loss, xd, td)
    hd = _dist(torch.randn(8, 4), ctx.mesh2d, [Shard(0), Replicate()], requires_grad=True)
    wd = _dist(torch.randn(10, 4), ctx.mesh2d, [Replicate(), Shard(0)], requires_grad=True)
    _expect_index_error(tlf.linear_cross_entropy, hd, wd,
                        _dist(t, ctx.mesh2d, [Shard(0), Replicate()]))


@case("vocab_ignored_padding_rows_get_zero_gradient")
def _(ctx):
    """Ignored rows get an exact zero gradient whatever their logits hold (all -inf masked
    padding, a NaN, a +inf), as the unsharded call gives, also with an lse gradient of 0."""
    x = torch.randn(6, 10, dtype=torch.float64)
    x[1] = -float("inf")
    x[3, 8] = float("nan")  # (in the last slice: the other slices of the row are finite)
    x[5, 1] = float("inf")
    t = torch.tensor([3, -100, 7, -100, 0, -100])

    def with_lse(a, b, **kw):
        loss, lse = tlf.cross_entropy(a, b, reduction="none", return_lse=True, **kw)
        return loss.sum() + (lse * 0).sum()

    for fn in (lambda a, b: tlf.cross_entropy(a, b, reduction="sum"),
               lambda a, b: tlf.cross_entropy(a, b, reduction="sum", label_smoothing=0.1),
               lambda a, b: tlf.cross_entropy(a * 1, b, reduction="sum",
                                              inplace_backward=True),
               with_lse,
               lambda a, b: with_lse(a, b, label_smoothing=0.1),
               lambda a, b: tlf.focal_loss(a, b, reduction="sum")):
        xd = _dist(x, ctx.mesh, VOCAB, requires_grad=True)
        fn(xd, _dist(t, ctx.mesh, [Replicate()])).backward()
        plain = x.clone().requires_grad_()
        fn(plain, t).backward()
        ours = xd.grad.full_tensor()
        for r in (1, 3, 5):
            assert torch.equal(ours[r], torch.zeros(10, dtype=torch.float64)), (r, ours[r])
        _close(ours, plain.grad, torch.float64, "grad")


@case("vocab_weight_requiring_grad_gathers")
def _(ctx):
    x, t, w = _row_inputs(1, 6)
    xd = _dist(x, ctx.mesh, VOCAB, requires_grad=True)
    wd = _dist(w, ctx.mesh, [Replicate()], requires_grad=True)
    tlf.cross_entropy(xd, _dist(t, ctx.mesh, [Replicate()]), weight=wd).backward()
    x64, w64 = x.clone().requires_grad_(), w.clone().requires_grad_()
    # (F.cross_entropy has no gradient for the weight: its formula, written out.)
    w_t = w64[t]
    (-(w_t * torch.log_softmax(x64, 1).gather(1, t[:, None])[:, 0]).sum() / w_t.sum()).backward()
    _close(xd.grad, x64.grad, torch.float64, "grad x")
    _close(wd.grad, w64.grad, torch.float64, "grad weight")


def _penalised_grads(loss_fn, leaves):
    """The leaves' gradients of loss + |dloss/dleaves[0]|^2 (a gradient penalty: the
    first gradient taken with create_graph=True, then differentiated again)."""
    loss = loss_fn(*leaves)
    (g,) = torch.autograd.grad(loss, leaves[0], create_graph=True)
    (loss + (g * g).sum()).backward()
    return [v.grad for v in leaves]


@case("vocab_create_graph_keeps_second_order_terms")
def _(ctx):
    """create_graph=True on class-sharded logits (and a vocabulary-sharded LM head): the
    gradient is differentiable, as F's, rather than a constant whose second-order terms
    silently vanish (they did, by up to 1e-1 of the gradient)."""
    x, t, w = _row_inputs(11, 6)
    p = torch.softmax(torch.randn(6, 10, dtype=torch.float64), 1)
    td = _dist(t, ctx.mesh, [Replicate()])
    wd = _dist(w, ctx.mesh, [Replicate()])
    cases = (
        ("ce", lambda a: tlf.cross_entropy(a, td),
         lambda a: F.cross_entropy(a, t)),
        ("ce smoothing weight", lambda a: tlf.cross_entropy(a, td, weight=wd,
                                                            label_smoothing=0.1),
         lambda a: F.cross_entropy(a, t, weight=w, label_smoothing=0.1)),
        ("ce prob", lambda a: tlf.cross_entropy(a, _dist(p, ctx.mesh, VOCAB)),
         lambda a: F.cross_entropy(a, p)),
        ("focal", lambda a: tlf.focal_loss(a, td, gamma=2.0, alpha=wd),
         lambda a: focal_oracle(a, t, 2.0, w)),
    )
    for what, ours, oracle in cases:
        (got,) = _penalised_grads(ours, [_dist(x, ctx.mesh, VOCAB, requires_grad=True)])
        (want,) = _penalised_grads(oracle, [x.clone().requires_grad_()])
        assert got.placements == tuple(VOCAB), (what, got.placements)
        _close(got, want, torch.float64, what)
    h, head = torch.randn(6, 4, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64)
    got = _penalised_grads(lambda a, b: tlf.linear_cross_entropy(a, b, td, label_smoothing=0.1),
                           [_dist(h, ctx.mesh, [Replicate()], requires_grad=True),
                            _dist(head, ctx.mesh, [Shard(0)], requires_grad=True)])
    want = _penalised_grads(lambda a, b: F.cross_entropy(F.linear(a, b), t, label_smoothing=0.1),
                            [h.clone().requires_grad_(), head.clone().requires_grad_()])
    for g, ref, what in zip(got, want, ("hidden", "head")):
        _close(g, ref, torch.float64, f"linear {what}")


@case("torch_func_over_dtensor_logits")
def _(ctx):
    """torch.func over row-sharded logits (a plain DTensor target beside the transform's
    wrapper had been refused as a plain tensor), and a clear error over class-sharded ones,
    where the reference code cannot gather the classes of a wrapped DTensor."""
    x, t, w = _row_inputs(12, 8)
    rows = [Shard(0)]
    td = _dist(t, ctx.mesh, rows)
    for what, ours, oracle in (
            ("ce", lambda a: tlf.cross_entropy(a, td, label_smoothing=0.1),
             lambda a: F.cross_entropy(a, t, label_smoothing=0.1)),
            ("focal", lambda a: tlf.focal_loss(a, td, gamma=2.0),
             lambda a: focal_oracle(a, t, 2.0))):
        got = torch.func.grad(ours)(_dist(x, ctx.mesh, rows))
        _close(got, torch.func.grad(oracle)(x), torch.float64, what)
    td = _dist(t, ctx.mesh, [Replicate()])
    head = _dist(torch.randn(10, 4, dtype=torch.float64), ctx.mesh, [Shard(0)])
    for what, call in (
            ("class-sharded logits", lambda: torch.func.grad(
                lambda a: tlf.cross_entropy(a, td))(_dist(x, ctx.mesh, VOCAB))),
            ("a vocabulary-sharded head", lambda: torch.func.grad(
                lambda h: tlf.linear_cross_entropy(h, head, td))(
                    _dist(torch.randn(8, 4, dtype=torch.float64), ctx.mesh, [Replicate()])))):
        try:
            call()
        except NotImplementedError as e:
            assert "class dim" in str(e), e
        else:
            raise AssertionError(f"torch.func over {what} raised nothing")


@case("rows_sharded_without_rows_and_the_reference_route")
def _(ctx):
    """Row-sharded logits (and hidden states) with no rows give F's 0 (an internal reshape
    of the sharded dim was refused); and the reference route (a weight requiring grad)
    keeps the rows sharded (its chunks were slices, which DTensor replicates: every rank
    computed and held every row's gradient)."""
    rows = [Shard(0)]
    xd = _dist(torch.randn(0, 10, dtype=torch.float64), ctx.mesh, rows, requires_grad=True)
    td = _dist(torch.zeros(0, dtype=torch.long), ctx.mesh, rows)
    loss = tlf.cross_entropy(xd, td, reduction="sum")
    loss.backward()
    assert loss.full_tensor().item() == 0 and xd.grad.shape == (0, 10)
    hd = _dist(torch.randn(0, 4, dtype=torch.float64), ctx.mesh, rows, requires_grad=True)
    wd = _dist(torch.randn(10, 4, dtype=torch.float64), ctx.mesh, [Replicate()],
               requires_grad=True)
    loss = tlf.linear_cross_entropy(hd, wd, td, reduction="sum")
    loss.backward()
    assert loss.full_tensor().item() == 0 and hd.grad.shape == (0, 4)
    pd = _dist(torch.rand(0, 10, dtype=torch.float64), ctx.mesh, rows)  # probabilities
    assert tlf.cross_entropy(xd, pd, reduction="sum").full_tensor().item() == 0
    x3d = _dist(torch.randn(0, 10, 3, dtype=torch.float64), ctx.mesh, rows)  # K-dim
    t3d = _dist(torch.zeros(0, 3, dtype=torch.long), ctx.mesh, rows)
    assert tlf.cross_entropy(x3d, t3d, reduction="sum").full_tensor().item() == 0
    x, t, w = _row_inputs(13, 8)
    xd = _dist(x, ctx.mesh, rows, requires_grad=True)
    wd = _dist(w, ctx.mesh, [Replicate()], requires_grad=True)
    tlf.cross_entropy(xd, _dist(t, ctx.mesh, rows), weight=wd, label_smoothing=0.1).backward()
    x64 = x.clone().requires_grad_()
    F.cross_entropy(x64, t, weight=w, label_smoothing=0.1).backward()
    assert xd.grad.placements == tuple(rows), xd.grad.placements
    _close(xd.grad, x64.grad, torch.float64, "grad x")


@case("vocab_plain_target_is_a_clear_error")
def _(ctx):
    xd = _dist(torch.randn(4, 10), ctx.mesh, VOCAB)
    try:
        tlf.cross_entropy(xd, torch.tensor([1, 2, 3, 4]))
    except TypeError as e:
        assert "DTensor" in str(e), e
    else:
        raise AssertionError("a plain target with a DTensor input raised nothing")


@case("modules_take_plain_buffers_with_dtensor_inputs")
def _(ctx):
    """A module's class-weight / alpha buffer (a plain tensor, the same on every rank) works
    with a DTensor input, as a replicated DTensor; the functional form stays strict."""
    x, t, w = _row_inputs(7, 8)
    for placements in (VOCAB, [Shard(0)]):
        xd = _dist(x, ctx.mesh, placements, requires_grad=True)
        td = _dist(t, ctx.mesh, [p if p.is_shard(0) else Replicate() for p in placements])
        loss = tlf.CrossEntropyLoss(weight=w, label_smoothing=0.1)(xd, td)
        loss.backward()
        x64 = x.clone().requires_grad_()
        ref = F.cross_entropy(x64, t, weight=w, label_smoothing=0.1)
        ref.backward()
        _close(loss, ref, torch.float64, f"{placements} CrossEntropyLoss")
        _close(xd.grad, x64.grad, torch.float64, f"{placements} CrossEntropyLoss grad")
        focal = tlf.FocalLoss(gamma=2.0, alpha=w)(xd.detach(), td)
        _close(focal, focal_oracle(x, t, 2.0, w), torch.float64, f"{placements} FocalLoss")


@case("a_different_mesh_is_a_clear_error")
def _(ctx):
    xd = _dist(torch.randn(4, 10), ctx.mesh, VOCAB)
    td = _dist(torch.tensor([1, 2, 3, 4]), ctx.mesh2d, [Replicate(), Replicate()])
    hd = _dist(torch.randn(4, 3), ctx.mesh, [Replicate()])
    wd = _dist(torch.randn(10, 3), ctx.mesh2d, [Replicate(), Shard(0)])
    for fn, args in ((tlf.cross_entropy, (xd, td)), (tlf.focal_loss, (xd, td)),
                     (tlf.linear_cross_entropy, (hd, wd, td))):
        try:
            fn(*args)
        except ValueError as e:
            assert "mesh" in str(e), e
        else:
            raise AssertionError(f"{fn.__name__}: mixed meshes raised nothing")


def _focal(xd, td, weight=None, reduction="mean", **kwargs):
    assert weight is None
    return tlf.focal_loss(xd, td, reduction=reduction, **kwargs)


def _focal_oracle(x, t, weight=None, reduction="mean", gamma=2.0, alpha=None,
                  ignore_index=-100):
    return focal_oracle(x, t, gamma, alpha, ignore_index, reduction), None


for _g in (0.0, 2.0):
    case(f"vocab_focal_gamma{_g:g}")(lambda ctx, g=_g: check_ce(
        ctx, VOCAB, fn=_focal, oracle=_focal_oracle, gamma=g, ignore_index=-100))
case("vocab_focal_gamma1.5_none")(lambda ctx: check_ce(
    ctx, VOCAB, fn=_focal, oracle=_focal_oracle, gamma=1.5, reduction="none"))
case("vocab_focal_2d_mesh")(lambda ctx: check_ce(
    ctx, [Shard(0), Shard(1)], mesh=ctx.mesh2d, fn=_focal, oracle=_focal_oracle, gamma=2.0,
    alpha=0.25, reduction="sum"))


@case("vocab_focal_alpha_tensor")
def _(ctx):
    x, t, a = _row_inputs(2, 8)
    xd = _dist(x, ctx.mesh, VOCAB, requires_grad=True)
    ad = _dist(a, ctx.mesh, [Shard(0)])  # a sharded alpha is gathered (C values)
    loss = tlf.focal_loss(xd, _dist(t, ctx.mesh, [Replicate()]), gamma=2.0, alpha=ad)
    loss.backward()
    x64 = x.clone().requires_grad_()
    ref = focal_oracle(x64, t, 2.0, a)
    ref.backward()
    _close(loss, ref, torch.float64, "loss")
    _close(xd.grad, x64.grad, torch.float64, "grad")


# ---- rows sharded or replicated: the ops run on local rows -----------------------------------

ROWS = [Shard(0)]
for _red in ("mean", "sum", "none"):
    case(f"rows_plain_{_red}")(lambda ctx, r=_red: check_ce(ctx, ROWS, reduction=r))
case("rows_uneven")(lambda ctx: check_ce(ctx, ROWS, shape=(7, 10)))
case("rows_weight_smoothing_ignore")(lambda ctx: check_ce(
    ctx, ROWS, weight=torch.rand(10) + 0.2, label_smoothing=0.1, ignore_index=2))
case("rows_prob_target")(lambda ctx: check_ce(ctx, ROWS, prob=True, label_smoothing=0.1))
case("rows_extras")(lambda ctx: check_ce(ctx, ROWS, z_loss=1e-2, softcap=4.0,
                                         logit_scale=0.7, return_lse=True, reduction="none"))
case("rows_bf16")(lambda ctx: check_ce(ctx, ROWS, shape=(16, 70), dtype=torch.bfloat16))
case("rows_inplace_backward")(lambda ctx: check_ce(ctx, ROWS, inplace_backward=True))


@case("rows_inplace_backward_where_dtensor_would_copy_the_logits")
def _(ctx):
    """inplace_backward on the row path where DTensor's dispatch would hand the in-place op
    a redistributed copy of the logits (fewer rows than ranks; replicated logits beside
    sharded targets): the gradient is F's, as without inplace_backward, in the same
    layout; it had been the untouched logits (not applied on the row path)."""
    for placements, shape, targets in (([Shard(0)], (1, 10), None),
                                       ([Replicate()], (6, 10), [Shard(0)])):
        plain, _ = check_ce(ctx, placements, shape=shape, target_placements=targets,
                            expect_grad_placements=...)
        check_ce(ctx, placements, shape=shape, target_placements=targets,
                 inplace_backward=True, expect_grad_placements=plain.grad.placements)


case("rows_kdim_spatial_shard")(lambda ctx: check_ce(ctx, [Shard(2)], shape=(2, 6, 8),
                                                     target_placements=[Shard(1)]))
case("rows_replicated")(lambda ctx: check_ce(ctx, [Replicate()], label_smoothing=0.1))
case("rows_2d_mesh")(lambda ctx: check_ce(ctx, [Shard(0), Replicate()], mesh=ctx.mesh2d,
                                          shape=(8, 10), reduction="sum"))
case("rows_focal")(lambda ctx: check_ce(ctx, ROWS, fn=_focal, oracle=_focal_oracle,
                                        gamma=2.0, alpha=0.5))


@case("rows_memory_is_the_local_gradient")
def _(ctx):
    """Rows split over ranks: forward+backward allocates each rank's own gradient, also when
    the loss is scaled before backward (the fused gradient is rescaled in place)."""
    from benchmarks import memory
    from torchloss_fused import _backend
    local = torch.randn(512, 16384)
    xd = DTensor.from_local(local, ctx.mesh, ROWS).requires_grad_()
    td = DTensor.from_local(torch.randint(0, 16384, (512,)), ctx.mesh, ROWS)

    def step():
        (tlf.cross_entropy(xd, td) * 0.5).backward()
        xd.grad = None

    step()
    peak = memory.peak_extra_bytes(step, torch.device("cpu"), method="profiler")
    slack = (4 if _backend.has_kernels("cpu") else 96) * 2**20
    assert peak <= local.numel() * 4 + slack, peak / 2**20


@case("rows_sigmoid_focal")
def _(ctx):
    torch.manual_seed(3)
    x, t = torch.randn(8, 5, dtype=torch.float64), (torch.rand(8, 5) > 0.5).double()
    for placements in ([Shard(0)], [Shard(1)], [Replicate()]):
        for reduction in ("none", "mean", "sum"):
            xd = _dist(x, ctx.mesh, placements, requires_grad=True)
            loss = tlf.sigmoid_focal_loss(xd, _dist(t, ctx.mesh, placements), reduction=reduction)
            gd, g = _upstream(loss, ctx.mesh)
            (loss.backward() if gd is None else (loss * gd).sum().backward())
            x64 = x.clone().requires_grad_()
            ref = reference.sigmoid_focal_loss_torchvision(x64, t, reduction=reduction)
            (ref * g).sum().backward()
            what = f"{placements} {reduction}"
            _close(loss, ref, torch.float64, what)
            _close(xd.grad, x64.grad, torch.float64, what + " grad")


# ---- torch.compile ----------------------------------------------------------------------------


@case("compile_rows_fullgraph_and_vocab_with_a_graph_break")
def _(ctx):
    for placements, fullgraph in (([Shard(0)], True), (VOCAB, False)):
        torch._dynamo.reset()
        torch.manual_seed(5)
        x, t = torch.randn(8, 10, dtype=torch.float64), torch.randint(0, 10, (8,))
        xd = _dist(x, ctx.mesh, placements, requires_grad=True)
        td = _dist(t, ctx.mesh, [p if p.is_shard(0) else Replicate() for p in placements])
        fn = torch.compile(tlf.cross_entropy, fullgraph=fullgraph, backend="aot_eager")
        loss = fn(xd, td, label_smoothing=0.1)
        loss.backward()
        x64 = x.clone().requires_grad_()
        ref = F.cross_entropy(x64, t, label_smoothing=0.1)
        ref.backward()
        _close(loss, ref, torch.float64, f"{placements} loss")
        _close(xd.grad, x64.grad, torch.float64, f"{placements} grad")
        assert xd.grad.placements == xd.placements
    # A vocabulary-sharded LM head: eager behind a graph break, as class-sharded logits.
    torch._dynamo.reset()
    h, w, t = torch.randn(6, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64), \
        torch.randint(0, 9, (6,))
    hd = _dist(h, ctx.mesh, [Replicate()], requires_grad=True)
    wd = _dist(w, ctx.mesh, [Shard(0)], requires_grad=True)
    fn = torch.compile(tlf.linear_cross_entropy, backend="aot_eager")
    fn(hd, wd, _dist(t, ctx.mesh, [Replicate()])).backward()
    h64, w64 = h.clone().requires_grad_(), w.clone().requires_grad_()
    F.cross_entropy(F.linear(h64, w64), t).backward()
    _close(wd.grad, w64.grad, torch.float64, "linear, vocab-sharded head: grad weight")
    _close(hd.grad, h64.grad, torch.float64, "linear, vocab-sharded head: grad hidden")


# ---- linear cross-entropy: tokens split over ranks, the LM head replicated --------------------


def check_linear(ctx, hidden_placements, weight_placements, reduction="mean", bias=True,
                 mesh=None, dtype=torch.float64, shape=(10, 6, 9), chunk_size=None,
                 class_weight_placements=None, **kwargs):
    """tlf.linear_cross_entropy on DTensors equals the oracle on the whole tensors (values,
    and gradients of hidden, weight and bias). class_weight_placements: pass fresh class
    weights laid out so."""
    mesh = mesh or ctx.mesh
    torch.manual_seed(4)
    N, H, V = shape
    h, w = torch.randn(N, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64)
    b = torch.randn(V, dtype=torch.float64) if bias else None
    cw = (torch.rand(V, dtype=torch.float64) * 2.5 + 0.25 if class_weight_placements
          else None)
    h, w, b, cw = (None if v is None else v.to(dtype) for v in (h, w, b, cw))
    t = torch.randint(0, V, (N,))
    t[3] = kwargs.get("ignore_index", -100)
    hd = _dist(h, mesh, hidden_placements, requires_grad=True)
    wd = _dist(w, mesh, weight_placements, requires_grad=True)
    bd = None if b is None else _dist(b, mesh, weight_placements, requires_grad=True)
    td = _dist(t, mesh, [p if p.is_shard(0) else Replicate() for p in hidden_placements])
    cwd = None if cw is None else _dist(cw, mesh, class_weight_placements)
    loss = tlf.linear_cross_entropy(hd, wd, td, bd, reduction=reduction,
                                    chunk_size=chunk_size, class_weight=cwd, **kwargs)
    gd, g = _upstream(loss, mesh)
    (loss.backward() if gd is None else (loss * gd).sum().backward())
    leaves = [v.double().requires_grad_() for v in (h, w) + ((b,) if bias else ())]
    ref, _ = oracle_cross_entropy(F.linear(*leaves), t, weight=cw, reduction=reduction,
                                  **kwargs)
    (ref * g).sum().backward()
    _close(loss, ref, dtype, "loss")
    # Gradients keep their tensor's layout, or are partial sums (each rank's part) until
    # something reduces them, as DTensor's own F.linear leaves them.
    for name, ours, leaf in zip(("hidden", "weight", "bias"), (hd, wd, bd), leaves):
        _close(ours.grad, leaf.grad, dtype, f"grad {name}")
        assert all(gp == p or gp.is_partial() for gp, p in zip(
            ours.grad.placements, ours.placements)), (name, ours.grad.placements)
    return hd, wd, bd


for _red in ("mean", "sum", "none"):
    case(f"linear_rows_{_red}")(lambda ctx, r=_red: check_linear(
        ctx, [Shard(0)], [Replicate()], reduction=r, label_smoothing=0.1))
case("linear_replicated")(lambda ctx: check_linear(ctx, [Replicate()], [Replicate()],
                                                   bias=False))
# Class weights: a replicated per-class vector on the ranks' rows.
for _red in ("mean", "sum", "none"):
    case(f"linear_rows_class_weight_{_red}")(lambda ctx, r=_red: check_linear(
        ctx, [Shard(0)], [Replicate()], reduction=r, class_weight_placements=[Replicate()],
        label_smoothing=0.1, z_loss=1e-2, ignore_index=2))
case("linear_rows_class_weight_2d_mesh_bf16")(lambda ctx: check_linear(
    ctx, [Shard(0), Replicate()], [Replicate(), Replicate()], mesh=ctx.mesh2d,
    dtype=torch.bfloat16, shape=(12, 8, 64), chunk_size=5,
    class_weight_placements=[Replicate(), Replicate()]))

# A vocabulary-sharded LM head (ColwiseParallel): the vocabulary stays split. V=9 over 4
# ranks is uneven (3, 3, 3, 0): one rank holds no classes.
VOCAB_HEAD = ([Replicate()], [Shard(0)])
for _red in ("mean", "sum", "none"):
    case(f"linear_vocab_{_red}")(lambda ctx, r=_red: check_linear(ctx, *VOCAB_HEAD,
                                                                  reduction=r))
case("linear_vocab_smoothing_softcap_z_loss")(lambda ctx: check_linear(
    ctx, *VOCAB_HEAD, label_smoothing=0.2, softcap=3.0, z_loss=1e-2))
case("linear_vocab_softcap_no_bias")(lambda ctx: check_linear(ctx, *VOCAB_HEAD, bias=False,
                                                              softcap=2.0))
case("linear_vocab_chunks")(lambda ctx: check_linear(ctx, *VOCAB_HEAD, chunk_size=3,
                                                     shape=(11, 5, 16), label_smoothing=0.1))
case("linear_vocab_bf16")(lambda ctx: check_linear(ctx, *VOCAB_HEAD, dtype=torch.bfloat16,
                                                   shape=(12, 8, 64)))
case("linear_vocab_hidden_split_too")(lambda ctx: check_linear(ctx, [Shard(0)], [Shard(0)]))
case("linear_vocab_2d_mesh")(lambda ctx: check_linear(
    ctx, [Shard(0), Replicate()], [Replicate(), Shard(0)], mesh=ctx.mesh2d, shape=(8, 6, 10),
    label_smoothing=0.1))
# Class weights with the vocabulary split: each slice weighs its own classes, the
# normalisers (the smoothing's summed weights, the targets' weights) are the whole
# vocabulary's. ignore_index 4 is a class of one slice (it must count nowhere, its weight
# neither); a class_weight split like the head is taken whole.
for _red in ("mean", "sum", "none"):
    case(f"linear_vocab_class_weight_{_red}")(lambda ctx, r=_red: check_linear(
        ctx, *VOCAB_HEAD, reduction=r, class_weight_placements=[Replicate()], ignore_index=4))
    case(f"linear_vocab_class_weight_smoothing_{_red}")(lambda ctx, r=_red: check_linear(
        ctx, *VOCAB_HEAD, reduction=r, class_weight_placements=[Replicate()],
        label_smoothing=0.2, z_loss=1e-2, softcap=3.0))
case("linear_vocab_class_weight_sharded_chunks")(lambda ctx: check_linear(
    ctx, *VOCAB_HEAD, chunk_size=3, shape=(11, 5, 16), class_weight_placements=[Shard(0)],
    label_smoothing=0.1, ignore_index=4))
case("linear_vocab_class_weight_bf16")(lambda ctx: check_linear(
    ctx, *VOCAB_HEAD, dtype=torch.bfloat16, shape=(12, 8, 64), label_smoothing=0.1,
    class_weight_placements=[Replicate()]))
case("linear_vocab_class_weight_2d_mesh")(lambda ctx: check_linear(
    ctx, [Shard(0), Replicate()], [Replicate(), Shard(0)], mesh=ctx.mesh2d, shape=(8, 6, 10),
    class_weight_placements=[Replicate(), Replicate()], label_smoothing=0.1))


@case("linear_class_weight_requiring_grad")
def _(ctx):
    """As tlf.cross_entropy's weight: a gradient for it too (through the logits, gathered
    where the head splits the vocabulary), with the other gradients unchanged."""
    torch.manual_seed(8)
    N, H, V = 10, 6, 9
    h, w = torch.randn(N, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64)
    t = torch.randint(0, V, (N,))
    t[2] = -100
    cw = torch.rand(V, dtype=torch.float64) * 2.5 + 0.25
    h64, w64, cw64 = (v.clone().requires_grad_() for v in (h, w, cw))
    # (F.cross_entropy has no gradient for its weight: its formula, written out.)
    logp = torch.log_softmax(F.linear(h64, w64), 1)
    valid = t != -100
    w_t = torch.where(valid, cw64[t.clamp_min(0)], 0)
    ref = -(w_t * logp.gather(1, t.clamp_min(0)[:, None])[:, 0]).sum() / w_t.sum()
    ref.backward()
    _close(ref, F.cross_entropy(F.linear(h, w), t, weight=cw), torch.float64, "formula")
    for hp, wp in (([Shard(0)], [Replicate()]), VOCAB_HEAD):
        hd = _dist(h, ctx.mesh, hp, requires_grad=True)
        wd = _dist(w, ctx.mesh, wp, requires_grad=True)
        cwd = _dist(cw, ctx.mesh, [Replicate()], requires_grad=True)
        td = _dist(t, ctx.mesh, [p if p.is_shard(0) else Replicate() for p in hp])
        loss = tlf.linear_cross_entropy(hd, wd, td, class_weight=cwd, chunk_size=3)
        loss.backward()
        _close(loss, ref, torch.float64, f"{wp} loss")
        for name, ours, leaf in (("hidden", hd, h64), ("weight", wd, w64),
                                 ("class_weight", cwd, cw64)):
            _close(ours.grad, leaf.grad, torch.float64, f"{wp} grad {name}")


@case("linear_module_plain_class_weight_buffer")
def _(ctx):
    """The module's plain class_weight buffer works with DTensor inputs (as a replicated
    DTensor); the functional form stays strict about a plain class_weight."""
    torch.manual_seed(9)
    N, H, V = 10, 6, 9
    h, w = torch.randn(N, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64)
    t = torch.randint(0, V, (N,))
    cw = torch.rand(V, dtype=torch.float64) * 2.5 + 0.25
    h64, w64 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.cross_entropy(F.linear(h64, w64), t, weight=cw, label_smoothing=0.1)
    ref.backward()
    mod = tlf.LinearCrossEntropyLoss(label_smoothing=0.1, class_weight=cw)
    for hp, wp in (([Shard(0)], [Replicate()]), VOCAB_HEAD):
        hd = _dist(h, ctx.mesh, hp, requires_grad=True)
        wd = _dist(w, ctx.mesh, wp, requires_grad=True)
        td = _dist(t, ctx.mesh, [p if p.is_shard(0) else Replicate() for p in hp])
        loss = mod(hd, wd, td)
        loss.backward()
        _close(loss, ref, torch.float64, f"{wp} loss")
        _close(hd.grad, h64.grad, torch.float64, f"{wp} grad hidden")
        _close(wd.grad, w64.grad, torch.float64, f"{wp} grad weight")
        try:
            tlf.linear_cross_entropy(hd, wd, td, class_weight=cw)
        except TypeError as e:
            assert "DTensor" in str(e) and "class_weight" in str(e), e
        else:
            raise AssertionError("a plain class_weight with DTensor inputs raised nothing")


@case("linear_vocab_keeps_the_weight_split")
def _(ctx):
    """No gather of the weight, the logits or the weight's gradient: the only collectives
    are all-reduces of per-row numbers."""
    torch.manual_seed(6)
    N, H, V = 16, 8, 64
    hd = _dist(torch.randn(N, H), ctx.mesh, [Replicate()], requires_grad=True)
    wd = _dist(torch.randn(V, H), ctx.mesh, [Shard(0)], requires_grad=True)
    bd = _dist(torch.randn(V), ctx.mesh, [Shard(0)], requires_grad=True)
    td = _dist(torch.randint(0, V, (N,)), ctx.mesh, [Replicate()])
    with CommDebugMode() as comm:
        tlf.linear_cross_entropy(hd, wd, td, bd, label_smoothing=0.1).backward()
    counts = {str(k): v for k, v in comm.get_comm_counts().items()}
    assert not any("gather" in k or "scatter" in k for k in counts), counts
    assert wd.grad.placements == wd.placements and bd.grad.placements == bd.placements
    assert wd.grad.to_local().shape == wd.to_local().shape


@case("linear_vocab_memory")
def _(ctx):
    """Per rank: one chunk of the slice's logits and the gradients, never the slice's whole
    logits (128 MiB here) nor the whole weight."""
    from benchmarks import memory
    from torchloss_fused import _backend
    N, H, V = 2048, 256, 65536
    hd = _dist(torch.randn(N, H), ctx.mesh, [Replicate()], requires_grad=True)
    # Scaled as an LM head is (logits of std 2): unscaled, most probabilities are float32
    # denormals, and the matmuls of the backward run 20x slower on x86 CPUs.
    w_local = torch.randn(V // ctx.world, H) * (2 / H ** 0.5)
    wd = DTensor.from_local(w_local, ctx.mesh, [Shard(0)]).requires_grad_()
    td = _dist(torch.randint(0, V, (N,)), ctx.mesh, [Replicate()])

    def step():
        tlf.linear_cross_entropy(hd, wd, td).backward()
        hd.grad = wd.grad = None

    step()
    peak = memory.peak_extra_bytes(step, torch.device("cpu"), method="profiler")
    slice_logits = N * (V // ctx.world) * 4
    # (kernels: 50 MiB here, a 32 MiB chunk and the gradients; the fallback's ops add
    # their float32 chunks: 98 MiB)
    limit = slice_logits / 2 if _backend.has_kernels("cpu") else slice_logits
    assert peak < limit, (peak / 2**20, slice_logits / 2**20)


# ---- float32 far from zero: as accurate as F at any logit magnitude --------------------------
# The slices' lses are combined in float64 (../torchloss_fused/vocab_parallel.py), so the
# sharded loss and gradient keep F's accuracy where a float32 lse loses an ulp of it
# (6e-5 at 1000). Ours, against the float64 oracle, within twice F's float32 error plus
# an ulp of the value (tests/test_lse_precision.py allows 4 for the unsharded paths; here
# 4 would pass a smoothing sum whose slices' weight totals were rounded apart: 8e-6
# against F's 1.3e-6).


def _within_f32(ours, f32, exact, what):
    ours = ours.full_tensor() if isinstance(ours, DTensor) else ours
    assert_as_accurate_as_f(ours, f32, exact, what, ulps=1)


def check_far_from_zero(ctx, fn, ref_fn, prob=False, weight=False, offset=1000.0, **kwargs):
    """fn(x, t, weight=..., **kwargs) on float32 logits (16, 400) near `offset`, split over
    the classes, against ref_fn (F's formula) in float32 and float64 on the whole tensors:
    per-row values (reduction="none") under a random upstream gradient."""
    torch.manual_seed(11)
    N, C = 16, 400
    x = (torch.randn(N, C, dtype=torch.float64) * 3 + offset).float()
    t = torch.softmax(torch.randn(N, C), 1) if prob else torch.randint(0, C, (N,))
    w = torch.rand(C) + 0.5 if weight else None
    g = torch.rand(N, dtype=torch.float64) + 0.5
    xd = _dist(x, ctx.mesh, VOCAB, requires_grad=True)
    td = _dist(t, ctx.mesh, VOCAB if prob else [Replicate()])
    wd = None if w is None else _dist(w, ctx.mesh, [Replicate()])
    loss = fn(xd, td, weight=wd, **kwargs)
    (loss * distribute_tensor(g.float(), ctx.mesh, loss.placements)).sum().backward()
    refs = []
    for dtype in (torch.float32, torch.float64):
        xr = x.to(dtype, copy=True).requires_grad_()
        ref = ref_fn(xr, t.to(dtype) if prob else t,
                     weight=None if w is None else w.to(dtype), **kwargs)
        (ref * g.to(dtype)).sum().backward()
        refs.append((ref.detach(), xr.grad))
    _within_f32(loss, refs[0][0], refs[1][0], "loss")
    _within_f32(xd.grad, refs[0][1], refs[1][1], "grad")


def _ce_none(x, t, **kw):
    return tlf.cross_entropy(x, t, reduction="none", **kw)


def _f_ce_none(x, t, **kw):
    return F.cross_entropy(x, t, reduction="none", **kw)


def _ce_and_lse(x, t, weight=None):
    """The loss plus half the lse: the backward takes a gradient for the lse too."""
    loss, lse = tlf.cross_entropy(x, t, weight=weight, reduction="none", return_lse=True)
    return loss + 0.5 * lse


def _f_ce_and_lse(x, t, weight=None):
    return F.cross_entropy(x, t, weight=weight, reduction="none") + 0.5 * torch.logsumexp(x, 1)


def _focal_none(x, t, weight=None):
    return tlf.focal_loss(x, t, gamma=2.0, reduction="none")


def _f_focal_none(x, t, weight=None):  # the focal loss's formula in x's dtype
    log_pt = torch.log_softmax(x, 1).gather(1, t[:, None]).squeeze(1)
    return -(1 - log_pt.exp()) ** 2 * log_pt


case("precise_vocab_ce")(lambda ctx: check_far_from_zero(ctx, _ce_none, _f_ce_none))
case("precise_vocab_ce_weight_smoothing")(lambda ctx: check_far_from_zero(
    ctx, _ce_none, _f_ce_none, weight=True, label_smoothing=0.1))
case("precise_vocab_ce_prob_target_smoothing")(lambda ctx: check_far_from_zero(
    ctx, _ce_none, _f_ce_none, prob=True, label_smoothing=0.1))
case("precise_vocab_ce_return_lse")(lambda ctx: check_far_from_zero(ctx, _ce_and_lse,
                                                                    _f_ce_and_lse))
case("precise_vocab_focal")(lambda ctx: check_far_from_zero(ctx, _focal_none, _f_focal_none))


def check_linear_far_from_zero(ctx, prob=False, offset=1000.0, **kwargs):
    """linear_cross_entropy with a vocabulary-sharded head (the offset from its bias), per
    row, against F.cross_entropy(F.linear(...)) in float32 and float64."""
    torch.manual_seed(12)
    N, H, V = 16, 8, 400
    h, w = torch.randn(N, H), torch.randn(V, H) * (3 / H ** 0.5)
    b = torch.full((V,), offset)
    t = torch.softmax(torch.randn(N, V), 1) if prob else torch.randint(0, V, (N,))
    g = torch.rand(N, dtype=torch.float64) + 0.5
    hd = _dist(h, ctx.mesh, [Replicate()], requires_grad=True)
    wd = _dist(w, ctx.mesh, [Shard(0)], requires_grad=True)
    bd = _dist(b, ctx.mesh, [Shard(0)], requires_grad=True)
    td = _dist(t, ctx.mesh, [Shard(1)] if prob else [Replicate()])
    loss = tlf.linear_cross_entropy(hd, wd, td, bd, reduction="none", chunk_size=5, **kwargs)
    (loss * distribute_tensor(g.float(), ctx.mesh, loss.placements)).sum().backward()
    refs = []
    for dtype in (torch.float32, torch.float64):
        leaves = [v.to(dtype, copy=True).requires_grad_() for v in (h, w, b)]
        ref = F.cross_entropy(F.linear(*leaves), t.to(dtype) if prob else t,
                              reduction="none", **kwargs)
        (ref * g.to(dtype)).sum().backward()
        refs.append((ref.detach(), *(v.grad for v in leaves)))
    for what, ours, f32, exact in zip(("loss", "grad hidden", "grad weight", "grad bias"),
                                      (loss, hd.grad, wd.grad, bd.grad), *refs):
        _within_f32(ours, f32, exact, what)


case("precise_linear_vocab")(lambda ctx: check_linear_far_from_zero(ctx))
case("precise_linear_vocab_smoothing")(lambda ctx: check_linear_far_from_zero(
    ctx, label_smoothing=0.1))
case("precise_linear_vocab_prob_target")(lambda ctx: check_linear_far_from_zero(ctx, prob=True))


# ---- driver ----------------------------------------------------------------------------------


def _run(rank: int, world: int, out_dir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    ctx = Ctx(rank, world)
    results = {}
    only = os.environ.get("DTENSOR_CASES")  # a substring, to run a few cases by hand
    for name, fn in CASES.items():
        if only and only not in name:
            continue
        torch.manual_seed(1234)  # every rank draws the same case inputs, whatever ran before
        try:
            fn(ctx)
            results[name] = "ok"
        except Exception:  # recorded, reported by the test of this case
            results[name] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    out, world = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4
    mp.spawn(_run, args=(world, out, _free_port()), nprocs=world)
