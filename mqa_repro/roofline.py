"""The physical limit beside every time: measured device ceilings and analytic bytes / FLOPs per step.

A device's ceilings (:class:`Ceilings`: memory bandwidth, matrix peak, optionally memory size) are either a
datasheet's (``devices.DEVICES``) or measured here: memory bandwidth from a large device-to-device copy
(bytes read + bytes written over the time) and peak matrix throughput from a large matrix product in the
benchmark's dtype. Measurements are cached per (device, torch version, dtype) in ``ceilings.json`` under
``$MQA_REPRO_CACHE`` (default ``~/.cache/mqa-repro``, see :func:`cache_path`); ``decode-bench`` writes it,
``cost-model --device measured`` reads it, both say which file and measurement they use, and
``--refresh-ceilings`` measures again.

Costs are counted per step kind, for a :class:`~mqa_repro.spec.ModelSpec`:

* decoder step at position ``t`` (greedy or beam): every decoder weight the step uses is read once per
  step (the cross-attention K/V projections are not: they run once per sentence, in the encoder's count),
  plus the tied/untied softmax matrix; per row the self-attention K/V of the *live* positions (t + 1, or the
  window for local attention), never the padding, and this position's K/V write; per sentence the
  encoder-decoder K/V (shared by the beams of a sentence). Beam search adds its cache-reorder traffic:
  ``reorder="copy"`` moves (reads + writes) every row's live history, ``reorder="indirect"`` only an int32
  ancestor table (the K/V stay where they were written). FLOPs: 2 per weight per row plus attention
  (2 * heads * (d_k + d_v) per attended position per row and layer).
* encoder: weights once, the cross-attention K/V written; FLOPs of every projection and attention.
* training step: 3x the forward FLOPs; bytes are parameter traffic only (two reads, a gradient write and
  an optimizer read/write of parameter, gradient and two states in fp32); activations are not counted.

Logits, argmax / top-k and layer norms are not counted as traffic: a fused implementation keeps them on
chip. The bound of a multi-step run is the sum over steps of max(bytes / bandwidth, FLOPs / peak).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from .runtime import median, time_runs
from .spec import ModelSpec

DTYPE_BYTES = {"bf16": 2, "fp32": 4}


# --------------------------------------------------------------------------------------------------
# Analytic costs
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cost:
    bytes: float = 0.0     # device-memory traffic that cannot be avoided
    flops: float = 0.0     # multiply-adds count 2
    kv_bytes: float = 0.0  # of ``bytes``: key/value cache traffic (self + cross + reorder)

    def __add__(self, o: "Cost") -> "Cost":
        return Cost(self.bytes + o.bytes, self.flops + o.flops, self.kv_bytes + o.kv_bytes)


def decoder_step_weights(m: ModelSpec) -> int:
    """Weights one decoder step reads: decoder layers (cross K/V projections excluded), norms, softmax."""
    a = m.attention_weights
    per_layer = a["q"] + a["kv"] + a["o"] + 2 * m.d_model * m.d_ff + 2 * 2 * m.d_model
    if m.is_seq2seq:
        per_layer += a["q"] + a["o"] + 2 * m.d_model
    return m.decoder_layers * per_layer + 2 * m.d_model + m.padded_vocab * m.d_model


def decoder_step_matmul_params(m: ModelSpec) -> int:
    """Weights multiplied per row per decoder step (FLOPs = 2 x this + attention)."""
    a = m.attention_weights
    per_layer = a["q"] + a["kv"] + a["o"] + 2 * m.d_model * m.d_ff
    if m.is_seq2seq:
        per_layer += a["q"] + a["o"]
    return m.decoder_layers * per_layer + m.padded_vocab * m.d_model


def decoder_step_cost(m: ModelSpec, batch: int, t: int, src_len: int, tgt_len: int, beam: int = 1,
                      dtype: str = "bf16", reorder: str = "indirect") -> Cost:
    """One decoder step at position ``t`` (0-based) for ``batch`` sentences x ``beam`` hypotheses."""
    e = DTYPE_BYTES[dtype]
    n = batch * beam
    kv_tok = m.decoder_layers * m.kv_values_per_position            # values per position per row
    live = min(t + 1, m.cache_slots(tgt_len))                         # attended self positions
    self_bytes = n * (live + 1) * kv_tok * e                          # read the live positions, write one
    cross_bytes = batch * src_len * kv_tok * e if m.is_seq2seq else 0  # once per sentence
    reorder_bytes = 0
    if beam > 1 and t > 0:
        history = min(t, m.cache_slots(tgt_len))
        reorder_bytes = 2 * n * history * (kv_tok * e if reorder == "copy" else 4)
    kv = self_bytes + cross_bytes + reorder_bytes
    attn_per_pos = 2 * m.n_heads * (m.d_k + m.d_v) * m.decoder_layers
    flops = n * (2 * decoder_step_matmul_params(m) + attn_per_pos * (live + (src_len if m.is_seq2seq else 0)))
    return Cost(decoder_step_weights(m) * e + kv, float(flops), float(kv))


def decode_costs(m: ModelSpec, batch: int, src_len: int, tgt_len: int, beam: int = 1, dtype: str = "bf16",
                 reorder: str = "indirect") -> list:
    """The cost of every step of a fixed-length decode of ``tgt_len`` tokens."""
    return [decoder_step_cost(m, batch, t, src_len, tgt_len, beam, dtype, reorder) for t in range(tgt_len)]


def encoder_cost(m: ModelSpec, batch: int, src_len: int, dtype: str = "bf16") -> Cost:
    """Encode ``batch`` sources and project every decoder layer's encoder-decoder K/V once."""
    if not m.is_seq2seq:
        return Cost()
    e = DTYPE_BYTES[dtype]
    a = m.attention_weights
    tokens = batch * src_len
    enc_layer = a["q"] + a["kv"] + a["o"] + 2 * m.d_model * m.d_ff
    cross_kv_proj = m.decoder_layers * a["kv"]
    weights = m.encoder_layers * (enc_layer + 2 * 2 * m.d_model) + 2 * m.d_model + cross_kv_proj
    attn = m.encoder_layers * batch * 2 * m.n_heads * (m.d_k + m.d_v) * src_len * src_len
    flops = 2 * tokens * (m.encoder_layers * enc_layer + cross_kv_proj) + attn
    kv_written = tokens * m.decoder_layers * m.kv_values_per_position * e
    return Cost(float(weights * e + kv_written), float(flops), float(kv_written))


def training_cost(m: ModelSpec, rows: int, seq_len: int, n_params: int) -> Cost:
    """Forward + backward (3x forward FLOPs) + optimizer step over ``rows`` x ``seq_len`` target tokens
    (and as many source tokens for an encoder-decoder); full (masked) attention matrices counted."""
    a = m.attention_weights
    tokens = rows * seq_len
    attn_full = a["q"] + a["kv"] + a["o"]
    ffn = 2 * m.d_model * m.d_ff
    per_pos = 2 * m.n_heads * (m.d_k + m.d_v) * seq_len            # attention FLOPs per query position
    dec = m.decoder_layers * (2 * (attn_full + ffn) + per_pos) + 2 * m.padded_vocab * m.d_model
    fwd = tokens * dec
    if m.is_seq2seq:
        cross_q_o = a["q"] + a["o"]
        fwd += tokens * m.decoder_layers * (2 * cross_q_o + per_pos)      # decoder queries x source
        fwd += tokens * m.decoder_layers * 2 * a["kv"]                    # source K/V projections
        fwd += tokens * m.encoder_layers * (2 * (attn_full + ffn) + per_pos)
    return Cost(float(4 * n_params * (1 + 1 + 1 + 7)), float(3 * fwd), 0.0)


# --------------------------------------------------------------------------------------------------
# Bounds and utilisation
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ceilings:
    """What one device can do: measured (``measure_ceilings``) or from a datasheet (``devices.DEVICES``)."""

    device: str            # the device's name
    dtype: str             # the dtype ``peak_flops`` holds for
    bandwidth_Bps: float   # memory bandwidth, bytes per second (measured: read + written, large copy)
    peak_flops: float      # dense matrix product in ``dtype``, FLOP/s
    torch: str = ""        # measured: torch version
    measured: str = ""     # measured: when (ISO 8601, UTC)
    memory_bytes: Optional[float] = None   # device memory (None: unknown)
    source: str = ""       # where the figures come from

    def to_dict(self) -> dict:
        return asdict(self)


def step_seconds(c: Cost, bandwidth_Bps: float, peak_flops: float) -> tuple:
    """(memory s, compute s, bound s) of one step: bytes / bandwidth, FLOPs / peak and the larger of the two
    (the roofline: the step can be no faster than either)."""
    memory, compute = c.bytes / bandwidth_Bps, c.flops / peak_flops
    return memory, compute, max(memory, compute)


def bound_seconds(costs, ceil: Ceilings) -> float:
    """Sum over steps of max(bytes / bandwidth, FLOPs / peak)."""
    if isinstance(costs, Cost):
        costs = [costs]
    return sum(step_seconds(c, ceil.bandwidth_Bps, ceil.peak_flops)[2] for c in costs)


def total(costs) -> Cost:
    out = Cost()
    for c in ([costs] if isinstance(costs, Cost) else costs):
        out = out + c
    return out


def utilization(costs, seconds: float, ceil: Ceilings) -> dict:
    """Achieved fraction of the measured bandwidth (MBU) and peak (MFU) for a measured time."""
    c = total(costs)
    if seconds <= 0:
        return {"mbu": None, "mfu": None}
    return {"mbu": c.bytes / seconds / ceil.bandwidth_Bps, "mfu": c.flops / seconds / ceil.peak_flops}


# --------------------------------------------------------------------------------------------------
# Measured ceilings, cached per device
# --------------------------------------------------------------------------------------------------
def cache_path() -> Path:
    root = os.environ.get("MQA_REPRO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mqa-repro")
    return Path(root) / "ceilings.json"


def _timed(fn, device, reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` runs after two warm-ups."""
    return median(time_runs(fn, device, reps, warmup=2))


def measure_ceilings(device, dtype: str = "bf16") -> Ceilings:
    """Measure bandwidth (copy) and matmul peak on ``device`` now (seconds on a GPU, ~1 min on a CPU)."""
    import torch

    from .provenance import device_info, now

    device = torch.device(device)
    tdtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    gpu = device.type == "cuda"
    n_bytes = (2 << 30) if gpu else (64 << 20)
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_s = _timed(lambda: dst.copy_(src), device, 10 if gpu else 5)
    bandwidth = 2 * n_bytes / copy_s
    del src, dst
    n = 8192 if gpu else 1024
    a = torch.randn(n, n, device=device, dtype=tdtype)
    b = torch.randn(n, n, device=device, dtype=tdtype)
    mm_s = _timed(lambda: torch.mm(a, b), device, 10 if gpu else 3)
    peak = 2 * n ** 3 / mm_s
    return Ceilings(device=device_info(device)["name"], dtype=dtype, bandwidth_Bps=bandwidth, peak_flops=peak,
                    torch=torch.__version__, measured=now())


def cached_ceilings(path: Optional[Path] = None) -> dict:
    """The measurements in the ceilings cache: {"<device>|torch <version>|<dtype>": Ceilings}; {} when the
    file is absent. Raises ValueError when it exists but is not a ceilings file."""
    path = Path(path) if path else cache_path()
    if not path.is_file():
        return {}
    try:
        table = json.loads(path.read_text())
        return {k: Ceilings(**e) for k, e in table.items()}
    except (OSError, ValueError, TypeError, AttributeError):
        raise ValueError(f"{path} is not a ceilings file written by decode-bench") from None


def describe_cached(c: Ceilings, path) -> str:
    """The line printed when a cached measurement is used instead of a new one."""
    return (f"ceilings: cached measurement from {path} ({c.device}, {c.dtype}, torch {c.torch}, measured "
            f"{c.measured}); --refresh-ceilings measures again")


def ceilings_key(device, dtype: str) -> str:
    """The cache key of a measurement: device name, torch version, dtype, and on the CPU the number of threads
    torch uses (a CPU's bandwidth and matmul peak follow it)."""
    import torch

    from .provenance import device_info

    dev = torch.device(device)
    threads = f"|threads {torch.get_num_threads()}" if dev.type == "cpu" else ""
    return f"{device_info(dev)['name']}|torch {torch.__version__}|{dtype}{threads}"


def ceilings(device, dtype: str = "bf16", path: Optional[Path] = None, refresh: bool = False,
             log=None) -> Ceilings:
    """Cached ceilings for (device name, torch version, dtype; CPU threads): :func:`ceilings_key`; measured on
    the first call, or when ``refresh``. ``log`` gets one line naming the cache file and the measurement's
    date when a cached measurement is used."""
    from .provenance import write_json_atomic

    path = Path(path) if path else cache_path()
    key = ceilings_key(device, dtype)
    try:
        table = {k: c.to_dict() for k, c in cached_ceilings(path).items()}
    except ValueError:
        table = {}
    if key in table and not refresh:
        c = Ceilings(**table[key])
        if log is not None:
            log(describe_cached(c, path))
        return c
    c = measure_ceilings(device, dtype)
    table[key] = c.to_dict()
    try:
        write_json_atomic(path, table)
    except OSError:
        pass  # a read-only home: measure again next time
    return c
