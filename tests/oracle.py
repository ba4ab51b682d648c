"""The test oracle of the decoding engine: greedy and beam search over the eager reference path
(``Transformer.decode_step``), written independently of :mod:`mqa_repro.decode` (the search rules of the
former ``decode.py``, which produced every BLEU before the engine).

Beam search follows fairseq's rule, which makes beam size 1 exactly greedy search: each step takes the
2k best continuations of every sentence; an EOS continuation is finished only if it ranks among the
first k; the first k non-EOS continuations stay alive; a sentence is done once it has k finished
hypotheses (or reaches its length limit, which finishes what is alive). Finished hypotheses are ranked
by log-probability / ((5 + length) / 6) ** alpha.

Decoder-only prompts (``prompt``, batch 1): the prompt is fed after BOS, then the search continues it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mqa_repro.decode import forbid_specials
from mqa_repro.model import BOS, EOS, PAD, Transformer


def length_penalty(length, alpha: float):
    return ((5.0 + length) / 6.0) ** alpha


def _prefill(model, state, prompt, rows):
    """Feed BOS + prompt[:-1] (positions 0 .. P-1); returns (first input token [rows], its position)."""
    ids = [BOS] + [int(x) for x in (prompt if prompt is not None else [])]
    dev = model.embed.weight.device
    for pos, tok in enumerate(ids[:-1]):
        model.decode_step(torch.full((rows,), tok, dtype=torch.long, device=dev), pos, state)
    return torch.full((rows,), ids[-1], dtype=torch.long, device=dev), len(ids) - 1


@torch.no_grad()
def greedy(model: Transformer, src_BS=None, batch=None, max_len_B=None, max_len=256, prompt=None,
           vocab_limit=None):
    """Greedy decoding, batched; each row stops at EOS or its own limit. Returns (tokens, lengths):
    ``tokens`` [B, L] holds the generated ids (EOS included when produced, PAD after it)."""
    device = model.embed.weight.device
    vocab_limit = vocab_limit or model.spec.vocab_size
    batch = src_BS.shape[0] if src_BS is not None else batch
    if max_len_B is None:
        max_len_B = torch.full((batch,), max_len, dtype=torch.long, device=device)
    steps = int(max_len_B.max())
    start = len(prompt) if prompt is not None else 0
    state = model.start_decoding(batch, start + steps, src_BS=src_BS)
    tok, pos0 = _prefill(model, state, prompt, batch)
    out = torch.full((batch, steps), PAD, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for t in range(steps):
        tok = forbid_specials(model.decode_step(tok, pos0 + t, state), vocab_limit).argmax(-1)
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
                max_len=256, prompt=None, vocab_limit=None):
    """Beam search; returns (tokens [B, L], lengths [B], scores [B]) of the best finished hypothesis."""
    device = model.embed.weight.device
    vocab_limit = vocab_limit or model.spec.vocab_size
    batch = src_BS.shape[0] if src_BS is not None else batch
    k = beam
    if max_len_B is None:
        max_len_B = torch.full((batch,), max_len, dtype=torch.long, device=device)
    steps = int(max_len_B.max())
    start = len(prompt) if prompt is not None else 0
    state = model.start_decoding(batch, start + steps, beam=k, src_BS=src_BS)
    tok_N, pos0 = _prefill(model, state, prompt, batch * k)
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
    base_B1 = (torch.arange(batch, device=device) * k)[:, None]
    for t in range(steps):
        logits_NV = model.decode_step(tok_N, pos0 + t, state).float()
        logp = torch.log_softmax(forbid_specials(logits_NV, vocab_limit), -1)
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


def strip(tokens_BL, lengths_B) -> list:
    """Per row: the generated ids without the EOS (the engine's output form)."""
    out = []
    for row, n in zip(tokens_BL.tolist(), lengths_B.tolist()):
        ids = row[:n]
        if ids and ids[-1] == EOS:
            ids = ids[:-1]
        out.append(ids)
    return out
