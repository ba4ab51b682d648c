"""The decoder's Triton kernels and their torch fallbacks (same arithmetic; the CPU path and the tests'
reference): decode attention over a K/V cache, the residual add fused with the next layer norm, the
embedding fused with the first layer norm, greedy's argmax, and beam search's step (each hypothesis' best
continuations, then each sentence's selection; its torch reference is :class:`~.search.Beam`'s own code).

Decode attention never repeats K/V: one program per (K/V row, K/V head) batches the H/G query heads of the
group (and, for encoder-decoder attention under beam search, the beams of one sentence) against that head's
K/V, reading only the row's live positions: one static length ``L`` for every row, or per-row lengths
``lens_M`` (padded sources; rows at different positions). Under beam search a [slots, N] int32 ancestor
table says which physical row holds each position of each hypothesis, so the cache never moves.

Shape legend as in model.py, plus C = d_k + d_v and M = K/V rows (sentences for encoder-decoder attention,
N for self-attention).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from ..model import BOS, PAD
from .tuning import chosen, pick, tunable

try:  # Triton is optional: CPU runs use the torch attention below
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - no triton on this machine
    triton = None

# Under Triton's interpreter (TRITON_INTERPRET=1) the kernels also run on CPU tensors: tests use it where no GPU is.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _triton_here(t: torch.Tensor) -> bool:
    return triton is not None and (t.is_cuda or _INTERPRET)


# --------------------------------------------------------------------------------------------------
# Decode attention
# --------------------------------------------------------------------------------------------------
if triton is not None:
    @triton.jit(do_not_specialize=["L"])
    def _decode_attention_kernel(
        q_ptr, kv_ptr, out_ptr, anc_ptr, lens_ptr, L, scale,
        stride_qn, stride_qh,                 # q [N, H, K], unit stride on K
        stride_kvt, stride_kvm, stride_kvg,   # kv [.., M, G, C] indexed by position t, row m, head g
        stride_on, stride_oh,                 # out [N, H, V]
        stride_at,                            # ancestors [slots, N] int32 (INDIRECT only)
        QH: tl.constexpr, SHARE: tl.constexpr, R_PAD: tl.constexpr,
        DK: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr,
        INDIRECT: tl.constexpr, IEEE: tl.constexpr, HAS_LENS: tl.constexpr,
    ):
        """Program (m, g): the query rows sharing K/V row m against K/V head g over the live L positions
        (HAS_LENS: row m's own lens[m] positions instead)."""
        m = tl.program_id(0)
        g = tl.program_id(1)
        if HAS_LENS:
            L = tl.load(lens_ptr + m)
        r = tl.arange(0, R_PAD)
        r_ok = r < SHARE * QH
        n_r = m * SHARE + r // QH           # query row of each tile row
        h_r = g * QH + r % QH               # query head of each tile row
        dk = tl.arange(0, DK)
        dv = tl.arange(0, DV)
        q = tl.load(q_ptr + n_r[:, None] * stride_qn + h_r[:, None] * stride_qh + dk[None, :],
                    mask=r_ok[:, None], other=0.0)
        m_i = tl.full([R_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([R_PAD], tl.float32)
        acc = tl.zeros([R_PAD, DV], tl.float32)
        for t0 in range(0, L, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_ok = t < L
            if INDIRECT:
                row = tl.load(anc_ptr + t * stride_at + m, mask=t_ok, other=0).to(tl.int64)
            else:
                row = tl.zeros([BLOCK_T], tl.int64) + m
            base = kv_ptr + t.to(tl.int64)[:, None] * stride_kvt + row[:, None] * stride_kvm + g * stride_kvg
            k = tl.load(base + dk[None, :], mask=t_ok[:, None], other=0.0)
            v = tl.load(base + DK + dv[None, :], mask=t_ok[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(t_ok[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + n_r[:, None] * stride_on + h_r[:, None] * stride_oh + dv[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=r_ok[:, None])

    @triton.jit
    def _layernorm_row(x, ok, d, D, eps, w_ptr, b_ptr):
        """LayerNorm of one fp32 row ``x`` (lanes past D masked by ``ok``), in fp32."""
        mean = tl.sum(x, 0) / D
        xc = tl.where(ok, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, 0) / D + eps)
        w = tl.load(w_ptr + d, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + d, mask=ok, other=0.0).to(tl.float32)
        return xc * rstd * w + b

    @triton.jit
    def _add_layernorm_kernel(x_ptr, p_ptr, w_ptr, b_ptr, h_ptr, D, eps,
                              stride_x, stride_ps, stride_pm, stride_h,
                              PARTS: tl.constexpr, BLOCK_D: tl.constexpr):
        """x[row] += sum of PARTS partial products (stored rounded, like the model's residual); then
        h[row] = LayerNorm(x[row]) in fp32. One program per row."""
        row = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        ok = d < D
        x = tl.load(x_ptr + row * stride_x + d, mask=ok, other=0.0).to(tl.float32)
        if PARTS > 0:
            for s in tl.static_range(PARTS):
                x += tl.load(p_ptr + s * stride_ps + row * stride_pm + d, mask=ok, other=0.0).to(tl.float32)
            xr = x.to(x_ptr.dtype.element_ty)
            tl.store(x_ptr + row * stride_x + d, xr, mask=ok)
            x = xr.to(tl.float32)
        h = _layernorm_row(x, ok, d, D, eps, w_ptr, b_ptr)
        tl.store(h_ptr + row * stride_h + d, h.to(h_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _embed_layernorm_kernel(tok_ptr, e_ptr, pos_ptr, pos_idx_ptr, w_ptr, b_ptr, x_ptr, h_ptr, scale, D, eps,
                                stride_e, stride_p, stride_x, stride_h, BLOCK_D: tl.constexpr,
                                POS_PER_ROW: tl.constexpr):
        """x[row] = pos + scale * e[tok[row]] (rounded once, like torch.add with alpha); h[row] =
        LayerNorm(x[row]) in fp32. One program per row. POS_PER_ROW: pos is the table row pos_idx[row]."""
        row = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        ok = d < D
        tok = tl.load(tok_ptr + row).to(tl.int64)
        e = tl.load(e_ptr + tok * stride_e + d, mask=ok, other=0.0).to(tl.float32)
        if POS_PER_ROW:
            prow = tl.load(pos_idx_ptr + row).to(tl.int64)
            p = tl.load(pos_ptr + prow * stride_p + d, mask=ok, other=0.0).to(tl.float32)
        else:
            p = tl.load(pos_ptr + d, mask=ok, other=0.0).to(tl.float32)
        xr = (p + scale * e).to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + row * stride_x + d, xr, mask=ok)
        h = _layernorm_row(xr.to(tl.float32), ok, d, D, eps, w_ptr, b_ptr)
        tl.store(h_ptr + row * stride_h + d, h.to(h_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _argmax_kernel(x_ptr, o1_ptr, o2_ptr, V, stride_x, BLOCK: tl.constexpr, FORBID_A: tl.constexpr,
                       FORBID_B: tl.constexpr):
        """o1[row] = o2[row] = the first index of the row's maximum over ids < V except FORBID_A and
        FORBID_B (torch.argmax's tie rule)."""
        row = tl.program_id(0).to(tl.int64)
        off = tl.arange(0, BLOCK)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        arg = tl.zeros([BLOCK], tl.int32)
        for v0 in range(0, V, BLOCK):
            idx = v0 + off
            x = tl.load(x_ptr + row * stride_x + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
            x = tl.where((idx == FORBID_A) | (idx == FORBID_B), float("-inf"), x)
            upd = x > best        # strictly greater: each lane keeps its first maximum
            best = tl.where(upd, x, best)
            arg = tl.where(upd, idx, arg)
        top = tl.max(best, 0)
        first = tl.min(tl.where(best == top, arg, 2147483647), 0).to(tl.int64)
        tl.store(o1_ptr + row, first)
        tl.store(o2_ptr + row, first)

    @triton.jit
    def _beam_candidates_kernel(x_ptr, lp_ptr, tok_ptr, V, stride_x, W: tl.constexpr, W_PAD: tl.constexpr,
                                BLOCK: tl.constexpr, FORBID_A: tl.constexpr, FORBID_B: tl.constexpr):
        """Row n of logits x: its W best ids (ids < V except FORBID_A and FORBID_B), best first, ties to the
        lower id, into tok[n]; their log-probabilities log_softmax(x[n]) (rounded to x's dtype, as
        torch.log_softmax's output) into lp[n]. Two passes over the row in blocks: its maximum; then
        sum(exp(x - max)) and the W best so far (rv, ri), each block adding only its values above the
        current W-th best. One program per row."""
        row = tl.program_id(0).to(tl.int64)
        off = tl.arange(0, BLOCK)
        base = x_ptr + row * stride_x
        mx = tl.full([BLOCK], float("-inf"), tl.float32)
        for v0 in range(0, V, BLOCK):
            idx = v0 + off
            ok = (idx < V) & (idx != FORBID_A) & (idx != FORBID_B)
            mx = tl.maximum(mx, tl.load(base + idx, mask=ok, other=float("-inf")).to(tl.float32))
        m = tl.max(mx, 0)
        lane = tl.arange(0, W_PAD)
        rv = tl.where(lane < W, float("-inf"), float("inf"))   # lanes past W are never the worst
        ri = -1 - lane
        se = tl.zeros([BLOCK], tl.float32)
        for v0 in range(0, V, BLOCK):
            idx = v0 + off
            ok = (idx < V) & (idx != FORBID_A) & (idx != FORBID_B)
            x = tl.load(base + idx, mask=ok, other=float("-inf")).to(tl.float32)
            se += tl.exp(x - m)
            # ids grow block by block, so a value equal to the W-th best never displaces it
            n = tl.minimum(tl.sum((x > tl.min(rv, 0)).to(tl.int32), 0), W)
            for _ in range(n):
                bv = tl.max(x, 0)       # a masked lane (-inf) can come out here, but never goes in below
                bi = tl.min(tl.where(x == bv, idx, 2147483647), 0)
                x = tl.where(idx == bi, float("-inf"), x)
                worst = tl.min(rv, 0)
                wi = tl.max(tl.where(rv == worst, ri, -2147483647), 0)   # the worst: lowest value, highest id
                put = (ri == wi) & (bv > rv)    # rv is the worst at that lane
                rv = tl.where(put, bv, rv)
                ri = tl.where(put, bi, ri)
        log_s = tl.log(tl.sum(se, 0))
        taken = lane >= W
        for i in tl.static_range(W):
            bv = tl.max(tl.where(taken, float("-inf"), rv), 0)
            bi = tl.min(tl.where(~taken & (rv == bv), ri, 2147483647), 0)
            taken = taken | (ri == bi)
            tl.store(tok_ptr + row * W + i, bi.to(tl.int64))
            tl.store(lp_ptr + row * W + i, ((bv - m) - log_s).to(x_ptr.dtype.element_ty).to(tl.float32))

    @triton.jit(do_not_specialize=["t_static"])
    def _beam_select_kernel(lp_ptr, tok_ptr, scores_ptr, parent_ptr, tok_n_ptr, hist_ptr, parents_ptr,
                            limit_ptr, done_ptr, fin_s_ptr, fin_step_ptr, fin_row_ptr, fin_tok_ptr, fin_n_ptr,
                            lpen_ptr, t_ptr, t_static, lpen_static, N,
                            K: tl.constexpr, W: tl.constexpr, X_PAD: tl.constexpr, A_PAD: tl.constexpr,
                            EOS_ID: tl.constexpr, USE_EOS: tl.constexpr, FINISH: tl.constexpr,
                            T_ON_DEVICE: tl.constexpr):
        """Sentence b's step of beam search (:meth:`mqa_repro.decode.search.Beam.step`'s rules, after each
        hypothesis' W best continuations lp/tok): the W best of its K x W candidates (score + lp; ties to the
        lower candidate), finishing (FINISH: at the length limit the first K, with USE_EOS also EOS among the
        first K; kept among the K best finished by score / length penalty, ties to the older), and the K
        alive (the first K non-EOS with USE_EOS, else the first K), written to the scores, parents, history
        and next tokens. Candidates live in lanes K .. K + W - 1 of the A_PAD-lane vectors (rank r in lane
        K + r), the finished hypotheses in lanes 0 .. K - 1. One program per sentence."""
        b = tl.program_id(0).to(tl.int64)
        if T_ON_DEVICE:
            t = tl.load(t_ptr)
            lpen = tl.load(lpen_ptr + t)
        else:
            t = t_static
            lpen = lpen_static
        x = tl.arange(0, X_PAD)
        x_ok = x < K * W
        cand = (tl.load(scores_ptr + b * K + x // W, mask=x_ok, other=float("-inf"))
                + tl.load(lp_ptr + b * K * W + x, mask=x_ok, other=float("-inf")))
        a = tl.arange(0, A_PAD)
        is_new = (a >= K) & (a < K + W)
        s_new = tl.full([A_PAD], float("-inf"), tl.float32)
        x_new = tl.zeros([A_PAD], tl.int32)
        avail = x_ok
        for i in tl.static_range(W):
            bv = tl.max(tl.where(avail, cand, float("-inf")), 0)
            bx = tl.min(tl.where(avail & (cand == bv), x, X_PAD), 0)
            avail = avail & (x != bx)
            s_new = tl.where(a == K + i, bv, s_new)
            x_new = tl.where(a == K + i, bx, x_new)
        parent = b * K + x_new // W                                   # the hypothesis row each extends
        tok = tl.load(tok_ptr + b * K * W + x_new, mask=is_new, other=0)
        rank = a - K
        if FINISH:
            last = (t + 1) >= tl.load(limit_ptr + b)
            done = tl.load(done_ptr + b) != 0
            first_k = is_new & (rank < K)
            fin = last & first_k
            if USE_EOS:
                fin = fin | ((tok == EOS_ID) & first_k)
            fin = fin & ~done
            old = a < K
            all_s = tl.where(old, tl.load(fin_s_ptr + b * K + a, mask=old, other=float("-inf")),
                             tl.where(fin, s_new / lpen, float("-inf")))
            all_step = tl.where(old, tl.load(fin_step_ptr + b * K + a, mask=old, other=0), t)
            all_row = tl.where(old, tl.load(fin_row_ptr + b * K + a, mask=old, other=0), parent)
            all_tok = tl.where(old, tl.load(fin_tok_ptr + b * K + a, mask=old, other=0), tok)
            keep = a < K + W
            for i in tl.static_range(K):
                bv = tl.max(tl.where(keep, all_s, float("-inf")), 0)
                ba = tl.min(tl.where(keep & (all_s == bv), a, A_PAD), 0)
                keep = keep & (a != ba)
                sel = a == ba
                tl.store(fin_s_ptr + b * K + i, bv)
                tl.store(fin_step_ptr + b * K + i, tl.sum(tl.where(sel, all_step, 0), 0))
                tl.store(fin_row_ptr + b * K + i, tl.sum(tl.where(sel, all_row, 0), 0))
                tl.store(fin_tok_ptr + b * K + i, tl.sum(tl.where(sel, all_tok, 0), 0))
            count = tl.load(fin_n_ptr + b) + tl.sum(fin.to(tl.int64), 0)
            tl.store(fin_n_ptr + b, count)
            tl.store(done_ptr + b, (done | (count >= K) | last).to(tl.int1))
        if USE_EOS:
            alive = is_new & (tok != EOS_ID)
            slot = tl.cumsum(alive.to(tl.int32), 0) - 1
            alive = alive & (slot < K)
        else:
            slot = rank
            alive = is_new & (rank < K)
        dst = b * K + slot
        tl.store(scores_ptr + dst, s_new, mask=alive)
        tl.store(parent_ptr + dst, parent, mask=alive)
        tl.store(tok_n_ptr + dst, tok, mask=alive)
        tl.store(hist_ptr + t * N + dst, tok, mask=alive)
        tl.store(parents_ptr + t * N + dst, parent, mask=alive)


# Launch configuration of the decode-attention kernel when it is not tuned (notes/bench.md, an H100): one
# block of 128 positions, 8 warps once 32 or more query rows share a K/V row (beam 4 x 8 heads of MQA).
ATTENTION_CONFIG = {"block_t": 128, "num_warps": 4, "num_warps_wide": 8, "num_stages": 2}
# What the tuner tries, (block_t, num_warps, num_stages): the best depends on the device, on how many query
# rows share a K/V row and on the live length, so each combination is timed once on the device at first use.
# (Splitting the positions over 2 or 4 programs per row and head with a combine kernel, flash-decoding, was
# slower at every shape of the benchmark on an H200: notes/bench.md.)
ATTENTION_CANDIDATES = [(16, 4, 4), (32, 2, 4), (32, 4, 3), (32, 4, 4), (32, 8, 3), (64, 4, 2), (64, 4, 3),
                        (64, 8, 2), (64, 8, 3), (128, 4, 1), (128, 4, 2), (128, 8, 1), (128, 8, 2)]
SPLIT_CANDIDATES = (0, 1, 2, 4)   # residual products: 0 = addmm_ into the residual, s >= 1 = s K-slices

def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def triton_ok(q_NHK: torch.Tensor, d_k: int, d_v: int) -> bool:
    return _triton_here(q_NHK) and _pow2(d_k) and _pow2(d_v) and d_k >= 16 and d_v >= 16


def decode_attention(q_NHK, kv_XMGC, L: int, d_k: int, share: int, scale: float, anc_SN=None,
                     time_major: bool = True, use_triton: bool = True, tune: bool = True,
                     config: Optional[tuple] = None, lens_M: Optional[torch.Tensor] = None):
    """softmax(q k^T * scale) v over the first ``L`` positions; one K/V row serves ``share`` query rows.
    ``lens_M`` ([M] int32, each <= L): K/V row m's own number of positions (padded sources, rows at different
    positions); the kernel reads no position beyond it.

    q_NHK: [N, H, d_k]; kv_XMGC: the cache, [slots, M, G, C] (time-major) or [M, S, G, C]; N = M * share.
    anc_SN (self-attention under beam search): anc_SN[t, n] is the physical row holding position t of row n.
    ``config`` forces the kernel's launch (block_t, num_warps, num_stages) instead of the tuned one.
    fp32 products are exact, or TF32 while ``torch.backends.cuda.matmul.allow_tf32`` is set (as torch.matmul's).
    Returns out_NHV [N, H, d_v].
    """
    n, h, _ = q_NHK.shape
    g, c = kv_XMGC.shape[2], kv_XMGC.shape[3]
    d_v = c - d_k
    qh = h // g
    if time_major:
        st, sm = kv_XMGC.stride(0), kv_XMGC.stride(1)
    else:
        sm, st = kv_XMGC.stride(0), kv_XMGC.stride(1)
    m_rows = n // share
    if use_triton and triton_ok(q_NHK, d_k, d_v):
        out = torch.empty(n, h, d_v, device=q_NHK.device, dtype=q_NHK.dtype)
        r_pad = max(16, triton.next_power_of_2(share * qh))
        anc = anc_SN if anc_SN is not None else q_NHK  # unused pointer when not indirect

        # fp32: exact products unless torch's fp32 products may use TF32 (as evaluate sets on CUDA), in which case
        # the reference path's attention products (torch.matmul) are TF32 too
        ieee = q_NHK.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32

        def launch(cfg, length=L, o=out):
            block_t, warps, stages = cfg
            _decode_attention_kernel[(m_rows, g)](
                q_NHK, kv_XMGC, o, anc, lens_M if lens_M is not None else anc, length, scale,
                q_NHK.stride(0), q_NHK.stride(1), st, sm, kv_XMGC.stride(2),
                o.stride(0), o.stride(1), anc_SN.stride(0) if anc_SN is not None else 0,
                QH=qh, SHARE=share, R_PAD=r_pad, DK=d_k, DV=d_v, BLOCK_T=block_t,
                INDIRECT=anc_SN is not None, IEEE=ieee, HAS_LENS=lens_M is not None,
                num_warps=warps, num_stages=stages)

        # positions per block: no wider than the live length rounded up (a short cache reads one block)
        default = (min(ATTENTION_CONFIG["block_t"], max(16, triton.next_power_of_2(L))),
                   ATTENTION_CONFIG["num_warps_wide" if r_pad >= 32 else "num_warps"], ATTENTION_CONFIG["num_stages"])
        cfg = config or default
        if config is None and tunable(tune, q_NHK):
            # one choice per shape and live-length bucket, timed at the bucket's longest length
            bucket = max(32, triton.next_power_of_2(L))
            slots = kv_XMGC.shape[0] if time_major else kv_XMGC.shape[1]
            key = ("attention", n, h, g, c, share, anc_SN is not None, time_major, str(q_NHK.dtype), ieee, bucket,
                   slots, lens_M is not None, torch.cuda.get_device_name(q_NHK.device))

            def tune_launch():
                scratch = torch.empty_like(out)
                length = min(bucket, slots)
                cands = [x for x in ATTENTION_CANDIDATES if x[0] <= max(32, bucket)]
                name = (f"attention rows={n} heads={h} kv_heads={g} share={share} "
                        f"{'time-major' if time_major else 'row-major'} "
                        f"{'ancestors' if anc_SN is not None else 'direct'} live<={bucket} slots={slots} "
                        f"{'per-row lengths ' if lens_M is not None else ''}"
                        f"{str(q_NHK.dtype).replace('torch.', '')}")
                return pick(name, cands, lambda x: (lambda: launch(x, length, scratch)))

            cfg = chosen(key, default, tune_launch)
        launch(cfg)
        return out
    # torch: the same arithmetic (the CPU path and the reference for the kernel)
    kv = kv_XMGC[:L] if time_major else kv_XMGC[:, :L].transpose(0, 1)           # [L, M, G, C]
    if anc_SN is not None:
        kv = kv[torch.arange(L, device=kv.device)[:, None], anc_SN[:L].long()]  # [L, N, G, C]
    k_MGLK = kv[..., :d_k].permute(1, 2, 0, 3)
    v_MGLV = kv[..., d_k:].permute(1, 2, 0, 3)
    q_MGRK = q_NHK.view(m_rows, share, g, qh, d_k).transpose(1, 2).reshape(m_rows, g, share * qh, d_k)
    s = torch.matmul(q_MGRK, k_MGLK.transpose(-1, -2)).float() * scale
    if lens_M is not None:
        live_ML = torch.arange(L, device=s.device)[None] < lens_M[:, None]
        s = s.masked_fill(~live_ML[:, None, None], float("-inf"))
    out_MGRV = torch.matmul(torch.softmax(s, -1).to(v_MGLV.dtype), v_MGLV)
    return out_MGRV.view(m_rows, g, share, qh, d_v).transpose(1, 2).reshape(n, h, d_v)


# --------------------------------------------------------------------------------------------------
# Residual products, layer norms and argmax
# --------------------------------------------------------------------------------------------------
def project_parts(a_MK: torch.Tensor, w_NK: torch.Tensor, s: int) -> torch.Tensor:
    """a @ w^T as ``s`` partial products over slices of K, [s, M, N] (split-K: ``s`` times the tiles when M x N
    alone would leave most of a large GPU idle). The slices are strided views; nothing is copied."""
    if s == 1:
        return torch.mm(a_MK, w_NK.t()).unsqueeze(0)
    m, k = a_MK.shape
    n = w_NK.shape[0]
    if k % s:
        raise ValueError(f"split-K: {k} columns do not split into {s} slices")
    return torch.bmm(a_MK.view(m, s, k // s).transpose(0, 1), w_NK.view(n, s, k // s).permute(1, 2, 0))


def add_layernorm(x_MD: torch.Tensor, parts_SMD: Optional[torch.Tensor], norm: torch.nn.LayerNorm) -> torch.Tensor:
    """x += the sum of the partial products (in fp32, rounded once into x); returns norm(x). One kernel on CUDA."""
    if _triton_here(x_MD) and norm.bias is not None and x_MD.stride(1) == 1:
        h = torch.empty_like(x_MD)
        p = parts_SMD if parts_SMD is not None else x_MD
        d = x_MD.shape[1]
        _add_layernorm_kernel[(x_MD.shape[0],)](
            x_MD, p, norm.weight, norm.bias, h, d, norm.eps, x_MD.stride(0),
            p.stride(0) if parts_SMD is not None else 0, p.stride(1) if parts_SMD is not None else 0, h.stride(0),
            PARTS=0 if parts_SMD is None else parts_SMD.shape[0], BLOCK_D=triton.next_power_of_2(d),
            num_warps=4 if d <= 2048 else 8)
        return h
    if parts_SMD is not None:
        x_MD.copy_((x_MD.float() + parts_SMD.float().sum(0)).to(x_MD.dtype))
    return norm(x_MD)


def embed_layernorm(tok_N: torch.Tensor, emb_VD: torch.Tensor, pos_D: torch.Tensor, scale: float,
                    norm: torch.nn.LayerNorm, pos_N: Optional[torch.Tensor] = None) -> tuple:
    """x = pos + scale * emb[tok] (the decoder's input at one position) and norm(x), each [N, D]. One kernel
    on CUDA. ``pos_N`` (rows at different positions): ``pos_D`` is then the whole table [P, D] and row n
    takes its row pos_N[n]."""
    if (_triton_here(emb_VD) and norm.bias is not None and emb_VD.stride(1) == 1
            and pos_D.stride(-1) == 1):
        n, d = tok_N.shape[0], emb_VD.shape[1]
        x = torch.empty(n, d, device=emb_VD.device, dtype=emb_VD.dtype)
        h = torch.empty_like(x)
        _embed_layernorm_kernel[(n,)](tok_N, emb_VD, pos_D, pos_N if pos_N is not None else tok_N, norm.weight,
                                      norm.bias, x, h, scale, d, norm.eps, emb_VD.stride(0),
                                      pos_D.stride(0) if pos_N is not None else 0, x.stride(0), h.stride(0),
                                      BLOCK_D=triton.next_power_of_2(d), num_warps=4 if d <= 2048 else 8,
                                      POS_PER_ROW=pos_N is not None)
        return x, h
    pos = pos_D if pos_N is None else F.embedding(pos_N, pos_D)
    x = torch.add(pos, F.embedding(tok_N, emb_VD), alpha=scale)
    return x, norm(x)


# (BLOCK, num_warps) of the argmax kernel: the default, and what the tuner tries
ARGMAX_CONFIG = (4096, 8)
ARGMAX_CANDIDATES = [(2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16)]


def argmax_into(logits_NV: torch.Tensor, *outs: torch.Tensor, tune: bool = False,
                config: Optional[tuple] = None, limit: Optional[int] = None) -> None:
    """Each row's argmax (first index of the maximum) over the ids < ``limit`` (default: all) except PAD and
    BOS, written into every tensor of ``outs`` ([N] int64). ``tune``: on CUDA the kernel's (block, warps) is
    chosen by timing once per shape; ``config`` forces it."""
    v = logits_NV.shape[1] if limit is None else min(limit, logits_NV.shape[1])
    if _triton_here(logits_NV) and logits_NV.stride(1) == 1 and len(outs) == 2:
        n = logits_NV.shape[0]

        def launch(cfg, o1=outs[0], o2=outs[1]):
            block, warps = cfg
            _argmax_kernel[(n,)](logits_NV, o1, o2, v, logits_NV.stride(0),
                                 BLOCK=min(block, triton.next_power_of_2(v)), FORBID_A=PAD, FORBID_B=BOS,
                                 num_warps=warps)

        cfg = config or ARGMAX_CONFIG
        if config is None and tunable(tune, logits_NV):
            key = ("argmax", n, v, str(logits_NV.dtype), torch.cuda.get_device_name(logits_NV.device))

            def tune_launch():
                o = torch.empty_like(outs[0])
                name = f"argmax rows={n} vocab={v} {str(logits_NV.dtype).replace('torch.', '')}"
                return pick(name, ARGMAX_CANDIDATES, lambda c: (lambda: launch(c, o, o)))

            cfg = chosen(key, ARGMAX_CONFIG, tune_launch)
        launch(cfg)
        return
    tok = forbid_specials(logits_NV[:, :v].clone()).argmax(-1)
    for o in outs:
        o.copy_(tok)




BEAM_FUSED_MAX = 16   # beams up to this size search with the two kernels below (their selections are loops
                      # unrolled 2 x beam times); larger ones with torch


def beam_fused(logits_NV: torch.Tensor, beam: int) -> bool:
    """Whether :func:`beam_candidates` and the beam-selection kernel run for these logits and beam size."""
    return _triton_here(logits_NV) and logits_NV.stride(1) == 1 and beam <= BEAM_FUSED_MAX


def beam_candidates(logits_NV: torch.Tensor, w: int, vocab_limit: Optional[int] = None,
                    use_triton: bool = True) -> tuple:
    """Each row's ``w`` best continuations under log_softmax, PAD, BOS and ids >= ``vocab_limit`` excluded:
    (log-probabilities [N, w] fp32, ids [N, w] int64), best first. One kernel on CUDA (two passes over each row,
    no log-probability matrix written; ties go to the lower id); elsewhere, or with ``use_triton`` False,
    torch's log_softmax and topk, which also overwrite the excluded logits with -inf in place."""
    if use_triton and _triton_here(logits_NV) and logits_NV.stride(1) == 1:
        n, v = logits_NV.shape[0], logits_NV.shape[1] if vocab_limit is None else min(vocab_limit, logits_NV.shape[1])
        lp = torch.empty(n, w, device=logits_NV.device, dtype=torch.float32)
        tok = torch.empty(n, w, device=logits_NV.device, dtype=torch.long)
        _beam_candidates_kernel[(n,)](logits_NV, lp, tok, v, logits_NV.stride(0), W=w,
                                      W_PAD=triton.next_power_of_2(w), BLOCK=min(4096, triton.next_power_of_2(v)),
                                      FORBID_A=PAD, FORBID_B=BOS, num_warps=8)
        return lp, tok
    top_lp, top_tok = torch.log_softmax(forbid_specials(logits_NV, vocab_limit), -1).topk(w, dim=-1)
    return top_lp.float(), top_tok


def forbid_specials(logits_NV: torch.Tensor, vocab_limit: Optional[int] = None) -> torch.Tensor:
    """In place: PAD and BOS are never generated (they are not targets); UNK stays possible. Nor are ids >=
    ``vocab_limit`` (the rows that pad the vocabulary to a multiple of ``vocab_multiple``, or ids the
    tokenizer has no piece for): their logits are untrained. Returns ``logits_NV``."""
    logits_NV[:, PAD] = float("-inf")
    logits_NV[:, BOS] = float("-inf")
    if vocab_limit is not None:
        logits_NV[:, vocab_limit:] = float("-inf")
    return logits_NV
