"""Greedy and beam search, as fixed-shape tensor updates (no host synchronisation inside a step, so a
whole step can be captured in a CUDA graph).

A search state owns its tensors; ``step(logits_NV, t)`` consumes one step's logits and writes the next
input tokens into ``tok_N``. ``t`` is the step index: a Python int (static: the fixed-length benchmark
captures one graph per step) or an int64 device tensor of shape [1] (one graph serves every step).

Rules (the former ``decode.py``'s, which every BLEU of the project was computed with):

* PAD and BOS are never generated, nor ids >= the vocabulary limit (:func:`~.kernels.forbid_specials`).
* Greedy: each row stops at EOS or at its own limit (``limit_N``: the most tokens it may emit, EOS included).
* Beam search follows fairseq's rule, which makes beam size 1 exactly greedy search: each step takes the 2k
  best continuations of every sentence; an EOS continuation is finished only if it ranks among the first k;
  the first k non-EOS continuations stay alive; a sentence is done once it has k finished hypotheses (or
  reaches its length limit, which finishes the first k candidates of that step, whatever they are).
  Finished hypotheses are ranked by log-probability / lp(length), lp(n) = ((5 + n) / 6) ** alpha (Wu et al.
  2016, the paper's length penalty), length counting the EOS.
* ``eos=False`` (the benchmark's protocols): EOS is an ordinary token; rows stop only at their limit.

Hypotheses are stored as per-step tokens and parent rows (the cache's ancestor table follows the same
parents), and traced back once at the end.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..model import EOS, PAD
from . import kernels
from .kernels import argmax_into, beam_candidates, beam_fused

Step = Union[int, torch.Tensor]


def length_penalty(length, alpha: float):
    """((5 + length) / 6) ** alpha (Wu et al. 2016, eq. 14)."""
    return ((5.0 + length) / 6.0) ** alpha


def max_lengths(src_len_B: torch.Tensor, a: float, b: float, cap: int) -> torch.Tensor:
    """Per-sentence decode limit min(cap, floor(a * source length + b)), at least 1. ``src_len_B``: source
    tokens as the encoder sees them (EOS included). Returns int64 [B]."""
    return torch.clamp((a * src_len_B.float() + b).floor().long(), max=cap, min=1)


def _index(rows: Sequence[int], device) -> torch.Tensor:
    """``rows`` (any sequence of ints, a numpy array or a range) as an int64 index tensor on ``device``."""
    return torch.as_tensor(np.asarray(rows, dtype=np.int64), device=device)


def _at(t: Step, x: torch.Tensor, value: torch.Tensor) -> None:
    """x[t] = value for a static or device step."""
    if isinstance(t, int):
        x[t].copy_(value)
    else:
        x.index_copy_(0, t, value.unsqueeze(0))


class Greedy:
    """Greedy search over N rows for at most ``steps`` steps."""

    def __init__(self, rows: int, steps: int, device, limit_N: Optional[torch.Tensor] = None, eos: bool = True,
                 vocab_limit: Optional[int] = None, tune: bool = False):
        """``limit_N`` None: every row runs ``steps`` steps (the fixed-length protocol, nothing checked)."""
        self.eos, self.vocab_limit, self.tune = eos, vocab_limit, tune
        self.tok_N = torch.empty(rows, dtype=torch.long, device=device)   # next input tokens
        self.out_TN = torch.full((steps, rows), PAD, dtype=torch.long, device=device)
        self.done_N = torch.zeros(rows, dtype=torch.bool, device=device)
        self.limit_N = limit_N
        self._scratch_N = torch.empty_like(self.tok_N)

    def reset(self, first_tok_N) -> None:
        self.tok_N.copy_(first_tok_N)
        self.done_N.zero_()
        if self.limit_N is not None:
            self.out_TN.fill_(PAD)

    @property
    def done(self) -> torch.Tensor:
        return self.done_N

    def step(self, logits_NV: torch.Tensor, t: Step) -> None:
        if self.limit_N is None and not self.eos:   # fixed length: argmax straight into the history
            out = self.out_TN[t] if isinstance(t, int) else self._scratch_N
            argmax_into(logits_NV, out, self.tok_N, tune=self.tune, limit=self.vocab_limit)
            if not isinstance(t, int):
                _at(t, self.out_TN, out)
            return
        argmax_into(logits_NV, self.tok_N, self._scratch_N, tune=self.tune, limit=self.vocab_limit)
        self.tok_N.masked_fill_(self.done_N, PAD)
        _at(t, self.out_TN, self.tok_N)
        if self.eos:
            self.done_N |= self.tok_N == EOS
        if self.limit_N is not None:
            self.done_N |= (t + 1) >= self.limit_N

    def take(self, src: "Greedy", sel_B: torch.Tensor, sel_N: torch.Tensor, shift_B: torch.Tensor) -> None:
        """Carry on with rows ``sel_B`` of ``src`` (a batch being compacted) as this search's first rows; the
        spare rows are done. (``sel_N`` = ``sel_B`` and ``shift_B``, for a beam's renumbering, are unused.)"""
        m = len(sel_B)
        self.tok_N.fill_(PAD)
        self.tok_N[:m] = src.tok_N.index_select(0, sel_B)
        self.limit_N.fill_(1)
        self.limit_N[:m] = src.limit_N.index_select(0, sel_B)
        self.out_TN.fill_(PAD)
        self.out_TN[:, :m] = src.out_TN.index_select(1, sel_B)
        self.done_N.fill_(True)
        self.done_N[:m] = src.done_N.index_select(0, sel_B)

    def results(self, rows: Optional[Sequence[int]] = None) -> list:
        """Per row (those of ``rows``, default all): the emitted ids up to EOS (exclusive) or the limit."""
        out_NT = self.out_TN.t()
        if rows is not None:
            out_NT = out_NT[_index(rows, out_NT.device)]
        ids_NT = out_NT.cpu().numpy()
        stop_NT = np.zeros(ids_NT.shape, dtype=bool)
        if self.eos:
            stop_NT |= ids_NT == EOS
        if self.limit_N is not None:
            stop_NT |= ids_NT == PAD
        # each row up to its first stop (exclusive): one slice per row, no per-token Python
        cut_N = np.where(stop_NT.any(1), stop_NT.argmax(1), ids_NT.shape[1])
        return [ids_NT[n, :c].tolist() for n, c in enumerate(cut_N)]


class Beam:
    """Beam search over B sentences x k hypotheses (rows N = B * k, hypothesis n = b * k + j)."""

    def __init__(self, batch: int, beam: int, steps: int, device, alpha: float = 0.6,
                 limit_B: Optional[torch.Tensor] = None, eos: bool = True, vocab_limit: Optional[int] = None,
                 use_triton: bool = True):
        """``limit_B`` None: every sentence runs ``steps`` steps (fixed length). ``use_triton``: a step is two
        Triton kernels where they can run (:func:`~mqa_repro.decode.kernels.beam_fused`): each hypothesis'
        best continuations, then every sentence's selection; otherwise the torch code below (the CPU path
        and the kernels' reference)."""
        b, k = batch, beam
        self.batch, self.k, self.steps, self.alpha, self.eos, self.vocab_limit = b, k, steps, alpha, eos, vocab_limit
        self.use_triton = use_triton
        self.width = 2 * k if eos else k     # candidates per sentence (without EOS, the first k are all alive)
        self.limit_B = limit_B if limit_B is not None else torch.full((b,), steps, dtype=torch.long, device=device)
        self.fixed = limit_B is None and not eos
        self.tok_N = torch.empty(b * k, dtype=torch.long, device=device)
        self.scores_BK = torch.zeros(b, k, dtype=torch.float32, device=device)   # alive: summed log-probabilities
        self.hist_TN = torch.zeros(steps, b * k, dtype=torch.long, device=device)     # alive tokens per step
        self.parent_TN = torch.zeros(steps, b * k, dtype=torch.long, device=device)   # row each extends
        self.parent_N = torch.arange(b * k, device=device)    # last step's parents (the cache follows them)
        self.base_B1 = torch.arange(b, device=device)[:, None] * k
        self.rank_1W = torch.arange(self.width, device=device)[None]
        # finished hypotheses: score / lp, the step of their last token, the row they extend, that token
        self.fin_scores_BK = torch.full((b, k), float("-inf"), device=device)
        self.fin_step_BK = torch.zeros(b, k, dtype=torch.long, device=device)
        self.fin_row_BK = torch.zeros(b, k, dtype=torch.long, device=device)
        self.fin_tok_BK = torch.zeros(b, k, dtype=torch.long, device=device)
        self.fin_count_B = torch.zeros(b, dtype=torch.long, device=device)
        self.done_B = torch.zeros(b, dtype=torch.bool, device=device)
        # lp(t + 1) per step, rounded to fp32 once (as a Python float divides an fp32 tensor)
        self.lp_T = torch.tensor([length_penalty(t + 1, alpha) for t in range(steps)], dtype=torch.float32,
                                 device=device)

    def reset(self, first_tok_N) -> None:
        self.tok_N.copy_(first_tok_N)
        self.scores_BK.fill_(float("-inf"))
        self.scores_BK[:, 0] = 0.0      # only beam 0 is live at the start
        self.parent_N.copy_(torch.arange(self.batch * self.k, device=self.tok_N.device))
        self.fin_scores_BK.fill_(float("-inf"))
        self.fin_count_B.zero_()
        self.done_B.zero_()

    @property
    def done(self) -> torch.Tensor:
        return self.done_B

    def step(self, logits_NV: torch.Tensor, t: Step) -> None:
        b, k, w = self.batch, self.k, self.width
        static_last = isinstance(t, int) and t + 1 >= self.steps
        finish = not self.fixed or static_last
        fused = self.use_triton and beam_fused(logits_NV, k)
        top_lp, top_tok = beam_candidates(logits_NV, w, self.vocab_limit, use_triton=fused)   # [N, w]
        if fused:
            self._select_fused(top_lp, top_tok, t, finish)
            return
        cand_BX = (self.scores_BK[:, :, None] + top_lp.view(b, k, w)).view(b, k * w)
        top_scores, idx = cand_BX.topk(w, dim=-1)                                   # [B, w]
        parent_BW = idx // w                                                        # beam within the sentence
        token_BW = top_tok.view(b, k * w).gather(1, idx)
        if finish:
            self._finish(top_scores, parent_BW, token_BW, t)
        if self.eos:   # alive: the first k non-EOS candidates
            is_eos = token_BW == EOS
            alive_rank = torch.where(is_eos, torch.full_like(is_eos, 4 * k, dtype=torch.long),
                                     self.rank_1W.expand_as(is_eos))
            order = alive_rank.argsort(dim=1)[:, :k]
            a_parent, a_token, a_scores = parent_BW.gather(1, order), token_BW.gather(1, order), \
                top_scores.gather(1, order)
        else:
            a_parent, a_token, a_scores = parent_BW, token_BW, top_scores
        self.scores_BK.copy_(a_scores)
        self.parent_N.copy_((self.base_B1 + a_parent).view(-1))
        _at(t, self.parent_TN, self.parent_N)
        _at(t, self.hist_TN, a_token.view(-1))
        self.tok_N.copy_(a_token.view(-1))

    def _select_fused(self, top_lp_NW: torch.Tensor, top_tok_NW: torch.Tensor, t: Step, finish: bool) -> None:
        """The rest of :meth:`step` (and :meth:`_finish`) as one kernel launch, one program per sentence."""
        k, w = self.k, self.width
        on_device = not isinstance(t, int)
        kernels._beam_select_kernel[(self.batch,)](
            top_lp_NW, top_tok_NW, self.scores_BK, self.parent_N, self.tok_N, self.hist_TN, self.parent_TN,
            self.limit_B, self.done_B, self.fin_scores_BK, self.fin_step_BK, self.fin_row_BK, self.fin_tok_BK,
            self.fin_count_B, self.lp_T, t if on_device else self.lp_T, 0 if on_device else t,
            # a static step's penalty as the torch path divides by it (a Python float)
            1.0 if on_device else length_penalty(t + 1, self.alpha), self.batch * k,
            K=k, W=w, X_PAD=kernels.triton.next_power_of_2(k * w), A_PAD=kernels.triton.next_power_of_2(k + w),
            EOS_ID=EOS, USE_EOS=self.eos, FINISH=finish, T_ON_DEVICE=on_device, num_warps=1)

    def _finish(self, top_scores, parent_BW, token_BW, t: Step) -> None:
        """Move this step's finishing candidates into each sentence's k best finished hypotheses."""
        k = self.k
        last_B = (t + 1) >= self.limit_B
        first_k = self.rank_1W < k
        finish = (last_B[:, None] & first_k)
        if self.eos:
            finish = finish | ((token_BW == EOS) & first_k)
        finish &= ~self.done_B[:, None]
        lp = length_penalty(t + 1, self.alpha) if isinstance(t, int) else self.lp_T[t]
        new_scores = torch.where(finish, top_scores / lp, torch.full_like(top_scores, float("-inf")))
        all_scores = torch.cat([self.fin_scores_BK, new_scores], 1)
        keep = all_scores.topk(k, dim=1).indices
        step_BW = torch.zeros_like(token_BW) + t
        for field, new in ((self.fin_step_BK, step_BW), (self.fin_row_BK, self.base_B1 + parent_BW),
                           (self.fin_tok_BK, token_BW)):
            field.copy_(torch.cat([field, new], 1).gather(1, keep))
        self.fin_scores_BK.copy_(all_scores.gather(1, keep))
        self.fin_count_B += finish.sum(1)
        self.done_B |= (self.fin_count_B >= k) | last_B

    def take(self, src: "Beam", sel_B: torch.Tensor, sel_N: torch.Tensor, shift_B: torch.Tensor) -> None:
        """Carry on with sentences ``sel_B`` (hypothesis rows ``sel_N``) of ``src`` (a batch being compacted) as
        this search's first sentences: rows inside the history, the parents and the finished hypotheses are
        renumbered by ``shift_B`` (old row - new row, per sentence); the spare sentences are done."""
        m, mk = len(sel_B), len(sel_N)
        shift_N = shift_B.repeat_interleave(self.k)
        self.tok_N.fill_(PAD)
        self.tok_N[:mk] = src.tok_N.index_select(0, sel_N)
        self.reset(self.tok_N)                      # spare sentences: no hypotheses, done below
        self.limit_B.fill_(1)
        self.limit_B[:m] = src.limit_B.index_select(0, sel_B)
        self.scores_BK[:m] = src.scores_BK.index_select(0, sel_B)
        self.hist_TN[:, :mk] = src.hist_TN.index_select(1, sel_N)
        self.parent_TN[:, :mk] = src.parent_TN.index_select(1, sel_N) - shift_N
        self.parent_N[:mk] = src.parent_N.index_select(0, sel_N) - shift_N
        for name in ("fin_scores_BK", "fin_step_BK", "fin_tok_BK", "fin_count_B", "done_B"):
            getattr(self, name)[:m] = getattr(src, name).index_select(0, sel_B)
        self.fin_row_BK[:m] = src.fin_row_BK.index_select(0, sel_B) - shift_B[:, None]
        self.done_B[m:] = True

    def results(self, rows: Optional[Sequence[int]] = None) -> list:
        """Per sentence (those of ``rows``, default all): the best finished hypothesis' ids without its EOS."""
        fin = [self.fin_scores_BK, self.fin_step_BK, self.fin_row_BK, self.fin_tok_BK]
        if rows is not None:
            sel = _index(rows, self.fin_scores_BK.device)
            fin = [x[sel] for x in fin]
        scores, steps, parents, toks = fin
        best = scores.argmax(1, keepdim=True)
        step = steps.gather(1, best).view(-1).tolist()
        row = parents.gather(1, best).view(-1).tolist()
        last = toks.gather(1, best).view(-1).tolist()
        hist, parent = self.hist_TN.cpu().numpy(), self.parent_TN.cpu().numpy()
        # every sentence's hypothesis followed back through the ancestor table at once, one step a pass:
        # ids[b, s_b] is its last token; ids[b, u] (u < s_b) the token of its ancestor row at step u
        step_B, row_B = np.asarray(step, dtype=np.int64), np.asarray(row, dtype=np.int64)
        n = len(step_B)
        ids_BT = np.zeros((n, int(step_B.max()) + 1 if n else 1), dtype=hist.dtype)
        ids_BT[np.arange(n), step_B] = last
        for u in range(ids_BT.shape[1] - 2, -1, -1):
            act = np.flatnonzero(step_B > u)
            r = row_B[act]
            ids_BT[act, u] = hist[u, r]
            row_B[act] = parent[u, r]
        out = []
        for b in range(n):
            ids = ids_BT[b, : step_B[b] + 1].tolist()
            if self.eos and ids[-1] == EOS:
                ids.pop()
            out.append(ids)
        return out

    def best_scores(self, n: Optional[int] = None) -> torch.Tensor:
        return self.fin_scores_BK[:n].max(1).values
