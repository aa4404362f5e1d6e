"""What only a GPU can show about the CUDA kernels: every kernel shape (thread / warp /
block per row, vector and scalar loads, the shared-memory row cache) against float64
math, more than 2^31 logits, CUDA graphs, devices other than the current one, side
streams, run-to-run determinism and the device-side assert. Skipped without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import torchloss_fused as tlf
from torchloss_fused import _backend

from .helpers import assert_ce_like_oracle, assert_matches

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

OPS = torch.ops.torchloss_fused
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Class counts that reach each kernel: one thread per row (C <= 32), one warp per row (up
# to 4 KiB of logits), one block per row, and rows larger than the shared-memory cache.
CLASS_COUNTS = [1, 3, 32, 33, 1000, 2049, 5003, 50000, 262147]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tol(dtype):
    """assert_close tolerances for results of `dtype` compared in float64."""
    if dtype in (torch.bfloat16, torch.float16):
        return {"rtol": 2e-2, "atol": 2e-3}
    if dtype == torch.float32:
        return {"rtol": 1.3e-6, "atol": 1e-5}
    return {}


def _logits(shape, dtype, layout="contig", scale=3.0):
    """Random logits on the GPU in one of the layouts the kernels treat differently."""
    B, C = shape
    if layout == "contig":
        x = torch.randn(B, C, device="cuda", dtype=torch.float64) * scale
    elif layout == "offset":  # rows start off a 16-byte boundary
        x = (torch.randn(B * C + 1, device="cuda", dtype=torch.float64) * scale)[1:].view(B, C)
    elif layout == "padded":  # rows wider than C, as a sliced vocabulary
        x = (torch.randn(B, C + 5, device="cuda", dtype=torch.float64) * scale)[:, :C]
    elif layout == "class_strided":  # the class dimension is not the contiguous one
        x = (torch.randn(C, B, device="cuda", dtype=torch.float64) * scale).t()
    return x.to(dtype)


def _focal_oracle(x, t, gamma, alpha=None, dtype=torch.float64):
    logp = torch.log_softmax(x.to(dtype), dim=1)
    valid = t != -100
    safe = t.masked_fill(~valid, 0).long()
    log_pt = logp.gather(1, safe.unsqueeze(1)).squeeze(1)
    loss = -((1 - log_pt.exp()) ** gamma) * log_pt
    if alpha is not None:
        loss = loss * alpha.to(dtype)[safe]
    return torch.where(valid, loss, 0)


def test_cuda_kernels_serve_cuda():
    # Otherwise every CUDA test below would be testing the pure-PyTorch fallback.
    info = tlf.backend_info("cuda")
    assert info["implementation"] == "cuda", info
    assert _backend.has_kernels("cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", CLASS_COUNTS)
@pytest.mark.parametrize("layout", ["contig", "offset", "padded", "class_strided"])
def test_cross_entropy_every_kernel_shape(dtype, C, layout):
    if C >= 50000 and layout == "class_strided":
        pytest.skip("strided large rows are covered by the 3-D test")
    B = 64 if C < 5000 else 5
    x = _logits((B, C), dtype, layout)
    t = torch.randint(0, C, (B,), device="cuda")
    t[::7] = -100
    assert_ce_like_oracle(x, t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [3, 1000, 5003, 262147])
def test_cross_entropy_options(dtype, C):
    B = 32 if C < 5000 else 4
    x = _logits((B, C), dtype, "offset")
    t = torch.randint(0, C, (B,), device="cuda")
    t[1] = -100
    # (class-index targets: F.cross_entropy wants the weight in the logits' dtype)
    w = (torch.rand(C, device="cuda", dtype=torch.float64) + 0.5).to(dtype)
    assert_ce_like_oracle(x, t, weight=w, label_smoothing=0.1, z_loss=1e-3)
    assert_ce_like_oracle(x, t, softcap=5.0, logit_scale=0.7)
    p = torch.softmax(torch.randn(B, C, device="cuda", dtype=torch.float64), 1)
    assert_ce_like_oracle(x, p.to(dtype), label_smoothing=0.2)
    if dtype in (torch.bfloat16, torch.float16):
        assert_ce_like_oracle(x, p.float())  # float32 probabilities for half logits


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_3d_class_strided(dtype):
    # (N, C, d) segmentation layout: classes are d apart in memory.
    x = (torch.randn(4, 21, 300, device="cuda", dtype=torch.float64) * 3).to(dtype)
    t = torch.randint(0, 21, (4, 300), device="cuda")
    t[:, ::5] = -100
    x.requires_grad_()
    ours = tlf.cross_entropy(x, t, reduction="none")
    (g,) = torch.autograd.grad(ours.sum(), x)
    xr = x.detach().double().requires_grad_()
    ref = F.cross_entropy(xr, t, reduction="none")
    (gr,) = torch.autograd.grad(ref.sum(), xr)
    torch.testing.assert_close(ours.double(), ref, **_tol(dtype))
    torch.testing.assert_close(g.double(), gr, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [3, 1000, 50000])
@pytest.mark.parametrize("gamma", [0.0, 2.0, 1.5])
def test_focal_against_float64(dtype, C, gamma):
    B = 48 if C < 5000 else 4
    x = _logits((B, C), dtype, "offset").requires_grad_()
    t = torch.randint(0, C, (B,), device="cuda")
    t[0] = -100
    alpha = torch.rand(C, device="cuda", dtype=_acc(dtype)) + 0.5 if gamma == 1.5 else None
    ours = tlf.focal_loss(x, t, gamma=gamma, alpha=alpha, reduction="none")
    (g,) = torch.autograd.grad(ours.sum(), x)
    xr = x.detach().double().requires_grad_()
    ref = _focal_oracle(xr, t, gamma, alpha)
    (gr,) = torch.autograd.grad(ref.sum(), xr)
    xe = x.detach().clone().requires_grad_()
    eager = _focal_oracle(xe, t, gamma, alpha, dtype=dtype)
    (ge,) = torch.autograd.grad(eager.sum(), xe)
    assert_matches(ours.detach(), ref.detach(), eager.detach(), dtype, what="focal loss")
    assert_matches(g, gr, ge, dtype, what="focal grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [3, 1000, 50000])
def test_focal_gamma_zero_equals_cross_entropy_bitwise(dtype, C):
    B = 48 if C < 5000 else 4
    x = _logits((B, C), dtype)
    t = torch.randint(0, C, (B,), device="cuda")
    t[2] = -100
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    fl = tlf.focal_loss(xa, t, gamma=0.0, reduction="none")
    ce = tlf.cross_entropy(xb, t, reduction="none")
    assert torch.equal(fl, ce)
    fl.sum().backward()
    ce.sum().backward()
    assert torch.equal(xa.grad, xb.grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 2.5])
def test_sigmoid_focal_against_float64(dtype, gamma):
    x = (torch.randn(4099 + 1, device="cuda", dtype=torch.float64) * 4).to(dtype)[1:]
    t = (torch.rand(4099, device="cuda") < 0.3).to(dtype)
    x.requires_grad_()
    ours = tlf.sigmoid_focal_loss(x, t, alpha=0.25, gamma=gamma, reduction="none")
    (g,) = torch.autograd.grad(ours.sum(), x)

    def formula(xx, dt):
        xx, tt = xx.to(dt), t.to(dt)
        p = torch.sigmoid(xx)
        ce = F.binary_cross_entropy_with_logits(xx, tt, reduction="none")
        p_t = p * tt + (1 - p) * (1 - tt)
        return (0.25 * tt + 0.75 * (1 - tt)) * ce * (1 - p_t) ** gamma

    xr = x.detach().double().requires_grad_()
    ref = formula(xr, torch.float64)
    (gr,) = torch.autograd.grad(ref.sum(), xr)
    xe = x.detach().clone().requires_grad_()
    eager = formula(xe, dtype)
    (ge,) = torch.autograd.grad(eager.sum(), xe)
    assert_matches(ours.detach(), ref.detach(), eager.detach(), dtype, what="sigmoid focal loss")
    assert_matches(g, gr, ge, dtype, what="sigmoid focal grad")


def _free_bytes():
    free, _ = torch.cuda.mem_get_info()
    return free


def test_more_than_2_31_logits():
    N, V = 16385, 131072  # N * V = 2^31 + 2^17
    need = 2 * N * V * 2 + (1 << 30)
    if _free_bytes() < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    x = torch.empty(N, V, device="cuda", dtype=torch.bfloat16).normal_(0, 2)
    t = torch.randint(0, V, (N,), device="cuda")
    rows = torch.tensor([0, 1, N // 2, N - 2, N - 1], device="cuda")  # N - 1 starts past 2^31
    t[rows] = torch.tensor([0, V - 1, 12345, V // 2, V - 1], device="cuda")
    x.requires_grad_()
    loss = tlf.cross_entropy(x, t, reduction="none")
    grad_out = torch.rand(N, device="cuda", dtype=torch.float32).to(torch.bfloat16) + 0.5
    loss.backward(grad_out)
    xr = x.detach()[rows].double().requires_grad_()
    ref = F.cross_entropy(xr, t[rows], reduction="none")
    ref.backward(grad_out[rows].double())
    torch.testing.assert_close(loss.detach()[rows].double(), ref.detach(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(x.grad[rows].double(), xr.grad, rtol=2e-2, atol=1e-4)
    # The forward-only kernel on the same rows.
    with torch.no_grad():
        loss2 = tlf.cross_entropy(x.detach(), t, reduction="none")
    assert torch.equal(loss2, loss.detach())
    del x, loss, loss2
    torch.cuda.empty_cache()


@pytest.mark.parametrize("loss_name",
                         ["cross_entropy", "soft_cross_entropy", "focal", "sigmoid_focal"])
def test_cuda_graph_capture_forward_backward(loss_name):
    N, C = 256, 5003

    def step(x, t):
        if loss_name in ("cross_entropy", "soft_cross_entropy"):
            loss = tlf.cross_entropy(x, t, label_smoothing=0.1)
        elif loss_name == "focal":
            loss = tlf.focal_loss(x, t, gamma=2.0)
        else:
            loss = tlf.sigmoid_focal_loss(x, t, reduction="mean")
        loss.backward()
        return loss

    def make():
        x = torch.randn(N, C, device="cuda", dtype=torch.bfloat16)
        if loss_name == "sigmoid_focal":
            t = (torch.rand(N, C, device="cuda") < 0.2).to(torch.bfloat16)
        elif loss_name == "soft_cross_entropy":  # (its mean's denominator is made on device)
            t = torch.randn(N, C, device="cuda").softmax(dim=1)
        else:
            t = torch.randint(0, C, (N,), device="cuda")
            t[::9] = -100
        return x, t

    x_static = torch.zeros(N, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    _, t0 = make()
    t_static = t0.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        for _ in range(2):
            step(x_static, t_static)
            x_static.grad = None
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss_static = step(x_static, t_static)
    for _ in range(2):
        x, t = make()
        with torch.no_grad():
            x_static.copy_(x)
            t_static.copy_(t)
        graph.replay()
        torch.cuda.synchronize()
        xe = x.clone().requires_grad_()
        loss_eager = step(xe, t)
        assert torch.equal(loss_static, loss_eager)
        assert torch.equal(x_static.grad, xe.grad)


@pytest.mark.parametrize("soft", [False, True])
def test_cuda_graph_capture_linear_cross_entropy(soft):
    # The chunk loop (products, kernels, grad_weight accumulation) must neither synchronise
    # with the host nor copy from it. chunk_size is given: the default depends on free
    # memory, which the capture's private pool changes.
    N, H, V = 512, 256, 5003
    hidden = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(V, H, device="cuda") * H ** -0.5).to(torch.bfloat16).requires_grad_()

    def make_target():
        if soft:
            return torch.randn(N, V, device="cuda").softmax(dim=1)
        t = torch.randint(0, V, (N,), device="cuda")
        t[::7] = -100
        return t

    t_static = make_target()

    def step(h, w, t):
        loss = tlf.linear_cross_entropy(h, w, t, chunk_size=192, z_loss=1e-4)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        for _ in range(2):
            step(hidden, weight, t_static)
            hidden.grad = weight.grad = None
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss_static = step(hidden, weight, t_static)
    for _ in range(2):
        h, w, t = torch.randn_like(hidden), torch.randn_like(weight) * H ** -0.5, make_target()
        with torch.no_grad():
            hidden.copy_(h)
            weight.copy_(w)
            t_static.copy_(t)
        graph.replay()
        torch.cuda.synchronize()
        he, we = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss_eager = step(he, we, t)
        # (Not bitwise: cuBLAS may pick other kernels on the capture stream.)
        for replayed, eager in ((loss_static, loss_eager), (hidden.grad, he.grad),
                                (weight.grad, we.grad)):
            torch.testing.assert_close(replayed, eager, rtol=2e-2, atol=2e-3)


def test_side_stream():
    # The op must run on the caller's current stream: the input is written on a side
    # stream after a long sleep, and read there.
    N, C = 512, 32000
    x_new = torch.randn(N, C, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, C, (N,), device="cuda")
    expected_loss, expected_lse = OPS.ce_fwd(x_new.view(N, C, 1), t.view(N, 1), None, -100,
                                             0.0, 0.0, 0.0, 1.0, False)
    x = torch.zeros_like(x_new)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        x.copy_(x_new)
        loss, lse = OPS.ce_fwd(x.view(N, C, 1), t.view(N, 1), None, -100, 0.0, 0.0, 0.0, 1.0,
                               False)
        g = torch.ones(N, 1, device="cuda")
        _, _, grad = OPS.ce_fwd_grad(x.view(N, C, 1), t.view(N, 1), None, -100, 0.0, 0.0, 0.0,
                                     1.0, g)
    side.synchronize()
    assert torch.equal(loss, expected_loss)
    assert torch.equal(lse, expected_lse)
    _, _, grad_ref = OPS.ce_fwd_grad(x_new.view(N, C, 1), t.view(N, 1), None, -100, 0.0, 0.0,
                                     0.0, 1.0, g)
    assert torch.equal(grad, grad_ref)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("tensor_dev, current_dev", [(1, 0), (0, 1)])
def test_tensor_on_another_device(tensor_dev, current_dev):
    dev = torch.device("cuda", tensor_dev)
    with torch.cuda.device(current_dev):
        x = torch.randn(64, 5003, device=dev, dtype=torch.float32, requires_grad=True)
        t = torch.randint(0, 5003, (64,), device=dev)
        w = torch.rand(5003, device=dev) + 0.5
        loss = tlf.cross_entropy(x, t, weight=w, label_smoothing=0.1)
        loss.backward()
        fl = tlf.focal_loss(x.detach(), t, gamma=2.0)
        assert loss.device == dev and x.grad.device == dev and fl.device == dev
        xr = x.detach().double().requires_grad_()
        ref = F.cross_entropy(xr, t, weight=w.double(), label_smoothing=0.1)
        ref.backward()
        tol = _tol(torch.float32)
        torch.testing.assert_close(loss.double(), ref.detach(), **tol)
        torch.testing.assert_close(x.grad.double(), xr.grad, **tol)
        torch.testing.assert_close(fl.double(), _focal_oracle(x.detach(), t, 2.0).mean(), **tol)


def test_current_device_unchanged():
    # The launchers switch to the tensor's device under a guard that must restore it.
    before = torch.cuda.current_device()
    x = torch.randn(8, 100, device="cuda:0", requires_grad=True)
    tlf.cross_entropy(x, torch.randint(0, 100, (8,), device="cuda:0")).backward()
    assert torch.cuda.current_device() == before


@pytest.mark.parametrize("C", [3, 1000, 50000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bitwise_deterministic(C, dtype):
    N = 4096 if C < 5000 else 64
    x = _logits((N, C), dtype)
    t = torch.randint(0, C, (N,), device="cuda")
    t[::11] = -100
    w = (torch.rand(C, device="cuda") + 0.5).to(dtype)

    def run():
        out = []
        for kw in ({}, {"weight": w, "label_smoothing": 0.1, "z_loss": 1e-4}):
            xx = x.clone().requires_grad_()
            loss = tlf.cross_entropy(xx, t, reduction="sum", **kw)
            loss.backward()
            out += [loss.detach(), xx.grad]
        xx = x.clone().requires_grad_()
        loss = tlf.focal_loss(xx, t, gamma=2.0, reduction="sum")
        loss.backward()
        out += [loss.detach(), xx.grad]
        with torch.no_grad():
            out.append(tlf.cross_entropy(x, t, reduction="none"))
        return out

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("C", [5003, 262147])
@pytest.mark.parametrize("opts", [
    {},                                               # the folded loop (bf16, A > 0)
    {"neg": True},                                    # the plain loop (A < 0)
    {"eps": 0.1},                                     # the smoothing loop
    {"eps": 0.1, "z": 1e-3, "weight": True},          # the generic loop
    {"softcap": 5.0, "scale": 0.7},                   # the generic loop, transformed
    {"z": 1e-3, "weight": True},                      # the folded loop, weighted
], ids=["folded", "plain", "smooth", "smooth-weighted", "softcap", "z-weighted"])
def test_fused_and_split_paths_agree_bitwise(C, opts):
    """Each pass-2 loop of the kernels (folded, plain, smoothing, generic) is taken by the
    fused forward and by the separate forward / backward alike: the same bits."""
    N = 300 if C < 50000 else 8
    x = _logits((N, C), torch.bfloat16, "padded")
    t = torch.randint(0, C, (N,), device="cuda")
    t[::7] = -100
    x3, t2 = x.unsqueeze(2), t.unsqueeze(1)
    w = (torch.rand(C, device="cuda") + 0.5).to(x.dtype) if opts.get("weight") else None
    args = (-100, opts.get("eps", 0.0), opts.get("z", 0.0), opts.get("softcap", 0.0),
            opts.get("scale", 1.0))
    loss, lse = OPS.ce_fwd(x3, t2, w, *args, False)
    g = torch.full((N, 1), -1 / N if opts.get("neg") else 1 / N, device="cuda")
    loss_f, lse_f, grad_f = OPS.ce_fwd_grad(x3, t2, w, *args, g)
    grad = OPS._ce_bwd(g, None, x3, t2, w, lse, *args)
    assert torch.equal(loss, loss_f) and torch.equal(lse, lse_f)
    assert torch.equal(grad, grad_f)
    xi = x3.clone()
    OPS._ce_bwd_inplace(g, None, xi, t2, w, lse, *args)
    assert torch.equal(xi, grad)


def test_fused_and_split_paths_agree_bitwise_prob_target():
    # Probability targets with smoothing: the backward sums the target mass in the order the
    # fused forward did.
    x3 = _logits((300, 5003), torch.bfloat16, "padded").unsqueeze(2)
    g = torch.full((300, 1), 1 / 300, device="cuda")
    q = torch.softmax(torch.randn(300, 5003, 1, device="cuda"), 1)
    loss, lse = OPS.ce_fwd(x3, q, None, -100, 0.1, 0.0, 0.0, 1.0, False)
    _, _, grad_f = OPS.ce_fwd_grad(x3, q, None, -100, 0.1, 0.0, 0.0, 1.0, g)
    grad = OPS._ce_bwd(g, None, x3, q, None, lse, -100, 0.1, 0.0, 0.0, 1.0)
    assert torch.equal(grad, grad_f)


def test_rescale_grad_rows_only_touches_rows_that_differ():
    x = _logits((64, 3000), torch.bfloat16)
    t = torch.randint(0, 3000, (64,), device="cuda")
    scale = torch.full((64, 1), 0.5, device="cuda")
    _, _, grad = OPS.ce_fwd_grad(x.unsqueeze(2), t.unsqueeze(1), None, -100, 0.0, 0.0, 0.0, 1.0,
                                 scale)
    grad_loss = scale.clone()
    grad_loss[5] = 1.5
    out = grad.clone()
    OPS._rescale_grad_rows(out, grad_loss, scale)
    assert torch.equal(out[:5], grad[:5]) and torch.equal(out[6:], grad[6:])
    torch.testing.assert_close(out[5].float(), (grad[5].float() * 3).bfloat16().float())


@pytest.mark.parametrize("public_api", [True, False])
def test_out_of_range_target_is_a_device_side_assert(public_api):
    call = ("tlf.cross_entropy(x, t)" if public_api else
            "torch.ops.torchloss_fused.ce_fwd(x.view(4, 10, 1), t.view(4, 1), None, -100, "
            "0.0, 0.0, 0.0, 1.0, False)")
    code = textwrap.dedent(f"""
        import torch, torchloss_fused as tlf
        x = torch.randn(4, 10, device="cuda")
        t = torch.tensor([1, 2, 10, 3], device="cuda")
        out = {call}
        torch.cuda.synchronize()
        print("NO ERROR", out)
    """)
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "NO ERROR" not in output
    assert "device-side assert" in output or "CUDA error" in output, output[-2000:]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [3, 1000, 5003])
def test_special_values_match_cpu_kernels(dtype, C):
    # A NaN poisons its row, a partly -inf row stays finite, an all -inf row gives NaN:
    # the CUDA kernels must agree with the CPU kernels value for value.
    x = (torch.randn(5, C, 1, dtype=torch.float64) * 3).to(dtype)
    x[0, C // 2] = float("nan")
    x[1, : max(1, C // 2)] = float("-inf")
    x[2] = float("-inf")
    x[3, C - 1] = float("inf")
    t = torch.randint(0, C, (5, 1))
    t[1] = C - 1
    g = torch.rand(5, 1, dtype=_acc(dtype))
    xc, tc, gc = x.cuda(), t.cuda(), g.cuda()
    pairs = [
        (OPS.ce_fwd(x, t, None, -100, 0.1, 0.0, 0.0, 1.0, False),
         OPS.ce_fwd(xc, tc, None, -100, 0.1, 0.0, 0.0, 1.0, False)),
        (OPS.ce_fwd_grad(x, t, None, -100, 0.0, 1e-3, 0.0, 1.0, g),
         OPS.ce_fwd_grad(xc, tc, None, -100, 0.0, 1e-3, 0.0, 1.0, gc)),
        (OPS.focal_fwd_grad(x, t, None, 1.0, 2.0, -100, g),
         OPS.focal_fwd_grad(xc, tc, None, 1.0, 2.0, -100, gc)),
    ]
    for cpu_out, cuda_out in pairs:
        for a, b in zip(cpu_out, cuda_out):
            b = b.cpu()
            assert torch.equal(a.isnan(), b.isnan())
            torch.testing.assert_close(b.double(), a.double(), equal_nan=True, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_rows_and_zero_classes(dtype):
    x = torch.randn(0, 7, device="cuda").to(dtype).requires_grad_()
    t = torch.zeros(0, dtype=torch.long, device="cuda")
    loss = tlf.cross_entropy(x, t, reduction="sum")
    loss.backward()
    assert loss.item() == 0 and x.grad.shape == x.shape
    assert tlf.focal_loss(x.detach(), t, reduction="none").numel() == 0
    # C = 0 with every target ignored: nothing to read, zero loss, an empty gradient.
    x = torch.randn(3, 0, device="cuda").to(dtype).requires_grad_()
    t = torch.full((3,), -100, device="cuda")
    loss = tlf.cross_entropy(x, t, reduction="none")
    assert torch.equal(loss, torch.zeros(3, device="cuda", dtype=dtype))
    loss.sum().backward()
    assert x.grad.shape == (3, 0)
