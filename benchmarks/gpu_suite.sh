#!/usr/bin/env bash
# The whole GPU check in one call, on a CUDA machine with nothing but this repo and a
# preinstalled torch: build in place, run the test suite (CUDA cases included), run
# compute-sanitizer (memcheck, racecheck, initcheck, synccheck) on small odd shapes, run the
# --quick benchmarks. Everything lands in one folder, with SUMMARY.txt on top.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]      (default: $OUT, else benchmarks/results/gpu-<date>)
# Env: PYTHON (default python3), HYCAM_CUDA_ARCHS (default: this GPU's), SKIP_SANITIZER=1.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-benchmarks/results/gpu-$(date +%F)}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SUMMARY="$OUT/SUMMARY.txt"
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

note "hycam_ext GPU suite | $(date -u +%FT%TZ) | $(git rev-parse --short HEAD 2>/dev/null || echo no-git)"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
note "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
note "python: $($PY --version 2>&1) | torch: $($PY -c 'import torch; print(torch.__version__, torch.version.cuda)')"

if [ -z "${HYCAM_CUDA_ARCHS:-}" ]; then
  HYCAM_CUDA_ARCHS=$($PY -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")')
  export HYCAM_CUDA_ARCHS
fi
t0=$(date +%s)
if MAX_JOBS=${MAX_JOBS:-$(nproc)} $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  note "build: ok (sm_$HYCAM_CUDA_ARCHS, $(( $(date +%s) - t0 )) s)"
else
  note "build: FAILED (see build.log)"; tail -n 60 "$OUT/build.log"; exit 1
fi
grep -E "ptxas info\s+: (Compiling entry|Used)|spill" "$OUT/build.log" >"$OUT/ptxas.txt" || true
spills=$(grep -cE "[1-9][0-9]* bytes spill" "$OUT/ptxas.txt" || true)
note "ptxas: $(grep -c 'Compiling entry' "$OUT/ptxas.txt") kernels compiled, $spills with spills"
$PY -c 'import hycam_ext, sys; sys.exit(0 if hycam_ext.ops.cuda_kernels_available() else 1)' \
  || { note "CUDA kernels did not load"; exit 1; }

status=0
# first the user's one-command check: every op on the GPU in fp32/fp16/bf16 against float64
(repo=$PWD; cd "$OUT" && PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" $PY -m hycam_ext --json selftest.json >selftest.txt 2>&1); rc=$?
note "python -m hycam_ext: rc=$rc | $(tail -n 1 "$OUT/selftest.txt")"
[ $rc -eq 0 ] || status=1
$PY -m pytest -q -rs python_tests >"$OUT/pytest.txt" 2>&1; rc=$?
note "tests (all, CUDA included): rc=$rc | $(tail -n 1 "$OUT/pytest.txt")"
[ $rc -eq 0 ] || status=1
$PY -m pytest -q -m cuda python_tests >"$OUT/pytest-cuda-only.txt" 2>&1
note "tests (cuda-marked only): $(tail -n 1 "$OUT/pytest-cuda-only.txt")"

if [ -z "${SKIP_SANITIZER:-}" ]; then
  CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  if [ -n "$CS" ]; then
    for tool in memcheck racecheck initcheck synccheck; do
      timeout 900 "$CS" --tool "$tool" --error-exitcode 99 --target-processes all \
        $PY benchmarks/sanitize_case.py >"$OUT/sanitizer-$tool.txt" 2>&1; rc=$?
      note "compute-sanitizer $tool: rc=$rc | $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer-$tool.txt" | tail -n 1)"
      [ $rc -eq 0 ] || status=1
    done
  else
    note "compute-sanitizer: not found"
  fi
fi

$PY -m benchmarks.bench --quick --device cuda --out "$OUT/bench" >"$OUT/bench.txt" 2>"$OUT/bench.err"; rc=$?
note "benchmarks --quick: rc=$rc (bench/results.txt, bench/speedup.png)"
[ $rc -eq 0 ] || { status=1; tail -n 30 "$OUT/bench.err"; }
cat "$OUT/bench.txt" >>"$SUMMARY" 2>/dev/null
note "suite status: $([ $status -eq 0 ] && echo PASS || echo FAIL)"
exit $status
