#!/usr/bin/env bash
# Issue 19's end-to-end criterion and issue 16's `evaluate` timing, in one call on a machine with 2 GPUs:
#   GPU 0: this code trains the spec's Multi30k multi-head run (seed 0; torch.compile, the fused optimizer and
#          the fused ReLU + dropout on CUDA by default); then scripts/evaluate_whole_speed.py times `evaluate`
#          of that run in fresh processes, the engine against the eager reference path;
#   GPU 1: the code before issue 19 (a `git archive` of $OLD_SHA in $OLD, the same prepared arrays under
#          $OLD/data) trains the same run at the same time.
# Each training run is alone on its GPU. Run from the repository root with data/multi30k_ende prepared;
# MQA_REPRO_GIT_SHA set where the tree has no git history. Everything lands in $OUT_DIR (5 files).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT_DIR=${OUT_DIR:-out}
OLD=${OLD:-.carry/old}
mkdir -p "$OUT_DIR" /tmp/ab
OUT_DIR=$(cd "$OUT_DIR" && pwd)   # absolute: the old code runs from inside $OLD
M30K=(train experiments/multi30k_ende.yaml --variant multi_head --seed 0)
RUN=/tmp/ab/new/multi30k_ende/multi_head/seed0
(
  CUDA_VISIBLE_DEVICES=0 timeout "${TRAIN_TIMEOUT:-330}" python3 -m mqa_repro "${M30K[@]}" --data data/multi30k_ende \
    --out /tmp/ab/new --checkpoints /tmp/ab/ck_new > "$OUT_DIR/m30k_new.log" 2>&1
  echo "new train exit $?" >> "$OUT_DIR/m30k_new.log"
  CUDA_VISIBLE_DEVICES=0 timeout "${EVAL_TIMEOUT:-130}" python3 scripts/evaluate_whole_speed.py "$RUN" --repeats 3 \
    --out "$OUT_DIR/evaluate_whole_speed.json" > "$OUT_DIR/evaluate_whole_speed.log" 2>&1
  echo "evaluate_whole_speed exit $?" >> "$OUT_DIR/evaluate_whole_speed.log"
) &
(
  cd "$OLD" && MQA_REPRO_GIT_SHA=${OLD_SHA:-unknown} CUDA_VISIBLE_DEVICES=1 timeout "${OLD_TRAIN_TIMEOUT:-450}" \
    python3 -m mqa_repro "${M30K[@]}" --data data/multi30k_ende --out /tmp/ab/old --checkpoints /tmp/ab/ck_old \
    > "$OUT_DIR/m30k_old.log" 2>&1
  echo "old train exit $?" >> "$OUT_DIR/m30k_old.log"
) &
wait
tar czf "$OUT_DIR/runs.tgz" -C /tmp/ab new old   # each run's manifest.json and train_log.jsonl
tail -n 2 "$OUT_DIR"/m30k_*.log
cat "$OUT_DIR/evaluate_whole_speed.log"
