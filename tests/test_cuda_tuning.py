"""TLF_CUDA_TUNING, the block-per-row launch settings (torchloss_fused/_cuda_tuning.py,
csrc/cuda/tuning.h): parsing and its errors everywhere; on a build with CUDA kernels the
round trip through _C; on a GPU, results under each setting (the emulator checks the
launcher follows them: tests/test_cuda_emulated.py::test_launcher_follows_tuning)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

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


@pytest.mark.parametrize("spec, expected", [
    ("", CudaTuning()),
    (" , ", CudaTuning()),
    ("block_threads=256", CudaTuning(block_threads=256)),
    ("row_cache_kib=108, prefetch_kib=32",
     CudaTuning(row_cache_kib=108, prefetch_kib=32)),
    ("block_threads=128,row_cache_kib=0,prefetch_kib=0", CudaTuning(128, 0, 0)),
    ("row_cache_kib=max", CudaTuning(row_cache_kib=None)),
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
])
def test_parse_rejects(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        parse(spec)
    assert "TLF_CUDA_TUNING" in str(info.value)


@pytest.mark.parametrize("tuning", [CudaTuning(), CudaTuning(256, 108, 32),
                                    CudaTuning(128, 0, 1024)])
def test_describe_round_trips_and_c_args(tuning):
    assert parse(tuning.describe()) == tuning
    threads, cache, prefetch = tuning.c_args()
    assert threads == tuning.block_threads
    assert cache == (-1 if tuning.row_cache_kib is None else tuning.row_cache_kib * 1024)
    assert prefetch == tuning.prefetch_kib * 1024


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
        assert lines[0] == "CudaTuning(block_threads=256, row_cache_kib=None, prefetch_kib=16)"
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
        _C.set_cuda_tuning(256, -1, 0)
    with pytest.raises(RuntimeError, match="no CUDA kernels to tune"):
        _C.cuda_tuning()


@pytest.fixture
def restore_tuning():
    before = _cuda_tuning.current()
    yield
    _cuda_tuning.apply(before)


@pytest.mark.skipif(not CUDA_BUILD, reason="needs a build with CUDA kernels")
def test_c_round_trip_and_validation(restore_tuning):
    want = CudaTuning(128, 64, 4)
    _cuda_tuning.apply(want)
    assert _cuda_tuning.current() == want
    # _C checks too, for callers that skip the parser.
    for bad in ((384, -1, 0), (256, -2, 0), (256, -1, -1)):
        with pytest.raises(ValueError, match="max_threads must be 128, 256 or 512"):
            _C.set_cuda_tuning(*bad)
    assert _cuda_tuning.current() == want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.05}], ids=["plain", "smooth"])
def test_results_under_each_tuning(dtype, kw, restore_tuning):
    """Every setting gives the float64 oracle's loss and gradient; the row cache and the
    prefetch change no bit (the block size may change the sums' order). The rows are
    longer than a 100 KiB cache, shorter than the default one."""
    C = 100003
    x = (torch.randn(6, C, device="cuda", dtype=torch.float64) * 3).to(dtype)
    t = torch.randint(0, C, (6,), device="cuda")
    t[2] = -100
    by_threads = {}
    for tuning in (CudaTuning(), CudaTuning(256, 100, 0), CudaTuning(128, 0, 64),
                   CudaTuning(512, 0, 1024), CudaTuning(256, None, 16)):
        _cuda_tuning.apply(tuning)
        loss, grad = assert_ce_like_oracle(x, t, **kw)
        first = by_threads.setdefault(tuning.block_threads, (loss, grad))
        assert torch.equal(first[0], loss) and torch.equal(first[1], grad), tuning
