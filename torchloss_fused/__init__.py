"""torchloss_fused: fused softmax cross-entropy and focal losses for PyTorch.

    import torchloss_fused as tlf
    loss = tlf.cross_entropy(logits, target)   # drop-in for F.cross_entropy

C++ kernels serve CPU tensors, CUDA kernels GPU tensors, and a pure-PyTorch fallback
anything else; `backend_info(device)` says which and why.
"""

from . import (
    _cpu_streaming,  # noqa: F401  (applies TLF_CPU_STREAM_MIB)
    _ops,  # noqa: F401  (registers fake kernels and autograd for the ops)
)
from ._backend import FORCE_REFERENCE_ENV, backend_info
from ._host_buffers import cpu_cache_info, empty_cpu_cache
from .functional import cross_entropy, focal_loss, sigmoid_focal_loss
from .linear_ce import LinearCrossEntropyLoss, linear_cross_entropy
from .modules import CrossEntropyLoss, FocalLoss, SigmoidFocalLoss
from .patching import TorchPatch, patch_torch

__version__ = "0.1.0"

__all__ = [
    "FORCE_REFERENCE_ENV",
    "CrossEntropyLoss",
    "FocalLoss",
    "LinearCrossEntropyLoss",
    "SigmoidFocalLoss",
    "TorchPatch",
    "backend_info",
    "cpu_cache_info",
    "cross_entropy",
    "empty_cpu_cache",
    "focal_loss",
    "linear_cross_entropy",
    "patch_torch",
    "sigmoid_focal_loss",
]
