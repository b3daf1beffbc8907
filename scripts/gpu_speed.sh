#!/usr/bin/env bash
# The GPU work of issues 19 and 16 in named steps, run from the repository root on the device:
#   bash scripts/gpu_speed.sh env tests matrix parity120b moe moebwd attention
# Each step has its own time limit (seconds, STEP_S=...) and writes its log and tables to $RES (default
# /root/gpu-speed, kept while the machine stays warm); after every step $RES is packed into
# $OUT/results.tar.gz, so a call cut off at its limit still returns the steps it finished. Steps:
#   env        date, GPU, driver, python/torch/cuda/triton/transformers, FlashAttention-4 if it imports
#   tests      pytest -m gpu tests (kernels incl. the fused MoE backward, parity, streaming, MXFP4 decode),
#              then tests/kernels/test_moe.py on the GPU (its interpreter grid in fp32/fp16/bf16)
#   matrix     gptoss-verify matrix on cuda: ours (reference, fused), transformers eager, flex_attention
#              attention and grouped_mm experts, openai-torch (where gpt_oss is on PYTHONPATH)
#   parity120b gpt-oss-120b, all 36 layers at full width, seq 4096, bf16, --stream-layers, typical weights
#   moe        scripts/bench_moe.py: E = 32, 128 x T = 1, 16 (CUDA graph), 4096, with the peers
#   moesweep   scripts/bench_moe.py --sweep at T = 1 and 4 (the slot GEMVs' tiles against the row-block GEMMs)
#   moebwd     scripts/bench_moe.py --backward: forward against forward + backward, E = 32, T = 4096
#   moeprofile scripts/bench_moe.py --profile: device time per kernel of ours, E = 32, 128 x T = 1, 16, 4096
#   moebwdprofile  the same for forward + backward (bf16 experts), E = 32, T = 4096
#   matrixmc   the matrix with the feature probes and the Megatron-Core subject (megatron and gpt_oss carried as
#              source on PYTHONPATH): ours, transformers eager, openai-torch, megatron-core on one GPU
#   attntests  tests/kernels/test_attention.py on the GPU (every shape of the interpreter grid, bf16 too)
#   partests   the GPU tests, tests/kernels/test_moe.py and tests/kernels/test_attention.py as five pytest
#              processes at once (the device has no pytest-xdist; Triton compiling on the CPU dominates)
#   tunedecode scripts/tune_attention.py --decode: decode tiles x key splits replayed as CUDA graphs
#   moebwdsweep    scripts/bench_moe.py --backward-sweep: fwd + bwd per backward tile shape (BWD_SWEEP),
#              E = 32, T = 4096, with the sm_90 compile stats of the default (compile_moe_backward.py)
#   attention  scripts/bench_attention.py: the cases of issue 19 with FlashAttention-4 (flex left out: its
#              compile per case costs minutes of device time; its rows are in reports/gpu-2026-12-02-h200)
set -u -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/gpu-speed-out}
RES=${RES:-/root/gpu-speed}
mkdir -p "$OUT" "$RES"
pack() {
  tar -czf "$OUT/results.tar.gz.tmp" -C "$RES" . && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
  cp "$RES/summary.txt" "$OUT/summary.txt" 2>/dev/null
}
note() { echo "$*" | tee -a "$RES/summary.txt"; }
step() {  # name, limit (s), command...: run it with its log in $RES/NAME.log, note rc and wall time
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s.%N)
  timeout "$limit" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  note "$(date -u +%H:%M:%S) $name rc=$rc wall=$(python3 -c "print(f'{$(date +%s.%N)-$t0:.1f}')")s (limit ${limit}s)"
  tail -n "${TAIL:-6}" "$RES/$name.log"
  pack
}
for s in "$@"; do
  case $s in
    env)
      { date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
        python3 -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
        python3 -c "import flash_attn.cute, importlib.metadata as m; print('flash-attn-4', m.version('flash-attn-4'), 'nvidia-cutlass-dsl', m.version('nvidia-cutlass-dsl'))" 2>&1 | tail -1
      } > "$RES/env.txt" 2>&1; cat "$RES/env.txt"; pack ;;
    tests)
      step gpu-tests ${TESTS_S:-240} python3 -m pytest -m gpu tests -q -rfE -p no:cacheprovider --timeout 200 \
        --durations=12 -s
      step gpu-tests-moe ${TESTS_MOE_S:-120} python3 -m pytest tests/kernels/test_moe.py -q -rfE -p no:cacheprovider \
        --timeout 100 ;;
    matrix)
      step matrix ${MATRIX_S:-200} python3 -m gptoss_verify.cli matrix --device cuda --subject reference \
        --subject fused --subject hf-eager --subject hf:flex_attention:eager --subject hf:eager:grouped_mm \
        --subject openai-torch --report "$RES/matrix-gpu.md" --json "$RES/matrix-gpu.json" ;;
    matrixmc)
      step matrix-megatron ${MATRIXMC_S:-360} python3 -m gptoss_verify.cli matrix --device cuda --subject reference \
        --subject fused --subject hf-eager --subject openai-torch --subject megatron-core \
        --report "$RES/matrix-gpu-megatron.md" --json "$RES/matrix-gpu-megatron.json" ;;
    attntests)
      step gpu-tests-attention ${ATTNTESTS_S:-150} python3 -m pytest tests/kernels/test_attention.py -q -rfE \
        -p no:cacheprovider --timeout 100 ;;
    partests)
      t0=$(date +%s); pids=()
      run_part() { timeout "${PARTESTS_S:-240}" python3 -m pytest "$@" -q -rfE -p no:cacheprovider --timeout 200; }
      run_part -m gpu tests > "$RES/gpu-tests.log" 2>&1 & pids+=($!)
      run_part tests/kernels/test_moe.py > "$RES/gpu-tests-moe.log" 2>&1 & pids+=($!)
      for sel in small decode realistic "not small and not decode and not realistic"; do
        run_part tests/kernels/test_attention.py -k "$sel" > "$RES/gpu-tests-attention-${sel// /-}.log" 2>&1 &
        pids+=($!)
      done
      rcs=""; for p in "${pids[@]}"; do wait "$p"; rcs="$rcs $?"; done
      note "$(date -u +%H:%M:%S) partests rc=[$rcs ] wall=$(( $(date +%s) - t0 ))s"
      tail -n 2 "$RES"/gpu-tests*.log; pack ;;
    tunedecode)
      TAIL=40 step tune-decode ${TUNEDECODE_S:-240} python3 scripts/tune_attention.py --decode \
        --out "$RES/decode-tune.md" ;;
    parity120b)
      nvidia-smi --query-gpu=memory.used --format=csv,noheader -lms 500 > "$RES/parity-120b-memory.csv" 2>&1 &
      smi=$!
      step parity-120b ${PARITY_S:-300} python3 -m gptoss_verify.cli parity --preset gpt-oss-120b --device cuda \
        --dtype bfloat16 --seq 4096 --batch 1 --profile typical --stream-layers \
        --report "$RES/parity-120b-bf16-stream.md" --json "$RES/parity-120b-bf16-stream.json"
      kill $smi 2>/dev/null
      note "peak memory.used during parity-120b: $(sort -n "$RES/parity-120b-memory.csv" | tail -1)"; pack ;;
    moe)
      TAIL=30 step moe-bench ${MOE_S:-240} python3 scripts/bench_moe.py --experts 32 128 --tokens 1 16 4096 \
        --out "$RES/moe-bench.md" ;;
    moesweep)
      TAIL=20 step moe-sweep ${MOESWEEP_S:-180} python3 scripts/bench_moe.py --sweep --experts 32 128 --tokens 1 4 \
        --sweep-budget $(( ${MOESWEEP_S:-180} - 20 )) --out "$RES/moe-sweep.md" ;;
    moebwd)
      TAIL=12 step moe-backward ${MOEBWD_S:-120} python3 scripts/bench_moe.py --backward --experts 32 --tokens 4096 \
        --out "$RES/moe-backward.md" ;;
    moeprofile)
      TAIL=4 step moe-profile ${MOEPROF_S:-120} python3 scripts/bench_moe.py --profile --experts 32 128 \
        --tokens 1 16 4096 --out "$RES/moe-profile.md" ;;
    moebwdprofile)
      TAIL=16 step moe-backward-profile ${MOEBWDPROF_S:-90} python3 scripts/bench_moe.py --profile --backward \
        --experts 32 --tokens 4096 --out "$RES/moe-backward-profile.md" ;;
    moebwdsweep)
      TAIL=12 step moe-backward-compile 120 python3 scripts/compile_moe_backward.py
      TAIL=14 step moe-backward-sweep ${MOEBWDSWEEP_S:-240} python3 scripts/bench_moe.py --backward-sweep \
        --experts 32 --tokens 4096 --sweep-budget $(( ${MOEBWDSWEEP_S:-240} - 30 )) \
        --out "$RES/moe-backward-sweep.md" ;;
    attention)
      TAIL=60 step attention-bench ${ATTN_S:-360} python3 scripts/bench_attention.py --skip flex \
        --cases "causal S=4096" "causal S=16384" "window 128 S=4096" "window 128 S=65536" \
                "decode B=64 KV=8192" "decode B=1 KV=131072" --out "$RES/attention-bench.md" ;;
    *) note "unknown step $s" ;;
  esac
done
