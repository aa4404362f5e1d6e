"""scripts/exercise_ops.py, the script gpu_check.sh runs under compute-sanitizer, runs
through on every device here: it calls the ops directly, so a changed op signature or
argument dtype broke it silently until a GPU session lost its sanitizer stage to it (the
float64 lse's grad_lse and the sigmoid sums' divisor both did)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from torchloss_fused import _backend

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not _backend.EXTENSION_LOADED, reason="the script calls the extension's ops")
@pytest.mark.parametrize("block_only", [False, True], ids=["all", "block-only"])
def test_exercise_ops_script_runs(device, block_only):
    args = [sys.executable, str(ROOT / "scripts" / "exercise_ops.py"), "--device", str(device)]
    if block_only:
        args.append("--block-only")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("exercised every op")
