"""float32 accuracy against a float64 oracle, torchloss_fused beside F.cross_entropy, for
logits of spread 3 around growing offsets: ``python -m benchmarks.precision``.

Not a benchmark row: it prints, per offset, the largest error of the per-row losses and of
the gradient of their sum, for both, on the device given (CPU by default). F works relative
to each row's maximum; so do we (the ops keep lse in float64: csrc/kernel_params.h).
``--op linear_cross_entropy`` does the same for ``linear_cross_entropy`` beside
``F.cross_entropy(F.linear(...))``, the offset coming from the head's bias (hidden width
64), with the gradients of hidden and of the head's weight.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from tabulate import tabulate

import torchloss_fused as tlf

HIDDEN = 64  # (linear_cross_entropy's hidden width)


def _loss_and_grads(fn, leaves, t: torch.Tensor):
    leaves = [v.detach().clone().requires_grad_() for v in leaves]
    loss = fn(*leaves, t)
    loss.sum().backward()
    return (loss.detach().double(), *(v.grad.double() for v in leaves))


def _f_linear(h, w, b, t):
    return F.cross_entropy(F.linear(h, w, b), t, reduction="none")


def _ours_linear(h, w, b, t):
    return tlf.linear_cross_entropy(h, w, t, b, reduction="none")


OPS = {
    # name: (ours, F's, what the columns after the loss are)
    "cross_entropy": (lambda x, t: tlf.cross_entropy(x, t, reduction="none"),
                      lambda x, t: F.cross_entropy(x, t, reduction="none"), ["grad"]),
    "linear_cross_entropy": (_ours_linear, _f_linear, ["grad hidden", "grad weight"]),
}


def _inputs(op: str, offset: float, rows: int, classes: int, gen) -> list[torch.Tensor]:
    """float32 leaves: the logits, or hidden, the head's weight and its bias."""
    if op == "cross_entropy":
        x = torch.randn(rows, classes, generator=gen, dtype=torch.float64) * 3 + offset
        return [x.float()]
    h = torch.randn(rows, HIDDEN, generator=gen)
    w = torch.randn(classes, HIDDEN, generator=gen) * (3 / HIDDEN ** 0.5)
    return [h, w, torch.full((classes,), offset)]


def errors(offset: float, rows: int, classes: int, device: str, seed: int,
           op: str = "cross_entropy") -> dict:
    gen = torch.Generator().manual_seed(seed)
    leaves = [v.to(device) for v in _inputs(op, offset, rows, classes, gen)]
    t = torch.randint(0, classes, (rows,), generator=gen).to(device)
    ours, theirs, extra = OPS[op]
    exact = _loss_and_grads(theirs, [v.double() for v in leaves], t)[:1 + len(extra)]
    out = {}
    for name, fn in (("ours", ours), ("F", theirs)):
        got = _loss_and_grads(fn, leaves, t)
        out[name] = tuple(float((a - b).abs().max()) for a, b in zip(got, exact))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--op", choices=sorted(OPS), default="cross_entropy")
    p.add_argument("--offsets", type=float, nargs="+", default=[0.0, 30.0, 100.0, 1000.0, 1e5])
    p.add_argument("--shape", type=int, nargs=2, default=[64, 1000], metavar=("ROWS", "C"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    rows = []
    for off in a.offsets:
        e = errors(off, *a.shape, a.device, a.seed, a.op)
        rows.append([f"{off:g}", *(f"{v:.2e}" for name in e for v in e[name])])
    what = "logits" if a.op == "cross_entropy" else f"logits (hidden width {HIDDEN})"
    print(f"{a.op}: float32 ({a.shape[0]}, {a.shape[1]}) {what}, randn * 3 + offset, on "
          f"{a.device}, seed {a.seed}: largest error against float64")
    cols = ["loss", *OPS[a.op][2]]
    print(tabulate(rows, headers=["offset", *(f"{who}: {c}" for who in ("ours", "F")
                                              for c in cols)]))


if __name__ == "__main__":
    main()
