"""Write the reference loss curve of the tiny spec (tests/data/tiny_multi_head_seed0_curve.json).

The curve is what ``tests/test_train.py::test_loss_curve_matches_the_reference`` compares against: the
per-step training loss (the global-batch mean of label-smoothed NLL + z-loss, as logged) of the tiny spec's
multi_head row, seed 0, fp32 on the CPU, for the spec's own step count -- exactly the run that the test
session's ``tiny_run`` fixture makes. Run it from the repository root:

    python3 scripts/loss_curve_fixture.py [--data DIR] [--out FILE]

It prepares the tiny spec's data from ../shared/data (or $MQA_REPRO_DATA) into a temporary folder when
--data is not given, and records the git commit, the command and the versions beside the curve.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mqa_repro.specfile import load_spec  # noqa: E402
from mqa_repro.train import train_variant  # noqa: E402

TINY = ROOT / "experiments" / "tiny.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=None, help="prepared tiny data (default: prepare into a temp dir)")
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "tiny_multi_head_seed0_curve.json")
    ap.add_argument("--variant", default="multi_head")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "mqa_repro"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    spec = load_spec(TINY)
    v = spec.variants[args.variant]
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            from mqa_repro.prepare import prepare

            shared = Path(os.environ.get("MQA_REPRO_DATA", ROOT.parent / "shared" / "data"))
            data = Path(tmp) / "tiny"
            prepare(spec, data_dir=shared, out=data, progress=False)
        r = train_variant(v, args.seed, device="cpu", out_root=Path(tmp) / "results",
                          checkpoint_root=Path(tmp) / "checkpoints", data=data, progress=False)
    out = {
        "what": "per-step training loss (global-batch mean of label-smoothed NLL + z-loss per target token)",
        "spec": "experiments/tiny.yaml", "variant": args.variant, "seed": args.seed, "device": "cpu",
        "dtype": "float32", "steps": v.training.steps, "spec_hash": v.hash,
        "git_sha": sha, "mqa_repro_dirty": dirty,
        "command": "python3 scripts/loss_curve_fixture.py" + (f" --variant {args.variant}" if args.variant != "multi_head" else "")
                   + (f" --seed {args.seed}" if args.seed else ""),
        "torch": torch.__version__,
        "losses": [[s, x] for s, x in r.losses],
        "dev_ln_ppl": r.dev_ln_ppl,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(r.losses)} steps, last loss {r.losses[-1][1]:.4f}, dev ln(ppl) {r.dev_ln_ppl:.4f}")


if __name__ == "__main__":
    main()
