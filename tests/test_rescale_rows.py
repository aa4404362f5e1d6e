"""_rescale_grad_rows, the fused ops' backward: each row of the gradient made for grad_scale
times grad_loss / grad_scale, rounded once to the gradient's dtype (as a multiplication in
the accumulation dtype rounds it), rows that received the expected gradient (or were made
for a non-finite scale: 1/0, or _reduction.mean_denominator's nan) left as they are.
Checked bit for bit against that formula in ATen for every dtype and the layouts the
kernels take: vector rows with a tail, strided rows, (B, C, D) planes, padded rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchloss_fused as tlf
from torchloss_fused import _backend

from .helpers import assert_matches

pytestmark = pytest.mark.skipif(not _backend.EXTENSION_LOADED,
                                reason="compiled extension not loaded")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _layouts(B, C, D, dtype, device):
    """(name, (B, C, D) gradient) in the layouts a gradient can reach the op with."""
    def fresh(*shape):
        return (torch.randn(*shape, dtype=torch.float64) * 3).to(device=device, dtype=dtype)
    yield "contiguous", fresh(B, C, 1)
    yield "planes", fresh(B, C, D)
    yield "class-strided", fresh(C, B).t().unsqueeze(2)
    yield "padded-rows", fresh(B, C + 9, 1)[:, 4:C + 4]
    yield "planes-strided", fresh(B, D, C).permute(0, 2, 1)


def _per_row(grad, dtype, device):
    """(grad_loss, grad_scale): most rows as expected, the others scaled by a mix of
    factors, zero, a negative, NaN, and rows made for an infinite and a NaN scale."""
    B, _, D = grad.shape
    acc = _acc(dtype)
    scale = (torch.rand(B, D, dtype=acc) + 0.5).to(device)
    g = scale.clone()
    flat_g, flat_s = g.view(-1), scale.view(-1)
    n = flat_g.numel()
    pick = torch.randperm(n)[: max(1, n // 3)].to(device)
    flat_g[pick] = (torch.randn(pick.numel(), dtype=acc) * 2).to(device)
    specials = [0.0, -1.0, float("nan"), 2.0]
    for i, v in enumerate(specials[: n]):
        flat_g[i] = v
    if n > len(specials):
        flat_s[len(specials)] = float("inf")  # a mean over no counted target: kept as made
        flat_g[len(specials)] = 0.5
    if n > len(specials) + 1:
        # a weighted two-term mean over targets weighing 0 (nan): kept as made (its
        # ignored rows' zeros had become nan)
        flat_s[len(specials) + 1] = float("nan")
        flat_g[len(specials) + 1] = 0.5
    return g, scale


def _expected(grad, g, s):
    acc = g.dtype
    factor = torch.where((g == s) | ~s.isfinite(), torch.ones_like(g), g / s)
    return (grad.to(acc) * factor.unsqueeze(1)).to(grad.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C,D", [(7, 1003, 3), (5, 64, 2), (3, 5, 4), (1, 1, 1)])
def test_rescale_rows_bitwise_as_a_multiplication(device, dtype, B, C, D):
    ops = torch.ops.torchloss_fused
    for name, grad in _layouts(B, C, D, dtype, device):
        g, s = _per_row(grad, dtype, device)
        want = _expected(grad, g, s)
        got = grad.clone() if name == "contiguous" else grad
        before = got.clone()
        ops._rescale_grad_rows(got, g, s)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True,
                                   msg=f"{name} {tuple(grad.shape)}")
        # rows that keep their gradient are not touched at all (the same bits, NaNs too)
        keep = ((g == s) | ~s.isfinite()).unsqueeze(1).expand_as(got)
        assert torch.equal(_bits(got[keep]), _bits(before[keep])), name


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.dtype.itemsize])


def test_rescale_rows_through_the_public_api(device):
    # A per-row weighted unreduced loss in bf16: the fused gradient rescaled row by row,
    # against the float64 oracle as closely as eager F in bf16 comes.
    x = (torch.randn(64, 3001, dtype=torch.float64, device=device) * 3).to(torch.bfloat16)
    t = torch.randint(0, 3001, (64,), device=device)
    w = torch.rand(64, device=device) + 0.5
    w[::3] = 1.0
    grads = []
    for fn, dtype in ((tlf.cross_entropy, torch.bfloat16), (F.cross_entropy, torch.bfloat16),
                      (F.cross_entropy, torch.float64)):
        xi = x.to(dtype).requires_grad_()
        (g,) = torch.autograd.grad((fn(xi, t, reduction="none") * w.to(dtype)).sum(), xi)
        grads.append(g)
    ours, eager, oracle = grads
    assert_matches(ours, oracle, eager=eager, what="weighted rows' gradient")
