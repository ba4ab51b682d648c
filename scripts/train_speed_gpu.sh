#!/usr/bin/env bash
# Issue 19 (training speed) and issue 16's evaluate timing on a machine with 2 GPUs, in one call:
#   GPU 0: this code trains Multi30k multi-head (seed 0, spec defaults: torch.compile and the fused optimizer
#          on CUDA), then scripts/evaluate_speed.py times that run's test sets on the engine and on the eager
#          reference path (BLEU of both);
#   GPU 1: the code before issue 19 (a `git archive` of $OLD_SHA in $OLD, with the same prepared arrays under
#          $OLD/data, its manifest in that code's format) trains the same run at the same time; then
#          decode-bench's training row at the paper's shape (wmt14_ende, multi-head and multi-query, bf16),
#          with and without torch.compile; then a profile of the compiled multi-head step.
# Each run is alone on its GPU. Run from the repository root with data/multi30k_ende and data/wmt14_ende
# prepared; MQA_REPRO_GIT_SHA set where the tree has no git history. Everything lands in $OUT_DIR.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT_DIR=${OUT_DIR:-out}
OLD=${OLD:-.carry/old}
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-420}
mkdir -p "$OUT_DIR" /tmp/ab
OUT_DIR=$(cd "$OUT_DIR" && pwd)   # absolute: the old code runs from inside $OLD
ROOT=$(pwd)
M30K=(train experiments/multi30k_ende.yaml --variant multi_head --seed 0)
(
  CUDA_VISIBLE_DEVICES=0 timeout "$TRAIN_TIMEOUT" python3 -m mqa_repro "${M30K[@]}" --data data/multi30k_ende \
    --out /tmp/ab/new --checkpoints /tmp/ab/ck_new > "$OUT_DIR/m30k_new.log" 2>&1
  echo "new train exit $?" >> "$OUT_DIR/m30k_new.log"
  CUDA_VISIBLE_DEVICES=0 timeout "${EVAL_TIMEOUT:-240}" python3 scripts/evaluate_speed.py \
    /tmp/ab/new/multi30k_ende/multi_head/seed0 --device cuda --data data/multi30k_ende \
    --out "$OUT_DIR/evaluate_speed_multi30k.json" > "$OUT_DIR/evaluate_speed.log" 2>&1
  echo "evaluate_speed exit $?" >> "$OUT_DIR/evaluate_speed.log"
) &
(
  (cd "$OLD" && MQA_REPRO_GIT_SHA=${OLD_SHA:-unknown} CUDA_VISIBLE_DEVICES=1 timeout "$TRAIN_TIMEOUT" python3 -m mqa_repro "${M30K[@]}" \
    --data data/multi30k_ende --out /tmp/ab/old --checkpoints /tmp/ab/ck_old > "$OUT_DIR/m30k_old.log" 2>&1
   echo "old train exit $?" >> "$OUT_DIR/m30k_old.log")
  B=(decode-bench experiments/wmt14_ende.yaml --variant multi_head --variant multi_query --beam 1 --no-check)
  CUDA_VISIBLE_DEVICES=1 timeout "${BENCH_TIMEOUT:-200}" python3 -m mqa_repro "${B[@]}" \
    --out "$OUT_DIR/train_step_compiled.json" > "$OUT_DIR/train_step.log" 2>&1
  echo "compiled exit $?" >> "$OUT_DIR/train_step.log"
  CUDA_VISIBLE_DEVICES=1 timeout "${BENCH_TIMEOUT:-200}" python3 -m mqa_repro "${B[@]}" --no-compile \
    --out "$OUT_DIR/train_step_eager.json" >> "$OUT_DIR/train_step.log" 2>&1
  echo "eager exit $?" >> "$OUT_DIR/train_step.log"
  PYTHONPATH=$ROOT CUDA_VISIBLE_DEVICES=1 timeout "${PROFILE_TIMEOUT:-120}" python3 scripts/profile_train_step.py \
    >> "$OUT_DIR/train_step.log" 2>&1
) &
wait
tar czf "$OUT_DIR/runs.tgz" -C /tmp/ab new old   # each run's manifest.json and train_log.jsonl
tail -n 3 "$OUT_DIR"/*.log
