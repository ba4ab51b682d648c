"""The report's tables: the paper's Tables 1-3, the cost model beside measurement, two GPUs against one.

Each builder takes what :mod:`mqa_repro.report` collected from ``results/`` (runs grouped by spec and
variant, decode-bench JSON, multi-GPU summaries) and returns a :class:`Table`: columns, rows of plain values
(a (mean, sd, n) tuple where seeds are averaged) and a caption naming the data, scale, device and code.
Row names and their order are the paper's (:mod:`mqa_repro.paper`), uptrained rows after them.
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import paper
from .errors import UserError
from .names import METHODS, parse_uptrain_name
from .spec import Variant, kv_cache_bytes
from .textio import as_sacrebleu_cli_reads, read_lines

MISSING = "–"
NOT_COMPUTED = "not computed"   # a p-value the report was told not to compute (--bootstrap 0)


def format_number(x, digits=None) -> str:
    if x is None:
        return MISSING
    if isinstance(x, str):
        return x
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return MISSING
        if digits is not None:
            return f"{x:.{digits}f}"
        a = abs(x)
        return (f"{x:.3f}" if a < 10 else f"{x:.2f}" if a < 100 else f"{x:.1f}" if a < 10000
                else f"{x:,.0f}")
    return str(x)


# --------------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------------
def _mean_sd(values: list):
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    sd = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), sd, len(values)


def _bleu(m: dict, split: str, beam: int, tokenizer: str):
    for b in (m or {}).get("bleu", []):
        if b["split"] == split and b["beam"] == beam and b["tokenizer"] == tokenizer:
            return b
    return None


def _ln_ppl(m: dict, split: str, key: str = "ln_ppl_per_subword"):
    p = (m or {}).get("perplexity", {}).get(split)
    return p.get(key) if isinstance(p, dict) else None


def row_label(name: str) -> str:
    """The paper's row label, or one for an uptrained row (``mqa-repro uptrain``)."""
    u = parse_uptrain_name(name)
    if u:
        kind = "multi-query" if u["kv_heads"] == 1 else f"{u['kv_heads']} K/V heads"
        amount = f"{u['amount']:g}%" if u["unit"] == "pct" else f"{u['amount']:g} steps"
        src = paper.ROW_LABELS.get(u["source"], u["source"])
        return f"{src} → {kind}, uptrained {amount} ({u['method']} init.)"
    return paper.ROW_LABELS.get(name, name)


def row_order(names) -> list:
    known = list(paper.ROW_LABELS)

    def key(n):
        if n in known:
            return (known.index(n), 0, 0, 0.0, n)
        u = parse_uptrain_name(n)
        if u:   # by K/V heads, then mean / first / random, then the amount of uptraining
            return (len(known), u["kv_heads"], METHODS.index(u["method"]), u["amount"], n)
        return (len(known) + 1, 0, 0, 0.0, n)

    return sorted(names, key=key)


@dataclass
class Table:
    key: str
    title: str
    columns: list          # (key, header)
    rows: list             # dicts
    caption: str = ""
    notes: list = field(default_factory=list)


def _shape_cells(v: Variant) -> dict:
    m = v.model
    return {"h": m.n_heads, "kv_heads": m.n_kv_heads, "d_k": m.d_k, "d_ff": m.d_ff,
            "window": m.window or "", "params_m": round(m.n_params / 1e6, 2),
            "kv_bytes_per_token": kv_cache_bytes(m)["self_per_token"]}


def _caption(spec: str, runs: list, what: str) -> str:
    v = runs[0].resolved
    shas = sorted({r.git_sha[:12] for r in runs})
    devices = sorted({r.device for r in runs})
    scale = (f"{v.model.encoder_layers}+{v.model.decoder_layers} layers" if v.model.is_seq2seq
             else f"{v.model.decoder_layers} layers") + f", d_model {v.model.d_model}"
    dtype = "bf16 autocast" if any("cuda" in str(d).lower() or "h100" in str(d).lower() or "nvidia" in str(d).lower()
                                   for d in devices) else "fp32"
    toks = sorted({(str((r.tokenizer or {}).get("sentencepiece_version") or "?"),
                    str((r.tokenizer or {}).get("spm_sha256") or "?")[:12]) for r in runs})
    tok = "; ".join(f"SentencePiece {ver}, model sha256 {sha}" for ver, sha in toks)
    return (f"{what}: spec `{spec}` (corpus {v.data.corpus}, {scale}, {v.training.steps} steps); trained on "
            f"{', '.join(devices)} ({dtype}); code {', '.join(shas)}; tokenizer {tok}; {len(runs)} runs.")


def table1(spec: str, variants: dict, bootstrap_samples: int = 1000) -> Table:
    """Translation quality: our rows beside the paper's Table 1."""
    any_run = next(iter(variants.values()))[0].resolved
    tok = any_run.evaluation.bleu_tokenizers[0]
    tests = list(any_run.data.test)
    beams = sorted(set(any_run.evaluation.beams))
    top = max(beams)
    cols = [("variant", "attention"), ("h", "h"), ("kv_heads", "K/V heads"), ("d_k", "d_k, d_v"), ("d_ff", "d_ff"),
            ("window", "window"), ("params_m", "params (M)"), ("seeds", "seeds"),
            ("ln_ppl_dev", "ln(PPL) dev"), ("ln_ppl_word_dev", "ln(PPL) dev per word"), ("paper_ln_ppl_dev", "paper"),
            ("bleu_dev", "BLEU dev"), ("paper_bleu_dev", "paper")]
    for t in tests:
        for b in beams:
            cols.append((f"bleu_{t}_b{b}", f"BLEU {t} beam {b}"))
        cols.append((f"delta_{t}_b{top}", f"Δ vs multi-head (beam {top})"))
        cols.append((f"p_{t}_b{top}", "p (paired bootstrap)"))
    cols += [("paper_bleu_test", "paper test beam 1 / 4")]
    base_runs = variants.get("multi_head", [])
    base_vals = {}
    rows = []
    for name in row_order(variants):
        runs = variants[name]
        ms = [r.metrics for r in runs]
        row = {"variant": name, **_shape_cells(runs[0].resolved)}
        row["seeds"] = sum(m is not None for m in ms)
        row["ln_ppl_dev"] = _mean_sd([_ln_ppl(m, any_run.data.dev) for m in ms])
        row["ln_ppl_word_dev"] = _mean_sd([_ln_ppl(m, any_run.data.dev, "ln_ppl_per_word") for m in ms])
        row["bleu_dev"] = _mean_sd([(_bleu(m, any_run.data.dev, 1, tok) or {}).get("score") for m in ms])
        for t in tests:
            for b in beams:
                row[f"bleu_{t}_b{b}"] = _mean_sd([(_bleu(m, t, b, tok) or {}).get("score") for m in ms])
        p = paper.TABLE1.get(name)
        row["paper_ln_ppl_dev"] = p["ln_ppl_dev"] if p else None
        row["paper_bleu_dev"] = p["bleu_dev"] if p else None
        row["paper_bleu_test"] = (f"{format_number(p['bleu_test_b1'], 1)} / {format_number(p['bleu_test_b4'], 1)}" if p else None)
        rows.append(row)
        if name == "multi_head":
            base_vals = row
    for row in rows:
        for t in tests:
            key = f"bleu_{t}_b{top}"
            mine, base = row[key][0], (base_vals.get(key) or (None,))[0]
            row[f"delta_{t}_b{top}"] = None if mine is None or base is None or row["variant"] == "multi_head" \
                else mine - base
            row[f"p_{t}_b{top}"] = (None if row["variant"] == "multi_head" or not base_runs else
                                    NOT_COMPUTED if bootstrap_samples <= 0 else
                                    _paired_p(base_runs, variants[row["variant"]], t, top, tok, bootstrap_samples))
    runs_all = [r for rs in variants.values() for r in rs]
    cap = _caption(spec, runs_all, "Table 1 (translation quality)")
    p_note = (f"p: sacrebleu paired bootstrap ({bootstrap_samples} samples) of the lowest common seed against "
              f"multi-head" if bootstrap_samples > 0 else f"p: {NOT_COMPUTED} (--bootstrap 0)")
    cap += (f" ln(PPL) dev: summed NLL (nats) per target subword (EOS included; depends on the SentencePiece "
            f"model); per word: the same NLL per whitespace word of the reference text plus one EOS per sentence "
            f"(independent of the tokenizer)."
            f" BLEU: sacrebleu, tokenizer {tok}; mean ± sd over seeds; {p_note}. Paper columns: WMT14 "
            f"EN-DE at full scale (newstest2013 dev, newstest2014 test).")
    return Table(f"table1_{spec}", f"Table 1 — translation quality ({spec})", cols, rows, cap)


def _paired_p(base_runs, runs, split, beam, tok, samples):
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    seeds = sorted({r.seed for r in base_runs} & {r.seed for r in runs})
    for seed in seeds:
        b = next(r for r in base_runs if r.seed == seed)
        v = next(r for r in runs if r.seed == seed)
        bb, vb = _bleu(b.metrics, split, beam, tok), _bleu(v.metrics, split, beam, tok)
        if not (bb and vb and bb.get("ref_file") and bb.get("hyp_file") and vb.get("hyp_file")):
            continue
        try:
            # '\n'-only lines, as evaluate wrote and scored them (a '\r' or U+2028 stays inside its line)
            refs, hb, hv = (as_sacrebleu_cli_reads(read_lines(p)) for p in
                            (b.dir / bb["ref_file"], b.dir / bb["hyp_file"], v.dir / vb["hyp_file"]))
        except (OSError, UserError):
            continue
        if not (len(refs) == len(hb) == len(hv)):
            continue
        _, res = PairedTest([("base", hb), ("variant", hv)], {"BLEU": BLEU(tokenize=tok)}, [refs],
                            test_type="bs", n_samples=samples)()
        return res["BLEU"][1].p_value
    return None


def table3(spec: str, variants: dict) -> Table:
    any_run = next(iter(variants.values()))[0].resolved
    dev, tests = any_run.data.dev, list(any_run.data.test)
    cols = [("variant", "attention"), ("h", "h"), ("kv_heads", "K/V heads"), ("d_k", "d_k, d_v"), ("d_ff", "d_ff"),
            ("params_m", "params (M)"), ("seeds", "seeds"), ("ppl_dev", "PPL dev (subword)"),
            ("ppl_dev_word", "PPL dev (word)"), ("paper_ppl_dev", "paper PPL dev")]
    for t in tests:
        cols.append((f"ppl_{t}", f"PPL {t} (subword)"))
    rows = []
    for name in row_order(variants):
        runs = variants[name]
        ms = [r.metrics for r in runs]
        row = {"variant": name, **_shape_cells(runs[0].resolved), "seeds": sum(m is not None for m in ms)}

        def ppl(m, split, key="ppl_per_subword"):
            return ((m or {}).get("perplexity", {}).get(split) or {}).get(key)

        row["ppl_dev"] = _mean_sd([ppl(m, dev) for m in ms])
        row["ppl_dev_word"] = _mean_sd([ppl(m, dev, "ppl_per_word") for m in ms])
        for t in tests:
            row[f"ppl_{t}"] = _mean_sd([ppl(m, t) for m in ms])
        p = paper.TABLE3.get(name)
        row["paper_ppl_dev"] = p["ppl_dev"] if p else None
        rows.append(row)
    runs_all = [r for rs in variants.values() for r in rs]
    cap = _caption(spec, runs_all, "Table 3 (language modelling)") + \
        (" Paper column: LM1B at full scale (192M parameters, 136k steps); perplexity per subword token. PPL (word): "
         "exp(summed NLL / (whitespace words + one EOS per line)) over the same, untruncated text: independent of "
         "the tokenizer.")
    return Table(f"table3_{spec}", f"Table 3 — language modelling ({spec})", cols, rows, cap)


def table2(path: Path, bench: dict) -> Optional[Table]:
    from .bench import NOISY_SPREAD, is_noisy, spread

    rows_in = [r for r in bench.get("rows", []) if not r.get("sweep")]
    if not rows_in:
        return None
    by = defaultdict(dict)
    for r in rows_in:
        by[r["variant"]][(r["measure"], r["beam"])] = r
    beams = sorted({r["beam"] for r in rows_in if r["measure"] == "decoder"})
    top = max(beams) if beams else 1
    cols = [("variant", "attention"), ("train", "training"), ("paper_train", "paper"),
            ("enc_greedy", "inference enc."), ("dec_greedy", "inference dec."), ("paper_greedy", "paper enc. + dec."),
            ("dec_greedy_bound", "dec. roofline"), ("dec_greedy_frac", "fraction of roofline"),
            ("speedup", "dec. speed-up vs multi-head")]
    noisy_col = ("noisy", "noisy repeats")
    if top > 1:
        cols += [("enc_beam", f"beam-{top} enc."), ("dec_beam", f"beam-{top} dec."),
                 ("paper_beam", "paper enc. + dec."), ("dec_beam_hyp", f"beam-{top} dec. per hypothesis token"),
                 ("dec_beam_frac", "fraction of roofline")]
    base_dec = (by.get("multi_head", {}).get(("decoder", 1)) or {}).get("us_per_token")
    rows = []
    for name in row_order(by):
        d = by[name]
        g, b = d.get(("decoder", 1)), d.get(("decoder", top))
        enc = d.get(("encoder", 0))
        p = paper.TABLE2.get(name)
        row = {"variant": name,
               "train": (d.get(("train", 0)) or {}).get("us_per_token"),
               "paper_train": p["training"] if p else None,
               "enc_greedy": enc["us_per_token"] if enc else None,
               "dec_greedy": g["us_per_token"] if g else None,
               "paper_greedy": f"{p['enc_greedy']} + {p['dec_greedy']}" if p else None,
               "dec_greedy_bound": g["bound_us_per_token"] if g else None,
               "dec_greedy_frac": (1 / g["x_bound"]) if g and g.get("x_bound") else None,
               "speedup": (base_dec / g["us_per_token"]) if (g and base_dec) else None}
        flagged = [(label, r) for label, r in (("training", d.get(("train", 0))), ("enc.", enc), ("dec. greedy", g),
                                               (f"dec. beam {top}", b if top > 1 else None)) if r and is_noisy(r)]
        row["noisy"] = ", ".join(f"{label} ({spread(r):.0%})" for label, r in flagged) or None
        if top > 1:
            row.update({"enc_beam": enc["us_per_token"] if enc else None,
                        "dec_beam": b["us_per_token"] if b else None,
                        "paper_beam": f"{p['enc_beam4']} + {p['dec_beam4']}" if p else None,
                        "dec_beam_hyp": b.get("us_per_hyp_token") if b else None,
                        "dec_beam_frac": (1 / b["x_bound"]) if b and b.get("x_bound") else None})
        rows.append(row)
    cols.append(noisy_col)
    prov = bench.get("provenance", {})
    dev = prov.get("device", {}).get("name", "?")
    cfg = bench.get("config", {})
    one = rows_in[0]
    cap = (f"Table 2 (cost, µs per output token = time / (batch × target length)): {path.name} on {dev}, "
           f"{one.get('dtype', cfg.get('dtype'))}, batch {cfg.get('batch')}, source {cfg.get('src_len')}, "
           f"target {cfg.get('tgt_len')}; median of {one.get('repeats')} repeats after warm-up; code "
           f"{str(prov.get('git_sha', '?'))[:12]}. Roofline: max(bytes / measured bandwidth, FLOPs / measured "
           f"peak) per step. Paper: {paper.TABLE2_DEVICE}, batch 1024, length 128. Noisy repeats: (max - min) / "
           f"median of a measurement's repeats above {NOISY_SPREAD:.0%}; its times and ratios are not to be "
           f"trusted.")
    return _bench_table("table2", "Table 2 — cost", dev, path, cols, rows, cap)


def _bench_table(prefix: str, what: str, device: str, path: Path, cols: list, rows: list, cap: str) -> Table:
    """A table made from the decode-bench result ``path``: keyed and titled by its folder and file name."""
    return Table(f"{prefix}_{path.parent.name}_{path.stem}", f"{what} ({device}, {path.parent.name}/{path.name})",
                 cols, rows, cap)


def _datasheet(device_name: str):
    """The cost model's datasheet preset for a measured device, if it has one."""
    from .devices import DEVICES

    for key in ("h100", "h200", "a100"):
        if key in str(device_name).lower():
            return DEVICES[key]
    return None


def table_cost_model(path: Path, bench: dict) -> Optional[Table]:
    """The analytic cost model (``mqa-repro cost-model``) beside the decode-bench measurements it predicts:
    once with the device's datasheet ceilings, once with the ceilings decode-bench measured (= the roofline
    column of Table 2), and the measured time over each prediction."""
    from .bench import significant
    from .costmodel import critical_batch, predict_decode_step, predict_decoder_us_per_token

    rows_in = [r for r in bench.get("rows", []) if r.get("measure") == "decoder" and not r.get("sweep")]
    specs = bench.get("variants", {})
    if not rows_in or not specs:
        return None
    prov = bench.get("provenance", {})
    dev_name = prov.get("device", {}).get("name", "?")
    sheet = _datasheet(dev_name)
    ceil = bench.get("ceilings", {})
    cols = [("variant", "attention"), ("beam", "beam"), ("measured", "measured µs/token")]
    if sheet:
        cols += [("model_sheet", f"model, {sheet.device} datasheet"), ("x_sheet", "measured / model")]
    cols += [("model_measured", "model, measured ceilings"), ("x_measured", "measured / model"),
             ("bound", "bound at t = L/2"), ("critical_batch", "compute-bound from batch")]
    rows, order = [], row_order(specs)
    mine = [r for r in rows_in if r["variant"] in specs]
    for r in sorted(mine, key=lambda r: (order.index(r["variant"]), r["beam"])):
        m = Variant.from_dict(specs[r["variant"]]).model
        src = r.get("src_len", 0) if m.is_seq2seq else 0
        dtype, mid = r.get("dtype", "bf16"), max(1, r["tgt_len"] // 2)
        args = (m, r["batch"], src, r["tgt_len"], r["beam"])
        row = {"variant": r["variant"], "beam": r["beam"], "measured": r["us_per_token"]}
        if sheet:
            row["model_sheet"] = predict_decoder_us_per_token(*args, sheet.bandwidth_Bps, sheet.peak_flops, dtype)
            row["x_sheet"] = r["us_per_token"] / row["model_sheet"]
        if ceil.get("bandwidth_Bps") and ceil.get("peak_flops"):
            bw, fl = ceil["bandwidth_Bps"], ceil["peak_flops"]
            row["model_measured"] = predict_decoder_us_per_token(*args, bw, fl, dtype)
            row["x_measured"] = r["us_per_token"] / row["model_measured"]
            row["bound"] = predict_decode_step(m, r["batch"], mid, src, bw, fl, r["beam"], dtype).bound
            cb = critical_batch(m, mid, src, bw, fl, r["beam"], dtype)
            row["critical_batch"] = round(cb) if cb is not None else "never"
        rows.append(row)
    cap = (f"Cost model against measurement: {path.parent.name}/{path.name} on {dev_name}. Model = sum over the "
           f"decode steps of max(bytes / bandwidth, FLOPs / peak) per step, from `mqa_repro.costmodel` "
           f"({'datasheet: ' + sheet.source + '; ' if sheet else ''}measured: "
           f"{significant((ceil.get('bandwidth_Bps') or 0) / 1e12)} TB/s copy, "
           f"{significant((ceil.get('peak_flops') or 0) / 1e12)} TFLOP/s matmul). measured / model = 1 would mean "
           f"the decoder runs at the physical limit; the rest is what the implementation leaves on the table. "
           f"'bound' is the term that limits a step half-way through the decode; 'compute-bound from batch' the "
           f"batch (sentences) above which that step turns compute-bound.")
    return _bench_table("costmodel", "Cost model vs measurement", dev_name, path, cols, rows, cap)


def table_multi_gpu(path: Path, summary: dict) -> Optional[Table]:
    """Two GPUs against one: DDP training throughput and batch-sharded greedy decoding (scripts/two_gpus.sh)."""
    train, dec = summary.get("training", {}), summary.get("decoding", {})
    if not train and not dec:
        return None
    cols = [("variant", "attention"), ("tok_1", "train tokens/s, 1 GPU"), ("tok_2", "train tokens/s, 2 GPUs"),
            ("scaling", "scaling"), ("loss_diff", "loss curve max rel. diff (same global batch)"),
            ("dec_1", "decoder µs/token, 1 GPU"), ("dec_bound", "1-GPU roofline"),
            ("dec_2", "decoder µs/token, 2 GPUs (batch-sharded)"), ("dec_speedup", "decoding speed-up")]
    rows = []
    for name in row_order(set(train) | set(dec)):
        t, d = train.get(name, {}), dec.get(name, {})
        rows.append({"variant": name, "tok_1": t.get("tokens_per_s_1gpu_per_gpu_batch_16k"),
                     "tok_2": t.get("tokens_per_s_2gpu_per_gpu_batch_16k"), "scaling": t.get("scaling_2gpu_over_1gpu"),
                     "loss_diff": t.get("loss_curve_max_rel_diff_2gpu_vs_1gpu_same_global_batch"),
                     "dec_1": d.get("us_per_token_1gpu"), "dec_bound": d.get("bound_us_per_token_1gpu"),
                     "dec_2": d.get("us_per_token_2gpu_batch_sharded"), "dec_speedup": d.get("speedup_2gpu")})
    prov = summary.get("provenance", {})
    run_devs = [r.get("device") for r in summary.get("runs", {}).values() if isinstance(r.get("device"), dict)]
    dev = (summary.get("decode_device") or (run_devs[0] if run_devs else {})).get("name", "?")
    one = next(iter(dec.values()), {})
    decoding = (f" Decoding: greedy, batch {one.get('batch', '?')}, {one.get('src_len', '?')}/{one.get('tgt_len', '?')}"
                f" tokens, each GPU holding half of the sequences (K/V cache sharded over the batch)." if dec else
                " Decoding not measured in this file.")
    cap = (f"Two GPUs ({dev}) against one: {path.parent.name}/{path.name}. Training: the paper-size model, "
           f"16k target tokens per GPU per step, DDP through torchrun and NCCL; the loss curve of 2 GPUs is "
           f"compared with 1 GPU at the same global batch (32k) where that run was made.{decoding} "
           f"{summary.get('notes', '')}; code {str(prov.get('git_sha', '?'))[:12]}.")
    return Table(f"multigpu_{path.parent.name}_{path.stem}", f"Two GPUs against one ({path.parent.name}/{path.name})",
                 cols, rows, cap)



# CTranslate2's forms of one model (``peers.MQA_FORMS``; None: a model with several K/V heads), as the table
# labels them: the documented num_heads_kv=1 copies the one K/V head to every head before caching.
CT2_FORM_COLUMNS = ((None, "ct2_mh", "multi-head"),
                    ("replicated", "ct2_replicated", "num_heads_kv=1 (K/V copied per head)"),
                    ("one_head", "ct2_one_head", "one K/V head (multi_query flag)"))


def table_real(path: Path, doc: dict) -> Table:
    """Translation throughput on real sentences (``decode-bench --real``, :mod:`mqa_repro.bench_real`).

    One row per (variant, beam, sentences per batch): our target tokens/s and µs per output token (whole,
    encoder, decoder), the fraction of the roofline (bound / measured time), CTranslate2's target tokens/s per
    form of the same weights ("–" where it was not run or was skipped) and ours / CTranslate2 against its fastest
    form (the ``ours_over_ct2_tokens_per_s`` of that form's row)."""
    peers = defaultdict(dict)   # (variant, beam, batch) -> form -> peer row
    skipped = []
    for p in doc.get("peers", []):
        if "skipped" in p:
            skipped.append(f"{p.get('variant', '?')}: {p['skipped']}")
            continue
        peers[(p["variant"], p["beam"], p["batch_sentences"])][p.get("mqa_form")] = p
    cols = [("variant", "attention"), ("search", "search"), ("batch_sentences", "sentences per batch"),
            ("tokens_per_s", "target tokens/s"), ("us_per_token", "µs per output token"),
            ("encoder_us", "encoder µs/token"), ("decoder_us", "decoder µs/token"),
            ("frac_bound", "fraction of roofline")]
    cols += [(key, f"CTranslate2 {label}, target tokens/s") for _, key, label in CT2_FORM_COLUMNS]
    cols.append(("ours_over_ct2", "ours / CTranslate2 (its fastest form)"))
    order = row_order({r["variant"] for r in doc["rows"]})
    rows = []
    for r in sorted(doc["rows"], key=lambda r: (order.index(r["variant"]), r["beam"], -r["batch_sentences"])):
        mine = peers.get((r["variant"], r["beam"], r["batch_sentences"]), {})
        row = {"variant": r["variant"], "search": "greedy" if r["beam"] == 1 else f"beam {r['beam']}",
               "batch_sentences": r["batch_sentences"], "tokens_per_s": r["target_tokens_per_s"],
               "us_per_token": r["us_per_token"], "encoder_us": r.get("encoder_us_per_token"),
               "decoder_us": r.get("decoder_us_per_token"),
               "frac_bound": (1 / r["x_bound"]) if r.get("x_bound") else None}
        for form, key, _ in CT2_FORM_COLUMNS:
            row[key] = (mine.get(form) or {}).get("target_tokens_per_s")
        best = max(mine.values(), key=lambda p: p["target_tokens_per_s"], default=None)
        row["ours_over_ct2"] = (r["target_tokens_per_s"] / best["target_tokens_per_s"]
                                if best and best["target_tokens_per_s"] else None)
        rows.append(row)
    prov, cfg, ts = doc.get("provenance") or {}, doc.get("config") or {}, doc.get("test_set") or {}
    dev = (prov.get("device") or {}).get("name", "?") if isinstance(prov.get("device"), dict) else "?"
    forced = {bool(r.get("forced_lengths")) for r in doc["rows"]}
    lengths = ("output lengths forced to each reference's (random weights; EOS ignored)" if forced == {True}
               else "each sentence ends at its EOS or decode limit (trained checkpoint)" if forced == {False}
               else "forced lengths and EOS mixed")
    versions = sorted({str(p.get("ctranslate2")) for m in peers.values() for p in m.values() if p.get("ctranslate2")})
    methods = sorted({p.get("method") for m in peers.values() for p in m.values() if p.get("method")})
    repeats = sorted({r.get("repeats", cfg.get("repeats")) for r in doc["rows"]}, key=str)
    dtypes = sorted({str(r.get("dtype", cfg.get("dtype"))) for r in doc["rows"]})
    cap = (f"Translation throughput on real sentences: {path.parent.name}/{path.name} on {dev}, "
           f"{', '.join(dtypes)}; test set {ts.get('stem', '?')}, {ts.get('sentences', '?')} sentences; {lengths}; "
           f"median of {', '.join(map(str, repeats))} repeats after a warm-up; code "
           f"{str(prov.get('git_sha', '?'))[:12]}. Target tokens = decoder steps (output subwords + EOS where "
           f"emitted), per sentence; µs per output token = median time / target tokens; encoder = the engine's "
           f"encoder clock, decoder = whole - encoder; fraction of roofline = bound of the work done / measured "
           f"time. CTranslate2 {', '.join(versions) or '(not run)'} on the same weights and sentences"
           + (f", method: {'; '.join(methods)}" if methods else "") + "."
           + (f" CTranslate2 skipped: {'; '.join(skipped)}." if skipped else "")
           + (" Incomplete: the run stopped (its time limit) after the rows shown; the grid's other rows were not "
              "measured." if doc.get("complete") is False else ""))
    return _bench_table("real", "Translation throughput on real sentences", dev, path, cols, rows, cap)
