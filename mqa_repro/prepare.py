"""``mqa-repro prepare``: a spec's corpora -> one SentencePiece model and compact token arrays.

The steps, in order: choose the source (:mod:`mqa_repro.corpora`), read and check every split, train the
tokenizer on the training text (:mod:`mqa_repro.tokenizer`), encode with the length policy, write the
arrays and the manifest (:mod:`mqa_repro.data` describes the layout). Re-running with unchanged sources and
data section is a no-op, and output is built in a temporary folder beside the target and renamed into place.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .corpora import (choose_source, data_dir_relative, load_hub, local_inputs, locate_data_dir,
                      moses_detokenize, read_split)
from .data import FORMAT_VERSION, DataPlan, Roles, offsets_from_lengths, plan_for, prepared_dir, roles_for
from .errors import UserError
from .provenance import check_writable, sha256_file
from .runtime import Progress
from .spec import Spec
from .specfile import load_spec
from .textio import write_lines
from .tokenizer import (BOS_ID, EOS_ID, PAD_ID, SPM_TRAIN_THREADS, UNK_ID, apply_length_policy,
                        check_piece_count, encode, token_dtype, train_sentencepiece)


@dataclass
class PrepareResult:
    path: Path
    up_to_date: bool          # True: nothing was done
    manifest: dict
    seconds: float = 0.0
    notes: list = field(default_factory=list)   # one line each, e.g. why the hub was used


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
    roles = roles_for(plan, kind)
    out = Path(out) if out is not None else prepared_dir(spec)
    check_writable(out, "dir", "prepared-data folder")
    if kind == "local":
        src_record = {"kind": "local", "data_dir": str(corpus_dir.resolve().parent), "corpus": plan.data.corpus}
        inputs = local_inputs(corpus_dir, plan, roles)
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



def _file_stem(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)


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
        r = recorded.get(data_dir_relative(p, root))
        if r is None:
            return False
        st = p.stat()
        if (st.st_size, st.st_mtime_ns) != (r["bytes"], r["mtime_ns"]):
            if st.st_size != r["bytes"] or sha256_file(p) != r["sha256"]:
                return False
    return True


def _prepare_into(tmp: Path, plan: DataPlan, roles: Roles, kind: str, corpus_dir: Optional[Path],
                  src_record: dict, steps: Progress) -> dict:
    """Write the prepared data of ``plan`` into ``tmp``; returns the manifest (without ``seconds``)."""
    import sentencepiece as spm

    d = plan.data
    where = f"{corpus_dir}" if kind == "local" else f"the datasets hub ({d.hub.path})"
    steps.log(f"{plan.spec_name}: {d.corpus} from {where}")
    hub_data = None
    if kind == "hub":
        with steps.task(f"loading {d.hub.path} from the datasets hub"):
            hub_data = load_hub(d)
    sources: list = []
    texts, stats = _read_corpus(plan, roles, kind, corpus_dir, hub_data, sources, steps)
    model_bytes, n_sample = _train_tokenizer(plan, roles, texts, steps)
    (tmp / "spm.model").write_bytes(model_bytes)
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    warnings = check_piece_count(sp, plan)
    dtype = token_dtype(plan.vocab_size)
    outputs = ["spm.model"]
    splits = _encode_and_write(tmp, plan, roles, sp, texts, stats, dtype, outputs, steps)
    root = Path(src_record["data_dir"]) if kind == "local" else None
    manifest = _manifest(plan, roles, src_record, [i.record(root) for i in sources], model_bytes, sp, n_sample)
    manifest.update({"dtype": dtype.name, "max_ids": plan.max_ids, "splits": splits, "warnings": warnings,
                     "outputs": outputs})
    return _with_provenance(manifest)


def _read_corpus(plan: DataPlan, roles: Roles, kind: str, corpus_dir: Optional[Path], hub_data,
                 sources: list, steps: Progress) -> tuple[dict, dict]:
    """Step 1: read every split, check it, clean the training text. Returns ({stem: {side: lines}},
    {stem: counts}); appends each local file read to ``sources``."""
    d = plan.data
    texts: dict = {}
    stats: dict = {}
    detok = d.hub.detokenize if kind == "hub" else d.detokenize
    with steps.task("reading and checking the corpus", total=len(roles.stems)) as advance:
        for stem in roles.stems:
            role = "train" if stem in roles.train else ("dev" if stem == roles.dev else "test")
            lines = read_split(plan, stem, role, kind, corpus_dir, hub_data, sources)
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
    return texts, stats


def _train_tokenizer(plan: DataPlan, roles: Roles, texts: dict, steps: Progress) -> tuple[bytes, int]:
    """Step 2: one SentencePiece model on the training text of every side; (model bytes, sample lines)."""
    d = plan.data
    train_text = [x for stem in roles.train for side in plan.sides for x in texts[stem][side]]
    n_sample = min(len(train_text), d.spm_sample_lines)
    with steps.task(f"training SentencePiece ({d.spm_model_type}, {plan.vocab_size} pieces) on "
                    f"{n_sample:,} lines"):
        return train_sentencepiece(train_text, plan), n_sample


def _encode_and_write(tmp: Path, plan: DataPlan, roles: Roles, sp, texts: dict, stats: dict,
                      dtype: np.dtype, outputs: list, steps: Progress) -> dict:
    """Step 3: encode every split, apply the length policy, write the arrays (and the evaluation text);
    returns the manifest's ``splits`` and appends the files written to ``outputs``."""
    total = sum(len(ls) for lines in texts.values() for ls in lines.values())
    splits = {}
    with steps.task("encoding", total=total) as advance:
        for stem in roles.stems:
            lines, s = texts[stem], stats[stem]
            encoded = {side: encode(sp, lines[side], dtype, advance) for side in plan.sides}
            if s["role"] == "train":
                policy = plan.data.too_long
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
            s["sides"] = {side: _write_side(tmp, stem, side, tokens, lengths, lines[side], s["role"], outputs)
                          for side, (tokens, lengths) in encoded.items()}
            splits[stem] = s
    return splits


def _write_side(tmp: Path, stem: str, side: str, tokens: np.ndarray, lengths: np.ndarray, lines: list,
                role: str, outputs: list) -> dict:
    """Write one split's side (ids, offsets, and the raw text of an evaluation split); its manifest entry."""
    base = f"{_file_stem(stem)}.{side}"
    np.save(tmp / f"{base}.tokens.npy", tokens)
    np.save(tmp / f"{base}.offsets.npy", offsets_from_lengths(lengths))
    files = {"tokens": f"{base}.tokens.npy", "offsets": f"{base}.offsets.npy"}
    if role != "train":
        write_lines(tmp / f"{base}.txt", lines)
        files["text"] = f"{base}.txt"
    outputs.extend(files.values())
    return {"token_count": int(lengths.sum()), "longest": int(lengths.max(initial=0)),
            "unk_count": int(np.count_nonzero(tokens == UNK_ID)),
            "text_sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest(), "files": files}


def _manifest(plan: DataPlan, roles: Roles, src_record: dict, sources: list, model_bytes: bytes, sp,
              n_sample: int) -> dict:
    """The manifest's description of the spec, the sources and the tokenizer."""
    import sentencepiece as spm

    d = plan.data
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
        "sources": sources,
        "vocab_size": plan.vocab_size,
        "spm": {"file": "spm.model", "sha256": hashlib.sha256(model_bytes).hexdigest(),
                "sentencepiece_version": spm.__version__, "train_threads": SPM_TRAIN_THREADS,
                "pieces": sp.get_piece_size(), "vocab_short_by": max(0, plan.vocab_size - sp.get_piece_size()),
                "model_type": d.spm_model_type, "sample_lines": n_sample,
                "seed": d.spm_seed, "pad_id": PAD_ID, "unk_id": UNK_ID, "bos_id": BOS_ID, "eos_id": EOS_ID},
    }


def _with_provenance(manifest: dict) -> dict:
    from .provenance import git_sha, now, versions

    return {**manifest, "git_sha": git_sha(), "created": now(), "versions": versions()}
