"""The implementations compared for each op: ours, eager PyTorch, torch.compile, peers.

Every implementation is a function of the op's input tuple returning the scalar mean loss
(problems.make_inputs gives (logits, target), (inputs, targets) or (hidden, weight,
target)). `build()` is called once per case, so torch.compile wrappers are made fresh for
each shape (the runner resets dynamo between cases: one compile per shape, reused for all
its runs). Peer libraries join only when they import; their kernels are GPU-only (Triton /
CuTe), so they are offered on CUDA devices only, and only for (N, V) logits: none of their
cross-entropies takes (N, C, H, W) logits with the classes on dim 1.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import eager_losses
from .cases import LINEAR_OPS
from .problems import as_model_output

OURS, EAGER, COMPILE, PEER = "ours", "eager", "compile", "peer"
# Ours inside a compiled function, as in a model compiled with its loss: the softmax
# losses trace their split forward/backward ops there, the sigmoid focal loss scales its
# fused gradient out of place (README, "How it works"); this row shows what that costs
# against the eager path.
OURS_COMPILED = "ours_compiled"
# The ops whose compiled form differs from the eager one (the others run the same op).
_COMPILED_OURS_OPS = ("ce_fwd_bwd", "focal_fwd_bwd", "sigmoid_focal_fwd_bwd")
# A lower bound, not a loss: timed and measured, never checked (linear CE's three products).
BOUND = "bound"
# Another op of ours on the same inputs, timed in turns with the case's rows for a target
# that compares the two (focal_loss's time against cross_entropy's): not checked here, its
# loss being another's (the cross-entropy case checks it).
YARDSTICK = "yardstick"
UNCHECKED_WHY = {BOUND: "a lower bound: computes no loss, so it is not checked",
                 YARDSTICK: "cross_entropy on the focal case's inputs, timed in turns with "
                            "it (focal/CE target); checked in its own case"}


@dataclass(frozen=True)
class Impl:
    name: str
    kind: str
    build: Callable[[], Callable[..., torch.Tensor]]
    # Writes into its inputs (gradient stored in the logits): run after the others, and
    # the runner rebuilds the input sets afterwards.
    mutates_inputs: bool = False

    @property
    def checked(self) -> bool:
        return self.kind not in UNCHECKED_WHY


def _try_import(module: str):
    try:
        return importlib.import_module(module)
    except Exception:  # noqa: BLE001  (a broken peer install must not stop the benchmark)
        return None


def ours_module():
    return _try_import("torchloss_fused")


def ours_label(device: torch.device) -> str:
    """'torchloss_fused', marked when only the pure-PyTorch fallback serves this device."""
    tlf = ours_module()
    if tlf is None or not hasattr(tlf, "backend_info"):
        return "torchloss_fused"
    impl = tlf.backend_info(device)["implementation"]
    return "torchloss_fused" if impl != "reference" else "torchloss_fused [reference]"


def _compiled(fn) -> Callable:
    return torch.compile(fn, dynamic=False)


def eager_fn(op: str) -> Callable:
    """Eager PyTorch's version of `op`: the baseline, and the bar for bf16/fp16 accuracy."""
    return _eager_named(op)[1]


def _eager_named(op: str) -> tuple[str, Callable]:
    if op in ("ce_fwd", "ce_fwd_bwd"):
        return "F.cross_entropy", F.cross_entropy
    if op == "focal_fwd_bwd":
        return "softmax_focal_loss", eager_losses.softmax_focal_loss
    if op == "sigmoid_focal_fwd_bwd":
        return "sigmoid_focal_loss", eager_losses.sigmoid_focal_loss
    if op in LINEAR_OPS:  # (F.cross_entropy takes either kind of target)
        return "F.linear+F.cross_entropy", eager_losses.linear_cross_entropy
    raise ValueError(op)


def _ours(op: str, label: str) -> list[Impl]:
    tlf = ours_module()
    if op in ("ce_fwd", "ce_fwd_bwd") and hasattr(tlf, "cross_entropy"):
        impls = [Impl(label, OURS, lambda: lambda x, y: tlf.cross_entropy(x, y))]
        if op == "ce_fwd_bwd":
            impls.append(Impl(
                f"{label} inplace_backward", OURS,
                lambda: lambda x, y: tlf.cross_entropy(as_model_output(x), y,
                                                       inplace_backward=True),
                mutates_inputs=True))
        return impls
    if op == "focal_fwd_bwd" and hasattr(tlf, "focal_loss"):
        gamma = eager_losses.GAMMA
        return [Impl(label, OURS, lambda: lambda x, y: tlf.focal_loss(x, y, gamma=gamma)),
                Impl(f"{label} cross_entropy", YARDSTICK,
                     lambda: lambda x, y: tlf.cross_entropy(x, y))]
    if op == "sigmoid_focal_fwd_bwd" and hasattr(tlf, "sigmoid_focal_loss"):
        alpha, gamma = eager_losses.SIGMOID_ALPHA, eager_losses.GAMMA
        return [Impl(label, OURS, lambda: lambda x, t: tlf.sigmoid_focal_loss(
            x, t, alpha=alpha, gamma=gamma, reduction="mean"))]
    if op in LINEAR_OPS and hasattr(tlf, "linear_cross_entropy"):
        return [Impl(label, OURS, lambda: lambda h, w, y: tlf.linear_cross_entropy(h, w, y))]
    return []


def _peers(op: str) -> list[Impl]:
    impls = []
    if op in ("ce_fwd", "ce_fwd_bwd"):
        liger = _try_import("liger_kernel.transformers.functional")
        if liger is not None and hasattr(liger, "liger_cross_entropy"):
            # Liger stores the gradient in the logits during forward.
            impls.append(Impl("liger_kernel", PEER, lambda: liger.liger_cross_entropy,
                              mutates_inputs=True))
        quack = _try_import("quack.cross_entropy")
        if quack is not None and hasattr(quack, "cross_entropy"):
            impls.append(Impl("quack", PEER, lambda: quack.cross_entropy))
    if op == "linear_ce_fwd_bwd":  # (neither peer takes probability targets)
        cce = _try_import("cut_cross_entropy")
        if cce is not None and hasattr(cce, "linear_cross_entropy"):
            # cce_exact: the default "cce" drops small gradient entries by design, which
            # the exact-gradient check would (rightly) flag.
            impls.append(Impl("cut_cross_entropy (cce_exact)", PEER, lambda: lambda h, w, y:
                              cce.linear_cross_entropy(h, w, y, impl="cce_exact")))
        liger = _try_import("liger_kernel.transformers.functional")
        if liger is not None and hasattr(liger, "liger_fused_linear_cross_entropy"):
            impls.append(Impl("liger_kernel fused linear CE", PEER,
                              lambda: liger.liger_fused_linear_cross_entropy))
    return impls


def impls_for(op: str, device: torch.device, compile_baseline: bool = True,
              peers: bool = True, spatial: bool = False) -> list[Impl]:
    """The implementations of `op` on `device`; those that mutate their inputs come last.
    spatial: the case's logits are (N, C, H, W) (Case.spatial), which no peer takes.

    linear_cross_entropy is benchmarked only once torchloss_fused provides it.
    """
    ours = _ours(op, ours_label(device))
    if op in LINEAR_OPS and not ours:
        return []
    name, eager = _eager_named(op)
    impls = ours + [Impl(f"{name} (eager)", EAGER, lambda: eager)]
    if compile_baseline:
        impls.append(Impl(f"torch.compile({name})", COMPILE, lambda: _compiled(eager)))
        if ours and op in _COMPILED_OURS_OPS:
            build = ours[0].build
            impls.append(Impl(f"torch.compile({ours[0].name})", OURS_COMPILED,
                              lambda: _compiled(build())))
    if op in LINEAR_OPS:
        impls.append(Impl("3 matmuls alone (time floor, no loss)", BOUND,
                          lambda: eager_losses.linear_matmuls_only))
    if peers and device.type == "cuda" and not spatial:
        impls += _peers(op)
    return sorted(impls, key=lambda impl: impl.mutates_inputs)
