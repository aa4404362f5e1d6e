"""nn.Module wrappers whose constructors mirror torch.nn.CrossEntropyLoss."""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import Tensor, nn

from . import functional as F
from .vocab_parallel import replicated_like

__all__ = ["CrossEntropyLoss", "FocalLoss", "SigmoidFocalLoss"]


def warn_torchscript(module: nn.Module) -> nn.Module:
    """A loss module's __prepare_scriptable__, which torch.jit.script calls on every module
    under the one it scripts: the losses' Python (argument checks, keyword-only extras, the
    DTensor and autograd paths) is beyond TorchScript, whose own error, should the scripted
    code call the loss, points into this library's source. A warning says why first; not
    an error, since a module holding a loss it does not call in TorchScript scripts, as
    with torch.nn's losses: the losses' forward is marked @torch.jit.unused, so scripting
    compiles its signature, not its body. (TorchScript is deprecated: 2.13 warns at every
    script call.)"""
    warnings.warn(
        f"torchloss_fused.{type(module).__name__} cannot be compiled by TorchScript "
        "(torch.jit.script): a scripted module may hold it but cannot call it. Compute the "
        "loss outside the scripted module, or use torch.compile or torch.export, which "
        "both take it", UserWarning, stacklevel=3)
    return module


def settings_repr(module: nn.Module, init, names: tuple[str, ...]) -> str:
    """extra_repr: the settings in `names` that differ from `init`'s defaults (a tensor, as
    weight or alpha, by its shape only: torch.nn's losses print no buffer). A
    default-constructed module prints as torch.nn's losses do (``CrossEntropyLoss()``)."""
    defaults = inspect.signature(init).parameters
    parts = []
    for name in names:
        value = getattr(module, name)
        if isinstance(value, Tensor):
            parts.append(f"{name}=Tensor(shape={tuple(value.shape)})")
        elif _differs(value, defaults[name].default):
            parts.append(f"{name}={value!r}")
    return ", ".join(parts)


def _differs(value, default) -> bool:
    # (a NumPy array's != is elementwise: its truth ambiguous, and print(model) raised)
    try:
        return bool(value != default)
    except (TypeError, ValueError, RuntimeError):
        return True


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` with the keyword-only extras of
    :func:`torchloss_fused.cross_entropy`: a subclass of it (code that checks
    ``isinstance(loss, nn.CrossEntropyLoss)`` takes it), with the same attributes and
    state dict. ``weight`` is a buffer, as in PyTorch; given a DTensor input, a plain
    buffer is used as a replicated DTensor on its mesh."""

    __prepare_scriptable__ = warn_torchscript

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        logit_scale: float = 1.0,
        return_lse: bool = False,
        inplace_backward: bool = False,
    ) -> None:
        if size_average is not None or reduce is not None:
            reduction = F._legacy_reduction_string(size_average, reduce)
        # (the weight buffer, ignore_index, reduction and label_smoothing, set as torch's)
        super().__init__(weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.return_lse = return_lse
        self.inplace_backward = inplace_backward

    @torch.jit.unused  # (see warn_torchscript)
    def forward(self, input: Tensor, target: Tensor):
        # (Under tensor parallelism the buffer goes with the DTensor input, replicated.)
        return F.cross_entropy(
            input, target, weight=replicated_like(self.weight, input),
            ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing,
            z_loss=self.z_loss, softcap=self.softcap, logit_scale=self.logit_scale,
            return_lse=self.return_lse, inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        return settings_repr(self, CrossEntropyLoss.__init__, (
            "weight", "ignore_index", "reduction", "label_smoothing", "z_loss", "softcap",
            "logit_scale", "return_lse", "inplace_backward"))


class FocalLoss(nn.Module):
    """Softmax focal loss module; see :func:`torchloss_fused.focal_loss`. A per-class
    ``alpha`` tensor is a buffer (in the state dict; it follows ``.to(device)``), whether
    given to the constructor or assigned later; an ``nn.Parameter`` a parameter, learned
    with the model's; a number or None a plain attribute."""

    __prepare_scriptable__ = warn_torchscript

    def __init__(self, gamma: float = 2.0, alpha: float | Tensor | None = None,
                 ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__()
        self.gamma = gamma
        self.alpha = alpha
        self.ignore_index = ignore_index
        self.reduction = reduction

    def __setattr__(self, name: str, value) -> None:
        # alpha changes kind with its value (as weight cannot: torch's is always a buffer,
        # None or a tensor); a tensor assigned after construction had been a plain
        # attribute, left out of the state dict (a reloaded module lost it) and of .to().
        # An nn.Parameter is a parameter (torch's losses make a weight one a buffer, which
        # no optimizer given model.parameters() then learns; a learnable alpha is this
        # loss's own feature).
        # (nn.Module's own assignment handles a Parameter: it leaves the buffers itself)
        if name == "alpha" and "_buffers" in self.__dict__ and \
                not isinstance(value, nn.Parameter):
            self._parameters.pop("alpha", None)
            self._buffers.pop("alpha", None)
            if isinstance(value, Tensor):
                self.__dict__.pop("alpha", None)
                self.register_buffer("alpha", value)
                return
        super().__setattr__(name, value)

    @torch.jit.unused  # (see warn_torchscript)
    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.focal_loss(input, target, gamma=self.gamma,
                            alpha=replicated_like(self.alpha, input),
                            ignore_index=self.ignore_index, reduction=self.reduction)

    def extra_repr(self) -> str:
        return settings_repr(self, FocalLoss.__init__,
                             ("gamma", "alpha", "ignore_index", "reduction"))


class SigmoidFocalLoss(nn.Module):
    """Module form of :func:`torchloss_fused.sigmoid_focal_loss` (torchvision semantics)."""

    __prepare_scriptable__ = warn_torchscript

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none") -> None:
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma
        self.reduction = reduction

    @torch.jit.unused  # (see warn_torchscript)
    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return F.sigmoid_focal_loss(inputs, targets, alpha=self.alpha, gamma=self.gamma,
                                    reduction=self.reduction)

    def extra_repr(self) -> str:
        return settings_repr(self, SigmoidFocalLoss.__init__, ("alpha", "gamma", "reduction"))
