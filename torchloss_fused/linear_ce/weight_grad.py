"""grad_weight accumulated over row chunks, in a wider dtype than the weight's when asked."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _host_buffers
from .chunking import ACCUM_BLOCK_BYTES

_OUT_DTYPE_ADDMM: dict[str, bool] = {}


def _addmm_out_dtype_ok(device: torch.device) -> bool:
    """Whether addmm(fp32, bf16, bf16, out_dtype=fp32) accumulates in place on `device`
    (CUDA builds of recent torch). Probed once per device type on tiny tensors."""
    key = device.type
    if key not in _OUT_DTYPE_ADDMM:
        ok = False
        if device.type == "cuda":
            try:
                a = torch.ones((2, 2), dtype=torch.bfloat16, device=device)
                c = torch.zeros((2, 2), dtype=torch.float32, device=device)
                torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
                ok = True
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
        _OUT_DTYPE_ADDMM[key] = ok
    return _OUT_DTYPE_ADDMM[key]


def resolve_accum(weight_dtype: torch.dtype, accum_dtype: torch.dtype | None) -> torch.dtype:
    if accum_dtype is not None:
        return accum_dtype
    if weight_dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return weight_dtype


class WeightGrad:
    """grad_weight (V, H) accumulated over row chunks in `accum` dtype, returned in the
    weight's dtype (contiguous; `weight` may be weight.t(), for the (H, V) gradient of a
    weight whose gradient is transposed). Where accum is exactly twice as wide, the
    accumulator's rows [0, V//2) live in the returned tensor's own storage and are
    converted in place at the end."""

    def __init__(self, weight: Tensor, accum: torch.dtype):
        V, H = weight.shape
        self.dtype, self.accum, self.H = weight.dtype, accum, H
        self.out = _host_buffers.empty((V, H), dtype=weight.dtype, device=weight.device)
        self.split = 0
        if accum == weight.dtype:
            self.parts = [(0, V, self.out)]
        elif accum.itemsize == 2 * weight.dtype.itemsize and V >= 2:
            r = V // 2  # r*H accum elements fit in the V*H narrow ones
            lo = torch.empty((0,), dtype=accum, device=weight.device)
            lo.set_(self.out.untyped_storage(), 0, (r, H), (H, 1))
            hi = _host_buffers.empty((V - r, H), dtype=accum, device=weight.device)
            self.parts = [(0, r, lo), (r, V, hi)]
            self.split = r
        else:
            self.parts = [(0, V, _host_buffers.empty((V, H), dtype=accum,
                                                   device=weight.device))]
        self.direct = accum == weight.dtype or (
            accum == torch.float32 and _addmm_out_dtype_ok(weight.device))
        # CPU kernels add a narrow block into the accumulator in one pass (_accumulate_);
        # otherwise it is converted through a same-dtype buffer first (a mixed-dtype add_
        # is slow on CPU). Not the reference op: its conversion would allocate a buffer per
        # block, which made the pure-PyTorch path ~30% slower (bf16 1024x512x128256).
        self.one_pass = (weight.device.type == "cpu" and _backend.has_kernels("cpu")
                         and accum == torch.float32)
        self.first = True
        self.tmp = self.tmp_acc = None

    def add(self, grad_logits: Tensor, h: Tensor) -> None:
        """+= grad_logits.T @ h for one chunk (grad_logits (n, V), h (n, H); for the (H, V)
        gradient, h and grad_logits in each other's place)."""
        gT = grad_logits.t()
        beta = 0 if self.first else 1  # beta=0: the uninitialised buffer is not read
        for v0, v1, acc in self.parts:
            if self.accum == self.dtype:
                torch.addmm(acc, gT[v0:v1], h, beta=beta, out=acc)
            elif self.direct:
                torch.addmm(acc, gT[v0:v1], h, beta=beta, out_dtype=self.accum, out=acc)
            else:
                self._add_blocked(gT[v0:v1], h, acc)
        self.first = False

    def _add_blocked(self, gT: Tensor, h: Tensor, acc: Tensor) -> None:
        # The product in the input dtype, a block of rows at a time (float32 accumulation
        # inside the matmul; rounded once per chunk), then added in the accumulator dtype.
        # Few, large blocks: each op is a parallel region, costly on a loaded machine.
        rows = max(16, ACCUM_BLOCK_BYTES // max(1, self.H * self.dtype.itemsize))
        if self.tmp is None:
            shape = (min(rows, self.out.shape[0]), self.H)
            self.tmp = torch.empty(shape, dtype=self.dtype, device=h.device)
            if not self.one_pass:
                self.tmp_acc = torch.empty(shape, dtype=self.accum, device=h.device)
        for r0 in range(0, gT.shape[0], rows):
            r1 = min(gT.shape[0], r0 + rows)
            block = self.tmp[: r1 - r0]
            torch.mm(gT[r0:r1], h, out=block)
            if self.first:
                acc[r0:r1].copy_(block)
            elif self.one_pass:
                torch.ops.torchloss_fused._accumulate_(acc[r0:r1], block)
            else:
                conv = self.tmp_acc[: r1 - r0]
                conv.copy_(block)
                acc[r0:r1].add_(conv)

    def result(self) -> Tensor:
        self.tmp = self.tmp_acc = None
        out = self.out
        if self.first:  # no rows at all
            return out.zero_()
        if self.accum == self.dtype:
            return out
        if not self.split:
            (_, _, acc), = self.parts
            return out.copy_(acc)
        (_, r, lo), (_, _, hi) = self.parts
        # In place: row block [s, e) of `lo` occupies bytes [2s, 2e) x (row bytes of out);
        # converted, it lands on [s, e) of out. With e <= 2s the write never touches rows
        # of lo not yet read. The first block goes through a temporary.
        first = min(r, 64)
        out[:first].copy_(lo[:first].to(self.dtype))
        s = first
        while s < r:
            e = min(r, 2 * s)
            out[s:e].copy_(lo[s:e])
            s = e
        self.parts = []
        del lo
        out[r:].copy_(hi)
        return out
