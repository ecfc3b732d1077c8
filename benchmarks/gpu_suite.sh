#!/usr/bin/env bash
# The first GPU run in one prepared command, about 8 minutes on one H100. Everything lands in one
# folder, with SUMMARY.txt on top and results.json (the device, every measurement with the cost
# model's MODELLED prediction beside it):
#   1. build the CUDA kernels for this GPU, only when the installed ones do not load;
#   2. the self-test on the GPU: python -m hycam_ext --device cuda (fails, and the suite stops,
#      when CUDA is not usable: no GPU, a driver older than torch's CUDA);
#   3. compute-sanitizer memcheck, racecheck, synccheck and initcheck on the self-test's shapes
#      (bf16 and fp32), memcheck also on benchmarks/sanitize_case.py's odd shapes;
#   4. Nsight Compute metrics of our kernels at the design shape (one layer fwd+bwd, bf16,
#      T=8192 d=4096 K=4 r=16): duration, DRAM bytes, L2 sectors, global requests and sectors,
#      shared-memory wavefronts and bank conflicts, achieved occupancy;
#   5. the layer and each op timed (interleaved medians with quartiles) against the copy and
#      cuBLAS rates measured in the same process; results.json beside the model's prediction.
# A missing tool (compute-sanitizer, ncu) is skipped with a note. Each step has its own time limit
# inside a budget for the whole suite (SUITE_BUDGET_S, default 480 s).
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]     (default: $OUT, else benchmarks/results/gpu-<date>)
# Env: PYTHON (default .venv/bin/python when present, else python3), HYCAM_CUDA_ARCHS (default: this
# GPU's), FORCE_BUILD=1, SKIP_SANITIZER=1, SKIP_NCU=1, CUDA_TESTS=1 (also pytest -m cuda), BENCH=1
# (also benchmarks.bench --quick: the reference and torch.compile comparisons, a few minutes more).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-benchmarks/results/gpu-$(date +%F)}}
mkdir -p "$OUT"
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
case $PY in /*) ;; */*) PY="$PWD/$PY" ;; esac  # absolute: the self-test runs from $OUT
SUMMARY="$OUT/SUMMARY.txt"
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
T0=$(date +%s)
BUDGET=${SUITE_BUDGET_S:-480}
# limit STEP_MAX: the step's own limit, cut to what is left of the budget (at least 10 s)
limit() { local left=$(( BUDGET - ($(date +%s) - T0) )); [ "$left" -lt 10 ] && left=10; echo $(( $1 < left ? $1 : left )); }
status=0

note "hycam_ext GPU suite | $(date -u +%FT%TZ) | $(git rev-parse --short HEAD 2>/dev/null || echo no-git)"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
note "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null | head -1)"
note "python: $($PY --version 2>&1) | torch: $($PY -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>&1 | tail -1)"

# 0. no usable GPU (none visible, a driver older than torch's CUDA, a CPU-only torch): say why, stop
if ! reason=$($PY -c 'import sys, torch
if torch.cuda.is_available(): sys.exit(0)
from hycam_ext._selftest import cuda_unusable_reason
print(cuda_unusable_reason()); sys.exit(1)' 2>/dev/null); then
  note "CUDA not usable: ${reason:-torch cannot be imported}"
  note "suite status: FAIL (no GPU run)"; exit 1
fi

# 1. build only when the CUDA kernels do not load (or FORCE_BUILD=1)
if [ -n "${FORCE_BUILD:-}" ] || ! $PY -c 'import sys, torch, hycam_ext; sys.exit(0 if torch.cuda.is_available() and hycam_ext.ops.cuda_kernels_available() else 1)' 2>/dev/null; then
  if [ -z "${HYCAM_CUDA_ARCHS:-}" ]; then
    HYCAM_CUDA_ARCHS=$($PY -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")' 2>/dev/null || echo "80;90")
    export HYCAM_CUDA_ARCHS
  fi
  t=$(date +%s)
  if MAX_JOBS=${MAX_JOBS:-$(nproc)} timeout "$(limit 300)" $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    note "build: ok (sm_$HYCAM_CUDA_ARCHS, $(( $(date +%s) - t )) s)"
  else
    note "build: FAILED or timed out (see build.log)"; tail -n 40 "$OUT/build.log"; exit 1
  fi
  grep -E "ptxas info\s+: (Compiling entry|Used)|spill" "$OUT/build.log" >"$OUT/ptxas.txt" || true
  note "ptxas: $(grep -c 'Compiling entry' "$OUT/ptxas.txt") kernels compiled, $(grep -cE '[1-9][0-9]* bytes spill' "$OUT/ptxas.txt") with spills"
else
  note "build: the installed CUDA kernels load (FORCE_BUILD=1 rebuilds)"
fi

# 2. the self-test; CUDA unusable (no GPU, old driver) or a failed check stops here
repo=$PWD
(cd "$OUT" && PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" timeout "$(limit 120)" $PY -m hycam_ext --device cuda \
  --json selftest.json >selftest.txt 2>&1); rc=$?
note "self-test (python -m hycam_ext --device cuda): rc=$rc | $(grep -E 'self-test:|^FAIL' "$OUT/selftest.txt" | tail -n 1)"
if [ $rc -ne 0 ]; then
  note "suite status: FAIL (the self-test failed: nothing further is meaningful)"; exit 1
fi
if [ -n "${CUDA_TESTS:-}" ]; then
  timeout "$(limit 180)" $PY -m pytest -q -m cuda python_tests >"$OUT/pytest-cuda.txt" 2>&1; rc=$?
  note "tests (pytest -m cuda): rc=$rc | $(tail -n 1 "$OUT/pytest-cuda.txt")"
  [ $rc -eq 0 ] || status=1
fi

# 3. compute-sanitizer on the self-test's shapes
if [ -z "${SKIP_SANITIZER:-}" ]; then
  CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  if [ -n "$CS" ]; then
    for tool in memcheck racecheck synccheck initcheck; do
      timeout "$(limit 75)" "$CS" --tool "$tool" --error-exitcode 99 --target-processes all \
        $PY -m hycam_ext --device cuda --dtypes bf16,fp32 >"$OUT/sanitizer-$tool.txt" 2>&1; rc=$?
      note "compute-sanitizer $tool (self-test shapes): rc=$rc$([ $rc -eq 124 ] && echo ' (time limit: incomplete)') | $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer-$tool.txt" | tail -n 1)"
      [ $rc -eq 0 ] || status=1
    done
    timeout "$(limit 90)" "$CS" --tool memcheck --error-exitcode 99 $PY benchmarks/sanitize_case.py >"$OUT/sanitizer-memcheck-odd-shapes.txt" 2>&1; rc=$?
    note "compute-sanitizer memcheck (sanitize_case.py odd shapes): rc=$rc | $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer-memcheck-odd-shapes.txt" | tail -n 1)"
    [ $rc -eq 0 ] || status=1
  else
    note "compute-sanitizer: not found, skipped"
  fi
fi

# 4. Nsight Compute metrics of our kernels at the design shape
if [ -z "${SKIP_NCU:-}" ]; then
  NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  if [ -n "$NCU" ]; then
    METRICS=$($PY -c 'from benchmarks.gpu_suite_run import NCU_METRICS; print(",".join(NCU_METRICS))')
    timeout "$(limit 150)" "$NCU" --csv --metrics "$METRICS" \
      --kernel-name-base demangled --kernel-name 'regex:hycam::' --launch-skip 0 --launch-count 40 \
      $PY -m benchmarks.gpu_suite_run case >"$OUT/ncu.csv" 2>"$OUT/ncu.err"; rc=$?
    note "ncu: rc=$rc$([ $rc -eq 124 ] && echo ' (time limit: partial)') | $(grep -c '^"' "$OUT/ncu.csv") metric rows (ncu.csv)"
  else
    note "ncu (Nsight Compute): not found, skipped"
  fi
fi

# 5. the layer and the ops against the measured copy and cuBLAS rates; results.json
timeout "$(limit 150)" $PY -m benchmarks.gpu_suite_run measure "$OUT" >"$OUT/measure.txt" 2>&1; rc=$?
note "timing: rc=$rc"; cat "$OUT/measure.txt" >>"$SUMMARY"
[ $rc -eq 0 ] || status=1
if [ -n "${BENCH:-}" ]; then
  $PY -m benchmarks.bench --quick --device cuda --out "$OUT/bench" >"$OUT/bench.txt" 2>"$OUT/bench.err"; rc=$?
  note "benchmarks --quick: rc=$rc (bench/results.txt)"
  [ $rc -eq 0 ] || status=1
fi
# 6. vLLM on the GPU (benchmarks/README.md, "GPU checklist"): only where a vLLM venv with the CUDA
# kernels exists (VLLM_PY, default .venv-vllm/bin/python); the device machine reaches no package
# index, so it is skipped with a note otherwise. Decode throughput, base vs HyCAM, bf16, vLLM's
# compiled mode with CUDA graphs (the default) and eager.
VLLM_PY=${VLLM_PY:-.venv-vllm/bin/python}
if [ -x "$VLLM_PY" ] && (cd / && "$VLLM_PY" -c "import vllm, torch, hycam_ext; assert torch.cuda.is_available() and hycam_ext.ops.cuda_kernels_available()") >/dev/null 2>&1; then
  out_abs=$(cd "$OUT" && pwd)
  for mode in --compiled ""; do
    tag=$([ -n "$mode" ] && echo compiled || echo eager)
    (cd / && timeout "$(limit 120)" "$VLLM_PY" "$repo/benchmarks/vllm_decode.py" --tiny --dtype bfloat16 $mode \
      --json "$out_abs/vllm-decode-$tag.json") >"$OUT/vllm-decode-$tag.txt" 2>&1; rc=$?
    note "vLLM decode ($tag, bf16, tiny model): rc=$rc (vllm-decode-$tag.txt)"
  done
else
  note "vLLM: no vLLM venv with CUDA kernels at $VLLM_PY, skipped (benchmarks/README.md, GPU checklist)"
fi
note "elapsed: $(( $(date +%s) - T0 )) s of a ${BUDGET} s budget"
note "suite status: $([ $status -eq 0 ] && echo PASS || echo FAIL)"
$PY -m benchmarks.gpu_suite_run report "$OUT" >>"$SUMMARY" 2>&1 || status=1
exit $status
