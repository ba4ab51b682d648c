"""The paper's Tables 1-3 (and plots) from the files the tool wrote under ``results/``, and nothing else.

A run directory (``results/<spec>/<variant>/seed<N>/``) contributes through its ``manifest.json`` and
``metrics.json``; a decode benchmark through the JSON that ``decode-bench --out`` wrote (any ``*.json``
under the results folder whose ``kind`` is ``decode-bench``). Missing numbers are shown as missing.
Runs of one variant made from different resolved specs are never averaged together: the newest spec
hash wins and the others are listed as excluded; code versions (git shas) are named in the caption.
Nor are runs of one spec made from different prepared data (another SentencePiece model or version, other
source files: the manifests' ``data_manifest_hash``) averaged or compared: the newest run's data wins and
the others are listed apart with the reason; the caption names the SentencePiece version and model hash.
Unfinished runs (status not ``finished``, or checkpoint, metrics or training log short of the spec's
``training.steps``) are listed apart with the reason, never put into a table under that step count.
"""
from __future__ import annotations

import csv
import io
import json
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


# --------------------------------------------------------------------------------------------------
# Collecting
# --------------------------------------------------------------------------------------------------
@dataclass
class Run:
    dir: Path
    spec: str
    variant: str
    seed: int
    spec_hash: str
    git_sha: str
    created: str
    resolved: Variant
    metrics: Optional[dict]
    device: str
    data_hash: Optional[str] = None   # data_manifest_hash: what the prepared data is (incl. the spm model)
    tokenizer: Optional[dict] = None  # sentencepiece version, spm sha256, pieces


@dataclass
class Collection:
    root: Path
    runs: dict = field(default_factory=dict)      # spec -> variant -> [Run] (one spec hash)
    excluded: list = field(default_factory=list)  # (path, reason)
    benches: list = field(default_factory=list)   # (path, decode-bench JSON)
    multi_gpu: list = field(default_factory=list)  # (path, multi-GPU summary JSON: scripts/ddp_summary.py)


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        return e


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _metrics_problem(m) -> Optional[str]:
    """Why a metrics.json cannot be read as ``evaluate`` writes it (None: it can)."""
    if not isinstance(m, dict):
        return f"metrics.json holds a JSON {type(m).__name__}, not an object"
    bleu = m.get("bleu", [])
    if not isinstance(bleu, list):
        return "metrics.json: 'bleu' is not a list"
    for i, b in enumerate(bleu):
        if not isinstance(b, dict):
            return f"metrics.json: BLEU entry {i + 1} is not an object"
        lacking = [k for k in ("split", "beam", "tokenizer", "score") if k not in b]
        if lacking:
            return f"metrics.json: BLEU entry {i + 1} lacks {', '.join(lacking)}"
        if not _is_num(b["score"]) or not _is_num(b["beam"]):
            return f"metrics.json: BLEU entry {i + 1} has a score or beam that is not a number"
    ppl = m.get("perplexity", {})
    if not isinstance(ppl, dict):
        return "metrics.json: 'perplexity' is not an object"
    for split, p in ppl.items():
        if not isinstance(p, dict):
            return f"metrics.json: perplexity of {split!r} is not an object"
        bad = [k for k in ("ln_ppl_per_subword", "ppl_per_subword", "ppl_per_word") if k in p and not _is_num(p[k])]
        if bad:
            return f"metrics.json: perplexity of {split!r} has {bad[0]} that is not a number"
    return None


_BENCH_ROW_KEYS = ("variant", "measure", "beam", "batch", "tgt_len", "us_per_token")


def _bench_problem(d: dict) -> Optional[str]:
    """Why a decode-bench JSON cannot make a Table 2 (None: it can)."""
    rows = d.get("rows")
    if not isinstance(rows, list):
        return "decode-bench result without a list of rows"
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            return f"decode-bench row {i + 1} is not an object"
        lacking = [k for k in _BENCH_ROW_KEYS if k not in r]
        if lacking:
            return f"decode-bench row {i + 1} lacks {', '.join(lacking)}"
        nums = ("beam", "batch", "tgt_len", "us_per_token", "bound_us_per_token", "x_bound", "us_per_hyp_token",
                "us_per_token_min", "us_per_token_max")
        bad = [k for k in nums if k in r and r[k] is not None and not _is_num(r[k])]
        if bad or not _is_num(r["us_per_token"]):
            return f"decode-bench row {i + 1} has {(bad or ['us_per_token'])[0]} that is not a number"
    for key in ("variants", "ceilings", "provenance", "config"):
        if not isinstance(d.get(key, {}), dict):
            return f"decode-bench result whose {key!r} is not an object"
    for name, vd in d.get("variants", {}).items():
        try:
            Variant.from_dict(vd)
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            return f"decode-bench result whose spec of {name!r} does not load ({type(e).__name__}: {e})"
    return None


def collect(root) -> Collection:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory of results (run `mqa-repro train`/`evaluate` first)")
    col = Collection(root)
    by_key = defaultdict(list)
    for man_path in sorted(root.rglob("manifest.json")):
        run_dir = man_path.parent
        if len(man_path.relative_to(root).parts) > 4:
            continue  # not <spec>/<variant>/seed<N>/ (e.g. the runs behind a multi-GPU summary)
        man = _load_json(man_path)
        if isinstance(man, Exception):
            col.excluded.append((str(run_dir), f"unreadable manifest.json ({man})"))
            continue
        if not isinstance(man, dict):
            col.excluded.append((str(run_dir), f"manifest.json holds a JSON {type(man).__name__}, not an object"))
            continue
        if "spec" not in man or not isinstance(man.get("spec"), dict) or "variant" not in man["spec"]:
            continue  # e.g. a prepared-data manifest
        try:
            resolved = Variant.from_dict(man["spec"])
        except Exception as e:  # noqa: BLE001 - a stale schema is reported, not fatal
            col.excluded.append((str(run_dir), f"spec in manifest.json does not load ({e})"))
            continue
        metrics = None
        if (run_dir / "metrics.json").exists():
            metrics = _load_json(run_dir / "metrics.json")
            if isinstance(metrics, Exception):
                col.excluded.append((str(run_dir), f"unreadable metrics.json ({metrics})"))
                metrics = None
            elif _metrics_problem(metrics):
                col.excluded.append((str(run_dir), _metrics_problem(metrics)))
                metrics = None
            elif metrics.get("spec_hash") not in (None, man.get("spec_hash")):
                col.excluded.append((str(run_dir), "metrics.json was computed for another spec hash"))
                metrics = None
        why = unfinished(man, metrics, resolved, run_dir)
        if why:
            col.excluded.append((str(run_dir), why))
            continue
        dev = man.get("device", {})
        run = Run(run_dir, resolved.spec_name, resolved.name, int(man.get("seed", 0)), man.get("spec_hash", ""),
                  man.get("git_sha", "unknown"), man.get("created", ""), resolved, metrics,
                  dev.get("name", "?") if isinstance(dev, dict) else str(dev),
                  man.get("data_manifest_hash"), man.get("tokenizer") if isinstance(man.get("tokenizer"), dict)
                  else None)
        by_key[(run.spec, run.variant)].append(run)
    for (spec, variant), runs in by_key.items():
        newest = max(runs, key=lambda r: r.created).spec_hash
        keep = [r for r in runs if r.spec_hash == newest]
        for r in runs:
            if r.spec_hash != newest:
                col.excluded.append((str(r.dir), f"spec hash {r.spec_hash[:12]} differs from the newest run's "
                                                 f"{newest[:12]} for {spec}/{variant}"))
        col.runs.setdefault(spec, {})[variant] = sorted(keep, key=lambda r: r.seed)
    for spec, variants in col.runs.items():   # one table compares runs of one prepared data set only
        newest = max((r for rs in variants.values() for r in rs), key=lambda r: r.created)
        for variant in list(variants):
            keep = []
            for r in variants[variant]:
                if r.data_hash == newest.data_hash:
                    keep.append(r)
                else:
                    col.excluded.append((str(r.dir), f"prepared data {_data_label(r)} differs from the newest "
                                                     f"{spec} run's {_data_label(newest)}; runs of different "
                                                     f"prepared data are not compared"))
            if keep:
                variants[variant] = keep
            else:
                del variants[variant]
    for p in sorted(root.rglob("*.json")):
        if p.name in ("manifest.json", "metrics.json"):
            continue
        d = _load_json(p)
        if isinstance(d, Exception):   # e.g. a truncated decode-bench result: say so, never drop it silently
            col.excluded.append((str(p), f"unreadable JSON ({d})"))
        elif isinstance(d, dict) and d.get("kind") == "decode-bench":
            problem = _bench_problem(d)
            if problem:
                col.excluded.append((str(p), problem))
            else:
                col.benches.append((p, d))
        elif isinstance(d, dict) and d.get("kind") == "multi-gpu":
            if all(isinstance(d.get(k, {}), dict) and all(isinstance(x, dict) for x in d.get(k, {}).values())
                   for k in ("training", "decoding")):
                col.multi_gpu.append((p, d))
            else:
                col.excluded.append((str(p), "multi-GPU summary whose training/decoding entries are not objects"))
    # decode-bench files beside a multi-GPU summary are its inputs: shown through it, not as Table 2s
    inputs = {p.parent for p, _ in col.multi_gpu}
    col.benches = [(p, d) for p, d in col.benches if p.parent not in inputs]
    return col


def _data_label(r: Run) -> str:
    """The prepared data of a run, in words: fingerprint, SentencePiece version and model hash."""
    t = r.tokenizer or {}
    spm = (f", SentencePiece {t.get('sentencepiece_version') or '?'} model {str(t.get('spm_sha256') or '?')[:12]}"
           if t else "")
    return f"{str(r.data_hash)[:12] if r.data_hash else 'unrecorded'}{spm}"


def _last_logged_step(run_dir: Path) -> Optional[int]:
    from .trainlog import read_log

    try:
        steps = [r.get("step") for r in read_log(run_dir / "train_log.jsonl")]
    except (OSError, UserError):
        return None
    steps = [s for s in steps if isinstance(s, int)]
    return max(steps) if steps else None


def unfinished(man: dict, metrics, v: Variant, run_dir: Path) -> Optional[str]:
    """Why a run has not trained all of its spec's ``training.steps`` (None when it has): its manifest's
    status or checkpoint step, the step its metrics were computed at, or its training log falls short."""
    steps = v.training.steps
    status = man.get("status")
    if status is not None and status != "finished":
        at = man.get("checkpoint_step")
        where = f"; its checkpoint is at step {at} of {steps}" if isinstance(at, int) else ""
        return f"unfinished: training status {status!r}{where} (resume it with `mqa-repro train --resume`)"
    for what, step in (("its checkpoint", man.get("checkpoint_step")),
                       ("its metrics were computed", (metrics or {}).get("checkpoint_step")
                        if isinstance(metrics, dict) else None),
                       ("its training log ends", _last_logged_step(run_dir))):
        if isinstance(step, int) and step < steps:
            return f"unfinished: {what} at step {step} of the spec's {steps}"
    return None


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


def _label(name: str) -> str:
    """The paper's row label, or one for an uptrained row (``mqa-repro uptrain``)."""
    u = parse_uptrain_name(name)
    if u:
        kind = "multi-query" if u["kv_heads"] == 1 else f"{u['kv_heads']} K/V heads"
        amount = f"{u['amount']:g}%" if u["unit"] == "pct" else f"{u['amount']:g} steps"
        src = paper.ROW_LABELS.get(u["source"], u["source"])
        return f"{src} → {kind}, uptrained {amount} ({u['method']} init.)"
    return paper.ROW_LABELS.get(name, name)


def _order(names) -> list:
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
    for name in _order(variants):
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
        row["paper_bleu_test"] = (f"{_num(p['bleu_test_b1'], 1)} / {_num(p['bleu_test_b4'], 1)}" if p else None)
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
    for name in _order(variants):
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
        cols += [(f"enc_beam", f"beam-{top} enc."), (f"dec_beam", f"beam-{top} dec."),
                 ("paper_beam", "paper enc. + dec."), ("dec_beam_hyp", f"beam-{top} dec. per hypothesis token"),
                 ("dec_beam_frac", "fraction of roofline")]
    base_dec = (by.get("multi_head", {}).get(("decoder", 1)) or {}).get("us_per_token")
    rows = []
    for name in _order(by):
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
    key = f"table2_{path.parent.name}_{path.stem}"
    return Table(key, f"Table 2 — cost ({dev}, {path.parent.name}/{path.name})", cols, rows, cap)


def _datasheet(device_name: str):
    """The cost model's datasheet preset for a measured device, if it has one."""
    from .costmodel import DEVICES

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
        cols += [("model_sheet", f"model, {sheet.name} datasheet"), ("x_sheet", "measured / model")]
    cols += [("model_measured", "model, measured ceilings"), ("x_measured", "measured / model"),
             ("bound", "bound at t = L/2"), ("critical_batch", "compute-bound from batch")]
    rows, order = [], _order(specs)
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
    key = f"costmodel_{path.parent.name}_{path.stem}"
    return Table(key, f"Cost model vs measurement ({dev_name}, {path.parent.name}/{path.name})", cols, rows, cap)


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
    for name in _order(set(train) | set(dec)):
        t, d = train.get(name, {}), dec.get(name, {})
        rows.append({"variant": name, "tok_1": t.get("tokens_per_s_1gpu_per_gpu_batch_16k"),
                     "tok_2": t.get("tokens_per_s_2gpu_per_gpu_batch_16k"), "scaling": t.get("scaling_2gpu_over_1gpu"),
                     "loss_diff": t.get("loss_curve_max_rel_diff_2gpu_vs_1gpu_same_global_batch"),
                     "dec_1": d.get("us_per_token_1gpu"), "dec_bound": d.get("bound_us_per_token_1gpu"),
                     "dec_2": d.get("us_per_token_2gpu_batch_sharded"), "dec_speedup": d.get("speedup_2gpu")})
    prov = summary.get("provenance", {})
    dev = (summary.get("decode_device") or {}).get("name", "?")
    one = next(iter(dec.values()), {})
    cap = (f"Two GPUs ({dev}) against one: {path.parent.name}/{path.name}. Training: the paper-size model, "
           f"16k target tokens per GPU per step, DDP through torchrun and NCCL; the loss curve of 2 GPUs is "
           f"compared with 1 GPU at the same global batch (32k). Decoding: greedy, batch "
           f"{one.get('batch', '?')}, {one.get('src_len', '?')}/{one.get('tgt_len', '?')} tokens, each GPU "
           f"holding half of the sequences (K/V cache sharded over the batch). {summary.get('notes', '')}; "
           f"code {str(prov.get('git_sha', '?'))[:12]}.")
    return Table(f"multigpu_{path.parent.name}", f"Two GPUs against one ({path.parent.name})", cols, rows, cap)


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------
def _num(x, digits=None) -> str:
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


def _digits(key: str) -> Optional[int]:
    """Fixed decimals where the quantity has a customary precision."""
    if "bleu" in key or key.startswith("delta_") or key == "params_m":
        return 2
    if "ln_ppl" in key or key.startswith("p_"):
        return 3
    if key.startswith("ppl") or key.startswith("paper_ppl"):
        return 2
    return None


def _cell(key: str, v) -> str:
    if isinstance(v, tuple):
        mean, sd, n = v
        if mean is None:
            return MISSING
        d = _digits(key)
        return _num(mean, d) + (f" ± {_num(sd, d)}" if sd is not None else "")
    if key.startswith("delta_") and isinstance(v, float):
        return f"{v:+.2f}"
    if isinstance(v, float) and _digits(key) is not None:
        return _num(v, _digits(key))
    if key == "variant":
        return _label(v)
    if key == "window" and v == "":
        return MISSING
    return _num(v)


def _plain(v):
    if isinstance(v, tuple):
        mean, sd, n = v
        return {"mean": mean, "sd": sd, "n": n}
    return v


def render_markdown(tables: list, excluded: list) -> str:
    out = []
    for t in tables:
        out.append(f"### {t.title}\n")
        out.append("| " + " | ".join(h for _, h in t.columns) + " |")
        out.append("|" + "---|" * len(t.columns))
        for r in t.rows:
            out.append("| " + " | ".join(_cell(k, r.get(k)) for k, _ in t.columns) + " |")
        out.append(f"\n*{t.caption}*\n")
    if excluded:
        out.append("### Runs not used\n")
        out += [f"- `{p}`: {why}" for p, why in excluded]
        out.append("")
    return "\n".join(out)


def render_csv(tables: list) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["table", "row", "column", "value", "sd", "n"])
    for t in tables:
        for r in t.rows:
            for k, _ in t.columns:
                if k == "variant":
                    continue
                v = r.get(k)
                if isinstance(v, tuple):
                    w.writerow([t.key, r["variant"], k, "" if v[0] is None else v[0], "" if v[1] is None else v[1], v[2]])
                else:
                    w.writerow([t.key, r["variant"], k, "" if v is None else v, "", ""])
    return buf.getvalue()


def render_json(tables: list, excluded: list) -> str:
    return json.dumps({"tables": [{"key": t.key, "title": t.title, "caption": t.caption,
                                   "columns": [{"key": k, "header": h} for k, h in t.columns],
                                   "rows": [{k: _plain(v) for k, v in r.items()} for r in t.rows]}
                                  for t in tables],
                       "excluded": [{"path": p, "reason": why} for p, why in excluded]}, indent=2, default=str)


def render_latex(tables: list) -> str:
    def esc(s: str) -> str:
        return (s.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("%", "\\%").replace("&", "\\&")
                .replace("#", "\\#").replace("±", "$\\pm$").replace("Δ", "$\\Delta$").replace("µ", "$\\mu$")
                .replace("×", "$\\times$").replace("–", "--"))
    out = []
    for t in tables:
        out.append("\\begin{table}[t]\\centering\\small")
        out.append("\\begin{tabular}{" + "l" + "r" * (len(t.columns) - 1) + "}\\toprule")
        out.append(" & ".join(esc(h) for _, h in t.columns) + " \\\\ \\midrule")
        for r in t.rows:
            out.append(" & ".join(esc(_cell(k, r.get(k))) for k, _ in t.columns) + " \\\\")
        out.append("\\bottomrule\\end{tabular}")
        out.append(f"\\caption{{{esc(t.caption)}}}\\end{{table}}\n")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------
def plots(col: Collection, tables: list, out_dir) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path, bench in col.benches:
        dev = bench.get("provenance", {}).get("device", {}).get("name", "?")
        for sweep, xkey, xlabel in (("batch", "batch", "batch size (sentences)"),
                                    ("length", "tgt_len", "sequence length (source = target)")):
            rows = [r for r in bench.get("rows", []) if r.get("sweep") == sweep and r["measure"] == "decoder"]
            if not rows:
                continue
            fig, ax = plt.subplots(figsize=(6.4, 4.4))
            for i, name in enumerate(_order({r["variant"] for r in rows})):
                rs = sorted((r for r in rows if r["variant"] == name), key=lambda r: r[xkey])
                xs = [r[xkey] for r in rs]
                line, = ax.plot(xs, [r["us_per_token"] for r in rs], "o-", label=_label(name))
                ax.plot(xs, [r["bound_us_per_token"] for r in rs], "--", color=line.get_color(), alpha=0.6)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("decoder µs per output token")
            ax.set_title(f"Incremental decoding on {dev} (dashed: roofline)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
            f = out_dir / f"decoder_vs_{sweep}_{path.parent.name}.png"
            fig.tight_layout()
            fig.savefig(f, dpi=120)
            plt.close(fig)
            written.append(f)
    for t in tables:
        if t.key.startswith("table1_"):
            ykeys = [k for k, _ in t.columns if k.startswith("bleu_") and k != "bleu_dev"]
            if ykeys:   # the first test set at the largest beam
                first = ykeys[0].rsplit("_b", 1)[0]
                ykey = max((k for k in ykeys if k.rsplit("_b", 1)[0] == first),
                           key=lambda k: int(k.rsplit("_b", 1)[1]))
                ylabel = ykey.replace("bleu_", "test BLEU ").replace("_b", ", beam ")
            else:
                ykey, ylabel = "bleu_dev", "dev BLEU"
        elif t.key.startswith("table3_"):
            ykey, ylabel = "ppl_dev", "dev perplexity (subword)"
        else:
            continue
        pts = [(r["kv_bytes_per_token"], r[ykey][0], r["variant"]) for r in t.rows   # the paper's rows (and GQA)
               if isinstance(r.get(ykey), tuple) and r[ykey][0] is not None and not parse_uptrain_name(r["variant"])]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for x, y, name in pts:
            ax.scatter([x], [y])
            ax.annotate(_label(name), (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("self-attention K/V cache bytes per decoded token per sequence (bf16)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"Quality against K/V-cache size ({t.key.split('_', 1)[1]})")
        ax.grid(True, alpha=0.3)
        f = out_dir / f"quality_vs_kv_{t.key.split('_', 1)[1]}.png"
        fig.tight_layout()
        fig.savefig(f, dpi=120)
        plt.close(fig)
        written.append(f)
    return written


# --------------------------------------------------------------------------------------------------
def build_tables(col: Collection, bootstrap_samples: int = 1000) -> list:
    tables, lm = [], []   # the paper's order: Table 1, Table 2 (each with its cost model), Table 3
    for spec in sorted(col.runs):
        variants = col.runs[spec]
        any_run = next(iter(variants.values()))[0].resolved
        if any_run.model.is_seq2seq:
            tables.append(table1(spec, variants, bootstrap_samples))
        else:
            lm.append(table3(spec, variants))
    for path, bench in col.benches:
        for make in (table2, table_cost_model):
            t = make(path, bench)
            if t is not None:
                tables.append(t)
    tables += lm
    for path, summary in col.multi_gpu:
        t = table_multi_gpu(path, summary)
        if t is not None:
            tables.append(t)
    return tables


def report(root, fmt: str = "md", plots_dir=None, bootstrap_samples: int = 1000, notes=None) -> tuple:
    """Render the tables of everything under ``root``; returns (text, list of plot files).

    ``notes``: a Markdown file whose text goes beneath the tables (Markdown output only): the place for
    the reader's commentary, kept apart so that re-running the report never loses it."""
    notes_text = None
    if notes is not None:
        notes = Path(notes)
        if fmt != "md":
            raise UserError("--notes goes with --format md only")
        if not notes.is_file():
            raise UserError(f"--notes: {notes} does not exist")
        notes_text = notes.read_text(encoding="utf-8")
    col = collect(root)
    tables = build_tables(col, bootstrap_samples)
    if not tables:
        raise UserError(f"{root} holds no evaluated runs and no decode-bench results to report")
    if fmt == "md":
        text = (f"# Results\n\nGenerated by `mqa-repro report` from the files under `{Path(root).as_posix()}` "
                f"alone; each caption names the runs' data, scale, device, dtype and code version.\n\n"
                + render_markdown(tables, col.excluded))
    elif fmt == "csv":
        text = render_csv(tables)
    elif fmt == "json":
        text = render_json(tables, col.excluded)
    elif fmt == "latex":
        text = render_latex(tables)
    else:
        raise UserError(f"unknown report format {fmt!r}; use md, csv, json or latex")
    written = plots(col, tables, plots_dir) if plots_dir else []
    if notes_text is not None:
        text = text.rstrip("\n") + "\n\n" + notes_text.strip("\n") + "\n"
    return text, written
