"""Reference results for the correctness check: computed in fp64, row chunk by row chunk.

Each op's mean loss is a sum of per-row (per-element for sigmoid focal) terms divided by a
count, so the fp64 loss and gradient can be built from slices of rows without ever holding
an fp64 copy of the whole logits (a 16384 x 262144 fp64 tensor would not fit). Gradients
are stored in fp32: their rounding (~6e-8 relative) is far below every tolerance used.
Targets are never ignore_index here, so every mean divides by the row (element) count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import eager_losses
from .cases import LINEAR_OPS, Case


def chunk_bytes(device: torch.device) -> int:
    """Working-set size of one chunk: large enough that per-op overheads (kernel launches,
    OpenMP regions) stay small next to the work, small enough to bound the fp64 copies."""
    return 256 * 2**20 if device.type == "cuda" else 64 * 2**20


def row_chunks(rows: int, row_bytes: int, device: torch.device):
    step = max(1, chunk_bytes(device) // max(1, row_bytes))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


@dataclass
class Oracle:
    loss: float
    grads: tuple[torch.Tensor, ...]  # fp32, one per input that requires grad; () if forward
    grad_scales: tuple[float, ...] = ()  # mean |grad| of each, for the error metric

    @classmethod
    def make(cls, loss: float, grads: tuple[torch.Tensor, ...]) -> Oracle:
        scales = tuple(
            sum(g[s].abs().sum().item() for s in row_chunks(g.shape[0], 4 * g[0].numel(),
                                                            g.device)) / max(1, g.numel())
            for g in grads)
        return cls(loss, grads, scales)


def _per_row_terms(op: str):
    if op == "focal_fwd_bwd":
        return eager_losses.softmax_focal_rows
    if op == "sigmoid_focal_fwd_bwd":
        return eager_losses.sigmoid_focal_elements
    raise ValueError(op)


def compute(case: Case, inputs: tuple[torch.Tensor, ...]) -> Oracle:
    with torch.enable_grad():
        if case.op in LINEAR_OPS:
            return _linear_ce(case, *inputs)
        if case.op in ("ce_fwd", "ce_fwd_bwd"):
            return _cross_entropy(case, *inputs)
        return _rowwise(case, *inputs)


def _cross_entropy(case: Case, x: torch.Tensor, y: torch.Tensor) -> Oracle:
    """F.cross_entropy's value from PyTorch's fp64 log_softmax, and its gradient in closed
    form, (softmax - one_hot) / N: half the passes of autograd over the same chunk. The
    classes are on dim 1: (N, C, H, W) logits are chunked by image and averaged over all
    N x H x W targets."""
    n = y.numel()
    grad = torch.empty(x.shape, dtype=torch.float32, device=x.device) if case.backward else None
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for rows in row_chunks(x.shape[0], 8 * x[0].numel(), x.device):
        yc = y[rows, None]
        logp = F.log_softmax(x.detach()[rows].double(), dim=1)
        total -= logp.gather(1, yc).sum() / n
        if case.backward:
            p = logp.exp_().div_(n)
            p.scatter_add_(1, yc, torch.full(yc.shape, -1.0 / n, dtype=p.dtype, device=p.device))
            grad[rows] = p
    return Oracle.make(total.item(), (grad,) if case.backward else ())


def _rowwise(case: Case, x: torch.Tensor, y: torch.Tensor) -> Oracle:
    terms = _per_row_terms(case.op)
    count = y.numel()
    grad = torch.empty(x.shape, dtype=torch.float32, device=x.device) if case.backward else None
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for rows in row_chunks(x.shape[0], 8 * x[0].numel(), x.device):
        xc = x.detach()[rows].double().requires_grad_(case.backward)
        yc = y[rows].double() if y.is_floating_point() else y[rows]
        part = terms(xc, yc).sum() / count
        if case.backward:
            part.backward()
            grad[rows] = xc.grad
        total += part.detach()
    return Oracle.make(total.item(), (grad,) if case.backward else ())


def _linear_ce(case: Case, hidden, weight, target) -> Oracle:
    n = hidden.shape[0]
    w = weight.detach().double().requires_grad_()
    grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for rows in row_chunks(n, 8 * weight.shape[0], hidden.device):
        hc = hidden.detach()[rows].double().requires_grad_()
        tc = target[rows].double() if target.is_floating_point() else target[rows]
        part = F.cross_entropy(hc @ w.T, tc, reduction="sum") / n
        part.backward()
        grad_h[rows] = hc.grad
        total += part.detach()
    return Oracle.make(total.item(), (grad_h, w.grad.float()))
