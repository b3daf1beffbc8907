#!/usr/bin/env bash
# The lead's GPU batch (one device call): GPU-marked tests, then full-size parity on one GPU:
# gpt-oss-20b (all 24 layers, full width, seq 4096) with the reference and the fused backends,
# and gpt-oss-120b with as many layers as fit. Logs and reports go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, torch, transformers, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
python3 -m pytest -m gpu tests/foundation -q -p no:cacheprovider -rA 2>&1 | tail -30 > "$OUT/gpu-tests-foundation.log"
cat "$OUT/gpu-tests-foundation.log"
run_parity() {  # name, then parity args
  local name=$1; shift
  local t0=$(date +%s.%N)
  python3 -m gptoss_verify.cli parity --device cuda --report "$OUT/$name.md" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local t1=$(date +%s.%N)
  echo "$name rc=$rc wall=$(python3 -c "print(f'{$t1-$t0:.1f}')")s" | tee -a "$OUT/summary.txt"
  tail -3 "$OUT/$name.log"
}
run_parity parity-20b-bf16 --preset gpt-oss-20b --dtype bfloat16 --seq 4096 --batch 1 --profile typical
run_parity parity-20b-bf16-fused --preset gpt-oss-20b --dtype bfloat16 --seq 4096 --batch 1 --profile typical --backend fused
run_parity parity-120b-bf16 --preset gpt-oss-120b --layers ${LAYERS_120B:-8} --dtype bfloat16 --seq 4096 --batch 1 --profile typical
nvidia-smi --query-gpu=memory.used --format=csv >> "$OUT/summary.txt"
