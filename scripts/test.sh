#!/usr/bin/env bash
# The test command: sets up a fresh machine (scripts/setup_env.sh), then runs the whole
# suite. CUDA tests run when a GPU is present and skip otherwise. Extra arguments go to
# pytest, e.g. `scripts/test.sh -k focal -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python -m pytest -q tests "$@"
