"""TLF_CUDA_TUNING, the block-per-row launch settings (torchloss_fused/_cuda_tuning.py,
csrc/cuda/tuning.h): parsing and its errors everywhere; on a build with CUDA kernels the
round trip through _C; on a GPU, results under each setting (the emulator checks the
launcher follows them: tests/test_cuda_emulated.py::test_launcher_follows_tuning), and on
sm_90 and newer the thread block cluster launches and the bulk loads (bulk_load) in graphs,
on side streams and under the CUDA-only tests (the bulk loads in processes of their
own)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchloss_fused as tlf
from benchmarks import device_info
from torchloss_fused import _backend, _cuda_tuning
from torchloss_fused._cuda_tuning import CudaTuning, parse

from .helpers import assert_ce_like_oracle

# _C imports only where the extension loaded (elsewhere the fallback serves).
_C = importlib.import_module("torchloss_fused._C") if _backend.EXTENSION_LOADED else None
CUDA_BUILD = _C is not None and _C.has_cuda()
# The bulk-copy kernels (bulk_load) run in a process of their own
# (test_bulk_load_in_its_own_process), which sets this: until a GPU has run them, a fault
# there (a device assert ends the CUDA context) must not take the other tests with it.
BULK_HERE = os.environ.get("TLF_TEST_BULK_HERE") == "1"
bulk_process = pytest.mark.skipif(not BULK_HERE,
                                  reason="runs in test_bulk_load_in_its_own_process")


@pytest.mark.parametrize("spec, expected", [
    ("", CudaTuning()),
    (" , ", CudaTuning()),
    ("block_threads=256", CudaTuning(block_threads=256)),
    ("row_cache_kib=108, prefetch_kib=32",
     CudaTuning(row_cache_kib=108, prefetch_kib=32)),
    ("block_threads=128,row_cache_kib=0,prefetch_kib=0", CudaTuning(128, 0, 0)),
    ("row_cache_kib=max", CudaTuning(row_cache_kib=None)),
    ("cluster_blocks=8", CudaTuning(cluster_blocks=8)),
    ("cluster_blocks=0,row_cache_kib=16", CudaTuning(row_cache_kib=16)),
    ("bulk_load=1", CudaTuning(bulk_load=1)),
    ("bulk_load=0", CudaTuning()),
    ("bulk_load=1,prefetch_kib=256", CudaTuning(prefetch_kib=256, bulk_load=1)),
    ("cluster_blocks=8, bulk_load=1", CudaTuning(cluster_blocks=8, bulk_load=1)),
])
def test_parse(spec, expected):
    assert parse(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("block_threads=384", "block_threads must be one of"),
    ("block_threads=0x100", "block_threads must be one of"),
    ("row_cache_kib=-1", "must be >= 0"),
    ("prefetch_kib=1.5", "whole number of KiB"),
    ("prefetch_kib=max", "whole number of KiB"),
    ("threads=256", "unknown key 'threads'"),
    ("block_threads", "expected key=value"),
    ("block_threads=", "expected key=value"),
    ("prefetch_kib=1,prefetch_kib=2", "given twice"),
    ("cluster_blocks=1", "cluster_blocks must be one of"),
    ("cluster_blocks=32", "cluster_blocks must be one of"),
    ("cluster_blocks=max", "cluster_blocks must be one of"),
    ("bulk_load=2", "bulk_load must be 0 or 1"),
    ("bulk_load=-1", "bulk_load must be 0 or 1"),
    ("bulk_load=01", "bulk_load must be 0 or 1"),
    ("bulk_load=true", "bulk_load must be 0 or 1"),
    ("bulk_load=on", "bulk_load must be 0 or 1"),
    ("bulk_load=1,bulk_load=0", "given twice"),
])
def test_parse_rejects(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        parse(spec)
    assert "TLF_CUDA_TUNING" in str(info.value)


@pytest.mark.parametrize("tuning", [CudaTuning(), CudaTuning(256, 108, 32),
                                    CudaTuning(128, 0, 1024), CudaTuning(512, 8, 0, 16),
                                    CudaTuning(bulk_load=1), CudaTuning(256, 64, 256, 0, 1)])
def test_describe_round_trips_and_c_args(tuning):
    assert parse(tuning.describe()) == tuning
    threads, cache, prefetch, cluster, bulk = tuning.c_args()
    assert threads == tuning.block_threads
    assert cache == (-1 if tuning.row_cache_kib is None else tuning.row_cache_kib * 1024)
    assert prefetch == tuning.prefetch_kib * 1024
    assert cluster == tuning.cluster_blocks
    assert bulk == tuning.bulk_load


def _import_with(spec: str) -> subprocess.CompletedProcess:
    code = ("import torchloss_fused as t, torchloss_fused._backend as b; "
            "print(b.CUDA_TUNING); print(t.backend_info('cuda')['detail'])")
    env = dict(os.environ, TLF_CUDA_TUNING=spec)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)


def test_bad_value_fails_the_import_clearly():
    r = _import_with("block_threads=300")
    assert r.returncode != 0
    assert "ValueError: TLF_CUDA_TUNING: block_threads must be one of" in r.stderr


def test_import_applies_a_good_value_where_there_are_cuda_kernels():
    r = _import_with("block_threads=256,prefetch_kib=16")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    if tlf.backend_info("cuda")["implementation"] == "cuda":
        assert lines[0] == ("CudaTuning(block_threads=256, row_cache_kib=None, prefetch_kib=16, "
                            "cluster_blocks=0, bulk_load=0)")
        assert "launch tuning block_threads=256,row_cache_kib=max,prefetch_kib=16" in lines[1]
    else:  # nothing to tune: the value is checked, then left alone
        assert lines[0] == "None"
        assert "tuning" not in lines[1]


def test_benchmark_records_the_variable(monkeypatch):
    monkeypatch.setenv("TLF_CUDA_TUNING", "prefetch_kib=8")
    assert device_info.software()["env"]["TLF_CUDA_TUNING"] == "prefetch_kib=8"


@pytest.mark.skipif(_C is None or CUDA_BUILD,
                    reason="needs the extension, built without CUDA kernels")
def test_cpu_build_refuses_to_tune():
    with pytest.raises(RuntimeError, match="no CUDA kernels to tune"):
        _C.set_cuda_tuning(256, -1, 0, 0, 0)
    with pytest.raises(RuntimeError, match="no CUDA kernels to tune"):
        _C.cuda_tuning()


@pytest.fixture
def restore_tuning():
    before = _cuda_tuning.current()
    yield
    _cuda_tuning.apply(before)


@pytest.mark.skipif(not CUDA_BUILD, reason="needs a build with CUDA kernels")
def test_c_round_trip_and_validation(restore_tuning):
    want = CudaTuning(128, 64, 4, 8, 1)
    _cuda_tuning.apply(want)
    assert _cuda_tuning.current() == want
    # _C checks too, for callers that skip the parser.
    for bad in ((384, -1, 0, 0, 0), (256, -2, 0, 0, 0), (256, -1, -1, 0, 0),
                (256, -1, 0, 3, 0), (256, -1, 0, 0, 2), (256, -1, 0, 0, -1)):
        with pytest.raises(ValueError, match="max_threads must be 128, 256 or 512"):
            _C.set_cuda_tuning(*bad)
    assert _cuda_tuning.current() == want


def _same_bits_per_launch_shape(tunings, dtype, kw):
    """Every setting gives the float64 oracle's loss and gradient, and settings of one launch
    shape (block size, or cluster size on sm_90 and newer) give the same bits. The rows are
    longer than a 100 KiB cache, shorter than the default one."""
    C = 100003
    x = (torch.randn(6, C, device="cuda", dtype=torch.float64) * 3).to(dtype)
    t = torch.randint(0, C, (6,), device="cuda")
    t[2] = -100
    hopper_or_newer = torch.cuda.get_device_capability()[0] >= 9
    by_shape = {}
    for tuning in tunings:
        _cuda_tuning.apply(tuning)
        loss, grad = assert_ce_like_oracle(x, t, **kw)
        clustered = tuning.cluster_blocks > 0 and hopper_or_newer
        shape = ("cluster", tuning.cluster_blocks) if clustered else ("block", tuning.block_threads)
        first = by_shape.setdefault(shape, (loss, grad))
        assert torch.equal(first[0], loss) and torch.equal(first[1], grad), tuning


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.05}], ids=["plain", "smooth"])
def test_results_under_each_tuning(dtype, kw, restore_tuning):
    """The row cache and the prefetch change no bit (the block size and the cluster size may
    change the sums' order); with clusters (sm_90 and newer; elsewhere a block per row), an
    8 KiB cap per block caches part of a row."""
    _same_bits_per_launch_shape(
        (CudaTuning(), CudaTuning(256, 100, 0), CudaTuning(128, 0, 64),
         CudaTuning(512, 0, 1024), CudaTuning(256, None, 16), CudaTuning(cluster_blocks=2),
         CudaTuning(cluster_blocks=8), CudaTuning(512, 8, 16, 8), CudaTuning(256, 0, 0, 8),
         CudaTuning(cluster_blocks=16)), dtype, kw)


@bulk_process
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.05}], ids=["plain", "smooth"])
def test_results_under_bulk_load(dtype, kw, restore_tuning):
    """The bulk loads (sm_90 and newer; elsewhere ignored) change no bit: each bulk setting
    after the plain one of its launch shape (a whole or a 100 KiB row cache, none, a
    cluster of 8)."""
    _same_bits_per_launch_shape(
        (CudaTuning(), CudaTuning(256, 100, 0), CudaTuning(128, 0, 64),
         CudaTuning(cluster_blocks=8), CudaTuning(bulk_load=1), CudaTuning(256, 100, 0, 0, 1),
         CudaTuning(128, 0, 64, 0, 1), CudaTuning(cluster_blocks=8, bulk_load=1)), dtype, kw)


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
needs_clusters = pytest.mark.skipif(
    not HOPPER, reason="needs a GPU with thread block clusters (sm_90 or newer)")


@needs_clusters
@pytest.mark.parametrize("tuning", [
    CudaTuning(cluster_blocks=4), CudaTuning(cluster_blocks=16),
    pytest.param(CudaTuning(bulk_load=1), marks=bulk_process),
    pytest.param(CudaTuning(cluster_blocks=4, bulk_load=1), marks=bulk_process)],
    ids=["cluster_blocks=4", "cluster_blocks=16", "bulk_load=1", "cluster_blocks=4,bulk_load=1"])
def test_clusters_in_graphs_on_side_streams_and_repeated(tuning, restore_tuning):
    """Clusters are launched on the current stream (cudaLaunchKernelEx): a CUDA graph
    captures the fused forward + backward and replays the eager bits, a side stream gives
    them too, and the fused path agrees bitwise with the separate forward and backward.
    The same for a block per row whose first pass takes bulk copies (mbarriers in a graph
    and on a side stream; the rows, of an odd length, start at all eight even offsets
    within 16 bytes)."""
    _cuda_tuning.apply(tuning)
    N, C = 24, 131077  # 16 vectors per thread of a 16-block cluster (bf16)
    x0 = (torch.randn(N, C, device="cuda") * 3).to(torch.bfloat16)
    t = torch.randint(0, C, (N,), device="cuda")
    t[::5] = -100

    def step(x):
        loss = tlf.cross_entropy(x, t, label_smoothing=0.05)
        loss.backward()
        return loss

    xe = x0.clone().requires_grad_()
    loss_e = step(xe)
    x_static = x0.clone().requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture; the side stream's bits
        step(x_static)
        assert torch.equal(x_static.grad, xe.grad)
        x_static.grad = None
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss_static = step(x_static)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(loss_static, loss_e) and torch.equal(x_static.grad, xe.grad)
    ops = torch.ops.torchloss_fused
    x3, t2 = x0.unsqueeze(2), t.unsqueeze(1)
    args = (-100, 0.05, 0.0, 0.0, 1.0)
    loss, lse = ops.ce_fwd(x3, t2, None, *args, False)
    g = torch.full((N, 1), 1 / N, device="cuda")
    loss_f, lse_f, grad_f = ops.ce_fwd_grad(x3, t2, None, *args, g)
    grad = ops._ce_bwd(g, None, x3, t2, None, lse, *args)
    assert torch.equal(loss, loss_f) and torch.equal(lse, lse_f) and torch.equal(grad, grad_f)


def _pytest_in_own_process(path: str, select: str, **env: str) -> None:
    """Runs the tests of `path` that `select` (-k) picks in a new process with `env` added,
    and asserts some ran and all passed."""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path,
                        "-k", select], cwd=root, env=dict(os.environ, **env),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout, r.stdout[-2000:]


@needs_clusters
@pytest.mark.parametrize("spec", ["cluster_blocks=8", "bulk_load=1"])
def test_cuda_only_suite_under_clusters(spec):
    """tests/test_cuda_only.py's cases whose rows are long enough for clusters (50000 and
    262147 classes, more than 2^31 logits, determinism, the device-side assert), again in a
    process whose launches take clusters of 8 blocks, and in one whose blocks per row take
    bulk copies."""
    select = ("50000 or 262147 or 2_31 or bitwise_deterministic or fused_and_split "
              "or device_side_assert")
    _pytest_in_own_process("tests/test_cuda_only.py", select, TLF_CUDA_TUNING=spec)


@needs_clusters
def test_bulk_load_in_its_own_process():
    """This file's bulk-load tests (results, bits, graphs, side streams), in a process of
    their own (TLF_TEST_BULK_HERE=1): the first GPU run of the bulk-copy kernels cannot
    take the other tests' CUDA context down with it."""
    _pytest_in_own_process("tests/test_cuda_tuning.py",
                           "bulk and not own_process and not cuda_only_suite",
                           TLF_TEST_BULK_HERE="1")
