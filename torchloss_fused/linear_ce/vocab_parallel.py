"""Linear cross-entropy with the LM head's weight sharded over the vocabulary (DTensor
``Shard(0)`` of the (V, H) weight: a ColwiseParallel head), without gathering the weight
and without materialising any logits beyond one chunk of the local slice.

Forward, per chunk of rows: the slice's logits (one product), their local log-sum-exp and
the target's logit when it falls in the slice (the kernels), the logit sum label smoothing
needs (weighted by the slice's class weights); then two all-reduces per call give every
row's whole-vocabulary lse. A probability target (N, V) has its columns split as the
vocabulary; per chunk, its weighted total and weighted logit sum over the slice come from
../vocab_parallel.py's PyTorch code for such targets, and join the same all-reduces.

Backward recomputes each chunk's logits, writes the slice's gradient over them with the
global lse and the whole vocabulary's class weights (the kernels, label smoothing
included; PyTorch ops for probability targets), and turns it into the chunk's part of
grad_hidden (summed over the vocabulary ranks later: a Partial DTensor), and into the
local slice's grad_weight and grad_bias (no communication).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .. import vocab_parallel as vp
from .._higher_order import differentiable_grads, reference_backward
from . import targets
from .chunking import auto_chunk_size
from .weight_grad import WeightGrad, resolve_accum


def vocab_sharded(weight) -> bool:
    return vp.is_dtensor(weight) and any(p.is_shard(0) for p in weight.placements)


def head_vocab_sharded(hidden, weight, *args, **kwargs) -> bool:
    """linear_cross_entropy's arguments ask for this path (see vocab_sharded)."""
    return vocab_sharded(weight)


class _Layout:
    """Mesh dims splitting the vocabulary (the weight's Shard(0)) and the rest, where
    hidden's rows may be split (Shard(0)) or replicated and the weight is replicated."""

    def __init__(self, hidden, weight):
        from torch.distributed.tensor import Partial, Replicate, Shard

        self.mesh = weight.device_mesh
        # (strided shards hold no contiguous range of rows: they are made whole)
        vocab = [type(p) is Shard and p.dim == 0 for p in weight.placements]
        self.vocab_dims = tuple(vocab)
        self.weight_placements = tuple(p if v else Replicate()
                                       for p, v in zip(weight.placements, vocab))
        self.hidden_placements = tuple(
            Replicate() if v or not ((type(p) is Shard and p.dim == 0) or p.is_replicate())
            else p
            for p, v in zip(hidden.placements, vocab))
        # hidden's gradient sums over the vocabulary slices; the head's over the row splits.
        self.grad_hidden_placements = tuple(Partial() if v else p for p, v in zip(
            self.hidden_placements, vocab))
        self.grad_weight_placements = tuple(Partial() if h.is_shard(0) else p for p, h in zip(
            self.weight_placements, self.hidden_placements))
        self.groups = tuple(self.mesh.get_group(i) for i, v in enumerate(vocab) if v)
        self.vocab = weight.shape[0]
        _, offset = vp.compute_local_shape_and_global_offset(weight.shape, self.mesh,
                                                             self.weight_placements)
        self.offset = offset[0]
        self.rows = hidden.shape[0]


def _chunk_logits(h: Tensor, w: Tensor, b: Tensor | None, out: Tensor) -> Tensor:
    if b is None:
        return torch.mm(h, w.t(), out=out)
    return torch.addmm(b, h, w.t(), out=out)


class _LinearCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, class_weight, layout, ignore_index, eps,
                z_loss, softcap, chunk_size, accum_dtype):
        h, w = hidden.to_local(), weight.to_local()
        b = None if bias is None else bias.to_local()
        ctx.set_materialize_grads(False)
        N, H = h.shape
        Vl = w.shape[0]
        prob = targets.is_prob(target)
        acc = targets.acc_dtype(h.dtype, target, class_weight)
        cw, cw_here = _class_weights(class_weight, acc, layout.offset, Vl)
        chunk = chunk_size or auto_chunk_size(N, max(Vl, 1), H, h.dtype, h.device)
        chunk = max(1, min(chunk, N))
        # (per-row numbers in vp.ROW_DTYPE, float64: see ../vocab_parallel.py)
        lse_local = h.new_empty((N, 1), dtype=vp.ROW_DTYPE)
        sums = h.new_zeros((2 if eps > 0 or prob else 1, N, 1), dtype=vp.ROW_DTYPE)
        buf = h.new_empty((chunk * Vl,))
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            x3 = _chunk_logits(h[s:e], w, b, buf[:(e - s) * Vl].view(e - s, Vl)).unsqueeze(-1)
            if prob:  # (the target's local columns, as a (n, V_local, 1) slice)
                lse_local[s:e], sums[:, s:e] = vp.prob_sums(
                    x3, target[s:e, :, None], acc, eps, layout.vocab, cw_here, softcap, 1.0)
                continue
            tg = vp._Target(target[s:e, None], ignore_index, layout.offset, Vl)
            sums[0, s:e] = tg.logit_of(x3, acc, softcap, 1.0)
            if eps > 0:
                lse_local[s:e], sums[1, s:e] = vp.kernel_lse_and_weighted_sum(
                    x3, tg, cw_here, softcap, 1.0)
            else:
                lse_local[s:e] = vp._kernel_lse(x3, tg, softcap, 1.0)
        del buf
        lse, sums = vp._all_reduce_lse(lse_local, sums, layout.groups)
        if prob:
            loss = vp.prob_loss(lse, sums, z_loss)
        else:
            loss = vp.index_loss(lse, sums, target[:, None], cw, ignore_index, eps, z_loss,
                                 layout.vocab)
        # (a probability target's rows keep their total weight, summed over the slices)
        # (hidden, weight, bias, the inputs, serve create_graph: _reference_grads)
        ctx.save_for_backward(h, w, b, target, class_weight, lse, sums[0] if prob else None,
                              hidden, weight, bias)
        ctx.layout, ctx.chunk = layout, chunk
        ctx.args = (ignore_index, eps, z_loss, softcap, accum_dtype)
        ctx.meta = tuple((t.shape, t.stride()) if t is not None else None
                         for t in (hidden, weight, bias))
        return _rows_dtensor(loss.to(acc), layout), _rows_dtensor(lse, layout)

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        if (grad_loss is None and grad_lse is None) or not any(ctx.needs_input_grad[:3]):
            return (None,) * 12
        h, w, b, target, class_weight, lse, q_total, *inputs = ctx.saved_tensors
        if reference_backward(grad_loss, grad_lse):
            return _reference_grads(ctx, inputs, target, class_weight, grad_loss,
                                    grad_lse) + (None,) * 9
        layout, chunk = ctx.layout, ctx.chunk
        ignore_index, eps, z_loss, softcap, accum_dtype = ctx.args
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = b is not None and ctx.needs_input_grad[2]
        N, H = h.shape
        Vl = w.shape[0]
        acc = targets.acc_dtype(h.dtype, target, class_weight)
        g_rows = (lse.new_zeros(lse.shape, dtype=acc) if grad_loss is None
                  else _local_rows(grad_loss, layout, acc))
        g_lse = None if grad_lse is None else _local_rows(grad_lse, layout, lse.dtype)
        cw, cw_here = _class_weights(class_weight, acc, layout.offset, Vl)
        grad_h = h.new_empty((N, H)) if need_h else None
        gw = WeightGrad(w, w.dtype if chunk >= N else resolve_accum(w.dtype, accum_dtype)) \
            if need_w else None
        gb = torch.zeros((Vl,), dtype=resolve_accum(b.dtype, accum_dtype),
                         device=b.device) if need_b else None
        buf = h.new_empty((chunk * Vl,))
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            logits = _chunk_logits(h[s:e], w, b, buf[:(e - s) * Vl].view(e - s, Vl))
            x3 = logits.unsqueeze(-1)
            if q_total is not None:  # probability targets
                vp.prob_grad_into(x3, x3, target[s:e, :, None], g_rows[s:e],
                                  None if g_lse is None else g_lse[s:e], lse[s:e], q_total[s:e],
                                  acc, eps, z_loss, layout.vocab, cw_here, softcap, 1.0)
            else:
                tg = vp._Target(target[s:e, None], ignore_index, layout.offset, Vl)
                vp.index_grad(x3, tg, g_rows[s:e], None if g_lse is None else g_lse[s:e],
                              lse[s:e], cw, cw_here, eps, z_loss, layout.vocab, softcap, 1.0,
                              inplace=True)
            if need_h:
                torch.mm(logits, w, out=grad_h[s:e])
            if need_w:
                gw.add(logits, h[s:e])
            if need_b:
                gb.add_(logits.sum(0, dtype=acc))
        del buf
        grads = (
            _as_dtensor(grad_h, layout.grad_hidden_placements, ctx.meta[0], layout)
            if need_h else None,
            _as_dtensor(gw.result(), layout.grad_weight_placements, ctx.meta[1], layout)
            if need_w else None,
            _as_dtensor(gb.to(b.dtype), layout.grad_weight_placements, ctx.meta[2], layout)
            if need_b else None,
        )
        return grads + (None,) * 9


def _reference_grads(ctx, inputs, target, class_weight, grad_loss, grad_lse) -> tuple:
    """hidden's, the head's and the bias's gradients for create_graph=True (or vmap-batched
    upstream gradients): autograd through ops.materialised_rows (the whole logits, their
    classes gathered), recorded so that they can be differentiated again, as the unsharded
    op does; the chunked gradients would be constants to autograd. inputs: the DTensor
    hidden, weight and bias; target: the local one."""
    from .ops import materialised_rows

    layout = ctx.layout
    hidden, weight, bias = inputs
    shape = (layout.rows, layout.vocab) if targets.is_prob(target) else (layout.rows,)
    t = vp._from_local(target, layout, _target_placements(layout, target), shape)
    cw = vp.replicated_like(class_weight, hidden)
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
             bias is not None and ctx.needs_input_grad[2])
    return differentiable_grads(
        lambda h, w, b: materialised_rows(h, w, b, t, cw, *ctx.args[:4]),
        (hidden, weight, bias), needs, (grad_loss, grad_lse))


def _class_weights(class_weight: Tensor | None, acc, offset: int, Vl: int):
    """The whole vocabulary's class weights in the accumulation dtype (the normalisers and
    the targets' weights need all of them), and the local slice's."""
    cw = reference._class_vector(class_weight, acc)
    return cw, None if cw is None else cw[offset:offset + Vl]


def _rows_placements(layout: _Layout) -> tuple:
    return layout.hidden_placements  # rows split as hidden's rows, replicated elsewhere


def _rows_dtensor(rows: Tensor, layout: _Layout):
    """(N_local, 1) per-row values as the (N,) DTensor of the loss's layout."""
    return vp.DTensor.from_local(rows[:, 0], layout.mesh, _rows_placements(layout),
                                 run_check=False, shape=torch.Size((layout.rows,)),
                                 stride=(1,))


def _local_rows(grad, layout: _Layout, acc) -> Tensor:
    """An upstream gradient of per-row values as the local (N_local, 1) rows."""
    return grad.redistribute(layout.mesh, _rows_placements(layout)).to_local().to(acc)[:, None]


def _target_placements(layout: _Layout, target) -> tuple:
    """Class indices: as the rows. Probabilities (N, V): rows as hidden's, columns split as
    the head's vocabulary (Shard(1) splits V as the weight's Shard(0) does)."""
    from torch.distributed.tensor import Shard

    rows = _rows_placements(layout)
    if not targets.is_prob(target):
        return rows
    return tuple(Shard(1) if v else p for p, v in zip(rows, layout.vocab_dims))


def _as_dtensor(local: Tensor, placements, meta, layout: _Layout):
    shape, stride = meta
    return vp.DTensor.from_local(local, layout.mesh, placements, run_check=False, shape=shape,
                                 stride=stride)


def loss_rows(hidden, weight, bias, target, class_weight, ignore_index: int,
              label_smoothing: float, z_loss: float, softcap: float, chunk_size: int,
              accum_dtype):
    """Per-row loss and lse (DTensors shaped (N,)) of (N, H) hidden against a
    vocabulary-sharded (V, H) weight, as linear_cross_entropy's reductions expect them.
    class_weight: (V,), any layout (every rank takes the whole vector)."""
    layout = _Layout(hidden, weight)
    hidden = hidden.redistribute(layout.mesh, layout.hidden_placements)
    weight = weight.redistribute(layout.mesh, layout.weight_placements)
    if bias is not None:
        bias = bias.redistribute(layout.mesh, layout.weight_placements)
    t = target.redistribute(layout.mesh, _target_placements(layout, target)).to_local()
    return _LinearCrossEntropy.apply(hidden, weight, bias, t, vp._whole(class_weight), layout,
                                     ignore_index, label_smoothing, z_loss, softcap, chunk_size,
                                     accum_dtype)
