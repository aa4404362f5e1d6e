"""Shared fixtures: devices, backends, seeded random inputs."""

from __future__ import annotations

import pytest
import torch

from torchloss_fused import _backend, _upstream_guess

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_report_header(config):
    lines = [f"torch {torch.__version__}; devices: {', '.join(DEVICES)}"]
    for d in DEVICES:
        lines.append(f"torchloss_fused on {d}: {_backend.backend_info(d)}")
    return lines


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=["kernels", "reference"])
def backend(request, monkeypatch):
    """Runs a test once through the compiled kernels and once through the pure-PyTorch
    fallback (the same public functions, with the kernel lookup switched off)."""
    if request.param == "kernels" and not _backend.EXTENSION_LOADED:
        pytest.skip("compiled extension not loaded")
    if request.param == "reference":
        monkeypatch.setattr(_backend, "_HAS_KERNELS", {})
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_upstream_guesses():
    # A test's guesses, hits and misses must not depend on which losses the tests before
    # it scaled (_upstream_guess.py).
    _upstream_guess.GUESSES.clear()
