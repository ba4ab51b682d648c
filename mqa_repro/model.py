"""The Transformer of the paper, with ONE attention module for every row of its tables.

Shape legend (suffixes on tensor names, after Shazeer's own convention):

    B  batch (sentences)           N  rows being decoded = B * beam
    T  target / decoder positions  S  source / memory positions
    D  d_model                     F  d_ff
    H  query heads                 G  key/value heads (H = G: multi-head, G = 1: multi-query)
    Q  query heads per K/V head = H / G
    K  d_k                         V  d_v (or vocabulary, in logits_NV / logits_BTV)

Training runs whole sequences (``forward``); decoding is split into ``encode`` (once per source),
``start_decoding`` (allocates the cache of :mod:`mqa_repro.decode.cache`, computes encoder-decoder K/V once
per sentence) and ``decode_step`` (one token for every row): the eager reference path, against which the
decoding engine (:mod:`mqa_repro.decode`) is tested. Nothing advances hidden state as a side effect: the caller
owns the position. On the decode path keys and values are never repeated to the query head count: the
query heads of one group are batched against their shared K/V instead.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import relu_dropout
from .spec import ModelSpec

PAD, UNK, BOS, EOS = 0, 1, 2, 3   # special token ids; data.py trains SentencePiece with the same ids


# --------------------------------------------------------------------------------------------------
# Attention: every row of the tables
# --------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head (G = H), multi-query (G = 1) or grouped-query attention, optionally local.

    ``window`` (causal self-attention only): position i sees positions i-window+1 .. i. The module owns
    its decode cache (:meth:`new_cache`), a ring buffer of ``window`` slots when local; whole-sequence calls
    (``forward``) take the band in their mask, built by :func:`self_mask` with the same window.
    """

    def __init__(self, d_model, n_heads, n_kv_heads, d_k, d_v, window=None, dropout=0.0):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads})")
        self.h, self.g, self.d_k, self.d_v = n_heads, n_kv_heads, d_k, d_v
        self.window, self.dropout = window, dropout
        self.group_size = n_heads // n_kv_heads   # Q: query heads per K/V head
        self.q_proj = nn.Linear(d_model, n_heads * d_k, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * d_k, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * d_v, bias=False)
        self.o_proj = nn.Linear(n_heads * d_v, d_model, bias=False)
        self.scale = d_k ** -0.5

    # -- whole sequences (training, encoding, the uncached reference) ----------------------------
    def forward(self, x_BTD, mem_BSD=None, mask_B1TS=None):
        """Attend from x to mem (x itself when mem is None) under a boolean mask (True = may attend)."""
        b, t, _ = x_BTD.shape
        src = x_BTD if mem_BSD is None else mem_BSD
        s = src.shape[1]
        q_BHTK = self.q_proj(x_BTD).view(b, t, self.h, self.d_k).transpose(1, 2)
        k_BGSK = self.k_proj(src).view(b, s, self.g, self.d_k).transpose(1, 2)
        v_BGSV = self.v_proj(src).view(b, s, self.g, self.d_v).transpose(1, 2)
        out_BHTV = F.scaled_dot_product_attention(
            q_BHTK, k_BGSK, v_BGSV, attn_mask=mask_B1TS, scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.g != self.h)
        return self.o_proj(out_BHTV.transpose(1, 2).reshape(b, t, self.h * self.d_v))

    # -- incremental decoding (the eager reference path; the engine is mqa_repro.decode) ---------------
    def project_kv(self, mem_BSD):
        """Encoder-decoder keys and values of every source position as one slab [B, S, G, d_k + d_v]."""
        b, s, _ = mem_BSD.shape
        k = self.k_proj(mem_BSD).view(b, s, self.g, self.d_k)
        v = self.v_proj(mem_BSD).view(b, s, self.g, self.d_v)
        return torch.cat([k, v], -1).contiguous()

    def _attend(self, q_XGQK, k_XGTK, v_XGTV, valid=None):
        """Grouped attention: the Q query heads of a group share one K/V head. No K/V copies."""
        scores = torch.matmul(q_XGQK, k_XGTK.transpose(-1, -2)).float() * self.scale
        if valid is not None:
            scores = scores.masked_fill(~valid, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v_XGTV.dtype)
        return torch.matmul(probs, v_XGTV)

    def decode_self(self, x_N1D, cache, layer: int, pos: int):
        """One step of causal self-attention at position ``pos``; writes this position's K/V into ``cache``
        (a :class:`~mqa_repro.decode.cache.DecodeCache`) and reads every live position of each row."""
        n = x_N1D.shape[0]
        qg = self.group_size
        q_NGQK = self.q_proj(x_N1D).view(n, self.g, qg, self.d_k)
        k_NGK = self.k_proj(x_N1D).view(n, self.g, self.d_k)
        v_NGV = self.v_proj(x_N1D).view(n, self.g, self.d_v)
        cache.write(layer, torch.cat([k_NGK, v_NGV], -1), pos)
        k_NGTK, v_NGTV = cache.keys_values(layer, pos)
        out_NGQV = self._attend(q_NGQK, k_NGTK, v_NGTV)
        return self.o_proj(out_NGQV.reshape(n, 1, self.h * self.d_v))

    def decode_cross(self, x_N1D, cache, layer: int):
        """Encoder-decoder attention for N = B * beam rows against per-sentence K/V (shared by beams)."""
        n = x_N1D.shape[0]
        beam = cache.beam
        b = n // beam
        qg = self.group_size
        k_BGSK, v_BGSV, valid_B11S = cache.cross_keys_values(layer)
        # [B, beam, G, Q, K] -> [B, G, beam*Q, K]: all beams' queries of a group meet the group's K/V once.
        q = self.q_proj(x_N1D).view(b, beam, self.g, qg, self.d_k).permute(0, 2, 1, 3, 4)
        q_BGXK = q.reshape(b, self.g, beam * qg, self.d_k)
        out_BGXV = self._attend(q_BGXK, k_BGSK, v_BGSV, valid_B11S)
        out = out_BGXV.view(b, self.g, beam, qg, self.d_v).permute(0, 2, 1, 3, 4)
        return self.o_proj(out.reshape(n, 1, self.h * self.d_v))


class FeedForward(nn.Module):
    def __init__(self, d_model, d_ff, relu_dropout=0.0):
        super().__init__()
        self.wi = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(relu_dropout)

    def forward(self, x):
        h = self.wi(x)
        if self.training and self.dropout.p > 0 and h.is_cuda and relu_dropout.available(h):
            return self.wo(relu_dropout.relu_dropout(h, self.dropout.p))   # one Triton pass on CUDA
        return self.wo(self.dropout(F.relu(h)))


class Block(nn.Module):
    """Pre-layer-norm residual block: self-attention, [encoder-decoder attention], feed-forward."""

    def __init__(self, m: ModelSpec, causal: bool, cross: bool):
        super().__init__()
        window = m.window if causal else None
        self.self_norm = nn.LayerNorm(m.d_model)
        self.self_attn = Attention(m.d_model, m.n_heads, m.n_kv_heads, m.d_k, m.d_v, window,
                                   m.dropout.attention)
        self.cross_norm = nn.LayerNorm(m.d_model) if cross else None
        self.cross_attn = (Attention(m.d_model, m.n_heads, m.n_kv_heads, m.d_k, m.d_v, None,
                                     m.dropout.attention) if cross else None)
        self.ffn_norm = nn.LayerNorm(m.d_model)
        self.ffn = FeedForward(m.d_model, m.d_ff, m.dropout.relu)
        self.drop = nn.Dropout(m.dropout.residual)

    def forward(self, x, self_mask, mem=None, cross_mask=None):
        x = x + self.drop(self.self_attn(self.self_norm(x), mask_B1TS=self_mask))
        if self.cross_attn is not None:
            x = x + self.drop(self.cross_attn(self.cross_norm(x), mem, cross_mask))
        return x + self.drop(self.ffn(self.ffn_norm(x)))

    def step(self, x_N1D, cache, layer: int, pos: int):
        x_N1D = x_N1D + self.self_attn.decode_self(self.self_norm(x_N1D), cache, layer, pos)
        if self.cross_attn is not None:
            x_N1D = x_N1D + self.cross_attn.decode_cross(self.cross_norm(x_N1D), cache, layer)
        return x_N1D + self.ffn(self.ffn_norm(x_N1D))


# --------------------------------------------------------------------------------------------------
# Masks from segment ids (0 = padding; packing puts several examples with distinct ids in one row)
# --------------------------------------------------------------------------------------------------
def self_mask(seg_BT, causal: bool, window: Optional[int] = None):
    same = seg_BT[:, :, None] == seg_BT[:, None, :]
    if causal:
        t = seg_BT.shape[1]
        i = torch.arange(t, device=seg_BT.device)
        allowed = i[None, :] <= i[:, None]
        if window:
            allowed &= i[None, :] > i[:, None] - window
        same = same & allowed
    return same[:, None]


def cross_mask(tgt_seg_BT, src_seg_BS):
    return (tgt_seg_BT[:, :, None] == src_seg_BS[:, None, :])[:, None]


def positions_from_segments(seg_BT):
    """Position of every token within its own segment (restarts at each packed example)."""
    t = seg_BT.shape[1]
    idx = torch.arange(t, device=seg_BT.device).expand_as(seg_BT)
    start = torch.ones_like(seg_BT, dtype=torch.bool)
    start[:, 1:] = seg_BT[:, 1:] != seg_BT[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def default_segments(ids_BT):
    return (ids_BT != PAD).long()


# --------------------------------------------------------------------------------------------------
# The models
# --------------------------------------------------------------------------------------------------
class Transformer(nn.Module):
    """Encoder-decoder (translation) or decoder-only (language model), per ``spec.kind``."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        if not isinstance(spec.d_ff, int):
            raise ValueError("resolve d_ff before building a model")
        self.spec = spec
        m = spec
        d, v = m.d_model, m.padded_vocab
        self.is_seq2seq = m.is_seq2seq
        self.embed = nn.Embedding(v, d)
        self.tgt_pos = nn.Embedding(m.max_positions, d)
        if self.is_seq2seq:
            self.src_pos = nn.Embedding(m.max_positions, d)
            self.encoder = nn.ModuleList(Block(m, causal=False, cross=False) for _ in range(m.encoder_layers))
            self.enc_norm = nn.LayerNorm(d)
        self.decoder = nn.ModuleList(Block(m, causal=True, cross=self.is_seq2seq) for _ in range(m.decoder_layers))
        self.dec_norm = nn.LayerNorm(d)
        self.unembed = None if m.tied_embeddings else nn.Linear(d, v, bias=False)
        self.drop = nn.Dropout(m.dropout.residual)
        self.emb_scale = math.sqrt(d)
        self.reset_parameters()

    def reset_parameters(self):
        d = self.spec.d_model
        for name, p in self.named_parameters():
            if p.dim() == 2:
                fan_in = p.shape[1]
                std = d ** -0.5 if name.startswith("embed") else fan_in ** -0.5
                nn.init.normal_(p, std=std)
        # Learned positions start at half the per-dimension scale of the (scaled) token embeddings.
        for mod in self.modules():
            if isinstance(mod, nn.Embedding) and mod is not self.embed:
                nn.init.normal_(mod.weight, std=0.5)

    # -- pieces ------------------------------------------------------------------------------------
    def _embed(self, ids, positions, pos_table):
        return self.drop(self.embed(ids) * self.emb_scale + pos_table(positions))

    def logits(self, h):
        return F.linear(h, self.embed.weight) if self.unembed is None else self.unembed(h)

    # -- whole sequences ---------------------------------------------------------------------------
    def encode(self, src_BS, src_seg_BS=None):
        src_seg_BS = default_segments(src_BS) if src_seg_BS is None else src_seg_BS
        x = self._embed(src_BS, positions_from_segments(src_seg_BS), self.src_pos)
        mask = self_mask(src_seg_BS, causal=False)
        for blk in self.encoder:
            x = blk(x, mask)
        return self.enc_norm(x)

    def decode_all(self, tgt_in_BT, memory_BSD=None, tgt_seg_BT=None, src_seg_BS=None):
        """Decoder over whole target prefixes (teacher forcing); returns final hidden states."""
        tgt_seg_BT = default_segments(tgt_in_BT) if tgt_seg_BT is None else tgt_seg_BT
        x = self._embed(tgt_in_BT, positions_from_segments(tgt_seg_BT), self.tgt_pos)
        smask = self_mask(tgt_seg_BT, causal=True, window=self.spec.window)
        cmask = cross_mask(tgt_seg_BT, src_seg_BS) if memory_BSD is not None else None
        for blk in self.decoder:
            x = blk(x, smask, memory_BSD, cmask)
        return self.dec_norm(x)

    def forward(self, tgt_in_BT, src_BS=None, tgt_seg_BT=None, src_seg_BS=None, hidden: bool = False):
        """Logits [B, T, vocab] for every target position (the uncached reference path too); with
        ``hidden`` the final hidden states [B, T, D] instead (the training loss applies the unembedding
        itself, chunk by chunk: mqa_repro.loss.linear_cross_entropy)."""
        memory = None
        if self.is_seq2seq:
            src_seg_BS = default_segments(src_BS) if src_seg_BS is None else src_seg_BS
            memory = self.encode(src_BS, src_seg_BS)
        if tgt_seg_BT is None:
            # BOS is id 2, never PAD, so a decoder input row's real tokens are exactly the non-PAD ones.
            tgt_seg_BT = default_segments(tgt_in_BT)
        h_BTD = self.decode_all(tgt_in_BT, memory, tgt_seg_BT, src_seg_BS)
        return h_BTD if hidden else self.logits(h_BTD)

    # -- incremental decoding ----------------------------------------------------------------------
    def start_decoding(self, batch: int, max_len: int, beam: int = 1, src_BS=None, memory_BSD=None,
                       dtype=None):
        """The eager reference path (the decoding engine's test oracle): a
        :class:`~mqa_repro.decode.cache.DecodeCache` for batch*beam rows and ``max_len`` positions, with the
        encoder-decoder K/V computed once per sentence. Raises ValueError beyond ``max_positions``."""
        from .decode.cache import DecodeCache

        m = self.spec
        p = self.embed.weight
        if max_len > m.max_positions:
            raise ValueError(f"decode length {max_len} exceeds max_positions {m.max_positions}")
        cache = DecodeCache(len(self.decoder), batch, beam, m.n_kv_heads, m.d_k, m.d_v, max_len, m.window,
                            p.device, dtype or p.dtype)
        if self.is_seq2seq:
            if memory_BSD is None:
                memory_BSD = self.encode(src_BS)
            cache.set_cross([blk.cross_attn.project_kv(memory_BSD) for blk in self.decoder],
                            (src_BS != PAD).sum(1))
        return cache

    def decode_step(self, tokens_N, pos: int, state):
        """Logits [N, vocab] for the next token of every row, given this step's input tokens at ``pos``."""
        pos_t = torch.tensor([pos], device=tokens_N.device)
        x = self.embed(tokens_N)[:, None] * self.emb_scale + self.tgt_pos(pos_t)[None]
        state.mark_own(pos)
        for i, blk in enumerate(self.decoder):
            x = blk.step(x, state, i, pos)
        return self.logits(self.dec_norm(x))[:, 0]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
