#!/usr/bin/env bash
# One lent-GPU session's work, in stages, logs under $OUT (or ./device_logs):
#   A: self-check, GPU suite (run 1), host overhead, cold start, float32 precision
#   B: GPU suite (run 2), compute-sanitizer memcheck and racecheck, benchmark table
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-device_logs}; mkdir -p "$out"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false NCCL_NVLS_ENABLE=0
log() { echo "### $*"; }
case "${1:-A}" in
A)
  log versions; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/env.txt"
  python3 -m cupy_roi 2>&1 | tee "$out/selfcheck.txt"
  log suite run 1
  timeout 420 python3 -m pytest -q -rs -n 4 -p xdist --maxfail=30 2>&1 | tee "$out/pytest1.txt" | tail -40
  log overhead; timeout 120 python3 benchmarks/overhead.py --breakdown --compiled --reps 500 2>&1 | tee "$out/overhead.txt"
  log cold start; timeout 120 python3 benchmarks/cold_start.py 2>&1 | tee "$out/cold_start.txt"
  log precision; timeout 60 python3 benchmarks/prroi_precision.py 2>&1 | tee "$out/precision.txt"
  ;;
B)
  log suite run 2
  timeout 400 python3 -m pytest -q -rs -n 4 -p xdist 2>&1 | tee "$out/pytest2.txt" | tail -25
  log memcheck
  timeout 200 compute-sanitizer --tool memcheck --print-limit 20 python3 tests/sanitize_cases.py 2>&1 | tail -8 | tee "$out/memcheck.txt"
  log racecheck
  timeout 300 compute-sanitizer --tool racecheck --print-limit 20 python3 tests/sanitize_cases.py 2>&1 | tail -8 | tee "$out/racecheck.txt"
  ;;
C)
  log bench; timeout 420 python3 benchmarks/bench.py --graph --reps 20 --out "$out/bench.md" 2>&1 | tail -70
  [ -d .bench_src ] && timeout 120 python3 benchmarks/prroi_forward.py --source "v3 (cdf differences)=.bench_src/prroi_pool_v3.cu" 2>&1 | tee "$out/prroi_forward.txt"
  ;;
esac
