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


def _denormals_flushed() -> bool:
    return torch.tensor(1e-40, dtype=torch.float32).mul(1).item() == 0


@pytest.fixture(autouse=True)
def _denormals_kept():
    # torch 2.4.1's Inductor (not 2.13's) builds its CPU kernels with -ffast-math, so GCC
    # links crtfastmath.o into them, whose constructor sets FTZ/DAZ when torch.compile loads
    # the first one: denormals read as 0 in every later test of the process (nextafter(0,
    # inf) is 0 there, an ulp of 0). A test must not depend on whether one before compiled.
    yield
    if _denormals_flushed():
        torch.set_flush_denormal(False)
