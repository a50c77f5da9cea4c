#!/usr/bin/env bash
# One short GPU session for the training engine (issue 4): the CUDA engine tests, then the
# 2.8 B dense model (and its MoE twin) under Myriad's engine with offload, FSDP2 +
# CPUOffloadPolicy and DeepSpeed ZeRO-2 / ZeRO-3 with CPU offload, in one run.
# Usage: [BUDGET_GB=31] bash benchmarks/gpu_engine.sh OUT_DIR [dense|moe|all] [STEPS]
# "dense" (the CUDA tests, then the dense model: about 8 minutes) and "moe" (about 3) fit one
# 10-minute command each; "all" runs both.
# DeepSpeed and its missing dependencies travel as wheels in .whl/ (see docs/engine.md).
set -u
out=${1:?usage: gpu_engine.sh OUT_DIR [dense|moe|all] [STEPS]}
part=${2:-all}
steps=${3:-4}
# Myriad's device budget: below FSDP2 + offload's 31.7 GB peak in the issue ("at no more GPU
# memory"); it covers everything the step allocates, activations included.
budget=${BUDGET_GB:-31}
mkdir -p "$out"
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
free -g | head -2 | tee -a "$out/gpu.txt"

if [ "$part" != moe ]; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_engine_cuda.py 2>&1 \
    | tail -15 | tee "$out/test_engine_cuda.txt"
fi

bench() {  # model, timeout, modes...
  local model=$1 limit=$2 start=$SECONDS; shift 2
  timeout "$limit" python3 benchmarks/engine.py --gpu --model "$model" --steps "$steps" \
    --budget-gb "$budget" --json "$out/engine_$model.json" --modes "$@" \
    > "$out/engine_$model.txt" 2>&1
  echo "engine $model rc=$? wall $((SECONDS - start)) s"; tail -12 "$out/engine_$model.txt"
}
# The dense model against every peer; the MoE twin against the best of each.
if [ "$part" != moe ]; then
  bench dense 360 none myriad-offload myriad-offload-bf16 myriad-offload-bf16-serial \
    fsdp2-offload fsdp2-offload-bf16 deepspeed-zero2-offload deepspeed-zero3-offload
fi
if [ "$part" != dense ]; then
  bench moe 200 none myriad-offload-bf16 fsdp2-offload-bf16 deepspeed-zero2-offload
fi
