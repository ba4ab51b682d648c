"""Summarise scripts/two_gpus.sh: training tokens/s on 1 vs 2 GPUs at the same per-GPU batch, the loss
curves of 1 and 2 GPUs at the same global batch, and batch-sharded decoding beside one GPU.

    python3 scripts/ddp_summary.py RUNS_DIR DECODE_DIR --out SUMMARY_JSON

Reads only the tool's own files (train_log.jsonl, manifest.json, the decode-bench JSON)."""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mqa_repro.provenance import manifest, write_json_atomic  # noqa: E402


def run_logs(runs: Path) -> dict:
    out = {}
    for d in sorted(p for p in runs.iterdir() if p.is_dir()):
        log = next(d.rglob("train_log.jsonl"))
        man = json.loads((log.parent / "manifest.json").read_text())
        recs = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
        steps = [r for r in recs if "loss" in r]
        out[d.name] = {"run_dir": str(log.parent.relative_to(runs)), "world_size": man.get("world_size"),
                       "device": man.get("device"), "git_sha": man.get("git_sha"), "spec_hash": man.get("spec_hash"),
                       "batch_tokens": man["spec"]["training"]["batch_tokens"],
                       "steps": [r["step"] for r in steps], "loss": [r["loss"] for r in steps],
                       # throughput after the first logged window (allocator warm-up, cuBLAS autotuning)
                       "tokens_per_s": statistics.median(r["tokens_per_s"] for r in (steps[1:] or steps)),
                       "dev_ln_ppl": man.get("dev_ln_ppl")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", type=Path)
    ap.add_argument("decode", type=Path, help="folder with decode_1gpu_b*.json and decode_shard{0,1}_b*.json")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--note", default="", help="appended to the summary's notes (how the runs were made)")
    a = ap.parse_args()
    runs = run_logs(a.runs)
    training = {}
    for v in ("multi_head", "multi_query"):
        one, two, same = runs.get(f"{v}_1gpu_16k"), runs.get(f"{v}_2gpu_32k"), runs.get(f"{v}_1gpu_32k")
        if not (one and two):
            continue
        same = same or {"loss": []}      # the same-global-batch run is optional (two_gpus.sh SAME_BATCH=0)
        n = min(len(two["loss"]), len(same["loss"]))
        rel = [abs(x - y) / y for x, y in zip(two["loss"][:n], same["loss"][:n])]
        training[v] = {
            "tokens_per_s_1gpu_per_gpu_batch_16k": one["tokens_per_s"],
            "tokens_per_s_2gpu_per_gpu_batch_16k": two["tokens_per_s"],
            "scaling_2gpu_over_1gpu": two["tokens_per_s"] / one["tokens_per_s"],
            "loss_curve_max_rel_diff_2gpu_vs_1gpu_same_global_batch": max(rel) if rel else None,
            "loss_first_last_2gpu": [two["loss"][0], two["loss"][-1]],
            "loss_first_last_1gpu_same_global_batch": [same["loss"][0], same["loss"][-1]] if n else None,
        }
    def greedy(path):
        d = json.loads(path.read_text())
        return d, {r["variant"]: r for r in d["rows"] if r["measure"] == "decoder" and r["beam"] == 1
                   and not r.get("sweep")}

    decoding, one_dev = {}, None
    ones = sorted(a.decode.glob("decode_1gpu_b*.json"))
    shards = sorted(a.decode.glob("decode_shard*_b*.json"))
    if ones and shards:
        one_res, one = greedy(ones[0])
        one_dev = one_res["provenance"]["device"]
        parts = [greedy(p)[1] for p in shards]
        for v, r in one.items():
            if not all(v in p for p in parts):
                continue
            # the GPUs decode their halves at the same time: the step ends when the slower one does
            slow = max(p[v]["median_s"] for p in parts)
            total = sum(p[v]["batch"] for p in parts)
            decoding[v] = {
                "batch": r["batch"], "src_len": r["src_len"], "tgt_len": r["tgt_len"],
                "us_per_token_1gpu": r["us_per_token"], "bound_us_per_token_1gpu": r["bound_us_per_token"],
                "us_per_token_2gpu_batch_sharded": slow * 1e6 / (total * r["tgt_len"]),
                "shard_median_s": [p[v]["median_s"] for p in parts], "shard_batch": [p[v]["batch"] for p in parts],
                "speedup_2gpu": r["median_s"] / slow,
            }
    summary = {"kind": "multi-gpu", "provenance": manifest(None, None, None), "training": training,
               "decoding": decoding, "runs": runs, "decode_device": one_dev, "notes": (
                   "training: DDP through torchrun, NCCL, bf16 autocast, dropout off; tokens/s = target tokens "
                   "per second over all GPUs, median of the logged windows after the first; decoding: greedy, "
                   "CUDA graphs; 2 GPUs = the batch split in halves, one decode-bench process per GPU running "
                   "at the same time, the slower half's median time over the whole batch's tokens"
                   + (f"; {a.note}" if a.note else ""))}
    write_json_atomic(a.out, summary)
    for v, t in training.items():
        print(f"{v}: {t['tokens_per_s_1gpu_per_gpu_batch_16k']:.0f} -> {t['tokens_per_s_2gpu_per_gpu_batch_16k']:.0f} "
              f"tok/s ({t['scaling_2gpu_over_1gpu']:.2f}x); loss curves 2 GPU vs 1 GPU same global batch: max rel "
              f"diff {t['loss_curve_max_rel_diff_2gpu_vs_1gpu_same_global_batch']}")
    for v, d in decoding.items():
        print(f"decode {v}: 1 GPU {d['us_per_token_1gpu']:.3g} us/token (bound {d['bound_us_per_token_1gpu']:.3g}); "
              f"2 GPUs {d['us_per_token_2gpu_batch_sharded']:.3g} us/token ({d['speedup_2gpu']:.2f}x)")


if __name__ == "__main__":
    main()
