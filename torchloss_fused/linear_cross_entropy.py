"""Fused linear + cross-entropy for LM heads: the loss of ``F.linear(hidden, weight, bias)``
without ever materialising the N x V logits.

    loss = tlf.linear_cross_entropy(hidden, lm_head.weight, target)

How: rows (tokens) are processed in chunks. For each chunk, one matrix product writes its
logits into a (chunk, V) buffer allocated once per call; the cross-entropy ops of
`_backend.ops_for(device)` compute the per-row loss and log-sum-exp and then write the
gradient of the logits over that same buffer; two more products turn it into the chunk's
rows of grad_hidden and its contribution to grad_weight (and grad_bias). For
``reduction="mean"``/``"sum"`` all of this happens in the forward pass (the gradient scale,
1/number of counted targets, is a device tensor known before the loop), and backward only
rescales the three gradients by the upstream gradient: three matrix products in all. For
``reduction="none"`` the per-row upstream gradients are known only in backward, which
recomputes the logits chunk by chunk (four products).

Memory model (besides the inputs and the gradients autograd hands back): one (chunk, V)
logits buffer in the input dtype, plus, when grad_weight accumulates in a wider dtype than
the weight's (bf16/fp16 weights: float32 by default), that accumulator. A float32
accumulator for a bf16/fp16 weight shares its first half with the returned gradient's
storage, which it is converted into in place at the end, so the accumulator and the
gradient together cost V x H x 4 bytes, not 6. No tensor of N x V elements is allocated.

The chunked loops are custom ops (namespace ``torchloss_fused_py``) with fake kernels and
autograd formulas, so ``torch.compile(fullgraph=True)`` sees one opaque op. Nothing
synchronises with the host: chunk sizes come from shapes (and, on CUDA, the free memory the
driver reports), the mean denominator stays on the device.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _backend, reference
from .functional import (
    _FLOAT_DTYPES,
    _INDEX_DTYPES,
    _check_device,
    _check_number,
    _check_reduction,
    _check_tensor,
    _wants_grad,
)

__all__ = ["LinearCrossEntropyLoss", "linear_cross_entropy"]

NAMESPACE = "torchloss_fused_py"

# ---- chunking policy ----------------------------------------------------------------------
#
# Per chunk of n rows the three products cost ~6 n V H flops, while accumulating grad_weight
# reads and writes the V x H accumulator once: that overhead relative to the products falls
# as 1/n, whatever V and H. The logits buffer costs n x V elements. So n is kept above a
# floor that keeps the products efficient and below a memory budget.

# CPU: rows from a fixed buffer budget, within bounds (measured at N=4096, H=1024,
# V=32000 on 2 cores: 512 rows beat 256 and 1024 in fp32 and bf16; more rows add memory,
# fewer add grad_weight accumulation passes).
CPU_BUFFER_BYTES = 64 << 20
CPU_MIN_ROWS = 64
CPU_MAX_ROWS = 512
# CUDA: rows = H * GPU_ROWS_PER_HIDDEN (the buffer is then that fraction of the weight's
# bytes), at least GPU_MIN_ROWS, and the buffer at most 1/GPU_FREE_FRACTION of the free
# memory. Not yet tuned on a GPU.
GPU_ROWS_PER_HIDDEN = 0.5
GPU_MIN_ROWS = 256
GPU_FREE_FRACTION = 8
# Rows of the bf16/fp16 -> wider-dtype accumulation temporaries where no matmul writes the
# wider dtype directly (CPU): a block of the product in the input dtype, then converted.
ACCUM_BLOCK_BYTES = 4 << 20


def _round_rows(rows: int) -> int:
    return rows - rows % 64 if rows >= 128 else max(1, rows)


def _free_cuda_bytes(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)  # a driver query, no stream synchronisation
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + max(0, cached)


def auto_chunk_size(N: int, V: int, H: int, dtype: torch.dtype,
                    device: torch.device) -> int:
    """Rows per chunk when ``chunk_size`` is not given (see the policy above)."""
    per_row = max(1, V * dtype.itemsize)
    if device.type == "cuda":
        budget = _free_cuda_bytes(device) // GPU_FREE_FRACTION
        rows = min(max(int(H * GPU_ROWS_PER_HIDDEN), GPU_MIN_ROWS), budget // per_row)
    else:
        rows = min(max(CPU_BUFFER_BYTES // per_row, CPU_MIN_ROWS), CPU_MAX_ROWS)
    return max(1, min(N, _round_rows(rows)))


# ---- the chunked loop -----------------------------------------------------------------------

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


def _resolve_accum(weight_dtype: torch.dtype, accum_dtype: torch.dtype | None) -> torch.dtype:
    if accum_dtype is not None:
        return accum_dtype
    if weight_dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return weight_dtype


class _WeightGrad:
    """grad_weight (V, H) accumulated over row chunks in `accum` dtype, returned in the
    weight's dtype. Where accum is exactly twice as wide, the accumulator's rows [0, V//2)
    live in the returned tensor's own storage and are converted in place at the end."""

    def __init__(self, weight: Tensor, accum: torch.dtype):
        V, H = weight.shape
        self.dtype, self.accum, self.H = weight.dtype, accum, H
        self.out = torch.empty((V, H), dtype=weight.dtype, device=weight.device)
        self.split = 0
        if accum == weight.dtype:
            self.parts = [(0, V, self.out)]
        elif accum.itemsize == 2 * weight.dtype.itemsize and V >= 2:
            r = V // 2  # r*H accum elements fit in the V*H narrow ones
            lo = torch.empty((0,), dtype=accum, device=weight.device)
            lo.set_(self.out.untyped_storage(), 0, (r, H), (H, 1))
            hi = torch.empty((V - r, H), dtype=accum, device=weight.device)
            self.parts = [(0, r, lo), (r, V, hi)]
            self.split = r
        else:
            self.parts = [(0, V, torch.empty((V, H), dtype=accum, device=weight.device))]
        self.direct = accum == weight.dtype or (
            accum == torch.float32 and _addmm_out_dtype_ok(weight.device))
        self.first = True
        self.tmp = self.tmp_acc = None

    def add(self, grad_logits: Tensor, h: Tensor) -> None:
        """+= grad_logits.T @ h for one chunk (grad_logits (n, V), h (n, H))."""
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
        # A mixed-dtype add_ is slow on CPU: convert through a same-dtype buffer first.
        # Few, large blocks: each op is a parallel region, costly on a loaded machine.
        rows = max(16, ACCUM_BLOCK_BYTES // max(1, self.H * self.dtype.itemsize))
        if self.tmp is None:
            shape = (min(rows, self.out.shape[0]), self.H)
            self.tmp = torch.empty(shape, dtype=self.dtype, device=h.device)
            self.tmp_acc = torch.empty(shape, dtype=self.accum, device=h.device)
        for r0 in range(0, gT.shape[0], rows):
            r1 = min(gT.shape[0], r0 + rows)
            block = self.tmp[: r1 - r0]
            torch.mm(gT[r0:r1], h, out=block)
            if self.first:
                acc[r0:r1].copy_(block)
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


def _loop(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
          ce_args: tuple, chunk_size: int, accum_dtype: torch.dtype | None, *,
          row_grad: Tensor | None, lse_in: Tensor | None, need_h: bool, need_w: bool,
          need_b: bool):
    """The chunked loop shared by the three ops.

    lse_in None: computes per-row loss and lse. row_grad: the gradient of the loss with
    respect to each row's loss, a 0-dim tensor (same for every row) or (N,); None: no
    gradients. Returns (loss_rows, lse, grad_hidden, grad_weight, grad_bias) with None for
    what was not computed.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    acc = reference.acc_dtype(hidden.dtype)
    ops = _backend.ops_for(hidden.device)
    chunk = chunk_size if chunk_size > 0 else auto_chunk_size(N, V, H, hidden.dtype,
                                                             hidden.device)
    chunk = max(1, min(chunk, N))
    grads = row_grad is not None
    need_h, need_w, need_b = grads and need_h, grads and need_w, grads and need_b

    loss_rows = lse = None
    if lse_in is None:
        loss_rows = hidden.new_empty((N,), dtype=acc)
        lse = hidden.new_empty((N,), dtype=acc)
    grad_h = hidden.new_empty((N, H)) if need_h else None
    # One chunk: one product, accumulated inside the matmul, rounded once, as F.linear's
    # backward does; no separate accumulator is needed.
    w_accum = weight.dtype if chunk >= N else _resolve_accum(weight.dtype, accum_dtype)
    gw = _WeightGrad(weight, w_accum) if need_w else None
    gb = None
    if need_b:
        gb = torch.zeros((V,), dtype=_resolve_accum(bias.dtype, accum_dtype),
                         device=bias.device)
    buf = hidden.new_empty((chunk * V,)) if N > 0 else None
    ones = None
    wT = weight.t()
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        n = e - s
        h = hidden[s:e]
        logits = buf[: n * V].view(n, V)
        if bias is None:
            torch.mm(h, wT, out=logits)
        else:
            torch.addmm(bias, h, wT, out=logits)
        x3 = logits.unsqueeze(-1)  # (B, C, D) = (n, V, 1)
        t2 = target[s:e].unsqueeze(-1)
        if lse_in is None:
            loss_c, lse_c = ops.ce_fwd(x3, t2, None, *ce_args, 1.0, False)
            loss_rows[s:e].copy_(loss_c.view(n))
            lse[s:e].copy_(lse_c.view(n))
        else:
            lse_c = lse_in[s:e].unsqueeze(-1)
        if not grads:
            continue
        g = row_grad.expand(n, 1) if row_grad.dim() == 0 else row_grad[s:e].unsqueeze(-1)
        ops._ce_bwd_inplace(g, None, x3, t2, None, lse_c, *ce_args, 1.0)
        if need_h:
            torch.mm(logits, weight, out=grad_h[s:e])
        if need_w:
            gw.add(logits, h)
        if need_b:  # column sums as a matrix-vector product (fp32 accumulation inside)
            ones = ones if ones is not None and ones.shape[0] == n else logits.new_ones((n,))
            if gb.dtype == logits.dtype:
                gb.addmv_(logits.t(), ones)
            else:  # rounded to the input dtype once per chunk, summed across chunks in gb
                gb.add_(torch.mv(logits.t(), ones))
    del buf
    grad_w = gw.result() if need_w else None
    grad_b = gb.to(bias.dtype) if need_b else None
    return loss_rows, lse, grad_h, grad_w, grad_b


def _placeholder(like: Tensor) -> Tensor:
    return like.new_empty((0,))


# ---- the ops ------------------------------------------------------------------------------

_CE = "int ignore_index, float label_smoothing, float z_loss, float softcap"
_CHUNK = "int chunk_size, ScalarType? accum_dtype"
_NEEDS = "bool grad_hidden, bool grad_weight, bool grad_bias"
SCHEMAS = {
    # Per-row loss and lse (accumulation dtype), no gradients.
    "linear_ce_fwd": f"(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, {_CE}, "
    f"{_CHUNK}) -> (Tensor loss, Tensor lse)",
    # Training forward for mean/sum: the reduced loss sum(loss_r) / denom (denom None: 1),
    # lse, and the gradients of that loss (empty where not asked for).
    "linear_ce_fwd_grad": f"(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, "
    f"Tensor? denom, {_CE}, {_CHUNK}, {_NEEDS}) -> (Tensor loss, Tensor lse, "
    "Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)",
    # Backward for per-row upstream gradients: recomputes the logits chunk by chunk.
    "_linear_ce_bwd": f"(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor? bias, "
    f"Tensor target, Tensor lse, {_CE}, {_CHUNK}, {_NEEDS}) -> (Tensor grad_hidden, "
    "Tensor grad_weight, Tensor grad_bias)",
}


def _fwd_impl(hidden, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap,
              chunk_size, accum_dtype):
    loss, lse, *_ = _loop(hidden, weight, bias, target,
                          (ignore_index, label_smoothing, z_loss, softcap), chunk_size,
                          accum_dtype, row_grad=None, lse_in=None, need_h=False,
                          need_w=False, need_b=False)
    return loss, lse


def _row_scale(denom: Tensor | None, like: Tensor) -> Tensor:
    one = torch.ones((), dtype=reference.acc_dtype(like.dtype), device=like.device)
    return one if denom is None else one / denom


def _fwd_grad_impl(hidden, weight, bias, target, denom, ignore_index, label_smoothing, z_loss,
                   softcap, chunk_size, accum_dtype, grad_hidden, grad_weight, grad_bias):
    loss_rows, lse, gh, gw, gb = _loop(
        hidden, weight, bias, target, (ignore_index, label_smoothing, z_loss, softcap),
        chunk_size, accum_dtype, row_grad=_row_scale(denom, hidden), lse_in=None,
        need_h=grad_hidden, need_w=grad_weight, need_b=grad_bias and bias is not None)
    total = loss_rows.sum()
    loss = total if denom is None else total / denom
    return (loss, lse, gh if gh is not None else _placeholder(hidden),
            gw if gw is not None else _placeholder(hidden),
            gb if gb is not None else _placeholder(hidden))


def _bwd_impl(grad_loss, hidden, weight, bias, target, lse, ignore_index, label_smoothing,
              z_loss, softcap, chunk_size, accum_dtype, grad_hidden, grad_weight, grad_bias):
    _, _, gh, gw, gb = _loop(
        hidden, weight, bias, target, (ignore_index, label_smoothing, z_loss, softcap),
        chunk_size, accum_dtype, row_grad=grad_loss.to(lse.dtype), lse_in=lse,
        need_h=grad_hidden, need_w=grad_weight, need_b=grad_bias and bias is not None)
    return (gh if gh is not None else _placeholder(hidden),
            gw if gw is not None else _placeholder(hidden),
            gb if gb is not None else _placeholder(hidden))


# ---- fake kernels -------------------------------------------------------------------------


def _fake_grads(hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
    N, H = hidden.shape
    V = weight.shape[0]
    gh = hidden.new_empty((N, H)) if grad_hidden else _placeholder(hidden)
    gw = weight.new_empty((V, H)) if grad_weight else _placeholder(hidden)
    gb = bias.new_empty((V,)) if grad_bias and bias is not None else _placeholder(hidden)
    return gh, gw, gb


def _fake_fwd(hidden, weight, bias, target, *args):
    acc = reference.acc_dtype(hidden.dtype)
    N = hidden.shape[0]
    return hidden.new_empty((N,), dtype=acc), hidden.new_empty((N,), dtype=acc)


def _fake_fwd_grad(hidden, weight, bias, target, denom, ignore_index, label_smoothing, z_loss,
                   softcap, chunk_size, accum_dtype, grad_hidden, grad_weight, grad_bias):
    acc = reference.acc_dtype(hidden.dtype)
    loss = hidden.new_empty((), dtype=acc)
    lse = hidden.new_empty((hidden.shape[0],), dtype=acc)
    return (loss, lse, *_fake_grads(hidden, weight, bias, grad_hidden, grad_weight, grad_bias))


def _fake_bwd(grad_loss, hidden, weight, bias, target, lse, ignore_index, label_smoothing,
              z_loss, softcap, chunk_size, accum_dtype, grad_hidden, grad_weight, grad_bias):
    return _fake_grads(hidden, weight, bias, grad_hidden, grad_weight, grad_bias)


# ---- autograd -----------------------------------------------------------------------------


def _ns():
    return getattr(torch.ops, NAMESPACE)


def _fwd_setup_context(ctx, inputs, output):
    hidden, weight, bias, target, *args = inputs
    ctx.save_for_backward(hidden, weight, bias, target, output[1])
    ctx.args = tuple(args)  # ce args, chunk_size, accum_dtype
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _fwd_backward(ctx, grad_loss, _grad_lse):
    needs = tuple(ctx.needs_input_grad[:3])
    if grad_loss is None or not any(needs):
        return (None,) * 10
    hidden, weight, bias, target, lse = ctx.saved_tensors
    gh, gw, gb = _ns()._linear_ce_bwd(grad_loss, hidden, weight, bias, target, lse, *ctx.args,
                                      *needs)
    return (gh if needs[0] else None, gw if needs[1] else None,
            gb if needs[2] and bias is not None else None) + (None,) * 7


def _fwd_grad_setup_context(ctx, inputs, output):
    hidden, weight, bias, target, denom, *rest = inputs
    ctx.ce_args, ctx.chunk = tuple(rest[:4]), tuple(rest[4:6])
    _, lse, gh, gw, gb = output
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    # Eager: the gradients are handed on once, scaled in place, from a plain attribute (no
    # reference cycle through the outputs' grad_fn); a second backward (retain_graph)
    # recomputes. Traced (torch.compile): saved normally and scaled out of place.
    ctx.eager = not torch.compiler.is_compiling() and type(gh) is torch.Tensor
    if ctx.eager:
        ctx.fused = (gh.detach(), gw.detach(), gb.detach())
        ctx.save_for_backward(hidden, weight, bias, target, denom, lse)
    else:
        ctx.fused = None
        ctx.save_for_backward(hidden, weight, bias, target, denom, lse, gh, gw, gb)


def _fwd_grad_backward(ctx, grad_loss, *_unused):
    needs = tuple(ctx.needs_input_grad[:3])
    none = (None,) * 11
    if grad_loss is None or not any(needs):
        return (None, None, None) + none
    saved = ctx.saved_tensors
    hidden, weight, bias, target, denom, lse = saved[:6]
    needs = (needs[0], needs[1], needs[2] and bias is not None)
    if ctx.eager:
        fused, ctx.fused = ctx.fused, None
        if fused is None:  # second backward through the same graph: recompute
            rows = (grad_loss if denom is None else grad_loss / denom).expand(hidden.shape[0])
            fused = _ns()._linear_ce_bwd(rows, hidden, weight, bias, target, lse,
                                         *ctx.ce_args, *ctx.chunk, *needs)
            grads = fused
        else:
            grads = tuple(g.mul_(grad_loss) if need else None for g, need in zip(fused, needs))
    else:
        grads = tuple(g * grad_loss if need else None for g, need in zip(saved[6:], needs))
    return tuple(g if need else None for g, need in zip(grads, needs)) + none


def _define_ops() -> None:
    impls = {"linear_ce_fwd": _fwd_impl, "linear_ce_fwd_grad": _fwd_grad_impl,
             "_linear_ce_bwd": _bwd_impl}
    fakes = {"linear_ce_fwd": _fake_fwd, "linear_ce_fwd_grad": _fake_fwd_grad,
             "_linear_ce_bwd": _fake_bwd}
    for name, schema in SCHEMAS.items():
        qualname = f"{NAMESPACE}::{name}"
        torch.library.custom_op(qualname, impls[name], mutates_args=(), schema=schema)
        torch.library.register_fake(qualname, fakes[name])
    torch.library.register_autograd(f"{NAMESPACE}::linear_ce_fwd", _fwd_backward,
                                    setup_context=_fwd_setup_context)
    torch.library.register_autograd(f"{NAMESPACE}::linear_ce_fwd_grad", _fwd_grad_backward,
                                    setup_context=_fwd_grad_setup_context)


_define_ops()


# ---- public API ---------------------------------------------------------------------------


def _check_args(hidden, weight, target, bias, chunk_size, accum_dtype) -> None:
    _check_tensor(hidden, "hidden")
    _check_tensor(weight, "weight")
    _check_tensor(target, "target")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"hidden must be float32, float64, bfloat16 or float16, got {hidden.dtype}")
    if hidden.dim() == 0:
        raise ValueError("hidden must have shape (..., H), got a 0-dim tensor")
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(
            f"weight must have shape (V, H) = (vocabulary, {H}) as in nn.Linear, got "
            f"{tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight has no rows: the vocabulary size V must be at least 1")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    _check_device(hidden, weight, "weight")
    if bias is not None:
        _check_tensor(bias, "bias")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
        _check_device(hidden, bias, "bias")
    if target.dtype not in _INDEX_DTYPES:
        raise TypeError(
            f"target must hold class indices (int64, int32 or uint8), got {target.dtype}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"target must have hidden's shape without its last dimension, "
            f"{tuple(hidden.shape[:-1])}, got {tuple(target.shape)}")
    _check_device(hidden, target, "target")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if accum_dtype is not None:
        if not isinstance(accum_dtype, torch.dtype) or accum_dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"accum_dtype must be None or a floating-point torch.dtype, got {accum_dtype!r}")
        if accum_dtype != hidden.dtype and accum_dtype.itemsize <= hidden.dtype.itemsize:
            raise ValueError(
                f"accum_dtype must be the weight's dtype ({hidden.dtype}) or wider, got "
                f"{accum_dtype}")


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = None,
) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).flatten(0, -2), target.flatten(), ...)``
    without materialising the logits.

    ``hidden`` is (..., H), ``weight`` (V, H) as in ``nn.Linear``, ``bias`` (V,) or None,
    ``target`` class indices shaped like ``hidden`` without its last dimension. Gradients
    flow to hidden, weight and bias. ``mean`` divides by the number of non-ignored targets
    of the whole call; ``sum`` is for gradient accumulation, where the caller divides by a
    token count across micro-batches; ``none`` returns the loss shaped like ``target``.

    Extras, keyword-only: ``z_loss`` (adds ``z_loss * lse**2`` per counted row), ``softcap``
    (logits become ``softcap * tanh(logits / softcap)``), ``chunk_size`` (rows per chunk;
    default: chosen from the shapes and, on CUDA, free memory) and ``accum_dtype`` (dtype of
    the grad_weight/grad_bias accumulator: float32 for bf16/fp16 inputs by default, else the
    input dtype; pass the input dtype to save memory).
    """
    _check_reduction(reduction)
    _check_args(hidden, weight, target, bias, chunk_size, accum_dtype)
    label_smoothing = _check_number(label_smoothing, "label_smoothing", 0.0, 1.0)
    z_loss = _check_number(z_loss, "z_loss", 0.0)
    softcap = 0.0 if softcap is None else _check_number(softcap, "softcap", 0.0, low_open=True)
    ignore_index = int(ignore_index)

    H = hidden.shape[-1]
    h2 = hidden.reshape(-1, H)
    t1 = target.reshape(-1)
    acc = reference.acc_dtype(hidden.dtype)
    ce_args = (ignore_index, label_smoothing, z_loss, softcap)
    chunk = 0 if chunk_size is None else chunk_size
    ops = _ns()
    denom = (t1 != ignore_index).sum().to(acc) if reduction == "mean" else None

    needs = (_wants_grad(hidden), _wants_grad(weight), _wants_grad(bias))
    if reduction != "none" and any(needs):
        loss, *_ = ops.linear_ce_fwd_grad(h2, weight, bias, t1, denom, *ce_args, chunk,
                                          accum_dtype, *needs)
        return loss.to(hidden.dtype)
    loss_rows, _ = ops.linear_ce_fwd(h2, weight, bias, t1, *ce_args, chunk, accum_dtype)
    if reduction == "none":
        return loss_rows.reshape(target.shape).to(hidden.dtype)
    total = loss_rows.sum()
    return (total if denom is None else total / denom).to(hidden.dtype)


class LinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`linear_cross_entropy`: ``loss(hidden, weight, target, bias)``.

    The LM head's weight (and bias) stay with the model; pass them to ``forward``.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
        accum_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.accum_dtype = accum_dtype

    def forward(self, hidden: Tensor, weight: Tensor, target: Tensor,
                bias: Tensor | None = None) -> Tensor:
        return linear_cross_entropy(
            hidden, weight, target, bias, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing,
            z_loss=self.z_loss, softcap=self.softcap, chunk_size=self.chunk_size,
            accum_dtype=self.accum_dtype)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, chunk_size={self.chunk_size}, "
                f"accum_dtype={self.accum_dtype}")
