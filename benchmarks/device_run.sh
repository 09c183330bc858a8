#!/usr/bin/env bash
# One lent-GPU session's work, in stages, logs under $OUT (or ./device_logs):
#   A: self-check, GPU suite (run 1), host overhead, cold start, float32 precision;  S: the suite alone
#   B: GPU suite (run 2), compute-sanitizer memcheck;  R: racecheck
#   C: benchmark table beside torchvision;  H: the deterministic backward's table
#   D: work order table, this tree and (carried in .gl/old) the one before;  F: FPN table
#   E: Nsight Compute metrics of the shipped RoIAlign kernels (Mask R-CNN 7x7 float32, both
#      layouts: work_order.py --once; CSV), and the PrRoIPool tables candidate with its stages
#   G: Nsight Compute of the FPN box head's backward kernel, this tree and .gl/old
#   P: PrRoIPool on issue 14's three cases (prroi_cases.py), this tree and .gl/old
#   L: Nsight Compute of the RoIAlign forwards (Mask R-CNN 7x7 float32, both layouts, beside
#      torchvision's): what bounds them, L2 and L1 throughput and sector counts included (CSV)
#      (WORK_ORDER_ARGS=--grouped: RoIs in image order; NCU_KERNELS=roi_align_backward: the
#      backwards, their atomics' L2 sectors and requests too)
# Several stages in one call: `for s in A F; do bash benchmarks/device_run.sh $s; done`.
# The suite runs with the larger hypothesis profile. The device has no nbclient/ipykernel: carry
# wheels in .whl/ (made here with `pip download nbclient nbformat ipykernel --python-version 3.12
# --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
# --only-binary=:all: -d .whl`, about 17 MB) so that the notebook test runs instead of skipping.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-device_logs}; mkdir -p "$out"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false NCCL_NVLS_ENABLE=0
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUPY_ROI_HYPOTHESIS_PROFILE=gpu
[ -d .whl ] && python3 -m pip install -q --no-index --find-links .whl nbclient nbformat ipykernel > "$out/pip.txt" 2>&1
# ties the logs to a tree (the device's copy has a stale .git)
find cupy_roi cuda_src tests examples benchmarks -type f \( -name '*.py' -o -name '*.cu' -o -name '*.cuh' \
  -o -name '*.ipynb' \) -not -path '*__pycache__*' | LC_ALL=C sort | xargs cat | sha1sum | tee "$out/tree.txt"
log() { echo "### $*"; }
case "${1:-A}" in
A)
  log versions; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/env.txt"
  python3 -m cupy_roi 2>&1 | tee "$out/selfcheck.txt"
  log suite run 1
  timeout 260 python3 -m pytest -q -rs -n 4 -p xdist -p no:cacheprovider --maxfail=30 2>&1 | tee "$out/pytest1.txt" | tail -40
  log overhead; timeout 120 python3 benchmarks/overhead.py --breakdown --compiled --reps 500 2>&1 | tee "$out/overhead.txt"
  log cold start; timeout 120 python3 benchmarks/cold_start.py 2>&1 | tee "$out/cold_start.txt"
  log precision; timeout 60 python3 benchmarks/prroi_precision.py 2>&1 | tee "$out/precision.txt"
  ;;
S)
  log suite
  timeout 260 python3 -m pytest -q -rs -n 4 -p xdist -p no:cacheprovider 2>&1 | tee "$out/pytest1.txt" | tail -8
  ;;
B)
  log suite run 2
  timeout 260 python3 -m pytest -q -rs -n 4 -p xdist -p no:cacheprovider 2>&1 | tee "$out/pytest2.txt" | tail -25
  log memcheck
  timeout 250 compute-sanitizer --tool memcheck --print-limit 20 python3 tests/sanitize_cases.py 2>&1 | tail -8 | tee "$out/memcheck.txt"
  ;;
C)
  log bench; timeout 260 python3 benchmarks/bench.py --graph --reps 10 --out "$out/bench.md" 2>&1 | tail -60
  ;;
H)
  log deterministic; timeout 230 python3 benchmarks/bench.py --skip-anchor --deterministic --graph --reps 10 \
    --out "$out/det.md" 2>&1 | tail -40
  ;;
D)
  log work order; timeout 200 python3 benchmarks/work_order.py --reps 10 > "$out/work_order.md" 2>&1; tail -25 "$out/work_order.md"
  if [ -d .gl/old ]; then  # the tree before this session's kernels (git archive <commit> cupy_roi cuda_src)
    log work order, before; PYTHONPATH="$PWD/.gl/old" timeout 200 python3 benchmarks/work_order.py --reps 10 \
      --label before > "$out/work_order_before.md" 2>&1; tail -25 "$out/work_order_before.md"
  fi
  ;;
F)
  log multi-scale; timeout 200 python3 benchmarks/multi_scale.py --graph --reps 10 --out "$out/multi_scale.md" 2>&1 | tail -30
  ;;
P)
  log prroi cases; timeout 200 python3 benchmarks/prroi_cases.py --reps 10 --layouts --out "$out/prroi_cases.md" 2>&1 | tail -18
  if [ -d .gl/old ]; then
    log prroi cases, before; PYTHONPATH="$PWD/.gl/old" timeout 200 python3 benchmarks/prroi_cases.py --reps 10 \
      --label before --layouts --out "$out/prroi_cases_before.md" 2>&1 | tail -18
  fi
  ;;
R)
  log racecheck
  timeout 300 compute-sanitizer --tool racecheck --print-limit 20 python3 tests/sanitize_cases.py 2>&1 | tail -8 | tee "$out/racecheck.txt"
  ;;
G)
  log ncu, FPN box head backward; m=gpu__time_duration.sum,lts__t_sectors_op_red.sum,lts__t_requests_op_red.sum,\
lts__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,smsp__inst_executed.sum,\
launch__registers_per_thread,dram__bytes_read.sum,dram__bytes_write.sum
  for tree in "$PWD" "$PWD/.gl/old"; do
    [ -d "$tree/cupy_roi" ] || continue
    PYTHONPATH="$tree" timeout 150 ncu --csv --metrics "$m" -k regex:multi_scale_roi_align_backward \
      python3 benchmarks/fpn_backward_once.py 2 2>/dev/null | grep -v "^==" | tee -a "$out/ncu_fpn.csv" \
      | awk -F'","' -v t="$tree" '{print t, $(NF-3), $(NF-2), $NF}'
  done
  ;;
L)
  m=gpu__time_duration.sum,lts__throughput.avg.pct_of_peak_sustained_elapsed,\
l1tex__throughput.avg.pct_of_peak_sustained_active,sm__throughput.avg.pct_of_peak_sustained_elapsed,\
smsp__issue_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,launch__registers_per_thread,\
sm__warps_active.avg.pct_of_peak_sustained_active,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sectors.sum,\
lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sector_hit_rate.pct,l1tex__t_sector_hit_rate.pct,\
l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,\
l1tex__data_pipe_lsu_wavefronts_mem_lg_cmd_read.sum,\
smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,\
smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio,lts__t_sectors_op_red.sum,lts__t_requests_op_red.sum
  kernels=${NCU_KERNELS:-roi_align_forward}
  log ncu, $kernels
  timeout 200 ncu --csv --metrics "$m" -k regex:$kernels python3 benchmarks/work_order.py --once ${WORK_ORDER_ARGS:-} \
    > "$out/ncu_$kernels.csv" 2> "$out/ncu_$kernels.err"; tail -3 "$out/ncu_$kernels.err"
  python3 - "$out/ncu_$kernels.csv" <<'PY'
import csv, sys
rows = [r for r in csv.reader(l for l in open(sys.argv[1]) if l.startswith('"'))]
head, body = rows[0], rows[1:]
k, m, u, v = (head.index(c) for c in ("Kernel Name", "Metric Name", "Metric Unit", "Metric Value"))
i = head.index("ID")
for r in body:
    print(r[i], r[k][:40], r[m], r[u], r[v])
PY
  ;;
E)
  metrics=launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active,\
sm__throughput.avg.pct_of_peak_sustained_elapsed,smsp__issue_active.avg.pct_of_peak_sustained_active,\
smsp__inst_executed.sum,gpu__time_duration.sum,dram__bytes_read.sum,lts__t_sector_hit_rate.pct,\
l1tex__t_sector_hit_rate.pct,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,\
l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,l1tex__throughput.avg.pct_of_peak_sustained_active,\
smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,\
smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio,\
smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio,\
smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio
  log ncu
  timeout 200 ncu --csv --metrics "$metrics" -k regex:roi_align python3 benchmarks/work_order.py --once ${WORK_ORDER_ARGS:-} \
    > "$out/ncu_roi_align.csv" 2> "$out/ncu_roi_align.err"; tail -3 "$out/ncu_roi_align.err"
  log tables; timeout 200 python3 benchmarks/prroi_tables.py --reps 10 --out "$out/prroi_tables.md" 2>&1 | tail -14
  ;;
esac
