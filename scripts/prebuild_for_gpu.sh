#!/usr/bin/env bash
# Builds the extension here (no GPU needed) for a lent GPU machine's Python and torch, so
# that scripts/gpu_check.sh can test on it at once instead of spending device minutes on
# the build: torchloss_fused/_C.cpython-<py>-x86_64-linux-gnu.so, CUDA kernels included.
# Carry that file and torchloss_fused/_C.sources (the hash of the sources it was built
# from) to the machine (device run's `carry`); gpu_check.sh uses it only if the hash
# matches the tree there, and still builds from source beside the tests and reports
# whether that build loads.
#
#   scripts/prebuild_for_gpu.sh            # Python 3.12, torch 2.11.0, sm_90a (the H200 image)
#   TLF_GPU_PYTHON=python3.12 TLF_GPU_TORCH=2.11.0 TLF_GPU_ARCH=9.0a scripts/prebuild_for_gpu.sh
#
# Needs nvcc of the same CUDA major version as that torch, an interpreter of that Python
# version (python3.12 on PATH, or pyenv's), and the package index (the CUDA build of torch
# and the NVIDIA runtime packages it imports with: several GB, cached in the environment).
#   TLF_GPU_VENV   where that environment lives (default /tmp/tlf-gpu-venv-<py>-<torch>)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY_VER="${TLF_GPU_PYTHON_VERSION:-3.12}"
TORCH_VER="${TLF_GPU_TORCH:-2.11.0}"
ARCH="${TLF_GPU_ARCH:-9.0a}"
VENV="${TLF_GPU_VENV:-/tmp/tlf-gpu-venv-$PY_VER-$TORCH_VER}"

log() { echo "[prebuild] $*"; }

interpreter() {
  local cand
  for cand in "${TLF_GPU_PYTHON:-}" "python$PY_VER" \
      "$(pyenv root 2>/dev/null)/versions/$PY_VER"*/bin/python; do
    # (it must run: pyenv's shim for a version that is not selected only complains)
    [[ -n "$cand" ]] && "$cand" -c 'import sys' >/dev/null 2>&1 && { command -v "$cand"; return; }
  done
  return 1
}

if [[ ! -f "$VENV/.complete" ]]; then
  PYBIN="$(interpreter)" || { log "no Python $PY_VER found (set TLF_GPU_PYTHON)"; exit 1; }
  log "creating $VENV with $PYBIN"
  rm -rf "$VENV"
  "$PYBIN" -m venv "$VENV"
  # --isolated and an empty find-links: a local CPU-only wheel must not be picked instead.
  PIP_FIND_LINKS= "$VENV/bin/python" -m pip install --isolated --disable-pip-version-check \
    --quiet "torch==$TORCH_VER" numpy setuptools wheel ninja pybind11
  "$VENV/bin/python" -c 'import sys, torch; sys.exit(torch.version.cuda is None)' ||
    { log "torch==$TORCH_VER from the index is not a CUDA build"; exit 1; }
  touch "$VENV/.complete"
fi
log "$("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')"

# A copy of the tracked tree: the checkout's own in-place build stays as it is. The hash of
# its sources goes beside the .so (torchloss_fused/_C.sources): gpu_check.sh builds from
# source instead when the tree it runs in has other sources.
SOURCES="$("$ROOT/scripts/source_hash.sh")"
SRC="$(mktemp -d)"
trap 'rm -rf "$SRC"' EXIT
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
  xargs -0 cp --parents -t "$SRC")
log "building for $ARCH (FORCE_CUDA=1)"
start=$SECONDS
(cd "$SRC" && FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  "$VENV/bin/python" setup.py -q build_ext --inplace >"$SRC/build.log" 2>&1) ||
  { tail -n 30 "$SRC/build.log"; log "FAILED: the build (above: the end of its log)"; exit 1; }
(cd "$SRC" && "$VENV/bin/python" -c 'import torchloss_fused as t
info = t.backend_info("cuda")
assert info["implementation"] == "cuda", info')
so="$(cd "$SRC" && ls torchloss_fused/_C.cpython-*.so)"
cp "$SRC/$so" "$ROOT/$so"
# Python's CFLAGS carry -g: 50 MB of debug info of the 64 MiB a device call may carry (the
# kernels' fatbin and -lineinfo stay).
command -v strip >/dev/null && strip --strip-debug "$ROOT/$so"
echo "$SOURCES" >"$ROOT/torchloss_fused/_C.sources"
log "built in $((SECONDS - start)) s: $so, sources $SOURCES (carry both it and"
log "torchloss_fused/_C.sources with the device run)"
