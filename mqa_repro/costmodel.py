"""``mqa-repro cost-model``: what incremental decoding of each variant costs on a device, analytically.

Every byte and FLOP comes from :mod:`mqa_repro.roofline` (``decoder_step_cost`` and friends); this module
only puts ceilings under them, solves for the interesting batch sizes and contexts, and adds the memory
and multi-chip views of Pope et al. 2022 and the ratios of Shazeer 2019.

**One decoder step at context n** (batch b sentences, ``beam`` hypotheses each, so r = b * beam rows) is
roofline's step at position t = n - 1 of an n-token decode: the decoder's weights read once (bf16), per row
the self-attention K/V of the n attended positions (a local variant's window caps n) plus the one written,
per sentence the encoder-decoder K/V of ``src_len`` source positions (``src_len`` = n unless given; none
for a decoder-only model), beam search's int32 ancestor table. FLOPs: 2 per weight per row plus attention.
Time bound = max(bytes / bandwidth, FLOPs / peak); per output token = step time / b (the paper's per
sentence convention). Bytes are W + b * B1 and FLOPs b * F1 (W, B1, F1 read off roofline at b = 0 and 1),
so the step turns compute-bound at the critical batch b* = (W / bw) / (F1 / peak - B1 / bw); there is none
when one sentence's K/V traffic alone outlasts its arithmetic (F1 / peak <= B1 / bw).

**Memory.** Resident K/V cache at (b, n) = b * beam * slots(n) * (self K/V bytes per position) +
b * src_len * (cross K/V bytes per source position), slots(n) = min(n, window); the weights are all
parameters in bf16 (encoder included). The largest batch that fits in M bytes beside the weights is
floor((M - weights) / cache of one sentence); the largest context at batch b is found by bisection on the
same cache function (None when the cache stops growing: a local variant with a fixed source length).
GB means 1e9 bytes throughout. Contexts past ``model.max_positions`` are extrapolations.

**N chips (Pope et al. 2022, section 3).** Weights are sharded 1-D over N chips ("weight-stationary"): each
chip holds 1/N of the query heads, K/V heads, output projection and d_ff (norms, embeddings and replicated
small projections are counted as 1/N too: an approximation). After each attention's output projection and
after the FFN the partial sums are all-reduced: 2 (decoder-only) or 3 (encoder-decoder) all-reduces per
decoder layer of r * d_model values, each sending 2 (N - 1) / N of the tensor from every chip (ring).
The K/V cache has two layouts:

* ``heads``: each chip keeps the cache of its K/V heads, so attention needs no extra communication. With
  fewer K/V heads than chips (g < N) a head cannot be split: each chip holds ceil(g / N) whole heads and
  every K/V head is replicated N / g times; multi-query attention (g = 1) keeps the WHOLE cache on every
  chip. The busiest chip's share is ceil(g / N) / g of the cache.
* ``batch``: each chip keeps the whole cache (all K/V heads) of ceil(b / N) sentences, 1/N of it, whatever
  g is. The price is two all-to-alls per attention sublayer and decoder layer, from head-sharded to
  batch-sharded and back: the queries (r * h * d_k values) in, the attention output (r * h * d_v) out, and
  for self-attention the new position's K/V (r * g * (d_k + d_v)) when the K/V projection is head-sharded
  (g >= N; with g < N it is replicated and each chip keeps its own rows). An all-to-all sends
  (N - 1) / N^2 of the tensor from every chip.

Communication is reported as bytes sent per chip per step; no interconnect bandwidth is assumed. The
per-chip step bound (communication excluded) is max((W / N + K/V traffic * share) / bw, FLOPs / N / peak).

**The paper's ratios** of memory access to arithmetic per step: multi-head Θ(n/d + 1/b), multi-query
Θ(1/d + n/(d h) + 1/b), and for g K/V heads (grouped-query, our generalisation) Θ(1/d + n g/(d h) + 1/b),
evaluated with d = d_model, h = n_heads, n = attended positions (the window caps it), b = rows (b * beam);
where the head size k is not d/h (the paper's h/d_k ablation rows) the same derivation gives
Θ(1/d + n g k/d^2 + 1/b).
Beside it the exact figure from the roofline counts: values moved per multiply-add, (bytes / 2) / (FLOPs / 2)
in bf16.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

from . import roofline as rl
from .devices import DEVICES, GB, datasheet, measured_device
from .errors import UserError
from .roofline import Ceilings
from .spec import ModelSpec, kv_cache_bytes

SCHEMA_VERSION = 1


# --------------------------------------------------------------------------------------------------
# The device: a datasheet preset or the measured ceilings (mqa_repro.devices), options overriding them
# --------------------------------------------------------------------------------------------------
def device_preset(name: Optional[str] = None, bandwidth_GBps: Optional[float] = None,
                  tflops: Optional[float] = None, memory_gb: Optional[float] = None, refresh: bool = False,
                  log=None) -> Ceilings:
    """A datasheet preset (or ``measured``: the cached ceilings, re-measured with ``refresh``), with
    --bandwidth/--flops/--memory-gb overriding its figures. Raises UserError naming the option at fault."""
    if (bandwidth_GBps is None) != (tflops is None):
        given, missing = ("--bandwidth", "--flops") if tflops is None else ("--flops", "--bandwidth")
        raise UserError(f"{given} needs {missing} too: give both ceilings, or neither and a --device")
    for opt, x in (("--bandwidth", bandwidth_GBps), ("--flops", tflops), ("--memory-gb", memory_gb)):
        if x is not None and not (x > 0 and math.isfinite(x)):
            raise UserError(f"{opt} must be a positive number, got {x}")
    if refresh and name != "measured":
        raise UserError("--refresh-ceilings applies to --device measured")
    if name is None:
        name = "h100" if bandwidth_GBps is None else None
    if name is None:
        dev = datasheet("custom", 0.0, 0.0, None, "")
    elif name == "measured":
        dev = measured_device(refresh=refresh, log=log)
    elif name in DEVICES:
        dev = DEVICES[name]
    else:
        raise UserError(f"--device must be one of {', '.join(DEVICES)} or measured, got {name!r}")
    if bandwidth_GBps is not None:
        src = f"--bandwidth {bandwidth_GBps:g} GB/s, --flops {tflops:g} TFLOP/s"
        dev = replace(dev, device=dev.device if name is None else f"{dev.device} (overridden)",
                      bandwidth_Bps=bandwidth_GBps * GB, peak_flops=tflops * 1e12,
                      source=src if name is None else f"{dev.source}; overridden: {src}")
    if memory_gb is not None:
        dev = replace(dev, memory_bytes=memory_gb * GB, source=f"{dev.source}; --memory-gb {memory_gb:g}")
    return dev


# --------------------------------------------------------------------------------------------------
# One decoder step (the function tables.py calls beside decode-bench measurements)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepPrediction:
    batch: int            # sentences
    context: int          # the step attends this many self positions (before the window cap)
    src_len: int          # encoder-decoder source positions (0: decoder-only)
    beam: int
    bytes: float          # memory traffic of the step
    flops: float
    kv_bytes: float       # of ``bytes``: K/V cache traffic
    memory_s: float       # bytes / bandwidth
    compute_s: float      # FLOPs / peak
    seconds: float        # max of the two: the step's lower bound
    bound: str            # "memory" or "compute": the larger term
    us_per_token: float   # seconds / batch, in microseconds (per sentence output token)


def _step_cost(m: ModelSpec, batch: int, context: int, src_len: int, beam: int, dtype: str) -> rl.Cost:
    # roofline's step at position t = context - 1 of a context-token decode: it attends min(context, window)
    # positions; identical to step t of any longer decode (see predict_decoder_us_per_token).
    return rl.decoder_step_cost(m, batch, context - 1, src_len, context, beam, dtype, "indirect")


def predict_decode_step(m: ModelSpec, batch: int, context: int, src_len: int, bandwidth_Bps: float,
                        flops_per_s: float, beam: int = 1, dtype: str = "bf16") -> StepPrediction:
    """Lower bound on one incremental decoder step, roofline.py's counts over the given ceilings.

    ``m``: the variant's ModelSpec; ``batch``: sentences; ``context``: self-attention positions the step
    attends (it is step t = context - 1; a local window caps it); ``src_len``: source positions of an
    encoder-decoder (pass 0 for a decoder-only model); ``bandwidth_Bps``: bytes per second;
    ``flops_per_s``: FLOP/s; ``beam``: hypotheses per sentence (search state through an ancestor table,
    as decode-bench does). Returns a :class:`StepPrediction` (seconds = max(bytes / bw, FLOPs / peak)).
    """
    c = _step_cost(m, batch, context, src_len, beam, dtype)
    mem, comp, sec = rl.step_seconds(c, bandwidth_Bps, flops_per_s)
    return StepPrediction(batch, context, src_len, beam, c.bytes, c.flops, c.kv_bytes, mem, comp, sec,
                          "memory" if mem >= comp else "compute", sec / batch * 1e6 if batch else 0.0)


def predict_decoder_us_per_token(m: ModelSpec, batch: int, src_len: int, tgt_len: int, beam: int,
                                 bandwidth_Bps: float, flops_per_s: float, dtype: str = "bf16") -> float:
    """Microseconds per output token of a whole ``tgt_len``-token decode: the sum over its steps of the
    per-step bound, divided by batch * tgt_len (the paper's Table 2 convention). The same number as
    decode-bench's ``bound_us_per_token`` (roofline.bound_seconds over roofline.decode_costs) for the
    same ceilings; pass ``src_len`` 0 for a decoder-only model."""
    seconds = sum(predict_decode_step(m, batch, t + 1, src_len, bandwidth_Bps, flops_per_s, beam, dtype).seconds
                  for t in range(tgt_len))
    return seconds * 1e6 / (batch * tgt_len)


def critical_batch(m: ModelSpec, context: int, src_len: int, bandwidth_Bps: float, flops_per_s: float,
                   beam: int = 1, dtype: str = "bf16") -> Optional[float]:
    """The batch (sentences) at which FLOPs / peak = bytes / bandwidth; None if decoding never turns
    compute-bound at this context (one sentence's K/V traffic outlasts its arithmetic)."""
    c0 = _step_cost(m, 0, context, src_len, beam, dtype)      # the weights alone
    c1 = _step_cost(m, 1, context, src_len, beam, dtype)
    per_sentence_s = c1.flops / flops_per_s - (c1.bytes - c0.bytes) / bandwidth_Bps
    if per_sentence_s <= 0:
        return None
    return (c0.bytes / bandwidth_Bps) / per_sentence_s


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------
def weight_bytes(m: ModelSpec, dtype: str = "bf16") -> int:
    """Every parameter resident on the device (encoder included)."""
    return m.n_params * rl.DTYPE_BYTES[dtype]


def kv_cache_resident_bytes(m: ModelSpec, batch: int, context: int, src_len: int, beam: int = 1,
                            dtype: str = "bf16") -> int:
    """K/V cache held at context n: self K/V of min(n, window) slots per row, cross K/V per sentence."""
    kv = kv_cache_bytes(m, rl.DTYPE_BYTES[dtype])
    return batch * (beam * m.cache_slots(context) * kv["self_per_token"]
                    + src_len * kv["cross_per_source_token"])


def _src(m: ModelSpec, context: int, src_len: Optional[int]) -> int:
    if not m.is_seq2seq:
        return 0
    return context if src_len is None else src_len


def max_batch(m: ModelSpec, context: int, src_len: int, memory_bytes: float, beam: int = 1,
              dtype: str = "bf16") -> int:
    """Largest batch whose K/V cache fits in ``memory_bytes`` beside the weights (0: none)."""
    free = memory_bytes - weight_bytes(m, dtype)
    one = kv_cache_resident_bytes(m, 1, context, src_len, beam, dtype)
    return max(0, int(free // one)) if free > 0 else 0


def max_context(m: ModelSpec, batch: int, kv_budget_bytes: float, src_len: Optional[int] = None,
                beam: int = 1, dtype: str = "bf16", share: float = 1.0) -> Optional[int]:
    """Largest context n at which ``share`` x the K/V cache of ``batch`` sentences fits in ``kv_budget_bytes``
    (0: not even one position). ``src_len`` None: the source grows with n. None: no limit (the cache stops
    growing: a local window with a fixed source)."""
    def fits(n):
        return share * kv_cache_resident_bytes(m, batch, n, _src(m, n, src_len), beam, dtype) <= kv_budget_bytes

    hi = 1 << 62
    if fits(hi):
        return None
    lo = 0
    while hi - lo > 1:           # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# --------------------------------------------------------------------------------------------------
# Several chips: K/V sharded over heads or over the batch (Pope et al. 2022)
# --------------------------------------------------------------------------------------------------
LAYOUTS = ("heads", "batch")


def kv_share(m: ModelSpec, batch: int, chips: int, layout: str) -> float:
    """Fraction of the K/V cache on the busiest chip."""
    if layout == "heads":
        return math.ceil(m.n_kv_heads / chips) / m.n_kv_heads
    if layout == "batch":
        return math.ceil(batch / chips) / batch
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def comm_bytes_per_chip(m: ModelSpec, batch: int, chips: int, layout: str, beam: int = 1,
                        dtype: str = "bf16") -> float:
    """Bytes each chip sends per decoder step (the model in the module docstring)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if chips <= 1:
        return 0.0
    e, n, r = rl.DTYPE_BYTES[dtype], chips, batch * beam
    attn = 2 if m.is_seq2seq else 1                                          # attention sublayers per layer
    allreduce = m.decoder_layers * (attn + 1) * 2 * (n - 1) / n * r * m.d_model * e
    if layout == "heads":
        return allreduce
    per_layer = attn * r * m.n_heads * (m.d_k + m.d_v)                       # queries in, outputs out
    if m.n_kv_heads >= n:
        per_layer += r * m.kv_values_per_position                              # the new self K/V
    return allreduce + m.decoder_layers * per_layer * e * (n - 1) / n ** 2


# --------------------------------------------------------------------------------------------------
# The paper's ratio of memory access to arithmetic
# --------------------------------------------------------------------------------------------------
def paper_ratio(m: ModelSpec, rows: int, attended: int) -> tuple:
    """(formula, value) of Shazeer 2019's Θ(...) with d = d_model, h = n_heads, n = attended positions,
    b = rows: multi-head n/d + 1/b, multi-query 1/d + n/(d h) + 1/b, g K/V heads 1/d + n g/(d h) + 1/b.
    The paper's forms assume head size k = d/h; where it is not (the h*_dk* rows), the same derivation
    with k = (d_k + d_v) / 2 gives 1/d + n g k/d^2 + 1/b."""
    d, h, g, n, b = m.d_model, m.n_heads, m.n_kv_heads, attended, rows
    k = (m.d_k + m.d_v) / 2
    if h * k != d:
        return "1/d + ngk/d^2 + 1/b (k != d/h)", 1 / d + n * g * k / d ** 2 + 1 / b
    if g == h:
        return "n/d + 1/b", n / d + 1 / b
    if g == 1:
        return "1/d + n/(dh) + 1/b", 1 / d + n / (d * h) + 1 / b
    return "1/d + ng/(dh) + 1/b (GQA)", 1 / d + n * g / (d * h) + 1 / b


# --------------------------------------------------------------------------------------------------
# The table: one row per (variant, batch, context), one per layout on several chips
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeRow:
    variant: str
    batch: int
    context: int
    src_len: int
    beam: int
    attended: int                     # self positions read per row (the window caps the context)
    weight_bytes_step: float          # decoder weights read per step
    kv_bytes_step: float              # K/V traffic per step
    bytes: float
    flops: float
    memory_s: float
    compute_s: float
    step_s: float                     # max(memory_s, compute_s)
    us_per_token: float               # step_s / batch
    bound: str                        # memory or compute
    critical_batch: Optional[float]   # sentences where the step turns compute-bound; None: never
    kv_cache_bytes: int               # resident at (batch, context)
    weights_bytes: int                # resident: every parameter
    memory_bytes: Optional[float]     # the device's (None: unknown)
    fits: Optional[bool]
    max_batch: Optional[int]          # at this context
    max_context: Optional[int]        # at this batch; None with memory_bytes set: no limit
    ratio_formula: str
    ratio_paper: float                # the Θ expression evaluated
    ratio_exact: float                # values moved per multiply-add, from the roofline counts


@dataclass(frozen=True)
class ShardRow:
    variant: str
    batch: int
    context: int
    chips: int
    layout: str                       # heads or batch
    n_kv_heads: int
    kv_replication: float             # copies of the cache over all chips (heads layout, g < N: N / g)
    kv_bytes_per_chip: float          # the busiest chip's
    weights_bytes_per_chip: float
    memory_bytes: Optional[float]     # per chip
    fits: Optional[bool]
    max_context: Optional[int]        # per chip memory; None with memory_bytes set: no limit
    comm_bytes_per_chip: float        # sent per decoder step
    step_s_per_chip: float            # communication excluded


def decode_row(name: str, m: ModelSpec, batch: int, context: int, src_len: Optional[int], device: Ceilings,
               beam: int = 1, dtype: str = "bf16") -> DecodeRow:
    src = _src(m, context, src_len)
    p = predict_decode_step(m, batch, context, src, device.bandwidth_Bps, device.peak_flops, beam, dtype)
    e = rl.DTYPE_BYTES[dtype]
    w = weight_bytes(m, dtype)
    kv = kv_cache_resident_bytes(m, batch, context, src, beam, dtype)
    mem = device.memory_bytes
    attended = m.cache_slots(context)
    formula, ratio = paper_ratio(m, batch * beam, attended)
    return DecodeRow(
        variant=name, batch=batch, context=context, src_len=src, beam=beam, attended=attended,
        weight_bytes_step=p.bytes - p.kv_bytes, kv_bytes_step=p.kv_bytes, bytes=p.bytes, flops=p.flops,
        memory_s=p.memory_s, compute_s=p.compute_s, step_s=p.seconds, us_per_token=p.us_per_token, bound=p.bound,
        critical_batch=critical_batch(m, context, src, device.bandwidth_Bps, device.peak_flops, beam, dtype),
        kv_cache_bytes=kv, weights_bytes=w, memory_bytes=mem,
        fits=None if mem is None else w + kv <= mem,
        max_batch=None if mem is None else max_batch(m, context, src, mem, beam, dtype),
        max_context=None if mem is None else max_context(m, batch, mem - w, src_len, beam, dtype),
        ratio_formula=formula, ratio_paper=ratio, ratio_exact=(p.bytes / e) / (p.flops / 2),
    )


def shard_rows(name: str, m: ModelSpec, batch: int, context: int, src_len: Optional[int], device: Ceilings,
               chips: int, beam: int = 1, dtype: str = "bf16") -> list:
    """The two K/V layouts on ``chips`` chips, weights sharded 1-D over them."""
    src = _src(m, context, src_len)
    c = _step_cost(m, batch, context, src, beam, dtype)
    kv = kv_cache_resident_bytes(m, batch, context, src, beam, dtype)
    w_chip = weight_bytes(m, dtype) / chips
    mem = device.memory_bytes
    out = []
    for layout in LAYOUTS:
        share = kv_share(m, batch, chips, layout)
        step_bytes = (c.bytes - c.kv_bytes) / chips + c.kv_bytes * share
        repl = chips * share if layout == "heads" else 1.0
        out.append(ShardRow(
            variant=name, batch=batch, context=context, chips=chips, layout=layout, n_kv_heads=m.n_kv_heads,
            kv_replication=repl, kv_bytes_per_chip=kv * share, weights_bytes_per_chip=w_chip, memory_bytes=mem,
            fits=None if mem is None else w_chip + kv * share <= mem,
            max_context=None if mem is None else max_context(m, batch, mem - w_chip, src_len, beam, dtype, share),
            comm_bytes_per_chip=comm_bytes_per_chip(m, batch, chips, layout, beam, dtype),
            step_s_per_chip=rl.step_seconds(rl.Cost(step_bytes, c.flops / chips), device.bandwidth_Bps,
                                            device.peak_flops)[2],
        ))
    return out


@dataclass
class CostModel:
    device: Ceilings
    rows: list      # DecodeRow
    shards: list    # ShardRow (empty on one chip)
    config: dict


def cost_model(variants: list, device: Ceilings, batches: list, contexts: list, src_len: Optional[int] = None,
               beam: int = 1, chips: int = 1, dtype: str = "bf16") -> CostModel:
    """Every (variant, batch, context) of the grid. ``variants``: spec Variants (``.name``, ``.model``).

    Raises UserError when the device memory is known and no requested batch fits for any variant (on one
    chip; on several, in either layout): a grid where some cells fit shows ``fits`` per row instead."""
    rows, shards = [], []
    for v in variants:
        for b in batches:
            for n in contexts:
                rows.append(decode_row(v.name, v.model, b, n, src_len, device, beam, dtype))
                if chips > 1:
                    shards.extend(shard_rows(v.name, v.model, b, n, src_len, device, chips, beam, dtype))
    if device.memory_bytes is not None:
        cells = shards if chips > 1 else rows
        if not any(r.fits for r in cells):
            where = f"on {chips} chips of " if chips > 1 else ""
            best = max(rows, key=lambda r: r.max_batch or 0)
            hint = (f"on one chip the largest batch that fits is {best.max_batch:,} ({best.variant}, context "
                    f"{best.context})" if best.max_batch else
                    f"the weights alone take {min(r.weights_bytes for r in rows) / GB:.3g} GB")
            raise UserError(
                f"--batch {', '.join(map(str, batches))} does not fit {where}{device.memory_bytes / GB:g} GB "
                f"(--memory-gb) beside the weights for any variant at --context {', '.join(map(str, contexts))}; "
                f"{hint}")
    config = {"batches": list(batches), "contexts": list(contexts), "src_len": src_len, "beam": beam,
              "chips": chips, "dtype": dtype}
    return CostModel(device, rows, shards, config)


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
NOTES = ("decoder step at context n = roofline's step t = n - 1 (attends min(n, window) self positions, "
         "src_len = n unless given); time bound = max(bytes / bandwidth, FLOPs / peak); us_per_token = "
         "step / batch; GB = 1e9 bytes; weights resident = every parameter in bf16; ratio_paper = Shazeer "
         "2019's Θ expression, ratio_exact = values moved per multiply-add; sharding: 1-D weight-stationary, "
         "ring all-reduce 2(N-1)/N and all-to-all (N-1)/N^2 of the tensor sent per chip, see "
         "mqa_repro/costmodel.py")


def to_document(res: CostModel, variants: list, spec_path: str = "") -> dict:
    """The JSON written by --out / printed by --format json, with provenance (kind "cost-model")."""
    from .provenance import manifest

    return {
        "schema_version": SCHEMA_VERSION, "kind": "cost-model",
        "provenance": manifest(None, None, None, spec_path=spec_path),
        "device_model": res.device.to_dict(), "config": res.config,
        "variants": {v.name: v.to_dict() for v in variants},
        "spec_hashes": {v.name: v.hash for v in variants},
        "rows": [asdict(r) for r in res.rows],
        "sharding": [asdict(r) for r in res.shards],
        "notes": NOTES,
    }


CSV_FIELDS = [f.name for f in fields(DecodeRow)]
SHARD_CSV_FIELDS = [f.name for f in fields(ShardRow)]


def to_csv(res: CostModel) -> str:
    """Decode rows; on several chips a blank line and the sharding rows follow."""
    import csv
    import io

    buf = io.StringIO()
    for names, rows in ((CSV_FIELDS, res.rows), (SHARD_CSV_FIELDS, res.shards)):
        if not rows:
            continue
        if buf.tell():
            buf.write("\n")
        w = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})
    return buf.getvalue()


def _gb(x) -> str:
    return "-" if x is None else f"{x / GB:.3g}"


def _n(x, memory_known: bool) -> str:
    if not memory_known:
        return "-"
    return "no limit" if x is None else f"{x:,}"


DECODE_COLUMNS = ["variant", "batch", "context", "step us", "us/token", "bound", "critical batch",
                  "KV GB", "fits", "max batch", "max context"]
RATIO_COLUMNS = ["variant", "batch", "context", "attended", "formula", "paper Θ", "exact"]
SHARD_COLUMNS = ["variant", "batch", "context", "layout", "KV GB/chip", "replication", "weights GB/chip", "fits",
                 "max context", "comm MB/step", "step us/chip"]


def decode_table_rows(res: CostModel) -> list:
    out = []
    for r in res.rows:
        known = r.memory_bytes is not None
        out.append([r.variant, str(r.batch), str(r.context), f"{r.step_s * 1e6:.4g}", f"{r.us_per_token:.4g}",
                    r.bound, "never" if r.critical_batch is None else f"{r.critical_batch:,.0f}",
                    _gb(r.kv_cache_bytes), "-" if r.fits is None else ("yes" if r.fits else "NO"),
                    _n(r.max_batch, known), _n(r.max_context, known)])
    return out


def ratio_table_rows(res: CostModel) -> list:
    return [[r.variant, str(r.batch), str(r.context), str(r.attended), r.ratio_formula, f"{r.ratio_paper:.4g}",
             f"{r.ratio_exact:.4g}"] for r in res.rows]


def shard_table_rows(res: CostModel) -> list:
    out = []
    for r in res.shards:
        known = r.memory_bytes is not None
        out.append([r.variant, str(r.batch), str(r.context), r.layout, _gb(r.kv_bytes_per_chip),
                    f"{r.kv_replication:.3g}x", _gb(r.weights_bytes_per_chip),
                    "-" if r.fits is None else ("yes" if r.fits else "NO"), _n(r.max_context, known),
                    f"{r.comm_bytes_per_chip / 1e6:.3g}", f"{r.step_s_per_chip * 1e6:.4g}"])
    return out
