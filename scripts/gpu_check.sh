#!/usr/bin/env bash
# The one prepared command for a lent GPU machine (one 15-minute slot, machine start
# included; no network; torch, CUDA and Triton preinstalled; this repo as the working copy):
#
#   bash scripts/gpu_check.sh [OUTDIR]        # OUTDIR default ./gpu_check_out
#
# At most GPU_CHECK_BUDGET_S seconds (default 470: under 8 minutes on 16 cores):
#   env    versions, GPU, tools (pytest, ninja, nvcc and its CUDA major vs torch's)
#   build  in place against the installed torch; on a GPU the CUDA kernels are
#          REQUIRED (a CPU-only fallback still runs the rest, reported as a FAILED check)
#   smoke  standalone kernels-vs-reference check (no pytest needed), a CUDA graph of the
#          Triton launchers replayed after their table caches overflowed, two timings
#   cuda   pytest -m cuda first: kernels, optimizer kernels, CUDA graphs, trainer on CUDA,
#          the CUDA half of the backend-parametrized tests, Triton on the GPU
#   rest   the rest of the suite with the time left
#   bench  benchmarks/bench_*.py --quick --device cuda
# Each stage has its own timeout, sent as SIGINT so pytest prints its summary and
# writes its junit file. OUTDIR/summary.md says what ran, passed, failed and was
# skipped per stage, every number measured, versions and the GPU; the logs lie beside it.
#
# Without a GPU (CI runs it so) the CUDA stages say "no GPU", the build is CPU-only,
# `rest` runs a small smoke subset (GPU_CHECK_FULL=1: everything) and one quick
# benchmark. GPU_CHECK_BUILD=0 skips the build (uses what imports).
# Exit code: 0 if no stage failed (and, on a GPU, the CUDA kernels were built).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUTDIR="${1:-./gpu_check_out}"
mkdir -p "$OUTDIR" && OUTDIR="$(cd "$OUTDIR" && pwd)" || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, from any directory
START=$(date +%s)
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"
STAGES="$OUTDIR/stages.tsv"
HEADER="$OUTDIR/header.txt"
: >"$STAGES"
: >"$HEADER"
rm -f "$OUTDIR"/junit_*.xml
FAILED=0
say() { echo "$*" | tee -a "$HEADER"; }
time_left() { echo $((BUDGET_S - ($(date +%s) - START))); }
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$STAGES"; }  # name rc s limit log junit note

# stage NAME LOG JUNIT CAP_S CMD...: CMD under `timeout -s INT` min(CAP_S, time left - 20);
# pytest's exit 5 (nothing collected) is not a failure.
stage() {
  local name=$1 log=$2 junit=$3 cap=$4
  shift 4
  local t=$(($(time_left) - 20))
  ((cap < t)) && t=$cap
  if ((t < 10)); then
    record "$name" "-" 0 0 "$log" "-" "time budget spent"
    echo "== $name: not run (time budget spent)"
    FAILED=1
    return 99
  fi
  local t0=$(date +%s)
  printf '\n===== %s (timeout %ss): %s =====\n' "$name" "$t" "$*" >>"$OUTDIR/$log"
  echo "== $name (timeout ${t}s)"
  timeout -s INT -k 15 "$t" "$@" >>"$OUTDIR/$log" 2>&1
  local rc=$?
  local secs=$(($(date +%s) - t0))
  local note=""
  ((rc == 124 || rc == 137)) && note="stopped at the ${t}s limit"
  ((rc == 5)) && note="no tests collected"
  tail -n 3 "$OUTDIR/$log" | sed 's/^/   /'
  record "$name" "$rc" "$secs" "$t" "$log" "$junit" "$note"
  ((rc != 0 && rc != 5)) && FAILED=1
  return "$rc"
}
not_run() { record "$1" "-" 0 0 "-" "-" "$2"; echo "== $1: $2"; }

# ---- env: python, versions, GPU, tools ---------------------------------------
PY="$(command -v python3 || command -v python || true)"
if [ -z "$PY" ]; then
  echo "no python3 or python on PATH" | tee "$OUTDIR/summary.md"
  exit 2
fi
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo 'unknown (no git)')"
git rev-parse --git-dir >/dev/null 2>&1 && ! git diff --quiet 2>/dev/null && COMMIT="$COMMIT (+local changes)"
say "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit $COMMIT; $(nproc) cores; python $PY ($("$PY" -V 2>&1))"
TORCH_LINE="$("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda or "none", int(torch.cuda.is_available()), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-", "%d.%d" % torch.cuda.get_device_capability(0) if torch.cuda.is_available() else "-")' 2>"$OUTDIR/env.log")"
read -r TORCH_V TORCH_CUDA HAS_GPU GPU_NAME_ARCH <<<"$TORCH_LINE"
[ -z "$TORCH_V" ] && { say "- torch does not import (see env.log)"; HAS_GPU=0; TORCH_CUDA=none; }
GPU_ARCH="${TORCH_LINE##* }"
GPU_NAME="$(echo "$TORCH_LINE" | cut -d' ' -f4- | sed 's/ [^ ]*$//')"
say "- torch $TORCH_V (CUDA $TORCH_CUDA); triton $("$PY" -c 'import triton; print(triton.__version__)' 2>/dev/null || echo 'not importable')"
if [ "${HAS_GPU:-0}" = 1 ]; then
  say "- GPU: $GPU_NAME (sm_${GPU_ARCH/./})"
  nvidia-smi >>"$OUTDIR/env.log" 2>&1
else
  say "- GPU: **no GPU** (torch.cuda.is_available() is False): the CUDA stages do not run"
fi
has_mod() { "$PY" -c "import $1" >/dev/null 2>&1; }
HAS_PYTEST=0; has_mod pytest && HAS_PYTEST=1
say "- pytest: $([ $HAS_PYTEST = 1 ] && "$PY" -c 'import pytest; print(pytest.__version__)' || echo 'MISSING: only the standalone smoke check runs')"
say "- ninja: $(command -v ninja >/dev/null && ninja --version || (has_mod ninja && echo 'python module only') || echo 'missing: torch compiles one file at a time')"
say "- optional: $(for m in numpy tqdm matplotlib hypothesis; do has_mod $m && printf '%s ' "$m" || printf 'no-%s ' "$m"; done)"

# nvcc: torch's cpp_extension refuses a CUDA *major* different from torch.version.cuda,
# so pick a toolkit whose major matches (CUDA_HOME, PATH, the usual places, pip's nvidia/).
nvcc_major() { "$1/bin/nvcc" --version 2>/dev/null | sed -n 's/.*release \([0-9]*\)\..*/\1/p' | head -1; }
WANT_MAJOR="${TORCH_CUDA%%.*}"
CHOSEN_CUDA=""
SEEN=""
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)"
NVCC_ON_PATH="$(command -v nvcc 2>/dev/null || true)"
for d in "${CUDA_HOME:-}" "${NVCC_ON_PATH:+$(dirname "$(dirname "$NVCC_ON_PATH")")}" /usr/local/cuda /usr/local/cuda-* /opt/cuda \
  "$SITE/nvidia/cu$WANT_MAJOR" "$SITE/nvidia/cuda_nvcc"; do
  [ -n "$d" ] && [ -x "$d/bin/nvcc" ] && [ -f "$d/include/cuda_runtime.h" ] || continue
  case " $SEEN " in *" $d "*) continue ;; esac
  SEEN="$SEEN $d"
  m="$(nvcc_major "$d")"
  say "- nvcc: $d (CUDA $m; torch's CUDA $TORCH_CUDA)$([ "$m" = "$WANT_MAJOR" ] && [ -z "$CHOSEN_CUDA" ] && echo ' <- used')"
  [ "$m" = "$WANT_MAJOR" ] && [ -z "$CHOSEN_CUDA" ] && CHOSEN_CUDA="$d"
done
[ -z "$CHOSEN_CUDA" ] && say "- nvcc: none with CUDA major $WANT_MAJOR (torch's): the CUDA kernels cannot be built here"

# ---- build -------------------------------------------------------------------
CUDA_BUILT=0
if [ "${GPU_CHECK_BUILD:-1}" = 0 ]; then
  not_run build "GPU_CHECK_BUILD=0: using what imports"
elif [ "${HAS_GPU:-0}" = 1 ]; then
  if [ -n "$CHOSEN_CUDA" ] && stage "build (CUDA + CPU kernels)" build.log - 240 \
    env AMP_ENGINE_CUDA=1 CUDA_HOME="$CHOSEN_CUDA" PATH="$CHOSEN_CUDA/bin:$PATH" \
    TORCH_CUDA_ARCH_LIST="$GPU_ARCH" MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace; then
    CUDA_BUILT=1
  else
    [ -z "$CHOSEN_CUDA" ] && not_run "build (CUDA + CPU kernels)" "FAILED: no nvcc with CUDA major $WANT_MAJOR"
    FAILED=1
    rm -rf build
    stage "build fallback (CPU only)" build.log - 150 \
      env AMP_ENGINE_CUDA=0 MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace
  fi
else
  stage "build (CPU only: no GPU)" build.log - 240 \
    env AMP_ENGINE_CUDA=0 MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace
fi
INFO="$("$PY" -c 'import json, amp_engine; print(json.dumps(amp_engine.build_info()))' 2>>"$OUTDIR/build.log")"
say "- build_info: ${INFO:-amp_engine does not import (see build.log)}"
if [ "${HAS_GPU:-0}" = 1 ]; then
  if echo "$INFO" | grep -q '"cuda_kernels": true'; then
    say "- GPU check: the compiled CUDA kernels are loaded"
  else
    say "- **GPU CHECK FAILED: the CUDA kernels were not built or do not load**; the stages below ran on a CPU-only build (Triton and the reference on the GPU)"
    FAILED=1
  fi
fi

# ---- smoke (no pytest needed) ------------------------------------------------
stage smoke smoke.log - 90 "$PY" scripts/gpu_check/smoke.py

# ---- tests -------------------------------------------------------------------
BENCHES=()
if [ "${HAS_GPU:-0}" = 1 ]; then
  for b in benchmarks/bench_ops.py benchmarks/bench_scaler.py benchmarks/bench_optim.py benchmarks/bench_train.py; do
    [ -f "$b" ] && BENCHES+=("$b")
  done
elif [ -f benchmarks/bench_ops.py ]; then
  BENCHES=(benchmarks/bench_ops.py)
fi
BENCH_EACH=45
LAUNCHES_S=45  # op_count --launches on the GPU (24 tensors)
PYTEST=("$PY" -m pytest -q -ra -p no:cacheprovider --maxfail=50)
if [ $HAS_PYTEST = 0 ]; then
  not_run "cuda tests" "pytest is missing"
  not_run "rest of the tests" "pytest is missing"
elif [ "${HAS_GPU:-0}" = 1 ]; then
  # TRITON_INTERPRET=0: the real GPU Triton (tests/conftest.py would turn the interpreter on)
  stage "cuda tests" pytest_cuda.log junit_cuda.xml 200 \
    env TRITON_INTERPRET=0 "${PYTEST[@]}" tests -m "cuda and not slow" --junitxml="$OUTDIR/junit_cuda.xml"
  REST=$(($(time_left) - 20 - BENCH_EACH * ${#BENCHES[@]} - LAUNCHES_S))
  stage "rest of the tests" pytest_rest.log junit_rest.xml "$REST" \
    env TRITON_INTERPRET=0 "${PYTEST[@]}" tests -m "not cuda and not slow" --junitxml="$OUTDIR/junit_rest.xml"
else
  not_run "cuda tests" "no GPU"
  if [ "${GPU_CHECK_FULL:-0}" = 1 ]; then
    SEL=(tests)
  else  # a smoke subset: keeps the CPU run (CI) short
    SEL=(tests/test_build.py tests/scaler/test_api.py tests/ops/test_dispatch.py tests/ops/test_triton_tables.py)
  fi
  stage "rest of the tests (no GPU: $([ "${GPU_CHECK_FULL:-0}" = 1 ] && echo all || echo smoke subset))" \
    pytest_rest.log junit_rest.xml 240 "${PYTEST[@]}" "${SEL[@]}" -m "not slow" --junitxml="$OUTDIR/junit_rest.xml"
fi

# ---- benchmarks (quick) --------------------------------------------------------
DEV=$([ "${HAS_GPU:-0}" = 1 ] && echo cuda || echo cpu)
for b in "${BENCHES[@]}"; do
  name="$(basename "$b" .py)"
  mkdir -p "$OUTDIR/bench/$name"
  stage "$name --quick ($DEV)" bench.log - "$BENCH_EACH" "$PY" "$b" --quick --device "$DEV" --output "$OUTDIR/bench/$name"
done
# launches per step on the GPU (profiler: kernels, memcpys, memsets) beside torch's
if [ "${HAS_GPU:-0}" = 1 ]; then
  stage "launches per step (cuda)" launches.log - "$LAUNCHES_S" "$PY" -m amp_engine.bench.op_count --device cuda --launches --sizes 24
fi
# the tables inline, readable without opening the folders
find "$OUTDIR/bench" -type f -name '*.md' -size -200k 2>/dev/null | sort | while read -r f; do
  printf '\n===== %s =====\n' "${f#"$OUTDIR"/}"; cat "$f"
done >>"$OUTDIR/bench.log"

say "- total $(($(date +%s) - START)) s of a ${BUDGET_S} s budget; $([ "$FAILED" = 0 ] && echo 'ALL STAGES PASSED' || echo '**SOME STAGES FAILED**')"
"$PY" scripts/gpu_check/report.py "$OUTDIR" >/dev/null || cp "$HEADER" "$OUTDIR/summary.md"
echo "summary: $OUTDIR/summary.md"
exit "$FAILED"
