"""Which implementation serves which device, and why.

The compiled extension (`torchloss_fused._C`) registers C++/CUDA kernels with the
dispatcher. When it is missing, fails to load, has no kernels for a device, or
TORCHLOSS_FUSED_FORCE_REFERENCE=1 is set, the pure-PyTorch reference ops (same contract,
namespace `torchloss_fused_ref`) serve instead.
"""

from __future__ import annotations

import warnings
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import torch

from torchloss_fused import _cuda_tuning
from torchloss_fused._env import switch
from torchloss_fused._schemas import PY_API, SCHEMAS

FORCE_REFERENCE_ENV = "TORCHLOSS_FUSED_FORCE_REFERENCE"

_OP = "torchloss_fused::ce_fwd"


def _stale(extension) -> str | None:
    """What an extension built from older sources lacks: an op or a schema of this
    package's (a missing one made `import torchloss_fused` fail), or its Python functions'
    version (_schemas.PY_API). None for a current one."""
    if getattr(extension, "PY_API", None) != PY_API:
        return f"its functions are version {getattr(extension, 'PY_API', 1)}, not {PY_API}"
    for name, schema in SCHEMAS.items():
        expected = str(torch._C.parse_schema(f"torchloss_fused::{name}{schema}"))
        try:
            found = str(getattr(torch.ops.torchloss_fused, name).default._schema)
        except (AttributeError, RuntimeError):
            return f"it has no op {name}"
        if found != expected:
            return f"its op {name} is {found}"
    return None


def _fallback(reason: str, remedy: str) -> tuple[bool, str]:
    warnings.warn(f"torchloss_fused: {reason}; using the pure-PyTorch fallback, which is "
                  f"correct but slower. {remedy}", RuntimeWarning, stacklevel=4)
    return False, reason


_BUILD = ("Build it with `pip install --no-build-isolation .` (`-e .` in a checkout) where "
          "a C++ compiler is.")


def _load_extension() -> tuple[bool, str]:
    if switch(FORCE_REFERENCE_ENV):
        return False, f"{FORCE_REFERENCE_ENV} is set"
    try:
        from torchloss_fused import _C  # (loading registers the kernels)
    except ImportError as exc:  # not built, built against another torch or elsewhere
        here = Path(__file__).parent
        if not any((here / f"_C{suffix}").exists() for suffix in EXTENSION_SUFFIXES):
            return _fallback("the compiled extension was not built", _BUILD)
        return _fallback(f"the compiled extension could not be loaded ({exc})",
                         "Rebuild it against this torch: " + _BUILD)
    stale = _stale(_C)
    if stale is not None:
        return _fallback(f"the compiled extension was built from older sources ({stale})",
                         "Rebuild it: " + _BUILD)
    return True, "compiled extension loaded"


EXTENSION_LOADED, _LOAD_REASON = _load_extension()


def _dispatch_key(device_type: str) -> str:
    return {"cpu": "CPU", "cuda": "CUDA"}.get(device_type, device_type.upper())


def _query_kernels(device_type: str) -> bool:
    if not EXTENSION_LOADED:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(_OP, _dispatch_key(device_type))


# Decided once at import, so that functions traced by torch.compile only read a dict.
_HAS_KERNELS = {t: _query_kernels(t) for t in ("cpu", "cuda")}



def _apply_cuda_tuning() -> _cuda_tuning.CudaTuning | None:
    # A malformed TLF_CUDA_TUNING raises on every build, not only where it would apply.
    tuning = _cuda_tuning.from_env()
    if tuning is None or not _HAS_KERNELS["cuda"]:
        return None
    _cuda_tuning.apply(tuning)
    return tuning


# The launch settings TLF_CUDA_TUNING gave the CUDA kernels (None: the defaults).
CUDA_TUNING = _apply_cuda_tuning()


def has_kernels(device_type: str) -> bool:
    """True when the compiled extension has kernels for this device type."""
    return _HAS_KERNELS.get(device_type, False)


def ops_for(device: torch.device):
    """The op namespace that serves tensors on `device`."""
    if _HAS_KERNELS.get(device.type, False):
        return torch.ops.torchloss_fused
    return torch.ops.torchloss_fused_ref


def extension_module():
    """The compiled extension's module, or None where it is not loaded."""
    if not EXTENSION_LOADED:
        return None
    from torchloss_fused import _C

    return _C


def _cpu_kernel_flavour() -> str:
    from torchloss_fused import _C

    return _C.cpu_kernels()


def backend_info(device: str | torch.device = "cpu") -> dict:
    """Which implementation serves `device`, and why.

    Returns a dict with keys ``device``, ``implementation`` (``"cpp"``, ``"cuda"`` or
    ``"reference"``), ``detail`` and ``reason``.
    """
    device = torch.device(device)
    if has_kernels(device.type):
        if device.type == "cpu":
            return {
                "device": str(device),
                "implementation": "cpp",
                "detail": f"C++ kernels, {_cpu_kernel_flavour()} instruction set",
                "reason": _LOAD_REASON,
            }
        detail = f"{device.type.upper()} kernels"
        if device.type == "cuda" and CUDA_TUNING not in (None, _cuda_tuning.DEFAULT):
            detail += f" (launch tuning {CUDA_TUNING.describe()})"
        return {
            "device": str(device),
            "implementation": device.type,
            "detail": detail,
            "reason": _LOAD_REASON,
        }
    if EXTENSION_LOADED:
        reason = f"the compiled extension was built without {device.type} kernels"
    else:
        reason = _LOAD_REASON
    return {
        "device": str(device),
        "implementation": "reference",
        "detail": "pure-PyTorch fallback (torchloss_fused.reference)",
        "reason": reason,
    }
