"""`evaluate` as a user runs it, the engine against the eager reference path (issue 16): each in a fresh process.

Every process runs ``mqa_repro.evaluate.evaluate_run`` on RUN_DIR (dev perplexity and BLEU, every test split
and beam of the spec) and times each of its decodes (synchronised); everything a fresh process pays is in
those times: Triton's start-up, kernel loads, CUDA graph captures (the engine's decodes also record how many
graphs they captured, how many of them without a warm-up step and how many such tries failed, the seconds
the captures took with their warm-up steps, their compactions, and the seconds spent waiting for the
warm-up thread of ``mqa_repro.decode.warmup``). The eager reference path is the same process with the decoding swapped for
``scripts/evaluate_speed.reference_translate`` (decode.py at 2a7094f).
Both decode in float32 (TF32 products on CUDA, as `evaluate` sets). Every process uses one Triton cache
folder of its own (``TRITON_CACHE_DIR``, empty at the start): a first engine process fills it (every kernel
compiled: what the very first `evaluate` on a machine pays), reported apart as the cold run; the medians are
over ``--repeats`` processes per path after it, with that cache warm.

    python3 scripts/evaluate_whole_speed.py RUN_DIR --repeats 3 --out FILE.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def child(run_dir: str, path: str, device: str) -> None:
    """One evaluate in this process; prints one JSON line: each decode's seconds, BLEU, process seconds."""
    t_start = time.perf_counter()
    import torch

    import mqa_repro.evaluate as E
    from mqa_repro.decode import warmup

    decodes = []
    engine_translate = E.translate

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(model, ex, ev, beam, bs, dev, advance=None, engine=None, **kw):
        sync()
        counts = lambda: (dict(graph_captures=engine.captures, capture_s=engine.capture_seconds,
                               compactions=engine.compactions, cold_captures=engine.cold_captures,
                               cold_capture_failures=engine.cold_capture_failures,
                               triton_warm_up_wait_s=warmup.WAITED[0]) if engine is not None else None)
        c0 = counts()
        t0 = time.perf_counter()
        if path == "eager":
            from scripts.evaluate_speed import reference_translate

            limit = engine.vocab_limit if engine is not None else model.spec.vocab_size
            out = reference_translate(model, ex, ev, beam, bs, dev, limit)
        else:
            out = engine_translate(model, ex, ev, beam, bs, dev, advance, engine=engine, **kw)
        sync()
        decodes.append({"sentences": len(ex), "beam": beam, "seconds": time.perf_counter() - t0})
        if path == "engine" and c0 is not None:   # first-use costs inside this decode
            c1 = counts()
            decodes[-1].update({k: c1[k] - c0[k] for k in c1})
        return out

    E.translate = timed
    metrics = E.evaluate_run(run_dir, device=device, progress=False)
    bleu = [(b["split"], b["beam"], b["score"]) for b in metrics["bleu"] if b["tokenizer"] == metrics["bleu"][0]["tokenizer"]]
    for d, (split, beam, score) in zip(decodes, bleu):
        d.update(split=split, bleu=score, bleu_tokenizer=metrics["bleu"][0]["tokenizer"])
    print(json.dumps({"path": path, "decodes": decodes, "decode_s": sum(d["seconds"] for d in decodes),
                      "process_s": time.perf_counter() - t_start}), flush=True)


def run_child(run_dir: Path, path: str, device: str, env_extra: dict) -> dict:
    env = {**os.environ, **env_extra, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    res = subprocess.run([sys.executable, __file__, "--child", path, "--device", device, str(run_dir)], env=env, cwd=ROOT,
                         capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"the {path} process failed:\n{res.stderr[-3000:]}")
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"{path}: decodes "
          f"{[round(d['seconds'], 3) for d in doc['decodes']]} = {doc['decode_s']:.3f} s; process "
          f"{doc['process_s']:.1f} s", flush=True)
    if path == "engine":
        print("  graph captures (of them without a warm-up step, capture s) per decode: "
              f"{[(d['graph_captures'], d['cold_captures'], round(d['capture_s'], 3)) for d in doc['decodes']]}; "
              f"failed without warm-up {sum(d['cold_capture_failures'] for d in doc['decodes'])}; waited for "
              f"the warm-up thread {sum(d['triton_warm_up_wait_s'] for d in doc['decodes']):.3f} s; compactions "
              f"{[d['compactions'] for d in doc['decodes']]}", flush=True)
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--child", choices=["engine", "eager"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(str(a.run_dir), a.child, a.device)
    if a.out is None:
        ap.error("--out is required")
    runs = {p: [] for p in ("engine", "eager")}
    with tempfile.TemporaryDirectory() as cache:
        env = {"TRITON_CACHE_DIR": cache}
        cold = run_child(a.run_dir, "engine", a.device, env)    # compiles every kernel into the empty cache
        for _ in range(a.repeats):       # interleaved: both paths see the same machine state
            for p in runs:
                runs[p].append(run_child(a.run_dir, p, a.device, env))
    med = {p: statistics.median(r["decode_s"] for r in rs) for p, rs in runs.items()}
    bleu = {p: [d["bleu"] for d in rs[0]["decodes"]] for p, rs in runs.items()}
    import torch

    from mqa_repro.checkpoint import load_checkpoint, model_from_checkpoint
    from mqa_repro.provenance import manifest, write_json_atomic

    man = json.loads((a.run_dir / "manifest.json").read_text())
    ck = load_checkpoint(man["checkpoint"])
    variant, _ = model_from_checkpoint(ck, torch.device("cpu"))
    doc = {"kind": "evaluate-whole-speed", "run": str(a.run_dir), "variant": variant.name,
           "what": "decoding seconds of one `evaluate` (dev beam 1, every test split and beam) per fresh process",
           "repeats": a.repeats, "engine_median_s": med["engine"], "eager_median_s": med["eager"],
           "speedup": med["eager"] / med["engine"],
           "engine_cold_triton_cache": cold, "speedup_cold": med["eager"] / cold["decode_s"],
           "bleu_engine": bleu["engine"], "bleu_eager": bleu["eager"],
           "bleu_max_abs_diff": max(abs(x - y) for x, y in zip(bleu["engine"], bleu["eager"])),
           "runs": runs, **manifest(variant, ck.get("seed"), torch.device(a.device),
                                    script="scripts/evaluate_whole_speed.py")}
    write_json_atomic(a.out, doc)
    print(f"engine {med['engine']:.3f} s, eager {med['eager']:.3f} s per evaluate's decodes (median of "
          f"{a.repeats} processes): {doc['speedup']:.1f}x"
          + f"; the first engine process, its Triton cache empty: {cold['decode_s']:.3f} s ({doc['speedup_cold']:.1f}x)"
          + f"; BLEU differs by at most {doc['bleu_max_abs_diff']:.2f}")


if __name__ == "__main__":
    main()
