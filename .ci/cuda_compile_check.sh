#!/usr/bin/env bash
# Compile check of the CUDA sources on a machine without a GPU (CI): every csrc/cuda/*.cu,
# and csrc/ops.cpp with TLF_WITH_CUDA, compiled with the flags setup.py's CUDA build uses,
# against the headers of the CUDA build of torch, for sm_80, sm_90a and the Blackwell
# architectures of setup.py's default list (sm_100, sm_120). Any compile error fails the
# script. Nothing is linked or run.
#
# Needs nvcc, python3 (with python3-config) and a C++ compiler, and either network
# to PyPI or the wheel already in the cache directory.
#   TLF_CUDA_CHECK_CACHE  cache directory (default ~/.cache/torchloss_fused/cuda-check)
#   TLF_CUDA_CHECK_ARCHS  space-separated compute capabilities (default "80 90a 100 120");
#                         N:ptx compiles to PTX only (the front end and cicc, no ptxas:
#                         about 40% of an architecture's time, with no SASS checked)
#   TLF_TORCH_VERSION     torch version whose CUDA wheel provides the headers (2.13.0)
#   TLF_PTXAS_LOG_DIR     if set, the per-file nvcc/ptxas logs (registers, spills) go there
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${TLF_CUDA_CHECK_CACHE:-${HOME:-/tmp}/.cache/torchloss_fused/cuda-check}"
ARCHS="${TLF_CUDA_CHECK_ARCHS:-80 90a 100 120}"
TORCH_VERSION="${TLF_TORCH_VERSION:-2.13.0}"
JOBS="$(nproc 2>/dev/null || echo 2)"
start=$SECONDS

log() { echo "[cuda-compile-check] $*"; }

command -v nvcc >/dev/null || { log "nvcc not found"; exit 1; }
log "$(nvcc --version | tail -n 2 | head -n 1)"

# ---- torch headers from the CUDA wheel ---------------------------------------------------
mkdir -p "$CACHE/wheel"
PYTAG="cp$(python3 -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"
find_wheel() {
  ls "$CACHE"/wheel/torch-"$TORCH_VERSION"-"$PYTAG"-*manylinux*x86_64.whl 2>/dev/null | head -n 1
}
wheel="$(find_wheel || true)"
if [[ -z "$wheel" ]]; then
  log "downloading the torch $TORCH_VERSION wheel (CUDA build) from PyPI"
  cert=()
  [[ -n "${PIP_CERT:-}" ]] && cert=(--cert "$PIP_CERT")
  # --isolated and an empty find-links: a local CPU-only wheel must not be picked instead.
  PIP_FIND_LINKS= python3 -m pip download --no-deps --isolated --disable-pip-version-check \
    ${cert[@]+"${cert[@]}"} \
    "torch==$TORCH_VERSION" -d "$CACHE/wheel" --quiet
  wheel="$(find_wheel)"
  [[ -n "$wheel" ]] || { log "pip download did not produce a $PYTAG manylinux wheel"; exit 1; }
fi
log "wheel: $(basename "$wheel")"

INC="$CACHE/include-$TORCH_VERSION"
if [[ ! -f "$INC/.complete" ]]; then
  rm -rf "$INC" && mkdir -p "$INC"
  python3 - "$wheel" "$INC" <<'EOF'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist()
             if n.startswith("torch/include/") or n in ("torch/version.py", "torch/lib/libc10.so")]
    z.extractall(out, names)
EOF
  grep -q "cuda: Optional\[str\] = '" "$INC/torch/version.py" ||
    { log "the downloaded torch is not a CUDA build"; exit 1; }
  # The wheel's C++ ABI: libc10 exports std::__cxx11 symbols only under the new ABI.
  if grep -q "__cxx11" "$INC/torch/lib/libc10.so"; then abi=1; else abi=0; fi
  echo "$abi" >"$INC/abi"
  rm -f "$INC/torch/lib/libc10.so"
  touch "$INC/.complete"
fi
ABI="$(cat "$INC/abi")"
log "torch $(grep "^__version__" "$INC/torch/version.py" | cut -d"'" -f2), _GLIBCXX_USE_CXX11_ABI=$ABI"

# ---- the flags of setup.py's CUDAExtension ------------------------------------------------
TI="$INC/torch/include"
DEFINES=(-DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C "-D_GLIBCXX_USE_CXX11_ABI=$ABI"
         -DTLF_WITH_CUDA -DTLF_X86_KERNELS)
INCLUDES=(-I"$TI" -I"$TI/torch/csrc/api/include" $(python3-config --includes))
# torch.utils.cpp_extension.COMMON_NVCC_FLAGS, then setup.py's nvcc flags.
NVCC_FLAGS=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
            -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
            --expt-relaxed-constexpr -std=c++20 -Xcompiler -fPIC
            -O3 --use_fast_math -lineinfo --expt-relaxed-constexpr)
GENCODE=()
for a in $ARCHS; do
  if [[ "$a" == *:ptx ]]; then
    GENCODE+=("-gencode=arch=compute_${a%:ptx},code=compute_${a%:ptx}")
  else
    GENCODE+=("-gencode=arch=compute_${a},code=sm_${a}")
  fi
done

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

# One nvcc per file (host code parsed once, device code per arch), files in parallel.
# Arrays do not cross xargs: the command travels as a string (no paths with spaces).
export TLF_NVCC="nvcc -c ${NVCC_FLAGS[*]} ${DEFINES[*]} ${INCLUDES[*]} ${GENCODE[*]} -Xptxas -v"
export ROOT OUT
compile_cu() {
  local src="$1" name
  name="$(basename "$src" .cu)"
  if $TLF_NVCC "$ROOT/$src" -o "$OUT/$name.o" >"$OUT/$name.log" 2>&1; then
    echo "ok   $src"
  else
    echo "FAIL $src"
    cat "$OUT/$name.log"
    return 1
  fi
}
export -f compile_cu

# Largest files first: the two cores stay busy until the end.
sources=$(cd "$ROOT" && ls -S csrc/cuda/*.cu)
[[ -n "$sources" ]] || { log "no csrc/cuda/*.cu"; exit 1; }
log "compiling $(echo "$sources" | wc -l) CUDA files for: $ARCHS ($JOBS in parallel)"

status=0
printf '%s\n' $sources | xargs -P "$JOBS" -I{} bash -c 'compile_cu "$1"' _ {} || status=1

# ops.cpp is compiled by the host compiler in a CUDA build, with TLF_WITH_CUDA defined.
if c++ -c -std=c++20 -O1 -fPIC "${DEFINES[@]}" "${INCLUDES[@]}" "$ROOT/csrc/ops.cpp" \
    -o "$OUT/ops.o" >"$OUT/ops.log" 2>&1; then
  echo "ok   csrc/ops.cpp (TLF_WITH_CUDA)"
else
  echo "FAIL csrc/ops.cpp (TLF_WITH_CUDA)"; cat "$OUT/ops.log"; status=1
fi

# Register use and local-memory spills per kernel, from ptxas.
spills=$(cat "$OUT"/*.log 2>/dev/null | grep -E "bytes spill (stores|loads)" |
  grep -vc " 0 bytes spill stores, 0 bytes spill loads" || true)
log "kernels with local-memory spills: $spills"
if [[ -n "${TLF_PTXAS_LOG_DIR:-}" ]]; then
  mkdir -p "$TLF_PTXAS_LOG_DIR" && cp "$OUT"/*.log "$TLF_PTXAS_LOG_DIR"/
fi

if [[ $status -ne 0 ]]; then
  log "FAILED after $((SECONDS - start)) s"
  exit 1
fi
log "passed in $((SECONDS - start)) s"
