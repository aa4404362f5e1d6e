"""Pure-PyTorch implementations of every op, with the kernels' contract (csrc/ops.cpp).

They are the fallback where the compiled kernels are unavailable, and the oracle the tests
compare the kernels with. Rows are processed in chunks so the float32 temporaries stay
small: the fallback never needs more memory than F.cross_entropy does. The functions are
plain differentiable PyTorch, so autograd can also run straight through them (used when a
target or weight itself requires grad).

Shapes: `input` is (B, C, D) with the class dim at 1; a class-index target is (B, D);
a probability target is (B, C, D); per-row losses are (B, D) in the accumulation dtype,
and lse in float64: a float row's lse is the float64 M + log S, as the kernels store it
(csrc/kernel_params.h, RowLse), and is used as hi + lo (split_lse).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._reduction import ordered_sum
from ._tracing import recording

try:
    # A target's logit is picked by a one-hot product on DTensors: differentiated twice
    # (create_graph) through a gather, DTensor (torch 2.13) makes a masked partial sum on
    # the gathered dim whose reduction fails ("too many indices").
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch without distributed
    _DTensor = ()

# Elements per chunk of float32 temporaries (16 MiB).
_CHUNK_ELEMENTS = 1 << 22


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# The dtype of the ops' lse (and of its gradient) whatever the logits' (stored_lse).
LSE_DTYPE = torch.float64


def _chunks(input: Tensor):
    B, C, D = input.shape
    if isinstance(input, _DTensor):
        # One chunk per call: slices of a row-sharded DTensor, and their concatenation,
        # are replicated (every rank would hold, and differentiate, all rows); each rank's
        # temporaries are its own rows'.
        yield 0, B
        return
    if B == 0:
        # One empty chunk: its results, empty, are still made from the inputs, so a loss
        # of no rows depends on a weight, alpha or target requiring grad, as F's does (with
        # no chunk it was a fresh tensor, and backward() raised).
        yield 0, 0
        return
    step = max(1, _CHUNK_ELEMENTS // max(1, C * D))
    for b0 in range(0, B, step):
        yield b0, min(B, b0 + step)


def _part(t: Tensor, b0: int, b1: int) -> Tensor:
    """Rows b0:b1 of t; t itself for all of them (a DTensor's slice of a sharded dim is
    replicated, even a whole one: see _chunks)."""
    return t if b0 == 0 and b1 == t.shape[0] else t[b0:b1]


def _transform(x: Tensor, softcap: float, logit_scale: float) -> Tensor:
    if softcap > 0:
        return torch.tanh(x * (logit_scale / softcap)) * softcap
    if logit_scale != 1.0:
        return x * logit_scale
    return x


def _transform_deriv(s: Tensor, softcap: float, logit_scale: float):
    if softcap > 0:
        u = s / softcap
        return logit_scale * (1 - u * u)
    return logit_scale


def check_index_target(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """IndexError naming the first out-of-range target, as PyTorch's CPU loss raises.

    Only on CPU: elsewhere the check would synchronise with the host, and the gather that
    follows raises a device-side assertion instead. Not while recorded (_tracing.py) or
    batched by torch.func.vmap, which cannot branch on values: there the gather's own
    bounds check raises.
    """
    if (target.device.type != "cpu" or target.numel() == 0 or recording()
            or torch._C._functorch.is_functorch_wrapped_tensor(target)):
        return
    t = target.long()
    bad = ((t < 0) | (t >= num_classes)) & (t != ignore_index)
    if bool(bad.any()):
        raise IndexError(f"Target {int(t[bad][0])} is out of bounds.")


def logsumexp(s: Tensor) -> Tensor:
    """Log-sum-exp over the last dim; NaN for a row holding +inf, as the max-shifted
    softmax of F.cross_entropy and of the kernels gives (torch.logsumexp says +inf)."""
    lse = torch.logsumexp(s, dim=-1)
    return torch.where(lse == float("inf"), float("nan"), lse)


def lse_parts(s: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo): the rows' log-sum-exp as the kernels keep it (csrc/kernel_params.h,
    lse_of): hi = M + log S rounded in s's dtype, M the row's largest value, and lo that
    rounding's error, exactly (two-sum), 0 where hi is not finite. hi carries logsumexp's
    gradient, softmax(s); lo none. NaN for a row holding +inf or NaN, -inf for one of
    -inf, as the max-shifted softmax gives."""
    if s.shape[-1] == 0:
        lse = logsumexp(s)
        return lse, torch.zeros_like(lse)
    m = s.amax(-1).detach()  # NaN where a NaN is; +-inf as the row's extremes
    finite = torch.isfinite(m)
    m0 = torch.where(finite, m, 0)
    log_s = torch.exp(s - m0.unsqueeze(-1)).sum(-1).log()
    special = torch.where(m == float("-inf"), float("-inf"), float("nan")).to(s.dtype)
    hi = torch.where(finite, m0 + log_s, special)
    with torch.no_grad():
        h, ls = hi.detach(), log_s.detach()
        b = h - m0
        lo = (m0 - (h - b)) + (ls - b)
        lo = torch.where(torch.isfinite(h), lo, 0)
    return hi, lo


def _stored(hi: Tensor, lo: Tensor) -> Tensor:
    """The lse the ops return and the backward reads (float64) from lse_parts: a float
    row's hi + lo, a float64 row's hi (lo is dropped, as the kernels drop it)."""
    if hi.dtype == LSE_DTYPE:
        return hi
    return hi.to(LSE_DTYPE) + lo.to(LSE_DTYPE)


def stored_lse(s: Tensor) -> Tensor:
    """logsumexp(s) as the ops return it (in float64): for float rows M + log S, M the
    row's largest value and log S rounded to float32, as the kernels compute it, so that
    nothing rounds lse to float32 (its gradient is softmax(s), as logsumexp's)."""
    return _stored(*lse_parts(s))


def _backward_lse(s: Tensor, lse: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """split_lse(lse) for a backward of rows s, where rows whose stored double cannot give
    hi and lo back (csrc/kernel_params.h's stored_lse_suffices: a finite |hi| of 2^30 or
    more, 2^8 for float64 rows) take them from their logits again, as the kernels do."""
    hi, lo = split_lse(lse, acc)
    limit = 2.0 ** (8 if acc == torch.float64 else 30)
    redo = torch.isfinite(hi) & (hi.abs() >= limit)
    if not recording() and not isinstance(hi, _DTensor) and not bool(redo.any()):
        return hi, lo
    hi2, lo2 = lse_parts(s)
    lo = torch.zeros_like(lo2) if lo is None else lo
    return torch.where(redo, hi2, hi), torch.where(redo, lo2, lo)


def split_lse(lse: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """(hi, lo): a stored lse as the kernels use it, hi its rounding to acc and lo the rest
    rounded (0 where hi is not finite; None where lse is already in acc). lo carries no
    gradient: hi carries lse's."""
    if lse.dtype == acc:
        return lse, None
    hi = lse.to(acc)
    lo = torch.where(torch.isfinite(hi), (lse - hi.to(lse.dtype)).to(acc), 0).detach()
    return hi, lo


def _minus(hi: Tensor, lo: Tensor | None, s: Tensor) -> Tensor:
    """lse - s from split_lse's (hi, lo) (broadcast as the caller shapes them)."""
    return hi - s if lo is None else (hi - s) + lo


def _log_p(hi: Tensor, lo: Tensor | None, s: Tensor) -> Tensor:
    """s - lse from split_lse's (hi, lo)."""
    return s - hi if lo is None else (s - hi) - lo


def _per_row(v: Tensor, t: Tensor) -> Tensor:
    """v[t] for a per-class vector v and class indices t. As a gather: torch 2.11's DTensor
    cannot propagate the backward of an index (index_put) with a row-sharded t."""
    return v.gather(0, t.reshape(-1)).view(t.shape)


def _class_vector(v: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if v is None else v.to(dtype)


def _rows(x_chunk: Tensor, acc: torch.dtype, softcap: float, logit_scale: float) -> Tensor:
    # (b, C, D) -> (b, D, C) float rows of transformed logits
    return _transform(x_chunk.to(acc).movedim(1, -1), softcap, logit_scale)


def _gather_target(s: Tensor, safe: Tensor) -> Tensor:
    """s[..., t]; a row with no classes (C = 0) can only be ignored, so any value will do."""
    if s.shape[-1] == 0:
        return s.new_zeros(safe.shape)
    if isinstance(s, _DTensor):  # (see _DTensor)
        return (s * torch.nn.functional.one_hot(safe, s.shape[-1]).to(s.dtype)).sum(-1)
    return s.gather(-1, safe.unsqueeze(-1)).squeeze(-1)


def _smoothed_prob_target(t: Tensor, eps: float, C: int) -> Tensor:
    return t * (1 - eps) + eps / C if eps > 0 else t


def _ignored_rows_finite(s: Tensor, hi: Tensor, lo: Tensor, target: Tensor,
                         ignore_index: int, *params) -> tuple[Tensor, Tensor, Tensor]:
    """(s, hi, lo) for a chunk's loss. Where autograd records it (torch.func, create_graph,
    a learned weight or alpha), the rows of ignored class-index targets are set to 0 and
    their lse recomputed: their NaN or infinite logits (masked padding) had reached the
    gradients as 0 * nan (the loss masks those rows after; the lse's own backward and a
    weight's multiply by them), where the kernels write exact zeros. The stored lse stays
    the logits' own. Always under torch.jit.trace, whose check traces again without
    gradients: the graph must not depend on them."""
    if target.is_floating_point() or not (torch.jit.is_tracing() or (
            torch.is_grad_enabled()
            and any(p is not None and p.requires_grad for p in (s, *params)))):
        return s, hi, lo
    valid = target.long() != ignore_index
    s = torch.where(valid.unsqueeze(-1), s, 0)
    return (s, *lse_parts(s))


def _ce_chunk(s, lse, lo, target, w, ignore_index, eps, z_loss):
    """Per-row loss of one chunk; s is (b, D, C), (lse, lo) (b, D) of lse_parts."""
    C = s.shape[-1]
    lo_c = lo.unsqueeze(-1)
    if target.is_floating_point():
        q = _smoothed_prob_target(target.to(s.dtype).movedim(1, -1), eps, C)
        if w is not None:
            q = q * w
        loss = (q * _minus(lse.unsqueeze(-1), lo_c, s)).sum(-1)
        if z_loss != 0:
            loss = loss + z_loss * lse * lse
        return loss
    t = target.long()
    valid = t != ignore_index
    safe = t.masked_fill(~valid, 0)
    nll = _minus(lse, lo, _gather_target(s, safe))
    loss = (1 - eps) * (_per_row(w, safe) * nll if w is not None else nll)
    if eps > 0:
        nll_all = _minus(lse.unsqueeze(-1), lo_c, s)
        smooth = (nll_all * w).sum(-1) if w is not None else nll_all.sum(-1)
        loss = loss + eps / C * smooth
    if z_loss != 0:
        loss = loss + z_loss * lse * lse
    return torch.where(valid, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))


def ce_fwd(input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
           label_smoothing: float, z_loss: float, softcap: float, logit_scale: float,
           inplace_backward: bool = False) -> tuple[Tensor, Tensor]:
    """Per-row cross-entropy loss and log-sum-exp (see csrc/ops.cpp: ce_fwd)."""
    acc = acc_dtype(input.dtype)
    if not target.is_floating_point():
        check_index_target(target, input.shape[1], ignore_index)
    w = _class_vector(weight, acc)
    losses, lses = [], []
    for b0, b1 in _chunks(input):
        s = _rows(_part(input, b0, b1), acc, softcap, logit_scale)
        hi, lo = lse_parts(s)
        t = _part(target, b0, b1)
        losses.append(_ce_chunk(*_ignored_rows_finite(s, hi, lo, t, ignore_index, w), t, w,
                                ignore_index, label_smoothing, z_loss))
        lses.append(_stored(hi, lo))
    return _cat_rows(losses, input, acc), _cat_rows(lses, input, LSE_DTYPE)


def _cat_rows(parts, input: Tensor, acc: torch.dtype) -> Tensor:
    if len(parts) == 1 and isinstance(parts[0], _DTensor):
        return parts[0]  # (DTensor's cat replicates rows it splits: see _chunks; others
        # get cat's contiguous copy, the layout the fake kernels promise)
    if parts:
        return torch.cat(parts)
    return input.new_empty((input.shape[0], input.shape[2]), dtype=acc)


def _ce_coefficients(s, lse, target, w, ignore_index, eps, z_loss, g, g_lse):
    """(A, Dq, B, t) with grad_s = A p - Dq - [c == t] B, per row; see kernels_impl.h.
    lse: split_lse's hi."""
    C = s.shape[-1]
    if target.is_floating_point():
        q = _smoothed_prob_target(target.to(s.dtype).movedim(1, -1), eps, C)
        if w is not None:
            q = q * w
        # (one class with a z-loss: mass p - q is 0 for a finite logit, p = 1; mass * 0
        # keeps a non-finite target's nan, and no q term: see below)
        one_class = C == 1 and z_loss != 0
        A = g * (q.sum(-1) * 0) if one_class else g * q.sum(-1)
        if z_loss != 0:
            A = A + g * 2 * z_loss * lse
        if g_lse is not None:
            A = A + g_lse
        return A, None if one_class else g.unsqueeze(-1) * q, None, None, None
    t = target.long()
    valid = t != ignore_index
    safe = t.masked_fill(~valid, 0)
    wt = _per_row(w, safe) if w is not None else torch.ones_like(lse)
    coef = (1 - eps) * wt
    Dq = None
    if eps > 0:
        W = ordered_sum(w) if w is not None else C
        coef = coef + eps / C * W
        Dq = (g * (eps / C)).unsqueeze(-1) * (w if w is not None else 1.0)
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    B = torch.where(valid, g * ((1 - eps) * wt), zero)
    if C == 1 and z_loss != 0:
        # One class: lse = s, so the cross-entropy and smoothing terms are 0 for every
        # finite logit and their gradient coef (p - 1) exactly 0; only the z-loss's
        # 2 z lse p is left, formed alone ((coef + 2 z lse) p - coef lost it to
        # cancellation). coef * 0 keeps a non-finite weight's nan. As the kernels (only
        # with a z-loss: kernels_impl.h's index_row_coef says why).
        coef, Dq, B = coef * 0, None, torch.zeros_like(B)
    if z_loss != 0:
        coef = coef + 2 * z_loss * lse
    A = torch.where(valid, g * coef, zero)
    if Dq is not None:
        Dq = torch.where(valid.unsqueeze(-1), Dq, zero)
    if g_lse is not None:
        A = A + g_lse
    # Ignored rows: exact zeros unless their lse has a nonzero gradient (as the kernels).
    keep = valid if g_lse is None else valid | (g_lse != 0)
    return A, Dq, B, safe, keep


def _grad_chunk(s, lse, A, Dq, B, t, softcap, logit_scale, keep=None, lo=None):
    """The gradient of rows s from (hi, lo) = split_lse(lse): p = exp(s - hi) exp(-lo)."""
    if lo is not None:
        A = A * torch.exp(-lo)
    grad = A.unsqueeze(-1) * torch.exp(s - lse.unsqueeze(-1))
    if Dq is not None:
        grad = grad - Dq
    if B is not None and s.shape[-1] > 0:
        grad = grad.scatter_add(-1, t.unsqueeze(-1), -B.unsqueeze(-1))
    if softcap > 0 or logit_scale != 1.0:
        grad = grad * _transform_deriv(s, softcap, logit_scale)
    if keep is not None:  # ignored rows get exact zeros, whatever their logits hold
        grad = torch.where(keep.unsqueeze(-1), grad, 0)
    return grad


def _write_grad(out: Tensor, b0: int, b1: int, grad_rows: Tensor) -> None:
    out[b0:b1].copy_(grad_rows.movedim(-1, 1))


def _ce_bwd_into(out, grad_loss, grad_lse, input, target, weight, lse, ignore_index,
                 label_smoothing, z_loss, softcap, logit_scale):
    acc = acc_dtype(input.dtype)
    w = _class_vector(weight, acc)
    for b0, b1 in _chunks(input):
        s = _rows(input[b0:b1], acc, softcap, logit_scale)
        g_lse = None if grad_lse is None else grad_lse[b0:b1].to(acc)
        hi, lo = _backward_lse(s, lse[b0:b1], acc)
        A, Dq, B, t, keep = _ce_coefficients(s, hi, target[b0:b1], w, ignore_index,
                                             label_smoothing, z_loss,
                                             grad_loss[b0:b1].to(acc), g_lse)
        grad = _grad_chunk(s, hi, A, Dq, B, t, softcap, logit_scale, keep, lo)
        _write_grad(out, b0, b1, grad)
    return out


def ce_bwd(grad_loss: Tensor, grad_lse: Tensor | None, input: Tensor, target: Tensor,
           weight: Tensor | None, lse: Tensor, ignore_index: int, label_smoothing: float,
           z_loss: float, softcap: float, logit_scale: float) -> Tensor:
    """Gradient of the per-row loss (and lse) with respect to input (csrc/ops.cpp: _ce_bwd)."""
    out = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    return _ce_bwd_into(out, grad_loss, grad_lse, input, target, weight, lse, ignore_index,
                        label_smoothing, z_loss, softcap, logit_scale)


def ce_bwd_inplace(grad_loss: Tensor, grad_lse: Tensor | None, input: Tensor, target: Tensor,
                   weight: Tensor | None, lse: Tensor, ignore_index: int,
                   label_smoothing: float, z_loss: float, softcap: float,
                   logit_scale: float) -> None:
    """As ce_bwd, writing the gradient over `input` (each chunk is read before written)."""
    _ce_bwd_into(input, grad_loss, grad_lse, input, target, weight, lse, ignore_index,
                 label_smoothing, z_loss, softcap, logit_scale)


def ce_fwd_grad(input, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                logit_scale, grad_scale):
    """Forward plus the gradient of sum_r grad_scale_r * loss_r (csrc/ops.cpp: ce_fwd_grad)."""
    loss, lse = ce_fwd(input, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                       logit_scale)
    grad = ce_bwd(grad_scale, None, input, target, weight, lse, ignore_index, label_smoothing,
                  z_loss, softcap, logit_scale)
    return loss, lse, grad


# ---- softmax focal loss ------------------------------------------------------------------


def _focal_alpha_t(alpha, alpha_scale, t):
    return alpha_scale * _per_row(alpha, t) if alpha is not None else alpha_scale


def _modulating(base: Tensor, gamma: float) -> Tensor:
    """base ** gamma (base >= 0, a focal loss's 1 - p_t), whose slope autograd takes as 0
    where base is 0, the limit the kernels' gradients take: for 0 < gamma < 1 pow's own,
    gamma base^(gamma - 1), is inf there, and the chain's inf * 0 made the gradients
    through the reference code (create_graph, torch.func) nan at saturated logits. The
    same values as base.pow(gamma)."""
    if not 0 < gamma < 1:
        return base.pow(gamma)
    live = base > 0
    return torch.where(live, torch.where(live, base, 1).pow(gamma), base.pow(gamma).detach())


def _focal_terms(log_pt: Tensor, alpha_t, gamma: float):
    """(loss, factor) as csrc/cpu/kernels_impl.h's Focal: finite at saturation."""
    # 1 - p_t, differentiated as -p_t: autograd's slope of expm1, expm1(x) + 1, cancels
    # for a small p_t (a confidently wrong row's gradient was up to 77 eps off at gamma=10
    # through autograd, where the kernels' is within 3). The same value.
    slope = -torch.exp(log_pt)
    q = (-torch.expm1(log_pt)).detach() + (slope - slope.detach())
    loss = (alpha_t * _modulating(q, gamma)) * (0 - log_pt)  # 0 - x: +0.0 at p_t = 1, as lse - s_t
    if gamma == 0:
        factor = alpha_t * torch.ones_like(log_pt)
    else:
        pt = torch.exp(log_pt)
        ratio = torch.where(q > 0, log_pt / torch.where(q > 0, q, 1), -1)
        corr = torch.where(pt > 0, gamma * pt * ratio, 0)
        factor = alpha_t * q.pow(gamma) * (1 - corr)
    return loss, factor


def focal_fwd(input: Tensor, target: Tensor, alpha: Tensor | None, alpha_scale: float,
              gamma: float, ignore_index: int) -> tuple[Tensor, Tensor]:
    acc = acc_dtype(input.dtype)
    check_index_target(target, input.shape[1], ignore_index)
    a = _class_vector(alpha, acc)
    losses, lses = [], []
    for b0, b1 in _chunks(input):
        s = _rows(_part(input, b0, b1), acc, 0.0, 1.0)
        hi, lo = lse_parts(s)
        t = _part(target, b0, b1).long()
        valid = t != ignore_index
        safe = t.masked_fill(~valid, 0)
        s_l, hi_l, lo_l = _ignored_rows_finite(s, hi, lo, t, ignore_index, a)
        log_pt = _log_p(hi_l, lo_l, _gather_target(s_l, safe))
        loss, _ = _focal_terms(log_pt, _focal_alpha_t(a, alpha_scale, safe), gamma)
        losses.append(torch.where(valid, loss, torch.zeros((), dtype=acc, device=loss.device)))
        lses.append(_stored(hi, lo))
    return _cat_rows(losses, input, acc), _cat_rows(lses, input, LSE_DTYPE)


def focal_bwd(grad_loss: Tensor, input: Tensor, target: Tensor, alpha: Tensor | None,
              lse: Tensor, alpha_scale: float, gamma: float, ignore_index: int) -> Tensor:
    acc = acc_dtype(input.dtype)
    a = _class_vector(alpha, acc)
    out = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    for b0, b1 in _chunks(input):
        s = _rows(input[b0:b1], acc, 0.0, 1.0)
        hi, lo = _backward_lse(s, lse[b0:b1], acc)
        t = target[b0:b1].long()
        valid = t != ignore_index
        safe = t.masked_fill(~valid, 0)
        log_pt = _log_p(hi, lo, _gather_target(s, safe))
        _, factor = _focal_terms(log_pt, _focal_alpha_t(a, alpha_scale, safe), gamma)
        coef = torch.where(valid, grad_loss[b0:b1].to(acc) * factor,
                           torch.zeros((), dtype=acc, device=s.device))
        _write_grad(out, b0, b1,
                    _grad_chunk(s, hi, coef, None, coef, safe, 0.0, 1.0, valid, lo))
    return out


def focal_fwd_grad(input, target, alpha, alpha_scale, gamma, ignore_index, grad_scale):
    loss, lse = focal_fwd(input, target, alpha, alpha_scale, gamma, ignore_index)
    grad = focal_bwd(grad_scale, input, target, alpha, lse, alpha_scale, gamma, ignore_index)
    return loss, lse, grad


def rescale_grad_rows(grad: Tensor, grad_loss: Tensor, grad_scale: Tensor) -> None:
    """Scales row r of grad (B, C, D) by grad_loss_r / grad_scale_r where they differ,
    except rows made for a non-finite scale (as the kernels): 1/0, a mean over no counted
    target, and nan, _reduction.mean_denominator's (nan already, or an ignored row's
    zeros)."""
    differs = (grad_loss != grad_scale) & grad_scale.isfinite()
    factor = torch.where(differs, grad_loss / grad_scale, 1.0)
    grad.mul_(factor.unsqueeze(1))


def accumulate_(acc: Tensor, src: Tensor) -> None:
    """acc += src (the kernels take the same shape only, and floating point)."""
    if acc.shape != src.shape:
        raise RuntimeError(f"_accumulate_: acc has shape {tuple(acc.shape)} but src has "
                           f"shape {tuple(src.shape)}")
    if not (acc.is_floating_point() and src.is_floating_point()):
        raise RuntimeError(f"_accumulate_: acc and src must be floating point, got "
                           f"{acc.dtype} and {src.dtype}")
    acc.add_(src)


# ---- sigmoid focal loss (torchvision.ops.sigmoid_focal_loss) ----------------------------


def _sigmoid_terms(x: Tensor, t: Tensor, t_side: Tensor | None = None):
    # |x| as the x >= 0 side computes it (the same values): autograd then differentiates
    # every term at x = 0 from that side, as clamp_min and `pos` do, giving sigmoid(0) - t.
    # (abs's derivative 0 there mixed the sides: ce's slope came out 1 - t.)
    pos = x >= 0
    ax = torch.where(pos, x, -x)
    e = torch.exp(-ax)
    # max(x, 0) - x t by x's sign, as the kernels: +inf with t < 1 gives inf, not nan.
    # The terms with t take the layout of a tensor of t's first (TensorIterator lays out
    # an output as its first operand that orders the dims), so that under autograd the
    # loss and t's gradient are laid out as `t_side` (pos in the loss's layout, which
    # decides the where's) and x's gradient as x (where(pos, ...)'s backward): as
    # torchvision's composition, whose loss starts from 1 - t. (The same bits.)
    side = pos if t_side is None else t_side
    ce = torch.where(side, 1 - t, t) * ax + torch.log1p(e)
    inv = 1 / (1 + e)
    p = torch.where(pos, inv, e * inv)
    q = torch.where(pos, e * inv, inv)
    m = (1 - t) * p + t * q
    return ce, p, q, m


def _alpha_t(t: Tensor, alpha: float) -> Tensor:
    return alpha * t + (1 - alpha) * (1 - t)


def _sigmoid_focal_losses(input: Tensor, target: Tensor, alpha: float, gamma: float,
                          order: list[int] | None | bool = False) -> Tensor:
    """The elementwise losses in the accumulation dtype. `order` (for autograd: targets
    requiring grad) lays the loss and t's gradient out as with_layout does (outermost
    dim first, None: contiguous), x's gradient as x; False leaves the layouts to the ops."""
    acc = acc_dtype(input.dtype)
    x, t = input.to(acc), target.to(acc)
    t_side = None
    if order is not False:
        t = t if t is target else with_layout(t, order)  # (a converted copy: as laid out)
        t_side = with_layout(x >= 0, order)
    ce, _, _, m = _sigmoid_terms(x, t, t_side)
    loss = ce * _modulating(m, gamma)
    if alpha >= 0:
        loss = loss * _alpha_t(t, alpha)
    return loss


def sigmoid_focal_fwd(input: Tensor, target: Tensor, alpha: float, gamma: float) -> Tensor:
    return _sigmoid_focal_losses(input, target, alpha, gamma).to(input.dtype)


def sigmoid_focal_fwd_laid_out(input: Tensor, target: Tensor, alpha: float, gamma: float,
                               order: list[int] | None) -> Tensor:
    """sigmoid_focal_fwd for autograd, the loss and t's gradient laid out in `order` (see
    _sigmoid_focal_losses)."""
    return _sigmoid_focal_losses(input, target, alpha, gamma, order).to(input.dtype)


def inverse_order(order: list[int]) -> list[int]:
    return sorted(range(len(order)), key=order.__getitem__)


def with_layout(t: Tensor, order: list[int] | None) -> Tensor:
    """t with its dims laid out in memory in `order`, outermost first (None: contiguous);
    t itself where they are."""
    if order is None:
        return t.contiguous()
    return t.permute(order).contiguous().permute(inverse_order(order))


def sigmoid_focal_sum(input: Tensor, target: Tensor, alpha: float, gamma: float,
                      divisor: int) -> Tensor:
    """The sum of the elementwise losses times 1.0 / divisor, a 0-dim tensor in the
    accumulation dtype. (divisor 0: an empty input's mean, in a graph traced with a
    symbolic size: nan, as torch's mean() of an empty tensor.)"""
    torch._check(divisor >= 0, lambda: f"sigmoid_focal_sum: divisor must be at least 0, "
                 f"got {divisor}")
    return ordered_sum(_sigmoid_focal_losses(input, target, alpha, gamma)) * reciprocal(divisor)


def reciprocal(divisor) -> float:
    """1.0 / divisor, an element count (a SymInt while traced); inf for 0, as a kernel's
    IEEE division gives it, where Python's raises ZeroDivisionError."""
    return 1.0 / divisor if not isinstance(divisor, int) or divisor != 0 else math.inf


def sigmoid_focal_sum_grad(input: Tensor, target: Tensor, alpha: float, gamma: float,
                           divisor: int) -> tuple[Tensor, Tensor]:
    loss = sigmoid_focal_sum(input, target, alpha, gamma, divisor)  # (checks the divisor)
    grad_loss = torch.full((), reciprocal(divisor), dtype=acc_dtype(input.dtype),
                           device=input.device)
    return loss, sigmoid_focal_bwd(grad_loss, input, target, alpha, gamma)


def sigmoid_focal_bwd(grad_loss: Tensor, input: Tensor, target: Tensor, alpha: float,
                      gamma: float) -> Tensor:
    acc = acc_dtype(input.dtype)
    x, t = input.to(acc), target.to(acc)
    ce, p, q, m = _sigmoid_terms(x, t)
    d = (1 - t) * p - t * q  # p - t, without p - 1's cancellation for a confident positive
    if gamma != 0:
        dpow = gamma * m.pow(gamma - 1)
        if gamma < 1:  # m = 0 only where p q = 0: the product's limit is 0
            dpow = torch.where(m > 0, dpow, 0)
        d = d * m.pow(gamma) + ce * (p * q) * dpow * (1 - 2 * t)  # finite for finite x
    if alpha >= 0:
        d = d * _alpha_t(t, alpha)
    return (d * grad_loss.to(acc)).to(input.dtype).contiguous()


def sigmoid_focal_loss_torchvision(inputs: Tensor, targets: Tensor, alpha: float = 0.25,
                                   gamma: float = 2.0, reduction: str = "none") -> Tensor:
    """torchvision.ops.sigmoid_focal_loss's formula, written out (the tests' oracle)."""
    p = torch.sigmoid(inputs)
    ce_loss = torch.nn.functional.binary_cross_entropy_with_logits(inputs, targets,
                                                                   reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = _alpha_t(targets, alpha) * loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
