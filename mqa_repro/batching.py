"""Batching: the prepared data as examples, and examples as the training loop's batches.

Shape legend (as in model.py): B rows of a batch, T target positions, S source positions.

* :func:`open_prepared` opens a spec's prepared data (``mqa-repro prepare``) and :func:`data_fingerprint`
  names its content; :func:`load_examples` reads one split as :class:`Examples` (id arrays, BOS/EOS added
  later by :func:`collate`).
* :func:`plan_epoch` lays one epoch out as global batches of rows (lists of example indices), identically
  on every rank from ``(seed, epoch)``; with packing, short examples share a row of ``data.max_len``
  positions (first-fit, :func:`_pack_rows`), told apart by segment ids.
* :class:`BatchStream` hands out global batches epoch after epoch from a resumable position;
  :class:`Prefetcher` cuts a global batch into this rank's micro-batches (:func:`split_rows`), collates
  them and copies them to the device while the previous step runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .errors import UserError
from .model import BOS, EOS, PAD
from .spec import Variant, spec_hash
from .step import Batch


# --------------------------------------------------------------------------------------------------
# Examples: token arrays from the prepared data, BOS/EOS added here
# --------------------------------------------------------------------------------------------------
@dataclass
class Examples:
    """One split as lists of id arrays (no BOS/EOS). ``src`` is None for language models."""

    tgt: list
    src: Optional[list] = None

    def __len__(self):
        return len(self.tgt)

    @property
    def tgt_lens(self) -> np.ndarray:   # target tokens the model predicts: ids + EOS
        return np.fromiter((len(t) + 1 for t in self.tgt), dtype=np.int64, count=len(self.tgt))

    @property
    def src_lens(self) -> np.ndarray:
        if self.src is None:
            return np.zeros(len(self.tgt), dtype=np.int64)
        return np.fromiter((len(s) + 1 for s in self.src), dtype=np.int64, count=len(self.src))


def _read_side(arr, limit: Optional[int], max_tokens: int) -> list:
    n = len(arr) if limit is None else min(limit, len(arr))
    return [np.asarray(arr[i], dtype=np.int64)[:max_tokens] for i in range(n)]


def load_examples(prepared, variant: Variant, stem: str, limit: Optional[int] = None) -> Examples:
    """Split ``stem`` as Examples; each side is cut to data.max_len - 1 ids so that ids + BOS/EOS fit."""
    d = variant.data
    keep = d.max_len - 1
    try:
        if variant.model.is_seq2seq:
            return Examples(tgt=_read_side(prepared.split(stem, d.tgt_lang), limit, keep),
                            src=_read_side(prepared.split(stem, d.src_lang), limit, keep))
        return Examples(tgt=_read_side(prepared.split(stem, "text"), limit, keep))
    except (FileNotFoundError, KeyError) as e:
        raise UserError(f"the prepared data in {prepared.path} has no split {stem!r} ({e}); "
                        f"run `mqa-repro prepare` for this spec again") from None


def open_prepared(variant: Variant, data: Optional[Path] = None):
    """``load_prepared`` with a clear sentence when the data is missing or does not fit the model."""
    from .data import load_prepared, prepared_dir

    path = Path(data) if data is not None else prepared_dir(variant)
    if not (path / "manifest.json").is_file():
        spec_hint = variant.source if variant.source.endswith((".yaml", ".yml")) else f"experiments/{variant.spec_name}.yaml"
        raise UserError(f"no prepared data at {path}; run `mqa-repro prepare {spec_hint}` first (or pass --data DIR)")
    prepared = load_prepared(path, variant)
    n_pieces = prepared.sp.get_piece_size()
    if n_pieces > variant.model.vocab_size:
        raise UserError(f"the prepared data in {path} has {n_pieces} subwords but model.vocab_size is "
                        f"{variant.model.vocab_size}; prepare the data for this spec")
    return prepared


def data_fingerprint(prepared) -> Optional[str]:
    """A hash of what the prepared data IS, not of where or when it was made: the data section, the
    SentencePiece model, the source files' content and every split's counts and text hashes. Two prepares
    of the same inputs, in different folders or at different times, have the same fingerprint."""
    m = getattr(prepared, "manifest", None)
    if not m:
        return None
    content = {"data_hash": m.get("data_hash"), "spm": (m.get("spm") or {}).get("sha256"),
               "sources": sorted(s.get("sha256") or "" for s in m.get("sources", []) if isinstance(s, dict)),
               "splits": m.get("splits")}
    return spec_hash(content)


# --------------------------------------------------------------------------------------------------
# Batches: a plan of rows (lists of example indices) per global step, deterministic from (seed, epoch)
# --------------------------------------------------------------------------------------------------
def _pack_rows(order: np.ndarray, src_lens, tgt_lens, row_len: int, open_rows: int = 32) -> list:
    """First-fit packing of examples (in ``order``) into rows of ``row_len`` source and target slots."""
    rows, rows_free = [], []            # open rows and their free (source, target) slots
    done = []
    for i in order:
        s, t = int(src_lens[i]), int(tgt_lens[i])
        for r, (fs, ft) in enumerate(rows_free):
            if s <= fs and t <= ft:
                rows[r].append(int(i))
                rows_free[r] = (fs - s, ft - t)
                break
        else:
            if len(rows) == open_rows:      # close the oldest open row
                done.append(rows.pop(0))
                rows_free.pop(0)
            rows.append([int(i)])
            rows_free.append((row_len - s, row_len - t))
    return done + rows


def plan_epoch(ex: Examples, seed: int, epoch: int, batch_tokens: int, row_len: int, pack: bool) -> list:
    """Global batches of one epoch: a list of batches, each a list of rows, each a list of example indices.

    Packed: rows of ``row_len`` slots, ``batch_tokens // row_len`` rows a batch. Unpacked: examples of
    similar length share a batch while rows * longest target <= ``batch_tokens``.
    """
    rng = np.random.default_rng([seed, epoch])
    src_lens, tgt_lens = ex.src_lens, ex.tgt_lens
    order = rng.permutation(len(ex))
    if pack:
        rows = _pack_rows(order, src_lens, tgt_lens, row_len)
        per_batch = max(1, batch_tokens // row_len)
        batches = [rows[i:i + per_batch] for i in range(0, len(rows), per_batch)]
    else:
        batches = []
        pool = max(1, 100 * batch_tokens // max(1, int(tgt_lens.mean())))
        for start in range(0, len(order), pool):
            chunk = order[start:start + pool]
            chunk = chunk[np.lexsort((src_lens[chunk], tgt_lens[chunk]))]
            rows, width = [], 0
            for i in chunk:
                w = max(width, int(tgt_lens[i]))
                if rows and (len(rows) + 1) * w > batch_tokens:
                    batches.append(rows)
                    rows, w = [], int(tgt_lens[i])
                rows.append([int(i)])
                width = w
            if rows:
                batches.append(rows)
        batches = [batches[j] for j in rng.permutation(len(batches))]
    return batches


def target_tokens(ex: Examples, rows: list) -> int:
    lens = ex.tgt_lens
    return int(sum(lens[i] for row in rows for i in row))


def collate(ex: Examples, rows: list) -> Batch:
    """Rows of example indices -> padded id tensors with segment ids (1, 2, ... per example; 0 = PAD)."""
    n = max(1, len(rows))
    t_width = max([sum(len(ex.tgt[i]) + 1 for i in row) for row in rows] + [1])
    tgt_in = np.full((n, t_width), PAD, dtype=np.int64)
    tgt_out = np.full((n, t_width), PAD, dtype=np.int64)
    tgt_seg = np.zeros((n, t_width), dtype=np.int64)
    src = src_seg = None
    if ex.src is not None:
        s_width = max([sum(len(ex.src[i]) + 1 for i in row) for row in rows] + [1])
        src = np.full((n, s_width), PAD, dtype=np.int64)
        src_seg = np.zeros((n, s_width), dtype=np.int64)
    for r, row in enumerate(rows):
        tp = sp = 0
        for k, i in enumerate(row, start=1):
            t = ex.tgt[i]
            tgt_in[r, tp] = BOS
            tgt_in[r, tp + 1: tp + 1 + len(t)] = t
            tgt_out[r, tp: tp + len(t)] = t
            tgt_out[r, tp + len(t)] = EOS
            tgt_seg[r, tp: tp + len(t) + 1] = k
            tp += len(t) + 1
            if src is not None:
                s = ex.src[i]
                src[r, sp: sp + len(s)] = s
                src[r, sp + len(s)] = EOS
                src_seg[r, sp: sp + len(s) + 1] = k
                sp += len(s) + 1
    as_t = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    return Batch(as_t(tgt_in), as_t(tgt_out), as_t(tgt_seg), as_t(src), as_t(src_seg))


def split_rows(rows: list, ex: Examples, max_tokens: Optional[int]) -> list:
    """Micro-batches of consecutive rows with rows * widest target <= max_tokens (None: one)."""
    if not max_tokens or not rows:
        return [rows]
    out, cur, width = [], [], 0
    for row in rows:
        w = max(width, sum(len(ex.tgt[i]) + 1 for i in row))
        if cur and (len(cur) + 1) * w > max_tokens:
            out.append(cur)
            cur, w = [], sum(len(ex.tgt[i]) + 1 for i in row)
        cur.append(row)
        width = w
    out.append(cur)
    return out


class BatchStream:
    """Global batches forever (epoch after epoch); ``position`` = (epoch, next batch) resumes exactly."""

    def __init__(self, ex: Examples, seed: int, batch_tokens: int, row_len: int, pack: bool,
                 epoch: int = 0, index: int = 0):
        self.ex, self.seed, self.batch_tokens, self.row_len, self.pack = ex, seed, batch_tokens, row_len, pack
        self.epoch, self.index = epoch, index
        self._plan = None

    def _batches(self):
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, plan_epoch(self.ex, self.seed, self.epoch, self.batch_tokens,
                                                 self.row_len, self.pack))
        return self._plan[1]

    def next(self) -> list:
        batches = self._batches()
        if self.index >= len(batches):
            self.epoch, self.index = self.epoch + 1, 0
            batches = self._batches()
        rows = batches[self.index]
        self.index += 1
        return rows

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}


class Prefetcher:
    """A BatchStream's global batches as this rank's micro-batches, collated and on the device.

    ``prefetch()`` (called right after a step is queued on the GPU) collates the next batch and starts its
    non-blocking copies from pinned memory while the step runs; ``next()`` hands it out. ``position`` is the
    stream position after the batch last handed out (what a checkpoint saves), not after the prefetched one.
    """

    @dataclass
    class Item:
        n_global: int                 # target tokens of the global batch (all ranks)
        micro: list                   # this rank's micro-batches, prepared (padded, on the device)
        shapes: list                  # (target tokens, target width) of each micro-batch, host numbers

    def __init__(self, stream: BatchStream, ex: Examples, rank: int, world: int, micro_tokens, prepare):
        self.stream, self.ex, self.rank, self.world = stream, ex, rank, world
        self.micro_tokens, self.prepare = micro_tokens, prepare
        self.position = stream.position
        self._next = None

    def _load(self):
        rows = self.stream.next()
        after = self.stream.position
        mine = rows[self.rank::self.world]
        micro, shapes = [], []
        for mrows in split_rows(mine, self.ex, self.micro_tokens):
            b = collate(self.ex, mrows)
            shapes.append((target_tokens(self.ex, mrows), int(b.tgt_in_BT.shape[1])))
            micro.append(self.prepare(b))
        return after, self.Item(target_tokens(self.ex, rows), micro, shapes)

    def prefetch(self) -> None:
        if self._next is None:
            self._next = self._load()

    def next(self) -> "Prefetcher.Item":
        after, item = self._next if self._next is not None else self._load()
        self._next = None
        self.position = after
        return item

def concat_examples(parts: list) -> Examples:
    """Several splits' Examples as one (the training splits); one part is returned as is."""
    if len(parts) == 1:
        return parts[0]
    src = None if parts[0].src is None else [s for p in parts for s in p.src]
    return Examples(tgt=[x for p in parts for x in p.tgt], src=src)
