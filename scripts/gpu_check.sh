#!/usr/bin/env bash
# GPU check, run on a machine with an NVIDIA GPU (H100/H200), a CUDA build of PyTorch,
# nvcc and no network: builds the extension for this GPU (or uses a prebuilt one, building
# from source beside the later stages), prints which backend serves CUDA, runs the
# benchmark's first run (the issues' CUDA targets) alone on the machine, then the launch
# sweep when asked for and that run missed a target, the whole test suite, compute-sanitizer
# (memcheck, racecheck) over every CUDA op, the benchmark's later runs and the profile.
# Every stage has a time limit so the whole run ends within GPU_CHECK_BUDGET seconds
# (default 570); a failed stage is reported and the later stages still run. $OUT receives summary.txt (written as the run goes) and, at the end,
# bundle.tgz (every log and the benchmark's results): at most 8 files come back from a
# lent machine, so the many logs travel as one.
#
#   OUT=/some/dir bash scripts/gpu_check.sh
#
# GPU_CHECK_STAGES (default "build tests sanitizer bench"; "profile" adds ncu's counters of
# the cross-entropy kernels at the target shape, and of the fused one under
# GPU_CHECK_PROFILE_TUNING, default cluster_blocks=8) picks stages, so a session can split the
# work over several calls (the build is kept between calls on a warm machine).
# GPU_CHECK_CUDA_TESTS_S caps the CUDA part of the tests; GPU_CHECK_REST_SELECT (pytest
# arguments, word-split) narrows the rest, e.g. to the files a previous run found failing;
# GPU_CHECK_MEMCHECK_S / GPU_CHECK_RACECHECK_S / GPU_CHECK_MEMCHECK_BULK_S cap the
# sanitizer's runs (the last: memcheck of the block-per-row shapes under bulk_load=1).
# A prebuilt extension (torchloss_fused/_C.cpython-<this python>-*.so, built elsewhere
# against the same torch by scripts/prebuild_for_gpu.sh and carried along with
# torchloss_fused/_C.sources, the hash of its sources) saves the build's minutes of device
# time: when its sources are this tree's and it loads with its CUDA kernels, every stage
# runs on it and the build from source still runs, in a copy of the tree, in the background
# from the end of the benchmark's first run (that it builds offline there is part of the
# check; nice'd, 4 jobs, within the budget); its result is reported after the sanitizer.
# GPU_CHECK_WORKERS (default 12) pytest-xdist workers run the suite when xdist imports.
# BENCH_RUNS: benchmark invocations separated by '|' (each writes its own results, so a
# run cut short by its time limit loses only its own rows); default: the issues' target
# shapes in bf16, cross-entropy and focal first.
# GPU_CHECK_STAGES "sweep" (after the benchmark's first run): the benchmark once per launch tuning
# (TLF_CUDA_TUNING values separated by '|' in GPU_CHECK_SWEEP, "" = the defaults; see
# torchloss_fused/_cuda_tuning.py), with the arguments of GPU_CHECK_SWEEP_ARGS, and one
# table of our rows (benchmarks/tuning_sweep.py) in summary.txt; the JSONs go in the bundle
# under sweep/. GPU_CHECK_SWEEP_S caps each run. When a setting beats the defaults' cross-
# entropy forward+backward by more than 2% and the stages include "bench", the first
# benchmark runs again under it (its results, which record the setting, go with the rest).
# The sweep is skipped when the benchmark's first run measures and meets every cross-entropy
# and focal target (the time goes to the tests then). The sweep keeps the tests' and the sanitizer's reserves;
# when the budget runs low, its later settings and the benchmark's later runs are skipped
# (summary.txt says which), rather than run under limits too short for them to finish.
#
# Peer libraries for the benchmark (Liger-Kernel, cut-cross-entropy: pure Python + Triton)
# are installed from wheels in .whl/ when present (not tracked: fetch them with `pip
# download --no-deps -d .whl liger-kernel cut-cross-entropy` and carry .whl to the machine).
set -uo pipefail
export PYTHONUNBUFFERED=1

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# The in-place build is imported from scripts run outside the repository root too.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$ROOT/out}"
LOGS="$OUT/logs"
mkdir -p "$OUT" "$LOGS"
BUDGET="${GPU_CHECK_BUDGET:-570}"
START=$SECONDS
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
TMPD="$(mktemp -d)"
trap 'rm -rf "$TMPD"' EXIT
overall=0
PY="${PYTHON:-$(command -v python || command -v python3)}"

note() { echo "$*" | tee -a "$SUMMARY"; }
STAGES=" ${GPU_CHECK_STAGES:-build tests sanitizer bench} "
want() { [[ "$STAGES" == *" $1 "* ]]; }

# Seconds of the budget not yet spent.
budget_left() { echo $((BUDGET - (SECONDS - START))); }

# Seconds left for a stage: at most $1, and never past the budget minus a reserve for the
# stages after it ($2).
stage_limit() {
  local cap=$1 reserve=$2 left
  left=$((BUDGET - (SECONDS - START) - reserve))
  ((left < cap)) && cap=$left
  ((cap < 10)) && cap=10
  echo "$cap"
}

# run_stage NAME LOG LIMIT CMD...: runs CMD with a time limit, output to the console and LOG.
run_stage() {
  local name=$1 log=$2 limit=$3 t0=$SECONDS rc
  shift 3
  echo "=== $name (limit ${limit}s) ===" | tee "$log"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  note "$name: rc=$rc in $((SECONDS - t0)) s$([[ $rc -eq 124 || $rc -eq 137 ]] && echo ' (timed out)')"
  [[ $rc -ne 0 ]] && overall=1
  return "$rc"
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader \
    2>/dev/null || echo "nvidia-smi unavailable"
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
      "gpus", torch.cuda.device_count())'
  nvcc --version | tail -n 2 | head -n 1
} 2>&1 | tee -a "$SUMMARY"

if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$TMPD/site" "$ROOT"/.whl/*.whl; then
    export PYTHONPATH="$TMPD/site${PYTHONPATH:+:$PYTHONPATH}"
    note "peer wheels: $(cd "$ROOT/.whl" && ls -- *.whl | tr '\n' ' ')"
  else
    note "peer wheels in .whl/ failed to install: benchmark without them"
  fi
fi

# ---- 1. build (this GPU's architecture only; C++ files on every core) ----------------------
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
cuda_loads() {
  (cd "$1" && "$PY" -c 'import sys, torchloss_fused as t
sys.exit(t.backend_info("cuda")["implementation"] != "cuda")') >/dev/null 2>&1
}
# A prebuilt extension from other sources (torchloss_fused/_C.sources, written by
# prebuild_for_gpu.sh, missing or another hash) would test and time stale kernels: it is
# moved aside and the build runs first.
py_tag="$("$PY" -c 'import sys; print("%d%d" % sys.version_info[:2])')"
so_prebuilt="$(ls torchloss_fused/_C.cpython-"$py_tag"-*.so 2>/dev/null | head -n 1 || true)"
if [[ -n "$so_prebuilt" ]]; then
  want_sources="$(scripts/source_hash.sh 2>/dev/null || echo unknown)"
  have_sources="$(cat torchloss_fused/_C.sources 2>/dev/null || echo none)"
  if [[ "$want_sources" == unknown ]]; then
    # (no git here, or git refusing the tree: the extension's own check at import, of its
    # ops and functions, is what is left)
    note "sources of this tree unknown (git): the prebuilt $so_prebuilt is taken as it is"
  elif [[ "$have_sources" != "$want_sources" ]]; then
    note "stale prebuilt $so_prebuilt (sources $have_sources, this tree $want_sources): unused"
    # (renamed in place, not deleted: a later call may want it for what it is)
    mv "$so_prebuilt" "$so_prebuilt.stale"
    if ! want build; then
      note "no build among the stages: nothing would serve CUDA but the fallback; stopping"
      exit 1
    fi
  fi
fi
# What the stages after the benchmark's first run need at least: the tests (the CUDA part's
# ~3800 tests and a first stretch of the rest, with 12 workers) and the sanitizer. The sweep
# stops trying settings where it would eat into these.
TESTS_RESERVE=0
want tests && TESTS_RESERVE=200
SAN_RESERVE=0
want sanitizer && SAN_RESERVE=120
# When a prebuilt extension serves the stages, the build from source still runs (that it
# builds offline here is part of the check), in the background from the end of the
# benchmark's first run, so that run has the machine to itself; its time limit keeps it
# within the budget.
BG_BUILD_PID=""
BG_PENDING=0
if want build && cuda_loads "$ROOT"; then
  note "prebuilt extension loads with its CUDA kernels: the stages run on it; the build from source runs beside them from after benchmark 1"
  BG_PENDING=1
elif want build && ! run_stage build "$LOGS/build.log" "$(stage_limit 270 270)" \
    "$PY" setup.py build_ext --inplace; then
  note "build failed: see build.log"
  tar czf "$OUT/bundle.tgz" -C "$OUT" logs && rm -rf "$LOGS"
  exit 1
fi
# Built here in place: a later call on the same machine may use it as it is.
if want build && [[ $BG_PENDING -eq 0 ]]; then
  scripts/source_hash.sh >torchloss_fused/_C.sources
fi
# Whatever serves now must be the CUDA kernels: the stages would otherwise spend the budget
# timing and testing the pure-PyTorch fallback.
if ! cuda_loads "$ROOT"; then
  note "the extension does not serve CUDA (see backend_info below and build.log): stopping"
  "$PY" -c 'import torchloss_fused as t; print(t.backend_info("cuda"))' 2>&1 | tee -a "$SUMMARY"
  tar czf "$OUT/bundle.tgz" -C "$OUT" logs && rm -rf "$LOGS"
  exit 1
fi
start_bg_build() {
  [[ $BG_PENDING -eq 1 ]] || return 0
  BG_PENDING=0
  BG_BUILD_LIMIT=$(($(budget_left) - 20))
  ((BG_BUILD_LIMIT > 500)) && BG_BUILD_LIMIT=500
  if ((BG_BUILD_LIMIT < 60)); then
    note "build from source: not started, $(budget_left) s of the budget left"
    return 0
  fi
  BG_SRC="$TMPD/src"
  mkdir -p "$BG_SRC"
  git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$BG_SRC"
  (cd "$BG_SRC" && MAX_JOBS=4 nice -n 19 timeout "$BG_BUILD_LIMIT" "$PY" setup.py build_ext \
    --inplace) >"$LOGS/build.log" 2>&1 &
  BG_BUILD_PID=$!
  BG_BUILD_T0=$SECONDS
}

"$PY" - <<'PYEOF' 2>&1 | tee -a "$SUMMARY"
import torchloss_fused
print("backend_info('cuda'):", torchloss_fused.backend_info("cuda"))
PYEOF

# ---- 2. the benchmark's first run (every CUDA target of the issues), alone on the machine ---
marker="$TMPD/marker"
touch "$marker"
DEFAULT_RUNS="--targets --dtypes bf16 --ops ce_fwd_bwd focal_fwd_bwd|--targets --dtypes bf16 --ops ce_fwd sigmoid_focal_fwd_bwd linear_ce_fwd_bwd"
IFS='|' read -r -a bench_runs <<<"${BENCH_RUNS:-$DEFAULT_RUNS}"
# run_bench I RESERVE [NEED]: benchmark run I of BENCH_RUNS (1-based), leaving RESERVE
# seconds of the budget to the stages after it; skipped when under NEED seconds (default
# 30) would be left to it. (A run stopped by its limit writes the cases it finished.) Its
# results JSON is copied to $OUT at once: the run's main product comes back even if a
# later stage outlasts the command's own limit.
run_bench() {
  local i=$1 reserve=$2 need=${3:-30}
  local args="${bench_runs[$((i - 1))]}" t0=$SECONDS
  if (($(budget_left) - reserve < need)); then
    note "benchmark $i ($args): skipped, $(budget_left) s of the budget left"
    return
  fi
  # shellcheck disable=SC2086  # args is a list of words
  run_stage "benchmark $i ($args)${TLF_CUDA_TUNING:+ (TLF_CUDA_TUNING='$TLF_CUDA_TUNING')}" \
    "$LOGS/bench_$i${TLF_CUDA_TUNING:+_tuned}.log" "$(stage_limit 400 "$reserve")" \
    "$PY" -m benchmarks.run --device cuda --no-progress $args
  BENCH_S=$((SECONDS - t0))
  find benchmarks/results -name '*.json' -newer "$marker" -exec cp -t "$OUT" {} + 2>/dev/null
}
# When the first run measures and meets every target of cross-entropy and focal loss (all of
# issue 3's), the sweep is skipped and its time goes to the tests (what the issue needs
# then); otherwise the sweep looks for a faster setting.
targets_met=0
if want bench; then
  run_bench 1 $((10 + TESTS_RESERVE + SAN_RESERVE))
  first_json="$(find benchmarks/results -name '*.json' -newer "$marker" | head -n 1)"
  if [[ -n "$first_json" ]] && "$PY" -m benchmarks.targets "$first_json" \
      --ops ce_fwd_bwd focal_fwd_bwd >/dev/null 2>&1; then
    targets_met=1
  fi
fi
start_bg_build

# ---- 3. optional: the benchmark under each launch tuning ------------------------------------
# The defaults; thread block clusters of 8 blocks; a block per row that asks L2 for its
# whole next row (256 KiB: a 128256-class bf16 row) while it writes this row's gradient, so
# DRAM reads go on during the gradient pass (132 rows in flight: ~33 MB of a 50 MB L2);
# a block per row whose first pass has the bulk-copy engine fill its row cache (bulk_load,
# sm_90 and newer), alone, with that prefetch, and with clusters of 8; clusters of 4, 16, 8 with a 32 KiB
# prefetch, and 2 (never measured yet, so first); then a block per row with a 64 KiB
# prefetch, and two 256-thread blocks per SM (each caching 108 KiB of its row, the rest
# re-read from L2).
DEFAULT_SWEEP="|cluster_blocks=8|prefetch_kib=256|bulk_load=1|bulk_load=1,prefetch_kib=256|cluster_blocks=8,bulk_load=1|cluster_blocks=4|cluster_blocks=16|cluster_blocks=8,prefetch_kib=32|cluster_blocks=2|prefetch_kib=64|block_threads=256,row_cache_kib=108"
DEFAULT_SWEEP_ARGS="--targets --dtypes bf16 --ops ce_fwd_bwd --no-compile --no-peers --no-plot"
if want sweep && [[ $targets_met -eq 1 ]]; then
  note "sweep: skipped, benchmark 1 meets every cross-entropy and focal target (its time goes to the tests)"
elif want sweep; then
  IFS='|' read -r -a sweep_runs <<<"${GPU_CHECK_SWEEP-$DEFAULT_SWEEP}"
  # A run needs ~20 s. The later settings (GPU_CHECK_SWEEP lists the most wanted first) are
  # not tried once under 25 s would be left beyond the tests' and the sanitizer's reserves
  # and the ~70 s of a winner's rerun of benchmark 1 (about 60 s on the H200 at stop 16).
  after_sweep=$((TESTS_RESERVE + SAN_RESERVE))
  # (a winner's rerun of benchmark 1 needs what benchmark 1 took, and a margin)
  rerun_need=$((${BENCH_S:-60} * 6 / 5 + 10))
  want bench && after_sweep=$((after_sweep + rerun_need))
  i=0
  for tuning in "${sweep_runs[@]}"; do
    i=$((i + 1))
    if (($(budget_left) - after_sweep < 25)); then
      note "sweep: settings $i to ${#sweep_runs[@]} skipped, $(budget_left) s of the budget left"
      break
    fi
    mkdir -p "$OUT/sweep/$i"
    # shellcheck disable=SC2086  # the arguments are a list of words
    TLF_CUDA_TUNING="$tuning" run_stage "sweep $i (TLF_CUDA_TUNING='$tuning')" \
      "$LOGS/sweep_$i.log" "$(stage_limit "${GPU_CHECK_SWEEP_S:-60}" "$after_sweep")" \
      "$PY" -m benchmarks.run --device cuda --no-progress --out "$OUT/sweep/$i" \
      ${GPU_CHECK_SWEEP_ARGS:-$DEFAULT_SWEEP_ARGS}
  done
  if compgen -G "$OUT/sweep/*/*.json" >/dev/null; then
    "$PY" -m benchmarks.tuning_sweep "$OUT"/sweep/*/*.json 2>&1 | tee -a "$SUMMARY"
    # A setting that beats the defaults by more than the noise (2%, or the spread between
    # benchmark 1's default row and the sweep's, if wider): the first benchmark again under
    # it (peers and torch.compile included), so that one session measures the targets with it.
    best="$("$PY" -m benchmarks.tuning_sweep --best ce_fwd_bwd "$OUT"/sweep/*/*.json \
      ${first_json:+"$first_json"} 2>/dev/null)"
    if [[ -n "$best" ]] && want bench; then
      note "sweep winner: TLF_CUDA_TUNING='$best'; benchmark 1 again under it"
      TLF_CUDA_TUNING="$best" run_bench 1 $((10 + TESTS_RESERVE + SAN_RESERVE)) "$rerun_need"
    elif [[ -z "$best" ]]; then
      note "sweep: no setting beats the defaults by more than the noise (2% or wider)"
    fi
  fi
fi

# ---- 4. the whole test suite: CUDA cases first (what only this machine can check), then the
# rest. Not -x: a first run on new hardware should show every failure at once.
PYTEST=("$PY" -m pytest -rfEs --maxfail=50 -p no:cacheprovider)
WORKERS="${GPU_CHECK_WORKERS:-12}"
if [[ "$WORKERS" -gt 1 ]] && "$PY" -c 'import xdist' 2>/dev/null; then
  PYTEST+=(-n "$WORKERS")
fi
# The CUDA part gets up to GPU_CHECK_CUDA_TESTS_S seconds (default 360), the rest up to 240,
# each within what the budget leaves beyond the sanitizer's reserve.
cuda_cap="${GPU_CHECK_CUDA_TESTS_S:-360}"
rest_select=(tests -k "not cuda or emulated")
[[ -n "${GPU_CHECK_REST_SELECT:-}" ]] && read -r -a rest_select <<<"$GPU_CHECK_REST_SELECT"
if want tests; then
  # Two threads per worker, as on CI's machine: the workers share the cores.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
  # -v names each test as it ends, so a part cut short by its limit still says what passed
  # and what failed (-q's list of failures is printed only at the end).
  # The GPU-only files first, on their own: a systematic miss in the CUDA copies of the CPU
  # tests must not reach --maxfail before the >2^31, CUDA-graph, stream, determinism and
  # device-assert tests have run.
  gpu_only=(tests/test_cuda_only.py tests/test_cuda_tuning.py tests/test_large_offsets.py)
  run_stage tests-gpu-only "$LOGS/tests_gpu_only.log" \
    "$(stage_limit "$cuda_cap" $((SAN_RESERVE + 60)))" \
    "${PYTEST[@]}" -v --durations=20 "${gpu_only[@]}" -k cuda
  run_stage tests-cuda "$LOGS/tests_cuda.log" "$(stage_limit "$cuda_cap" $((SAN_RESERVE + 40)))" \
    "${PYTEST[@]}" -v --durations=30 tests -k "cuda and not emulat" \
    --deselect tests/test_cuda_only.py --deselect tests/test_cuda_tuning.py \
    --deselect tests/test_large_offsets.py
  if (($(budget_left) - SAN_RESERVE < 90)); then
    note "tests-rest: skipped, $(budget_left) s of the budget left (CI runs them on CPU)"
  else
    run_stage tests-rest "$LOGS/tests_rest.log" "$(stage_limit 240 $((SAN_RESERVE + 10)))" \
      "${PYTEST[@]}" -q "${rest_select[@]}"
  fi
  unset OMP_NUM_THREADS
  for part in gpu_only cuda rest; do
    log="$LOGS/tests_$part.log"
    [[ -f "$log" ]] || continue
    if tail -n 1 "$log" | grep -qE ' in [0-9.]+s'; then
      tail -n 1 "$log" | sed "s/^/tests-$part: /" >>"$SUMMARY"
      grep -E '^(FAILED|ERROR) ' "$log" | head -n 40 >>"$SUMMARY"
      # (a GPU-only test that skipped, say for want of free memory, checked nothing)
      [[ $part == gpu_only ]] && grep -E '^SKIPPED' "$log" | head -n 20 >>"$SUMMARY"
    else
      # Cut short: what the per-test lines say ("[gw3] [ 41%] PASSED tests/..." under xdist,
      # "tests/...::name PASSED [ 41%]" without; -q parts have neither, only dots).
      passed=$(grep -cE '\] PASSED |::[^ ]+ PASSED' "$log")
      failed=$(grep -cE '\] (FAILED|ERROR) |::[^ ]+ (FAILED|ERROR)' "$log")
      if ((passed + failed > 0)); then
        note "tests-$part: cut short, $passed passed and $failed failed before the limit"
        grep -E '\] (FAILED|ERROR) |::[^ ]+ (FAILED|ERROR)' "$log" | head -n 40 >>"$SUMMARY"
      else
        note "tests-$part: cut short by its limit (see tests_$part.log)"
      fi
    fi
  done
fi

# ---- 5. compute-sanitizer over every CUDA op ---------------------------------------------------
SAN="$(command -v compute-sanitizer || true)"
[[ -z "$SAN" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/compute-sanitizer" ]] &&
  SAN="$CUDA_HOME/bin/compute-sanitizer"
[[ -z "$SAN" && -x /usr/local/cuda/bin/compute-sanitizer ]] && SAN=/usr/local/cuda/bin/compute-sanitizer
if ! want sanitizer; then
  :
elif [[ -n "$SAN" ]]; then
  # Without the caching allocator every tensor is its own allocation, so memcheck sees an
  # access past a tensor's end even where the cache would have had memory there.
  run_stage memcheck "$LOGS/memcheck.log" "$(stage_limit "${GPU_CHECK_MEMCHECK_S:-90}" 60)" \
    env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SAN" --tool memcheck --error-exitcode 3 "$PY" "$ROOT/scripts/exercise_ops.py"
  run_stage racecheck "$LOGS/racecheck.log" "$(stage_limit "${GPU_CHECK_RACECHECK_S:-60}" 40)" \
    "$SAN" --tool racecheck --error-exitcode 3 "$PY" "$ROOT/scripts/exercise_ops.py" --block-only
  # The bulk-copy kernels (bulk_load, sm_90 and newer, not the default) over the block-per-row
  # shapes: a copy that reads past a row's storage is an out-of-bounds access here.
  TLF_CUDA_TUNING=bulk_load=1 run_stage "memcheck (bulk_load=1)" "$LOGS/memcheck_bulk.log" \
    "$(stage_limit "${GPU_CHECK_MEMCHECK_BULK_S:-45}" 10)" \
    env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SAN" --tool memcheck --error-exitcode 3 "$PY" "$ROOT/scripts/exercise_ops.py" --block-only
else
  note "compute-sanitizer not found: skipped"
fi

# ---- 6. the build from source that ran beside the stages since benchmark 1 -----------------
if [[ -n "$BG_BUILD_PID" ]]; then
  wait "$BG_BUILD_PID"
  rc=$?
  if [[ $rc -eq 0 ]] && cuda_loads "$BG_SRC"; then
    note "build from source: rc=0 in $((SECONDS - BG_BUILD_T0)) s; it loads with its CUDA kernels"
  elif [[ $rc -eq 124 ]]; then
    note "build from source: cut short by its limit (${BG_BUILD_LIMIT} s: what the budget left)"
  else
    note "build from source: FAILED (rc=$rc; see build.log)"
    overall=1
  fi
fi

# ---- 7. the benchmark's later runs, with what is left -----------------------------------------
if want bench; then
  for ((i = 2; i <= ${#bench_runs[@]}; i++)); do run_bench "$i" 10; done
fi

# ---- 8. optional: hardware counters of the cross-entropy kernels at the target shape ---------
# (GPU_CHECK_STAGES must name "profile": ncu replays each kernel several times)
NCU="$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1 || true)"
if want profile && [[ -n "$NCU" ]]; then
  cat >"$TMPD/profile_ce.py" <<'EOF'
"""The softmax_loss kernels of a bf16 (16384, 128256) cross-entropy step: the fused
forward+backward (twice: the first warms up), then inplace_backward's forward and backward."""
import torch
import torchloss_fused as tlf
from benchmarks.problems import as_model_output  # (inplace_backward refuses a leaf)
x = torch.randn(16384, 128256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
t = torch.randint(0, 128256, (16384,), device="cuda")
for _ in range(2):
    tlf.cross_entropy(x, t).backward()
    x.grad = None
y = x.detach().clone().requires_grad_()
tlf.cross_entropy(as_model_output(y), t, inplace_backward=True).backward()
torch.cuda.synchronize()
EOF
  # Clocks as found (--clock-control none): see the device notes on not changing them.
  run_stage profile "$LOGS/profile.log" "$(stage_limit "${GPU_CHECK_PROFILE_S:-90}" 10)" \
    "$NCU" --clock-control none --kernel-name regex:softmax_loss_kernel --launch-skip 1 \
    --launch-count 3 --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section WarpStateStats --section MemoryWorkloadAnalysis --section InstructionStats \
    "$PY" "$TMPD/profile_ce.py"
  # The fused kernel again under a launch tuning (default: thread block clusters of 8, not
  # yet profiled; GPU_CHECK_PROFILE_TUNING="" skips it).
  profile_tuning="${GPU_CHECK_PROFILE_TUNING-cluster_blocks=8}"
  if [[ -n "$profile_tuning" ]]; then
    TLF_CUDA_TUNING="$profile_tuning" run_stage "profile ($profile_tuning)" \
      "$LOGS/profile_tuned.log" "$(stage_limit "${GPU_CHECK_PROFILE_S:-60}" 10)" \
      "$NCU" --clock-control none --kernel-name regex:softmax_loss_kernel --launch-skip 1 \
      --launch-count 1 --section SpeedOfLight --section Occupancy --section LaunchStats \
      --section WarpStateStats --section MemoryWorkloadAnalysis --section InstructionStats \
      "$PY" "$TMPD/profile_ce.py"
  fi
elif want profile; then
  note "ncu not found: profile skipped"
fi

# float32 accuracy beside F's, on the GPU (benchmarks/precision.py: a few seconds).
if want bench; then
  for op in cross_entropy linear_cross_entropy; do
    "$PY" -m benchmarks.precision --op "$op" --device cuda 2>&1 | tee -a "$SUMMARY" ||
      note "benchmarks.precision --op $op failed"
  done
fi

# The results the benchmark wrote in this run (JSON, PNG, -latest.md tables).
mkdir -p "$OUT/results"
find benchmarks/results -type f -newer "$marker" \( -name '*.json' -o -name '*.png' -o -name '*.md' \) \
  -exec cp {} "$OUT/results/" \;
note "results: $(ls "$OUT/results" 2>/dev/null | tr '\n' ' ')"
# The issues' performance targets, read from the results JSON just written.
if compgen -G "$OUT/results/*.json" >/dev/null; then
  "$PY" -m benchmarks.targets "$OUT"/results/*.json 2>&1 | tee -a "$SUMMARY"
  # README's "Results so far" line for this GPU (cross-entropy forward+backward).
  "$PY" -m benchmarks.summary "$OUT"/results/*.json 2>&1 | tee -a "$SUMMARY" || true
fi

note "total: $((SECONDS - START)) s, overall rc=$overall"
sweep_dir=()
[[ -d "$OUT/sweep" ]] && sweep_dir=(sweep)
tar czf "$OUT/bundle.tgz" -C "$OUT" logs results ${sweep_dir[@]+"${sweep_dir[@]}"} &&
  rm -rf "$LOGS" "$OUT/results" "$OUT/sweep"
exit "$overall"
