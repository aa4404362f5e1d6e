"""What scripts/gpu_check.sh runs, checked where no GPU is: scripts/exercise_ops.py (run
under compute-sanitizer there) runs through on every device here, since it calls the ops
directly and a changed op signature or argument dtype broke it unseen (the float64 lse's
grad_lse and the sigmoid sums' divisor both did); and its default benchmark arguments and
launch settings parse."""

from __future__ import annotations

import os
import re
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


def _shell_default(name: str) -> str:
    """The value of NAME="..." in scripts/gpu_check.sh."""
    text = (ROOT / "scripts" / "gpu_check.sh").read_text()
    match = re.search(rf'^{name}="([^"]*)"$', text, flags=re.MULTILINE)
    assert match, f"{name} not found in gpu_check.sh"
    return match.group(1)


def test_gpu_check_default_runs_parse():
    """The benchmark runs and launch settings gpu_check.sh passes by default are ones the
    benchmark's parser and TLF_CUDA_TUNING's take: a renamed flag or setting would
    otherwise first fail in a GPU session, costing its device time."""
    from benchmarks.run import parse_args
    from torchloss_fused import _cuda_tuning

    runs = _shell_default("DEFAULT_RUNS").split("|")
    sweep_args = _shell_default("DEFAULT_SWEEP_ARGS")
    for args in [*runs, sweep_args]:
        parsed = parse_args(["--device", "cuda", "--no-progress", *args.split()])
        assert parsed.size == "targets", args
    settings = _shell_default("DEFAULT_SWEEP").split("|")
    assert settings[0] == "" and len(settings) > 5  # (the defaults first)
    for spec in settings[1:]:
        _cuda_tuning.parse(spec)  # (a ValueError for a setting it does not know)
