"""The subword tokenizer: one SentencePiece model per spec, trained deterministically, and encoding.

The model depends only on the training lines, the data section and the sentencepiece version (seeded
sample and generator, unshuffled input, ``SPM_TRAIN_THREADS`` threads). Ids 0-3 are PAD, UNK, BOS, EOS
(:mod:`mqa_repro.model` uses the same). ``encode`` gives flat ids and lengths; ``apply_length_policy``
handles examples over ``data.max_len - 1`` ids; ``check_piece_count`` warns when the learned vocabulary is
short of ``model.vocab_size``.
"""
from __future__ import annotations

import io
import itertools
import os
import re
import sys
from typing import Callable, Sequence

import numpy as np

from .data import DataPlan, offsets_from_lengths
from .errors import UserError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
_ENCODE_CHUNK = 20_000  # lines per SentencePiece encode call (progress granularity)
SPM_TRAIN_THREADS = 1   # SentencePiece training threads: fixed, the model must not depend on the CPU count


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


def check_piece_count(sp, plan: DataPlan) -> list:
    """Warnings (also printed to stderr) when SentencePiece learned fewer pieces than ``model.vocab_size``
    (possible only with ``data.spm_hard_vocab_limit: false``)."""
    if sp.get_piece_size() >= plan.vocab_size:
        return []
    warning = (f"SentencePiece learned {sp.get_piece_size()} pieces, fewer than model.vocab_size "
               f"{plan.vocab_size} (data.spm_hard_vocab_limit: false); ids from "
               f"{sp.get_piece_size()} up have no piece and are never generated")
    print(f"prepare: warning: {warning}", file=sys.stderr, flush=True)
    return [warning]


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



def _keep(tokens: np.ndarray, lengths: np.ndarray, keep: np.ndarray) -> tuple:
    """Only the examples where ``keep`` is true."""
    return tokens[np.repeat(keep, lengths)], lengths[keep]


def _truncate(tokens: np.ndarray, lengths: np.ndarray, limit: int) -> tuple:
    starts = offsets_from_lengths(lengths)[:-1]
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
