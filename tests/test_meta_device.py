"""Meta tensors (no storage: used to trace shapes and to build models before allocating
them) go through every loss as through F: the same output shapes and dtypes, and
gradients of the inputs' shapes and dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchloss_fused as tlf

from .helpers import random_targets

N, C, H = 6, 11, 8


def _inputs(dtype):
    """CPU tensors; each case runs on them and on meta copies of them."""
    x = torch.randn(N, C, dtype=dtype)
    return {
        "x": x,
        "x4": torch.randn(2, C, 3, 2, dtype=dtype),
        "t": random_targets((N,), C, "cpu"),
        "t4": random_targets((2, 3, 2), C, "cpu"),
        "p": torch.softmax(torch.randn(N, C), 1).to(dtype),
        "s": torch.rand(N, C, dtype=dtype),
        "w": torch.rand(C, dtype=dtype) + 0.5,
        "h": torch.randn(N, H, dtype=dtype),
        "lw": torch.randn(C, H, dtype=dtype),
        "b": torch.randn(C, dtype=dtype),
    }


CASES = {
    "ce": lambda a: tlf.cross_entropy(a["x"], a["t"]),
    "ce_none_options": lambda a: tlf.cross_entropy(
        a["x"], a["t"], a["w"], reduction="none", label_smoothing=0.1, z_loss=1e-3,
        softcap=5.0, logit_scale=0.5),
    "ce_sum_return_lse": lambda a: tlf.cross_entropy(a["x"], a["t"], reduction="sum",
                                                     return_lse=True),
    "ce_probabilities": lambda a: tlf.cross_entropy(a["x"], a["p"]),
    "ce_spatial": lambda a: tlf.cross_entropy(a["x4"], a["t4"], reduction="none"),
    "ce_inplace": lambda a: tlf.cross_entropy(a["x"].clone(), a["t"], inplace_backward=True),
    "focal": lambda a: tlf.focal_loss(a["x"], a["t"], alpha=a["w"], gamma=2.0),
    "focal_none": lambda a: tlf.focal_loss(a["x"], a["t"], reduction="none"),
    "sigmoid_focal": lambda a: tlf.sigmoid_focal_loss(a["x"], a["s"], reduction="mean"),
    "sigmoid_focal_none": lambda a: tlf.sigmoid_focal_loss(a["x"], a["s"]),
    "linear_ce": lambda a: tlf.linear_cross_entropy(a["h"], a["lw"], a["t"], a["b"]),
    "linear_ce_chunked_none": lambda a: tlf.linear_cross_entropy(
        a["h"], a["lw"], a["t"], reduction="none", z_loss=1e-3, chunk_size=4),
    "linear_ce_probabilities": lambda a: tlf.linear_cross_entropy(a["h"], a["lw"], a["p"]),
    "module": lambda a: tlf.CrossEntropyLoss(weight=a["w"])(a["x"], a["t"]),
}

_GRAD_INPUTS = ("x", "x4", "h", "lw", "b")


def _run(case, inputs):
    for k in _GRAD_INPUTS:
        inputs[k].requires_grad_(True)
    out = CASES[case](inputs)
    outs = out if isinstance(out, tuple) else (out,)
    sum(o.float().sum() for o in outs).backward()
    grads = {k: inputs[k].grad for k in _GRAD_INPUTS if inputs[k].grad is not None}
    return outs, grads


def _signature(outs, grads):
    return ([(o.shape, o.dtype) for o in outs],
            {k: (g.shape, g.dtype) for k, g in grads.items()})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_meta_tensors_give_the_shapes_and_dtypes_of_a_real_call(case, dtype, backend):
    cpu = _inputs(dtype)
    meta = {k: v.to("meta") for k, v in cpu.items()}
    meta_outs, meta_grads = _run(case, meta)
    cpu_outs, cpu_grads = _run(case, cpu)
    assert all(o.device.type == "meta" for o in meta_outs)
    assert all(g.device.type == "meta" for g in meta_grads.values())
    assert _signature(meta_outs, meta_grads) == _signature(cpu_outs, cpu_grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_meta_cross_entropy_matches_f(dtype):
    x = torch.randn(N, C, dtype=dtype, device="meta")
    t = torch.randint(0, C, (N,), device="meta")
    for reduction in ("mean", "none"):
        ours, ref = (f(x, t, reduction=reduction) for f in (tlf.cross_entropy, F.cross_entropy))
        assert (ours.shape, ours.dtype, ours.device) == (ref.shape, ref.dtype, ref.device)


def test_meta_under_cpu_autocast_keeps_the_dtype_as_f_does():
    """Autocast for CPU does not touch meta tensors; F keeps bfloat16, so do we (asking
    torch whether autocast is on for meta raised before)."""
    x = torch.randn(N, C, dtype=torch.bfloat16, device="meta")
    t = torch.randint(0, C, (N,), device="meta")
    w = torch.randn(C, H, dtype=torch.bfloat16, device="meta")
    h = torch.randn(N, H, dtype=torch.bfloat16, device="meta")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(x, t)
        assert tlf.cross_entropy(x, t).dtype == ref.dtype
        assert (tlf.linear_cross_entropy(h, w, t).dtype
                == F.cross_entropy(F.linear(h, w), t).dtype)
