"""Experiment specs: YAML in, typed and validated dataclasses out.

A spec file holds a *base* (sections ``model``, ``data``, ``training``, ``evaluation``, ``benchmark``)
and a table of named ``variants``, each a small delta merged into the base, e.g.::

    variants:
      multi_head: {}
      multi_query: {model: {n_kv_heads: 1, d_ff: match}}

``d_ff: match`` solves for the feed-forward width that gives the variant the same parameter count as
the base model (this is how the paper's 5440 / 6784 / 9088 / 9984 come about).

Every mistake is a :class:`~mqa_repro.errors.SpecError` naming the file and the key.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import SpecError

SCHEMA_VERSION = 1
# SentencePiece's smallest vocabulary for our trainer settings (4 special ids + the word-boundary mark "▁" +
# one character); a real corpus needs one piece per distinct character more (data.train_sentencepiece).
MIN_VOCAB_SIZE = 6

# The rows of the paper's tables plus grouped-query attention; every shipped spec uses these names.
KNOWN_VARIANTS = (
    "multi_head", "multi_query", "multi_head_local", "multi_query_local",
    "h1_dk128", "h2_dk64", "h4_dk32", "h8_dk16", "gqa2", "gqa4",
)


def cache_slots(window: Optional[int], length: int) -> int:
    """Self-attention cache slots for a ``length``-position decode: a local model (``window`` set) keeps a
    ring buffer of the last min(window, length) positions; a full-attention one keeps all ``length``."""
    return min(window, length) if window else length


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
        key = lambda s: s  # noqa: E731
        return cls(
            spec_name=d["spec"], name=d["variant"], source=source,
            model=_build(ModelSpec, d["model"], source, key("model")),
            data=_build(DataSpec, d["data"], source, "data"),
            training=_build(TrainingSpec, d["training"], source, "training"),
            evaluation=_build(EvaluationSpec, d["evaluation"], source, "evaluation"),
            benchmark=_build(BenchmarkSpec, d["benchmark"], source, "benchmark"),
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
                                f"has no variant {n!r}{_suggest(n, self.variants)}; "
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
# Reading YAML: numbers in e-notation are numbers, a key given twice is an error
# --------------------------------------------------------------------------------------------------
class SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader with two changes for specs.

    * YAML 1.1 (PyYAML) reads ``3e-3`` and ``1e5`` as strings: its float pattern needs a dot and a signed
      exponent. YAML 1.2 (and every JSON reader) reads them as numbers, and so does this loader.
    * Duplicate keys are left to :func:`duplicate_keys` (PyYAML keeps the last value without a word).
    """


# YAML 1.2 core-schema floats with an exponent (1e5, 3e-3, 2.5E+4, .5e-2); the forms with a dot and no
# exponent are PyYAML's own already. Checked after the int pattern has had its chance, so 3 stays an int.
SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def duplicate_keys(node, prefix: str = "") -> Optional[tuple]:
    """(dotted key, first line, second line) of the first key given twice in a composed YAML mapping."""
    if isinstance(node, yaml.MappingNode):
        seen = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode) or k.tag == "tag:yaml.org,2002:merge":
                continue
            key = f"{prefix}.{k.value}" if prefix else str(k.value)
            if k.value in seen:
                return key, seen[k.value] + 1, k.start_mark.line + 1
            seen[k.value] = k.start_mark.line
            found = duplicate_keys(v, key)
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found = duplicate_keys(item, f"{prefix}[{i}]")
            if found:
                return found
    return None


def read_yaml(text: str, path="<spec>", prefix: str = ""):
    """Plain data from spec YAML (:class:`SpecLoader`); a key given twice is a SpecError naming it (below
    ``prefix``, the dotted key the text is the value of)."""
    node = yaml.compose(text, Loader=SpecLoader)
    dup = duplicate_keys(node, prefix) if node is not None else None
    if dup:
        raise SpecError(path, dup[0], f"is given twice (lines {dup[1]} and {dup[2]}); keep one")
    return yaml.load(text, Loader=SpecLoader)


# --------------------------------------------------------------------------------------------------
# Validation: plain data -> dataclasses, every error names file and key
# --------------------------------------------------------------------------------------------------
_TOP_KEYS = ("name", "description", "model", "data", "training", "evaluation", "benchmark", "variants")
_SECTIONS = {"model": ModelSpec, "data": DataSpec, "training": TrainingSpec,
             "evaluation": EvaluationSpec, "benchmark": BenchmarkSpec}


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, path, key):
    """Check ``value`` against the annotation ``tp``; return it (converted where lossless)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise SpecError(path, key, f"must be {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path, key)
            except SpecError as e:
                errors.append(e)
        raise SpecError(path, key, f"must be {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SpecError(path, key, f"must be a mapping, got {value!r}")
        return _build(tp, value, path, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():   # 1e5, 4096.0: a whole number is an int
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list:
        if isinstance(value, list):
            return list(value)
    elif tp is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
    elif tp is dict:
        if isinstance(value, dict):
            return dict(value)
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported annotation {tp!r}")
    raise SpecError(path, key, f"must be {_type_name(tp)}, got {value!r}")


def _build(cls, raw: dict, path, prefix: str):
    if not isinstance(raw, dict):
        raise SpecError(path, prefix, f"must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in raw.items():
        if k not in names:
            raise SpecError(path, f"{prefix}.{k}", f"is not a known key of '{prefix}'"
                            f"{_suggest(str(k), names)}")
        kwargs[k] = _coerce(v, hints[k], path, f"{prefix}.{k}")
    return cls(**kwargs)


def _deep_merge(base: dict, delta: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in delta.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _check_model(m: ModelSpec, path, key: str) -> None:
    def positive(name):
        if getattr(m, name) <= 0:
            raise SpecError(path, f"{key}.{name}", f"must be positive, got {getattr(m, name)}")

    for name in ("decoder_layers", "d_model", "n_heads", "n_kv_heads", "d_k", "d_v", "vocab_size",
                 "vocab_multiple", "max_positions"):
        positive(name)
    if m.is_seq2seq:
        positive("encoder_layers")
    elif m.encoder_layers not in (0,):
        raise SpecError(path, f"{key}.encoder_layers", "must be 0 for a decoder-only model")
    if isinstance(m.d_ff, int) and m.d_ff <= 0:
        raise SpecError(path, f"{key}.d_ff", f"must be positive or 'match', got {m.d_ff}")
    if m.n_kv_heads > m.n_heads:
        raise SpecError(path, f"{key}.n_kv_heads",
                        f"cannot exceed n_heads ({m.n_kv_heads} > {m.n_heads})")
    if m.n_heads % m.n_kv_heads:
        raise SpecError(path, f"{key}.n_heads", f"must be divisible by n_kv_heads "
                        f"({m.n_heads} is not a multiple of {m.n_kv_heads})")
    if m.window is not None and m.window <= 0:
        raise SpecError(path, f"{key}.window", f"must be a positive number of positions or null, got {m.window}")
    if m.window is not None and m.window >= m.max_positions:
        raise SpecError(path, f"{key}.window", f"({m.window}) must be below model.max_positions "
                        f"({m.max_positions}), the longest sequence: a window that covers every position is "
                        f"full attention; use null for that")
    if m.vocab_size < MIN_VOCAB_SIZE:
        raise SpecError(path, f"{key}.vocab_size", f"must be at least {MIN_VOCAB_SIZE} (the 4 special ids pad, "
                        f"unk, bos, eos, the word-boundary piece and one character: SentencePiece's minimum), "
                        f"got {m.vocab_size}")
    for name in ("residual", "attention", "relu"):
        p = getattr(m.dropout, name)
        if not 0.0 <= p < 1.0:
            raise SpecError(path, f"{key}.dropout.{name}", f"must be in [0, 1), got {p}")


def _check_sections(v: Variant, path, key: str) -> None:
    d, t, e, b = v.data, v.training, v.evaluation, v.benchmark
    translation = v.model.is_seq2seq
    if translation and not (d.src_lang and d.tgt_lang):
        raise SpecError(path, f"{key}data.src_lang", "an encoder-decoder model needs src_lang and tgt_lang")
    if not d.train:
        raise SpecError(path, f"{key}data.train", "must name at least one training file stem")
    if d.max_len > v.model.max_positions:
        raise SpecError(path, f"{key}data.max_len", f"({d.max_len}) exceeds model.max_positions "
                        f"({v.model.max_positions})")
    if d.max_len < 2:
        raise SpecError(path, f"{key}data.max_len", f"must leave room for a token beside BOS/EOS, got {d.max_len}")
    if d.spm_sample_lines <= 0:
        raise SpecError(path, f"{key}data.spm_sample_lines", f"must be positive, got {d.spm_sample_lines}")
    if translation and d.too_long == "split":
        raise SpecError(path, f"{key}data.too_long", "'split' would break sentence pairs; use truncate or drop")
    if d.hub is not None:
        for role in ("train", "dev", "test"):
            stems = getattr(d.hub, role) if getattr(d.hub, role) is not None else getattr(d, role)
            for stem in ([stems] if isinstance(stems, str) else stems):
                if stem not in d.hub.splits:
                    raise SpecError(path, f"{key}data.hub.splits", f"has no hub split for the {role} stem "
                                    f"{stem!r} (set data.hub.{role} to the stems the hub provides)")
    for name in ("steps", "batch_tokens", "eval_every", "checkpoint_every", "log_every"):
        if getattr(t, name) <= 0:
            raise SpecError(path, f"{key}training.{name}", f"must be positive, got {getattr(t, name)}")
    if t.micro_batch_tokens is not None and t.micro_batch_tokens < d.max_len:
        raise SpecError(path, f"{key}training.micro_batch_tokens", f"({t.micro_batch_tokens}) must hold at "
                        f"least one row of data.max_len ({d.max_len}) tokens")
    if t.batch_tokens < d.max_len:
        raise SpecError(path, f"{key}training.batch_tokens", f"({t.batch_tokens}) must hold at least one row "
                        f"of data.max_len ({d.max_len}) tokens")
    if t.warmup_steps < 0:
        raise SpecError(path, f"{key}training.warmup_steps", "must not be negative")
    for name, x in (("training.seed", t.seed), ("data.spm_seed", d.spm_seed)):
        if x < 0:
            raise SpecError(path, f"{key}{name}", f"must be 0 or more (a random generator seed), got {x}")
    if t.lr <= 0:
        raise SpecError(path, f"{key}training.lr", f"must be positive, got {t.lr}")
    if not 0.0 <= t.label_smoothing < 1.0:
        raise SpecError(path, f"{key}training.label_smoothing", "must be in [0, 1)")
    if len(t.betas) != 2:
        raise SpecError(path, f"{key}training.betas", "must be two numbers")
    if not e.beams or any((not isinstance(k, int)) or k < 1 for k in e.beams):
        raise SpecError(path, f"{key}evaluation.beams", f"must be a list of positive integers, got {e.beams}")
    for tok in e.bleu_tokenizers:
        if tok not in ("intl", "13a", "none", "zh", "char", "ja-mecab", "ko-mecab", "flores101", "flores200"):
            raise SpecError(path, f"{key}evaluation.bleu_tokenizers", f"{tok!r} is not a sacrebleu tokenizer")
    if not b.beams or any((not isinstance(k, int)) or k < 1 for k in b.beams):
        raise SpecError(path, f"{key}benchmark.beams", f"must be a list of positive integers, got {b.beams}")
    for name in ("batch_size", "src_len", "tgt_len", "repeats", "train_tokens", "cpu_batch_size",
                 "cpu_src_len", "cpu_tgt_len", "cpu_train_tokens"):
        if getattr(b, name) <= 0:
            raise SpecError(path, f"{key}benchmark.{name}", f"must be positive, got {getattr(b, name)}")


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
    """The FFN width that brings ``m`` closest to ``target_params`` parameters."""
    _, ffn, _ = layer_counts(m)
    fixed = param_count(m, d_ff=0)
    per_unit = ffn * 2 * m.d_model
    return max(1, round((target_params - fixed) / per_unit))


def kv_cache_bytes(m: ModelSpec, bytes_per_value: int = 2) -> dict:
    """Key/value cache bytes per sequence, per decoded token (self) and per source token (cross)."""
    per_layer = m.kv_values_per_position * bytes_per_value
    return {"self_per_token": m.decoder_layers * per_layer,
            "cross_per_source_token": m.decoder_layers * per_layer if m.is_seq2seq else 0}


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def load_spec(path) -> Spec:
    """Read, validate and resolve a spec file. Raises SpecError naming file and key."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(path, "", "no such spec file")
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"), path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise SpecError(path, "", f"is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise SpecError(path, "", "is not UTF-8 text") from None
    return spec_from_dict(raw, path)


def spec_from_dict(raw: Any, path="<spec>") -> Spec:
    if not isinstance(raw, dict):
        raise SpecError(path, "", "must be a YAML mapping with sections model, data, training, ... and variants")
    for k in raw:
        if k not in _TOP_KEYS:
            raise SpecError(path, str(k), f"is not a known top-level key{_suggest(str(k), _TOP_KEYS)}")
    name = raw.get("name") or Path(str(path)).stem
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SpecError(path, "name", f"must be a lower-case identifier, got {name!r}")
    base = {s: raw.get(s) or {} for s in _SECTIONS}
    for s, body in base.items():
        if not isinstance(body, dict):
            raise SpecError(path, s, f"must be a mapping, got {body!r}")
    # Validate the base on its own so an error in it is reported once, without a variant prefix.
    base_variant = _make_variant(name, "base", base, path, key_prefix="")
    if base_variant.model.d_ff == "match":
        raise SpecError(path, "model.d_ff", "'match' is only meaningful in a variant (it matches the base)")
    base_params = param_count(base_variant.model)

    deltas = raw.get("variants")
    if deltas is None:
        deltas = {"multi_head": {}}
    if not isinstance(deltas, dict) or not deltas:
        raise SpecError(path, "variants", "must be a non-empty mapping of variant name to delta")
    variants = {}
    for vname, delta in deltas.items():
        if not isinstance(vname, str) or not _NAME_RE.match(vname):
            raise SpecError(path, f"variants.{vname}", "a variant name must be a lower-case identifier")
        delta = delta or {}
        if not isinstance(delta, dict):
            raise SpecError(path, f"variants.{vname}", f"must be a mapping of section deltas, got {delta!r}")
        for s in delta:
            if s not in _SECTIONS:
                raise SpecError(path, f"variants.{vname}.{s}",
                                f"is not a section{_suggest(str(s), _SECTIONS)}; use one of {', '.join(_SECTIONS)}")
            if not isinstance(delta[s], dict):
                raise SpecError(path, f"variants.{vname}.{s}", f"must be a mapping, got {delta[s]!r}")
        merged = _deep_merge(base, delta)
        v = _make_variant(name, vname, merged, path, key_prefix=f"variants.{vname}.")
        if v.model.d_ff == "match":
            v = dataclasses.replace(v, model=dataclasses.replace(v.model, d_ff=match_d_ff(v.model, base_params)))
        variants[vname] = v
    desc = raw.get("description") or ""
    if not isinstance(desc, str):
        raise SpecError(path, "description", "must be text")
    return Spec(name=name, path=str(path), variants=variants, description=desc.strip())


def _make_variant(spec_name, vname, sections: dict, path, key_prefix: str) -> Variant:
    built = {s: _build(cls, sections[s], path, f"{key_prefix}{s}") for s, cls in _SECTIONS.items()}
    v = Variant(spec_name=spec_name, name=vname, source=str(path), **built)
    _check_model(v.model, path, f"{key_prefix}model")
    _check_sections(v, path, key_prefix)
    return v


def apply_overrides(v: Variant, overrides: Optional[list] = None) -> Variant:
    """``--set section.key=value`` (nested: ``model.dropout.residual=0``): validated like the spec.

    Values are read as YAML (``0.1``, ``true``, ``null``, ``[1, 4]``). A mistake is one SpecError
    naming the override and the key.
    """
    if not overrides:
        return v
    raw = v.to_dict()
    for item in overrides:
        where = "--set"
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise SpecError("--set", str(item), "must look like section.key=value, e.g. training.lr=0.001")
        parts = key.split(".")
        if parts[0] not in _SECTIONS or len(parts) < 2:
            raise SpecError(where, key, f"must start with a section: one of {', '.join(_SECTIONS)}")
        node = raw
        for i, part in enumerate(parts[:-1]):
            node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                raise SpecError(where, key, f"{'.'.join(parts[:i + 1])!r} is not a section with keys")
        if parts[-1] not in node:
            raise SpecError(where, key, f"is not a known key of '{'.'.join(parts[:-1])}'"
                            f"{_suggest(parts[-1], node)}")
        try:
            value = read_yaml(text, where, key) if text.strip() else None
        except yaml.YAMLError:
            raise SpecError(where, key, f"has a value that is not valid YAML: {text!r}") from None
        if value == "match":
            raise SpecError(where, key, "'match' is only meaningful in a spec's variant table")
        node[parts[-1]] = value
    out = Variant.from_dict(raw, source="--set")
    out = dataclasses.replace(out, source=v.source)
    _check_model(out.model, "--set", "model")
    _check_sections(out, "--set", "")
    return out


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
