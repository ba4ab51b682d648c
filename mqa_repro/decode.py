"""Greedy and beam search over a model's ``decode_step``.

Search knows nothing about attention: it takes the model, a :class:`~mqa_repro.model.DecodeState` and
the EOS id, owns the step position, and reorders the cache through the state's one ``reorder`` method.

Beam search follows fairseq's rule, which makes beam size 1 exactly greedy search: each step takes the
2k best continuations of every sentence; an EOS continuation is finished only if it ranks among the
first k; the first k non-EOS continuations stay alive; a sentence is done once it has k finished
hypotheses (or reaches its length limit, which finishes what is alive). Finished hypotheses are ranked
by log-probability / ((5 + length) / 6) ** alpha.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .model import BOS, EOS, PAD, Transformer


def forbid_specials(logits_NV, vocab_size: Optional[int] = None):
    """PAD and BOS are never generated (they are not targets); UNK stays possible. Nor are the rows that pad
    the vocabulary to a multiple of ``vocab_multiple`` (ids >= ``vocab_size``): training never targets them,
    so their logits are untrained, and the SentencePiece model has no piece for them."""
    logits_NV[:, PAD] = float("-inf")
    logits_NV[:, BOS] = float("-inf")
    if vocab_size is not None:
        logits_NV[:, vocab_size:] = float("-inf")
    return logits_NV


def _limit(model: Transformer, vocab_limit: Optional[int]) -> int:
    """The first id that may not be generated: model.vocab_size, or the tokenizer's piece count if lower."""
    v = model.spec.vocab_size
    return v if vocab_limit is None else min(v, int(vocab_limit))


def length_penalty(length, alpha: float):
    return ((5.0 + length) / 6.0) ** alpha


def max_lengths(src_BS: Optional[torch.Tensor], batch: int, a: float, b: int, cap: int, device) -> torch.Tensor:
    """Per-sentence decode limit min(cap, a * source length + b) (cap alone without a source)."""
    if src_BS is None:
        return torch.full((batch,), cap, dtype=torch.long, device=device)
    src_len = (src_BS != PAD).sum(1).float()
    return torch.clamp((a * src_len + b).floor().long(), max=cap, min=1)


@torch.no_grad()
def greedy(model: Transformer, src_BS=None, batch=None, max_len_B=None, max_len=256, prefix_BP=None,
           vocab_limit: Optional[int] = None):
    """Greedy decoding, batched; each row stops at EOS or its own limit. Returns (tokens, lengths).

    ``vocab_limit``: ids from here up are never generated; pass the SentencePiece model's piece count
    (``Prepared.piece_count``), which is below model.vocab_size when the corpus was too small for it.

    ``tokens`` [B, L] holds the generated ids (EOS included when produced, PAD after it).
    ``prefix_BP`` (decoder-only models) forces the first tokens after BOS.
    """
    device = model.embed.weight.device
    batch = src_BS.shape[0] if src_BS is not None else batch
    if max_len_B is None:
        max_len_B = torch.full((batch,), max_len, dtype=torch.long, device=device)
    steps = int(max_len_B.max())
    state = model.start_decoding(batch, steps, src_BS=src_BS)
    out = torch.full((batch, steps), PAD, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tok = torch.full((batch,), BOS, dtype=torch.long, device=device)
    for t in range(steps):
        tok = forbid_specials(model.decode_step(tok, t, state), _limit(model, vocab_limit)).argmax(-1)
        tok = torch.where(done, torch.full_like(tok, PAD), tok)
        out[:, t] = tok
        done |= (tok == EOS) | (t + 1 >= max_len_B)
        if bool(done.all()):
            break
    lengths = ((out != PAD).sum(1))
    return out[:, : int(lengths.max()) if batch else 0], lengths


@dataclass
class BeamState:
    alive_tokens_BKL: torch.Tensor   # generated ids of the live hypotheses (PAD beyond the step)
    alive_scores_BK: torch.Tensor    # summed log-probabilities
    fin_tokens_BKL: torch.Tensor     # finished hypotheses
    fin_scores_BK: torch.Tensor      # length-normalised scores; -inf where empty
    fin_count_B: torch.Tensor        # how many finished per sentence
    done_B: torch.Tensor


@torch.no_grad()
def beam_search(model: Transformer, src_BS=None, batch=None, beam=4, alpha=0.6, max_len_B=None,
                max_len=256, vocab_limit: Optional[int] = None):
    """Beam search; returns (tokens [B, L], lengths [B], scores [B]) of the best finished hypothesis.

    ``vocab_limit`` as in :func:`greedy`: ids from here up (no SentencePiece piece) are never generated."""
    device = model.embed.weight.device
    batch = src_BS.shape[0] if src_BS is not None else batch
    k = beam
    if max_len_B is None:
        max_len_B = torch.full((batch,), max_len, dtype=torch.long, device=device)
    steps = int(max_len_B.max())
    state = model.start_decoding(batch, steps, beam=k, src_BS=src_BS)
    neg_inf = float("-inf")
    s = BeamState(
        alive_tokens_BKL=torch.full((batch, k, steps), PAD, dtype=torch.long, device=device),
        # Only beam 0 is live at the start, so the first step does not pick k copies of one token.
        alive_scores_BK=torch.tensor([0.0] + [neg_inf] * (k - 1), device=device).repeat(batch, 1),
        fin_tokens_BKL=torch.full((batch, k, steps), PAD, dtype=torch.long, device=device),
        fin_scores_BK=torch.full((batch, k), neg_inf, device=device),
        fin_count_B=torch.zeros(batch, dtype=torch.long, device=device),
        done_B=torch.zeros(batch, dtype=torch.bool, device=device),
    )
    tok_N = torch.full((batch * k,), BOS, dtype=torch.long, device=device)
    base_B1 = (torch.arange(batch, device=device) * k)[:, None]
    for t in range(steps):
        logits_NV = model.decode_step(tok_N, t, state).float()
        logp = torch.log_softmax(forbid_specials(logits_NV, _limit(model, vocab_limit)), -1)
        vocab = logp.shape[-1]
        cand = (s.alive_scores_BK[..., None] + logp.view(batch, k, vocab)).view(batch, k * vocab)
        top_scores, top_idx = cand.topk(2 * k, dim=-1)                     # [B, 2k]
        parent, token = top_idx // vocab, top_idx % vocab
        is_eos = token == EOS
        last = (t + 1) >= max_len_B                                        # [B]
        # Finish: EOS among the first k candidates; at the length limit, the first k of anything.
        rank = torch.arange(2 * k, device=device)[None]
        finish = (is_eos & (rank < k)) | (last[:, None] & (rank < k))
        finish &= ~s.done_B[:, None]
        if bool(finish.any()):
            _collect_finished(s, finish, parent, token, top_scores, t, alpha)
        # Alive: the first k non-EOS candidates.
        alive_rank = torch.where(is_eos, torch.full_like(rank, 4 * k), rank.expand_as(is_eos))
        order = alive_rank.argsort(dim=1)[:, :k]
        a_parent, a_token = parent.gather(1, order), token.gather(1, order)
        a_scores = top_scores.gather(1, order)
        s.alive_tokens_BKL = s.alive_tokens_BKL.gather(1, a_parent[..., None].expand(-1, -1, steps)).clone()
        s.alive_tokens_BKL[:, :, t] = a_token
        s.alive_scores_BK = a_scores
        s.done_B |= (s.fin_count_B >= k) | last
        if bool(s.done_B.all()):
            break
        rows_N = (base_B1 + a_parent).view(-1)
        state.reorder(rows_N)
        tok_N = a_token.view(-1)
    best = s.fin_scores_BK.argmax(1)
    tokens = s.fin_tokens_BKL[torch.arange(batch, device=device), best]
    lengths = (tokens != PAD).sum(1)
    width = int(lengths.max()) if batch else 0
    return tokens[:, :width], lengths, s.fin_scores_BK.max(1).values


def _collect_finished(s: BeamState, finish_BC, parent_BC, token_BC, scores_BC, t, alpha):
    """Move the marked candidates into each sentence's finished list (at most k kept, best first)."""
    batch, k = s.fin_scores_BK.shape
    steps = s.fin_tokens_BKL.shape[-1]
    lp = length_penalty(t + 1, alpha)
    new_scores = torch.where(finish_BC, scores_BC / lp, torch.full_like(scores_BC, float("-inf")))
    new_tokens = s.alive_tokens_BKL.gather(1, parent_BC[..., None].expand(-1, -1, steps)).clone()
    new_tokens[:, :, t] = token_BC
    # A finished hypothesis keeps its EOS; one cut by the length limit keeps its last token.
    all_scores = torch.cat([s.fin_scores_BK, new_scores], 1)
    all_tokens = torch.cat([s.fin_tokens_BKL, new_tokens], 1)
    keep = all_scores.topk(k, dim=1).indices
    s.fin_scores_BK = all_scores.gather(1, keep)
    s.fin_tokens_BKL = all_tokens.gather(1, keep[..., None].expand(-1, -1, steps))
    s.fin_count_B = s.fin_count_B + finish_BC.sum(1)
