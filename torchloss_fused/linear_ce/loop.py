"""The chunked loop shared by the linear cross-entropy ops: per chunk of rows, the logits
(one product) in a reused buffer, the cross-entropy ops (loss, lse, then the logits'
gradient written over the buffer), then the chunk's gradient products."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _host_buffers, reference
from . import targets
from .chunking import auto_chunk_size
from .weight_grad import WeightGrad, resolve_accum


def _loop(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
          class_weight: Tensor | None, ce_args: tuple, chunk_size: int,
          accum_dtype: torch.dtype | None, *, row_grad: Tensor | None, lse_in: Tensor | None,
          need_h: bool, need_w: bool, need_b: bool, lse_grad: Tensor | None = None):
    """The chunked loop shared by the three ops.

    target: class indices (N,) or class probabilities (N, V) (see targets.py).
    class_weight: per-class weights (V,) or None, as the cross-entropy ops' weight.
    lse_in None: computes per-row loss (acc) and lse (reference.LSE_DTYPE); else the
    lse this computed, for the gradients. row_grad: the gradient of the loss with
    respect to each row's loss in acc, a 0-dim tensor (same for every row) or (N,); None: no
    gradients. lse_grad: (N,) gradients of the lse in its dtype (return_lse), or None.
    Returns (loss_rows, lse, grad_hidden, grad_weight, grad_bias) with None for what was
    not computed.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    prob = targets.is_prob(target)
    # (float64 only where a float64 probability target or class weight asks for it)
    cdt = targets.compute_dtype(hidden.dtype, target, class_weight)
    acc = targets.acc_dtype(hidden.dtype, target, class_weight)
    ops = _backend.ops_for(hidden.device)
    chunk = chunk_size if chunk_size > 0 else auto_chunk_size(N, V, H, hidden.dtype,
                                                             hidden.device)
    chunk = max(1, min(chunk, N))
    grads = row_grad is not None
    if class_weight is not None:  # (the ops would convert it once per chunk)
        class_weight = class_weight.to(acc).contiguous()
    need_h, need_w, need_b = grads and need_h, grads and need_w, grads and need_b

    loss_rows = lse = None
    if lse_in is None:
        loss_rows = hidden.new_empty((N,), dtype=acc)
        # (float64 as the cross-entropy ops keep it: the exact M + log S of float rows,
        # which the backward splits again; linear_cross_entropy returns it in acc)
        lse = hidden.new_empty((N,), dtype=reference.LSE_DTYPE)
    big = {"dtype": hidden.dtype, "device": hidden.device}
    # The gradients laid out as F.linear's backward lays them out (grad_transposed), each
    # product computed in that orientation, as PyTorch's: no copy.
    h_t, w_t = grad_transposed(hidden, weight)
    grad_h = grad_hT = None
    if need_h and h_t:
        grad_hT = _host_buffers.empty((H, N), **big)
    elif need_h:
        grad_h = _host_buffers.empty((N, H), **big)
    # One chunk: one product, accumulated inside the matmul, rounded once, as F.linear's
    # backward does; no separate accumulator is needed.
    w_accum = weight.dtype if chunk >= N else resolve_accum(weight.dtype, accum_dtype)
    # (transposed: the (H, V) gradient h^T @ grad_logits accumulated, returned as its .t())
    gw = WeightGrad(weight.t() if w_t else weight, w_accum) if need_w else None
    gb = None
    if need_b:
        gb = torch.zeros((V,), dtype=resolve_accum(bias.dtype, accum_dtype),
                         device=bias.device)
    buf = _host_buffers.empty((chunk * V,), **big) if N > 0 else None
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
        if cdt != x3.dtype:
            x3 = x3.to(cdt)
        chunk_args = ce_args
        if prob:  # (the chunk's smoothing applied where its target is converted: see chunk)
            t2, smoothing = targets.chunk(target[s:e], cdt, ce_args[1])
            chunk_args = (ce_args[0], smoothing, *ce_args[2:])
        else:
            t2 = target[s:e]
        t2 = t2.unsqueeze(-1)
        if lse_in is None:
            loss_c, lse_c = ops.ce_fwd(x3, t2, class_weight, *chunk_args, 1.0, False)
            loss_rows[s:e].copy_(loss_c.view(n))
            lse[s:e].copy_(lse_c.view(n))
        if not grads:
            continue
        lse_c = (lse if lse_in is None else lse_in)[s:e].unsqueeze(-1)
        g = row_grad.expand(n, 1) if row_grad.dim() == 0 else row_grad[s:e].unsqueeze(-1)
        g_lse = None if lse_grad is None else lse_grad[s:e].unsqueeze(-1)
        ops._ce_bwd_inplace(g, g_lse, x3, t2, class_weight, lse_c, *chunk_args, 1.0)
        if x3.dtype != logits.dtype:
            logits.copy_(x3.view(n, V))  # the float64 gradient, rounded as F.linear gets it
        if grad_h is not None:
            torch.mm(logits, weight, out=grad_h[s:e])
        elif need_h:  # (mm_mat1_backward's product for a column-major input)
            torch.mm(weight.t(), logits.t(), out=grad_hT[:, s:e])
        if need_w and w_t:  # (mm_mat2_backward's for a weight whose .t() is not column-major)
            gw.add(h, logits)
        elif need_w:
            gw.add(logits, h)
        if need_b:  # column sums as a matrix-vector product (fp32 accumulation inside)
            ones = ones if ones is not None and ones.shape[0] == n else logits.new_ones((n,))
            if gb.dtype == logits.dtype:
                gb.addmv_(logits.t(), ones)
            else:  # rounded to the input dtype once per chunk, summed across chunks in gb
                gb.add_(torch.mv(logits.t(), ones))
    del buf
    if grad_hT is not None:
        grad_h = grad_hT.t()
    grad_w = gw.result() if need_w else None
    if grad_w is not None and w_t:
        grad_w = grad_w.t()
    grad_b = gb.to(bias.dtype) if need_b else None
    return loss_rows, lse, grad_h, grad_w, grad_b


def grad_transposed(hidden: Tensor, weight: Tensor) -> tuple[bool, bool]:
    """Whether F.linear's backward returns hidden's (N, H) and weight's (V, H) gradients
    transposed (strides (1, N) and (1, V)) rather than contiguous. The product is
    mm(hidden, weight.t()) (addmm with a bias), whose backward (mm_mat1_backward,
    mm_mat2_backward in autograd's FunctionsManual.cpp) computes a matrix's gradient in
    the transposed orientation where that matrix is column-major (strides (1, rows)): for
    hidden, where it is; for weight.t(), where it is not, since its gradient is the
    column-major one's transpose (a contiguous weight's is contiguous; a transposed or
    sliced weight's is transposed). The fake kernels give the same strides."""
    h_t = hidden.stride(0) == 1 and hidden.stride(1) == hidden.shape[0]
    w_t = not (weight.stride(1) == 1 and weight.stride(0) == weight.shape[1])
    return h_t, w_t


def _placeholder(like: Tensor) -> Tensor:
    return like.new_empty((0,))
