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

cd "$ROOT"
# setup.py's own source list (as on a non-x86 host) and C++ flags, read by importing it;
# the two defines are the ones torch's BuildExtension adds.
"$PYTHON" - "$CXX" <<'EOF'
import importlib.util
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from torch.utils.cpp_extension import include_paths

spec = importlib.util.spec_from_file_location("tlf_setup", "setup.py")
setup_py = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup_py)

cxx, start = sys.argv[1], time.monotonic()
sources, _ = setup_py._sources(x86=False)
flags = (setup_py._cxx_flags() + [setup_py._cxx_std(), "-fPIC",
         "-Wno-psabi",  # a note on every ATen vector pair: "parameter passing ... changed"
         "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
         + ["-I" + p for p in include_paths() + [sysconfig.get_paths()["include"]]])
failed = []
with tempfile.TemporaryDirectory() as obj:
    for src in sources:
        extra = [f for suffix, fs in setup_py.CAPABILITY_FLAGS.items()
                 if src.endswith(suffix) for f in fs]
        run = subprocess.run([cxx, *flags, *extra, "-c", src,
                              "-o", str(Path(obj) / (Path(src).name + ".o"))],
                             capture_output=True, text=True)
        ok = run.returncode == 0
        print(f"[aarch64-compile-check] {'ok    ' if ok else 'FAILED'}  {src}", flush=True)
        if not ok:
            print(run.stderr, flush=True)
            failed.append(src)
took = time.monotonic() - start
if failed:
    sys.exit(f"[aarch64-compile-check] failed after {took:.0f} s: {', '.join(failed)}")
print(f"[aarch64-compile-check] passed in {took:.0f} s ({len(sources)} sources)")
EOF
