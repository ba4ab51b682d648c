"""``mqa-repro decode-bench --real``: translation throughput on a real test set, beside the roofline.

Where Table 2 (:mod:`mqa_repro.bench`) times fixed shapes with EOS ignored, this times what a user gets:
the engine (:class:`mqa_repro.decode.Engine`) translating every sentence of a prepared test split (default:
the spec's first ``data.test`` stem, WMT14 newstest2014 for ``wmt14_ende``: 3,003 sentences) with EOS on,
greedy and beam search, in batches of ``B`` sentences of similar source length (all sentences sorted by
source length, cut into runs of ``B``; default B = 1024, the bench's batch, and 32).

Output lengths: with a trained ``--checkpoint`` each sentence ends at its own EOS (or its decode limit
min(cap, a * source length + b)); with random weights a model never emits EOS, so each sentence's output
length is forced to its reference's (reference subwords + EOS), keeping the real length distribution.

Reported per (variant, beam, B): sentences/s, target tokens/s and microseconds per target token (target
tokens = decoder steps: each sentence's output subwords plus its EOS where it emitted one, as ln(perplexity)
counts them; per sentence, not per hypothesis), the encoder's and the decoder's share apart (the engine's own
clocks, ``Engine.timing``, synchronised at batch boundaries: encoder = encoding plus the encoder-decoder K/V
projection; decoder = whole - encoder), the median of ``repeats`` runs after a warm-up (CUDA graphs are
captured in the warm-up), and the roofline bound of the work done: per batch the encoder over its real
source tokens, and per decoder step the weights once plus, for each live row, its own self-attention
history and its own sentence's source K/V (a row stops costing once it is finished) -- what an ideal engine
would move (:mod:`mqa_repro.roofline`).

``--peer ct2`` times CTranslate2 running the same weights on the same sentences (:mod:`mqa_repro.peers`;
``max_batch_size = B``, its own sort by source length), both multi-query forms for multi-query variants,
and prints its target tokens/s beside ours. CTranslate2 has one decode limit per call: with EOS on it gets
the cap; forced lengths cannot be set per sentence, so it decodes batches of B sentences of similar
*reference* length (its best case) with EOS suppressed, each batch to its longest forced length, and only
the forced tokens are counted as its output.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch

from . import roofline as rl
from .bench import _free, _stats, build_model, time_runs
from .errors import UserError
from .provenance import manifest, write_json_atomic

SCHEMA = 1
DEFAULT_BATCHES = (1024, 32)


@dataclass
class RealConfig:
    device: str
    dtype: str
    beams: list
    batches: list = field(default_factory=lambda: list(DEFAULT_BATCHES))
    repeats: int = 3
    stem: Optional[str] = None           # prepared split (default: data.test[0])
    max_sentences: Optional[int] = None  # a prefix of the split (tests)
    peer_threads: int = 0                # CTranslate2 CPU threads (0: its default)


# --------------------------------------------------------------------------------------------------
# Sentences
# --------------------------------------------------------------------------------------------------
@dataclass
class Sentences:
    stem: str
    src: list          # id arrays, no EOS (cut to data.max_len - 1 like evaluate)
    ref_len: np.ndarray  # reference subwords per sentence
    data_dir: str
    vocabulary: Optional[list] = None  # SentencePiece pieces (for the CTranslate2 peer)


def load_sentences(variant, data, stem: Optional[str], limit: Optional[int]) -> Sentences:
    """The source ids and reference lengths of a prepared test split (UserError if missing)."""
    from .batching import load_examples, open_prepared

    prepared = open_prepared(variant, data)
    stem = stem or (variant.data.test[0] if variant.data.test else None)
    if stem is None:
        raise UserError(f"{variant.source}: data.test names no test set; pass --test-set STEM")
    ex = load_examples(prepared, variant, stem, limit)
    if ex.src is None:
        raise UserError(f"decode-bench --real translates; {variant.spec_name}/{variant.name} is decoder-only")
    src = [list(map(int, s)) for s in ex.src]
    ref = np.array([len(t) for t in ex.tgt], dtype=np.int64)
    vocab = None
    try:
        from .peers import ct2_vocabulary

        vocab = ct2_vocabulary(prepared.sp, variant.model.padded_vocab)
    except UserError:
        pass
    return Sentences(stem, src, ref, str(prepared.path), vocab)


def batches_by_source(src: list, size: int) -> list:
    """Index runs of ``size`` sentences of similar source length (stable sort by length)."""
    order = np.argsort(np.array([len(s) for s in src]), kind="stable")
    return [order[i:i + size].tolist() for i in range(0, len(order), size)]


# --------------------------------------------------------------------------------------------------
# The roofline of the work done
# --------------------------------------------------------------------------------------------------
def sentence_bound(m, batches: list, src_len: np.ndarray, out_steps: np.ndarray, beam: int, dtype: str,
                   ceil: rl.Ceilings) -> dict:
    """Seconds of the roofline bound for encoding and decoding ``batches`` (lists of sentence indices).

    ``src_len``: encoder positions per sentence (ids + EOS); ``out_steps``: decoder steps per sentence
    (target tokens). A decoder step at position t costs the weights once and, per live row, its own history
    and its own sentence's source K/V (:func:`mqa_repro.roofline.decoder_step_cost` is linear in batch and
    in batch x src_len, so live rows enter through their count and their mean source length).
    """
    enc_s = dec_s = 0.0
    for idx in batches:
        s = src_len[idx]
        steps = out_steps[idx]
        # encoder: mean source length over the batch (attention FLOPs use it squared: a slight undercount)
        enc_s += rl.bound_seconds(rl.encoder_cost(m, len(idx), max(1, round(float(s.mean()))), dtype), ceil)
        for t in range(int(steps.max())):
            live = steps > t
            n = int(live.sum())
            c = rl.decoder_step_cost(m, n, t, max(1, round(float(s[live].mean()))), int(steps.max()), beam, dtype)
            dec_s += rl.bound_seconds(c, ceil)
    return {"encoder_s": enc_s, "decoder_s": dec_s}


# --------------------------------------------------------------------------------------------------
# Ours
# --------------------------------------------------------------------------------------------------
def decode_limits(src: list, ev, m) -> np.ndarray:
    """The engine's per-sentence limit min(cap, max_positions, floor(a * (ids + EOS) + b)), at least 1."""
    cap = min(ev.max_len_cap, m.max_positions)
    n = np.array([len(x) + 1 for x in src], dtype=np.float64)
    return np.maximum(1, np.minimum(cap, np.floor(ev.max_len_a * n + ev.max_len_b))).astype(np.int64)


def steps_run(outs: list, limits: np.ndarray) -> np.ndarray:
    """Decoder steps per sentence: its subwords, plus the EOS step where it stopped before its limit."""
    n = np.array([len(o) for o in outs], dtype=np.int64)
    return n + (n < limits)


@torch.no_grad()
def time_ours(eng, sents: Sentences, beam: int, size: int, forced: Optional[np.ndarray], ev, cfg: RealConfig,
              device) -> dict:
    """The whole translation, median of ``cfg.repeats`` runs after a warm-up, with the engine's own encoder and
    decoder seconds (``Engine.timing``: synchronised at batch boundaries); the outputs of the last run."""
    m = eng.spec
    batches = batches_by_source(sents.src, size)
    outs = [None] * len(sents.src)
    enc, dec = [], []

    def run():
        eng.encode_seconds = eng.decode_seconds = 0.0
        for idx in batches:
            kw = {"forced_lengths": [int(forced[i]) for i in idx]} if forced is not None else {}
            res = eng.translate([sents.src[i] for i in idx], beam=beam, alpha=ev.length_penalty,
                                max_len_a=ev.max_len_a, max_len_b=ev.max_len_b,
                                max_len_cap=min(ev.max_len_cap, m.max_positions), batch_tokens=1 << 40, **kw)
            for i, r in zip(idx, res):
                outs[i] = list(r)
        enc.append(eng.encode_seconds)
        dec.append(eng.decode_seconds)

    eng.timing = True
    try:
        t0 = time.perf_counter()
        run()                                   # the warm-up: CUDA graphs are captured here
        if device.type == "cuda":
            torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        total = time_runs(run, device, cfg.repeats, warmup=0)
        repeats_s = time.perf_counter() - t0
    finally:
        eng.timing = False
    return {"total": _stats(total), "encoder": _stats(enc[1:]), "decoder": _stats(dec[1:]), "outputs": outs,
            "batches": batches, "first_pass_wall_s": first_s, "repeats_wall_s": repeats_s}


# --------------------------------------------------------------------------------------------------
# The whole thing
# --------------------------------------------------------------------------------------------------
def _rates(n_sent: int, tokens: int, total_s: float, enc_s: Optional[float] = None) -> dict:
    out = {"sentences_per_s": n_sent / total_s, "target_tokens_per_s": tokens / total_s,
           "us_per_token": total_s * 1e6 / tokens}
    if enc_s is not None:
        dec_s = max(total_s - enc_s, 0.0)
        out.update(encoder_us_per_token=enc_s * 1e6 / tokens, decoder_us_per_token=dec_s * 1e6 / tokens,
                   encoder_s=enc_s, decoder_s=dec_s)
    return out


def _ours_row(v, eng, sents, beam: int, size: int, forced, limits, src_len, ev, cfg: RealConfig, device,
              ceil) -> tuple:
    """Our engine on every sentence at one beam and batch size: (the row, time_ours's result)."""
    m, forced_mode, n = v.model, forced is not None, len(sents.src)
    t_row = time.perf_counter()
    r = time_ours(eng, sents, beam, size, forced, ev, cfg, device)
    outs = r["outputs"]
    steps = np.array([len(o) for o in outs], dtype=np.int64) if forced_mode else steps_run(outs, limits)
    tokens = int(steps.sum())
    total_s, enc_s = r["total"]["median_s"], r["encoder"]["median_s"]
    bound = sentence_bound(m, r["batches"], src_len, steps, beam, cfg.dtype, ceil)
    bound_s = bound["encoder_s"] + bound["decoder_s"]
    row = {"variant": v.name, "impl": "ours", "beam": beam, "batch_sentences": size, "sentences": n,
           "target_tokens": tokens, "forced_lengths": forced_mode, "median_s": total_s,
           "min_s": r["total"]["min_s"], "max_s": r["total"]["max_s"], "repeats": cfg.repeats,
           **_rates(n, tokens, total_s, enc_s),
           "engine_decoder_s": r["decoder"]["median_s"],
           "bound_us_per_token": bound_s * 1e6 / tokens,
           "bound_encoder_us_per_token": bound["encoder_s"] * 1e6 / tokens,
           "bound_decoder_us_per_token": bound["decoder_s"] * 1e6 / tokens,
           "x_bound": total_s / bound_s if bound_s else None, "dtype": cfg.dtype,
           "impl_detail": eng.describe()}
    if forced_mode:
        row["forced_equals_reference"] = bool(np.array_equal(steps, forced))
    row["first_pass_wall_s"] = r["first_pass_wall_s"]
    row["repeats_wall_s"] = r["repeats_wall_s"]
    row["row_wall_s"] = time.perf_counter() - t_row
    return row, r


def run_real_bench(variants: list, cfg: RealConfig, checkpoint_state=None, peer: Optional[str] = None,
                   data=None, spec_path: str = "", use_triton: Optional[bool] = None, tune: bool = False,
                   log=print, out_file=None) -> dict:
    """Time every variant on the real sentences (see the module docstring); a results document.

    With ``out_file`` (a path) the document is written there atomically after every finished row, ours or
    the peer's (``"complete": false`` until the last), so a run stopped by a time limit keeps every finished
    row. Each row is logged as it finishes with its wall seconds (ours: the first pass, which captures the
    CUDA graphs, and the timed repeats apart; the peer: its conversion and load, once per form, apart).
    """
    from .decode import Engine

    device = torch.device(cfg.device)
    ceil = rl.ceilings(device, cfg.dtype)
    forced_mode = checkpoint_state is None
    rows, peers = [], []
    sents_by_data = {}
    prov = manifest(None, None, device, spec_path=spec_path)

    def document(complete: bool) -> dict:
        """The rows so far as a results document, written to ``out_file`` when one is given."""
        doc = _document(variants, cfg, checkpoint_state, spec_path, prov, ceil, sents_by_data, rows, peers,
                        complete)
        if out_file is not None:
            write_json_atomic(out_file, doc)
        return doc

    def finished_row() -> None:   # the rows so far on disk, in case a time limit stops the run
        if out_file is not None:
            document(False)
    for v in variants:
        m = v.model
        if not m.is_seq2seq:
            raise UserError(f"{spec_path}: decode-bench --real translates; {v.name} is decoder-only")
        key = (v.spec_name, str(data))
        if key not in sents_by_data:
            sents_by_data[key] = load_sentences(v, data, cfg.stem, cfg.max_sentences)
        sents = sents_by_data[key]
        n = len(sents.src)
        forced = (sents.ref_len + 1) if forced_mode else None   # reference subwords + the EOS step
        src_len = np.array([len(s) + 1 for s in sents.src], dtype=np.int64)
        model = build_model(v, device, cfg.dtype, checkpoint_state)
        eng = Engine(model, use_triton=use_triton, tune=tune)
        ct2_models = {}   # multi-query form -> CT2Model, converted once per variant
        ev = v.evaluation
        limits = forced if forced_mode else decode_limits(sents.src, ev, m)
        for beam in cfg.beams:
            for size in cfg.batches:
                log(f"{v.name}: {n} sentences of {sents.stem}, beam {beam}, {size} per batch")
                row, r = _ours_row(v, eng, sents, beam, size, forced, limits, src_len, ev, cfg, device, ceil)
                outs, total_s = r["outputs"], row["median_s"]
                rows.append(row)
                log(f"{v.name}: ours, beam {beam}, {size} per batch done in {row['row_wall_s']:.1f} s wall "
                    f"(first pass with graph captures {r['first_pass_wall_s']:.1f} s, {cfg.repeats} timed repeats "
                    f"{r['repeats_wall_s']:.1f} s, median {total_s:.3f} s)")
                finished_row()
                if peer == "ct2":
                    ct2_rows(v, model, sents, beam, size, forced, ev, cfg, device, outs, row, log, ct2_models,
                             on_row=lambda p: (peers.append(p), finished_row()))
        for x in ct2_models.values():
            x.close()
        ct2_models.clear()
        del eng, model
        _free(device)
    return document(True)


def _document(variants, cfg, checkpoint_state, spec_path, prov, ceil, sents_by_data, rows, peers,
              complete: bool) -> dict:
    """The results document of the rows finished so far (``complete``: every row of the grid is in)."""
    first = next(iter(sents_by_data.values()), None)
    res = {
        "schema_version": SCHEMA, "kind": "decode-bench-real", "complete": complete,
        "provenance": prov,
        "config": asdict(cfg), "ceilings": ceil.to_dict(),
        "test_set": {"stem": first.stem, "sentences": len(first.src), "data_dir": first.data_dir} if first else None,
        "weights": "trained checkpoint" if checkpoint_state is not None else "random (seed 0), forced lengths",
        "variants": {v.name: v.to_dict() for v in variants}, "spec_hashes": {v.name: v.hash for v in variants},
        "rows": list(rows), "peers": list(peers),
        "notes": ("target tokens = decoder steps (output subwords + EOS where emitted; per sentence, not per "
                  "hypothesis); us_per_token = median time / target tokens; encoder = the engine's encoder clock "
                  "(synchronised at batch boundaries), decoder = whole - encoder; bound = roofline of the work "
                  "done (finished rows cost nothing); batches = runs of batch_sentences sentences sorted by "
                  "source length; *_wall_s = wall seconds of the row's parts (first pass with graph captures, "
                  "timed repeats, CTranslate2 conversion and load)"),
    }
    try:
        from .decode import tuning_record

        res["tuning"] = tuning_record()
    except ImportError:
        pass
    return res


def ct2_rows(v, model, sents: Sentences, beam: int, size: int, forced, ev, cfg: RealConfig, device, ours_outs,
             ours_row: dict, log, models: dict, on_row=None) -> list:
    """CTranslate2 on the same weights and sentences, per multi-query form; ratio of target tokens/s.

    ``models`` caches the converted model per form. CTranslate2's calls are synchronous, so they are timed
    by the wall clock (on the CPU: ``peer_threads`` threads, default as many as torch uses). ``on_row(row)``
    is called as each row finishes (the caller writes the document then)."""
    emit = on_row or (lambda row: None)
    from .peers import CT2Model, ct2_supported

    m = model.spec
    why = ct2_supported(m)
    if why:
        row = {"peer": "ct2", "variant": v.name, "beam": beam, "batch_sentences": size, "skipped": why}
        emit(row)
        return [row]
    if sents.vocabulary is None:
        row = {"peer": "ct2", "variant": v.name, "skipped": "no SentencePiece vocabulary for the model"}
        emit(row)
        return [row]
    out = []
    forms = ["one_head", "replicated"] if m.n_kv_heads == 1 else ["one_head"]
    compute = {"fp32": "float32", "bf16": "bfloat16"}[cfg.dtype]
    ct2_dev = "cuda" if device.type == "cuda" else "cpu"
    cap = min(ev.max_len_cap, m.max_positions)
    for form in forms:
        log(f"{v.name}: CTranslate2 ({form if m.n_kv_heads == 1 else 'multi-head'}), beam {beam}, {size} per batch")
        t_row = time.perf_counter()
        load_s = None
        if form not in models:
            models[form] = CT2Model(model, sents.vocabulary, device=ct2_dev, compute_type=compute, mqa_form=form,
                                    threads=cfg.peer_threads or (torch.get_num_threads() if ct2_dev == "cpu" else 0))
            load_s = time.perf_counter() - t_row
            log(f"{v.name}: CTranslate2 ({form}) converted and loaded in {load_s:.1f} s")
        peer = models[form]
        hyps = [None] * len(sents.src)
        if forced is None:
            def run():
                res = peer.translate(sents.src, beam=beam, alpha=ev.length_penalty, max_len=cap,
                                     max_batch_size=size)
                hyps[:] = res
            method = f"EOS on, max_decoding_length {cap} for every sentence (CT2 has one limit per call)"
        else:
            order = np.argsort(forced, kind="stable")
            groups = [order[i:i + size].tolist() for i in range(0, len(order), size)]

            def run():
                for idx in groups:
                    L = int(forced[idx].max())      # tokens decoded, EOS suppressed (as ours)
                    res = peer.translate([sents.src[i] for i in idx], beam=beam, alpha=ev.length_penalty,
                                         max_len=L, min_len=L, eos=False)
                    for i, h in zip(idx, res):
                        hyps[i] = h
            method = ("forced lengths: batches of similar reference length, EOS suppressed, each batch decoded "
                      "to its longest forced length; only forced tokens counted")
        t_runs = time.perf_counter()
        times = time_runs(run, torch.device("cpu"), cfg.repeats)   # wall clock: translate_batch blocks
        runs_s = time.perf_counter() - t_runs
        st = _stats(times)
        # its own output in EOS mode (its translations may differ from ours), the forced tokens otherwise
        tokens = int(steps_run(hyps, np.full(len(hyps), cap)).sum()) if forced is None else ours_row["target_tokens"]
        row = {"peer": "ct2", **peer.describe(), "variant": v.name, "beam": beam, "batch_sentences": size,
               "sentences": len(sents.src), "target_tokens": tokens, "method": method,
               "median_s": st["median_s"], "min_s": st["min_s"], "max_s": st["max_s"], "repeats": cfg.repeats,
               **_rates(len(sents.src), tokens, st["median_s"]),
               "ours_over_ct2_tokens_per_s": ours_row["target_tokens_per_s"] / (tokens / st["median_s"]),
               "ct2_length_penalty": "log p / length^alpha (ours: / ((5 + length) / 6)^alpha)"}
        if forced is None:
            same = sum(a == b for a, b in zip(hyps, ours_outs))
            row["identical_translations"] = same / len(hyps)
        row.update(convert_load_wall_s=load_s, runs_wall_s=runs_s, row_wall_s=time.perf_counter() - t_row)
        log(f"{v.name}: CTranslate2 ({form}), beam {beam}, {size} per batch done in {row['row_wall_s']:.1f} s wall "
            f"({'converted earlier' if load_s is None else f'conversion and load {load_s:.1f} s'}, warm-up and {cfg.repeats} timed "
            f"repeats {runs_s:.1f} s, median {st['median_s']:.3f} s)")
        out.append(row)
        emit(row)
    return out


def table_rows(res: dict) -> list:
    """Strings for the CLI table (``TABLE_COLUMNS``)."""
    def f(x, spec="{:.4g}"):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else spec.format(x)

    out = []
    for r in res["rows"]:
        out.append([r["variant"], "ours", "greedy" if r["beam"] == 1 else f"beam {r['beam']}",
                    str(r["batch_sentences"]), f(r["sentences_per_s"], "{:.1f}"), f(r["target_tokens_per_s"], "{:.0f}"),
                    f(r["us_per_token"]), f(r.get("encoder_us_per_token")), f(r.get("decoder_us_per_token")),
                    f(r["bound_us_per_token"]), f(r["x_bound"], "{:.2f}"), "-"])
    for p in res["peers"]:
        if "skipped" in p:
            continue
        name = "ct2" + (f" ({p['mqa_form']})" if p.get("mqa_form") else "")
        out.append([p["variant"], name, "greedy" if p["beam"] == 1 else f"beam {p['beam']}",
                    str(p["batch_sentences"]), f(p["sentences_per_s"], "{:.1f}"), f(p["target_tokens_per_s"], "{:.0f}"),
                    f(p["us_per_token"]), "-", "-", "-", "-", f(p["ours_over_ct2_tokens_per_s"], "{:.2f}x")])
    return out


TABLE_COLUMNS = ["variant", "impl", "search", "batch", "sent/s", "tgt tok/s", "us/token", "enc us/tok",
                 "dec us/tok", "bound us", "x bound", "ours/ct2"]
