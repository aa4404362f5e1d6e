"""The linear cross-entropy custom ops (namespace ``torchloss_fused_py``): schemas,
implementations on top of the chunked loop, fake kernels and autograd formulas, so
``torch.compile(fullgraph=True)`` sees one opaque op."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _eager, _ops, _reduction, _sharding, reference
from .. import vocab_parallel as vp
from .._higher_order import differentiable_grads, reference_backward
from .._tracing import recording
from . import targets
from .loop import _loop, _placeholder, grad_transposed

NAMESPACE = "torchloss_fused_py"


_CE = "int ignore_index, float label_smoothing, float z_loss, float softcap"
_CHUNK = "int chunk_size, ScalarType? accum_dtype"
_NEEDS = "bool grad_hidden, bool grad_weight, bool grad_bias"
SCHEMAS = {
    # Per-row loss (accumulation dtype: float32, or float64 where hidden or a probability
    # target or its class weights are float64) and lse (float64, as the cross-entropy
    # ops'), no gradients. target: class
    # indices (N,) or probabilities (N, V).
    "linear_ce_fwd": f"(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, "
    f"Tensor? class_weight, {_CE}, {_CHUNK}) -> (Tensor loss, Tensor lse)",
    # Training forward for mean/sum: the reduced loss sum(loss_r) / denom (denom None: 1),
    # lse, and the gradients of that loss (empty where not asked for).
    "linear_ce_fwd_grad": f"(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, "
    f"Tensor? class_weight, Tensor? denom, {_CE}, {_CHUNK}, {_NEEDS}) -> (Tensor loss, "
    "Tensor lse, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)",
    # Backward for per-row upstream gradients of the loss (and of the lse, return_lse):
    # recomputes the logits chunk by chunk.
    "_linear_ce_bwd": f"(Tensor grad_loss, Tensor? grad_lse, Tensor hidden, Tensor weight, "
    f"Tensor? bias, "
    f"Tensor target, Tensor? class_weight, Tensor lse, {_CE}, {_CHUNK}, {_NEEDS}) -> "
    "(Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)",
}


def _fwd_impl(hidden, weight, bias, target, class_weight, ignore_index, label_smoothing,
              z_loss, softcap, chunk_size, accum_dtype):
    loss, lse, *_ = _loop(hidden, weight, bias, target, class_weight,
                          (ignore_index, label_smoothing, z_loss, softcap), chunk_size,
                          accum_dtype, row_grad=None, lse_in=None, need_h=False,
                          need_w=False, need_b=False)
    return loss, lse


def _row_scale(denom: Tensor | None, like: Tensor, acc: torch.dtype) -> Tensor:
    one = torch.ones((), dtype=acc, device=like.device)
    return one if denom is None else one / denom


def _fwd_grad_impl(hidden, weight, bias, target, class_weight, denom, ignore_index,
                   label_smoothing, z_loss, softcap, chunk_size, accum_dtype, grad_hidden,
                   grad_weight, grad_bias):
    row_scale = _row_scale(denom, hidden, targets.acc_dtype(hidden.dtype, target, class_weight))
    loss_rows, lse, gh, gw, gb = _loop(
        hidden, weight, bias, target, class_weight,
        (ignore_index, label_smoothing, z_loss, softcap),
        chunk_size, accum_dtype, row_grad=row_scale, lse_in=None,
        need_h=grad_hidden, need_w=grad_weight, need_b=grad_bias and bias is not None)
    loss = _reduction.reduce(loss_rows, "sum" if denom is None else "mean", denom, (),
                             loss_rows.dtype)
    return (loss, lse, gh if gh is not None else _placeholder(hidden),
            gw if gw is not None else _placeholder(hidden),
            gb if gb is not None else _placeholder(hidden))


def _bwd_impl(grad_loss, grad_lse, hidden, weight, bias, target, class_weight, lse,
              ignore_index, label_smoothing, z_loss, softcap, chunk_size, accum_dtype,
              grad_hidden, grad_weight, grad_bias):
    acc = targets.acc_dtype(hidden.dtype, target, class_weight)
    _, _, gh, gw, gb = _loop(
        hidden, weight, bias, target, class_weight,
        (ignore_index, label_smoothing, z_loss, softcap),
        chunk_size, accum_dtype, row_grad=grad_loss.to(acc), lse_in=lse,
        need_h=grad_hidden, need_w=grad_weight, need_b=grad_bias and bias is not None,
        lse_grad=None if grad_lse is None else grad_lse.to(lse.dtype))
    return (gh if gh is not None else _placeholder(hidden),
            gw if gw is not None else _placeholder(hidden),
            gb if gb is not None else _placeholder(hidden))


def materialised_rows(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                      class_weight: Tensor | None, ignore_index: int, label_smoothing: float,
                      z_loss: float, softcap: float) -> tuple[Tensor, Tensor]:
    """Per-row loss and lse through the full (N, V) logits, in plain differentiable PyTorch:
    what torch.func transforms, higher-order gradients and a class_weight's own gradient
    differentiate (never the training path)."""
    # (A vocabulary-sharded head's logits are gathered, as cross_entropy's reference path
    # gathers class-sharded logits.)
    logits = vp.gather_classes(
        torch.nn.functional.linear(hidden, weight, bias).unsqueeze(-1))
    if targets.is_prob(target):
        logits = logits.to(targets.compute_dtype(hidden.dtype, target, class_weight))
        target, label_smoothing = targets.chunk(target, logits.dtype, label_smoothing)
    loss, lse = reference.ce_fwd(logits, target.unsqueeze(-1), class_weight, ignore_index,
                                 label_smoothing, z_loss, softcap, 1.0)
    # (linear cross-entropy's lse is in the loss's dtype: reference.LSE_DTYPE is wider)
    return loss.squeeze(-1), lse.squeeze(-1).to(loss.dtype)


def _graph_grads(saved, ce_args, needs, grad_rows, grad_lse):
    """Gradients recorded by autograd through the materialised forward (create_graph=True,
    batched gradients: see reference_backward), for the rows' loss and lse gradients."""
    hidden, weight, bias, target, class_weight = saved[:5]
    return differentiable_grads(
        lambda h, w, b: materialised_rows(h, w, b, target, class_weight, *ce_args),
        (hidden, weight, bias), needs, (grad_rows, grad_lse))


# ---- fake kernels -------------------------------------------------------------------------


def _fake_grads(hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
    N, H = hidden.shape
    V = weight.shape[0]
    h_t, w_t = grad_transposed(hidden, weight)
    gh = _placeholder(hidden)
    if grad_hidden:
        gh = hidden.new_empty((H, N)).t() if h_t else hidden.new_empty((N, H))
    gw = _placeholder(hidden)
    if grad_weight:
        gw = weight.new_empty((H, V)).t() if w_t else weight.new_empty((V, H))
    gb = bias.new_empty((V,)) if grad_bias and bias is not None else _placeholder(hidden)
    return gh, gw, gb


def _fake_fwd(hidden, weight, bias, target, class_weight, *args):
    acc = targets.acc_dtype(hidden.dtype, target, class_weight)
    N = hidden.shape[0]
    return (hidden.new_empty((N,), dtype=acc),
            hidden.new_empty((N,), dtype=reference.LSE_DTYPE))


def _fake_fwd_grad(hidden, weight, bias, target, class_weight, denom, ignore_index,
                   label_smoothing, z_loss, softcap, chunk_size, accum_dtype, grad_hidden,
                   grad_weight, grad_bias):
    acc = targets.acc_dtype(hidden.dtype, target, class_weight)
    loss = hidden.new_empty((), dtype=acc)
    lse = hidden.new_empty((hidden.shape[0],), dtype=reference.LSE_DTYPE)
    return (loss, lse, *_fake_grads(hidden, weight, bias, grad_hidden, grad_weight, grad_bias))


def _fake_bwd(grad_loss, grad_lse, hidden, weight, bias, target, class_weight, lse,
              ignore_index, label_smoothing, z_loss, softcap, chunk_size, accum_dtype,
              grad_hidden, grad_weight, grad_bias):
    return _fake_grads(hidden, weight, bias, grad_hidden, grad_weight, grad_bias)


# ---- autograd -----------------------------------------------------------------------------


def _ns():
    return getattr(torch.ops, NAMESPACE)


# No gradient for class_weight from these formulas: linear_cross_entropy sends a class
# weight that requires grad through materialised_rows instead, as cross_entropy sends a
# weight that requires grad through the reference code.


def _fwd_setup_context(ctx, inputs, output):
    hidden, weight, bias, target, class_weight, *args = inputs
    ctx.save_for_backward(hidden, weight, bias, target, class_weight, output[1])
    ctx.args = tuple(args)  # ce args, chunk_size, accum_dtype
    ctx.set_materialize_grads(False)


def _fwd_backward(ctx, grad_loss, grad_lse):
    needs = tuple(ctx.needs_input_grad[:3])
    none = (None,) * 8  # target, class_weight, ce args, chunk_size, accum_dtype
    if (grad_loss is None and grad_lse is None) or not any(needs):
        return (None,) * 3 + none
    hidden, weight, bias, target, class_weight, lse = ctx.saved_tensors
    needs = (needs[0], needs[1], needs[2] and bias is not None)
    if reference_backward(grad_loss, grad_lse):
        return _graph_grads(ctx.saved_tensors, ctx.args[:4], needs, grad_loss, grad_lse) + none
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    return _masked(_ns()._linear_ce_bwd(grad_loss, grad_lse, hidden, weight, bias, target,
                                        class_weight, lse, *ctx.args, *needs), needs) + none


def _is_host_one(grad_loss: Tensor) -> bool:
    # loss.backward() sends exactly 1. Reading a CPU scalar costs nothing; a CUDA one
    # would synchronise the host, so CUDA gradients are always scaled.
    return (type(grad_loss) is Tensor and grad_loss.device.type == "cpu"
            and grad_loss.numel() == 1 and grad_loss.item() == 1)


def _masked(grads, needs) -> tuple:
    return tuple(g if need else None for g, need in zip(grads, needs))


def _row_grads(grad_loss, denom, lse):
    """The loss's gradient per row for a reduced loss's upstream gradient (None: zeros)."""
    if grad_loss is None:
        return torch.zeros_like(lse)
    return (grad_loss if denom is None else grad_loss / denom).expand(lse.shape[0])


def _fwd_grad_setup_context(ctx, inputs, output):
    hidden, weight, bias, target, class_weight, denom, *rest = inputs
    ctx.ce_args, ctx.chunk = tuple(rest[:4]), tuple(rest[4:6])
    _, lse, gh, gw, gb = output
    ctx.mark_non_differentiable(*output[2:])  # (the lse is differentiable: return_lse)
    ctx.set_materialize_grads(False)
    # Eager: the gradients are handed on once, scaled in place, from a plain attribute (no
    # reference cycle through the outputs' grad_fn); a second backward (retain_graph)
    # recomputes. Traced (torch.compile, make_fx: _tracing.py): saved normally and scaled
    # out of place, whatever the upstream gradient (its value cannot be read).
    ctx.eager = not recording() and type(gh) is torch.Tensor
    if ctx.eager:
        ctx.fused = (gh.detach(), gw.detach(), gb.detach())
        # The bias is read only by a backward that recomputes (_saved_with_bias), and F's
        # composed loss never saves it (its logits are saved): kept apart from the saved
        # tensors with its version, so that writing it in place after the forward (an
        # optimizer's step on it) raises only where its old value would be needed.
        ctx.bias = None if bias is None else (bias, bias._version)
        ctx.save_for_backward(hidden, weight, None, target, class_weight, denom, lse)
    else:
        ctx.fused = None
        ctx.save_for_backward(hidden, weight, bias, target, class_weight, denom, lse, gh, gw,
                              gb)


def _fwd_grad_backward(ctx, grad_loss, grad_lse, *_unused):
    needs = tuple(ctx.needs_input_grad[:3])
    none = (None,) * 12  # target, class_weight, denom, ce args, chunk args, needs
    if (grad_loss is None and grad_lse is None) or not any(needs):
        return (None, None, None) + none
    saved = ctx.saved_tensors
    hidden, weight, bias, target, class_weight, denom, lse = saved[:7]
    has_bias = ctx.bias is not None if ctx.eager else bias is not None
    needs = (needs[0], needs[1], needs[2] and has_bias)
    if ctx.eager and (ctx.fused is None or grad_lse is not None
                      or reference_backward(grad_loss, grad_lse)):  # (the paths that recompute)
        saved = _saved_with_bias(ctx, saved)
        bias = saved[2]
    if reference_backward(grad_loss, grad_lse):
        ctx.fused = None
        rows = None if grad_loss is None else _row_grads(grad_loss, denom, lse)
        return _graph_grads(saved, ctx.ce_args, needs, rows, grad_lse) + none
    if denom is not None and grad_loss is not None:
        # Gradients made for a mean over no counted target (1/denom = inf) stay as made,
        # as _rescale_grad_rows leaves such rows: ignored rows exactly zero, as in F. (A
        # nan denom, _reduction.mean_denominator's, made the counted rows' nan whatever
        # the factor, and _scale_factors keeps the ignored ones at zero.)
        grad_loss = torch.where(denom == 0, torch.ones_like(grad_loss), grad_loss)
    fused = ctx.fused if ctx.eager else saved[7:]
    ctx.fused = None
    if fused is None and grad_lse is None:
        # A second backward through the same graph (retain_graph): the forward's gradients
        # made again (its unit upstream) and scaled below as the first backward's were, so
        # both backwards give the same bits.
        acc = targets.acc_dtype(hidden.dtype, target, class_weight)
        unit = _row_scale(denom, hidden, acc).expand(lse.shape[0])
        fused = _ns()._linear_ce_bwd(unit, None, hidden, weight, bias, target, class_weight,
                                     lse, *ctx.ce_args, *ctx.chunk, *needs)
    if grad_lse is not None:
        # A gradient for the lse, which the gradients made in forward leave out: recompute.
        grads = _ns()._linear_ce_bwd(_row_grads(grad_loss, denom, lse), grad_lse, hidden,
                                     weight, bias, target, class_weight, lse, *ctx.ce_args,
                                     *ctx.chunk, *needs)
    elif ctx.eager and _is_host_one(grad_loss):
        grads = fused  # made for exactly this grad_loss: the pass over them is saved
    else:
        factors = _scale_factors(grad_loss, target, ctx.ce_args[0])
        grads = tuple((g.mul_(f) if ctx.eager else g * f) if need else None
                      for g, f, need in zip(fused, factors, needs))
    return _masked(grads, needs) + none


def _saved_with_bias(ctx, saved: tuple) -> tuple:
    """The eager fused op's saved tensors with its bias (kept apart: see the setup), which
    must not have been written in place since the forward, as autograd's check of a
    saved tensor says."""
    if ctx.bias is None:
        return saved
    bias, version = ctx.bias
    _ops.check_version(bias, version, "linear_cross_entropy's bias",
                       " This backward recomputes the logits (a second backward, or a "
                       "gradient through the returned lse): write the bias after it.")
    return (*saved[:2], bias, *saved[3:])


def _scale_factors(grad_loss: Tensor, target: Tensor, ignore_index: int) -> tuple:
    """What the gradients made in the forward for a unit upstream (hidden's, weight's,
    bias's) are multiplied by: grad_loss, but 1 for an ignored row of grad_hidden, and for
    grad_weight and grad_bias where no row counts. Those stay zero whatever the upstream,
    as F's do: a nan or infinite one (a sum divided by a count of 0) would make 0 * f nan.
    (A row's factor multiplies as the 0-dim grad_loss did: the same bits.)"""
    if target.is_floating_point():
        return (grad_loss,) * 3
    counted = _reduction.counted(target, ignore_index)
    one = torch.ones_like(grad_loss)
    whole = torch.where(counted.any(), grad_loss, one)
    return torch.where(counted, grad_loss, one).unsqueeze(1), whole, whole


def _define_ops() -> None:
    impls = {"linear_ce_fwd": _fwd_impl, "linear_ce_fwd_grad": _fwd_grad_impl,
             "_linear_ce_bwd": _bwd_impl}
    fakes = {"linear_ce_fwd": _fake_fwd, "linear_ce_fwd_grad": _fake_fwd_grad,
             "_linear_ce_bwd": _fake_bwd}
    for name, schema in SCHEMAS.items():
        qualname = f"{NAMESPACE}::{name}"
        torch.library.custom_op(qualname, impls[name], mutates_args=(), schema=schema)
        torch.library.register_fake(qualname, _ops.one_device(qualname, fakes[name]))
    torch.library.register_autograd(f"{NAMESPACE}::linear_ce_fwd", _fwd_backward,
                                    setup_context=_fwd_setup_context)
    torch.library.register_autograd(f"{NAMESPACE}::linear_ce_fwd_grad", _fwd_grad_backward,
                                    setup_context=_fwd_grad_setup_context)


_define_ops()
_sharding.register(NAMESPACE, "linear")

# The differentiable ops as eager calls (_eager.py): for plain tensors, the formulas above
# in an autograd.Function of their own, without torch.library's Python wrapper (whose
# argument handling took most of a small call's time); the op itself when traced.
EAGER = {name: _eager.eager_call(getattr(_ns(), name).default, name, backward, setup)
         for name, backward, setup in (
             ("linear_ce_fwd", _fwd_backward, _fwd_setup_context),
             ("linear_ce_fwd_grad", _fwd_grad_backward, _fwd_grad_setup_context))}
