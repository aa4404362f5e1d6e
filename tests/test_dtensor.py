"""DTensor (tensor parallelism): the losses on sharded and replicated DTensors equal
F.cross_entropy and the other oracles on the whole tensors, in value and gradient.

The cases live in tests/dtensor_worker.py and run in 4 CPU processes (gloo), once through
the compiled kernels and once through the pure-PyTorch fallback; each case is one test
here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchloss_fused import _backend

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is unavailable", allow_module_level=True)
pytest.importorskip("torch.distributed.tensor.experimental")

from tests.dtensor_worker import CASES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORLD = 4


@pytest.fixture(scope="module", params=["kernels", "reference"])
def results(request, tmp_path_factory):
    """Runs every case once on 4 ranks; returns {rank: {case: "ok" or traceback}}."""
    if request.param == "kernels" and not _backend.EXTENSION_LOADED:
        pytest.skip("compiled extension not loaded")
    out = tmp_path_factory.mktemp(f"dtensor_{request.param}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if request.param == "reference":
        env[_backend.FORCE_REFERENCE_ENV] = "1"
    proc = subprocess.run([sys.executable, "-m", "tests.dtensor_worker", str(out), str(WORLD)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    found = {int(p.stem[4:]): json.loads(p.read_text()) for p in out.glob("rank*.json")}
    assert proc.returncode == 0 and len(found) == WORLD, (
        f"the worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return found


@pytest.mark.parametrize("name", list(CASES))
def test_case(results, name):
    failures = {rank: res.get(name, "not run") for rank, res in results.items()
                if res.get(name) != "ok"}
    assert not failures, "\n".join(f"rank {r}:\n{tb}" for r, tb in sorted(failures.items()))


def test_every_op_has_a_sharding_rule():
    """Each op of both namespaces is known to DTensor (no "no sharding strategy" error)."""
    from torch.distributed.tensor import DTensor

    from torchloss_fused import _ops
    from torchloss_fused.linear_ce import ops as linear_ops

    propagator = DTensor._op_dispatcher.sharding_propagator
    namespaces = [(ns, _ops.SCHEMAS) for ns in ("torchloss_fused", _ops.REF_NAMESPACE)
                  if ns != "torchloss_fused" or _backend.EXTENSION_LOADED]
    for ns, schemas in namespaces + [(linear_ops.NAMESPACE, linear_ops.SCHEMAS)]:
        for name in schemas:
            op = getattr(getattr(torch.ops, ns), name).default
            assert op in propagator.op_strategy_funcs, f"{ns}::{name}"


def test_tensor_parallel_benchmark_end_to_end(tmp_path):
    """benchmarks.tensor_parallel on 2 ranks: every implementation checked against ours,
    the files written, and ours the one whose memory stays lowest, for both losses."""
    from torch.multiprocessing import ProcessExitedException

    from benchmarks import tensor_parallel

    args = ["--world", "2", "--rows", "256", "--vocab", "8192", "--hidden", "64",
            "--dtypes", "float32", "--repeats", "1", "--out", str(tmp_path)]
    # A rank killed by a signal, not one that raised: at stop 31 a CI rehearsal's rank 0
    # aborted once ("terminate called without an active exception") right after a
    # torch.profiler stop of the memory measurement, with gloo's threads running (a kineto
    # problem; the test then passed 11 times running), and at stop 37 a rehearsal on a
    # loaded machine saw it twice in a row (then 16 runs under load passed). Up to three
    # tries; a rank that raises (ProcessRaisedException) fails at once.
    for attempt in range(3):
        try:
            rc = tensor_parallel.main(args)
            break
        except ProcessExitedException as e:
            if e.signal_name is None or attempt == 2:
                raise
    assert rc == 0
    (doc_path,) = tmp_path.glob("tp-*.json")
    doc = json.loads(doc_path.read_text())
    assert doc["schema"] == tensor_parallel.SCHEMA and len(doc["rows"]) == 6
    for op in ("cross_entropy", "linear_cross_entropy"):
        rows = {r["impl"]: r for r in doc["rows"] if r["op"] == op}
        assert len(rows) == 3, op
        for r in rows.values():
            assert r["check"]["loss_err_vs_ours"] < 1e-5, (op, r)
            assert r["check"]["grad_err_vs_ours"] < 1e-6, (op, r)
            assert r["median_ms"] > 0 and r["peak_extra_bytes"] > 0
        ours = rows.pop("torchloss_fused")["peak_extra_bytes"]
        assert all(ours < r["peak_extra_bytes"] for r in rows.values()), op
    text = next(tmp_path.glob("tp-*-latest.md")).read_text()
    assert "### linear_cross_entropy" in text and "| torchloss_fused" in text
