"""The K/V cache of decoding: the one place keys and values of past positions live.

* Self-attention: per decoder layer a time-major slab ``kv_TNGC`` [slots, N, G, C] (C = d_k + d_v: K then V
  of one head side by side), so the live prefix of every row is contiguous and a step writes one [N, G, C]
  slice. ``slots`` is the decode length, or ``window`` for local attention: a ring buffer where position p
  lives in slot p % window (so the slots always hold the last ``window`` positions).
* Beams by ancestor table: under beam search the cache never moves. ``anc_SN[s, n]`` (int32) is the physical
  row holding slot s of hypothesis n; reordering the hypotheses rewrites this table (ints only), and the
  attention kernel follows it.
* Encoder-decoder K/V: per layer ``cross_BSGC`` [B, S, G, C], computed once per SENTENCE and shared by its
  beams, with each sentence's real source length ``src_len_B`` (padding is never read).

Rows N = B * beam, hypothesis n = b * beam + j. The decode loop owns the position: nothing here advances.
Used by :class:`~mqa_repro.decode.engine.Engine` and by the eager reference ``Transformer.decode_step``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..spec import cache_slots


class DecodeCache:
    """Self-attention slabs of every decoder layer, the ancestor table, and the encoder-decoder K/V."""

    def __init__(self, layers: int, batch: int, beam: int, kv_heads: int, d_k: int, d_v: int, length: int,
                 window: Optional[int], device, dtype, ancestors: Optional[bool] = None):
        """``length``: positions to decode (the slab's slots, or ``window`` of them). ``ancestors``: keep the
        table (default: under beam search)."""
        self.batch, self.beam, self.d_k, self.d_v, self.window = batch, beam, d_k, d_v, window
        self.rows = n = batch * beam
        self.length = length
        s = cache_slots(window, length)
        self.self_TNGC = [torch.zeros(s, n, kv_heads, d_k + d_v, device=device, dtype=dtype) for _ in range(layers)]
        self.arange_N = torch.arange(n, device=device, dtype=torch.int32)
        # two tables: a step reads one and writes the other (no aliasing in index_select), see follow()
        use_anc = beam > 1 if ancestors is None else ancestors
        self.anc = ([self.arange_N.expand(s, n).contiguous() for _ in range(2)] if use_anc else None)
        self.cross_BSGC: Optional[list] = None
        self.src_len_B: Optional[torch.Tensor] = None

    @classmethod
    def first_rows(cls, parent: "DecodeCache", batch: int) -> "DecodeCache":
        """A cache over the first ``batch`` sentences of ``parent``: views of its slabs, ancestor tables and
        encoder-decoder K/V (no new K/V memory; strided in the row dimension, which the attention reads by
        stride). Used to carry on with a batch's unfinished sentences after moving them to the front."""
        c = cls.__new__(cls)
        c.batch, c.beam, c.d_k, c.d_v, c.window = batch, parent.beam, parent.d_k, parent.d_v, parent.window
        c.rows = n = batch * parent.beam
        c.length = parent.length
        c.self_TNGC = [x[:, :n] for x in parent.self_TNGC]
        c.arange_N = parent.arange_N[:n]
        c.anc = [a[:, :n] for a in parent.anc] if parent.anc is not None else None
        c.cross_BSGC = [x[:batch] for x in parent.cross_BSGC] if parent.cross_BSGC is not None else None
        c.src_len_B = parent.src_len_B[:batch] if parent.src_len_B is not None else None
        return c

    def move_to_front(self, sel_B: torch.Tensor, sel_N: torch.Tensor, shift_B: torch.Tensor, rows: int) -> None:
        """Move sentences ``sel_B`` (their rows ``sel_N``, beams adjacent) to the front of this cache in place,
        for :meth:`first_rows` of ``rows`` sentences to carry on with: their self-attention K/V, ancestor table
        (entries renumbered by ``shift_B``, old row - new row per sentence) and encoder-decoder K/V; the spare
        rows' ancestors are their own rows and the spare sentences' sources one token long."""
        m, mk = len(sel_B), len(sel_N)
        for x in self.self_TNGC:                # index_select copies first: moving rows forward in place is safe
            x[:, :mk] = x.index_select(1, sel_N)
        if self.anc is not None:
            shift_N = shift_B.repeat_interleave(self.beam)
            for a in self.anc:
                a[:, :mk] = a.index_select(1, sel_N) - shift_N.to(a.dtype)
                a[:, mk:rows * self.beam] = self.arange_N[mk:rows * self.beam]
        if self.cross_BSGC is not None:
            for x in self.cross_BSGC:
                x[:m] = x.index_select(0, sel_B)
            self.src_len_B[:m] = self.src_len_B.index_select(0, sel_B)
            self.src_len_B[m:rows] = 1

    @property
    def slots(self) -> int:
        return self.self_TNGC[0].shape[0]

    def set_cross(self, cross_BSGC: list, src_len_B: Optional[torch.Tensor]) -> None:
        """Encoder-decoder K/V per layer [B, S, G, C] and the real source lengths [B] (None: no padding)."""
        self.cross_BSGC = cross_BSGC
        self.src_len_B = None if src_len_B is None else src_len_B.to(torch.int32)

    # -- positions -> slots ------------------------------------------------------------------------
    def slot(self, pos):
        """Slot of position ``pos`` (a Python int, or an int64 tensor of per-row positions).
        Raises IndexError for an int position beyond a full (non-ring) cache."""
        if isinstance(pos, int):
            if self.window is None and pos >= self.slots:
                raise IndexError(f"decode position {pos} is beyond the cache of {self.slots} positions")
            return pos % self.slots
        return pos % self.slots

    def live(self, pos):
        """Slots holding positions <= ``pos``: min(pos + 1, slots) (int, or int32 tensor per row)."""
        if isinstance(pos, int):
            return min(pos + 1, self.slots)
        return torch.clamp(pos + 1, max=self.slots).to(torch.int32)

    # -- ancestors (beam search) -------------------------------------------------------------------
    def table(self, t: Optional[int] = None) -> Optional[torch.Tensor]:
        """The ancestor table [slots, N] to read at step ``t`` (static) or the one table (``t`` None)."""
        if self.anc is None:
            return None
        return self.anc[t % 2] if t is not None else self.anc[0]

    def follow(self, parent_N: torch.Tensor, t: Optional[int] = None) -> None:
        """Hypothesis n takes over the history of row ``parent_N[n]`` (ints only; the K/V stay put).

        Static step ``t``: called at the start of step t with step t-1's parents; only the t slots written so
        far are copied, from table (t-1) % 2 into table t % 2. ``t`` None: the one table in place (any step)."""
        if self.anc is None:   # a cache made without a table: until now every row held its own history
            n = self.rows
            self.anc = [self.arange_N.expand(self.slots, n).contiguous() for _ in range(2)]
        if t is None:
            self.anc[0].copy_(self.anc[0].index_select(1, parent_N))
            return
        history = min(t, self.slots)
        if history:
            torch.index_select(self.anc[(t - 1) % 2][:history], 1, parent_N, out=self.anc[t % 2][:history])

    def reorder(self, rows_N: torch.Tensor) -> None:
        """Beam search (eager): row i takes over the history of row rows_N[i]."""
        self.follow(rows_N)

    def mark_own(self, pos, t: Optional[int] = None) -> None:
        """Every hypothesis writes position ``pos`` into its own physical row (before attention reads it)."""
        if self.anc is None:
            return
        tab = self.table(t)
        slot = self.slot(pos)
        if isinstance(slot, int):
            tab[slot].copy_(self.arange_N)
        else:
            tab.index_put_((slot, self.arange_N.long()), self.arange_N)

    # -- the eager reference path ------------------------------------------------------------------
    def write(self, layer: int, kv_NGC: torch.Tensor, pos) -> None:
        """Store position ``pos``'s keys/values (int: every row; tensor: per-row positions)."""
        slot = self.slot(pos)
        if isinstance(slot, int):
            self.self_TNGC[layer][slot].copy_(kv_NGC)
        else:
            self.self_TNGC[layer].index_put_((slot, self.arange_N.long()), kv_NGC)

    def keys_values(self, layer: int, pos: int, t: Optional[int] = None) -> tuple:
        """The live keys [N, G, L, d_k] and values [N, G, L, d_v] of every hypothesis (through the ancestor
        table), L = live(pos); slot order, which attention does not depend on."""
        live = self.live(pos)
        kv = self.self_TNGC[layer][:live]                                  # [L, N, G, C]
        tab = self.table(t)
        if tab is not None:
            kv = kv[torch.arange(live, device=kv.device)[:, None], tab[:live].long()]
        kv = kv.permute(1, 2, 0, 3)
        return kv[..., : self.d_k], kv[..., self.d_k:]

    def cross_keys_values(self, layer: int) -> tuple:
        """Encoder-decoder keys [B, G, S, d_k], values [B, G, S, d_v] and the valid mask [B, 1, 1, S]."""
        kv = self.cross_BSGC[layer].permute(0, 2, 1, 3)
        s = kv.shape[2]
        if self.src_len_B is None:
            valid = torch.ones(kv.shape[0], 1, 1, s, dtype=torch.bool, device=kv.device)
        else:
            valid = (torch.arange(s, device=kv.device)[None] < self.src_len_B[:, None]).view(-1, 1, 1, s)
        return kv[..., : self.d_k], kv[..., self.d_k:], valid
