#!/usr/bin/env bash
# Issue 8 on a machine with 2 GPUs: DDP training scaling and batch-sharded decoding of the paper-size
# model (experiments/wmt14_ende.yaml, multi-head and multi-query rows). Run from the repository root with
# the spec's prepared data in data/wmt14_ende. Writes everything under ${OUT:-out}/ (a tarball of the run
# directories plus the decode-bench JSON) and prints a summary; scripts/ddp_summary.py turns the logs into
# results/multi_gpu/<device>/summary.json.
set -euo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
SPEC=${SPEC:-experiments/wmt14_ende.yaml}
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu (gloo) for a dry run of the script on a CPU
STEPS=${STEPS:-200}
# Dropout off so that the 1-GPU and 2-GPU runs at the same global batch compute the same function;
# a short warm-up so that a few hundred steps move the loss.
COMMON=(--set training.steps=$STEPS --set training.warmup_steps=100 --set training.log_every=10
        --set training.eval_every=100000 --set training.checkpoint_every=100000
        --set model.dropout.residual=0 --set model.dropout.attention=0 --set model.dropout.relu=0)
run() {  # name nproc batch_tokens variant
  local name=$1 nproc=$2 tokens=$3 variant=$4
  if [ "$SECONDS" -gt "$BUDGET_S" ]; then echo "== $name: skipped (time budget)"; return; fi
  local args=(train $SPEC --variant "$variant" --device $DEVICE "${COMMON[@]}" --set training.batch_tokens=$tokens
              --out "$OUT/runs/$name" --checkpoints /tmp/ckpt/$name)
  echo "== $name: $nproc GPU(s), $tokens target tokens per step, $variant"
  if [ "$nproc" = 1 ]; then python3 -m mqa_repro "${args[@]}"
  else python3 -m torch.distributed.run --standalone --nproc_per_node=$nproc -m mqa_repro "${args[@]}"; fi
}
if [ "$DEVICE" = cuda ] && [ "${DECODE:-1}" = 1 ]; then   # DECODE=0: training only
  # Decoding with the batch split over the two GPUs, each holding whole sequences (Pope et al. shard a
  # multi-query cache over the batch): one process per GPU, both at once, each timing its half.
  BENCH=(decode-bench $SPEC --variant multi_head --variant multi_query --beam 1 --no-train --src-len 128 --tgt-len 128)
  python3 -m mqa_repro "${BENCH[@]}" --batch-size 1024 --out "$OUT/decode_1gpu_b1024.json"
  CUDA_VISIBLE_DEVICES=0 python3 -m mqa_repro "${BENCH[@]}" --batch-size 512 --no-check --out "$OUT/decode_shard0_b512.json" &
  CUDA_VISIBLE_DEVICES=1 python3 -m mqa_repro "${BENCH[@]}" --batch-size 512 --no-check --out "$OUT/decode_shard1_b512.json" &
  wait
fi
BUDGET_S=${BUDGET_S:-100000}   # start no new training run after this many seconds
for v in ${VARIANTS:-multi_query multi_head}; do
  run "${v}_1gpu_16k" 1 16384 $v     # per-GPU batch 16k on one GPU
  run "${v}_2gpu_32k" 2 32768 $v     # per-GPU batch 16k on two GPUs: tokens/s should be ~2x
  # same global batch as the 2-GPU run: the loss curves should match (SAME_BATCH=0 skips it)
  if [ "${SAME_BATCH:-1}" = 1 ]; then run "${v}_1gpu_32k" 1 32768 $v; fi
done
tar czf "$OUT/runs.tgz" -C "$OUT" runs
python3 scripts/ddp_summary.py "$OUT/runs" "$OUT" --out "$OUT/summary.json"
