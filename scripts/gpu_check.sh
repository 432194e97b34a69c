#!/usr/bin/env bash
# The one prepared command for a lent GPU machine (no network; torch, CUDA and
# Triton preinstalled; this repo as the working copy):
#
#   bash scripts/gpu_check.sh [OUTDIR]        # OUTDIR default ./gpu_check_out
#
# Records the machine, builds the op library in place against the installed
# torch (CUDA kernels for this GPU's architecture), runs a standalone smoke
# check of the CUDA kernels against the reference, the test suite (with the
# real GPU Triton, not the interpreter) and every benchmarks/bench_*.py. A
# failing step never stops the script: each step's exit code goes into
# OUTDIR/summary.txt. The whole run keeps within GPU_CHECK_BUDGET_S seconds
# (default 450; every step's timeout is cut to what is left). At most 8 files
# are written to OUTDIR: summary.txt env.log build.log smoke.log pytest.log
# junit.xml bench.log bench_results.tar.gz. Exit code: 0 if every step passed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUTDIR="${1:-./gpu_check_out}"
mkdir -p "$OUTDIR" && OUTDIR="$(cd "$OUTDIR" && pwd)" || exit 2
# The in-place build is imported from here by scripts that live elsewhere.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
BUDGET_S="${GPU_CHECK_BUDGET_S:-450}"
SUMMARY="$OUTDIR/summary.txt"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/amp_engine_gpu_check.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
FAILED=0
: >"$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }
time_left() { echo $((BUDGET_S - ($(date +%s) - START))); }

# run_step NAME LOG CAP_S CMD...: CMD under `timeout min(CAP_S, time left - 15)`,
# output appended to LOG (and shown), exit code recorded in the summary.
run_step() {
  local name=$1 log=$2 cap=$3
  shift 3
  local t=$(($(time_left) - 15))
  ((cap < t)) && t=$cap
  if ((t < 10)); then
    note "$(printf '%-30s rc=SKIP  (time budget spent)' "$name")"
    FAILED=1
    return 99
  fi
  local t0
  t0=$(date +%s)
  printf '\n===== %s (timeout %ss): %s =====\n' "$name" "$t" "$*" >>"$log"
  timeout -k 10 "$t" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  ((rc == 124 || rc == 137)) && echo "!!! $name: timed out after ${t}s" | tee -a "$log"
  note "$(printf '%-30s rc=%-4s %4ss  -> %s' "$name" "$rc" "$(($(date +%s) - t0))" "$(basename "$log")")"
  ((rc != 0)) && FAILED=1
  return "$rc"
}

COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo 'unknown (no git)')"
git rev-parse --git-dir >/dev/null 2>&1 && ! git diff --quiet 2>/dev/null && COMMIT="$COMMIT (+local changes)"
note "amp_engine gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $COMMIT"

# ---- 1. the machine -------------------------------------------------------
cat >"$SCRATCH/env.sh" <<'EOF'
set -x
nvidia-smi
nproc; free -g; df -h .
python -V
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'devices', torch.cuda.device_count()); print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
python -c "import triton; print('triton', triton.__version__)"
command -v nvcc && nvcc --version
echo "CUDA_HOME=${CUDA_HOME:-}"; ls -d /usr/local/cuda* 2>/dev/null
python -c "import setuptools; print('setuptools', setuptools.__version__)"
command -v ninja && ninja --version
python -c "import pytest; print('pytest', pytest.__version__)"
python -c "import hypothesis; print('hypothesis', hypothesis.__version__)"
python -c "import numpy, matplotlib; print('numpy', numpy.__version__, 'matplotlib', matplotlib.__version__)"
exit 0
EOF
run_step "env" "$OUTDIR/env.log" 60 bash "$SCRATCH/env.sh"

# ---- 2. build in place against the installed torch --------------------------
ARCH="$(python -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))' 2>/dev/null || echo 9.0)"
if ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDA_HOME:-}" ]; then
  # No nvcc on PATH: look for a toolkit root (bin/nvcc + include/cuda_runtime.h).
  SITE="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)"
  for d in /usr/local/cuda /usr/local/cuda-* /opt/cuda /opt/nvidia/cuda "$SITE/nvidia/cu13" "$SITE/nvidia/cuda_nvcc"; do
    if [ -x "$d/bin/nvcc" ] && [ -f "$d/include/cuda_runtime.h" ]; then
      export CUDA_HOME="$d" PATH="$d/bin:$PATH"
      break
    fi
  done
  echo "nvcc not on PATH; CUDA_HOME=${CUDA_HOME:-<none found>}" >>"$OUTDIR/build.log"
fi
note "TORCH_CUDA_ARCH_LIST=$ARCH CUDA_HOME=${CUDA_HOME:-auto} ninja=$(command -v ninja >/dev/null && echo yes || echo no)"
if ! run_step "build (CUDA + CPU kernels)" "$OUTDIR/build.log" 300 \
  env AMP_ENGINE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=16 python setup.py build_ext --inplace; then
  # Without the CUDA kernels the rest (CPU kernels, Triton on the GPU) is still worth a run.
  run_step "build fallback (CPU only)" "$OUTDIR/build.log" 150 \
    env AMP_ENGINE_CUDA=0 MAX_JOBS=16 python setup.py build_ext --inplace
fi
run_step "build_info" "$OUTDIR/build.log" 60 python -c "
import json, torch, amp_engine
print(json.dumps(amp_engine.build_info(), indent=1))
for op in ('unscale_and_check_', 'grad_norm_and_check', 'update_scale_'):
    keys = [l.split(':')[0] for l in torch._C._dispatch_dump('amp_engine::' + op).splitlines()[4:]]
    print(op, 'kernels:', keys)
assert amp_engine.build_info()['cuda_kernels'], 'CUDA kernels not registered'
"

# ---- 3. standalone smoke check (needs no pytest) ---------------------------
cat >"$SCRATCH/smoke.py" <<'EOF'
"""CUDA kernels vs the reference on the same CUDA tensors, plus two timings."""
import sys
import torch
import amp_engine  # noqa: F401  (loads the op library)
from amp_engine.ops.reference import scaling as reference

A = torch.ops.amp_engine
dev, ok = "cuda", True


def check(name, cond):
    global ok
    ok &= bool(cond)
    print(("PASS " if cond else "FAIL ") + name, flush=True)


def same(a, b):
    return torch.equal(a, b) or (a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan())
                                 and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))


def close(a, b):
    return a.shape == b.shape and torch.allclose(a, b, rtol=2e-6, atol=0, equal_nan=True)


torch.manual_seed(0)
for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
    sizes = (0, 1, 5, 123, 4097, 65539, 320 * 65536 + 4099, 70001)
    grads = [(torch.randn(n, dtype=torch.float64) * 1024).to(dtype).to(dev) for n in sizes]
    grads[4][7], grads[5][65538], grads[6][320 * 65536] = float("inf"), float("nan"), float("-inf")
    grads[7][5] = float("nan")
    grads[7] = grads[7][1:]  # misaligned view (storage offset 1): the scalar path
    inv = torch.tensor(1.0 / 3.0, device=dev)
    for per_tensor in (False, True):
        f1, c1 = torch.zeros((), device=dev), torch.zeros(len(grads), dtype=torch.int64, device=dev)
        f2, c2 = f1.clone(), c1.clone()
        t1, p1 = A.grad_norm_and_check(grads, inv, f1, c1, per_tensor)
        t2, p2 = reference.grad_norm_and_check(grads, inv, f2, c2, per_tensor)
        clean = grads[:4]
        t3, _ = A.grad_norm_and_check(clean, inv, torch.zeros((), device=dev), None, False)
        t4, _ = reference.grad_norm_and_check(clean, inv, torch.zeros((), device=dev), None, False)
        check(f"norm {dtype} per_tensor={per_tensor}: flag/counts/norms {c1.tolist()}",
              same(f1, f2) and same(c1, c2) and close(t1, t2) and close(p1, p2) and close(t3, t4))
    mine, ref = [g.clone() for g in grads], [g.clone() for g in grads]
    f1, c1 = torch.zeros((), device=dev), torch.zeros(len(grads), dtype=torch.int64, device=dev)
    f2, c2 = f1.clone(), c1.clone()
    A.unscale_and_check_(mine, inv, f1, c1)
    reference.unscale_and_check_(ref, inv, f2, c2)
    check(f"unscale {dtype}: bitwise grads, flag, counts {c1.tolist()}",
          all(same(a, b) for a, b in zip(mine, ref)) and same(f1, f2) and same(c1, c2))
    view = grads[7]  # in place on the misaligned view itself
    expect = view.clone()
    A.unscale_and_check_([view], inv, f1, None)
    reference.unscale_and_check_([expect], inv, f2, None)
    check(f"unscale {dtype}: misaligned view in place", same(view, expect))

state = [torch.full((), 1024.0, device=dev), torch.zeros((), dtype=torch.int32, device=dev),
         torch.full((), 2, dtype=torch.int32, device=dev)]
rstate = [t.clone() for t in state]
good = True
for step in range(300):
    f = torch.tensor(float((step // 40) % 2 and step % 7 != 0), device=dev)
    args = (f, 2.0, 0.5, 3, 2, 0.125, 2.0**20)
    A.update_scale_(*state, *args)
    reference.update_scale_(*rstate, *args)
    good &= all(torch.equal(a, b) for a, b in zip(state, rstate))
check(f"update_scale_ 300 steps (final scale {state[0].item()})", good)

# Two timings (CUDA events, median of 20): 100M fp32 in 400 tensors.
grads = [torch.randn(250_000, device=dev) for _ in range(400)]
inv, found = torch.ones((), device=dev), torch.zeros((), device=dev)
for name, fn in [("ours unscale_and_check_", lambda: A.unscale_and_check_(grads, inv, found, None)),
                 ("torch _amp_foreach_non_finite_check_and_unscale_",
                  lambda: torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv)),
                 ("ours grad_norm_and_check", lambda: A.grad_norm_and_check(grads, inv, found, None, False)),
                 ("torch _foreach_norm + vector_norm",
                  lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))]:
    times = []
    for _ in range(23):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    ms = sorted(times[3:])[10]
    moved = 400e6 * (2 if "unscale" in name else 1)
    print(f"TIME {name}: {ms:.3f} ms, {moved / ms / 1e6:.0f} GB/s", flush=True)
print("SMOKE", "OK" if ok else "FAILED")
sys.exit(0 if ok else 1)
EOF
run_step "smoke (kernels vs reference)" "$OUTDIR/smoke.log" 120 python "$SCRATCH/smoke.py"

# ---- 4. the test suite ------------------------------------------------------
BENCHES=(benchmarks/bench_*.py)
[ -e "${BENCHES[0]}" ] || BENCHES=()
RESERVE=$((75 * ${#BENCHES[@]}))  # keep time for the benchmarks
PYTEST_CAP=$(($(time_left) - 15 - RESERVE))
((PYTEST_CAP > 300)) && PYTEST_CAP=300
# TRITON_INTERPRET=0: the real GPU Triton (conftest would otherwise default to the
# interpreter); --maxfail rather than -x: one run should show every failure.
run_step "pytest" "$OUTDIR/pytest.log" "$PYTEST_CAP" \
  env AMP_ENGINE_REQUIRE_KERNELS=1 TRITON_INTERPRET=0 python -m pytest tests -q -ra --maxfail=30 \
  -p no:cacheprovider --junitxml="$OUTDIR/junit.xml"
note "  pytest: $(grep -E '[0-9]+ (passed|failed|error)' "$OUTDIR/pytest.log" | tail -1)"

# ---- 5. benchmarks ----------------------------------------------------------
for b in "${BENCHES[@]}"; do
  name="$(basename "$b" .py)"
  mkdir -p "$SCRATCH/bench/$name"
  run_step "$name" "$OUTDIR/bench.log" 120 python "$b" --device cuda --output "$SCRATCH/bench/$name"
done
if [ -d "$SCRATCH/bench" ] && [ -n "$(find "$SCRATCH/bench" -type f)" ]; then
  tar -czf "$OUTDIR/bench_results.tar.gz" -C "$SCRATCH" bench
  # the text results inline too, readable without unpacking
  find "$SCRATCH/bench" -type f \( -name '*.json' -o -name '*.md' -o -name '*.csv' \) -size -200k \
    -exec sh -c 'for f; do printf "\n===== %s =====\n" "${f#*/bench/}"; cat "$f"; done' _ {} + >>"$OUTDIR/bench.log"
fi

note "total $(($(date +%s) - START))s; $([ "$FAILED" = 0 ] && echo 'ALL STEPS PASSED' || echo 'SOME STEPS FAILED')"
note "files: $(cd "$OUTDIR" && ls | tr '\n' ' ')"
exit "$FAILED"
