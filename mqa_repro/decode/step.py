"""One decoder step of the engine: the model's weights laid out once for speed, the encoder, and the
logits of one step for every row. It computes exactly the function of :meth:`Transformer.decode_step`
(tests compare the two):

* the cache is :class:`~mqa_repro.decode.cache.DecodeCache`'s time-major slab; the query/key/value
  projections are one matrix product whose K/V part is copied into the step's slot, or two products, the
  K/V one writing into the slot directly;
* the decoder's input (embedding, scale, position) and the first layer norm are one Triton kernel;
* attention is :func:`~mqa_repro.decode.kernels.decode_attention` (no K/V copies; ancestors under beam search;
  per-row lengths for padded sources and rows at different positions);
* every residual sublayer ends in one Triton kernel that adds the sublayer's output (``addmm_`` into the
  residual, or 1, 2 or 4 split-K partial products summed in fp32) and applies the next layer norm; ReLU
  runs in the FFN product's epilogue or after it;
* on CUDA, which of those variants runs and the kernels' launches are chosen by timing them on the device at
  first use (:mod:`mqa_repro.decode.tuning`); on the CPU the same code runs with the torch fallbacks.

A step's position is either static (``t``, a Python int: every row at position t, the live length static;
the fixed-length benchmark captures one CUDA graph per step) or per row (``pos_N``, a device tensor: one
graph serves every step, lengths are read by the kernels).

Shape legend as in model.py, plus C = d_k + d_v.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..model import Transformer
from .cache import DecodeCache
from .kernels import (SPLIT_CANDIDATES, _triton_here, add_layernorm, decode_attention, embed_layernorm,
                      project_parts)
from .tuning import chosen, pick, tunable


def _kv_interleaved(attn) -> torch.Tensor:
    """[G * (K + V), D]: for each K/V head its K rows then its V rows (the cache's C layout)."""
    g, d_k, d_v = attn.g, attn.d_k, attn.d_v
    k = attn.k_proj.weight.view(g, d_k, -1)
    v = attn.v_proj.weight.view(g, d_v, -1)
    return torch.cat([k, v], 1).reshape(g * (d_k + d_v), -1)


@dataclass
class _Layer:
    ln1: torch.nn.LayerNorm
    w_qkv: torch.Tensor          # [H*K + G*C, D]
    w_o: torch.Tensor            # [D, H*V]
    ln2: Optional[torch.nn.LayerNorm]
    w_q_cross: Optional[torch.Tensor]
    w_o_cross: Optional[torch.Tensor]
    w_kv_cross: Optional[torch.Tensor]  # [G*C, D], used once per sentence
    ln3: torch.nn.LayerNorm
    w_i: torch.Tensor
    zero_F: torch.Tensor
    w_o_ffn: torch.Tensor



class DecoderStep:
    """Decoder steps (and the encoder) of ``model``; see the module docstring."""

    def __init__(self, model: Transformer, use_triton: bool = True, split: Optional[int] = None, tune: bool = True):
        """``split``: how the residual products are computed (see SPLIT_CANDIDATES); None picks the fastest on
        a GPU by timing (``tune``) and 0 elsewhere. ``tune`` also times the other choices (see describe())."""
        self.model = model
        m = model.spec
        self.spec, self.use_triton = m, use_triton
        self.fused = use_triton and _triton_here(model.embed.weight)
        self.split, self.tune = split, tune
        self.h, self.g, self.d_k, self.d_v = m.n_heads, m.n_kv_heads, m.d_k, m.d_v
        self.c = m.d_k + m.d_v
        self.scale = m.d_k ** -0.5
        self.device, self.dtype = model.embed.weight.device, model.embed.weight.dtype
        self._device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        try:  # ReLU in the matrix product's epilogue (cuBLASLt) where available
            torch._addmm_activation(torch.zeros(2), torch.ones(1, 2), torch.ones(2, 2))
            self._relu_mm = True
        except Exception:  # pragma: no cover
            self._relu_mm = False
        self.layers = []
        with torch.no_grad():
            for blk in model.decoder:
                sa, ca = blk.self_attn, blk.cross_attn
                self.layers.append(_Layer(
                    ln1=blk.self_norm, w_qkv=torch.cat([sa.q_proj.weight, _kv_interleaved(sa)], 0).contiguous(),
                    w_o=sa.o_proj.weight, ln2=blk.cross_norm,
                    w_q_cross=ca.q_proj.weight if ca is not None else None,
                    w_o_cross=ca.o_proj.weight if ca is not None else None,
                    w_kv_cross=_kv_interleaved(ca).contiguous() if ca is not None else None,
                    ln3=blk.ffn_norm, w_i=blk.ffn.wi.weight,
                    zero_F=torch.zeros(blk.ffn.wi.weight.shape[0], device=self.device, dtype=self.dtype),
                    w_o_ffn=blk.ffn.wo.weight))

    def describe(self) -> dict:
        """How the decoder step is computed (recorded beside every decode-bench time)."""
        how = ("timed per shape (decode-bench JSON: tuning)" if self.split is None and self.fused and self.tune
               else self.split or 0)
        return {"layer_norm": "Triton, fused with the residual add" if self.fused else "torch",
                "residual_products": {"split": how, "candidates": "0 = addmm_ into the residual, s = s K-slices "
                                                                  "summed in the layer-norm kernel"},
                "ffn_relu": ("epilogue or separate, timed per shape" if self.fused and self.tune
                             else "epilogue" if self._relu_mm and self.device.type == "cuda" else "separate"),
                "qkv_products": ("one product + K/V copy, or queries and K/V apart (K/V straight into the "
                                 "cache), timed per shape" if self.fused and self.tune
                                 else "one product + K/V copy"),
                "embedding": "Triton, fused with the first layer norm" if self.fused else "torch",
                "greedy_argmax": ("Triton, launch timed per shape" if self.fused and self.tune
                                  else "Triton" if self.fused else "torch"),
                "attention_launch": ("timed per shape and live-length bucket" if self.fused and self.tune
                                     else "fixed")}

    # -- encoder -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, src_BS: torch.Tensor, src_len_B: Optional[torch.Tensor] = None) -> list:
        """Encoder and every decoder layer's encoder-decoder K/V [B, S, G, C]. ``src_BS`` [B, S] ids, right-padded
        with PAD; ``src_len_B`` [B] the real lengths (None: no padding, no mask)."""
        model = self.model
        b, s = src_BS.shape
        pos = torch.arange(s, device=src_BS.device)
        x = (model.embed(src_BS) * model.emb_scale + model.src_pos(pos)[None]).view(b * s, -1)
        mask = None
        if src_len_B is not None:   # padding is masked as a key (padded queries are computed and never read)
            mask = (pos[None] < src_len_B.to(pos.device)[:, None]).view(b, 1, 1, s)
        qh = self.spec.group_size
        for blk in model.encoder:
            a = blk.self_attn
            hn = blk.self_norm(x)
            q = F.linear(hn, a.q_proj.weight).view(b, s, self.h, self.d_k).transpose(1, 2)
            k = F.linear(hn, a.k_proj.weight).view(b, s, self.g, self.d_k).transpose(1, 2)
            v = F.linear(hn, a.v_proj.weight).view(b, s, self.g, self.d_v).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=qh > 1)
            x.addmm_(o.transpose(1, 2).reshape(b * s, self.h * self.d_v), a.o_proj.weight.t())
            self._ffn(x, blk.ffn_norm, blk.ffn.wi.weight, blk.ffn.wo.weight, None)
        mem = model.enc_norm(x)
        return [F.linear(mem, L.w_kv_cross).view(b, s, self.g, self.c) for L in self.layers]

    def _ffn(self, x_ND, norm, w_i, w_o, zero_F):
        x_ND.addmm_(self._ffn_hidden(norm(x_ND), w_i, zero_F), w_o.t())

    def _ffn_hidden(self, hn_ND, w_i, zero_F, mode: Optional[str] = None):
        """relu(hn @ w_i^T): ReLU in the product's epilogue ("epilogue") or after it ("separate"); the two
        get different cuBLAS kernels, so on a GPU the faster is timed once per shape."""
        if mode is None:
            mode = self._ffn_mode(hn_ND, w_i, zero_F)
        if mode == "epilogue":
            return torch._addmm_activation(zero_F, hn_ND, w_i.t())
        return F.linear(hn_ND, w_i).relu_()

    def _ffn_mode(self, hn_ND, w_i, zero_F) -> str:
        if not (self._relu_mm and zero_F is not None and hn_ND.is_cuda):
            return "separate"
        if not tunable(self.fused and self.tune, hn_ND):
            return "epilogue"
        key = ("ffn", hn_ND.shape[0], w_i.shape[1], w_i.shape[0], str(w_i.dtype), self._device_name)

        def tune():
            h = torch.randn_like(hn_ND)
            name = f"ffn hidden rows={key[1]} k={key[2]} n={key[3]} {key[4].replace('torch.', '')}"
            return pick(name, ["epilogue", "separate"], lambda c: (lambda: self._ffn_hidden(h, w_i, zero_F, c)))

        return chosen(key, "epilogue", tune)

    def _qkv(self, hn_ND, w_qkv, slot_NGC, mode: Optional[str] = None) -> torch.Tensor:
        """The queries [N, H*K]; this position's K/V land in the cache slot ``slot_NGC``. "fused": one product
        for all three, its K/V part then copied into the slot; "apart": a product for the queries and one
        writing K/V straight into the slot. Which is faster depends on the shape, so on a GPU it is timed."""
        hk = self.h * self.d_k
        if mode is None:
            mode = self._qkv_mode(hn_ND, w_qkv, slot_NGC)
        if mode == "apart":
            torch.mm(hn_ND, w_qkv[hk:].t(), out=slot_NGC.view(slot_NGC.shape[0], -1))
            return F.linear(hn_ND, w_qkv[:hk])
        qkv = F.linear(hn_ND, w_qkv)                                                     # [N, H*K + G*C]
        slot_NGC.copy_(qkv[:, hk:].view_as(slot_NGC))
        return qkv[:, :hk]

    def _qkv_mode(self, hn_ND, w_qkv, slot_NGC) -> str:
        if not tunable(self.fused and self.tune, hn_ND):
            return "fused"
        key = ("qkv", hn_ND.shape[0], w_qkv.shape[1], w_qkv.shape[0], str(w_qkv.dtype), self._device_name)

        def tune():
            h, slot = torch.randn_like(hn_ND), torch.empty_like(slot_NGC)
            name = (f"qkv product rows={key[1]} k={key[2]} n={key[3]} (K/V {slot[0].numel()}) "
                    f"{key[4].replace('torch.', '')}")
            return pick(name, ["fused", "apart"], lambda c: (lambda: self._qkv(h, w_qkv, slot, c)))

        return chosen(key, "fused", tune)

    def _residual(self, x_ND, a_NK, w, s: int, norm) -> torch.Tensor:
        """x += a @ w^T (``s`` as in SPLIT_CANDIDATES); returns norm(x), the next sublayer's input."""
        if s == 0:
            x_ND.addmm_(a_NK, w.t())
            return add_layernorm(x_ND, None, norm) if self.fused else norm(x_ND)
        return add_layernorm(x_ND, project_parts(a_NK, w, s), norm)

    def _split_for(self, x_ND, a_NK, w, norm) -> int:
        if self.split is not None:
            return self.split
        if not tunable(self.fused and self.tune, a_NK):
            return 0
        k = a_NK.shape[1]
        key = ("residual", a_NK.shape[0], k, w.shape[0], str(w.dtype), self._device_name)

        def tune():
            xs, a = x_ND.clone(), torch.randn_like(a_NK) * 0.02
            cands = [c for c in SPLIT_CANDIDATES if c == 0 or (k % c == 0 and (k // c) % 16 == 0)]
            name = f"residual product rows={key[1]} k={k} n={key[3]} {key[4].replace('torch.', '')}"
            return pick(name, cands, lambda c: (lambda: self._residual(xs, a, w, c, norm)))

        return chosen(key, 0, tune)

    def _add(self, x_ND, a_NK, w, norm) -> torch.Tensor:
        return self._residual(x_ND, a_NK, w, self._split_for(x_ND, a_NK, w, norm), norm)

    # -- one step --------------------------------------------------------------------------------------
    def hidden(self, cache: DecodeCache, tok_N: torch.Tensor, t: Optional[int] = None,
               pos_N: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The final hidden states [N, D] of one step for the input tokens ``tok_N`` [N] at position ``t``
        (static, every row) or ``pos_N`` (int64 [N], per row); writes the step's K/V into ``cache``. The
        ancestor table (beam search) must already say where each hypothesis' history is (cache.follow and
        cache.mark_own)."""
        model = self.model
        n = tok_N.shape[0]
        static = pos_N is None
        slots = cache.slots
        if static:
            slot, live, lens = t % slots, min(t + 1, slots), None
            pos_row, pos_idx = model.tgt_pos.weight[t], None
        else:
            slot_N = pos_N % slots
            live, lens = slots, torch.clamp(pos_N + 1, max=slots).to(torch.int32)
            pos_row, pos_idx = model.tgt_pos.weight, pos_N
        anc = cache.table(t if static else None)
        if self.fused:   # [N, D] each
            x, hn = embed_layernorm(tok_N, model.embed.weight, pos_row, model.emb_scale, self.layers[0].ln1, pos_idx)
        else:
            pos = pos_row if static else F.embedding(pos_idx, pos_row)
            x = torch.add(pos, model.embed(tok_N), alpha=model.emb_scale)
            hn = self.layers[0].ln1(x)
        src_len = cache.src_len_B
        for i, L in enumerate(self.layers):
            after = self.layers[i + 1].ln1 if i + 1 < len(self.layers) else model.dec_norm
            kv = cache.self_TNGC[i]
            if static:
                q = self._qkv(hn, L.w_qkv, kv[slot])                                    # [N, H*K]
            else:
                qkv = F.linear(hn, L.w_qkv)
                kv.index_put_((slot_N, cache.arange_N.long()), qkv[:, self.h * self.d_k:].view(n, self.g, self.c))
                q = qkv[:, : self.h * self.d_k]
            o = decode_attention(q.view(n, self.h, self.d_k), kv, live, self.d_k, 1, self.scale, anc, True,
                                 self.use_triton, self.tune, lens_M=lens)
            hn = self._add(x, o.reshape(n, -1), L.w_o, L.ln2 if L.ln2 is not None else L.ln3)
            if L.ln2 is not None:
                q = F.linear(hn, L.w_q_cross).view(n, self.h, self.d_k)
                cross = cache.cross_BSGC[i]
                o = decode_attention(q, cross, cross.shape[1], self.d_k, cache.beam, self.scale, None, False,
                                     self.use_triton, self.tune, lens_M=src_len)
                hn = self._add(x, o.reshape(n, -1), L.w_o_cross, L.ln3)
            hn = self._add(x, self._ffn_hidden(hn, L.w_i, L.zero_F), L.w_o_ffn, after)
        return hn

    def logits(self, cache: DecodeCache, tok_N: torch.Tensor, t: Optional[int] = None,
               pos_N: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [N, padded vocab] of one step (see :meth:`hidden`)."""
        return self.model.logits(self.hidden(cache, tok_N, t, pos_N))
