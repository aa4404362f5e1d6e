"""Large CPU buffers are advised onto transparent huge pages (Linux), others left alone."""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest
import torch

import torchloss_fused as tlf
from torchloss_fused import _backend, _huge_pages

if _backend.EXTENSION_LOADED:
    from torchloss_fused import _C

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage"),
                       reason="no transparent huge pages on this system"),
    pytest.mark.skipif(not _backend.EXTENSION_LOADED, reason="extension not loaded"),
]


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _middle(t: torch.Tensor) -> int:
    return t.data_ptr() + t.nbytes // 2


def test_large_buffer_is_advised():
    t = _huge_pages.empty((16 << 20) // 4, dtype=torch.float32, device=torch.device("cpu"))
    assert t.shape == ((16 << 20) // 4,) and t.dtype == torch.float32
    assert "hg" in _vm_flags(_middle(t))


@pytest.mark.parametrize("mib,advised", [(6, False), (16, True)])
def test_the_8_mib_threshold(mib, advised):
    # A mapping of its own: a freed tensor's memory may sit in a region advised earlier.
    region = mmap.mmap(-1, mib << 20)
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(region))
        _C.advise_huge_pages(address, mib << 20)
        assert ("hg" in _vm_flags(address + (mib << 19))) == advised
    finally:
        region.close()


def test_cross_entropy_gradient_buffer_is_advised():
    x = torch.randn(1024, 4096, requires_grad=True)  # a 16 MiB gradient
    y = torch.randint(0, 4096, (1024,))
    tlf.cross_entropy(x, y).backward()
    assert "hg" in _vm_flags(_middle(x.grad))


def test_sigmoid_focal_elementwise_loss_is_advised():
    x = torch.randn(4096, 1024)  # a 16 MiB loss, reduction="none"
    t = (torch.rand(4096, 1024) < 0.05).float()
    loss = tlf.sigmoid_focal_loss(x, t)
    assert loss.shape == x.shape
    assert "hg" in _vm_flags(_middle(loss))
