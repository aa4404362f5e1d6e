#!/usr/bin/env bash
# Compile check of the C++ (CPU) sources for 64-bit Arm Linux (Grace Hopper's Grace, AWS
# Graviton) on CI's x86 machine: every .cpp that setup.py builds on a non-x86 host (its
# list without the AVX copies), with setup.py's C++ flags, by Debian's aarch64 cross
# compiler, against the headers of the torch in use. ATen's vector types are NEON/SVE code
# there, so code that builds on x86 can fail there; this catches it. Nothing is linked or
# run (how to run the suite under QEMU: DESIGN-NOTES.md, "Other CPU architectures").
#
#   PYTHON                 the Python whose torch provides the headers (default: python3)
#   TLF_AARCH64_CXX        the cross compiler (default: aarch64-linux-gnu-g++; installed
#                          with apt-get when missing and running as root)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
CXX="${TLF_AARCH64_CXX:-aarch64-linux-gnu-g++}"
start=$SECONDS
log() { echo "[aarch64-compile-check] $*"; }

if ! command -v "$CXX" >/dev/null; then
  if [[ "$CXX" == aarch64-linux-gnu-g++ && "$(id -u)" == 0 ]] && command -v apt-get >/dev/null
  then
    log "installing Debian's g++-aarch64-linux-gnu"
    # update only when the package lists do not know the package yet
    apt-cache show g++-aarch64-linux-gnu >/dev/null 2>&1 || apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      g++-aarch64-linux-gnu >/dev/null
  else
    log "$CXX not found (install g++-aarch64-linux-gnu, or set TLF_AARCH64_CXX)"
    exit 1
  fi
fi
log "$("$CXX" --version | head -n 1)"

# The flags setup.py gives the C++ sources; a change there must be mirrored here.
read -r -a INCLUDES <<<"$("$PYTHON" - <<'EOF'
import sysconfig
from torch.utils.cpp_extension import include_paths
print(" ".join("-I" + p for p in include_paths() + [sysconfig.get_paths()["include"]]))
EOF
)"
STD="$("$PYTHON" -c 'import torch; v = tuple(int(x) for x in torch.__version__.split(".")[:2]); print("-std=c++20" if v >= (2, 10) else "-std=c++17")')"
FLAGS=("$STD" -O3 -fPIC -fvisibility=hidden -Wno-unknown-pragmas -ffp-contract=off -fopenmp
       -Wno-psabi  # (a note on every ATen vector pair: "parameter passing ... changed")
       -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C)

cd "$ROOT"
# setup.py's own list, less the x86-only copies (it adds those only where IS_X86).
mapfile -t SOURCES < <(grep -o '"csrc/[A-Za-z0-9_/]*\.cpp"' setup.py | tr -d '"' \
                       | grep -v -E '_avx(2|512)\.cpp$' | sort -u)
(( ${#SOURCES[@]} > 0 )) || { log "no C++ sources found in setup.py"; exit 1; }

OBJ="$(mktemp -d)"
trap 'rm -rf "$OBJ"' EXIT
failed=0
for src in "${SOURCES[@]}"; do
  extra=()
  [[ "$src" == */kernels_default.cpp ]] && extra=(-DCPU_CAPABILITY=DEFAULT -DCPU_CAPABILITY_DEFAULT)
  if "$CXX" "${FLAGS[@]}" ${extra[@]+"${extra[@]}"} "${INCLUDES[@]}" -c "$src" \
       -o "$OBJ/$(basename "$src").o" 2>"$OBJ/log"; then
    log "ok      $src"
  else
    log "FAILED  $src"
    cat "$OBJ/log"
    failed=1
  fi
done
if (( failed )); then
  log "failed after $((SECONDS - start)) s"
  exit 1
fi
log "passed in $((SECONDS - start)) s (${#SOURCES[@]} sources)"
