"""float32 accuracy against a float64 oracle, torchloss_fused beside F.cross_entropy, for
logits of spread 3 around growing offsets: ``python -m benchmarks.precision``.

Not a benchmark row: it prints, per offset, the largest error of the per-row losses and of
the gradient of their sum, for both, on the device given (CPU by default). F works relative
to each row's maximum; so do we (the ops keep lse in float64: csrc/kernel_params.h).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from tabulate import tabulate

import torchloss_fused as tlf


def _loss_and_grad(fn, x: torch.Tensor, t: torch.Tensor):
    leaf = x.detach().clone().requires_grad_()
    loss = fn(leaf, t, reduction="none")
    loss.sum().backward()
    return loss.detach().double(), leaf.grad.double()


def errors(offset: float, rows: int, classes: int, device: str, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, classes, generator=gen, dtype=torch.float64) * 3 + offset)
    t = torch.randint(0, classes, (rows,), generator=gen).to(device)
    x32 = x.float().to(device)
    exact = _loss_and_grad(F.cross_entropy, x32.double(), t)
    out = {}
    for name, fn in (("torchloss_fused", tlf.cross_entropy), ("F.cross_entropy", F.cross_entropy)):
        got = _loss_and_grad(fn, x32, t)
        out[name] = tuple(float((a - b).abs().max()) for a, b in zip(got, exact))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--offsets", type=float, nargs="+", default=[0.0, 30.0, 100.0, 1000.0, 1e5])
    p.add_argument("--shape", type=int, nargs=2, default=[64, 1000], metavar=("ROWS", "C"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    rows = []
    for off in a.offsets:
        e = errors(off, *a.shape, a.device, a.seed)
        rows.append([f"{off:g}", *(f"{v:.2e}" for name in e for v in e[name])])
    print(f"float32 ({a.shape[0]}, {a.shape[1]}) logits, randn * 3 + offset, on {a.device}, "
          f"seed {a.seed}: largest error against float64")
    print(tabulate(rows, headers=["offset", "ours: loss", "ours: grad", "F: loss", "F: grad"]))


if __name__ == "__main__":
    main()
