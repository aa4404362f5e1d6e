"""The CUDA emulator's thread block clusters (sm_90), on kernels of its own.

tests/cuda_emulation/cluster_selftest.cpp, built with the flags of the kernel emulator
(tests/test_cuda_emulated.py), launches through cudaLaunchKernelEx with clusters of 1, 2, 4 and
16 blocks under every schedule: per-block and per-cluster shared memory, the split cluster
barrier, __cluster_map_shared_rank in rank order, __syncthreads and the shuffles
(__shfl_xor_sync, __shfl_sync) per block, and the launch errors a GPU gives. Each kernel bug (a
wait without an arrive, divergence at the cluster barrier, a block exiting while another reads
its shared memory...) must stop the emulator, so it runs in a process of its own.
"""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.test_cuda_emulated import EMU_DIR, _asan_works, _compile_flags, _gxx, cuda_include_dir

ENV = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0",
           UBSAN_OPTIONS="print_stacktrace=1")


@pytest.fixture(scope="module")
def selftest(tmp_path_factory) -> tuple[Path, bool]:
    """The self-test binary and whether it has ASan."""
    gxx, cuda_inc = _gxx(), cuda_include_dir()
    if gxx is None:
        pytest.skip("no g++ on PATH: the CUDA kernel emulator cannot be built")
    if cuda_inc is None:
        pytest.skip("CUDA toolkit headers (cuda_runtime.h, cuda_bf16.h, cuda_fp16.h) not "
                    "found via $CUDA_HOME, $CUDA_PATH, nvcc or /usr/local/cuda")
    work = tmp_path_factory.mktemp("cluster_selftest")
    asan = _asan_works(gxx, work)
    flags = _compile_flags(cuda_inc, work, asan)

    def compile_unit(name: str) -> subprocess.CompletedProcess:
        return subprocess.run([gxx, *flags, "-c", str(EMU_DIR / f"{name}.cpp"), "-o",
                               str(work / f"{name}.o")], capture_output=True, text=True)

    units = ("cluster_selftest", "emu_runtime")
    with ThreadPoolExecutor(2) as ex:
        for name, r in zip(units, ex.map(compile_unit, units)):
            assert r.returncode == 0, f"{name}.cpp does not compile:\n{r.stderr[-6000:]}"
    exe = work / "cluster_selftest"
    link = [gxx, "-rdynamic", *(str(work / f"{u}.o") for u in units), "-o", str(exe)]
    if asan:
        link.insert(1, "-fsanitize=address,undefined")
    r = subprocess.run(link, capture_output=True, text=True)
    assert r.returncode == 0, f"link failed:\n{r.stderr[-6000:]}"
    return exe, asan


def _run(exe: Path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), mode], capture_output=True, text=True, env=ENV, timeout=120)


def test_clusters_under_every_schedule(selftest):
    r = _run(selftest[0], "run")
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr[-5000:]


# Mode -> what the emulator's report must say (exit status 3: an emulated device fault).
FAULTS = {
    "wait_without_arrive": ["__cluster_barrier_wait without an arrive"],
    "arrive_twice": ["__cluster_barrier_arrive twice without a wait"],
    "divergence": ["deadlock or barrier divergence in the cluster of blocks 0..1",
                   "127 at __cluster_barrier_wait", "1 at exited (block.thread 1.3)"],
    "rank_outside": ["__cluster_map_shared_rank: rank outside the cluster"],
    "not_shared": ["__cluster_map_shared_rank of an address outside the block's shared memory"],
    "shfl_lane_outside": ["__shfl_sync lane argument out of range"],
}


@pytest.mark.parametrize("mode", sorted(FAULTS))
def test_kernel_bug_is_a_device_fault(selftest, mode):
    r = _run(selftest[0], mode)
    assert r.returncode == 3, r.stdout + r.stderr[-5000:]
    for text in ["EMULATED DEVICE FAULT", *FAULTS[mode]]:
        assert text in r.stderr, r.stderr[-5000:]


def test_read_of_an_exited_blocks_shared_memory(selftest):
    """Rank 1 exits (ranks run descending) while rank 0 still reads its shared memory: an ASan
    report; without ASan the read sees 0xff, never the value rank 1 wrote."""
    exe, asan = selftest
    r = _run(exe, "exited_block")
    if asan:
        assert r.returncode != 0 and "use-after-poison" in r.stderr, r.stdout + r.stderr[-5000:]
    else:
        assert r.returncode == 0 and "read 0xffffffff" in r.stdout, r.stdout + r.stderr[-5000:]
