"""What an sdist and a wheel carry: every subpackage, every C++/CUDA source and header,
the tests' support files, the license. (A list of package names had left
torchloss_fused.linear_ce out of every non-editable install, which then failed at import;
the sdist had no csrc/cuda when built without CUDA.) Built with the extension off, so
nothing compiles: a few seconds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                              "*.so", "results", ".pytest_cache", ".ruff_cache", ".hypothesis",
                              "out", ".whl", "*.sources")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if shutil.which("git") is None and not (ROOT / "setup.py").exists():
        pytest.skip("needs the source tree")
    work = tmp_path_factory.mktemp("pkg")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    env = dict(os.environ, TORCHLOSS_FUSED_NO_EXTENSION="1")
    for cmd in ("sdist", "bdist_wheel"):
        subprocess.run([sys.executable, "setup.py", "-q", cmd, "-d", str(work / "dist")],
                       cwd=src, env=env, check=True, capture_output=True, timeout=600)
    sdist = next((work / "dist").glob("*.tar.gz"))
    wheel = next((work / "dist").glob("*.whl"))
    with tarfile.open(sdist) as tar:
        in_sdist = {Path(*Path(n).parts[1:]).as_posix() for n in tar.getnames()}
    with zipfile.ZipFile(wheel) as z:
        in_wheel = set(z.namelist())
    return in_sdist, in_wheel


def _tree(*patterns):
    return {p.relative_to(ROOT).as_posix() for pat in patterns for p in ROOT.glob(pat)
            if "__pycache__" not in p.parts}


def test_wheel_holds_every_module(built):
    _, in_wheel = built
    modules = _tree("torchloss_fused/**/*.py")
    assert "torchloss_fused/linear_ce/__init__.py" in modules
    assert modules - in_wheel == set()
    assert any(n.endswith("/licenses/LICENSE") for n in in_wheel)
    assert "torchloss_fused/py.typed" in in_wheel  # (PEP 561: typed)


def test_sdist_holds_the_sources_and_tests(built):
    in_sdist, _ = built
    needed = _tree("torchloss_fused/**/*.py", "torchloss_fused/py.typed", "csrc/**/*.h",
                   "csrc/**/*.cuh", "csrc/**/*.cpp", "csrc/**/*.cu", "tests/*.py",
                   "tests/cuda_emulation/*", "setup.py", "pyproject.toml", "LICENSE",
                   "README.md")
    assert any(n.endswith(".cu") for n in needed)
    assert needed - in_sdist == set()
