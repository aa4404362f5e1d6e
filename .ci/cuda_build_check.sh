#!/usr/bin/env bash
# Build-and-load check of the CUDA extension on a machine without a GPU (CI). The compile
# check (cuda_compile_check.sh) compiles every CUDA source; this goes on where it stops:
# setup.py builds the whole extension with FORCE_CUDA=1 against the CUDA build of torch
# (in a virtual environment of its own, with the NVIDIA runtime packages torch needs to be
# imported), links it, and the result is imported: every torchloss_fused op must have a
# CUDA kernel registered, backend_info("cuda") must name the CUDA kernels, and a few test
# files must pass on the CPU under that torch. Catches what only the link or the load
# shows: an undefined symbol, an op registered for CUDA with the wrong schema, a build
# that cannot find the toolkit's libraries. Nothing runs on a GPU. It also checks, in the
# built extension's SASS, that no hot loop of the softmax kernels touches local memory
# (scripts/check_hot_loops.py).
#
# Needs nvcc, python3 with venv, network to PyPI (or a warm cache directory).
#   TLF_CUDA_CHECK_CACHE  cache directory, shared with cuda_compile_check.sh
#   TLF_TORCH_VERSION     the torch whose CUDA build is used (default 2.13.0)
#   TLF_BUILD_CHECK_ARCH  TORCH_CUDA_ARCH_LIST for the build (default 9.0a)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${TLF_CUDA_CHECK_CACHE:-${HOME:-/tmp}/.cache/torchloss_fused/cuda-check}"
TORCH_VERSION="${TLF_TORCH_VERSION:-2.13.0}"
start=$SECONDS

log() { echo "[cuda-build-check] $*"; }

command -v nvcc >/dev/null || { log "nvcc not found"; exit 1; }

# ---- a virtual environment with the CUDA build of torch ------------------------------------
VENV="$CACHE/venv-$TORCH_VERSION"
PY="$VENV/bin/python"
if [[ ! -f "$VENV/.complete" ]]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  mkdir -p "$CACHE/wheel"
  PYTAG="cp$(python3 -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"
  wheel="$(ls "$CACHE"/wheel/torch-"$TORCH_VERSION"-"$PYTAG"-*manylinux*x86_64.whl 2>/dev/null |
    head -n 1 || true)"
  spec="${wheel:-torch==$TORCH_VERSION}"
  log "installing $(basename "$spec") and the NVIDIA packages it needs (several GB)"
  cert=()
  [[ -n "${PIP_CERT:-}" ]] && cert=(--cert "$PIP_CERT")
  # --isolated and an empty find-links: a local CPU-only wheel must not be picked instead.
  PIP_FIND_LINKS= "$PY" -m pip install --isolated --disable-pip-version-check --quiet \
    --no-cache-dir ${cert[@]+"${cert[@]}"} "$spec" numpy pytest hypothesis setuptools wheel
  "$PY" -c 'import sys, torch; sys.exit(torch.version.cuda is None)' ||
    { log "the installed torch is not a CUDA build"; exit 1; }
  touch "$VENV/.complete"
fi
log "$("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')"

# ---- build a copy of the tree (the checkout's in-place CPU build stays as it is) -----------
SRC="$(mktemp -d)"
trap 'rm -rf "$SRC"' EXIT
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
  xargs -0 cp --parents -t "$SRC" 2>/dev/null) || { log "could not copy the tree"; exit 1; }
log "building with FORCE_CUDA=1 for ${TLF_BUILD_CHECK_ARCH:-9.0a}"
# CUDA_HOME unset: setup.py must find the toolkit itself, as on a user's machine.
if ! (cd "$SRC" && env -u CUDA_HOME -u CUDA_PATH FORCE_CUDA=1 \
      TORCH_CUDA_ARCH_LIST="${TLF_BUILD_CHECK_ARCH:-9.0a}" MAX_JOBS="$(nproc)" \
      "$PY" setup.py -q build_ext --inplace >"$SRC/build.log" 2>&1); then
  tail -n 40 "$SRC/build.log"
  log "FAILED: the build (above: the end of its log)"
  exit 1
fi

# ---- its hot loops touch no local memory (scripts/check_hot_loops.py) ----------------------
# cuobjdump: the toolkit's, else the one in the Triton wheel this torch depends on.
CUOBJDUMP="$(command -v cuobjdump || "$PY" -c 'import os, triton
print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' \
  2>/dev/null || true)"
so="$(ls "$SRC"/torchloss_fused/_C*.so | head -n 1)"
if [[ -x "$CUOBJDUMP" ]]; then
  if ! "$PY" "$SRC/scripts/check_hot_loops.py" --cuobjdump "$CUOBJDUMP" "$so" |
      sed 's/^/[cuda-build-check] /'; then
    log "FAILED: a hot loop touches local memory (or the check could not run)"
    exit 1
  fi
else
  log "no cuobjdump: the hot-loop check is skipped"
fi

# ---- load it --------------------------------------------------------------------------------
(cd "$SRC" && "$PY" - <<'EOF')
import torch
import torchloss_fused as tlf

info = tlf.backend_info("cuda")
assert info["implementation"] == "cuda", f"CUDA kernels not loaded: {info}"
ops = sorted(n for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("torchloss_fused::"))
assert ops, "no torchloss_fused op registered"
missing = [n for n in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
assert not missing, f"ops without a CUDA kernel: {missing}"
print(f"[cuda-build-check] loaded: {len(ops)} ops, each with a CUDA kernel; {info['detail']}")
EOF

# ---- and a few tests on the CPU under the CUDA build of torch (test_cuda_tuning: the launch
# settings' round trip through _C, which only a build with CUDA kernels has; backend choice;
# and cross-entropy's calls through every layout, reduction and backward path). Left out, as
# the suite runs them on the same CPU kernel sources: the pure-PyTorch backend's cases, the
# per-instruction-set copies, and the grids over options, dtypes and shapes (the 652 cases
# run before took 107 s in a cold CI rehearsal, these 160 took 18 s). ---------------------
(cd "$SRC" && "$PY" -m pytest -q -p no:cacheprovider tests/test_backend.py \
  tests/test_cross_entropy.py tests/test_cuda_tuning.py -m "not slow" \
  -k "not reference and not every_cpu_capability and not small_grid and not test_options \
      and not test_probability_targets[ and not large_shapes" 2>&1 | tail -n 3)
log "passed in $((SECONDS - start)) s"
