#!/usr/bin/env bash
# The decoding engine's GPU results (issue 16) on one GPU: Table 2 at the paper's shape timed on the engine's
# fixed-length mode (with the Hugging Face peer), and translation throughput on WMT14 newstest2014 (3,003 real
# sentences, EOS on; random weights, so each output is forced to its reference's length) at 1024 and 32
# sentences per batch, greedy and beam 4, beside CTranslate2 running the same weights on the same sentences.
#
# Run from the repository root with the spec's prepared data in data/wmt14_ende (`mqa-repro prepare
# experiments/wmt14_ende.yaml`). CTranslate2 (`pip install 'mqa-repro[ct2]'`) must import; its CUDA 12 build
# runs on a CUDA 13 machine with libcublas.so.13 linked as libcublas.so.12 on LD_LIBRARY_PATH. Set
# MQA_REPRO_GIT_SHA where the tree has no git history. Writes table2.json and real_newstest2014_<variant>.json
# (each with its provenance) and their logs to ${OUT_DIR:-results/bench/h200}; STAGES picks (table2 real);
# GPUS=2 runs the real stage's two variants at once on two GPUs.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT_DIR=${OUT_DIR:-results/bench/h200}
mkdir -p "$OUT_DIR"
B="python3 -m mqa_repro decode-bench experiments/wmt14_ende.yaml"
STACKS="import faulthandler, runpy, sys
faulthandler.dump_traceback_later(${STACKS_EVERY:-60}, repeat=True)
sys.argv[0] = 'mqa_repro'
runpy.run_module('mqa_repro', run_name='__main__', alter_sys=True)"
ROWS="--variant multi_head --variant multi_query --variant multi_head_local --variant multi_query_local
      --variant gqa2 --variant gqa4"
for stage in ${STAGES:-table2 real}; do
  case $stage in
    table2)   # shellcheck disable=SC2086
      timeout ${T2_TIMEOUT:-330} $B $ROWS --no-train --peer hf --out "$OUT_DIR/table2.json" 2>&1 |
        tee "$OUT_DIR/table2.log"
      echo "table2 exit ${PIPESTATUS[0]}" ;;
    real)     # one file per variant, so that a variant cut short by its time limit loses only itself; with
              # GPUS=2 the two variants run at once, one per GPU. Every STACKS_EVERY seconds each process
              # prints where it is (faulthandler) into its log: what a slow row is doing.
      i=0
      for v in multi_head multi_query; do
        (CUDA_VISIBLE_DEVICES=$((i % ${GPUS:-1})) timeout ${REAL_TIMEOUT:-300} python3 -c "$STACKS" \
           decode-bench experiments/wmt14_ende.yaml --real --variant $v --peer ct2 \
           --out "$OUT_DIR/real_newstest2014_$v.json" > "$OUT_DIR/real_newstest2014_$v.log" 2>&1
         echo "real $v exit $?" | tee -a "$OUT_DIR/real_newstest2014_$v.log") &
        i=$((i + 1))
        [ "${GPUS:-1}" = 1 ] && wait
      done
      wait ;;
  esac
done
