"""Large CPU buffers (csrc/host_buffers.h, torchloss_fused/_host_buffers.py): advised onto
transparent huge pages (Linux), others left alone; reused from the host buffer cache after
their tensors are freed, within its limit, with results the same as on fresh memory."""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import torchloss_fused as tlf
from benchmarks import memory
from torchloss_fused import _backend, _host_buffers

if _backend.EXTENSION_LOADED:
    from torchloss_fused import _C

pytestmark = pytest.mark.skipif(not _backend.EXTENSION_LOADED, reason="extension not loaded")
needs_thp = pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage"),
                               reason="no transparent huge pages on this system")
CPU = torch.device("cpu")
MiB = 1 << 20


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


@needs_thp
def test_large_buffer_is_advised():
    tlf.empty_cpu_cache()  # a fresh block
    t = _host_buffers.empty((16 << 20) // 4, dtype=torch.float32, device=CPU)
    assert t.shape == ((16 << 20) // 4,) and t.dtype == torch.float32
    assert "hg" in _vm_flags(_middle(t))


@needs_thp
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


@needs_thp
def test_cross_entropy_gradient_buffer_is_advised():
    x = torch.randn(1024, 4096, requires_grad=True)  # a 16 MiB gradient
    y = torch.randint(0, 4096, (1024,))
    tlf.cross_entropy(x, y).backward()
    assert "hg" in _vm_flags(_middle(x.grad))


@needs_thp
def test_sigmoid_focal_elementwise_loss_is_advised():
    x = torch.randn(4096, 1024)  # a 16 MiB loss, reduction="none"
    t = (torch.rand(4096, 1024) < 0.05).float()
    loss = tlf.sigmoid_focal_loss(x, t)
    assert loss.shape == x.shape
    assert "hg" in _vm_flags(_middle(loss))


@pytest.fixture
def cache_limit():
    """Sets the cache's limit for a test (bytes), restoring it and emptying the cache after."""
    before = tlf.cpu_cache_info()["limit_bytes"]
    tlf.empty_cpu_cache()
    yield _C.set_host_cache_limit
    _C.set_host_cache_limit(before)
    tlf.empty_cpu_cache()


def test_a_freed_block_is_reused_whole(cache_limit):
    cache_limit(64 * MiB)
    a = _host_buffers.empty((3 * MiB,), dtype=torch.float32, device=CPU)  # 12 MiB
    address, info = a.data_ptr(), tlf.cpu_cache_info()
    assert info["cached_bytes"] == 0 and a.is_contiguous() and a.shape == (3 * MiB,)
    del a
    assert tlf.cpu_cache_info()["cached_bytes"] == 12 * MiB  # rounded to 2 MiB pages
    other = _host_buffers.empty((5 * MiB,), dtype=torch.float32, device=CPU)  # another size
    assert tlf.cpu_cache_info()["hits"] == info["hits"]
    b = _host_buffers.empty((3 * MiB,), dtype=torch.float32, device=CPU)
    assert b.data_ptr() == address and tlf.cpu_cache_info()["hits"] == info["hits"] + 1
    # Same bytes, another dtype and shape: the same block.
    del b
    c = _host_buffers.empty((2, 3 * MiB), dtype=torch.bfloat16, device=CPU)
    assert c.data_ptr() == address and c.dtype == torch.bfloat16
    del c, other


def test_small_buffers_bypass_the_cache(cache_limit):
    cache_limit(64 * MiB)
    hits = tlf.cpu_cache_info()["hits"]
    for _ in range(3):
        t = _host_buffers.empty((MiB // 8,), dtype=torch.float32, device=CPU)  # 512 KiB
        del t
    info = tlf.cpu_cache_info()
    assert info["cached_bytes"] == 0 and info["hits"] == hits


@pytest.mark.parametrize("floats", [MiB // 4, 409600, MiB + 1, 2 * MiB - 5])
def test_blocks_below_8_mib_are_whole_pages(cache_limit, floats):
    """From 1 MiB to 8 MiB (no huge pages there) a block is the buffer rounded up to 4 KiB
    pages, not to 2 MiB: a (4096, 100) float32 gradient (1.6 MB) is no 2 MiB block."""
    cache_limit(64 * MiB)
    t = _host_buffers.empty((floats,), dtype=torch.float32, device=CPU)
    address = t.data_ptr()
    assert address % 4096 == 0
    del t
    page = 4096
    assert tlf.cpu_cache_info()["cached_bytes"] == (4 * floats + page - 1) // page * page
    assert _host_buffers.empty((floats,), dtype=torch.float32, device=CPU).data_ptr() == address


def test_a_mid_sized_gradient_is_reused_step_after_step(cache_limit):
    # (4096, 100) float32: a 1.6 MB gradient, which PyTorch's allocator (glibc's heap) had
    # faulted in afresh on many steps (up to about 185 page faults a step)
    cache_limit(64 * MiB)
    x = torch.randn(4096, 100, requires_grad=True)
    t = torch.randint(0, 100, (4096,))
    tlf.cross_entropy(x, t).backward()
    address, hits = x.grad.data_ptr(), tlf.cpu_cache_info()["hits"]
    for _ in range(3):
        x.grad = None
        tlf.cross_entropy(x, t).backward()
        assert x.grad.data_ptr() == address
    assert tlf.cpu_cache_info()["hits"] == hits + 3


def test_limit_evicts_the_least_recently_freed(cache_limit):
    cache_limit(30 * MiB)
    a = _host_buffers.empty((4 * MiB,), dtype=torch.float32, device=CPU)  # 16 MiB
    b = _host_buffers.empty((3 * MiB,), dtype=torch.float32, device=CPU)  # 12 MiB
    c = _host_buffers.empty((5 * MiB,), dtype=torch.float32, device=CPU)  # 20 MiB
    kept = c.data_ptr()
    del a, b  # 28 MiB cached
    assert tlf.cpu_cache_info()["cached_bytes"] == 28 * MiB
    del c  # 20 MiB more: a (the oldest) then b go
    info = tlf.cpu_cache_info()
    assert info["cached_bytes"] == 20 * MiB and info["cached_blocks"] == 1
    assert _host_buffers.empty((5 * MiB,), dtype=torch.float32, device=CPU).data_ptr() == kept
    big = _host_buffers.empty((10 * MiB,), dtype=torch.float32, device=CPU)  # 40 MiB
    del big  # over the limit alone: freed, nothing evicted for it
    assert tlf.cpu_cache_info()["cached_bytes"] <= 30 * MiB
    cache_limit(0)  # off: everything goes
    assert tlf.cpu_cache_info()["cached_bytes"] == 0
    t = _host_buffers.empty((4 * MiB,), dtype=torch.float32, device=CPU)
    del t
    assert tlf.cpu_cache_info()["cached_bytes"] == 0


def test_empty_cpu_cache_frees_blocks_but_not_tensors_in_use(cache_limit):
    cache_limit(64 * MiB)
    kept = _host_buffers.empty((4 * MiB,), dtype=torch.float32, device=CPU).fill_(3.0)
    freed = _host_buffers.empty((4 * MiB,), dtype=torch.float32, device=CPU)
    del freed
    assert tlf.cpu_cache_info()["cached_blocks"] == 1
    tlf.empty_cpu_cache()
    assert tlf.cpu_cache_info()["cached_blocks"] == 0
    assert bool((kept == 3.0).all())
    del kept  # cached again when freed
    assert tlf.cpu_cache_info()["cached_blocks"] == 1


def test_reused_gradients_equal_fresh_ones(cache_limit):
    """A gradient written into a reused block (holding the last step's values) is bitwise
    the one written into fresh memory, for each op that takes its output from the cache."""
    cache_limit(256 * MiB)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 4096, generator=gen).requires_grad_()  # 16 MiB
    y = torch.randint(0, 4096, (1024,), generator=gen)
    y[::7] = -100
    t = (torch.rand(1024, 4096, generator=gen) < 0.05).float()
    steps = [lambda: tlf.cross_entropy(x, y, label_smoothing=0.1).backward(),
             lambda: tlf.focal_loss(x, y, gamma=2.0).backward(),
             lambda: tlf.sigmoid_focal_loss(x, t, reduction="none").sum().backward(),
             lambda: tlf.sigmoid_focal_loss(x, t, reduction="mean").backward()]
    for step in steps:
        fresh = []
        for limit in (0, 256 * MiB, 256 * MiB):  # fresh memory, then reused blocks
            cache_limit(limit)
            step()
            fresh.append(x.grad)
            x.grad = None
        assert torch.equal(fresh[0], fresh[1]) and torch.equal(fresh[0], fresh[2])
        del fresh
        hits = tlf.cpu_cache_info()["hits"]
        step()  # served from the cache
        assert tlf.cpu_cache_info()["hits"] > hits
        x.grad = None


def test_linear_cross_entropy_reuses_its_buffers(cache_limit):
    cache_limit(512 * MiB)
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(512, 256, generator=gen).requires_grad_()
    w = (torch.randn(32000, 256, generator=gen) / 16).requires_grad_()  # 31 MiB
    y = torch.randint(0, 32000, (512,), generator=gen)
    tlf.linear_cross_entropy(h, w, y).backward()
    gw, gh = w.grad.clone(), h.grad.clone()
    w.grad = h.grad = None
    hits = tlf.cpu_cache_info()["hits"]
    tlf.linear_cross_entropy(h, w, y).backward()
    assert tlf.cpu_cache_info()["hits"] > hits
    assert torch.equal(w.grad, gw) and torch.equal(h.grad, gh)


def test_a_cached_tensor_can_be_resized(cache_limit):
    cache_limit(256 * MiB)
    t = _host_buffers.empty((4 * MiB,), dtype=torch.float32, device=CPU).fill_(1.0)
    t.resize_(12 * MiB)  # the storage grows through the cache's allocator
    t[4 * MiB:].fill_(2.0)
    assert float(t[: 4 * MiB].sum()) == 4 * MiB and float(t[4 * MiB:].sum()) == 16 * MiB
    t.resize_(16)
    assert t.shape == (16,)


def test_the_profiler_sees_cached_allocations(cache_limit):
    """A gradient served from the cache is still an allocation to torch.profiler, as to
    PyTorch's allocator (the benchmark's memory figures off Linux)."""
    cache_limit(256 * MiB)
    x = torch.randn(1024, 4096).requires_grad_()
    y = torch.randint(0, 4096, (1024,))

    def step():
        tlf.cross_entropy(x, y).backward()

    step()
    x.grad = None  # its block is cached now
    seen = memory.peak_extra_bytes(step, CPU, method="profiler")
    assert seen >= x.numel() * 4, seen
    x.grad = None
    if memory.rss_available():  # the RSS method empties the cache first
        seen = memory.peak_extra_bytes(step, CPU, method="peak-rss")
        assert seen >= x.numel() * 4 * 0.9, seen


@pytest.mark.parametrize("value,limit,error", [
    ("0", 0, None), ("64", 64 * MiB, None), (None, 2048 * MiB, None),
    ("-1", None, "must be >= 0"), ("1.5", None, "whole number of MiB")])
def test_the_environment_variable(value, limit, error):
    env = dict(os.environ)
    env.pop(_host_buffers.ENV, None)
    if value is not None:
        env[_host_buffers.ENV] = value
    code = "import torchloss_fused as t; print(t.cpu_cache_info()['limit_bytes'])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    if error is None:
        assert r.returncode == 0, r.stderr
        assert int(r.stdout.split()[-1]) == limit
    else:
        assert r.returncode != 0 and error in r.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_allocates_from_its_own_cache(cache_limit):
    cache_limit(64 * MiB)
    t = _host_buffers.empty((4 * MiB,), dtype=torch.float32, device=CPU)
    del t  # a cached block, inherited by the child
    pid = os.fork()
    if pid == 0:  # the child: reuse, free and allocate again, then leave at once
        ok = False
        try:  # no parallel torch op: OpenMP's threads are not there after a fork
            a = _host_buffers.empty((4 * MiB,), dtype=torch.float32, device=CPU)
            a[-1] = 1.0
            ok = tlf.cpu_cache_info()["cached_blocks"] == 0 and float(a[-1]) == 1.0
            del a
            ok = ok and tlf.cpu_cache_info()["cached_blocks"] == 1
        finally:
            os._exit(0 if ok else 1)
    for _ in range(600):  # a hung child fails the test instead of hanging it
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child did not finish within 60 s")
    assert os.waitstatus_to_exitcode(status) == 0
    assert tlf.cpu_cache_info()["cached_blocks"] == 1  # the parent's, untouched
