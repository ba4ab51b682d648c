"""``mqa-repro decode-bench``: the paper's Table 2 on today's hardware, beside the roofline.

Per variant, amortized per output token like the paper: a training step (forward + backward + optimizer
at the spec's training shape, per target token); the encoder; the decoder under greedy search and under
beam search (exactly ``tgt_len`` steps, EOS ignored, per sentence output token and per hypothesis token);
decoder-only models time the decoder step alone. Timings need no trained weights.

Every time is the median of ``repeats`` runs (spread: min and max) after a warm-up; graph capture is
excluded; CUDA events on a GPU, ``perf_counter`` on the CPU. Beside it: the roofline bound from
:mod:`mqa_repro.roofline`, MBU and MFU, the key/value cache bytes, and the full provenance.
"""
from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import torch
import torch.nn.functional as F

from . import roofline as rl
from .errors import UserError
from .decode import Engine, forbid_specials, tuning_record
from .model import BOS, EOS, Transformer, count_parameters
from .provenance import device_info, manifest

BENCH_SCHEMA = 1
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SWEEP_BATCHES = (1, 4, 16, 64, 256, 1024)
SWEEP_LENGTHS = (32, 64, 128, 256)


@dataclass
class BenchConfig:
    batch: int
    src_len: int
    tgt_len: int
    beams: list
    repeats: int
    dtype: str
    device: str
    train: bool = True
    train_tokens: int = 32768
    attention: str = "triton"   # or "torch" (the CPU always uses torch)
    check: bool = True          # engine == model.decode_step, graph == eager, fixed == real-input path
    tune: bool = True           # CUDA: time kernel launches and product choices on the device (else fixed)
    sweep: Optional[str] = None  # "batch" or "length"
    sweep_values: list = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to torch on this machine")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def default_config(variant, device: torch.device, **overrides) -> BenchConfig:
    """The spec's benchmark section, with its smaller CPU defaults on the CPU; ``overrides`` win if set.

    On the CPU the default dtype is fp32: CPUs have no fast bf16 matmul, so a bf16 CPU run would time (and
    measure the ceiling of) a slow emulation rather than the decoder.
    """
    b = variant.benchmark
    cpu = device.type == "cpu"
    cfg = BenchConfig(batch=b.cpu_batch_size if cpu else b.batch_size,
                      src_len=b.cpu_src_len if cpu else b.src_len,
                      tgt_len=b.cpu_tgt_len if cpu else b.tgt_len,
                      beams=list(b.beams), repeats=b.repeats, dtype="fp32" if cpu else b.dtype, device=device.type,
                      train_tokens=b.cpu_train_tokens if cpu else b.train_tokens)
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
def time_runs(fn, device: torch.device, repeats: int, before=None, warmup: int = 1) -> list:
    """Seconds of ``fn()`` for each of ``repeats`` runs after ``warmup`` runs; ``before()`` runs untimed."""
    out = []
    for i in range(warmup + repeats):
        if before is not None:
            before()
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            sec = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            sec = time.perf_counter() - t0
        if i >= warmup:
            out.append(sec)
    return out


def _stats(times: list) -> dict:
    s = sorted(times)
    med = s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])
    return {"median_s": med, "min_s": s[0], "max_s": s[-1], "repeats": len(s), "times_s": times}


def _row(variant, measure: str, beam: int, times: list, costs, ceil: rl.Ceilings, tokens: int, cfg: BenchConfig,
         hyp_tokens: Optional[int] = None, **extra) -> dict:
    st = _stats(times)
    bound = rl.bound_seconds(costs, ceil)
    c = rl.total(costs)
    util = rl.utilization(costs, st["median_s"], ceil)
    us = 1e6 / tokens
    row = {
        "variant": variant.name, "measure": measure, "beam": beam,
        "batch": extra.pop("batch", cfg.batch), "src_len": extra.pop("src_len", cfg.src_len),
        "tgt_len": extra.pop("tgt_len", cfg.tgt_len),
        "us_per_token": st["median_s"] * us, "us_per_token_min": st["min_s"] * us,
        "us_per_token_max": st["max_s"] * us,
        "us_per_hyp_token": st["median_s"] * 1e6 / hyp_tokens if hyp_tokens else None,
        "bound_us_per_token": bound * us, "x_bound": st["median_s"] / bound if bound else None,
        "mbu": util["mbu"], "mfu": util["mfu"],
        "bytes": c.bytes, "flops": c.flops, "kv_bytes_moved": c.kv_bytes,
        "median_s": st["median_s"], "min_s": st["min_s"], "max_s": st["max_s"], "repeats": st["repeats"],
        "tokens": tokens, "dtype": cfg.dtype,
    }
    row.update(extra)
    return row


# --------------------------------------------------------------------------------------------------
# Models and inputs
# --------------------------------------------------------------------------------------------------
def build_model(variant, device: torch.device, dtype: str, checkpoint=None, train: bool = False) -> Transformer:
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(variant.model)
    if checkpoint is not None:
        model.load_state_dict(checkpoint)
    if not train:
        model = model.to(TORCH_DTYPES[dtype]).eval()
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def random_tokens(batch: int, length: int, vocab: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(4, vocab, (batch, length), generator=g).to(device)


def load_checkpoint(path, spec_variants: list):
    """(variant, state_dict) from a checkpoint file written by the trainer (or a bare state dict)."""
    from .spec import Variant

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError) as e:
        raise UserError(f"{path}: cannot read the checkpoint ({e})") from None
    state = ckpt
    variant = None
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict", "model_state"):
            if key in ckpt and isinstance(ckpt[key], dict):
                state = ckpt[key]
                break
        spec_d = ckpt.get("spec") if isinstance(ckpt.get("spec"), dict) else None
        if spec_d and "model" in spec_d:
            variant = Variant.from_dict(spec_d, source=str(path))
    if variant is None:
        if len(spec_variants) != 1:
            raise UserError(f"{path}: the checkpoint names no spec; pick its variant with one --variant")
        variant = spec_variants[0]
    return variant, state


# --------------------------------------------------------------------------------------------------
# The pieces: training, encoder, decoder
# --------------------------------------------------------------------------------------------------
def bench_training(variant, cfg: BenchConfig, device, ceil: rl.Ceilings) -> dict:
    """Forward + backward + optimizer step over ``train_tokens`` target tokens (sequences of data.max_len)."""
    m = variant.model
    seq = min(variant.data.max_len, m.max_positions)
    rows = max(1, cfg.train_tokens // seq)
    micro = max(1, min(rows, 16384 // seq))
    model = build_model(variant, device, cfg.dtype, train=True).train()
    fused = {"fused": True} if device.type == "cuda" else {}
    if variant.training.optimizer == "adafactor" and hasattr(torch.optim, "Adafactor"):
        opt = torch.optim.Adafactor(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)
    seq2seq = m.kind == "encoder-decoder"
    src = random_tokens(rows, seq, m.vocab_size, device, 1) if seq2seq else None
    tgt = random_tokens(rows, seq + 1, m.vocab_size, device, 2)
    tgt[:, 0] = BOS
    amp = cfg.dtype == "bf16"
    smoothing = variant.training.label_smoothing

    def step():
        opt.zero_grad(set_to_none=True)
        for r0 in range(0, rows, micro):
            sl = slice(r0, min(rows, r0 + micro))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(tgt[sl, :-1], src[sl] if seq2seq else None)
            loss = F.cross_entropy(logits.float().flatten(0, 1), tgt[sl, 1:].flatten(), label_smoothing=smoothing)
            (loss * (sl.stop - sl.start) / rows).backward()
        opt.step()

    times = time_runs(step, device, cfg.repeats, warmup=2 if device.type == "cuda" else 1)
    n_params, opt_name = count_parameters(model), type(opt).__name__
    del model, opt
    cost = rl.training_cost(m, rows, seq, n_params)
    return _row(variant, "train", 0, times, cost, ceil, rows * seq, cfg, batch=rows, src_len=seq if seq2seq else 0,
                tgt_len=seq, optimizer=opt_name,
                autocast_bf16=amp, microbatch_rows=micro)


def _kv_cache_bytes(m, batch: int, beam: int, src_len: int, tgt_len: int, dtype: str) -> int:
    e = rl.DTYPE_BYTES[dtype]
    per_pos = m.decoder_layers * m.n_kv_heads * (m.d_k + m.d_v) * e
    cross = batch * src_len * per_pos if m.kind == "encoder-decoder" else 0
    return batch * beam * rl.cache_slots(m, tgt_len) * per_pos + cross


def bench_decoder(variant, model, cfg: BenchConfig, device, ceil: rl.Ceilings, beams, batch=None,
                  src_len=None, tgt_len=None, encoder: bool = True) -> list:
    """Encoder and decoder rows (greedy and each beam) at one shape: the engine's fixed-length protocol."""
    m = variant.model
    batch, src_len, tgt_len = batch or cfg.batch, src_len or cfg.src_len, tgt_len or cfg.tgt_len
    seq2seq = m.kind == "encoder-decoder"
    engine = Engine(model, use_triton=cfg.attention == "triton", tune=cfg.tune)
    rows = []
    src = None
    shape = {"batch": batch, "src_len": src_len if seq2seq else 0, "tgt_len": tgt_len}
    if seq2seq:
        src = random_tokens(batch, src_len, m.vocab_size, device)
        times = time_runs(lambda: engine.step.encode(src), device, cfg.repeats)
        if encoder:
            rows.append(_row(variant, "encoder", 0, times, rl.encoder_cost(m, batch, src_len, cfg.dtype), ceil,
                             batch * tgt_len, cfg, **shape, impl="eager", kv_cache_bytes=0))
    graphs = engine.graphs
    for beam in beams:
        run = engine.fixed_run(batch, beam, tgt_len, src)
        times = time_runs(run.run, device, cfg.repeats, before=run.reset)
        costs = rl.decode_costs(m, batch, src_len if seq2seq else 0, tgt_len, beam, cfg.dtype, "indirect")
        rows.append(_row(variant, "decoder", beam, times, costs, ceil, batch * tgt_len, cfg,
                         hyp_tokens=batch * beam * tgt_len if beam > 1 else None, **shape,
                         impl={"graphs": len(run.graphs),
                               "attention": "triton" if (graphs and cfg.attention == "triton") else "torch",
                               "beam_reorder": "indirect (ancestor table)" if beam > 1 else None,
                               **engine.describe()},
                         kv_cache_bytes=_kv_cache_bytes(m, batch, beam, src_len if seq2seq else 0, tgt_len,
                                                        cfg.dtype)))
        del run
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------------------
# Correctness of the engine (recorded beside the times)
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def check_fast_path(variant, model: Transformer, cfg: BenchConfig, device, beam: int = 4,
                    batch: int = 4, split: Optional[int] = None) -> dict:
    """The engine's step computes model.decode_step's function; graphs replay what eager computes; the
    fixed-length protocol (static positions, one graph per step) decodes what the real-input path (per-row
    positions and lengths, one graph per shape) decodes with the same lengths forced.
    ``split`` fixes how the residual products are computed; None lets the device choose."""
    from .decode.cache import DecodeCache

    m = variant.model
    steps = min(cfg.tgt_len, 40)
    seq2seq = m.kind == "encoder-decoder"
    src = None
    if seq2seq:   # full-length sources ending in EOS, as translate builds them
        src = torch.cat([random_tokens(batch, cfg.src_len - 1, m.vocab_size, device, seed=3),
                         torch.full((batch, 1), EOS, device=device, dtype=torch.long)], 1)
    eng = {g: Engine(model, use_triton=cfg.attention == "triton", split=split, tune=cfg.tune, graphs=g)
           for g in ([False, True] if device.type == "cuda" else [False])}
    eager = eng[False]
    # 1. logits, step by step, teacher-forced with the reference's greedy tokens
    state = model.start_decoding(batch, steps, src_BS=src)
    cache = DecodeCache(m.decoder_layers, batch, 1, m.n_kv_heads, m.d_k, m.d_v, steps, m.window, device,
                        model.embed.weight.dtype)
    if seq2seq:
        cache.set_cross(eager.step.encode(src), None)
    tok = torch.full((batch,), BOS, device=device, dtype=torch.long)
    worst = 0.0
    ref_tokens = []
    for t in range(steps):
        ref = model.decode_step(tok, t, state).float()
        got = eager.step.logits(cache, tok, t).float()
        worst = max(worst, ((got - ref).norm() / ref.norm()).item())
        tok = forbid_specials(ref.clone(), eager.vocab_limit).argmax(-1)
        ref_tokens.append(tok)
    ref_tokens = torch.stack(ref_tokens, 1)
    out = {"steps": steps, "batch": batch, "logits_rel_err_max": worst}
    # 2. greedy and beam: eager vs graphs, the fixed-length protocol vs the real-input path
    for k in [1] + ([beam] if beam > 1 else []):
        results = {}
        for g, e in eng.items():
            run = e.fixed_run(batch, k, steps, src)
            run.run()
            results[g] = run.tokens().cpu()
        key = "greedy" if k == 1 else f"beam{k}"
        if True in results:
            out[f"{key}_graph_equals_eager"] = bool(torch.equal(results[True], results[False]))
        if k == 1:
            out["greedy_token_agreement_with_model"] = (results[False] == ref_tokens.cpu()).float().mean().item()
        real = {}
        for g, e in eng.items():
            forced = [steps] * batch
            if seq2seq:
                ids = e.translate(src[:, :-1].tolist(), beam=k, forced_lengths=forced)
            else:
                ids = e.generate([[]] * batch, beam=k, forced_lengths=forced)
            real[g] = torch.tensor(ids)
            if g:
                out[f"{key}_real_input_graph_equals_eager"] = bool(torch.equal(real[True], real[False]))
        out[f"{key}_sentences_equal_real_input_path"] = (results[False] == real[False]).all(1).float().mean().item()
    return out


# --------------------------------------------------------------------------------------------------
# The whole benchmark
# --------------------------------------------------------------------------------------------------
def run_bench(variants: list, cfg: BenchConfig, checkpoint_state=None, peer: Optional[str] = None,
              spec_path: str = "", log=print) -> dict:
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    ceil = rl.ceilings(device, cfg.dtype)
    log(f"ceilings on {ceil.device}: {ceil.bandwidth_Bps / 1e12:.2f} TB/s copy, "
        f"{ceil.peak_flops / 1e12:.1f} TFLOP/s {cfg.dtype} matmul")
    rows, checks, peers = [], {}, []
    for v in variants:
        m = v.model
        if cfg.sweep is None:
            if max(cfg.tgt_len, cfg.src_len) > m.max_positions:
                raise UserError(f"{spec_path}: {v.name}: --src-len/--tgt-len exceed model.max_positions "
                                f"({m.max_positions})")
            if cfg.train:
                log(f"{v.name}: training step")
                rows.append(bench_training(v, cfg, device, ceil))
                _free(device)
            model = build_model(v, device, cfg.dtype, checkpoint_state)
            if cfg.check:
                log(f"{v.name}: checking the fast path")
                checks[v.name] = check_fast_path(v, model, cfg, device, beam=max(cfg.beams))
            log(f"{v.name}: encoder and decoder, beams {cfg.beams}")
            dec = bench_decoder(v, model, cfg, device, ceil, cfg.beams)
            rows.extend(dec)
            if peer == "hf":
                ours = sum(r["median_s"] for r in dec if r["measure"] == "encoder" or
                           (r["measure"] == "decoder" and r["beam"] == 1))
                log(f"{v.name}: Hugging Face peer")
                from .peers import hf_peer
                peers.append(hf_peer(v, cfg, device, ours))
            if peer == "ct2":
                enc = sum(r["median_s"] for r in dec if r["measure"] == "encoder")
                ours = {r["beam"]: enc + r["median_s"] for r in dec if r["measure"] == "decoder"}
                log(f"{v.name}: CTranslate2 peer on the same weights")
                from .peers import ct2_fixed_peer
                peers.extend(ct2_fixed_peer(v, cfg, model, device, ours))
        else:
            model = build_model(v, device, cfg.dtype, checkpoint_state)
            values = cfg.sweep_values or (SWEEP_BATCHES if cfg.sweep == "batch" else SWEEP_LENGTHS)
            for x in values:
                batch = x if cfg.sweep == "batch" else cfg.batch
                length = x if cfg.sweep == "length" else cfg.tgt_len
                src_len = x if cfg.sweep == "length" else cfg.src_len
                if length > m.max_positions:
                    log(f"{v.name}: length {length} exceeds max_positions {m.max_positions}; skipped")
                    continue
                log(f"{v.name}: sweep {cfg.sweep} = {x}")
                for r in bench_decoder(v, model, cfg, device, ceil, [1], batch, src_len, length, encoder=False):
                    r["sweep"] = cfg.sweep
                    rows.append(r)
        del model
        _free(device)
    res = {
        "schema_version": BENCH_SCHEMA, "kind": "decode-bench",
        "provenance": manifest(None, None, device, spec_path=spec_path),
        "config": asdict(cfg), "ceilings": ceil.to_dict(),
        "variants": {v.name: v.to_dict() for v in variants},
        "spec_hashes": {v.name: v.hash for v in variants},
        "rows": rows, "checks": checks, "peers": peers, "tuning": tuning_record(),
        "notes": ("per token = time / (batch x tgt_len) (the paper's per sentence output token); "
                  "us_per_hyp_token divides by batch x beam x tgt_len; bound = sum over steps of "
                  "max(bytes / copy bandwidth, FLOPs / matmul peak); logits, top-k and layer norms are "
                  "not counted as traffic"),
    }
    res["summary"] = summarize(rows)
    return res


def _free(device):
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def summarize(rows: list) -> dict:
    """The three targets of issue 5 where the rows allow them (greedy within 1.5x of the bound, MHA/MQA
    decoder >= 4x, beam per hypothesis token <= 1.3x greedy)."""
    dec = {(r["variant"], r["beam"], r.get("sweep"), r["batch"], r["tgt_len"]): r for r in rows
           if r["measure"] == "decoder"}
    out = {"greedy_x_bound": {}, "beam_per_hyp_over_greedy": {}}
    for (v, beam, sweep, batch, tl), r in dec.items():
        if sweep is not None:
            continue
        if beam == 1:
            out["greedy_x_bound"][v] = r["x_bound"]
        else:
            g = dec.get((v, 1, None, batch, tl))
            if g:
                out["beam_per_hyp_over_greedy"][f"{v} beam{beam}"] = r["us_per_hyp_token"] / g["us_per_token"]
    mh = next((r for k, r in dec.items() if k[0] == "multi_head" and k[1] == 1 and k[2] is None), None)
    mq = next((r for k, r in dec.items() if k[0] == "multi_query" and k[1] == 1 and k[2] is None), None)
    if mh and mq:
        out["multi_head_over_multi_query_decoder"] = mh["us_per_token"] / mq["us_per_token"]
    return out


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
CSV_FIELDS = ["variant", "measure", "beam", "batch", "src_len", "tgt_len", "dtype", "us_per_token",
              "us_per_token_min", "us_per_token_max", "us_per_hyp_token", "bound_us_per_token", "x_bound",
              "mbu", "mfu", "kv_cache_bytes", "kv_bytes_moved", "bytes", "flops", "median_s", "repeats", "sweep"]


def to_csv(res: dict) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in res["rows"]:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
    return buf.getvalue()


def _fmt(x, spec="{:.3g}"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return spec.format(x)


def table_rows(res: dict) -> list:
    """Strings for the table: one list per row, the columns of ``TABLE_COLUMNS``."""
    out = []
    for r in res["rows"]:
        name = r["measure"] if r["measure"] != "decoder" else ("greedy" if r["beam"] == 1 else f"beam {r['beam']}")
        out.append([r["variant"], name, str(r["batch"]), f"{r['src_len']}/{r['tgt_len']}",
                    _fmt(r["us_per_token"], "{:.4g}"),
                    f"{_fmt(r['us_per_token_min'], '{:.4g}')}-{_fmt(r['us_per_token_max'], '{:.4g}')}",
                    _fmt(r["us_per_hyp_token"], "{:.4g}"), _fmt(r["bound_us_per_token"], "{:.4g}"),
                    _fmt(r["x_bound"], "{:.2f}"), _fmt(r["mbu"], "{:.0%}"), _fmt(r["mfu"], "{:.0%}"),
                    _fmt(r.get("kv_cache_bytes", 0) / 2**20 if r.get("kv_cache_bytes") else None, "{:.0f}")])
    return out


TABLE_COLUMNS = ["variant", "measure", "batch", "src/tgt", "us/token", "min-max", "us/hyp token", "bound us",
                 "x bound", "MBU", "MFU", "KV MiB"]
