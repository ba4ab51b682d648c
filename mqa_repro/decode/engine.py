"""The decoding engine: translation (encoder-decoder) and continuation (decoder-only) of real input, and the
fixed-length protocol of the paper's Table 2, all through one decoder step (:mod:`.step`), one cache
(:mod:`.cache`) and one search (:mod:`.search`).

Real input (:meth:`Engine.translate`, :meth:`Engine.generate`):

* sentences are sorted by length and cut into batches of at most ``batch_tokens`` padded source (prompt)
  tokens; each batch is decoded with per-row lengths (padding masked in the encoder, never read by
  encoder-decoder attention), EOS per row, and a per-sentence limit min(cap, a * source length + b, positions
  left) (the spec's ``evaluation`` section); results come back in input order;
* a batch stops once every row is done, checked every ``CHECK_EVERY`` steps (one host synchronisation);
  at such a check a batch of ``COMPACT_MIN_ROWS`` rows or more whose unfinished sentences fit in half its
  rows carries on with only those (moved to the front of its cache in place and decoded by a smaller
  workspace over those rows), so finished rows stop costing a step; on a GPU only where that pays
  (:func:`compaction_pays`: a small model's step costs the same at any row count, and a new workspace
  costs a graph capture);
* on a GPU one step (decoder + search) is a CUDA graph, captured once per shape: rows, source length and
  decode length are rounded up to a few buckets (:func:`bucket`), so few shapes are captured; padding rows
  are empty sentences that finish at once;
* decoder-only prompts of different lengths: prefill (every prompt position through the same step, rows
  that are through re-writing their last position) then decode; row r continues at its own position.

Fixed length (:meth:`Engine.fixed_run`, decode-bench's Table 2): :class:`~.fixed.FixedRun`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..errors import UserError
from ..model import BOS, EOS, PAD, Transformer
from .cache import DecodeCache
from .fixed import FixedRun
from .kernels import triton
from .search import Beam, Greedy, max_lengths
from .step import DecoderStep
from .warmup import start_warm_up, wait_warm_up

CHECK_EVERY = 8          # steps between "is every row done?" checks (each one host synchronisation)
COMPACT_MIN_ROWS = 64    # a batch of at least this many rows moves its unfinished sentences into a workspace
                         # of half the rows or fewer once at least half of them are done (see _compact)
MAX_WORKSPACES = 64      # captured shapes kept per engine (each holds its cache and graph), least recently
WORKSPACE_MEMORY = 0.5   # used first out; and fewer while the device holds more than this share of its memory


def bucket(x: int, minimum: int = 8) -> int:
    """Round a row count or a length up to a power of two (at least ``minimum``), or to a multiple of 64 above
    256: few shapes to capture, at most 2x (1.25x above 256) padding."""
    if x <= 256:
        return max(minimum, 1 << max(0, math.ceil(math.log2(max(1, x)))))
    return -(-x // 64) * 64


def _check_beam(beam, vocab_limit: int) -> None:
    """Raises UserError for a beam size that is not a positive integer, or one the vocabulary cannot feed:
    each step keeps the best 2 x beam continuations, among the ``vocab_limit`` - 2 ids that can be emitted
    (PAD and BOS never are)."""
    if not isinstance(beam, int) or beam < 1:
        raise UserError(f"the beam size must be a positive integer, got {beam!r}")
    if 2 * beam > vocab_limit - 2:
        raise UserError(f"beam {beam} is too large for this model: beam search keeps the best 2 x beam "
                        f"continuations of each hypothesis and the model can emit {vocab_limit - 2} ids, so the "
                        f"beam can be at most {(vocab_limit - 2) // 2}")


@dataclass
class _Work:
    """Everything one batch shape's step reads and writes (kept alive for its CUDA graph)."""

    cache: DecodeCache
    search: object                    # Greedy or Beam
    offset_N: torch.Tensor            # position of each row's first decoded step
    t_1: torch.Tensor                 # the step, [1] int64 on the device
    pos_max: int                      # the last position the cache and the position table hold
    graph: Optional[object] = None    # torch.cuda.CUDAGraph of one step
    children: dict = field(default_factory=dict)   # rows -> the _Work over this one's first rows (_compact)


def compaction_pays(steps_left: int, step_s: Optional[float], capture_s: Optional[float]) -> bool:
    """Whether moving a batch's unfinished sentences (at most half its rows) into a NEW workspace pays on a GPU:
    at most half of each remaining step's time can be saved (``steps_left`` steps of ``step_s`` seconds,
    measured between the last two checks), against the new workspace's CUDA graph capture (``capture_s``: the
    engine's quickest capture so far, counted twice for the eager warm-up step before it, which launches the
    same kernels; kernel compilation, paid once per shape family, is left out). Unknown times: no. A model
    whose step is bound by the host (a few hundred µs of graph replay at any row count) never pays; the
    paper-size model at hundreds of sentences does."""
    if step_s is None or capture_s is None:
        return False
    return steps_left * step_s / 2 > capture_s


class Engine:
    """Greedy and beam search with a model; see the module docstring."""

    def __init__(self, model: Transformer, *, vocab_limit: Optional[int] = None, use_triton: Optional[bool] = None,
                 graphs: Optional[bool] = None, tune: bool = False, split: Optional[int] = None):
        """``model``: a Transformer in eval mode on its device and dtype. ``vocab_limit``: ids >= it are never
        emitted (default ``model.spec.vocab_size``; pass the tokenizer's piece count). ``use_triton``: the
        Triton kernels where they can run (None: yes). ``graphs``: CUDA graphs (None: on a GPU). ``tune``: time
        kernel launches and product variants on the device at first use. ``split``: force how residual
        products are computed (see :data:`~mqa_repro.decode.kernels.SPLIT_CANDIDATES`).
        Raises ValueError for a vocabulary limit outside the model's vocabulary."""
        self.model = model
        m = self.spec = model.spec
        self.device = model.embed.weight.device
        self.step = DecoderStep(model, use_triton=use_triton is not False and triton is not None, split=split,
                                tune=tune)
        self.graphs = (self.device.type == "cuda") if graphs is None else bool(graphs and self.device.type == "cuda")
        self.vocab_limit = m.vocab_size if vocab_limit is None else int(vocab_limit)
        if not 4 < self.vocab_limit <= m.padded_vocab:
            raise ValueError(f"vocab_limit {self.vocab_limit} is outside the model's vocabulary (5 .. {m.padded_vocab})")
        self.encode_seconds = 0.0     # accumulated when ``timing`` is set (synchronising at batch boundaries)
        self.decode_seconds = 0.0
        self.timing = False
        self.steps_run = 0            # decoder steps run (all batches), for the benchmark
        self.compactions = 0          # batches carried on in a smaller workspace (:meth:`_compact`)
        self.captures = 0             # CUDA graphs captured, and the wall seconds they took with their
        self.capture_seconds = 0.0    # warm-up steps (first-use costs: scripts/evaluate_whole_speed.py)
        self.cold_captures = 0           # of them, captured without a warm-up step (Engine._capture), and
        self.cold_capture_failures = 0   # those tried so that failed and were made again after one
        self._warm_kinds: set = set()   # kinds of step captured after a warm-up step (Engine._capture)
        self._work: dict = {}
        self._capture_s: Optional[float] = None   # the quickest CUDA graph capture so far (compaction_pays)
        if self.device.type == "cuda" and use_triton is not False:
            start_warm_up()    # hidden behind whatever the caller does before the first decode

    # -- public API ------------------------------------------------------------------------------
    @torch.no_grad()
    def translate(self, sources: Sequence, *, beam: int = 1, alpha: float = 0.6, max_len_a: float = 1.5,
                  max_len_b: float = 10, max_len_cap: int = 256, batch_tokens: int = 8192,
                  forced_lengths: Optional[Sequence[int]] = None,
                  progress: Optional[Callable[[int], None]] = None) -> list:
        """Target ids (without EOS) of every source, in input order.

        ``sources``: 1-D int sequences, ids without BOS/EOS (the encoder sees ids + EOS). The limit of sentence i
        is min(max_len_cap, max_positions, floor(max_len_a * (len_i + 1) + max_len_b)), at least 1.
        ``forced_lengths``: instead, sentence i decodes exactly forced_lengths[i] tokens, EOS ignored (the
        benchmark's real length distribution with random weights). ``progress(n)`` is called after each batch
        with its number of sentences. Raises UserError for a decoder-only model, a source longer than the
        model's positions, or a bad forced length."""
        m = self.spec
        if not m.is_seq2seq:
            raise UserError("translate needs an encoder-decoder model; use generate for a decoder-only model")
        srcs = [np.asarray(s, dtype=np.int64).reshape(-1) for s in sources]
        lens = np.array([len(s) + 1 for s in srcs], dtype=np.int64)
        for i, n in enumerate(lens):
            if n > m.max_positions:
                raise UserError(f"source sentence {i} has {n} tokens with its EOS, more than the model's "
                                f"max_positions ({m.max_positions}); truncate it first")
        cap = min(max_len_cap, m.max_positions)
        if forced_lengths is not None:
            limits = np.asarray(forced_lengths, dtype=np.int64)
            if len(limits) != len(srcs) or (len(limits) and (limits.min() < 1 or limits.max() > m.max_positions)):
                raise UserError(f"forced_lengths needs one length in 1 .. {m.max_positions} per source")
        else:
            limits = max_lengths(torch.from_numpy(lens), max_len_a, max_len_b, cap).numpy()
        return self._decode_all(srcs, lens, limits, beam, alpha, batch_tokens, eos=forced_lengths is None,
                                seq2seq=True, progress=progress)

    @torch.no_grad()
    def generate(self, prompts: Sequence, *, beam: int = 1, alpha: float = 0.6, max_new_tokens: int = 64,
                 batch_tokens: int = 8192, forced_lengths: Optional[Sequence[int]] = None,
                 progress: Optional[Callable[[int], None]] = None) -> list:
        """Continuations (ids without the prompt and without EOS) of every prompt, in input order.

        Decoder-only models: the model reads BOS + prompt and continues for at most ``max_new_tokens`` tokens
        (fewer where the model's positions run out). ``forced_lengths``: prompt i is continued by exactly
        forced_lengths[i] tokens, EOS ignored. Raises UserError for an encoder-decoder model, a prompt that
        leaves no position to generate into, or a forced length beyond the positions left."""
        m = self.spec
        if m.is_seq2seq:
            raise UserError("generate needs a decoder-only model; use translate for an encoder-decoder model")
        ps = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
        lens = np.array([len(p) + 1 for p in ps], dtype=np.int64)     # BOS + prompt
        for i, n in enumerate(lens):
            if n > m.max_positions:
                raise UserError(f"prompt {i} has {n} tokens with BOS, which fills the model's max_positions "
                                f"({m.max_positions}) and leaves nothing to generate; shorten it")
        room = m.max_positions - lens + 1
        if forced_lengths is not None:
            limits = np.asarray(forced_lengths, dtype=np.int64)
            if len(limits) != len(ps) or (len(limits) and (limits.min() < 1 or (limits > room).any())):
                raise UserError("forced_lengths needs one length per prompt, at least 1 and within the model's "
                                "positions left after the prompt")
        else:
            if max_new_tokens < 1:
                raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
            limits = np.minimum(max_new_tokens, room).astype(np.int64)
        return self._decode_all(ps, lens, limits, beam, alpha, batch_tokens, eos=forced_lengths is None,
                                seq2seq=False, progress=progress)

    def _decode_all(self, seqs: list, lens, limits, beam: int, alpha: float, batch_tokens: int, *, eos: bool,
                    seq2seq: bool, progress: Optional[Callable[[int], None]]) -> list:
        """Decode every sequence of ``seqs`` (lengths ``lens`` [N], step limits ``limits`` [N]) in batches of at
        most ``batch_tokens`` tokens; the results in input order. ``progress(n)`` after each batch."""
        self.check_beam(beam)
        wait_warm_up()
        out = [None] * len(seqs)
        for idx in self._batches(lens, batch_tokens):
            ids = self._decode_batch([seqs[i] for i in idx], lens[idx], limits[idx], beam, alpha,
                                     eos=eos, seq2seq=seq2seq)
            for i, x in zip(idx, ids):
                out[int(i)] = x
            if progress is not None:
                progress(len(idx))
        return out

    def check_beam(self, beam) -> None:
        """Raises UserError for a beam size this engine cannot search with (not a positive integer, or more
        than half the ids the model can emit); callers check before long work."""
        _check_beam(beam, self.vocab_limit)

    def fixed_run(self, batch: int, beam: int, steps: int, src_BS: Optional[torch.Tensor] = None) -> "FixedRun":
        """The paper's timing protocol: ``steps`` tokens for every row, EOS ignored, full-length sources
        ``src_BS`` [batch, S] (encoder-decoder) or none (decoder-only)."""
        return FixedRun(self, batch, beam, steps, src_BS)

    def describe(self) -> dict:
        """How the step is computed (recorded beside every decode-bench time)."""
        return {"cuda_graphs": self.graphs, **self.step.describe()}

    # -- batching ----------------------------------------------------------------------------------
    @staticmethod
    def _batches(lens: np.ndarray, batch_tokens: int) -> list:
        """Index arrays of sentences sorted by length, each batch at most ``batch_tokens`` padded tokens
        (at least one sentence)."""
        order = np.argsort(lens, kind="stable")
        out, cur, width = [], [], 0
        for i in order:
            w = max(width, int(lens[i]))
            if cur and (len(cur) + 1) * w > batch_tokens:
                out.append(np.array(cur))
                cur, w = [], int(lens[i])
            cur.append(int(i))
            width = w
        if cur:
            out.append(np.array(cur))
        return out

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _decode_batch(self, seqs: list, lens: np.ndarray, limits: np.ndarray, beam: int, alpha: float, eos: bool,
                      seq2seq: bool) -> list:
        """Decode one batch (sources or prompts ``seqs`` of ``lens`` tokens with EOS or BOS); ids per row."""
        dev, b = self.device, len(seqs)
        g = self.graphs
        rows = bucket(b, 1) if g else b
        width = bucket(int(lens.max())) if g else int(lens.max())
        steps = int(limits.max())
        steps = bucket(steps) if g else steps
        lens_b = np.ones(rows, dtype=np.int64)
        lens_b[:b] = lens
        lim_b = np.ones(rows, dtype=np.int64)      # padding rows: one token, then done
        lim_b[:b] = limits
        ids = np.full((rows, width), PAD, dtype=np.int64)
        if seq2seq:
            ids[:, 0] = EOS
            for r, s in enumerate(seqs):
                ids[r, : len(s)] = s
                ids[r, len(s)] = EOS
        else:
            ids[:, 0] = BOS
            for r, s in enumerate(seqs):
                ids[r, 1: 1 + len(s)] = s
        ids_t = torch.from_numpy(ids).to(dev)
        lens_t = torch.from_numpy(lens_b).to(dev)
        if self.timing:
            self._sync()
        t0 = time.perf_counter()
        offset = torch.zeros(rows, dtype=torch.long, device=dev) if seq2seq else lens_t - 1
        length = steps if seq2seq else int(lens_b.max()) - 1 + steps
        key = (rows, beam, width if seq2seq else 0, length, steps, eos, alpha)
        w = self._workspace(key, rows, beam, steps, length, width if seq2seq else 0, alpha, eos)
        if seq2seq:
            cross = self.step.encode(ids_t, lens_t)
            if g:   # the graph reads the workspace's buffers
                for buf, x in zip(w.cache.cross_BSGC, cross):
                    buf.copy_(x)
                w.cache.src_len_B.copy_(lens_t)
            else:
                w.cache.set_cross(cross, lens_t)
            first = torch.full((rows,), BOS, dtype=torch.long, device=dev)
        else:
            first = ids_t.gather(1, (lens_t - 1)[:, None]).view(-1)
        if self.timing:
            self._sync()
            self.encode_seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
        k = beam
        lim_t = torch.from_numpy(lim_b).to(dev)
        w.offset_N.copy_(offset.repeat_interleave(k))
        w.t_1.zero_()
        if isinstance(w.search, Beam):
            w.search.limit_B.copy_(lim_t)
        else:
            w.search.limit_N.copy_(lim_t)
        w.search.reset(first.repeat_interleave(k))
        if w.cache.anc is not None:
            w.cache.anc[0].copy_(w.cache.arange_N.expand_as(w.cache.anc[0]))
        if g and w.graph is None:   # before the prefill: the warm-up writes K/V the prefill then rewrites
            w.graph = self._capture(w)
        if not seq2seq:
            self._prefill(w, ids_t.repeat_interleave(k, 0), lens_t.repeat_interleave(k))
        done_at = int(limits.max())
        t, n = 0, b                    # n sentences in the workspace, slot i holding sentence slot_of[i]
        slot_of = np.arange(b)
        out = [None] * b
        checked = None                 # when the last check returned (the step time between checks)
        while t < done_at:
            chunk = min(CHECK_EVERY, done_at - t)
            for _ in range(chunk):
                if w.graph is not None:
                    w.graph.replay()
                else:
                    self._dynamic_step(w)
                t += 1
            done = w.search.done[:n].cpu().numpy()     # one host synchronisation
            now = time.perf_counter()
            step_s, checked = (None if checked is None else (now - checked) / chunk), now
            if done.all():
                break
            live = np.flatnonzero(~done)
            rows_now = w.search.done.shape[0]
            if (t < done_at and rows_now >= COMPACT_MIN_ROWS and len(live) <= rows_now // 2
                    and self._compaction_pays(w, len(live), done_at - t, step_s)):
                finished = np.flatnonzero(done)
                for i, ids in zip(finished, w.search.results(finished)):
                    out[slot_of[i]] = ids
                w = self._compact(w, live, beam, steps, alpha, eos)
                slot_of, n = slot_of[live], len(live)
                checked = time.perf_counter()
        self.steps_run += t
        for i, ids in zip(range(n), w.search.results(range(n))):
            out[slot_of[i]] = ids
        if self.timing:
            self._sync()
            self.decode_seconds += time.perf_counter() - t0
        return out

    def _compaction_pays(self, w: _Work, live: int, steps_left: int, step_s: Optional[float]) -> bool:
        """Compact eagerly (no capture to pay) or into a workspace this batch shape already holds; otherwise
        when :func:`compaction_pays`."""
        if not self.graphs or bucket(live, 1) in w.children:
            return True
        return compaction_pays(steps_left, step_s, self._capture_s)

    def _compact(self, w: _Work, live: np.ndarray, beam: int, steps: int, alpha: float, eos: bool) -> _Work:
        """Carry on with sentence slots ``live`` of ``w`` (a batch at least half done) in a workspace of
        bucket(len(live)) sentences over the FIRST rows of ``w``'s memory: the live sentences' self-attention
        K/V, ancestor table and encoder-decoder K/V are moved to the front in place (the new cache is views of
        them, so no K/V memory is added), their positions and search state copied into the new search (row
        indices inside the ancestor table, the parents and the finished hypotheses renumbered); spare rows are
        done. On a GPU the smaller workspace and its graph are kept with ``w`` for the next batch."""
        k, m, dev = beam, len(live), self.device
        self.compactions += 1
        rows = bucket(m, 1) if self.graphs else m
        sel_B = torch.from_numpy(live).to(dev)
        sel_N = (sel_B[:, None] * k + torch.arange(k, device=dev)).view(-1)
        shift_B = sel_B * k - torch.arange(m, device=dev) * k       # old row - new row, per sentence
        w.cache.move_to_front(sel_B, sel_N, shift_B, rows)
        w2 = w.children.get(rows)
        if w2 is None:
            w2 = self._new_work(DecodeCache.first_rows(w.cache, rows), rows, beam, steps, w.pos_max, alpha, eos)
            if self.graphs:
                w.children[rows] = w2
        w2.offset_N.zero_()
        w2.offset_N[:m * k] = w.offset_N.index_select(0, sel_N)
        w2.t_1.copy_(w.t_1)
        w2.search.take(w.search, sel_B, sel_N, shift_B)
        if self.graphs and w2.graph is None:
            w2.graph = self._capture(w2)
        return w2

    def _workspace(self, key, rows, beam, steps, length, src_width, alpha, eos) -> _Work:
        if key in self._work:
            self._work[key] = self._work.pop(key)     # most recently used last
            return self._work[key]
        if self.graphs:
            self._evict(rows * beam * length)
        m, dev, dt = self.spec, self.device, self.model.embed.weight.dtype
        cache = DecodeCache(len(self.model.decoder), rows, beam, m.n_kv_heads, m.d_k, m.d_v, length, m.window, dev,
                            dt)
        if src_width:
            cache.set_cross([torch.zeros(rows, src_width, m.n_kv_heads, m.d_k + m.d_v, device=dev, dtype=dt)
                             for _ in self.model.decoder], torch.ones(rows, dtype=torch.int32, device=dev))
        w = self._new_work(cache, rows, beam, steps, min(length, m.max_positions) - 1, alpha, eos)
        if self.graphs:
            self._work[key] = w
        return w

    def _new_work(self, cache: DecodeCache, rows: int, beam: int, steps: int, pos_max: int, alpha: float,
                  eos: bool) -> _Work:
        """A workspace on ``cache`` with a fresh search of ``rows`` sentences (limits to be filled in)."""
        dev = self.device
        lim = torch.ones(rows, dtype=torch.long, device=dev)
        if beam == 1:
            search = Greedy(rows, steps, dev, limit_N=lim, eos=eos, vocab_limit=self.vocab_limit,
                            tune=self.step.fused and self.step.tune)
        else:
            search = Beam(rows, beam, steps, dev, alpha=alpha, limit_B=lim, eos=eos, vocab_limit=self.vocab_limit,
                          use_triton=self.step.use_triton)
        return _Work(cache, search, torch.zeros(rows * beam, dtype=torch.long, device=dev),
                     torch.zeros(1, dtype=torch.long, device=dev), pos_max)

    def _evict(self, positions: int) -> None:
        """Drop least recently used workspaces (graph and cache) until fewer than MAX_WORKSPACES are kept and the
        device holds at most WORKSPACE_MEMORY of its memory with room for a cache of ``positions`` more
        (rows x beam x length) positions. Shapes recur batch after batch (a sorted test set walks through a
        dozen at 32 sentences per batch), so a capture is made once per shape, not once per batch."""
        m = self.spec
        need = positions * len(self.model.decoder) * m.kv_values_per_position * self.model.embed.weight.element_size()
        budget = WORKSPACE_MEMORY * torch.cuda.get_device_properties(self.device).total_memory
        while self._work and (len(self._work) >= MAX_WORKSPACES or
                              torch.cuda.memory_allocated(self.device) + need > budget):
            self._work.pop(next(iter(self._work)))
            torch.cuda.empty_cache()

    def _dynamic_step(self, w: _Work) -> None:
        """One step of every row at its own position offset + t (device tensors only: graph-capturable)."""
        pos_N = torch.clamp(w.offset_N + w.t_1, max=w.pos_max)   # rows done early stop advancing at the end
        s = w.search
        if w.cache.anc is not None:
            w.cache.follow(s.parent_N)
            w.cache.mark_own(pos_N)
        s.step(self.step.logits(w.cache, s.tok_N, pos_N=pos_N), w.t_1)
        w.t_1 += 1

    def _prefill(self, w: _Work, ids_NP: torch.Tensor, lens_N: torch.Tensor) -> None:
        """Decoder-only: K/V of positions 0 .. len - 2 of every prompt (BOS + prompt; the last input token is the
        first decoded step's). Row n at prefill step j writes position min(j, len_n - 2): rows through their
        prompt re-write their last prefill position with the same token, which changes nothing."""
        last = torch.clamp(lens_N - 2, min=0)
        for j in range(int(lens_N.max()) - 1):
            pos_N = torch.clamp(last, max=j)
            if w.cache.anc is not None:
                w.cache.mark_own(pos_N)
            self.step.hidden(w.cache, ids_NP.gather(1, pos_N[:, None]).view(-1), pos_N=pos_N)

    def _capture(self, w: _Work):
        """One CUDA graph of :meth:`_dynamic_step` on ``w``'s tensors. The first capture of a kind of step
        (search, ancestor table, ring buffer, encoder-decoder attention) follows a warm-up step (kernel
        compilation and loading, tuning) run on a copy of the state, which is then restored; later ones of the
        kind are captured without it (their kernels are loaded; a capture that fails, e.g. a kernel
        specialisation not loaded yet, is made again after a warm-up step), except with tuning on, whose
        choices are made in the warm-up step. The capture's seconds (twice them where a warm-up step preceded
        it) count in ``_capture_s``."""
        t_enter = time.perf_counter()
        kind = (type(w.search), w.cache.anc is not None, w.cache.window, w.cache.cross_BSGC is not None)
        got = None
        if kind in self._warm_kinds and not self.step.tune:
            try:
                got = self._record(w, warm_up=False)
                self.cold_captures += 1
            except RuntimeError:
                self.cold_capture_failures += 1
        if got is None:
            got = self._capture_warm(w)
            self._warm_kinds.add(kind)
        graph, took = got
        torch.cuda.synchronize(self.device)
        self._capture_s = took if self._capture_s is None else min(self._capture_s, took)
        self.captures += 1
        self.capture_seconds += time.perf_counter() - t_enter
        return graph

    def _record(self, w: _Work, warm_up: bool):
        """(graph, seconds of the capture) of one :meth:`_dynamic_step` on a side stream, after one run of it
        there where ``warm_up``. Raises RuntimeError where the capture fails."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            if warm_up:
                self._dynamic_step(w)
            # CUDAGraph's own capture calls rather than the torch.cuda.graph context, which empties the
            # allocator's cache before every capture (the next shape's warm-up then allocates afresh)
            graph = torch.cuda.CUDAGraph()
            t_start = time.perf_counter()
            graph.capture_begin()
            try:
                self._dynamic_step(w)
            finally:
                graph.capture_end()
            took = time.perf_counter() - t_start
        torch.cuda.current_stream().wait_stream(side)
        return graph, took

    def _capture_warm(self, w: _Work):
        """(graph, twice the capture's seconds) of a capture after a warm-up step on a copy of the state."""
        saved = {k: v.clone() for k, v in vars(w.search).items() if torch.is_tensor(v)}
        anc = [a.clone() for a in w.cache.anc] if w.cache.anc is not None else None
        t0 = w.t_1.clone()
        # mid-decode (a compacted batch): the warm-up step writes position t, which in a ring buffer (local
        # attention) overwrites a position the next real step still reads; elsewhere it is rewritten before it
        # is read
        slabs = ([x.clone() for x in w.cache.self_TNGC] if w.cache.window is not None and bool(t0 > 0) else None)
        graph, took = self._record(w, warm_up=True)
        for k, v in saved.items():
            getattr(w.search, k).copy_(v)
        if anc is not None:
            for a, b in zip(w.cache.anc, anc):
                a.copy_(b)
        if slabs is not None:
            for a, b in zip(w.cache.self_TNGC, slabs):
                a.copy_(b)
        w.t_1.copy_(t0)
        return graph, 2 * took
