"""Oracles in float64 and the comparison rules of DESIGN.md §6."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import torchloss_fused

LOW_PRECISION = (torch.bfloat16, torch.float16)


def random_logits(shape, dtype, device, scale=3.0, requires_grad=True):
    """Fresh random logits (never zeros), rounded to `dtype`."""
    x = (torch.randn(shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


def random_targets(shape, num_classes, device, ignore_index=-100, ignore_frac=0.0,
                   dtype=torch.int64):
    t = torch.randint(0, max(num_classes, 1), shape)
    if ignore_frac > 0:
        t[torch.rand(shape) < ignore_frac] = ignore_index
    return t.to(device=device, dtype=dtype)


def draw_index_targets(draw, generator, shape, num_classes):
    """For hypothesis strategies: class-index targets of `shape` with an ignore_index that
    may also be a real class, none, some or all of them ignored. (target, ignore_index)."""
    from hypothesis import strategies as st  # (only the differential tests need it)

    ii = draw(st.sampled_from([-100, -1, 0, num_classes - 1]))
    t = torch.randint(0, num_classes, shape, generator=generator)
    which = draw(st.sampled_from(["none", "some", "all"]))
    if which == "all":
        t.fill_(ii)
    elif which == "some" and t.numel():
        t.view(-1)[: max(1, t.numel() // 3)] = ii
    return t, ii


def oracle_cross_entropy(x, target, weight=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0,
                         dtype=torch.float64):
    """F.cross_entropy on the transformed logits, plus z_loss on counted rows, computed in
    `dtype` (float64: the oracle; the input's dtype: eager PyTorch's own answer).
    Returns (loss, lse) with lse shaped like the unreduced loss."""
    x = x.to(dtype)
    if weight is not None:  # (probability targets promote them, as F.cross_entropy does)
        weight = weight.to(torch.promote_types(dtype, weight.dtype)
                           if target.is_floating_point() else dtype)
    s = x * logit_scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if target.is_floating_point():
        target = target.to(torch.promote_types(dtype, target.dtype))
    elif target.dtype != torch.int64:
        target = target.long()
    loss = F.cross_entropy(s, target, weight=weight, ignore_index=ignore_index,
                           reduction=reduction, label_smoothing=label_smoothing)
    lse = torch.logsumexp(s, dim=1 if s.dim() > 1 else 0)
    if z_loss:
        if target.is_floating_point():
            counted = torch.ones_like(lse, dtype=torch.bool)
            denom = torch.tensor(float(lse.numel()), dtype=lse.dtype)
        else:
            counted = target != ignore_index
            w_t = weight[target.clamp(0)] if weight is not None else torch.ones_like(lse)
            denom = torch.where(counted, w_t, 0).sum()
        z = torch.where(counted, z_loss * lse * lse, 0)
        if reduction == "none":
            loss = loss + z
        elif reduction == "sum":
            loss = loss + z.sum()
        else:
            loss = loss + z.sum() / denom
    return loss, lse


def _max_err(a, b):
    if a.numel() == 0:
        return 0.0
    a, b = a.detach().double(), b.detach().double()
    d = (a - b).abs()
    both_nan = torch.isnan(a) & torch.isnan(b)
    same_inf = torch.isinf(a) & (a == b)
    d = torch.where(both_nan | same_inf, 0, d)
    return float(d.max())


def assert_as_accurate_as_f(ours, f32, exact, what: str, ulps: float = 4) -> None:
    """ours' largest error against the float64 `exact` at most twice F's float32 result's
    (`f32`) plus `ulps` float32 ulps of the largest exact value (the float32-lse tests:
    tests/test_lse_precision.py, tests/dtensor_worker.py's precise_* cases)."""
    err, f_err = _max_err(ours, exact), _max_err(f32, exact)
    floor = ulps * torch.finfo(torch.float32).eps * float(exact.detach().abs().max())
    assert err <= 2 * f_err + floor, (
        f"{what}: max error {err:.3g} against F's {f_err:.3g} (allowed 2x + {floor:.3g})")


def assert_matches(ours, oracle, eager=None, dtype=None, factor=2.0, what="value",
                   extra=0.0):
    """ours vs the float64 oracle. float32/float64: assert_close's defaults for that dtype,
    the absolute tolerance widened by `extra`. bf16/fp16: our max error may exceed eager
    PyTorch's own (same dtype) by `factor`, plus an absolute floor of a few units in the
    last place of the values' magnitude, plus `extra`. `extra` is an error bound the caller
    derives from how the value is computed (0 unless given)."""
    dtype = dtype or ours.dtype
    assert ours.shape == oracle.shape, f"{what}: shape {ours.shape} != {oracle.shape}"
    assert torch.equal(torch.isnan(ours.double()), torch.isnan(oracle.double())), (
        f"{what}: NaN positions differ")
    if dtype not in LOW_PRECISION:
        tol = {"rtol": 1.3e-6, "atol": 1e-5 + extra} if dtype == torch.float32 else \
            {"rtol": 1e-7, "atol": 1e-7 + extra}
        torch.testing.assert_close(ours.double(), oracle.double(), equal_nan=True,
                                   msg=lambda m: f"{what}: {m}", **tol)
        return
    assert eager is not None, "low-precision comparisons need eager PyTorch's result"
    err = _max_err(ours, oracle)
    # Where eager PyTorch itself breaks down (NaN/inf where the oracle is finite), its
    # error says nothing about the attainable accuracy: leave those places out of it.
    usable = torch.isfinite(eager.double()) | ~torch.isfinite(oracle.double())
    eager_err = _max_err(eager.double()[usable], oracle.double()[usable])
    finite = oracle.double()[torch.isfinite(oracle.double())]
    mag = float(finite.abs().max()) if finite.numel() else 0.0
    floor = 4 * torch.finfo(dtype).eps * max(mag, 1e-3) + extra
    assert err <= factor * eager_err + floor, (
        f"{what} ({dtype}): max error {err:.3g} vs eager PyTorch's {eager_err:.3g} "
        f"(allowed {factor} x + {floor:.3g})")


def assert_like_f_under_autocast(ours, theirs, oracle, device, oracle_tol=1e-5):
    """A loss computed under bfloat16 autocast against F's under the same autocast and a
    float64 oracle on the same low-precision values. Ours computes in float32 from those
    values on every device, so it is close to the oracle. F does too on CPU (cross_entropy
    is on autocast's CPU float32 list), where the two agree to rounding; on CUDA F takes
    log_softmax in the logits' bfloat16 and only the NLL in float32 (seen on an H200 with
    torch 2.11: per-row differences up to half a bfloat16 ulp of the log-probabilities),
    so there F is only within bfloat16's error of both."""
    torch.testing.assert_close(ours.double(), oracle.double(), rtol=oracle_tol, atol=oracle_tol)
    if device.type == "cuda":
        torch.testing.assert_close(ours.double(), theirs.double(), rtol=1e-2, atol=1e-2)
    else:
        torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=2e-6)


def as_f_on_device(ref, device, unbatched, prob, kw, ignored):
    """A CPU oracle's loss as F gives it on `device`: on CUDA the mean of an unbatched input
    whose one target is ignored is 0, not 0/0 = nan (without label smoothing)."""
    if (device.type == "cuda" and unbatched and not prob and kw["reduction"] == "mean"
            and not kw["label_smoothing"] > 0 and bool(ignored.all())):
        return torch.where(ref.isnan(), torch.zeros_like(ref), ref)
    return ref


def chunked_logits_tol(device):
    """oracle_tol of assert_like_f_under_autocast for linear_cross_entropy: ours multiplies a
    chunk of rows at a time, and cuBLAS may round a few bfloat16 logits of a chunk apart
    from the whole product's (on CPU they agree)."""
    return 1e-3 if device.type == "cuda" else 1e-5


def assert_ce_like_oracle(x, t, **kw):
    """Our cross_entropy (fused training path) and its gradient against the float64
    oracle, eager PyTorch in the same dtype giving the low-precision error budget.
    Returns our (loss, gradient)."""
    x = x.detach().requires_grad_()
    ours = torchloss_fused.cross_entropy(x, t, reduction="none", **kw)
    grad_out = torch.rand_like(ours, dtype=torch.float64).to(ours.dtype) + 0.5
    (g,) = torch.autograd.grad(ours, x, grad_out)
    results = {}
    for name, dt in (("oracle", torch.float64), ("eager", x.dtype)):
        xr = x.detach().clone().requires_grad_()
        loss, _ = oracle_cross_entropy(xr, t, reduction="none", dtype=dt, **kw)
        (gr,) = torch.autograd.grad(loss, xr, grad_out.to(loss.dtype))
        results[name] = (loss.detach(), gr)
    assert_matches(ours.detach(), results["oracle"][0], results["eager"][0], x.dtype, what="loss")
    assert_matches(g, results["oracle"][1], results["eager"][1], x.dtype, what="grad")
    return ours.detach(), g
