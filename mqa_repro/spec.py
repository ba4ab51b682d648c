"""Experiment specs as typed dataclasses, and every quantity derived from them.

A :class:`Spec` is a table of :class:`Variant` rows (a base plus small deltas, read and validated by
:mod:`mqa_repro.specfile`); each variant holds its sections (:class:`ModelSpec`, :class:`DataSpec`, ...).
The model's derived quantities (``is_seq2seq``, group size, cache slots, K/V values per position, parameter
counts, K/V cache bytes) are defined here once, for the model, roofline, cost model and bench; ``d_ff:
match`` is solved by :func:`match_d_ff`. ``spec_hash`` / ``training_hash`` identify a resolved spec.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from .errors import SpecError

SCHEMA_VERSION = 1


# The rows of the paper's tables plus grouped-query attention; every shipped spec uses these names.
KNOWN_VARIANTS = (
    "multi_head", "multi_query", "multi_head_local", "multi_query_local",
    "h1_dk128", "h2_dk64", "h4_dk32", "h8_dk16", "gqa2", "gqa4",
)


def cache_slots(window: Optional[int], length: int) -> int:
    """Self-attention cache slots for a ``length``-position decode: a local model (``window`` set) keeps a
    ring buffer of the last min(window, length) positions; a full-attention one keeps all ``length``."""
    return min(window, length) if window else length


def suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dropout:
    residual: float = 0.0   # on each residual branch (the paper: 0.2)
    attention: float = 0.0  # on attention probabilities (0.1)
    relu: float = 0.0       # on the FFN hidden activations (0.1)


@dataclass(frozen=True)
class ModelSpec:
    kind: Literal["encoder-decoder", "decoder-only"] = "encoder-decoder"
    encoder_layers: int = 6
    decoder_layers: int = 6
    d_model: int = 1024
    d_ff: Union[int, Literal["match"]] = 4096
    n_heads: int = 8
    n_kv_heads: int = 8            # = n_heads: multi-head; 1: multi-query; between: grouped-query
    d_k: int = 128
    d_v: int = 128
    window: Optional[int] = None   # local decoder self-attention: a position sees itself and window-1 before
    vocab_size: int = 32000        # SentencePiece vocabulary
    vocab_multiple: int = 128      # embedding rows are vocab_size rounded up to this multiple
    max_positions: int = 256       # learned positional embeddings
    tied_embeddings: bool = True   # input embedding = softmax weights (and shared by encoder and decoder)
    dropout: Dropout = field(default_factory=Dropout)

    @property
    def padded_vocab(self) -> int:
        m = self.vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    # Derived quantities: every module reads these instead of recomputing them.
    @property
    def is_seq2seq(self) -> bool:
        """True for an encoder-decoder (translation) model, False for a decoder-only language model."""
        return self.kind == "encoder-decoder"

    @property
    def group_size(self) -> int:
        """Query heads per key/value head, h / g (h: multi-head has 1, multi-query has h)."""
        return self.n_heads // self.n_kv_heads

    @property
    def kv_values_per_position(self) -> int:
        """Key and value numbers one attention layer caches per position: g * (d_k + d_v)."""
        return self.n_kv_heads * (self.d_k + self.d_v)

    def cache_slots(self, length: int) -> int:
        """Self-attention cache slots for a ``length``-position decode (see :func:`cache_slots`)."""
        return cache_slots(self.window, length)

    @property
    def attention_weights(self) -> dict:
        """Weights of one attention layer by projection (no biases): q = d.h.d_k, kv = d.g.(d_k + d_v)
        (the K and V projections together), o = h.d_v.d."""
        d = self.d_model
        return {"q": d * self.n_heads * self.d_k, "kv": d * self.kv_values_per_position,
                "o": self.n_heads * self.d_v * d}

    @property
    def n_params(self) -> int:
        """Total trainable parameters (d_ff resolved); see :func:`param_count`."""
        return param_count(self)


@dataclass(frozen=True)
class HubSource:
    path: str                        # datasets hub name, e.g. "wmt14"
    name: Optional[str] = None       # configuration, e.g. "de-en"
    splits: dict = field(default_factory=dict)   # our split file stem -> hub split name
    text_field: Optional[str] = None  # LM corpora: the text column (default "text")
    max_train_lines: Optional[int] = None  # keep the first N examples of each training split
    # The stems prepared from the hub when they differ from the local files' (default: data.train/dev/test),
    # e.g. LM1B's hub has one "train" split where the local copy has several shards.
    train: Optional[list] = None
    dev: Optional[str] = None
    test: Optional[list] = None
    detokenize: bool = False         # the hub text is Moses-tokenised (local files: data.detokenize)


@dataclass(frozen=True)
class DataSpec:
    corpus: str = "multi30k"          # a folder under the data directory
    src_lang: Optional[str] = "en"    # translation: file suffixes; None for language modelling
    tgt_lang: Optional[str] = "de"
    train: list = field(default_factory=lambda: ["train"])   # file stems
    dev: str = "valid"
    test: list = field(default_factory=list)                 # each scored on its own
    file_pattern: str = "{stem}.{lang}"   # LM corpora: "{stem}" (one sentence/paragraph per line)
    detokenize: bool = False         # undo Moses tokenisation/escaping of training text
    skip_blank: bool = True          # LM corpora: drop blank lines
    spm_model_type: Literal["unigram", "bpe"] = "unigram"
    spm_character_coverage: float = 1.0
    spm_sample_lines: int = 1_000_000  # lines of training text SentencePiece learns from
    spm_seed: int = 0                # seeds the sample and SentencePiece: same seed, same vocabulary
    spm_hard_vocab_limit: bool = True  # false: a corpus too small for vocab_size gets fewer pieces
    max_len: int = 256               # positions per side (LM: per sequence), BOS/EOS included
    # training examples longer than max_len: truncate, drop, or (LM only) split into consecutive pieces
    too_long: Literal["truncate", "drop", "split"] = "truncate"
    hub: Optional[HubSource] = None  # where to get the corpus online


@dataclass(frozen=True)
class TrainingSpec:
    steps: int = 1000
    batch_tokens: int = 4096         # target tokens per step (source tokens come along); global, all ranks
    optimizer: Literal["adafactor", "adamw"] = "adamw"
    lr: float = 1e-3                 # peak (adamw) or the rsqrt constant (adafactor, paper: 1.0)
    schedule: Literal["rsqrt_linear", "inverse_sqrt", "cosine", "constant"] = "inverse_sqrt"
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.98)
    label_smoothing: float = 0.1
    z_loss: float = 0.0
    grad_clip: float = 1.0
    pack: bool = True                # pack short examples into rows of data.max_len
    micro_batch_tokens: Optional[int] = None  # split each rank's batch into forward/backward passes of
                                     # at most this many target tokens (gradient accumulation); None: one pass
    eval_every: int = 500
    checkpoint_every: int = 500
    log_every: int = 50
    seed: int = 0


@dataclass(frozen=True)
class EvaluationSpec:
    beams: list = field(default_factory=lambda: [1, 4])
    length_penalty: float = 0.6
    max_len_a: float = 1.5           # decode limit: min(max_len_cap, a * source length + b)
    max_len_b: int = 10
    max_len_cap: int = 256
    bleu_tokenizers: list = field(default_factory=lambda: ["intl", "13a"])
    batch_size: int = 128            # sentences per decoding batch
    max_sentences: Optional[int] = None  # evaluate on a prefix of each split (None: all)


@dataclass(frozen=True)
class BenchmarkSpec:
    batch_size: int = 1024
    src_len: int = 128
    tgt_len: int = 128
    beams: list = field(default_factory=lambda: [1, 4])
    train_tokens: int = 32768        # target tokens per timed training step
    repeats: int = 5
    dtype: Literal["bf16", "fp32"] = "bf16"
    cpu_batch_size: int = 8          # smaller defaults where the device is the CPU
    cpu_src_len: int = 32
    cpu_tgt_len: int = 32
    cpu_train_tokens: int = 1024


@dataclass(frozen=True)
class Variant:
    """One row of a table: the base spec with a variant's delta applied and d_ff resolved."""

    spec_name: str
    name: str
    model: ModelSpec
    data: DataSpec
    training: TrainingSpec
    evaluation: EvaluationSpec
    benchmark: BenchmarkSpec
    source: str = ""

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "spec": self.spec_name,
            "variant": self.name,
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "training": dataclasses.asdict(self.training),
            "evaluation": dataclasses.asdict(self.evaluation),
            "benchmark": dataclasses.asdict(self.benchmark),
        }

    @property
    def hash(self) -> str:
        return spec_hash(self.to_dict())

    @property
    def training_hash(self) -> str:
        """Hash of what the trained weights depend on (:data:`TRAINING_SECTIONS`): a checkpoint must match
        it to be resumed; evaluation and benchmark settings may change freely."""
        return training_hash(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict, source: str = "<checkpoint>") -> "Variant":
        from .specfile import build_section   # the validation of spec files (which imports this module)

        key = lambda s: s  # noqa: E731
        return cls(
            spec_name=d["spec"], name=d["variant"], source=source,
            model=build_section(ModelSpec, d["model"], source, key("model")),
            data=build_section(DataSpec, d["data"], source, "data"),
            training=build_section(TrainingSpec, d["training"], source, "training"),
            evaluation=build_section(EvaluationSpec, d["evaluation"], source, "evaluation"),
            benchmark=build_section(BenchmarkSpec, d["benchmark"], source, "benchmark"),
        )


@dataclass(frozen=True)
class Spec:
    name: str
    path: str
    variants: dict  # name -> Variant, in file order
    description: str = ""

    def select(self, names: Optional[list] = None) -> list:
        if not names:
            return list(self.variants.values())
        out = []
        for n in names:
            if n not in self.variants:
                raise SpecError(self.path, "variants",
                                f"has no variant {n!r}{suggest(n, self.variants)}; "
                                f"it has {', '.join(self.variants)}")
            out.append(self.variants[n])
        return out


def spec_hash(d: dict) -> str:
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# The sections training reads: the model, the data (which also defines the prepared data) and the recipe.
TRAINING_SECTIONS = ("model", "data", "training")


def training_hash(d: dict) -> str:
    """Hash of the training-relevant part of a resolved spec dict (``Variant.to_dict()``): the schema
    version and :data:`TRAINING_SECTIONS`; ``evaluation`` and ``benchmark`` are left out."""
    return spec_hash({k: d.get(k) for k in ("schema_version", *TRAINING_SECTIONS)})



# --------------------------------------------------------------------------------------------------
# Parameter counts (analytic; tests check them against the torch modules)
# --------------------------------------------------------------------------------------------------
def attention_params(m: ModelSpec) -> int:
    """Weights of one attention layer: Q (d.h.k) + K, V (d.g.k + d.g.v) + O (h.v.d). No biases."""
    return sum(m.attention_weights.values())


def ffn_params(m: ModelSpec, d_ff: int) -> int:
    return 2 * m.d_model * d_ff


def layer_counts(m: ModelSpec) -> tuple:
    """(attention layers, FFN layers, layer norms)."""
    if m.is_seq2seq:
        attn = m.encoder_layers + 2 * m.decoder_layers
        ffn = m.encoder_layers + m.decoder_layers
        norms = 2 * m.encoder_layers + 3 * m.decoder_layers + 2  # + final norm of each stack
    else:
        attn = ffn = m.decoder_layers
        norms = 2 * m.decoder_layers + 1
    return attn, ffn, norms


def param_count(m: ModelSpec, d_ff: Optional[int] = None) -> int:
    """Total trainable parameters of the model described by ``m``."""
    d_ff = m.d_ff if d_ff is None else d_ff
    if not isinstance(d_ff, int):
        raise ValueError("d_ff must be resolved before counting parameters")
    attn, ffn, norms = layer_counts(m)
    v, d = m.padded_vocab, m.d_model
    embeddings = v * d * (1 if m.tied_embeddings else 2)
    stacks = 2 if m.is_seq2seq else 1
    positions = stacks * m.max_positions * d
    return attn * attention_params(m) + ffn * ffn_params(m, d_ff) + norms * 2 * d + embeddings + positions


def match_d_ff(m: ModelSpec, target_params: int) -> int:
    """The FFN width that brings ``m`` closest to ``target_params`` parameters. Raises ValueError when no
    width of at least 1 does (the rest of the model alone already has about that many or more)."""
    _, ffn, _ = layer_counts(m)
    fixed = param_count(m, d_ff=0)
    per_unit = ffn * 2 * m.d_model
    d_ff = round((target_params - fixed) / per_unit)
    if d_ff < 1:
        raise ValueError(f"without a feed-forward layer this variant already has {fixed:,} parameters against "
                         f"the base's {target_params:,}, so no d_ff matches; give d_ff a number")
    return d_ff


def kv_cache_bytes(m: ModelSpec, bytes_per_value: int = 2) -> dict:
    """Key/value cache bytes per sequence, per decoded token (self) and per source token (cross)."""
    per_layer = m.kv_values_per_position * bytes_per_value
    return {"self_per_token": m.decoder_layers * per_layer,
            "cross_per_source_token": m.decoder_layers * per_layer if m.is_seq2seq else 0}


def describe_rows(spec: Spec, bytes_per_value: int = 2) -> list:
    """One dict per variant: the columns of ``mqa-repro describe``."""
    rows = []
    for v in spec.variants.values():
        m = v.model
        kv = kv_cache_bytes(m, bytes_per_value)
        rows.append({
            "variant": v.name, "kind": m.kind, "n_heads": m.n_heads, "n_kv_heads": m.n_kv_heads,
            "d_k": m.d_k, "d_v": m.d_v, "d_ff": m.d_ff, "window": m.window,
            "params": param_count(m),
            "kv_self_bytes_per_token": kv["self_per_token"],
            "kv_cross_bytes_per_source_token": kv["cross_per_source_token"],
            "kv_bytes_dtype": {2: "bf16", 4: "fp32"}.get(bytes_per_value, f"{bytes_per_value}B"),
            "spec_hash": v.hash[:12],
        })
    return rows
