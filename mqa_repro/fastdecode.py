"""The benchmark's static-shaped decoder: fixed-length greedy and beam search as CUDA graphs.

It computes exactly the function of :meth:`Transformer.decode_step` (tests compare the two) from the
same weights, laid out for speed:

* the self-attention cache is time-major, ``cache_TNGC`` with C = d_k + d_v (K then V of one head side
  by side), so the live prefix of every row is one contiguous slab and a step writes one ``[N, G, C]``
  slice; the query/key/value projections are one matrix product whose K/V part is copied into that
  slice, or two products, the K/V one writing into the slice directly;
* the decoder's input (embedding, scale, position) and the first layer norm are one Triton kernel;
* attention never repeats K/V: a Triton kernel gives one program per (K/V row, K/V head) and batches the
  H/G query heads of the group (and, for encoder-decoder attention under beam search, the beams of one
  sentence) against that head's K/V, reading only the live positions;
* beam search does not move the cache: a [slots, N] int32 ancestor table says which physical row holds
  each position of each hypothesis; a step updates the table (ints) and the kernel follows it;
* every residual sublayer ends in one Triton kernel that adds the sublayer's output (``addmm_`` into the
  residual, or 1, 2 or 4 split-K partial products summed in fp32) and applies the next layer norm; ReLU
  runs in the FFN product's epilogue or after it; greedy's argmax is one Triton kernel;
* on CUDA, which of those variants runs, and the attention and argmax kernels' launches (for attention
  block, warps and stages per shape and live-length bucket), are chosen by timing them on the
  device at first use (from a cold L2, as CUDA graphs); the choices and their times are in
  :func:`tuning_record`;
* on CUDA one graph is captured per step position (the live length is static inside each graph, so no
  mask is needed), optionally with the batch split over streams so memory-bound attention of one half
  overlaps matrix products of the other; on the CPU the same code runs eagerly with a torch attention.

Fixed length: EOS is ignored and exactly ``steps`` tokens are produced (the paper's timing protocol);
sources are full length (no padding).

Shape legend as in model.py, plus C = d_k + d_v and M = K/V rows (sentences for encoder-decoder
attention, N for self-attention).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from .model import BOS, PAD, Transformer

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
        q_ptr, kv_ptr, out_ptr, anc_ptr, L, scale,
        stride_qn, stride_qh,                 # q [N, H, K], unit stride on K
        stride_kvt, stride_kvm, stride_kvg,   # kv [.., M, G, C] indexed by position t, row m, head g
        stride_on, stride_oh,                 # out [N, H, V]
        stride_at,                            # ancestors [slots, N] int32 (INDIRECT only)
        QH: tl.constexpr, SHARE: tl.constexpr, R_PAD: tl.constexpr,
        DK: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr,
        INDIRECT: tl.constexpr, IEEE: tl.constexpr,
    ):
        """Program (m, g): the query rows sharing K/V row m against K/V head g over the live L positions."""
        m = tl.program_id(0)
        g = tl.program_id(1)
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
    def _embed_layernorm_kernel(tok_ptr, e_ptr, pos_ptr, w_ptr, b_ptr, x_ptr, h_ptr, scale, D, eps,
                                stride_e, stride_x, stride_h, BLOCK_D: tl.constexpr):
        """x[row] = pos + scale * e[tok[row]] (rounded once, like torch.add with alpha); h[row] =
        LayerNorm(x[row]) in fp32. One program per row."""
        row = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        ok = d < D
        tok = tl.load(tok_ptr + row).to(tl.int64)
        e = tl.load(e_ptr + tok * stride_e + d, mask=ok, other=0.0).to(tl.float32)
        p = tl.load(pos_ptr + d, mask=ok, other=0.0).to(tl.float32)
        xr = (p + scale * e).to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + row * stride_x + d, xr, mask=ok)
        h = _layernorm_row(xr.to(tl.float32), ok, d, D, eps, w_ptr, b_ptr)
        tl.store(h_ptr + row * stride_h + d, h.to(h_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _argmax_kernel(x_ptr, o1_ptr, o2_ptr, V, stride_x, BLOCK: tl.constexpr):
        """o1[row] = o2[row] = the first index of the row's maximum (torch.argmax's tie rule)."""
        row = tl.program_id(0).to(tl.int64)
        off = tl.arange(0, BLOCK)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        arg = tl.zeros([BLOCK], tl.int32)
        for v0 in range(0, V, BLOCK):
            idx = v0 + off
            x = tl.load(x_ptr + row * stride_x + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
            upd = x > best        # strictly greater: each lane keeps its first maximum
            best = tl.where(upd, x, best)
            arg = tl.where(upd, idx, arg)
        top = tl.max(best, 0)
        first = tl.min(tl.where(best == top, arg, 2147483647), 0).to(tl.int64)
        tl.store(o1_ptr + row, first)
        tl.store(o2_ptr + row, first)


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

# Every choice made on this device by timing, with the candidates' times (recorded in decode-bench's JSON).
TUNING: dict = {}
_CHOSEN: dict = {}   # (what, shape..., device) -> the choice


def _chosen(key: tuple, default, tune):
    """The choice stored under ``key``; else ``tune()``'s, stored. Never tuned inside a graph capture (the
    warm-up before capture tunes first): there the ``default`` is used."""
    if key not in _CHOSEN:
        if torch.cuda.is_current_stream_capturing():
            return default
        _CHOSEN[key] = tune()
    return _CHOSEN[key]


def tuning_record() -> dict:
    return {k: dict(v) for k, v in sorted(TUNING.items())}


_FLUSH: dict = {}


def _graph_us(fn, reps: int) -> float:
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(3):
        g.replay()
    b.record()
    b.synchronize()
    del g
    return a.elapsed_time(b) * 1e3 / (3 * reps)


def _time_us(fn, reps: int = 20) -> float:
    """GPU microseconds per call of ``fn`` from a cold L2 cache (tuning only, not a reported time).

    ``reps`` calls, each after overwriting a buffer twice the L2 cache, captured in one CUDA graph; minus the
    same graph without the calls. A graph, because timing eager calls would time the CPU launching them
    (a decode step's kernels take a few microseconds each); a cold cache, because inside a decode step the
    caches and weights a kernel reads were not just read by the same kernel.
    """
    fn()                       # compile, pick cuBLAS kernels, allocate: outside the capture
    dev = torch.cuda.current_device()
    if dev not in _FLUSH:
        l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 * 2**20)
        _FLUSH[dev] = torch.empty(max(2 * l2, 2**20) // 4, dtype=torch.float32, device="cuda")
    buf = _FLUSH[dev]
    torch.cuda.synchronize()

    def flushed():
        buf.zero_()
        fn()

    return max(0.0, _graph_us(flushed, reps) - _graph_us(buf.zero_, reps))


TUNE_MIN_ROWS = 64   # smaller batches keep the fixed choices (their steps are launch-bound either way)


def _tunable(tune: bool, x: torch.Tensor) -> bool:
    """Whether a choice for an operation on ``x`` ([rows, ...]) is made by timing: asked for, on CUDA, and
    enough rows for the choice to matter."""
    return tune and x.is_cuda and x.shape[0] >= TUNE_MIN_ROWS


def _pick(name: str, candidates: list, make_fn) -> object:
    """The fastest of ``candidates`` (``make_fn(c)`` gives a callable running c); failures are skipped."""
    times = {}
    for c in candidates:
        try:
            times[c] = _time_us(make_fn(c))
        except Exception as e:  # e.g. a launch configuration needing more shared memory than the device has
            times[c] = f"{type(e).__name__}"
    ok = {c: t for c, t in times.items() if isinstance(t, float)}
    if not ok:
        raise RuntimeError(f"tuning {name}: every candidate failed: {times}")
    best = min(ok, key=ok.get)
    TUNING[name] = {"choice": list(best) if isinstance(best, tuple) else best,
                    "us": {str(list(c) if isinstance(c, tuple) else c): (round(t, 2) if isinstance(t, float) else t)
                           for c, t in times.items()}}
    return best


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def triton_ok(q_NHK: torch.Tensor, d_k: int, d_v: int) -> bool:
    return _triton_here(q_NHK) and _pow2(d_k) and _pow2(d_v) and d_k >= 16 and d_v >= 16


def decode_attention(q_NHK, kv_XMGC, L: int, d_k: int, share: int, scale: float, anc_SN=None,
                     time_major: bool = True, use_triton: bool = True, tune: bool = True,
                     config: Optional[tuple] = None):
    """softmax(q k^T * scale) v over the first ``L`` positions; one K/V row serves ``share`` query rows.

    q_NHK: [N, H, d_k]; kv_XMGC: the cache, [slots, M, G, C] (time-major) or [M, S, G, C]; N = M * share.
    anc_SN (self-attention under beam search): anc_SN[t, n] is the physical row holding position t of row n.
    ``config`` forces the kernel's launch (block_t, num_warps, num_stages) instead of the tuned one.
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

        def launch(cfg, length=L, o=out):
            block_t, warps, stages = cfg
            _decode_attention_kernel[(m_rows, g)](
                q_NHK, kv_XMGC, o, anc, length, scale,
                q_NHK.stride(0), q_NHK.stride(1), st, sm, kv_XMGC.stride(2),
                o.stride(0), o.stride(1), anc_SN.stride(0) if anc_SN is not None else 0,
                QH=qh, SHARE=share, R_PAD=r_pad, DK=d_k, DV=d_v, BLOCK_T=block_t,
                INDIRECT=anc_SN is not None, IEEE=q_NHK.dtype == torch.float32,
                num_warps=warps, num_stages=stages)

        default = (ATTENTION_CONFIG["block_t"], ATTENTION_CONFIG["num_warps_wide" if r_pad >= 32 else "num_warps"],
                   ATTENTION_CONFIG["num_stages"])
        cfg = config or default
        if config is None and _tunable(tune, q_NHK):
            # one choice per shape and live-length bucket, timed at the bucket's longest length
            bucket = max(32, triton.next_power_of_2(L))
            slots = kv_XMGC.shape[0] if time_major else kv_XMGC.shape[1]
            key = ("attention", n, h, g, c, share, anc_SN is not None, time_major, str(q_NHK.dtype), bucket,
                   slots, torch.cuda.get_device_name(q_NHK.device))

            def tune_launch():
                scratch = torch.empty_like(out)
                length = min(bucket, slots)
                cands = [x for x in ATTENTION_CANDIDATES if x[0] <= max(32, bucket)]
                name = (f"attention rows={n} heads={h} kv_heads={g} share={share} "
                        f"{'time-major' if time_major else 'row-major'} "
                        f"{'ancestors' if anc_SN is not None else 'direct'} live<={bucket} slots={slots} "
                        f"{str(q_NHK.dtype).replace('torch.', '')}")
                return _pick(name, cands, lambda x: (lambda: launch(x, length, scratch)))

            cfg = _chosen(key, default, tune_launch)
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
                    norm: torch.nn.LayerNorm) -> tuple:
    """x = pos + scale * emb[tok] (the decoder's input at one position) and norm(x). One kernel on CUDA."""
    if _triton_here(emb_VD) and norm.bias is not None and emb_VD.stride(1) == 1 and pos_D.stride(0) == 1:
        n, d = tok_N.shape[0], emb_VD.shape[1]
        x = torch.empty(n, d, device=emb_VD.device, dtype=emb_VD.dtype)
        h = torch.empty_like(x)
        _embed_layernorm_kernel[(n,)](tok_N, emb_VD, pos_D, norm.weight, norm.bias, x, h, scale, d, norm.eps,
                                      emb_VD.stride(0), x.stride(0), h.stride(0),
                                      BLOCK_D=triton.next_power_of_2(d), num_warps=4 if d <= 2048 else 8)
        return x, h
    x = torch.add(pos_D, F.embedding(tok_N, emb_VD), alpha=scale)
    return x, norm(x)


# (BLOCK, num_warps) of the argmax kernel: the default, and what the tuner tries
ARGMAX_CONFIG = (4096, 8)
ARGMAX_CANDIDATES = [(2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16)]


def argmax_into(logits_NV: torch.Tensor, *outs: torch.Tensor, tune: bool = False,
                config: Optional[tuple] = None) -> None:
    """Each row's argmax (first index of the maximum) written into every tensor of ``outs`` ([N] int64).
    ``tune``: on CUDA the kernel's (block, warps) is chosen by timing once per shape; ``config`` forces it."""
    if _triton_here(logits_NV) and logits_NV.stride(1) == 1 and len(outs) == 2:
        n, v = logits_NV.shape

        def launch(cfg, o1=outs[0], o2=outs[1]):
            block, warps = cfg
            _argmax_kernel[(n,)](logits_NV, o1, o2, v, logits_NV.stride(0),
                                 BLOCK=min(block, triton.next_power_of_2(v)), num_warps=warps)

        cfg = config or ARGMAX_CONFIG
        if config is None and _tunable(tune, logits_NV):
            key = ("argmax", n, v, str(logits_NV.dtype), torch.cuda.get_device_name(logits_NV.device))

            def tune_launch():
                o = torch.empty_like(outs[0])
                name = f"argmax rows={n} vocab={v} {str(logits_NV.dtype).replace('torch.', '')}"
                return _pick(name, ARGMAX_CANDIDATES, lambda c: (lambda: launch(c, o, o)))

            cfg = _chosen(key, ARGMAX_CONFIG, tune_launch)
        launch(cfg)
        return
    tok = logits_NV.argmax(-1)
    for o in outs:
        o.copy_(tok)


# --------------------------------------------------------------------------------------------------
# Weights, laid out once
# --------------------------------------------------------------------------------------------------
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


@dataclass
class Chunk:
    """The decoding state of a slice of the batch (one CUDA stream each)."""

    batch: int                 # sentences
    beam: int
    cache_LTNGC: list          # per layer [slots, N, G, C]
    cross_BSGC: Optional[list]  # per layer [B, S, G, C]
    tok_N: torch.Tensor        # this step's input tokens
    hist_TN: torch.Tensor      # emitted tokens per step
    parent_TN: Optional[torch.Tensor] = None  # beam: row each hypothesis came from, per step
    scores_BK: Optional[torch.Tensor] = None  # beam: summed log-probabilities
    anc: list = field(default_factory=list)   # beam: two [slots, N] int32 ancestor tables (ping-pong)
    arange_N: Optional[torch.Tensor] = None

    @property
    def rows(self) -> int:
        return self.batch * self.beam


class FastDecoder:
    """Decoder steps of ``model`` for fixed-length greedy / beam search; see the module docstring."""

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
    def encode(self, src_BS) -> list:
        """Encoder (full-length sources, no mask) and every decoder layer's cross K/V [B, S, G, C]."""
        model = self.model
        if bool((src_BS == PAD).any()):
            raise ValueError("the fast decoder expects full-length sources (no padding)")
        b, s = src_BS.shape
        pos = torch.arange(s, device=src_BS.device)
        x = (model.embed(src_BS) * model.emb_scale + model.src_pos(pos)[None]).view(b * s, -1)
        qh = self.spec.group_size
        for blk in model.encoder:
            a = blk.self_attn
            hn = blk.self_norm(x)
            q = F.linear(hn, a.q_proj.weight).view(b, s, self.h, self.d_k).transpose(1, 2)
            k = F.linear(hn, a.k_proj.weight).view(b, s, self.g, self.d_k).transpose(1, 2)
            v = F.linear(hn, a.v_proj.weight).view(b, s, self.g, self.d_v).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, scale=self.scale, enable_gqa=qh > 1)
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
        if not _tunable(self.fused and self.tune, hn_ND):
            return "epilogue"
        key = ("ffn", hn_ND.shape[0], w_i.shape[1], w_i.shape[0], str(w_i.dtype), self._device_name)

        def tune():
            h = torch.randn_like(hn_ND)
            name = f"ffn hidden rows={key[1]} k={key[2]} n={key[3]} {key[4].replace('torch.', '')}"
            return _pick(name, ["epilogue", "separate"], lambda c: (lambda: self._ffn_hidden(h, w_i, zero_F, c)))

        return _chosen(key, "epilogue", tune)

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
        if not _tunable(self.fused and self.tune, hn_ND):
            return "fused"
        key = ("qkv", hn_ND.shape[0], w_qkv.shape[1], w_qkv.shape[0], str(w_qkv.dtype), self._device_name)

        def tune():
            h, slot = torch.randn_like(hn_ND), torch.empty_like(slot_NGC)
            name = (f"qkv product rows={key[1]} k={key[2]} n={key[3]} (K/V {slot[0].numel()}) "
                    f"{key[4].replace('torch.', '')}")
            return _pick(name, ["fused", "apart"], lambda c: (lambda: self._qkv(h, w_qkv, slot, c)))

        return _chosen(key, "fused", tune)

    def _residual(self, x_ND, a_NK, w, s: int, norm) -> torch.Tensor:
        """x += a @ w^T (``s`` as in SPLIT_CANDIDATES); returns norm(x), the next sublayer's input."""
        if s == 0:
            x_ND.addmm_(a_NK, w.t())
            return add_layernorm(x_ND, None, norm) if self.fused else norm(x_ND)
        return add_layernorm(x_ND, project_parts(a_NK, w, s), norm)

    def _split_for(self, x_ND, a_NK, w, norm) -> int:
        if self.split is not None:
            return self.split
        if not _tunable(self.fused and self.tune, a_NK):
            return 0
        k = a_NK.shape[1]
        key = ("residual", a_NK.shape[0], k, w.shape[0], str(w.dtype), self._device_name)

        def tune():
            xs, a = x_ND.clone(), torch.randn_like(a_NK) * 0.02
            cands = [c for c in SPLIT_CANDIDATES if c == 0 or (k % c == 0 and (k // c) % 16 == 0)]
            name = f"residual product rows={key[1]} k={k} n={key[3]} {key[4].replace('torch.', '')}"
            return _pick(name, cands, lambda c: (lambda: self._residual(xs, a, w, c, norm)))

        return _chosen(key, 0, tune)

    def _add(self, x_ND, a_NK, w, norm) -> torch.Tensor:
        return self._residual(x_ND, a_NK, w, self._split_for(x_ND, a_NK, w, norm), norm)

    # -- state -------------------------------------------------------------------------------------
    def new_chunk(self, cross_BSGC: Optional[list], batch: int, beam: int, steps: int) -> Chunk:
        m = self.spec
        slots = m.cache_slots(steps)
        n = batch * beam
        dev = self.device
        cache = [torch.zeros(slots, n, self.g, self.c, device=dev, dtype=self.dtype) for _ in self.layers]
        ch = Chunk(batch=batch, beam=beam, cache_LTNGC=cache, cross_BSGC=cross_BSGC,
                   tok_N=torch.full((n,), BOS, device=dev, dtype=torch.long),
                   hist_TN=torch.zeros(steps, n, device=dev, dtype=torch.long))
        if beam > 1:
            ch.parent_TN = torch.zeros(steps, n, device=dev, dtype=torch.long)
            ch.scores_BK = torch.zeros(batch, beam, device=dev, dtype=torch.float32)
            ch.anc = [torch.zeros(slots, n, device=dev, dtype=torch.int32) for _ in range(2)]
            ch.arange_N = torch.arange(n, device=dev, dtype=torch.int32)
        self.reset(ch)
        return ch

    def reset(self, ch: Chunk) -> None:
        """Back to step 0 (the caches need no clearing: a step writes a position before it is read)."""
        ch.tok_N.fill_(BOS)
        if ch.beam > 1:
            ch.scores_BK.fill_(float("-inf"))
            ch.scores_BK[:, 0] = 0.0   # only beam 0 is live at the start

    # -- one step ----------------------------------------------------------------------------------
    def logits(self, ch: Chunk, t: int, anc_SN=None) -> torch.Tensor:
        """Logits [N, vocab] of step ``t`` (static), reading the chunk's input tokens."""
        model = self.model
        n = ch.rows
        slots = ch.cache_LTNGC[0].shape[0]
        slot, live = t % slots, min(t + 1, slots)
        if self.fused:   # [N, D] each
            x, hn = embed_layernorm(ch.tok_N, model.embed.weight, model.tgt_pos.weight[t], model.emb_scale,
                                    self.layers[0].ln1)
        else:
            x = torch.add(model.tgt_pos.weight[t], model.embed(ch.tok_N), alpha=model.emb_scale)
            hn = self.layers[0].ln1(x)
        for i, L in enumerate(self.layers):
            after = self.layers[i + 1].ln1 if i + 1 < len(self.layers) else model.dec_norm
            q = self._qkv(hn, L.w_qkv, ch.cache_LTNGC[i][slot])                         # [N, H*K]
            o = decode_attention(q.view(n, self.h, self.d_k), ch.cache_LTNGC[i], live, self.d_k,
                                 1, self.scale, anc_SN, True, self.use_triton, self.tune)
            hn = self._add(x, o.view(n, -1), L.w_o, L.ln2 if L.ln2 is not None else L.ln3)
            if L.ln2 is not None:
                q = F.linear(hn, L.w_q_cross).view(n, self.h, self.d_k)
                o = decode_attention(q, ch.cross_BSGC[i], ch.cross_BSGC[i].shape[1], self.d_k, ch.beam,
                                     self.scale, None, False, self.use_triton, self.tune)
                hn = self._add(x, o.view(n, -1), L.w_o_cross, L.ln3)
            hn = self._add(x, self._ffn_hidden(hn, L.w_i, L.zero_F), L.w_o_ffn, after)
        return model.logits(hn)

    def greedy_step(self, ch: Chunk, t: int) -> None:
        argmax_into(self.logits(ch, t), ch.hist_TN[t], ch.tok_N, tune=self.fused and self.tune)

    def beam_step(self, ch: Chunk, t: int) -> None:
        """Fixed-length beam search: every hypothesis stays alive; the k best continuations survive."""
        b, k = ch.batch, ch.beam
        slots = ch.cache_LTNGC[0].shape[0]
        cur, nxt = ch.anc[t % 2], ch.anc[(t + 1) % 2]
        history = min(t, slots)
        if history:  # follow the parents chosen at the previous step (ints only, the K/V stay put)
            torch.index_select(cur[:history], 1, ch.parent_TN[t - 1], out=nxt[:history])
        nxt[t % slots].copy_(ch.arange_N)
        logp_NV = torch.log_softmax(self.logits(ch, t, nxt), -1)
        top_lp, top_tok = logp_NV.topk(k, dim=-1)                                        # [N, k]
        cand_BX = (ch.scores_BK[:, :, None] + top_lp.float().view(b, k, k)).view(b, k * k)
        best, idx = cand_BX.topk(k, dim=-1)                                              # [B, k]
        base_B1 = torch.arange(b, device=self.device)[:, None] * k
        parent_N = (base_B1 + idx // k).view(-1)
        tok_N = top_tok.view(b, k * k).gather(1, idx).view(-1)
        ch.scores_BK.copy_(best)
        ch.parent_TN[t].copy_(parent_N)
        ch.hist_TN[t].copy_(tok_N)
        ch.tok_N.copy_(tok_N)

    def step(self, ch: Chunk, t: int) -> None:
        (self.beam_step if ch.beam > 1 else self.greedy_step)(ch, t)

    @staticmethod
    def best_tokens(ch: Chunk) -> torch.Tensor:
        """Greedy: the emitted tokens [N, T]; beam: each sentence's best hypothesis traced back [B, T]."""
        if ch.beam == 1:
            return ch.hist_TN.t().contiguous()
        steps = ch.hist_TN.shape[0]
        row = torch.arange(ch.batch, device=ch.tok_N.device) * ch.beam + ch.scores_BK.argmax(1)
        out = []
        for t in range(steps - 1, -1, -1):
            out.append(ch.hist_TN[t, row])
            row = ch.parent_TN[t, row]
        return torch.stack(out[::-1], 1)


# --------------------------------------------------------------------------------------------------
# Running a whole decode: eager, or one CUDA graph per step
# --------------------------------------------------------------------------------------------------
class DecodeRun:
    """``steps`` fixed-length decoding steps over ``len(chunks)`` slices of the batch."""

    def __init__(self, fast: FastDecoder, chunks: list, steps: int, graphs: bool):
        self.fast, self.chunks, self.steps = fast, chunks, steps
        self.graphs = []
        self.streams = [torch.cuda.Stream() for _ in chunks] if graphs else []
        if graphs:
            self._capture()

    def _eager_step(self, t):
        for ch in self.chunks:
            self.fast.step(ch, t)

    def _streamed_step(self, t):
        main = torch.cuda.current_stream()
        for s, ch in zip(self.streams, self.chunks):
            s.wait_stream(main)
            with torch.cuda.stream(s):
                self.fast.step(ch, t)
        for s in self.streams:
            main.wait_stream(s)

    @torch.no_grad()
    def _capture(self):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):   # warm-up: kernels compiled, cuBLAS handles and workspaces made
            for t in range(self.steps):
                self._streamed_step(t)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        pool = torch.cuda.graph_pool_handle()
        for t in range(self.steps):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self._streamed_step(t)
            self.graphs.append(g)
        torch.cuda.synchronize()

    def reset(self):
        for ch in self.chunks:
            self.fast.reset(ch)

    @torch.no_grad()
    def run(self):
        """All steps from the start (call reset() first); asynchronous on CUDA."""
        if self.graphs:
            for g in self.graphs:
                g.replay()
        else:
            for t in range(self.steps):
                self._eager_step(t)
