"""Real corpora -> one SentencePiece model and compact token arrays per spec (``mqa-repro prepare``).

Sources: a local data directory laid out as ``../shared/data`` (one folder per corpus, line-aligned
``.en``/``.de`` files or one sentence/paragraph per line for LM text, ``.gz`` accepted), or the ``datasets``
hub (imported lazily; WMT14, LM1B, WikiText-103, Multi30k).

Prepared layout (``data/<spec name>/`` by default)::

    manifest.json                     sources (sha256), counts per split, spm hash, resolved data spec
    spm.model                         one SentencePiece model shared by source and target
    <stem>.<side>.tokens.npy          all ids of the split, flat (uint16 if vocab < 65536, else int32)
    <stem>.<side>.offsets.npy         int64, n + 1 entries: example i is tokens[offsets[i]:offsets[i + 1]]
    <stem>.<side>.txt                 evaluation splits only: the raw reference text, one line per example

side is the language code for translation and ``text`` for language modelling. Ids exclude BOS/EOS (the
trainer adds them), so an example holds at most ``data.max_len - 1`` ids. The data section is shared by
every variant of a spec, so a spec is prepared once; re-running with unchanged sources and data section is
a no-op, and output is built in a temporary folder beside the target and renamed into place.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np

from .errors import UserError
from .provenance import check_writable, sha256_file
from .runtime import Progress
from .spec import DataSpec, Spec, Variant, load_spec, spec_hash
from .textio import decode_utf8, split_lines, write_lines
from .textio import read_lines as read_text_lines

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
FORMAT_VERSION = 2      # bump when the prepared layout or processing changes: everything re-prepares
ENV_DATA = "MQA_REPRO_DATA"
SOURCES = ("auto", "local", "hub")
_ENCODE_CHUNK = 20_000  # lines per SentencePiece encode call (progress granularity)
SPM_TRAIN_THREADS = 1   # SentencePiece training threads: fixed, the model must not depend on the CPU count


# --------------------------------------------------------------------------------------------------
# Where things are
# --------------------------------------------------------------------------------------------------
def prepared_dir(variant: Union[Variant, Spec, str]) -> Path:
    """Default prepared-data folder of a spec (cwd-relative): ``data/<spec name>``."""
    name = variant if isinstance(variant, str) else getattr(variant, "spec_name", None) or variant.name
    return Path("data") / name


DEFAULT_DATA_DIR = Path("..") / "shared" / "data"


def locate_data_dir(data_dir: Optional[Union[str, Path]] = None) -> tuple[Optional[Path], str]:
    """(local data folder or None, where it was configured): ``--data-dir``, else ``$MQA_REPRO_DATA``, else
    ``../shared/data`` relative to the current folder when that exists.

    A folder configured explicitly (``--data-dir``, ``$MQA_REPRO_DATA``) that does not exist is a
    UserError naming it; a missing default gives (None, description of the default).
    """
    if data_dir is not None:
        d = Path(data_dir)
        if not d.is_dir():
            raise UserError(f"data directory {d} (from --data-dir) does not exist")
        return d, "--data-dir"
    env = os.environ.get(ENV_DATA)
    if env:
        d = Path(env)
        if not d.is_dir():
            raise UserError(f"data directory {d} (from ${ENV_DATA}) does not exist")
        return d, f"${ENV_DATA}"
    d = DEFAULT_DATA_DIR
    where = f"the default {d} in {Path.cwd()}"
    return (d, where) if d.is_dir() else (None, where)


def resolve_data_dir(data_dir: Optional[Union[str, Path]] = None) -> Optional[Path]:
    """``--data-dir``, else ``$MQA_REPRO_DATA``, else ``../shared/data`` if it exists, else None."""
    return locate_data_dir(data_dir)[0]


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
    task = "translation" if first.model.is_seq2seq else "lm"
    return DataPlan(spec.name, spec.path, first.data, first.model.vocab_size, task)


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


def _roles(plan: DataPlan, kind: str) -> Roles:
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


# --------------------------------------------------------------------------------------------------
# Reading: local files
# --------------------------------------------------------------------------------------------------
@dataclass
class SourceFile:
    path: Path
    bytes: int
    mtime_ns: int
    sha256: str = ""
    lines: int = 0

    def record(self, root: Optional[Path]) -> dict:
        return {"path": _rel(self.path, root), "bytes": self.bytes, "mtime_ns": self.mtime_ns,
                "sha256": self.sha256, "lines": self.lines}


def _rel(path: Path, root: Optional[Path]) -> str:
    """``path`` relative to the data directory ``root`` where it lies inside it, else absolute."""
    path = path.resolve()
    return str(path.relative_to(root)) if root is not None and path.is_relative_to(root) else str(path)


def corpus_file(corpus_dir: Path, data: DataSpec, stem: str, lang: Optional[str], role: str) -> Path:
    """The file of one split and side (``.gz`` tried when the plain name is missing)."""
    try:
        name = data.file_pattern.format_map({"stem": stem, "lang": lang or ""})
    except (KeyError, IndexError, ValueError):
        raise UserError(f"data.file_pattern {data.file_pattern!r} may only use {{stem}} and {{lang}}") from None
    path = corpus_dir / name
    if path.is_file():
        return path
    gz = path.with_name(path.name + ".gz")
    if gz.is_file():
        return gz
    raise UserError(f"missing corpus file {path} (data.{role} stem {stem!r} with data.file_pattern "
                    f"{data.file_pattern!r})")


def read_lines(path: Path) -> tuple[list, SourceFile]:
    """All lines of a UTF-8 text file (``.gz`` decompressed), without line ends; its size, mtime and sha256.

    Lines end at '\n' (or '\r\n') only: '\r', U+2028 and the other characters ``str.splitlines`` breaks at
    stay inside their line, as in every file the tool reads or writes (:mod:`mqa_repro.textio`)."""
    st = path.stat()
    raw = path.read_bytes()
    info = SourceFile(path, st.st_size, st.st_mtime_ns, hashlib.sha256(raw).hexdigest())
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error):
            raise UserError(f"{path} is not a valid gzip file") from None
    # '\n' ends a line and nothing else does (mqa_repro.textio); a '\r' just before it is a Windows line end
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in split_lines(decode_utf8(raw, path))]
    info.lines = len(lines)
    return lines, info


# --------------------------------------------------------------------------------------------------
# Reading: the datasets hub
# --------------------------------------------------------------------------------------------------
def load_hub(data: DataSpec) -> object:
    """``datasets.load_dataset(hub.path, hub.name)``: a mapping of split name -> records."""
    hub = data.hub
    try:
        import datasets
    except ImportError:  # pragma: no cover - a declared dependency
        raise UserError("the datasets package is needed for --source hub: pip install datasets") from None
    try:
        return datasets.load_dataset(hub.path, hub.name) if hub.name else datasets.load_dataset(hub.path)
    except Exception as e:  # network, unknown name, missing config: say which and why, in one line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        cfg = f" (configuration {hub.name!r})" if hub.name else ""
        raise UserError(f"could not load {hub.path!r}{cfg} from the datasets hub: {reason}") from None


def _hub_column(split, keys: tuple) -> list:
    """Values at ``keys`` (e.g. ("translation", "en")) of every record of a hub split, as str."""
    table = getattr(split, "data", None)
    if table is not None and hasattr(table, "column") and keys[0] in getattr(split, "column_names", ()):
        import pyarrow.compute as pc

        col = table.column(keys[0])
        for k in keys[1:]:
            col = pc.struct_field(col, k)
        values = col.to_pylist()
    else:
        values = []
        for rec in split:
            for k in keys:
                rec = rec[k]
            values.append(rec)
    return ["" if v is None else str(v) for v in values]


def hub_split_lines(dataset, plan: DataPlan, stem: str, train: bool) -> dict:
    """{side: lines} of one prepared stem, read from the hub split ``hub.splits[stem]``."""
    hub = plan.data.hub
    name = hub.splits[stem]
    try:
        split = dataset[name]
    except (KeyError, ValueError):
        have = ", ".join(map(str, getattr(dataset, "keys", lambda: [])()))
        raise UserError(f"the hub dataset {hub.path!r} has no split {name!r} (data.hub.splits.{stem}); "
                        f"it has {have}") from None
    if train and hub.max_train_lines is not None:
        n = min(hub.max_train_lines, len(split))
        split = split.select(range(n)) if hasattr(split, "select") else split[:n]
    columns = set(getattr(split, "column_names", None) or (split[0].keys() if len(split) else ()))
    out = {}
    for side in plan.sides:
        if plan.task == "lm":
            keys = (hub.text_field or "text",)
        elif "translation" in columns:
            keys = ("translation", side)
        else:
            keys = (side,)
        if keys[0] not in columns:
            raise UserError(f"the hub dataset {hub.path!r} split {name!r} has no field {keys[0]!r} "
                            f"(it has {', '.join(sorted(columns))})")
        try:
            lines = _hub_column(split, keys)
        except (KeyError, TypeError):
            raise UserError(f"the hub dataset {hub.path!r} split {name!r} has no {'.'.join(keys)} field") from None
        # one example per line, always: a record's own line breaks become spaces
        out[side] = [ln.strip("\n").replace("\r", " ").replace("\n", " ") for ln in lines]
    return out


# --------------------------------------------------------------------------------------------------
# Moses detokenisation (the WMT14 training sample is Moses-tokenised and XML-escaped)
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _detokenizer(lang: str):
    from sacremoses import MosesDetokenizer

    return MosesDetokenizer(lang=lang)


def moses_detokenize(line: str, lang: str = "en") -> str:
    """Undo Moses tokenisation and XML escaping of one line with sacremoses' detokenizer for ``lang``
    (plus the ``@,@`` / ``@.@`` number splits of some WMT releases, which it leaves alone).

    ``Parliament &apos;s role , as &quot; a body &quot; ( now ) .`` -> ``Parliament's role, as "a body" (now).``
    """
    line = line.replace(" @,@ ", ",").replace(" @.@ ", ".")
    return _detokenizer(lang).detokenize(line.split())


# --------------------------------------------------------------------------------------------------
# SentencePiece and encoding
# --------------------------------------------------------------------------------------------------
def train_sentencepiece(lines: Sequence[str], plan: DataPlan) -> bytes:
    """Train the spec's SentencePiece model on (a seeded sample of) ``lines``; returns the model bytes.

    The model depends only on the lines, the data section and the sentencepiece version: the sample and
    SentencePiece's own generator are seeded (``data.spm_seed``), the input is not shuffled, and training
    runs on ``SPM_TRAIN_THREADS`` (1) threads, since the learned piece order changes with the thread count
    (and so, before, with the machine's CPU count)."""
    import sentencepiece as spm

    d = plan.data
    if len(lines) > d.spm_sample_lines:
        rng = np.random.default_rng(d.spm_seed)
        pick = np.sort(rng.choice(len(lines), size=d.spm_sample_lines, replace=False))
        lines = [lines[i] for i in pick]
    spm.set_random_generator_seed(d.spm_seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=plan.vocab_size,
            model_type=d.spm_model_type, character_coverage=d.spm_character_coverage,
            hard_vocab_limit=d.spm_hard_vocab_limit, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID,
            eos_id=EOS_ID, max_sentence_length=1 << 16, shuffle_input_sentence=False,
            num_threads=SPM_TRAIN_THREADS, minloglevel=2)
    except RuntimeError as e:
        msg = str(e)
        m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
        if m:
            raise UserError(f"{plan.spec_path}: the training text supports at most {m.group(2)} subwords, fewer "
                            f"than model.vocab_size {m.group(1)}; lower it, add training text, or set "
                            f"data.spm_hard_vocab_limit: false") from None
        m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg)
        if m:
            raise UserError(f"{plan.spec_path}: model.vocab_size ({m.group(1)}) is below the {m.group(2)} pieces "
                            f"the training text needs (one per distinct character at data.spm_character_coverage "
                            f"{d.spm_character_coverage}, plus the 4 special ids); raise model.vocab_size or lower "
                            f"data.spm_character_coverage") from None
        raise UserError(f"SentencePiece could not train on the training text: {msg.splitlines()[0]}") from None
    return model.getvalue()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.int32)


def encode(sp, lines: Sequence[str], dtype: np.dtype, advance: Callable[[int], None]) -> tuple:
    """Flat ids and per-line lengths of ``lines``."""
    tokens, lengths = [], []
    threads = os.cpu_count() or 1
    for start in range(0, len(lines), _ENCODE_CHUNK):
        chunk = list(lines[start:start + _ENCODE_CHUNK])
        ids = sp.encode(chunk, out_type=int, num_threads=threads)
        lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        tokens.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lens.sum())))
        lengths.append(lens)
        advance(len(chunk))
    if not tokens:
        return np.zeros(0, dtype), np.zeros(0, np.int64)
    return np.concatenate(tokens), np.concatenate(lengths)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _keep(tokens: np.ndarray, lengths: np.ndarray, keep: np.ndarray) -> tuple:
    """Only the examples where ``keep`` is true."""
    return tokens[np.repeat(keep, lengths)], lengths[keep]


def _truncate(tokens: np.ndarray, lengths: np.ndarray, limit: int) -> tuple:
    starts = _offsets(lengths)[:-1]
    position = np.arange(len(tokens)) - np.repeat(starts, lengths)
    return tokens[position < limit], np.minimum(lengths, limit)


def _split_long(lengths: np.ndarray, limit: int) -> np.ndarray:
    """Lengths after cutting each long example into consecutive pieces of at most ``limit`` (ids unchanged)."""
    pieces = []
    for n in lengths.tolist():
        if n <= limit:
            pieces.append(n)
        else:
            full, rest = divmod(n, limit)
            pieces.extend([limit] * full + ([rest] if rest else []))
    return np.asarray(pieces, dtype=np.int64)


def apply_length_policy(sides: dict, policy: str, limit: int) -> tuple[dict, dict]:
    """Handle examples over ``limit`` ids on any side: truncate, drop (the pair), split (one side only), or
    keep them whole (language-model evaluation text, which evaluate scores in pieces).

    ``sides`` maps side -> (tokens, lengths). Returns the new mapping and counts of what was done.
    """
    over = np.zeros(len(next(iter(sides.values()))[1]), dtype=bool)
    for _, lengths in sides.values():
        over |= lengths > limit
    n_over = int(over.sum())
    counts = {"over_max": n_over, "truncated": 0, "dropped": 0, "split": 0}
    if not n_over or policy == "keep":
        return sides, counts
    if policy == "drop":
        counts["dropped"] = n_over
        return {s: _keep(t, n, ~over) for s, (t, n) in sides.items()}, counts
    if policy == "split":
        assert len(sides) == 1, "split is only for one-sided (LM) data"
        counts["split"] = n_over
        return {s: (t, _split_long(n, limit)) for s, (t, n) in sides.items()}, counts
    counts["truncated"] = n_over
    return {s: _truncate(t, n, limit) for s, (t, n) in sides.items()}, counts


def _file_stem(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)


# --------------------------------------------------------------------------------------------------
# Staleness
# --------------------------------------------------------------------------------------------------
def _local_inputs(corpus_dir: Path, plan: DataPlan, roles: Roles) -> list:
    train = set(roles.train)
    return [corpus_file(corpus_dir, plan.data, stem, side if plan.task == "translation" else None,
                        "train" if stem in train else ("dev" if stem == roles.dev else "test"))
            for stem in roles.stems for side in plan.sides]


def _up_to_date(out: Path, plan: DataPlan, source: dict, inputs: list) -> bool:
    """True when ``out`` was prepared from the same data section, source and (unchanged) files."""
    try:
        m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if m.get("data_hash") != plan.hash or m.get("source") != source:
        return False
    if not all((out / f).is_file() for f in m.get("outputs", [])):
        return False
    if source["kind"] == "hub":
        return True
    root = Path(source["data_dir"])
    recorded = {r["path"]: r for r in m.get("sources", [])}
    if len(recorded) != len(inputs):
        return False
    for p in inputs:
        r = recorded.get(_rel(p, root))
        if r is None:
            return False
        st = p.stat()
        if (st.st_size, st.st_mtime_ns) != (r["bytes"], r["mtime_ns"]):
            if st.st_size != r["bytes"] or sha256_file(p) != r["sha256"]:
                return False
    return True


# --------------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------------
@dataclass
class PrepareResult:
    path: Path
    up_to_date: bool          # True: nothing was done
    manifest: dict
    seconds: float = 0.0
    notes: list = field(default_factory=list)   # one line each, e.g. why the hub was used


def choose_source(plan: DataPlan, data_dir: Optional[Path], source: str, origin: str = "",
                  say: Optional[Callable[[str], None]] = None) -> tuple[str, Optional[Path]]:
    """("local", corpus folder) or ("hub", None), following ``--source``.

    ``data_dir`` is the local data folder (None: none configured and the default does not exist), ``origin``
    where it came from. With ``auto``, a configured folder that lacks the corpus is an error naming both (no
    silent download); the hub is used only when asked (``hub``) or when no local folder exists at all, and
    then ``say`` is told so in one line.
    """
    if source not in SOURCES:
        raise UserError(f"--source must be one of {', '.join(SOURCES)}, got {source!r}")
    d = plan.data
    if source == "hub":
        if d.hub is None:
            raise UserError(f"{plan.spec_path}: --source hub needs a data.hub section naming the hub dataset")
        return "hub", None
    corpus_dir = data_dir / d.corpus if data_dir is not None else None
    if corpus_dir is not None and corpus_dir.is_dir():
        return "local", corpus_dir
    if data_dir is None:
        if source == "auto" and d.hub is not None:
            if say is not None:
                say(f"no local data folder ({origin or 'none configured'} does not exist; set --data-dir or "
                    f"${ENV_DATA}), so corpus {d.corpus!r} comes from the datasets hub ({d.hub.path})")
            return "hub", None
        raise UserError(f"no local data folder for corpus {d.corpus!r}: {origin or 'none configured'} does not "
                        f"exist; give --data-dir or set ${ENV_DATA}"
                        + ("" if d.hub else " (the spec has no data.hub section to download it from)"))
    have = ", ".join(sorted(p.name for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(".")))
    from_ = f" (from {origin})" if origin else ""
    raise UserError(f"unknown corpus {d.corpus!r}: the data folder {data_dir}{from_} has no folder of that name "
                    f"(it has {have or 'none'})" + ("; pass --source hub to download it from the datasets hub"
                                            if d.hub and source == "auto" else ""))


def prepare(spec: Union[Spec, str, Path], *, data_dir: Optional[Union[str, Path]] = None,
            out: Optional[Union[str, Path]] = None, source: str = "auto", force: bool = False,
            progress: bool = True) -> PrepareResult:
    """Prepare a spec's data: SentencePiece model, token arrays, manifest. A no-op when up to date."""
    t0 = time.perf_counter()
    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    plan = plan_for(spec)
    local, origin = locate_data_dir(data_dir) if source != "hub" else (None, "")
    notes: list = []
    kind, corpus_dir = choose_source(plan, local, source, origin, say=notes.append)
    roles = _roles(plan, kind)
    out = Path(out) if out is not None else prepared_dir(spec)
    check_writable(out, "dir", "prepared-data folder")
    if kind == "local":
        src_record = {"kind": "local", "data_dir": str(corpus_dir.resolve().parent), "corpus": plan.data.corpus}
        inputs = _local_inputs(corpus_dir, plan, roles)
    else:
        src_record = {"kind": "hub", **{k: v for k, v in dataclasses.asdict(plan.data.hub).items()}}
        inputs = []
    if not force and _up_to_date(out, plan, src_record, inputs):
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        return PrepareResult(out, True, manifest, time.perf_counter() - t0, notes)
    if out.exists() and not (out / "manifest.json").is_file() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not a prepared-data folder (no manifest.json); choose another --out")

    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]   # removed again on failure
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)   # mkdtemp makes it private; the result should look like any folder
    try:
        with Progress("prepare", enabled=progress) as steps:
            for note in notes:
                steps.log(note)
            try:
                manifest = _prepare_into(tmp, plan, roles, kind, corpus_dir, src_record, steps)
            except UserError as e:
                if notes:   # the hub was a fallback: say why it was tried
                    raise UserError(f"{e}; the hub was tried because there is {notes[0].split(', so ')[0]}") \
                        from None
                raise
            manifest["seconds"] = round(time.perf_counter() - t0, 2)
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:   # innermost first: never leave an empty data/ behind
            try:
                p.rmdir()
            except OSError:
                break
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return PrepareResult(out, False, manifest, time.perf_counter() - t0, notes)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an existing ``out`` is swapped out first, then removed."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _read_split(plan: DataPlan, stem: str, role: str, kind: str, corpus_dir: Optional[Path], hub_data,
                sources: list) -> dict:
    """{side: lines} of one split, checked: files exist, UTF-8, parallel sides equally long."""
    if kind == "hub":
        return hub_split_lines(hub_data, plan, stem, train=role == "train")
    lines, infos = {}, []
    for side in plan.sides:
        path = corpus_file(corpus_dir, plan.data, stem, side if plan.task == "translation" else None, role)
        lines[side], info = read_lines(path)
        infos.append(info)
    sources.extend(infos)
    if plan.task == "translation":
        a, b = infos
        if a.lines != b.lines:
            raise UserError(f"parallel files differ in length: {a.path} has {a.lines} lines but {b.path} "
                            f"has {b.lines}")
    return lines


def _prepare_into(tmp: Path, plan: DataPlan, roles: Roles, kind: str, corpus_dir: Optional[Path],
                  src_record: dict, steps: Progress) -> dict:
    import sentencepiece as spm

    from .provenance import git_sha, now, versions

    d = plan.data
    where = f"{corpus_dir}" if kind == "local" else f"the datasets hub ({d.hub.path})"
    steps.log(f"{plan.spec_name}: {d.corpus} from {where}")
    hub_data = None
    if kind == "hub":
        with steps.task(f"loading {d.hub.path} from the datasets hub"):
            hub_data = load_hub(d)

    # 1. read every split, check it, clean the training text
    sources: list = []
    texts: dict = {}
    stats: dict = {}
    detok = d.hub.detokenize if kind == "hub" else d.detokenize
    with steps.task("reading and checking the corpus", total=len(roles.stems)) as advance:
        for stem in roles.stems:
            role = "train" if stem in roles.train else ("dev" if stem == roles.dev else "test")
            lines = _read_split(plan, stem, role, kind, corpus_dir, hub_data, sources)
            n_read = len(next(iter(lines.values())))
            s = {"role": role, "lines": n_read}
            if role == "train" and detok:
                lines = {side: [moses_detokenize(x, side) for x in ls] for side, ls in lines.items()}
            if role == "train" or (plan.task == "lm" and d.skip_blank):
                keep = [all(lines[side][i].strip() for side in plan.sides) for i in range(n_read)]
                if not all(keep):
                    lines = {side: [x for x, k in zip(ls, keep) if k] for side, ls in lines.items()}
                s["blank_dropped"] = n_read - len(next(iter(lines.values())))
            if not next(iter(lines.values())):
                what = (", ".join(str(i.path) for i in sources[-len(plan.sides):]) if kind == "local"
                        else f"hub split {d.hub.splits[stem]!r}")
                raise UserError(f"the {role} split {stem!r} ({what}) has no usable lines")
            texts[stem], stats[stem] = lines, s
            advance(1)

    # 2. one SentencePiece model on the training text of every side
    train_text = [x for stem in roles.train for side in plan.sides for x in texts[stem][side]]
    n_sample = min(len(train_text), d.spm_sample_lines)
    with steps.task(f"training SentencePiece ({d.spm_model_type}, {plan.vocab_size} pieces) on "
                    f"{n_sample:,} lines"):
        model_bytes = train_sentencepiece(train_text, plan)
    del train_text
    (tmp / "spm.model").write_bytes(model_bytes)
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    warnings = []
    if sp.get_piece_size() < plan.vocab_size:
        warnings.append(f"SentencePiece learned {sp.get_piece_size()} pieces, fewer than model.vocab_size "
                        f"{plan.vocab_size} (data.spm_hard_vocab_limit: false); ids from "
                        f"{sp.get_piece_size()} up have no piece and are never generated")
        print(f"prepare: warning: {warnings[-1]}", file=sys.stderr, flush=True)

    # 3. encode, apply the length policy, write arrays
    dtype = token_dtype(plan.vocab_size)
    outputs = ["spm.model"]
    total = sum(len(ls) for lines in texts.values() for ls in lines.values())
    splits = {}
    with steps.task("encoding", total=total) as advance:
        for stem in roles.stems:
            lines, s = texts[stem], stats[stem]
            encoded = {side: encode(sp, lines[side], dtype, advance) for side in plan.sides}
            if s["role"] == "train":
                policy = d.too_long
            else:  # evaluation sets keep every example: BLEU and perplexity are over the whole set.
                # LM text is kept whole, one example per line: evaluate scores a long line in pieces, so that
                # the loss and the word count cover the same text (perplexity per word).
                policy = "keep" if plan.task == "lm" else "truncate"
            encoded, counts = apply_length_policy(encoded, policy, plan.max_ids)
            s.update(counts, policy=policy)
            s["examples"] = int(len(next(iter(encoded.values()))[1]))
            if s["examples"] == 0:
                raise UserError(f"the {s['role']} split {stem!r} has no examples left after "
                                f"data.too_long: drop (every one exceeds {plan.max_ids} subwords)")
            s["sides"] = {}
            for side, (tokens, lengths) in encoded.items():
                base = f"{_file_stem(stem)}.{side}"
                np.save(tmp / f"{base}.tokens.npy", tokens)
                np.save(tmp / f"{base}.offsets.npy", _offsets(lengths))
                files = {"tokens": f"{base}.tokens.npy", "offsets": f"{base}.offsets.npy"}
                if s["role"] != "train":
                    write_lines(tmp / f"{base}.txt", lines[side])
                    files["text"] = f"{base}.txt"
                outputs.extend(files.values())
                s["sides"][side] = {"token_count": int(lengths.sum()), "longest": int(lengths.max(initial=0)),
                                    "unk_count": int(np.count_nonzero(tokens == UNK_ID)),
                                    "text_sha256": hashlib.sha256("\n".join(lines[side]).encode()).hexdigest(),
                                    "files": files}
            splits[stem] = s

    root = Path(src_record["data_dir"]) if kind == "local" else None
    return {
        "format_version": FORMAT_VERSION,
        "kind": "prepared_data",
        "spec_name": plan.spec_name,
        "spec_file": plan.spec_path,
        "spec": plan.to_dict(),
        "data_hash": plan.hash,
        "task": plan.task,
        "sides": plan.sides,
        "roles": dataclasses.asdict(roles),
        "source": src_record,
        "sources": [i.record(root) for i in sources],
        "vocab_size": plan.vocab_size,
        "spm": {"file": "spm.model", "sha256": hashlib.sha256(model_bytes).hexdigest(),
                "sentencepiece_version": spm.__version__, "train_threads": SPM_TRAIN_THREADS,
                "pieces": sp.get_piece_size(), "vocab_short_by": max(0, plan.vocab_size - sp.get_piece_size()),
                "model_type": d.spm_model_type, "sample_lines": n_sample,
                "seed": d.spm_seed, "pad_id": PAD_ID, "unk_id": UNK_ID, "bos_id": BOS_ID, "eos_id": EOS_ID},
        "dtype": dtype.name,
        "max_ids": plan.max_ids,
        "splits": splits,
        "warnings": warnings,
        "outputs": outputs,
        "git_sha": git_sha(),
        "created": now(),
        "versions": versions(),
    }


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
        return cls(tokens, _offsets(np.concatenate([p.lengths for p in parts])))


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
        task = "translation" if variant.model.is_seq2seq else "lm"
        want = DataPlan(variant.spec_name, variant.source, variant.data, variant.model.vocab_size, task).hash
        if manifest.get("data_hash") != want:
            raise UserError(f"{path} was prepared from a different data section or vocabulary size than "
                            f"{variant.spec_name}/{variant.name}; run `mqa-repro prepare` for this spec again")
    return Prepared(path, manifest)
