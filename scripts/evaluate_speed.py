"""Decoding a run's test sets with the engine against the eager reference path: time and BLEU (issue 16).

The reference path is the search `evaluate` ran before the engine existed (decode.py at 2a7094f, kept as the
test oracle in tests/oracle.py) over the model's eager ``decode_step``, batched as that `evaluate` batched it
(sentences sorted by source length, ``evaluation.batch_size`` per batch). The engine path is
``evaluate.translate`` (mqa_repro.decode.Engine). Both decode in float32 (TF32 products on a GPU, as
`evaluate` sets), every test split of the spec, every beam of ``evaluation.beams``; BLEU is sacrebleu's on the
detokenized hypotheses. The engine's first pass (graph captures) is timed apart from its warm passes (median
of ``--repeats``); the reference path runs once per split and beam. ``--engine-dtype bf16`` (repeatable) also
times the engine on a bf16 copy of the weights against the same fp32 reference (the issue's "same BLEU, +-0.1
in bf16"); each dtype has its own engine, shared by its splits and beams as ``evaluate`` shares one.

    python3 scripts/evaluate_speed.py RUN_DIR --device cuda --out FILE.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mqa_repro.decode import Engine, max_lengths  # noqa: E402
from mqa_repro.evaluate import bleu_scores, translate  # noqa: E402
from mqa_repro.model import EOS  # noqa: E402
from mqa_repro.provenance import manifest, write_json_atomic  # noqa: E402
from mqa_repro.runtime import resolve_device  # noqa: E402
from mqa_repro.batching import Examples, collate, load_examples, open_prepared  # noqa: E402
from mqa_repro.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from tests import oracle  # noqa: E402


def reference_translate(model, ex, ev, beam: int, batch_size: int, device, vocab_limit: int) -> list:
    """Token ids per sentence (EOS removed) by the eager reference path, in the split's order."""
    order = np.argsort(ex.src_lens, kind="stable")
    out = [None] * len(ex)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        src_BS = collate(Examples(tgt=[ex.tgt[i] for i in idx], src=[ex.src[i] for i in idx]),
                         [[k] for k in range(len(idx))]).src_BS.to(device)
        lim_B = max_lengths((src_BS != 0).sum(1), ev.max_len_a, ev.max_len_b,
                            min(ev.max_len_cap, model.spec.max_positions))
        if beam == 1:
            tokens, lengths = oracle.greedy(model, src_BS, max_len_B=lim_B, vocab_limit=vocab_limit)
        else:
            tokens, lengths, _ = oracle.beam_search(model, src_BS, beam=beam, alpha=ev.length_penalty,
                                                    max_len_B=lim_B, vocab_limit=vocab_limit)
        for row, i in enumerate(idx):
            ids = tokens[row, : int(lengths[row])].tolist()
            out[int(i)] = ids[:-1] if ids and ids[-1] == EOS else ids
    return out


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    res = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return res, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--engine-dtype", action="append", choices=["fp32", "bf16"], default=None)
    a = ap.parse_args()
    dtypes = a.engine_dtype or ["fp32"]
    dev = resolve_device(a.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    man = json.loads((a.run_dir / "manifest.json").read_text())
    ck = load_checkpoint(man["checkpoint"])
    variant, model = model_from_checkpoint(ck, dev)
    model.eval()
    prepared = open_prepared(variant, a.data)
    ev, d = variant.evaluation, variant.data
    rows, refs_done = [], {}
    for dtype in dtypes:
        emodel = model if dtype == "fp32" else copy.deepcopy(model).to(torch.bfloat16)
        engine = Engine(emodel, vocab_limit=prepared.piece_count)
        for stem in d.test:
            ex = load_examples(prepared, variant, stem, ev.max_sentences)
            refs = prepared.text(stem, d.tgt_lang)[: len(ex)]
            for beam in ev.beams:
                run = lambda: translate(emodel, ex, ev, beam, ev.batch_size, dev, engine=engine)  # noqa: E731
                ours, first_s = timed(run, dev)
                warm = [timed(run, dev)[1] for _ in range(a.repeats)]
                # one more warm pass with the engine's own clocks (synchronised at batch boundaries)
                engine.timing, engine.encode_seconds, engine.decode_seconds, steps0 = True, 0.0, 0.0, engine.steps_run
                _, clocked_s = timed(run, dev)
                engine.timing = False
                split = {"clocked_pass_s": clocked_s, "encode_s": engine.encode_seconds,
                         "decode_s": engine.decode_seconds, "decoder_steps": engine.steps_run - steps0,
                         "captured_shapes": len(engine._work)}
                if (stem, beam) not in refs_done:   # the fp32 eager path, once per split and beam
                    refs_done[stem, beam] = timed(lambda: reference_translate(
                        model, ex, ev, beam, ev.batch_size, dev, prepared.piece_count), dev)
                ref, ref_s = refs_done[stem, beam]
                bleu = {name: bleu_scores([prepared.sp.decode(x) for x in ids], refs, ev.bleu_tokenizers)
                        for name, ids in (("engine", ours), ("reference", ref))}
                row = {"split": stem, "beam": beam, "engine_dtype": dtype, "sentences": len(ex),
                       "engine_first_s": first_s, "engine_warm_median_s": statistics.median(warm),
                       "engine_warm_s": warm, "reference_s": ref_s,
                       "speedup_first": ref_s / first_s, "speedup_warm": ref_s / statistics.median(warm),
                       "identical_sentences": sum(x == y for x, y in zip(ours, ref)) / max(1, len(ex)),
                       "bleu": {n: {t: b[t]["score"] for t in b} for n, b in bleu.items()}, "engine_clocks": split}
                rows.append(row)
                print(f"{dtype} {stem} beam {beam}: engine {first_s:.3f} s first, {row['engine_warm_median_s']:.3f} s "
                      f"warm; reference {ref_s:.3f} s ({row['speedup_first']:.1f}x first, {row['speedup_warm']:.1f}x "
                      f"warm); BLEU intl engine {row['bleu']['engine'].get('intl', float('nan')):.2f} reference "
                      f"{row['bleu']['reference'].get('intl', float('nan')):.2f}; identical "
                      f"{row['identical_sentences']:.1%}; clocks {split}", flush=True)
    totals = {dt: {"engine_first_s": sum(r["engine_first_s"] for r in rows if r["engine_dtype"] == dt),
                   "engine_warm_s": sum(r["engine_warm_median_s"] for r in rows if r["engine_dtype"] == dt),
                   "reference_s": sum(s for _, s in refs_done.values())} for dt in dtypes}
    for tot in totals.values():
        tot["speedup_first"] = tot["reference_s"] / tot["engine_first_s"]
        tot["speedup_warm"] = tot["reference_s"] / tot["engine_warm_s"]
    doc = {"kind": "evaluate-speed", "run": str(a.run_dir), "variant": variant.name,
           "dtype": "reference fp32 (TF32 products on CUDA); engine per row (engine_dtype)",
           "repeats": a.repeats, "rows": rows, "totals": totals,
           **manifest(variant, ck.get("seed"), dev, script="scripts/evaluate_speed.py")}
    write_json_atomic(a.out, doc)
    for dt, tot in totals.items():
        print(f"total {dt}: engine {tot['engine_first_s']:.3f} s first passes ({tot['speedup_first']:.1f}x), "
              f"{tot['engine_warm_s']:.3f} s warm ({tot['speedup_warm']:.1f}x); reference {tot['reference_s']:.3f} s")


if __name__ == "__main__":
    main()
