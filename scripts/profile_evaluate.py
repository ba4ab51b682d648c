"""Where `evaluate`'s decoding time goes on a GPU for a small trained model (issue 16's 5x target): one split of
a run decoded by the engine, warm, per beam: the engine's own clocks (encoder / decoder, synchronised at batch
boundaries), the device's busy time against the wall time (torch.profiler), the top kernels, and the warm pass
time under a few engine settings (check interval, compaction, sentences per batch). A development tool: what
it prints guides changes, and nothing here is a published number (notes/engine.md).

    PYTHONPATH=. python3 scripts/profile_evaluate.py RUN_DIR [--split test2016] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mqa_repro.decode.engine as engine_mod  # noqa: E402
from mqa_repro.batching import load_examples, open_prepared  # noqa: E402
from mqa_repro.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from mqa_repro.decode import Engine  # noqa: E402
from mqa_repro.evaluate import translate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--split", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    man = json.loads((a.run_dir / "manifest.json").read_text())
    variant, model = model_from_checkpoint(load_checkpoint(man["checkpoint"]), dev)
    model.eval()
    prepared = open_prepared(variant, None)
    ev = variant.evaluation
    stem = a.split or variant.data.test[0]
    ex = load_examples(prepared, variant, stem, ev.max_sentences)
    engine = Engine(model, vocab_limit=prepared.piece_count)
    report = {"split": stem, "sentences": len(ex), "beams": {}}

    def one_pass(beam, batch_size=ev.batch_size):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        translate(model, ex, ev, beam, batch_size, dev, engine=engine)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    defaults = (engine_mod.CHECK_EVERY, engine_mod.COMPACT_MIN_ROWS)
    for beam in ev.beams:
        first = one_pass(beam)
        warm = [one_pass(beam) for _ in range(a.repeats)]
        engine.timing, engine.encode_seconds, engine.decode_seconds, s0 = True, 0.0, 0.0, engine.steps_run
        clocked = one_pass(beam)
        engine.timing = False
        row = {"first_s": first, "warm_s": warm, "clocked_s": clocked, "encode_s": engine.encode_seconds,
               "decode_s": engine.decode_seconds, "steps": engine.steps_run - s0, "shapes": len(engine._work)}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            wall = one_pass(beam)
        ka = prof.key_averages()
        row["profiled_wall_s"] = wall
        row["device_busy_s"] = sum(e.self_device_time_total for e in ka) / 1e6
        kernels = sorted(ka, key=lambda e: -e.self_device_time_total)[:12]
        row["top_kernels"] = [(e.key[:90], round(e.self_device_time_total / 1e3, 2), e.count) for e in kernels]
        cpu = sorted(ka, key=lambda e: -e.self_cpu_time_total)[:12]
        row["top_cpu_ops"] = [(e.key[:90], round(e.self_cpu_time_total / 1e3, 2), e.count) for e in cpu]
        settings = {}
        for check, compact, factor in ((8, 64, 1), (4, 64, 1), (16, 64, 1), (8, 10**9, 1), (8, 64, 4), (4, 64, 4)):
            engine_mod.CHECK_EVERY, engine_mod.COMPACT_MIN_ROWS = check, compact
            one_pass(beam, ev.batch_size * factor)
            settings[f"check{check}_compact{compact}_batchx{factor}"] = statistics.median(
                one_pass(beam, ev.batch_size * factor) for _ in range(a.repeats))
        engine_mod.CHECK_EVERY, engine_mod.COMPACT_MIN_ROWS = defaults
        row["settings_warm_s"] = settings
        fresh = Engine(model, vocab_limit=prepared.piece_count)   # kernels compiled: the captures alone
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        translate(model, ex, ev, beam, ev.batch_size, dev, engine=fresh)
        torch.cuda.synchronize()
        row["first_s_fresh_engine"] = time.perf_counter() - t0
        fresh = Engine(model, vocab_limit=prepared.piece_count)   # the same under cProfile: the host's share
        pr = cProfile.Profile()
        pr.enable()
        translate(model, ex, ev, beam, ev.batch_size, dev, engine=fresh)
        torch.cuda.synchronize()
        pr.disable()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(30)
        row["fresh_engine_cprofile"] = buf.getvalue().splitlines()[:60]
        del fresh
        report["beams"][beam] = row
        print(json.dumps({beam: row}, indent=1), flush=True)
    if a.out:
        a.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
