"""The check every implementation passes before it is timed; a miss marks its row FAILED.

Both figures are measured against the fp64 oracle (benchmarks.oracle):

- loss error: |loss - ref| / |ref|.
- gradient error: max over elements of |g - ref| / (|ref| + mean|ref|). Relative per element
  so that the many small off-target entries (about 1/(N*V) each) count as much as the large
  target entries; the mean|ref| floor keeps entries near zero from dividing by ~0.

Tolerances (DESIGN.md §6): fp32 has fixed ones. For bf16/fp16 an implementation must be
no worse than EAGER_FACTOR times eager PyTorch's own error on the same inputs in that dtype
(measured per case: eager rounds log-probabilities to bf16, and its bf16 mean loss drifts
with N), and never has to beat a fixed floor. A wrong formula (wrong scale, missing term,
label smoothing, dropped rows) misses by far more.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .oracle import Oracle, row_chunks

# dtype -> (loss relative tolerance, gradient tolerance): the whole tolerance for fp32, the
# floor for the low-precision dtypes.
TOLERANCES = {
    "fp32": (1e-4, 1e-3),
    "fp16": (2e-3, 1e-2),
    "bf16": (1e-2, 5e-2),
}
LOW_PRECISION = frozenset({"bf16", "fp16"})
EAGER_FACTOR = 2.0


@dataclass
class CheckResult:
    ok: bool
    loss_err: float
    grad_err: float | None
    loss_tol: float
    grad_tol: float | None
    message: str

    def to_json(self) -> dict:
        d = asdict(self)
        # JSON has no inf/nan: a non-finite error is reported as null with ok=False.
        for key in ("loss_err", "grad_err"):
            if d[key] is not None and not math.isfinite(d[key]):
                d[key] = None
        return d


def loss_error(loss: torch.Tensor, ref: float) -> float:
    value = loss.detach().double().item()
    if not math.isfinite(value):
        return math.inf
    return abs(value - ref) / max(abs(ref), 1e-30)


def grad_error(grad: torch.Tensor | None, ref: torch.Tensor, scale: float) -> float:
    """The gradient error above; `scale` is mean|ref|. Computed in fp32 (ref is fp32): its
    rounding is orders of magnitude below the tightest tolerance."""
    if grad is None or grad.shape != ref.shape:
        return math.inf
    worst = 0.0
    floor = scale + 1e-30
    for s in row_chunks(ref.shape[0], 4 * ref[0].numel(), ref.device):
        b = ref[s]
        err = torch.sub(grad[s], b).abs_().div_(b.abs().add_(floor)).max().item()
        if not math.isfinite(err):  # a NaN or inf in the candidate
            return math.inf
        worst = max(worst, err)
    return worst


def tolerances(dtype: str, eager: CheckResult | None = None) -> tuple[float, float]:
    """(loss, gradient) tolerances; `eager` is eager PyTorch's own check on the case."""
    loss_tol, grad_tol = TOLERANCES[dtype]
    if dtype in LOW_PRECISION and eager is not None:
        if math.isfinite(eager.loss_err):
            loss_tol = max(loss_tol, EAGER_FACTOR * eager.loss_err)
        if eager.grad_err is not None and math.isfinite(eager.grad_err):
            grad_tol = max(grad_tol, EAGER_FACTOR * eager.grad_err)
    return loss_tol, grad_tol


def compare(loss: torch.Tensor, grads, oracle: Oracle,
            tol: tuple[float, float]) -> CheckResult:
    """Checks a loss value (and its gradients, for fwd+bwd ops) against the oracle."""
    loss_tol, grad_tol = tol
    problems = []
    if loss.numel() != 1:
        problems.append(f"loss has shape {tuple(loss.shape)}, expected a scalar")
        l_err = math.inf
    else:
        l_err = loss_error(loss, oracle.loss)
        if not l_err <= loss_tol:
            problems.append(f"loss err {l_err:.2e} > {loss_tol:.0e}")
    g_err = None
    if oracle.grads:
        g_err = max(grad_error(g, r, scale) for g, r, scale
                    in zip(grads, oracle.grads, oracle.grad_scales, strict=True))
        if not g_err <= grad_tol:
            problems.append(f"grad err {g_err:.2e} > {grad_tol:.0e}")
    return CheckResult(
        ok=not problems,
        loss_err=l_err,
        grad_err=g_err,
        loss_tol=loss_tol,
        grad_tol=grad_tol if oracle.grads else None,
        message="; ".join(problems),
    )
