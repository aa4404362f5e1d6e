"""Calls every CUDA op on small inputs that reach each kernel shape: thread / warp / block
rows, vector and scalar paths, misaligned and padded rows, every option; scripts/gpu_check.sh
runs it under compute-sanitizer. With --block-only, only the block-per-row shapes (the ones
that use shared memory). --device cpu runs the same calls on the CPU kernels: the suite does
that (tests/test_exercise_ops.py), so a changed op signature cannot break it unseen before
a GPU session."""
import sys

import torch

import torchloss_fused  # noqa: F401

ops = torch.ops.torchloss_fused
block_only = "--block-only" in sys.argv
dev = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cuda"
torch.manual_seed(0)
shapes = [(300, 5000, 1), (2, 3000, 3)] if block_only else \
    [(64, 3, 1), (64, 100, 1), (16, 1000, 2), (300, 5000, 1), (2, 3000, 3), (3, 40000, 1)]
for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    acc = torch.float64 if dt == torch.float64 else torch.float32
    for B, C, D in shapes:
        for layout in ("contig", "offset", "padded"):
            if layout == "contig":
                x = torch.randn(B, C, D, device=dev).to(dt)
            elif layout == "offset":
                x = torch.randn(B * C * D + 1, device=dev).to(dt)[1:].view(B, C, D)
            else:
                x = torch.randn(B, C + 3, D, device=dev).to(dt)[:, :C]
            t = torch.randint(0, C, (B, D), device=dev)
            t[0, 0] = -100
            w = torch.rand(C, device=dev, dtype=acc) + 0.5
            g = torch.rand(B, D, device=dev, dtype=acc)
            for weight, ls, z, cap, sc in ((None, 0.0, 0.0, 0.0, 1.0), (w, 0.1, 1e-3, 5.0, 0.5)):
                loss, lse = ops.ce_fwd(x, t, weight, -100, ls, z, cap, sc, False)
                ops._ce_bwd(g, g.to(lse.dtype), x, t, weight, lse, -100, ls, z, cap, sc)
                ops._ce_bwd_inplace(g, None, x.clone(), t, weight, lse, -100, ls, z, cap, sc)
                _, _, grad = ops.ce_fwd_grad(x, t, weight, -100, ls, z, cap, sc, g)
                ops._rescale_grad_rows(grad, g * 2, g)
            p = torch.softmax(torch.randn(B, C, D, device=dev), 1)
            ops.ce_fwd(x, p.to(dt), None, -100, 0.1, 0.0, 0.0, 1.0, False)
            if dt != torch.float64:
                ops.ce_fwd_grad(x, p, w, -100, 0.0, 0.0, 0.0, 1.0, g)
            loss, lse = ops.focal_fwd(x, t, None, 0.25, 2.0, -100)
            ops._focal_bwd(g, x, t, None, lse, 0.25, 2.0, -100)
            ops.focal_fwd_grad(x, t, w, 1.0, 1.5, -100, g)
    if not block_only:
        for n in (1, 1000, 4099):
            xs = torch.randn(n + 1, device=dev).to(dt)[1:]
            ts = (torch.rand(n, device=dev) > 0.5).to(dt)
            ops.sigmoid_focal_fwd(xs, ts, 0.25, 2.0)
            ops._sigmoid_focal_bwd(torch.rand(n, device=dev).to(dt), xs, ts, 0.25, 1.5)
            ops.sigmoid_focal_sum(xs, ts, 0.25, 2.0, n)  # (the mean's divisor)
            ops.sigmoid_focal_sum_grad(xs, ts, -1.0, 1.5, 1)
        # Enough elements for the reduced sum's grid to reach its block cap.
        xs = torch.randn(1_500_001, device=dev).to(dt)
        ops.sigmoid_focal_sum_grad(xs, (xs > 0).to(dt), 0.25, 2.0, 1)
if dev == "cuda":
    torch.cuda.synchronize()
print("exercised every op")
