#!/usr/bin/env bash
# One short GPU session: the MoE-layer benchmark, GPU correctness tests, and bf16 pre-training
# runs of tiny-zh and base. Usage: bash benchmarks/gpu_check.sh OUT_DIR
# SRC / BENCH / TESTS point at a snapshot of the tree when the working copy is being edited.
set -u
out=${1:?usage: gpu_check.sh OUT_DIR}
src=${SRC:-src}
bench=${BENCH:-benchmarks}
tests=${TESTS:-tests}
mkdir -p "$out"
export PYTHONPATH="$PWD/$src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"

timeout 300 python3 "$bench/moe_layer.py" --device cuda --dtype bf16 --shapes gpu --json \
  > "$out/moe_layer_gpu.json" 2> "$out/moe_layer_gpu.err"
echo "moe_layer rc=$?"; tail -3 "$out/moe_layer_gpu.err"

timeout 120 python3 -m pytest -q -p no:cacheprovider "$tests/test_gpu.py" 2>&1 | tail -15 | tee "$out/test_gpu.txt"

run_pretrain() {  # name, timeout, args...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  rm -rf "/tmp/gpu-$name"  # a rerun on a warm machine: pretrain refuses a folder holding a run
  timeout "$limit" python3 -m myriad pretrain --out "/tmp/gpu-$name" "$@" \
    > "$out/pretrain_$name.txt" 2>&1
  echo "pretrain $name rc=$? wall $((SECONDS - start)) s"; tail -14 "$out/pretrain_$name.txt"
  tail -1 "/tmp/gpu-$name/metrics.jsonl" 2>/dev/null
}
run_pretrain tiny-zh 120
run_pretrain base 150 --recipe base --set train.steps=30 --set train.eval_every=15 \
  --set train.eval_batches=4 --set train.checkpoint_every=1000
