#!/usr/bin/env bash
# The main job: sets up a fresh machine (scripts/setup_env.sh), then runs the benchmark
# comparison on the best available device (CPU when there is no GPU) and writes its table,
# JSON and plot under benchmarks/results/. Extra arguments go to the benchmark, e.g.
# `scripts/bench.sh --full` or `scripts/bench.sh --device cpu --ops cross_entropy`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python -m benchmarks.run "$@"
