#!/usr/bin/env bash
# The GPU half of the reproduction (issues 7, 8 and 9) on one machine with 4 GPUs, all at once:
#   GPUs 0-1, alone first: scripts/two_gpus.sh (DDP scaling and batch-sharded decoding, paper-size model);
#   GPU 3, alone first:    Table 2 at the paper's shape (decode-bench, wmt14_ende dimensions) and the sweeps;
#   every GPU, as it frees: the Multi30k grid (10 rows x 3 seeds: train, evaluate), the uptraining runs built on
#   each multi_head seed, and the lm1b_mini grid (6 rows x 2 seeds), several jobs per GPU.
# Run from the repository root with the prepared data in data/{multi30k_ende,lm1b_mini,wmt14_ende}. Results
# land in results/ as the tool writes them; the jobs' logs in $WORK/logs. Set MQA_REPRO_GIT_SHA (the tree
# copy on a lent machine has no git history). NVLink multicast stays off.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
WORK=${WORK:-/tmp/repro}
PER_GPU=${PER_GPU:-4}
SEEDS_MT=${SEEDS_MT:-"0 1 2"}
SEEDS_LM=${SEEDS_LM:-"0 1"}
BENCH_DIR=${BENCH_DIR:-results/bench/h200}
CK=$WORK/checkpoints
mkdir -p "$WORK/logs" "$BENCH_DIR"
M="python3 -m mqa_repro"

# ---- the job list ------------------------------------------------------------------------------
J=$WORK/jobs.txt
: > "$J"
MT=experiments/multi30k_ende.yaml
for s in $SEEDS_MT; do   # multi_head first: the uptraining runs wait for it
  echo "$M train $MT --variant multi_head --seed $s --device cuda --checkpoints $CK && $M evaluate results/multi30k_ende/multi_head/seed$s --device cuda" >> "$J"
done
for v in multi_query gqa2 gqa4 multi_head_local multi_query_local h1_dk128 h2_dk64 h4_dk32 h8_dk16; do
  for s in $SEEDS_MT; do
    echo "$M train $MT --variant $v --seed $s --device cuda --checkpoints $CK && $M evaluate results/multi30k_ende/$v/seed$s --device cuda" >> "$J"
  done
done
for s in $SEEDS_MT; do
  src=results/multi30k_ende/multi_head/seed$s
  for up in "1 mean 0.05" "1 mean 0.1" "2 mean 0.05" "2 mean 0.1" "1 first 0.05" "1 random 0.05"; do
    set -- $up
    name="multi_head_to_kv$1_$2_$(python3 -c "print(f'{100*$3:g}pct')")"
    echo "after $src/metrics.json :: $M uptrain $src --kv-heads $1 --method $2 --fraction $3 --device cuda --checkpoints $CK && $M evaluate results/multi30k_ende/$name/seed$s --device cuda" >> "$J"
  done
done
LM=experiments/lm1b_mini.yaml
for v in multi_head multi_query h1_dk128 h2_dk64 h4_dk32 h8_dk16; do
  for s in $SEEDS_LM; do
    echo "$M train $LM --variant $v --seed $s --device cuda --checkpoints $CK && $M evaluate results/lm1b_mini/$v/seed$s --device cuda" >> "$J"
  done
done
echo "== $(wc -l < "$J") jobs"

# ---- GPUs held alone first ---------------------------------------------------------------------
touch "$WORK/logs/gpu0.busy" "$WORK/logs/gpu1.busy" "$WORK/logs/gpu3.busy"
(
  CUDA_VISIBLE_DEVICES=0,1 OUT=$WORK/multi_gpu BUDGET_S=${BUDGET_S:-300} bash scripts/two_gpus.sh > "$WORK/logs/two_gpus.log" 2>&1
  echo "two_gpus.sh exit $?" >> "$WORK/logs/two_gpus.log"
  rm -f "$WORK/logs/gpu0.busy" "$WORK/logs/gpu1.busy"
) &
(
  export CUDA_VISIBLE_DEVICES=3
  B="$M decode-bench experiments/wmt14_ende.yaml"
  T2="--variant multi_head --variant multi_query --variant multi_head_local --variant multi_query_local --variant gqa2 --variant gqa4"
  {
    $B $T2 --peer hf --out "$BENCH_DIR/table2.json"
    $B --variant multi_head --variant multi_query --variant gqa4 --sweep batch --no-train --out "$BENCH_DIR/sweep_batch.json"
    $B --variant multi_head --variant multi_query --variant gqa4 --sweep length --no-train --out "$BENCH_DIR/sweep_length.json"
  } > "$WORK/logs/bench.log" 2>&1
  echo "bench exit $?" >> "$WORK/logs/bench.log"
  rm -f "$WORK/logs/gpu3.busy"
) &

python3 scripts/gpu_jobs.py "$J" --gpus 0,1,2,3 --per-gpu "$PER_GPU" --logs "$WORK/logs" 2>&1 | tee "$WORK/logs/jobs.log"
wait
echo "== all finished"
