#!/usr/bin/env bash
# Prints a hash of what the compiled extension is built from (the tracked csrc/ files and
# setup.py, as they are in the working tree), so that a prebuilt extension can be matched
# with the tree it is used in: scripts/prebuild_for_gpu.sh stores it beside the .so and
# scripts/gpu_check.sh compares.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
git ls-files -z csrc setup.py | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
