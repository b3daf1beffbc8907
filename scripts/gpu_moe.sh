#!/bin/bash
# One device call for the fused MoE (issue 7): GPU tests, the benchmark table, a tile-shape sweep.
# Usage on the GPU box, from the repository root: bash scripts/gpu_moe.sh [tests|bench|sweep ...]
# Logs and tables land in $OUT (default /tmp/moe-out); each step has its own time limit.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/moe-out}
mkdir -p "$OUT"
steps=${*:-tests bench sweep}
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import sys, torch, triton, transformers; print(sys.version.split()[0], torch.__version__, triton.__version__, transformers.__version__)"
} 2>&1 | tee "$OUT/moe-env.txt"
for step in $steps; do
  case $step in
    tests) timeout ${TESTS_S:-200} python3 -m pytest tests/kernels/test_moe_gpu.py tests/kernels/test_moe.py \
             -q -rA -s -p no:cacheprovider --timeout 120 --durations=15 2>&1 | tee "$OUT/moe-gpu-tests.log" ;;
    bench) timeout ${BENCH_S:-160} python3 scripts/bench_moe.py --out "$OUT/moe-bench.md" 2>&1 | tee "$OUT/moe-bench.log" ;;
    sweep) timeout ${SWEEP_S:-45} python3 scripts/bench_moe.py --sweep --sweep-budget $(( ${SWEEP_S:-45} - 20 )) \
             --out "$OUT/moe-sweep.md" 2>&1 | tee "$OUT/moe-sweep.log" ;;
  esac
  echo "== $step exit $?" | tee -a "$OUT/moe-env.txt"
done
