"""bf16 / fp16 results of the C++ kernels are their float32 results, rounded once as PyTorch
rounds.

The CPU kernels widen bf16 / fp16 inputs to float exactly, compute in float and round each
result once on the way out. So a bf16 / fp16 call must give, bit for bit, the float32 call
on the same widened inputs rounded by `Tensor.to`: here with rows whose results are partly
subnormal, in whole vectors and in single lanes (a faster rounding that flushes subnormals,
such as AVX512_BF16's vcvtne2ps2bf16, or a result rounded twice, fails this).
"""

from __future__ import annotations

import pytest
import torch

import torchloss_fused as tlf
from torchloss_fused import _backend

pytestmark = pytest.mark.skipif(not _backend.EXTENSION_LOADED,
                                reason="compiled extension not loaded")

REDUCED = [torch.bfloat16, torch.float16]
# The AVX2 exponential flushes results below 2^-127 to zero: only AVX-512's gives float
# subnormals for the rounding to meet.
_AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _keeps_subnormals() -> bool:
    """Whether this process computes float subnormals: loading a library built with
    -ffast-math turns on flush-to-zero for good (torch 2.4's inductor CPU kernels do, so
    any earlier torch.compile test in the same worker), and then no result is subnormal."""
    return float(torch.tensor(1e-20) * torch.tensor(1e-20)) != 0.0


def _same_bits(ours: torch.Tensor, want: torch.Tensor) -> bool:
    return torch.equal(ours.view(torch.int16), want.view(torch.int16))


def _subnormal_count(t: torch.Tensor) -> int:
    tiny = torch.finfo(t.dtype).tiny
    return int(((t.float().abs() < tiny) & (t != 0)).sum())


def _logits(dtype: torch.dtype, n: int, c: int) -> torch.Tensor:
    """Logits whose gradients are partly subnormal in bf16 (exp of about -90 to -100 below
    the row's lse): whole 32-class runs, and every third or fifth class elsewhere."""
    x = torch.randn(n, c) * 4
    x[1, :96] = -78.0
    x[2, 1::3] = -80.0
    x[3, 2::5] = -79.5
    return x.to(dtype)


def _grad(fn, x: torch.Tensor, *args, **kwargs):
    leaf = x.detach().clone().requires_grad_()
    out = fn(leaf, *args, **kwargs)
    (g,) = torch.autograd.grad(out.sum() if out.dim() else out, leaf)
    return out.detach(), g


@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("c", [77, 1000, 4099, 32000])
@pytest.mark.parametrize("kwargs", [{}, {"reduction": "sum"}, {"reduction": "none"},
                                    {"label_smoothing": 0.1}, {"logit_scale": 0.5}],
                         ids=["mean", "sum", "none", "smoothing", "scale"])
def test_cross_entropy_rounds_the_float_result_once(dtype, c, kwargs):
    x = _logits(dtype, 16, c)
    y = torch.randint(0, c, (16,))
    loss, g = _grad(tlf.cross_entropy, x, y, **kwargs)
    loss32, g32 = _grad(tlf.cross_entropy, x.float(), y, **kwargs)
    assert _same_bits(g, g32.to(dtype))
    assert _same_bits(loss.reshape(-1), loss32.to(dtype).reshape(-1))
    if (dtype == torch.bfloat16 and kwargs.get("reduction") == "sum" and c == 1000 and _AVX512
            and _keeps_subnormals()):
        assert _subnormal_count(g) > 0  # the inputs do reach subnormal results


@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_focal_loss_rounds_the_float_result_once(dtype, gamma):
    x = _logits(dtype, 16, 1000)
    y = torch.randint(0, 1000, (16,))
    loss, g = _grad(tlf.focal_loss, x, y, gamma=gamma, reduction="sum")
    loss32, g32 = _grad(tlf.focal_loss, x.float(), y, gamma=gamma, reduction="sum")
    assert _same_bits(g, g32.to(dtype))
    assert _same_bits(loss.reshape(-1), loss32.to(dtype).reshape(-1))


@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_sigmoid_focal_loss_rounds_the_float_result_once(dtype, reduction):
    # Confident negatives (x about -30, target 0) have losses and gradients of about
    # exp(-90): subnormal in bf16.
    x = torch.randn(64, 80) * 3
    x[:8, :40] = -30.0 - torch.rand(8, 40)
    t = (torch.rand(64, 80) < 0.1).float()
    t[:8, :40] = 0
    x, t = x.to(dtype), t.to(dtype)
    loss, g = _grad(tlf.sigmoid_focal_loss, x, t, reduction=reduction)
    loss32, g32 = _grad(tlf.sigmoid_focal_loss, x.float(), t.float(), reduction=reduction)
    assert _same_bits(g, g32.to(dtype))
    assert _same_bits(loss.reshape(-1), loss32.to(dtype).reshape(-1))
    if dtype == torch.bfloat16 and reduction == "none" and _keeps_subnormals():
        assert _subnormal_count(loss) > 0  # the elementwise exp keeps subnormals everywhere
