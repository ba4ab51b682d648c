"""Spec files: YAML in, typed and validated dataclasses (:mod:`mqa_repro.spec`) out.

A spec file holds a *base* (sections ``model``, ``data``, ``training``, ``evaluation``, ``benchmark``)
and a table of named ``variants``, each a small delta merged into the base, e.g.::

    variants:
      multi_head: {}
      multi_query: {model: {n_kv_heads: 1, d_ff: match}}

``d_ff: match`` solves for the feed-forward width that gives the variant the same parameter count as
the base model (this is how the paper's 5440 / 6784 / 9088 / 9984 come about). ``--set`` overrides are
validated the same way (:func:`apply_overrides`).

Every mistake is a :class:`~mqa_repro.errors.SpecError` naming the file and the key.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import SpecError
from .spec import (BenchmarkSpec, DataSpec, EvaluationSpec, ModelSpec, Spec, TrainingSpec, Variant, match_d_ff,
                   param_count, suggest)

# SentencePiece's smallest vocabulary for our trainer settings (4 special ids + the word-boundary mark "▁" +
# one character); a real corpus needs one piece per distinct character more (tokenizer.train_sentencepiece).
MIN_VOCAB_SIZE = 6


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
        return build_section(tp, value, path, key)
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


def build_section(cls, raw: dict, path, prefix: str):
    if not isinstance(raw, dict):
        raise SpecError(path, prefix, f"must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in raw.items():
        if k not in names:
            raise SpecError(path, f"{prefix}.{k}", f"is not a known key of '{prefix}'"
                            f"{suggest(str(k), names)}")
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
# Loading
# --------------------------------------------------------------------------------------------------
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def load_spec(path) -> Spec:
    """Read, validate and resolve a spec file. Raises SpecError naming file and key."""
    path = Path(path)
    if path.is_dir():
        raise SpecError(path, "", "a directory, not a spec file (pass a YAML spec such as experiments/tiny.yaml)")
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
            raise SpecError(path, str(k), f"is not a known top-level key{suggest(str(k), _TOP_KEYS)}")
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
                                f"is not a section{suggest(str(s), _SECTIONS)}; use one of {', '.join(_SECTIONS)}")
            if not isinstance(delta[s], dict):
                raise SpecError(path, f"variants.{vname}.{s}", f"must be a mapping, got {delta[s]!r}")
        merged = _deep_merge(base, delta)
        v = _make_variant(name, vname, merged, path, key_prefix=f"variants.{vname}.")
        if v.model.d_ff == "match":
            try:
                d_ff = match_d_ff(v.model, base_params)
            except ValueError as e:
                raise SpecError(path, f"variants.{vname}.model.d_ff", f"match: {e}") from None
            v = dataclasses.replace(v, model=dataclasses.replace(v.model, d_ff=d_ff))
        variants[vname] = v
    desc = raw.get("description") or ""
    if not isinstance(desc, str):
        raise SpecError(path, "description", "must be text")
    return Spec(name=name, path=str(path), variants=variants, description=desc.strip())


def _make_variant(spec_name, vname, sections: dict, path, key_prefix: str) -> Variant:
    built = {s: build_section(cls, sections[s], path, f"{key_prefix}{s}") for s, cls in _SECTIONS.items()}
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
                            f"{suggest(parts[-1], node)}")
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

