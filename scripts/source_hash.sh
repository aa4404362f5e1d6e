#!/usr/bin/env bash
# Prints a hash of what the compiled extension is built from (the tracked csrc/ files and
# setup.py, as they are in the working tree), so that a prebuilt extension can be matched
# with the tree it is used in: scripts/prebuild_for_gpu.sh stores it beside the .so and
# scripts/gpu_check.sh compares.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# (untracked files too, as setup.py globs csrc/: a new source not yet added counts; a tree
# without git, or git refusing it, is an error rather than the hash of nothing)
files="$(git ls-files -z --cached --others --exclude-standard csrc setup.py | tr '\0' '\n')"
[[ -n "$files" ]] || { echo "source_hash.sh: git lists no sources here" >&2; exit 1; }
printf '%s\n' "$files" | LC_ALL=C sort | tr '\n' '\0' | xargs -0 sha256sum | sha256sum |
  cut -c1-16
