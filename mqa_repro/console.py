"""What the commands print: Rich tables on a terminal (plain, wide lines when piped) and notes on stderr.

Each ``show_*`` takes the result a library function returned (a plain dict or dataclass) and prints it;
nothing here computes a number.
"""
from __future__ import annotations

import math
import sys

from rich.console import Console
from rich.table import Table

# When piped, do not squeeze tables into 80 columns, and never break a printed line (a path, a message) in two.
out = Console(width=None if sys.stdout.isatty() else 200, soft_wrap=True)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200, soft_wrap=True)


def say(msg: str) -> None:
    """One progress or warning line on stderr, printed as is."""
    err.print(msg, highlight=False)


def _table(title: str, columns, rows, left=("variant",), caption=None) -> None:
    """Print one Rich table: ``columns`` titles (left-aligned when in ``left``), ``rows`` of strings."""
    t = Table(title=title, caption=caption)
    for col in columns:
        t.add_column(col, justify="left" if col in left else "right")
    for r in rows:
        t.add_row(*r)
    out.print(t)


def show_trained(name: str, r) -> None:
    """``train`` / ``uptrain``: one line for the run ``name`` (spec/variant) from ``r`` (``train.TrainResult``)."""
    ppl = f"{r.dev_ln_ppl:.4f}" if r.dev_ln_ppl is not None else "-"
    out.print(f"{name}: step {r.step}, dev ln(ppl) {ppl}; results in {r.run_dir}, checkpoint {r.checkpoint}",
              highlight=False)


def show_describe(s, rows: list) -> None:
    """``describe``: one line per variant of spec ``s`` (``spec.describe_rows``)."""
    cols = [("variant", "variant"), ("h", "n_heads"), ("kv", "n_kv_heads"), ("d_k", "d_k"),
            ("d_v", "d_v"), ("d_ff", "d_ff"), ("window", "window"), ("params", "params"),
            ("KV self B/tok", "kv_self_bytes_per_token"), ("KV cross B/src", "kv_cross_bytes_per_source_token")]
    cells = [[f"{r[key] / 1e6:.2f}M" if key == "params" else "-" if r[key] is None else str(r[key])
              for _, key in cols] for r in rows]
    _table(f"{s.name}: {s.description}" if s.description else s.name, [title for title, _ in cols], cells,
           caption="h: query heads, kv: key/value heads; KV cache bytes per sequence in bf16")


# how prepare treated examples over data.max_len, per policy (train: the spec's too_long; evaluation sets:
# truncated, LM text kept whole)
_HANDLED = {"truncate": "truncated", "drop": "dropped", "split": "split", "keep": "kept"}


def show_prepared(r) -> None:
    """``prepare``: the manifest of prepared data ``r`` (``prepare.Prepared``) as a table per split."""
    m = r.manifest
    if r.up_to_date:
        for note in r.notes:
            err.print(note, highlight=False)
        out.print(f"{r.path} is up to date (same sources and data section); nothing to do "
                  f"({r.seconds:.2f} s; --force prepares again).", highlight=False)
        return
    src = m["source"]
    where = f"{src['data_dir']}/{src['corpus']}" if src["kind"] == "local" else f"datasets hub {src['path']}"
    rows = []
    for stem, s in m["splits"].items():
        handled = "-" if not s["over_max"] else _HANDLED.get(s["policy"], s["policy"])
        rows.append([stem, s["role"], f"{s['lines']:,}", f"{s.get('blank_dropped', 0):,}", f"{s['examples']:,}",
                     *(f"{s['sides'][side]['token_count']:,}" for side in m["sides"]), f"{s['over_max']:,}",
                     handled])
    _table(f"{m['spec_name']}: {r.path} from {where}",
           ("split", "role", "lines", "blank", "examples", *(f"tokens {s}" for s in m["sides"]), "over max",
            "handled"), rows, left=("split", "role", "handled"),
           caption=f"SentencePiece {m['spm']['model_type']}, {m['spm']['pieces']} pieces "
                   f"(sha256 {m['spm']['sha256'][:12]}), at most {m['max_ids']} ids per example; "
                   f"{m['seconds']:.1f} s")


def show_metrics(m: dict) -> None:
    """``evaluate``: perplexities and BLEU scores of ``m`` (metrics.json)."""
    rows = []
    for stem, p in m["perplexity"].items():
        n = f", {p['sentences']:,} sentences" if "sentences" in p else ""
        rows.append([stem, "ln(ppl) per subword", f"{p['ln_ppl_per_subword']:.4f}", f"{p['subword_tokens']:,} tokens{n}"])
        if "ppl_per_word" in p:
            rows.append([stem, "ppl per word", f"{p['ppl_per_word']:.2f}", f"{p['words']:,} words (EOS included)"])
    for b in m["bleu"]:
        rows.append([b["split"], f"BLEU {b['tokenizer']} beam {b['beam']}", f"{b['score']:.2f}", b["signature"]])
    cap = (m.get("evaluation_settings") or {}).get("max_sentences")
    step, steps = m["checkpoint_step"], m.get("training_steps")
    unfinished = f" of {steps} (training unfinished; report lists the run apart)" if steps and step < steps else ""
    _table(f"{m['spec']}/{m['variant']} seed {m['seed']}, checkpoint step {step}{unfinished}",
           ("split", "metric", "value", "detail"), rows, left=("split", "metric", "detail"),
           caption=f"evaluation.max_sentences {cap}: each split's first {cap} sentences only (train's dev "
                   f"ln(ppl) covers the whole dev set)" if cap else None)


# --------------------------------------------------------------------------------------------------
# decode-bench
# --------------------------------------------------------------------------------------------------
def _fmt(x, spec="{:.3g}"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return spec.format(x)


def bench_table_rows(res: dict) -> list:
    """Strings for the decode-bench table: one list per row, the columns of ``BENCH_COLUMNS``."""
    from .bench import is_noisy

    out = []
    for r in res["rows"]:
        name = r["measure"] if r["measure"] != "decoder" else ("greedy" if r["beam"] == 1 else f"beam {r['beam']}")
        out.append([r["variant"], name, str(r["batch"]), f"{r['src_len']}/{r['tgt_len']}",
                    _fmt(r["us_per_token"], "{:.4g}") + (" noisy" if is_noisy(r) else ""),
                    f"{_fmt(r['us_per_token_min'], '{:.4g}')}-{_fmt(r['us_per_token_max'], '{:.4g}')}",
                    _fmt(r["us_per_hyp_token"], "{:.4g}"), _fmt(r["bound_us_per_token"], "{:.4g}"),
                    _fmt(r["x_bound"], "{:.2f}"), _fmt(r["mbu"], "{:.0%}"), _fmt(r["mfu"], "{:.0%}"),
                    _kv_mib(r.get("kv_cache_bytes"))])
    return out


def _kv_mib(n_bytes) -> str:
    """K/V-cache MiB: whole MiB from 10 up, three significant figures below (a tiny model's cache is < 1 MiB)."""
    if not n_bytes:
        return "-"
    mib = n_bytes / 2**20
    return f"{mib:.0f}" if mib >= 10 else f"{mib:.3g}"


BENCH_COLUMNS = ["variant", "measure", "batch", "src/tgt", "us/token", "min-max", "us/hyp token", "bound us",
                 "x bound", "MBU", "MFU", "KV MiB"]


def show_bench(res: dict, spec_name: str) -> None:
    """``decode-bench``: the Table 2 rows of ``res`` (``bench.run_bench``), the training projection, the
    peers and the noisy-row warning."""
    from .bench import NOISY_SPREAD, is_noisy, significant

    c, cfg = res["ceilings"], res["config"]
    _table(f"decode-bench {spec_name} on {c['device']} ({cfg['dtype']})", BENCH_COLUMNS, bench_table_rows(res),
           left=("variant", "measure"),
           caption=f"us per output token (time / batch / tgt_len, the paper's convention), median of "
                   f"{cfg['repeats']}; bound = roofline at {significant(c['bandwidth_Bps'] / 1e12)} TB/s, "
                   f"{significant(c['peak_flops'] / 1e12)} TFLOP/s"
                   + (f"; noisy: repeats spread by more than {NOISY_SPREAD:.0%} of the median"
                      if any(is_noisy(r) for r in res["rows"]) else ""))
    for r in res["rows"]:
        if r["measure"] == "train" and r.get("tokens_per_s"):
            mfu = f", MFU {r['mfu']:.1%}" if r.get("mfu") is not None else ""
            out.print(f"training step ({r['variant']}): {r['tokens_per_s']:.4g} target tokens/s{mfu}; the spec's "
                      f"{r['projected_train_steps']} steps: {r['projected_train_s'] / 3600:.2f} h on this device",
                      highlight=False)
    for p in res["peers"]:
        _show_peer(p)
    summary = res["summary"]
    if summary.get("noisy_rows"):
        err.print(f"warning: {len(summary['noisy_rows'])} noisy rows (repeats spread by more than "
                  f"{NOISY_SPREAD:.0%} of the median; the machine was busy?): "
                  f"{'; '.join(summary['noisy_rows'])}", highlight=False)
    if summary.get("multi_head_over_multi_query_decoder"):
        out.print(f"multi-head / multi-query greedy decoder: {summary['multi_head_over_multi_query_decoder']:.2f}x"
                  + (" (from noisy rows: not to be trusted)" if summary.get("multi_head_over_multi_query_decoder_noisy")
                     else ""), highlight=False)


def _show_peer(p: dict) -> None:
    """One line per peer measurement of the fixed-shape bench (CTranslate2 or Hugging Face)."""
    if p.get("peer") == "ct2":
        if "skipped" in p:
            out.print(f"peer ct2 ({p['variant']}): skipped: {p['skipped']}", highlight=False)
            return
        form = f", multi-query form {p['mqa_form']}" if p.get("mqa_form") else ""
        search = "greedy" if p["beam"] == 1 else f"beam {p['beam']}"
        out.print(f"peer ct2 ({p['variant']}{form}, {search}, {p['device']} {p['compute_type']}): "
                  f"{p['us_per_token']:.3g} us/token, {p.get('ratio_ct2_over_ours', float('nan')):.3g}x our "
                  f"time (encoder + decoder, same weights and shape)", highlight=False)
    elif "ratio_hf_over_ours" in p:
        out.print(f"peer hf ({p['variant']}): {p['us_per_token']:.3g} us/token, "
                  f"{p['ratio_hf_over_ours']:.1f}x ours (encoder + greedy decoder)", highlight=False)
    else:
        out.print(f"peer hf: {p.get('skipped') or p.get('error')}", highlight=False)


def show_real_bench(res: dict, spec_name: str, dtype: str) -> None:
    """``decode-bench --real``: throughput rows of ``res`` (``bench_real.run_real_bench``) and the peers."""
    from . import bench_real

    ts = res["test_set"]
    _table(f"decode-bench --real {spec_name}: {ts['sentences']} sentences of {ts['stem']} on "
           f"{res['ceilings']['device']} ({dtype}), {res['weights']}", bench_real.TABLE_COLUMNS,
           bench_real.table_rows(res), left=("variant", "impl", "search"),
           caption="target tokens = decoder steps (subwords + EOS where emitted); us/token = median time / "
                   "target tokens; encoder by the engine's clock, decoder = whole - encoder; bound = roofline of "
                   "the work done; ours/ct2 = our target tokens/s over CTranslate2's")
    for p in res["peers"]:
        if "skipped" in p:
            out.print(f"peer ct2 ({p['variant']}): skipped: {p['skipped']}", highlight=False)
        elif "method" in p:
            note = f"; identical translations {p['identical_translations']:.1%}" if "identical_translations" in p else ""
            out.print(f"ct2 {p['variant']} beam {p['beam']} x{p['batch_sentences']}: {p['method']}{note}",
                      highlight=False)


def show_cost_model(res, spec_name: str, dev, seq2seq: bool, src_len, beam: int, chips: int) -> None:
    """``cost-model``: the decode bounds, the memory-to-arithmetic ratios and (``chips`` > 1) the sharding."""
    from . import costmodel as cm

    mem = "?" if dev.memory_bytes is None else f"{dev.memory_bytes / 1e9:.4g} GB"
    src_note = "" if not seq2seq else f", source {src_len or '= context'}"
    tables = [(f"cost-model {spec_name} on {dev.device}: {dev.bandwidth_Bps / 1e12:.3g} TB/s, "
               f"{dev.peak_flops / 1e12:.4g} TFLOP/s, {mem}", cm.DECODE_COLUMNS, cm.decode_table_rows(res),
               f"one decoder step attending `context` positions{src_note}, beam {beam}, bf16; "
               f"us/token = step / batch; max batch / max context: what the device's memory holds beside the "
               f"weights (memory alone, not the model's learned positions); {dev.source}"),
              ("memory-to-arithmetic per step (Shazeer 2019)", cm.RATIO_COLUMNS, cm.ratio_table_rows(res),
               "paper: the Θ expression evaluated (d = d_model, h = heads, g = K/V heads, n = attended, "
               "b = batch x beam); exact: values moved per multiply-add")]
    if chips > 1:
        tables.append((f"K/V cache on {chips} chips (Pope et al. 2022)", cm.SHARD_COLUMNS, cm.shard_table_rows(res),
                       "weights sharded 1-D; comm = bytes each chip sends per step (all-reduces, plus "
                       "all-to-alls for batch); step us/chip excludes communication"))
    for title, cols, rows, caption in tables:
        _table(title, cols, rows, left=("variant", "bound", "layout", "formula"), caption=caption)
