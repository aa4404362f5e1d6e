"""Cross-entropy and focal loss of logits sharded on the class dim (vocab-parallel).

A tensor-parallel LM head (ColwiseParallel) leaves each rank a slice of the vocabulary.
Gathering the full logits to compute the loss would cost every rank the whole logits
tensor; instead each rank reduces its own slice to a few numbers per row (local
log-sum-exp, the target's logit when the target falls in the slice, the weighted sum of
logits label smoothing needs), the ranks all-reduce those (one max, one sum), and each
rank writes the gradient of its own slice. Memory per rank stays that of its slice, and
the values equal the unsharded loss (tests compare with F.cross_entropy on the gathered
logits).

functional.py comes here when the input is a DTensor with Shard(1) (the class dim) on some
mesh dim; other mesh dims may shard the rows or replicate. The per-row results come back
as DTensors (rows sharded as the input's rows, replicated over the class-sharding mesh
dims), so functional.py reduces them exactly as it reduces local ones.

The arithmetic is reference.py's, on local chunks with the global normalisers (C, the
summed weights, the all-reduced lse): the same formulas the kernels implement. The per-row
numbers (the slices' lses, the sums, the global lse, the loss before its last rounding)
are float64 (reference.LSE_DTYPE) for every input dtype, as the ops keep lse: the kernels'
float64 M + log S is carried across the ranks, so a sharded loss and its gradient are as
accurate as the unsharded ones at any logit magnitude (loss = lse - s_t, formed in float32,
would lose an ulp of lse).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, ParamSpec, TypeVar

import torch
from torch import Tensor

from . import _backend, reference
from ._higher_order import differentiable_grads, reference_backward, unwrapped

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # torch without distributed, or before the public DTensor API (2.5)
    DTensor = None

P = ParamSpec("P")
R = TypeVar("R")


def is_dtensor(x) -> bool:
    return DTensor is not None and isinstance(x, DTensor)


def class_sharded(x3) -> bool:
    """Whether (B, C, D) logits are a DTensor split along the class dim."""
    return is_dtensor(x3) and any(p.is_shard(1) for p in x3.placements)


def eager_under_compile_when(
    needs_eager: Callable[..., bool],
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Under torch.compile, a call for which needs_eager(*args, **kwargs) holds (its loss
    is vocab-parallel) runs eagerly behind a graph break (fullgraph=True refuses it): its
    collectives are plain torch.distributed calls, and the break comes before any view of
    a DTensor argument is made (AOTAutograd cannot hand a DTensor view across a graph
    boundary)."""
    def decorate(loss_fn: Callable[P, R]) -> Callable[P, R]:
        eager = torch.compiler.disable(loss_fn)

        @functools.wraps(loss_fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            if torch.compiler.is_compiling() and needs_eager(*args, **kwargs):
                return eager(*args, **kwargs)
            return loss_fn(*args, **kwargs)

        return wrapper

    return decorate


def input_class_sharded(input, *args, **kwargs) -> bool:
    """Whether a loss's input, shaped (C) or (N, C, ...), is a DTensor split on C."""
    return is_dtensor(input) and input.dim() > 0 and any(
        p.is_shard(1 if input.dim() > 1 else 0) for p in input.placements)


def rows_placements(logits_placements) -> tuple:
    """Placements of the per-row (B, D) tensors of (B, C, D) logits laid out so: rows split
    as the logits' rows (dim 0, or dim 2 -> 1), replicated where the logits replicate or
    split the classes."""
    return tuple(Replicate() if p.is_replicate() or p.dim == 1 else Shard(0 if p.dim == 0 else 1)
                 for p in logits_placements)


def replicated_like(v, input):
    """A module's plain per-class buffer as a replicated DTensor on a DTensor input's mesh
    (every rank holds the same buffer: no communication); anything else unchanged."""
    if v is None or not is_dtensor(input) or is_dtensor(v) or not isinstance(v, Tensor):
        return v
    mesh = input.device_mesh
    return DTensor.from_local(v, mesh, [Replicate()] * mesh.ndim, run_check=False)


def gather_classes(x3):
    """x3 with every class-dim shard gathered (for the rare paths that need whole rows:
    gradients for the weight or a probability target, torch.func)."""
    if not class_sharded(x3):
        if class_sharded(unwrapped(x3)):
            # (A torch.func wrapper: its DTensor cannot be redistributed from here, and
            # DTensor's own rules gave a wrong gradient for the reference code on it.)
            raise NotImplementedError(
                "torch.func transforms of these losses over logits sharded on the class dim "
                "are not supported; gather the classes before the transform "
                "(x.redistribute(placements=[Replicate()]) or x.full_tensor()), or use "
                "autograd (create_graph=True works on sharded logits)")
        return x3
    return x3.redistribute(placements=[Replicate() if p.is_shard(1) else p
                                       for p in x3.placements])


@dataclass(frozen=True)
class _Layout:
    """Where this rank's slice of the (B, C, D) logits lies, and who shares its rows."""
    mesh: object
    logits_placements: tuple
    rows_placements: tuple
    groups: tuple  # process groups of the mesh dims that split the classes
    offset: int  # first class of the local slice
    num_classes: int  # C of the whole tensor
    rows_shape: tuple  # global (B, D)


def _layout(x3) -> tuple[_Layout, object]:
    """The layout of x3, and x3 redistributed so every mesh dim splits rows or classes or
    replicates (a partial sum, or a split of anything else, is made whole first)."""
    # (A strided shard, as FSDP + TP combinations make, does not hold a contiguous range of
    # classes: it is made whole too.)
    usable = [p if (type(p) is Shard and p.dim in (0, 1, 2)) or p.is_replicate() else Replicate()
              for p in x3.placements]
    if tuple(usable) != tuple(x3.placements):
        x3 = x3.redistribute(placements=usable)
    mesh = x3.device_mesh
    _, offset = compute_local_shape_and_global_offset(x3.shape, mesh, usable)
    rows = rows_placements(usable)
    groups = tuple(mesh.get_group(i) for i, p in enumerate(usable) if p.is_shard(1))
    B, C, D = x3.shape
    return _Layout(mesh, tuple(usable), rows, groups, offset[1], C, (B, D)), x3


def _as_rows_local(t, layout: _Layout) -> Tensor:
    """The local rows of a per-row (B, D) tensor, for this rank's rows."""
    return t.redistribute(layout.mesh, layout.rows_placements).to_local()


def _as_logits_local(t, layout: _Layout) -> Tensor:
    """The local slice of a (B, C, D) tensor laid out like the logits."""
    return t.redistribute(layout.mesh, layout.logits_placements).to_local()


def _whole(v) -> Tensor | None:
    return v.full_tensor() if is_dtensor(v) else v


def _to_rows_dtensor(local: Tensor, layout: _Layout):
    return DTensor.from_local(local, layout.mesh, layout.rows_placements, run_check=False,
                              shape=torch.Size(layout.rows_shape),
                              stride=(layout.rows_shape[1], 1))


def _meta(x3) -> tuple:
    return x3.shape, x3.stride()


def _to_logits_dtensor(local: Tensor, layout: _Layout, meta: tuple):
    """The local gradient as a DTensor laid out like the logits, with their global shape
    and strides given (derived ones can differ for uneven slices, and a later view of
    the gradient would then copy it)."""
    shape, stride = meta
    return DTensor.from_local(local, layout.mesh, layout.logits_placements, run_check=False,
                              shape=shape, stride=stride)


def _from_local(local: Tensor, layout: _Layout, placements, shape) -> Tensor:
    """A local tensor as the DTensor of global `shape` (contiguous) laid out by placements."""
    stride, step = [], 1
    for n in reversed(shape):
        stride.insert(0, step)
        step *= max(n, 1)
    return DTensor.from_local(local, layout.mesh, placements, run_check=False,
                              shape=torch.Size(shape), stride=tuple(stride))


def _reference_grad(ctx, x3, target, vector, forward, args, grads) -> Tensor:
    """The logits' gradient for create_graph=True (or vmap-batched upstream gradients):
    autograd through the reference `forward` on the gathered classes, recorded so that it
    can be differentiated again, as the unsharded ops do (_higher_order.py); the kernels'
    gradient would be a constant to autograd, and the second-order terms would vanish.
    x3: the DTensor logits (saved as the Function's input, so the graph reaches the
    caller's); target, vector: the local target and the whole class vector."""
    layout = ctx.layout
    if target.is_floating_point():
        t = _from_local(target, layout, layout.logits_placements, ctx.x3_meta[0])
    else:
        t = _to_rows_dtensor(target, layout)
    v = replicated_like(vector, x3)
    (g,) = differentiable_grads(lambda x: forward(gather_classes(x), t, v, *args), [x3],
                                [True], grads)
    return g


def _local(grad, layout: _Layout) -> Tensor | None:
    """An incoming per-row gradient (a DTensor, perhaps partial) as this rank's rows."""
    return None if grad is None else _as_rows_local(grad, layout)


ROW_DTYPE = reference.LSE_DTYPE  # of the per-row numbers (see the module's docstring)


def _all_reduce_lse(lse_local: Tensor, sums: Tensor, groups) -> tuple[Tensor, Tensor]:
    """The log-sum-exp over all slices of each row, and `sums` (k, b, D) summed over the
    slices: two collectives per mesh dim, whatever k. lse_local and sums in ROW_DTYPE."""
    top = lse_local.clone()
    for g in groups:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=g)
    # A row whose max is -inf (all logits -inf) shifts by 0 and stays -inf, as
    # torch.logsumexp does; a NaN (a NaN or +inf logit in some slice) spreads to the row.
    shift = torch.where(top.isfinite(), top, torch.zeros((), dtype=top.dtype, device=top.device))
    parts = torch.cat([torch.exp(lse_local - shift).unsqueeze(0), sums])
    for g in groups:
        dist.all_reduce(parts, op=dist.ReduceOp.SUM, group=g)
    return torch.log(parts[0]) + shift, parts[1:]


class _Target:
    """A chunk's class-index targets, seen from the local slice."""

    def __init__(self, t: Tensor, ignore_index: int, offset: int, local_classes: int):
        t = t.long()
        self.valid = t != ignore_index
        self.safe = t.masked_fill(~self.valid, 0)  # a global class index
        local = self.safe - offset
        self.here = self.valid & (local >= 0) & (local < local_classes)
        self.local = torch.where(self.here, local, 0)

    def logit_of(self, x: Tensor, acc, softcap: float, logit_scale: float) -> Tensor:
        """The (transformed) logit at the target where it lies in this slice, 0 elsewhere
        (summed over the slices), read from the (B, C, D) logits: one element per row."""
        if x.shape[1] == 0:
            return torch.zeros(self.here.shape, dtype=acc, device=x.device)
        x_t = x.gather(1, self.local.unsqueeze(1)).squeeze(1).to(acc)
        return torch.where(self.here, reference._transform(x_t, softcap, logit_scale), 0)

    def kernel_target(self) -> Tensor:
        """Local class indices where the target is in this slice, _NOWHERE elsewhere."""
        return torch.where(self.here, self.local, _NOWHERE)


# The ignore_index given to the kernels for rows whose target is not in the slice.
_NOWHERE = -1


def _kernel_lse(x: Tensor, tg: _Target, softcap: float, logit_scale: float) -> Tensor:
    """Each row's log-sum-exp over the local slice (ROW_DTYPE), from the cross-entropy
    kernel (one read of the slice, no float32 copy)."""
    ops = _backend.ops_for(x.device)
    return ops.ce_fwd(x, tg.kernel_target(), None, _NOWHERE, 0.0, 0.0, softcap, logit_scale,
                      False)[1]  # (in ROW_DTYPE, the ops' lse dtype)


def _lse_typed(v: Tensor) -> Tensor:
    """The global lse, or its gradient, as the backward kernel takes it."""
    return v.to(reference.LSE_DTYPE)


def kernel_lse_and_weighted_sum(x: Tensor, tg: _Target, w_here: Tensor | None,
                                softcap: float, logit_scale: float) -> tuple[Tensor, Tensor]:
    """Each row's log-sum-exp over the local slice and sum_c w_c s_c of its transformed
    logits (label smoothing's share of the slice), from one read of the slice: with label
    smoothing 1 the kernel's loss is L = sum_c w_c (lse_l - s_c) / C_l whatever the target
    (its term has weight 1 - 1 = 0), so the sum is W_l lse_l - C_l L, W_l = sum_c w_c,
    formed in ROW_DTYPE: its error is C_l times L's, which is of the order of the logits'
    spread, not of their magnitude. Both in ROW_DTYPE."""
    Cl = x.shape[1]
    if Cl == 0:  # (no class of this slice can be a kernel's target)
        return (_kernel_lse(x, tg, softcap, logit_scale),
                x.new_zeros(tg.here.shape, dtype=ROW_DTYPE))
    ops = _backend.ops_for(x.device)
    L, lse = ops.ce_fwd(x, tg.local, w_here, _NOWHERE, 1.0, 0.0, softcap, logit_scale, False)
    # (W_l summed in ROW_DTYPE, as index_loss sums W: W lse - sum_l W_l lse_l must cancel
    # to the last bits, lse being near the logits' magnitude)
    W = w_here.sum(dtype=ROW_DTYPE) if w_here is not None else Cl
    total = W * lse - Cl * L  # (in lse's dtype, ROW_DTYPE)
    # A slice of only -inf logits (masked vocabulary): lse_l = -inf makes L NaN, where
    # the sum itself is sum_c w_c * -inf.
    minus_inf = torch.full((), -float("inf"), dtype=ROW_DTYPE, device=x.device)
    empty_sum = (w_here * minus_inf).sum() if w_here is not None else minus_inf
    return lse, torch.where(lse == minus_inf, empty_sum, total)


def _kernel_grad(x: Tensor, tg: _Target, A: Tensor, B: Tensor, lse: Tensor, softcap: float,
                 logit_scale: float, inplace: bool) -> Tensor:
    """The slice's gradient A p - B [c = t] (times the softcap/scale derivative), p the
    softmax under the global lse, from the cross-entropy backward kernel: a row whose
    target is in the slice has it as its target with upstream gradient B (giving
    B (p - [c = t]), the target's term formed in float32 by the kernel), and every row gets
    A - B (or A) as the gradient of its lse (giving that times p).

    Ignored rows (A = 0 there, no lse gradient) come out as exact zeros, as in the
    unsharded path, whatever their logits hold: the kernel writes zeros for a row without
    target whose lse gradient is 0. A, B and lse in ROW_DTYPE; B is rounded to the
    accumulation dtype, the kernel's upstream gradient, and A - B formed after."""
    g = torch.where(tg.here, B, 0).to(reference.acc_dtype(x.dtype))
    return _ce_bwd(x, inplace, g, _lse_typed(A - g), x, tg.kernel_target(), None,
                   _lse_typed(lse), _NOWHERE, 0.0, 0.0, softcap, logit_scale)


def _ce_bwd(x: Tensor, inplace: bool, *args) -> Tensor:
    """The backward kernel, writing over x when inplace."""
    ops = _backend.ops_for(x.device)
    if not inplace:
        return ops._ce_bwd(*args)
    ops._ce_bwd_inplace(*args)
    if ops is getattr(torch.ops, "torchloss_fused", None):
        torch.autograd.graph.increment_version(x)  # (as _ops.py does for this op)
    return x


def _kernel_grad_smoothed(x: Tensor, tg: _Target, g: Tensor, A: Tensor, lse: Tensor,
                          w_here: Tensor | None, eps: float, C: int, softcap: float,
                          logit_scale: float, inplace: bool) -> Tensor:
    """The slice's gradient with label smoothing eps over all C classes,
    A p - B [c = t] - (g eps / C) w_c with B = g (1 - eps) w_t, from the backward kernel's
    own smoothing: given eps_k and upstream g_k chosen so that its smoothing term
    g_k eps_k / C_local w_c and its target term g_k (1 - eps_k) w_t equal ours, with its
    coefficient of p topped up to A through the lse gradient. A valid row whose target is
    in another slice is given class 0 as its target (its smoothing term applies to every
    class), and that one element is then rewritten, computed in float32."""
    Cl = x.shape[1]
    if Cl == 0:
        return x if inplace else torch.empty_like(x, memory_format=torch.contiguous_format)
    if eps < 1:
        r = eps * Cl / ((1 - eps) * C)
        eps_k, g_scale = r / (1 + r), (1 - eps) * (1 + r)
    else:
        eps_k, g_scale = 1.0, Cl / C
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    g_k = torch.where(tg.valid, g * g_scale, 0)  # (in g's dtype: the kernel's grad_loss)
    elsewhere = tg.valid & ~tg.here
    t_k = torch.where(tg.here, tg.local, torch.where(tg.valid, 0, _NOWHERE))
    w_tk = w_here[t_k.clamp_min(0)] if w_here is not None else 1.0
    W_local = w_here.sum() if w_here is not None else Cl
    g_lse = A - torch.where(tg.valid, g_k * ((1 - eps_k) * w_tk + eps_k / Cl * W_local), zero)
    x0 = x[:, 0].to(lse.dtype, copy=True)  # (read before an in-place backward writes x)
    out = _ce_bwd(x, inplace, g_k, _lse_typed(g_lse), x, t_k, w_here, _lse_typed(lse),
                  _NOWHERE, eps_k, 0.0, softcap, logit_scale)
    s0 = reference._transform(x0, softcap, logit_scale)
    w0 = w_here[0] if w_here is not None else 1.0
    v0 = (A * torch.exp(s0 - lse) - g * (eps / C) * w0) * reference._transform_deriv(
        s0, softcap, logit_scale)
    out[:, 0] = torch.where(elsewhere, v0.to(out.dtype), out[:, 0])
    return out


def check_targets(target, num_classes: int, ignore_index: int) -> None:
    """An out-of-range class-index target of a DTensor call is an error: an asynchronous
    device-side assertion on a GPU (no host synchronisation), an IndexError on CPU, raised
    on every rank of the target's mesh (a rank whose own rows are fine would otherwise
    wait forever in the loss's next collective)."""
    if torch.compiler.is_compiling():
        return
    # (the local values without to_local's autograd.Function, which a torch.func transform
    # refuses for want of a setup_context, whatever tensor it is applied to)
    t = target._local_tensor if is_dtensor(target) else target
    if t.numel() == 0 and not is_dtensor(target):
        return
    t = t.long()
    bad = ((t < 0) | (t >= num_classes)) & (t != ignore_index)
    if t.device.type != "cpu":
        torch._assert_async(~bad.any(), "cross_entropy: a target is out of range")
        return
    first = int(t[bad][0]) if bool(bad.any()) else None
    flag = torch.tensor([0 if first is None else 1])
    if is_dtensor(target):
        for dim in range(target.device_mesh.ndim):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=target.device_mesh.get_group(dim))
    if first is not None:
        raise IndexError(f"Target {first} is out of bounds.")
    if int(flag):
        raise IndexError("a target is out of bounds (on another rank's rows)")


def _local_chunks(x: Tensor, acc, softcap: float, logit_scale: float):
    for b0, b1 in reference._chunks(x):
        yield b0, b1, reference._rows(x[b0:b1], acc, softcap, logit_scale)


def _stack_rows(parts: list[list[Tensor]], k: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-chunk [lse_local, sum_1, ..., sum_k] (ROW_DTYPE) -> lse_local (b, D) and sums
    (k, b, D)."""
    if not parts:  # no local rows: the collectives still run, on empty tensors
        empty = x.new_empty((k + 1, x.shape[0], x.shape[2]), dtype=ROW_DTYPE)
        return empty[0], empty[1:]
    cols = [torch.cat(col) for col in zip(*parts)]
    return cols[0], torch.stack(cols[1:])


class _CrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy (and lse) of the local slice: (B_local, C_local, D) logits."""

    @staticmethod
    def forward(ctx, x3, target, weight, layout, ignore_index, eps, z_loss, softcap,
                logit_scale, inplace_backward):
        x = x3.to_local()
        ctx.set_materialize_grads(False)
        acc = reference.acc_dtype(x.dtype)
        C, off, Cl = layout.num_classes, layout.offset, x.shape[1]
        prob = target.is_floating_point()
        w = reference._class_vector(weight, acc)
        w_here = None if w is None else w[off:off + Cl]
        if prob:
            lse_local, sums = prob_sums(x, target, acc, eps, C, w_here, softcap, logit_scale)
        else:  # the kernel reads the slice once
            tg = _Target(target, ignore_index, off, Cl)
            sums = [tg.logit_of(x, acc, softcap, logit_scale).to(ROW_DTYPE)]
            if eps > 0:
                lse_local, smoothing = kernel_lse_and_weighted_sum(x, tg, w_here, softcap,
                                                                   logit_scale)
                sums.append(smoothing)
            else:
                lse_local = _kernel_lse(x, tg, softcap, logit_scale)
            sums = torch.stack(sums)
        lse, sums = _all_reduce_lse(lse_local, sums, layout.groups)
        if prob:
            loss = prob_loss(lse, sums, z_loss)
        else:
            loss = index_loss(lse, sums, target, w, ignore_index, eps, z_loss, C)
        # A probability target's rows also keep their total weight (sum over all slices);
        # x3, the input, serves create_graph (_reference_grad).
        ctx.save_for_backward(x, target, weight, lse, sums[0] if prob else None, x3)
        ctx.layout, ctx.inplace, ctx.x3_meta = layout, inplace_backward, _meta(x3)
        ctx.args = (ignore_index, eps, z_loss, softcap, logit_scale)
        # (the loss in acc, as the ops give it; lse in ROW_DTYPE, as the ops keep it)
        return _to_rows_dtensor(loss.to(acc), layout), _to_rows_dtensor(lse, layout)

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        x, target, weight, lse, q_total, x3 = ctx.saved_tensors
        if reference_backward(grad_loss, grad_lse):
            return (_reference_grad(ctx, x3, target, weight, reference.ce_fwd, ctx.args,
                                    (grad_loss, grad_lse)),) + (None,) * 9
        grad_loss, grad_lse = _local(grad_loss, ctx.layout), _local(grad_lse, ctx.layout)
        ignore_index, eps, z_loss, softcap, logit_scale = ctx.args
        acc = reference.acc_dtype(x.dtype)
        C, off, Cl = ctx.layout.num_classes, ctx.layout.offset, x.shape[1]
        w = reference._class_vector(weight, acc)
        w_here = None if w is None else w[off:off + Cl]
        if grad_loss is None:
            grad_loss = torch.zeros_like(lse)
        if not target.is_floating_point():
            tg = _Target(target, ignore_index, off, Cl)
            out = index_grad(x, tg, grad_loss.to(acc),
                             None if grad_lse is None else grad_lse.to(ROW_DTYPE), lse, w,
                             w_here, eps, z_loss, C, softcap, logit_scale, ctx.inplace)
            return (_to_logits_dtensor(out, ctx.layout, ctx.x3_meta),) + (None,) * 9
        out = x if ctx.inplace else torch.empty_like(x, memory_format=torch.contiguous_format)
        prob_grad_into(out, x, target, grad_loss.to(acc),
                       None if grad_lse is None else grad_lse.to(ROW_DTYPE), lse, q_total, acc,
                       eps, z_loss, C, w_here, softcap, logit_scale)
        return (_to_logits_dtensor(out, ctx.layout, ctx.x3_meta),) + (None,) * 9


def prob_sums(x: Tensor, target: Tensor, acc, eps: float, C: int, w_here: Tensor | None,
              softcap: float, logit_scale: float) -> tuple[Tensor, Tensor]:
    """For a slice (b, C_local, D) of the logits and its probability target: the slice's
    lse (b, D) and sums (2, b, D): the target's weighted total and its weighted logit sum
    (each rank's part of the whole row's), all in ROW_DTYPE. The logit sum is taken as
    m Q + sum q (s - m), m the row's largest logit here and Q the total: the loss
    lse Q - sum q s then cancels m exactly (in ROW_DTYPE), and its error is that of the
    logits' spread, as F's, not of their magnitude."""
    parts = []
    for b0, b1, s in _local_chunks(x, acc, softcap, logit_scale):
        q = _weighted_prob_target(target[b0:b1], s.dtype, eps, C, w_here)
        total = q.sum(-1)
        if s.shape[-1] == 0:
            m = torch.zeros_like(total)
        else:
            m = s.amax(-1)
            m = torch.where(torch.isfinite(m), m, 0)  # (rows of +-inf or NaN: q s as is)
        spread = (q * (s - m.unsqueeze(-1))).sum(-1)
        wide = total.to(ROW_DTYPE)
        parts.append([reference.stored_lse(s), wide, m.to(ROW_DTYPE) * wide + spread])
    return _stack_rows(parts, 2, x)


def prob_loss(lse: Tensor, sums: Tensor, z_loss: float) -> Tensor:
    """Per-row loss of probability targets from the whole rows' lse and prob_sums."""
    loss = lse * sums[0] - sums[1]
    return loss + z_loss * lse * lse if z_loss != 0 else loss


def prob_grad_into(out: Tensor, x: Tensor, target: Tensor, g: Tensor, g_lse: Tensor | None,
                   lse: Tensor, q_total: Tensor, acc, eps: float, z_loss: float, C: int,
                   w_here: Tensor | None, softcap: float, logit_scale: float) -> None:
    """Writes the slice's gradient for probability targets into out (which may be x),
    from the whole rows' lse and target totals q_total, for upstream gradients g (b, D)
    of the loss and g_lse of the lse (None: none)."""
    for b0, b1, s in _local_chunks(x, acc, softcap, logit_scale):
        g_c, l_c = g[b0:b1], lse[b0:b1]
        q = _weighted_prob_target(target[b0:b1], acc, eps, C, w_here)
        A = g_c * (q_total[b0:b1] + 2 * z_loss * l_c) if z_loss else g_c * q_total[b0:b1]
        A = A if g_lse is None else A + g_lse[b0:b1]
        hi, lo = reference.split_lse(l_c, acc)  # (p = exp(s - hi) exp(-lo), in acc)
        grad = reference._grad_chunk(s, hi, A.to(acc), g_c.unsqueeze(-1) * q, None, None,
                                     softcap, logit_scale, lo=lo)
        reference._write_grad(out, b0, b1, grad)


def index_loss(lse: Tensor, sums: Tensor, target: Tensor, w: Tensor | None, ignore_index: int,
               eps: float, z_loss: float, C: int) -> Tensor:
    """Per-row cross-entropy of class-index targets from whole-row numbers: the lse, the
    target's logit (sums[0]) and, with label smoothing, the weighted logit sum (sums[1])."""
    t = target.long()
    valid = t != ignore_index
    w_t = w[t.masked_fill(~valid, 0)] if w is not None else torch.ones_like(lse)
    loss = (1 - eps) * (w_t * (lse - sums[0]))
    if eps > 0:
        W = w.sum(dtype=ROW_DTYPE) if w is not None else C  # (see kernel_lse_and_...)
        loss = loss + eps / C * (W * lse - sums[1])
    if z_loss != 0:
        loss = loss + z_loss * lse * lse
    return torch.where(valid, loss, torch.zeros((), dtype=lse.dtype, device=lse.device))


def index_grad(x: Tensor, tg: _Target, g: Tensor, g_lse: Tensor | None, lse: Tensor,
               w: Tensor | None, w_here: Tensor | None, eps: float, z_loss: float, C: int,
               softcap: float, logit_scale: float, inplace: bool) -> Tensor:
    """The slice's gradient for class-index targets, from the kernels: reference.py's
    coefficients with the whole vocabulary's numbers (C, the weights w and their sum, the
    global lse), for upstream gradients g of the loss and g_lse of the lse (None: no lse
    gradient). Ignored rows without lse gradient come out as exact zeros. w_here: the
    slice's weights."""
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    w_t = w[tg.safe] if w is not None else torch.ones_like(lse)
    coef = (1 - eps) * w_t
    if eps > 0:
        coef = coef + eps / C * (w.sum() if w is not None else C)
    if z_loss != 0:
        coef = coef + 2 * z_loss * lse
    A = torch.where(tg.valid, g * coef, zero)
    A = A if g_lse is None else A + g_lse
    if eps == 0:
        return _kernel_grad(x, tg, A, g * w_t, lse, softcap, logit_scale, inplace)
    return _kernel_grad_smoothed(x, tg, g, A, lse, w_here, eps, C, softcap, logit_scale,
                                 inplace)


def _weighted_prob_target(q: Tensor, dtype, eps: float, C: int, w_here):
    """A chunk's probability target as (b, D, C_local), smoothed over all C classes and
    weighted: the q'' of reference._ce_chunk."""
    q = reference._smoothed_prob_target(q.to(dtype).movedim(1, -1), eps, C)
    return q * w_here if w_here is not None else q


class _Focal(torch.autograd.Function):
    """Per-row softmax focal loss (and lse) of the local slice."""

    @staticmethod
    def forward(ctx, x3, target, alpha, layout, alpha_scale, gamma, ignore_index):
        x = x3.to_local()
        ctx.set_materialize_grads(False)
        acc = reference.acc_dtype(x.dtype)
        tg = _Target(target, ignore_index, layout.offset, x.shape[1])
        lse, sums = _all_reduce_lse(_kernel_lse(x, tg, 0.0, 1.0),
                                    tg.logit_of(x, acc, 0.0, 1.0)[None].to(ROW_DTYPE),
                                    layout.groups)
        s_t = sums[0]
        loss, _ = _focal_terms(s_t, lse, target, alpha, alpha_scale, gamma, ignore_index)
        ctx.save_for_backward(x, target, alpha, lse, s_t, x3)
        ctx.layout, ctx.args, ctx.x3_meta = layout, (alpha_scale, gamma, ignore_index), _meta(x3)
        return _to_rows_dtensor(loss.to(acc), layout), _to_rows_dtensor(lse, layout)

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):  # focal_loss does not return lse
        x, target, alpha, lse, s_t, x3 = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * 7
        if reference_backward(grad_loss):
            return (_reference_grad(ctx, x3, target, alpha, reference.focal_fwd, ctx.args,
                                    (grad_loss, None)),) + (None,) * 6
        grad_loss = _local(grad_loss, ctx.layout)
        alpha_scale, gamma, ignore_index = ctx.args
        acc = reference.acc_dtype(x.dtype)
        tg = _Target(target, ignore_index, ctx.layout.offset, x.shape[1])
        _, factor = _focal_terms(s_t, lse, target, alpha, alpha_scale, gamma, ignore_index)
        coef = torch.where(tg.valid, grad_loss.to(acc) * factor, 0)
        out = _kernel_grad(x, tg, coef, coef, lse, 0.0, 1.0, inplace=False)
        return (_to_logits_dtensor(out, ctx.layout, ctx.x3_meta),) + (None,) * 6


def _focal_terms(s_t, lse, target, alpha, alpha_scale, gamma, ignore_index):
    """(loss, factor) per row from the whole row's target logit and lse; ignored rows 0."""
    t = target.long()
    valid = t != ignore_index
    a = reference._class_vector(alpha, lse.dtype)
    alpha_t = reference._focal_alpha_t(a, alpha_scale, t.masked_fill(~valid, 0))
    loss, factor = reference._focal_terms(s_t - lse, alpha_t, gamma)
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    return torch.where(valid, loss, zero), factor


# ---- entry points from functional.py ------------------------------------------------------


def ce_rows(x3, target, weight, ignore_index: int, label_smoothing: float, z_loss: float,
            softcap: float, logit_scale: float, inplace_backward: bool):
    """(loss, lse) per row, as DTensors shaped (B, D), of class-sharded (B, C, D) logits."""
    layout, x3 = _layout(x3)
    if target.is_floating_point():
        t = _as_logits_local(target, layout)
    else:
        t = _as_rows_local(target, layout)
    return _CrossEntropy.apply(x3, t, _whole(weight), layout, ignore_index, label_smoothing,
                               z_loss, softcap, logit_scale, inplace_backward)


def focal_rows(x3, target, alpha, alpha_scale: float, gamma: float, ignore_index: int):
    """(loss, lse) per row, as DTensors shaped (B, D), of class-sharded (B, C, D) logits."""
    layout, x3 = _layout(x3)
    t = _as_rows_local(target, layout)
    return _Focal.apply(x3, t, _whole(alpha), layout, alpha_scale, gamma, ignore_index)
