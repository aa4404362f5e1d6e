#!/usr/bin/env bash
# The test suite on 64-bit Arm Linux, on an x86 machine: a Debian arm64 root file system
# (debootstrap) whose programs run under QEMU's user-mode emulation (binfmt_misc), with
# Python, the aarch64 CPU build of torch and this working tree; the extension is built
# there by Debian's native arm64 gcc (emulated) and the suite runs. Correctness only: QEMU's
# timings say nothing about an Arm CPU's speed. Needs root, network to Debian and PyPI.
# Extra arguments go to pytest (default: the whole suite, -n 2).
#   TLF_ARM_ROOT       where the root file system lives (default /tmp/tlf-arm64); it is
#                      reused, so a second run skips the set-up (minutes the first time)
#   TLF_ARM_TORCH      the torch requirement inside (default torch==2.9.1, whose aarch64
#                      wheel on PyPI is a CPU build; 2.13.0's needs CUDA's libraries, GBs)
# The mounts (proc, dev) inside the root file system stay after the run.
# Seen on a 2-core x86 machine: debootstrap 6 min, the venv 2.5 min, the build 5-7 min; the
# whole suite takes over an hour emulated, so pass test files to run a part (the figures:
# README, "Development").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARM="${TLF_ARM_ROOT:-/tmp/tlf-arm64}"
TORCH_SPEC="${TLF_ARM_TORCH:-torch==2.9.1}"
log() { echo "[aarch64-suite] $*"; }

[[ "$(id -u)" == 0 ]] || { log "needs root (debootstrap, chroot, binfmt_misc)"; exit 1; }
export DEBIAN_FRONTEND=noninteractive
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
[[ -x /usr/bin/qemu-aarch64-static ]] || need+=(qemu-user-static)
if (( ${#need[@]} )); then
  log "installing ${need[*]}"
  apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi

# QEMU as the interpreter of arm64 programs; F (in the conf's flags) opens it now, so the
# chroot needs no copy of it.
if [[ ! -e /proc/sys/fs/binfmt_misc/register ]]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [[ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]]; then
  cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register
fi

if [[ ! -f "$ARM/.bootstrapped" ]]; then
  log "debootstrap of Debian bookworm arm64 into $ARM"
  rm -rf "$ARM"
  debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,python3-dev,g++,ca-certificates \
    bookworm "$ARM" http://deb.debian.org/debian >"$ARM.debootstrap.log" 2>&1 \
    || { tail -n 20 "$ARM.debootstrap.log"; exit 1; }
  touch "$ARM/.bootstrapped"
fi

mounted() { mountpoint -q "$ARM/$1"; }
mounted proc || mount -t proc proc "$ARM/proc"
mounted dev || mount --bind /dev "$ARM/dev"
cp /etc/resolv.conf "$ARM/etc/resolv.conf"
# This machine's certificate bundle, for a network that re-signs TLS (PIP_CERT).
cert="${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}"
[[ -f "$cert" ]] && cp "$cert" "$ARM/etc/ssl/certs/host-bundle.crt"
in_arm() {
  chroot "$ARM" /usr/bin/env -i HOME=/root PATH=/venv/bin:/usr/bin:/bin \
    PIP_CERT=/etc/ssl/certs/host-bundle.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MAX_JOBS="$(nproc)" /bin/bash -c "$1"
}

if [[ ! -f "$ARM/.complete" ]]; then
  log "venv with $TORCH_SPEC and the test tools (emulated pip)"
  in_arm "python3 -m venv /venv && pip install -q '$TORCH_SPEC' setuptools wheel pytest \
          pytest-xdist hypothesis numpy tqdm tabulate matplotlib"
  touch "$ARM/.complete"
fi

log "copying the working tree (tracked and untracked, not ignored files) to $ARM/src"
rm -rf "$ARM/src" && mkdir -p "$ARM/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
   | tar --null --ignore-failed-read -cf - -T - | tar -xf - -C "$ARM/src")
start=$SECONDS
log "building the extension (emulated gcc)"
in_arm "cd /src && python setup.py build_ext --inplace >/tmp/build.log 2>&1 \
        || { tail -n 40 /tmp/build.log; exit 1; }"
log "built in $((SECONDS - start)) s: $(in_arm "cd /src && python -c \
  'import torchloss_fused as t; print(t.backend_info(\"cpu\"))'")"
args=("$@")
(( ${#args[@]} )) || args=(-n 2 -q tests)
quoted="$(printf ' %q' "${args[@]}")"
in_arm "cd /src && python -m pytest -p no:cacheprovider$quoted"
