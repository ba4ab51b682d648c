"""Reading the corpora: a local data folder laid out as ``../shared/data`` or the ``datasets`` hub.

Local folders hold one folder per corpus with line-aligned ``.en``/``.de`` files (or one sentence/paragraph
per line for LM text, ``.gz`` accepted); the hub (imported lazily) serves WMT14, LM1B, WikiText-103,
Multi30k. Lines end at '\n' only (:mod:`mqa_repro.textio`). ``choose_source`` follows ``--source``;
``read_split`` gives the checked lines of one split; ``moses_detokenize`` cleans Moses-tokenised text.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from .data import DataPlan, Roles
from .errors import UserError
from .spec import DataSpec
from .textio import decode_utf8, split_lines

ENV_DATA = "MQA_REPRO_DATA"
SOURCES = ("auto", "local", "hub")


# --------------------------------------------------------------------------------------------------
# Where the local data folder is
# --------------------------------------------------------------------------------------------------
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
        return {"path": data_dir_relative(self.path, root), "bytes": self.bytes, "mtime_ns": self.mtime_ns,
                "sha256": self.sha256, "lines": self.lines}


def data_dir_relative(path: Path, root: Optional[Path]) -> str:
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
# Choosing the source and reading one split
# --------------------------------------------------------------------------------------------------
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



def read_split(plan: DataPlan, stem: str, role: str, kind: str, corpus_dir: Optional[Path], hub_data,
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


def local_inputs(corpus_dir: Path, plan: DataPlan, roles: Roles) -> list:
    train = set(roles.train)
    return [corpus_file(corpus_dir, plan.data, stem, side if plan.task == "translation" else None,
                        "train" if stem in train else ("dev" if stem == roles.dev else "test"))
            for stem in roles.stems for side in plan.sides]

