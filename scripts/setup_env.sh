#!/usr/bin/env bash
# Sets up everything on a fresh machine: a virtual environment (.venv, or $TLF_VENV) with
# PyTorch and the test/bench tools, and torchloss_fused built in place (C++ kernels; CUDA
# kernels too when torch is a CUDA build and nvcc is found). Idempotent; sourced by
# scripts/test.sh and scripts/bench.sh.
#   TLF_VENV         where the environment lives (default: .venv in the repository)
#   TLF_TORCH_SPEC   the torch requirement (default torch==2.13.0)
#   TLF_NO_VENV=1    install into the current Python instead (e.g. a GPU image's own torch)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TLF_VENV:-$ROOT/.venv}"
TORCH_SPEC="${TLF_TORCH_SPEC:-torch==2.13.0}"

if [[ "${TLF_NO_VENV:-0}" != "1" ]]; then
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[setup] creating $VENV"
    python3 -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
fi
PY="$(command -v python)"

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC"
  "$PY" -m pip install --quiet "$TORCH_SPEC"
fi
echo "[setup] installing build, test and benchmark tools"
# (setuptools 77 or newer reads pyproject's SPDX license; a fresh Python 3.11 venv holds
# 65.5, which a requirement without a version leaves)
"$PY" -m pip install --quiet "setuptools>=77" wheel pybind11 ninja pytest hypothesis \
  numpy mypy tqdm tabulate matplotlib
echo "[setup] building torchloss_fused"
start=$SECONDS
"$PY" -m pip install --quiet --no-build-isolation --no-deps -e "$ROOT"
echo "[setup] built in $((SECONDS - start)) s; $("$PY" -c \
  'import torchloss_fused as t; print(t.backend_info("cpu"))')"
