"""Issue 19's end-to-end A/B: two `train` runs of the same spec, variant, seed and prepared data (this code
and the code before the training-speed work), each alone on one GPU of one machine in one call
(scripts/train_speed_gpu.sh, scripts/multi30k_ab_gpu.sh). Reads each run's manifest.json and
train_log.jsonl and writes their target tokens/s (median of the logged windows after the first, which holds
start-up and compilation; and the whole run's tokens over the sum of the windows' seconds), the final dev
ln(perplexity) and the ratios.

    python3 scripts/train_ab_summary.py NEW_RUN_DIR OLD_RUN_DIR --out FILE.json
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mqa_repro.provenance import manifest, write_json_atomic  # noqa: E402


def run(d: Path) -> dict:
    recs = [json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in recs if "loss" in r]
    devs = [r for r in recs if "dev_ln_ppl" in r]
    man = json.loads((d / "manifest.json").read_text())
    # each window's seconds: its tokens (steps since the previous record x that step's batch) / its rate
    prev, secs, tokens = 0, 0.0, 0
    for r in steps:
        n = (r["step"] - prev) * r["tgt_tokens"]
        secs += n / r["tokens_per_s"]
        tokens += n
        prev = r["step"]
    return {"run_dir": str(d), "git_sha": man.get("git_sha"), "device": man.get("device"),
            "spec_hash": man.get("spec_hash"), "data_manifest_hash": man.get("data_manifest_hash"),
            "status": man.get("status"), "steps": steps[-1]["step"],
            "tokens_per_s_median_after_first_window": statistics.median(r["tokens_per_s"] for r in steps[1:]),
            "tokens_per_s_whole_run": tokens / secs, "train_seconds_logged": secs,
            "dev_ln_ppl_final": devs[-1]["dev_ln_ppl"] if devs else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("new", type=Path)
    ap.add_argument("old", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    new, old = run(a.new), run(a.old)
    doc = {"kind": "train-ab", "new": new, "old": old,
           "speedup_median": new["tokens_per_s_median_after_first_window"] / old["tokens_per_s_median_after_first_window"],
           "speedup_whole_run": new["tokens_per_s_whole_run"] / old["tokens_per_s_whole_run"],
           "dev_ln_ppl_difference": new["dev_ln_ppl_final"] - old["dev_ln_ppl_final"],
           "notes": "tokens/s as train logs them (evaluation and checkpoint time excluded); the windows' data "
                    "(log_every steps) as logged; the logged tgt_tokens of a record's last step stands for each "
                    "step of its window in the whole-run figure",
           "summary_provenance": manifest(None, None, None, script="scripts/train_ab_summary.py")}
    write_json_atomic(a.out, doc)
    print(f"new {new['tokens_per_s_median_after_first_window']:.0f} tok/s, old "
          f"{old['tokens_per_s_median_after_first_window']:.0f}: {doc['speedup_median']:.2f}x (whole run "
          f"{doc['speedup_whole_run']:.2f}x); dev ln(ppl) {new['dev_ln_ppl_final']:.4f} vs {old['dev_ln_ppl_final']:.4f}")


if __name__ == "__main__":
    main()
