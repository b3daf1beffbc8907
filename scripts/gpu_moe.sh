#!/bin/bash
# One device call for the fused MoE: GPU tests, the benchmark table, a tile sweep, a per-kernel profile.
# Usage on the GPU box, from the repository root: bash scripts/gpu_moe.sh [tests|bench|sweep|profile ...]
# Logs and tables land in $OUT (default /tmp/moe-out); each step has its own time limit (TESTS_S, ...).
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
    tests) timeout ${TESTS_S:-240} python3 -m pytest -m gpu tests/kernels -q -rfE -p no:cacheprovider --timeout 120 \
             --durations=10 2>&1 | tee "$OUT/moe-gpu-tests.log"
           timeout ${TESTS_S:-240} python3 -m pytest tests/kernels/test_moe.py -q -rfE -p no:cacheprovider --timeout 120 \
             2>&1 | tee -a "$OUT/moe-gpu-tests.log" ;;
    bench) timeout ${BENCH_S:-200} python3 scripts/bench_moe.py --out "$OUT/moe-bench.md" > "$OUT/moe-bench.log" 2>&1
           tail -30 "$OUT/moe-bench.md" ;;
    sweep) timeout ${SWEEP_S:-180} python3 scripts/bench_moe.py --sweep --sweep-budget $(( ${SWEEP_S:-180} - 25 )) \
             --out "$OUT/moe-sweep.md" > "$OUT/moe-sweep.log" 2>&1; tail -40 "$OUT/moe-sweep.md" ;;
    profile) timeout ${PROFILE_S:-120} python3 scripts/bench_moe.py --profile --experts 32 128 --tokens 1 16 4096 \
             --out "$OUT/moe-profile.md" > "$OUT/moe-profile.log" 2>&1; cat "$OUT/moe-profile.md" ;;
  esac
  echo "== $step exit $?" | tee -a "$OUT/moe-env.txt"
done
