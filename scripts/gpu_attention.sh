#!/usr/bin/env bash
# One device call for the fused attention: environment, GPU tests, tile sweep and/or benchmark.
# Usage: scripts/gpu_attention.sh [tests] [tune] [bench]   (results under $OUT)
set -u
OUT=${OUT:-/tmp/gpu-attention}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
  python3 -c "import sys, torch, triton, transformers; print(sys.version.split()[0], torch.__version__, triton.__version__, transformers.__version__)"; } > "$OUT/env.txt" 2>&1
for step in "$@"; do
  case $step in
    tests) timeout 240 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_attention.py > "$OUT/gpu-tests-attention.log" 2>&1
           tail -3 "$OUT/gpu-tests-attention.log" ;;
    tune)  timeout 330 python3 scripts/tune_attention.py --out "$OUT/attention-tune.md" > "$OUT/tune.log" 2>&1; tail -5 "$OUT/tune.log" ;;
    bench) timeout 400 python3 scripts/bench_attention.py --out "$OUT/attention-bench.md" > "$OUT/bench.log" 2>&1; tail -60 "$OUT/bench.log" ;;
    parity) timeout 200 python3 -m gptoss_verify.cli parity --device cuda --preset gpt-oss-20b --dtype bfloat16 \
              --seq 4096 --batch 1 --profile typical --backend fused --report "$OUT/parity-20b-bf16-fused.md" \
              > "$OUT/parity-20b-bf16-fused.log" 2>&1; echo "parity rc=$?"; tail -5 "$OUT/parity-20b-bf16-fused.log" ;;
  esac
done
