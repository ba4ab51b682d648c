"""Prepared data: the layout ``mqa-repro prepare`` writes and what the trainer and evaluator read.

Prepared layout (``data/<spec name>/`` by default)::

    manifest.json                     sources (sha256), counts per split, spm hash, resolved data spec
    spm.model                         one SentencePiece model shared by source and target
    <stem>.<side>.tokens.npy          all ids of the split, flat (uint16 if vocab < 65536, else int32)
    <stem>.<side>.offsets.npy         int64, n + 1 entries: example i is tokens[offsets[i]:offsets[i + 1]]
    <stem>.<side>.txt                 evaluation splits only: the raw reference text, one line per example

side is the language code for translation and ``text`` for language modelling. Ids exclude BOS/EOS (the
trainer adds them), so an example holds at most ``data.max_len - 1`` ids. The data section is shared by
every variant of a spec (:class:`DataPlan`), so a spec is prepared once (:mod:`mqa_repro.prepare`).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from .errors import UserError
from .spec import DataSpec, Spec, Variant, spec_hash
from .textio import read_lines as read_text_lines

FORMAT_VERSION = 2      # bump when the prepared layout or processing changes: everything re-prepares


def prepared_dir(variant: Union[Variant, Spec, str]) -> Path:
    """Default prepared-data folder of a spec (cwd-relative): ``data/<spec name>``."""
    name = variant if isinstance(variant, str) else getattr(variant, "spec_name", None) or variant.name
    return Path("data") / name


# --------------------------------------------------------------------------------------------------
# The data-relevant part of a spec
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataPlan:
    """What prepare needs from a spec: its data section, vocabulary size and task (same for every variant)."""

    spec_name: str
    spec_path: str
    data: DataSpec
    vocab_size: int
    task: str                 # "translation" or "lm"

    @classmethod
    def of(cls, v: Variant) -> "DataPlan":
        """The data plan of one variant (the same for every variant of a spec: :func:`plan_for`)."""
        return cls(v.spec_name, v.source, v.data, v.model.vocab_size, "translation" if v.model.is_seq2seq else "lm")

    @property
    def sides(self) -> list:
        return [self.data.src_lang, self.data.tgt_lang] if self.task == "translation" else ["text"]

    @property
    def max_ids(self) -> int:
        """Ids per example: max_len positions less the BOS or EOS the trainer adds."""
        return self.data.max_len - 1

    def to_dict(self) -> dict:
        return {"task": self.task, "vocab_size": self.vocab_size, "data": dataclasses.asdict(self.data),
                "format_version": FORMAT_VERSION}

    @property
    def hash(self) -> str:
        return spec_hash(self.to_dict())


def plan_for(spec: Spec) -> DataPlan:
    """The shared data section of a spec's variants; an error if variants disagree on it."""
    variants = list(spec.variants.values())
    first = variants[0]

    def key(v: Variant) -> tuple:
        return (dataclasses.asdict(v.data), v.model.vocab_size, v.model.kind)

    for v in variants[1:]:
        if key(v) != key(first):
            what = ("model.vocab_size" if v.model.vocab_size != first.model.vocab_size else
                    "model.kind" if v.model.kind != first.model.kind else "data")
            raise UserError(f"{spec.path}: variants {first.name!r} and {v.name!r} differ in {what}, but one "
                            f"spec is prepared once for all its variants; move one of them to its own spec")
    return DataPlan.of(first)


@dataclass(frozen=True)
class Roles:
    train: list
    dev: str
    test: list

    @property
    def eval_stems(self) -> list:
        return list(dict.fromkeys([self.dev, *self.test]))

    @property
    def stems(self) -> list:
        return list(dict.fromkeys([*self.train, *self.eval_stems]))


def roles_for(plan: DataPlan, kind: str) -> Roles:
    d, hub = plan.data, plan.data.hub
    if kind == "hub" and hub is not None:
        r = Roles(list(hub.train if hub.train is not None else d.train),
                  hub.dev if hub.dev is not None else d.dev,
                  list(hub.test if hub.test is not None else d.test))
    else:
        r = Roles(list(d.train), d.dev, list(d.test))
    leaked = [s for s in r.eval_stems if s in r.train]
    if leaked:
        raise UserError(f"{plan.spec_path}: {leaked[0]!r} is both a training and an evaluation split of data")
    return r



def offsets_from_lengths(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


# --------------------------------------------------------------------------------------------------
# Loading prepared data (what the trainer and evaluator use)
# --------------------------------------------------------------------------------------------------
@dataclass
class TokenArray:
    """The examples of one split and side: ``len(a)`` examples, ``a[i]`` the ids of example i (no BOS/EOS)."""

    tokens: np.ndarray     # flat ids, memory-mapped
    offsets: np.ndarray    # int64, len + 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"example {i} out of range for {n} examples")
        i %= n
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def concat(cls, parts: Sequence["TokenArray"]) -> "TokenArray":
        if len(parts) == 1:
            return parts[0]
        tokens = np.concatenate([p.tokens for p in parts])
        return cls(tokens, offsets_from_lengths(np.concatenate([p.lengths for p in parts])))


@dataclass
class Prepared:
    """A prepared-data folder. ``split("train", side)`` and ``split("dev", side)`` resolve by role."""

    path: Path
    manifest: dict
    _arrays: dict = field(default_factory=dict, repr=False)

    @cached_property
    def sp(self):
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=str(self.path / self.manifest["spm"]["file"]))

    @property
    def piece_count(self) -> int:
        """Pieces of the SentencePiece model: ids from here up have no piece and must never be generated
        (fewer than ``vocab_size`` when ``data.spm_hard_vocab_limit: false`` met a small corpus)."""
        return int(self.sp.get_piece_size())

    def tokenizer(self) -> dict:
        """What the subword counts depend on, for run manifests: sentencepiece version, model sha256, pieces."""
        s = self.manifest.get("spm") or {}
        return {"sentencepiece_version": s.get("sentencepiece_version")
                or (self.manifest.get("versions") or {}).get("sentencepiece"),
                "spm_sha256": s.get("sha256"), "pieces": s.get("pieces"), "model_type": s.get("model_type")}

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def sides(self) -> list:
        return list(self.manifest["sides"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def train_stems(self) -> list:
        return list(self.manifest["roles"]["train"])

    @property
    def dev_stem(self) -> str:
        return self.manifest["roles"]["dev"]

    def _side_info(self, stem: str, side: str) -> dict:
        splits = self.manifest["splits"]
        if stem not in splits:
            raise UserError(f"{self.path} has no split {stem!r} (it has {', '.join(splits)})")
        sides = splits[stem]["sides"]
        if side not in sides:
            raise UserError(f"{self.path}: split {stem!r} has no side {side!r} (it has {', '.join(sides)})")
        return sides[side]

    def split(self, stem: str, side: str) -> TokenArray:
        """Token ids of a split stem (or the role ``train`` / ``dev``) and side (language code or ``text``)."""
        if stem not in self.manifest["splits"]:
            if stem == "train":
                return TokenArray.concat([self.split(s, side) for s in self.train_stems])
            if stem == "dev":
                stem = self.dev_stem
        key = (stem, side)
        if key not in self._arrays:
            info = self._side_info(stem, side)
            files = info["files"]
            self._arrays[key] = TokenArray(np.load(self.path / files["tokens"], mmap_mode="r"),
                                           np.load(self.path / files["offsets"]))
        return self._arrays[key]

    def text(self, stem: str, side: str) -> list:
        """The raw reference text of an evaluation split, one string per example."""
        if stem == "dev" and stem not in self.manifest["splits"]:
            stem = self.dev_stem
        info = self._side_info(stem, side)
        if "text" not in info["files"]:
            raise UserError(f"{self.path}: split {stem!r} is a training split; raw text is kept for dev/test only")
        return read_text_lines(self.path / info["files"]["text"])


def load_prepared(path: Union[str, Path], variant: Optional[Variant] = None) -> Prepared:
    """Open a prepared-data folder; with ``variant``, also check it was prepared from that data section."""
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} holds no prepared data (no manifest.json); run `mqa-repro prepare SPEC` "
                        f"first") from None
    except ValueError:
        raise UserError(f"{path}/manifest.json is not valid JSON; run `mqa-repro prepare SPEC --force`") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} was prepared by another version of mqa-repro (format "
                        f"{manifest.get('format_version')}, need {FORMAT_VERSION}); run `mqa-repro prepare` again")
    if variant is not None:
        want = DataPlan.of(variant).hash
        if manifest.get("data_hash") != want:
            raise UserError(f"{path} was prepared from a different data section or vocabulary size than "
                            f"{variant.spec_name}/{variant.name}; run `mqa-repro prepare` for this spec again")
    return Prepared(path, manifest)
