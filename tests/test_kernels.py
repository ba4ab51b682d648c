"""The decoder's Triton kernels against torch: fused residual-add + layer norm, embedding + layer norm,
argmax, decode attention with tuned launches, and the fast decoder built on them. They run on a GPU, or
on the CPU under Triton's interpreter (``TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py``,
fp32 only); without either they are skipped. The split-K products and the two ways of computing the
projections are plain torch and are checked everywhere."""
import os

import pytest
import torch

from mqa_repro import fastdecode as fd

from .conftest import EXPERIMENTS

if torch.cuda.is_available() and fd.triton is not None:
    DEV, DTYPES = torch.device("cuda"), (torch.float32, torch.bfloat16)
elif fd.triton is not None and os.environ.get("TRITON_INTERPRET") == "1":
    DEV, DTYPES = torch.device("cpu"), (torch.float32,)
else:
    DEV, DTYPES = None, ()
needs_triton = pytest.mark.skipif(DEV is None, reason="needs a GPU with Triton, or TRITON_INTERPRET=1")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("s", [1, 2, 4])
def test_split_k_parts_sum_to_the_product(s):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 32, generator=g, dtype=torch.float64)
    w = torch.randn(7, 32, generator=g, dtype=torch.float64)
    parts = fd.project_parts(a, w, s)
    assert parts.shape == (s, 5, 7)
    torch.testing.assert_close(parts.sum(0), a @ w.t())
    if s > 1:   # each part is one slice of K
        torch.testing.assert_close(parts[0], a[:, :32 // s] @ w[:, :32 // s].t())
    with pytest.raises(ValueError, match="do not split"):
        fd.project_parts(a[:, :30], w[:, :30], 4)


@needs_triton
@pytest.mark.parametrize("parts", [0, 1, 3])
def test_add_layernorm_kernel_matches_torch(parts):
    for dt in DTYPES:
        g = torch.Generator().manual_seed(parts)
        d = 96   # not a power of two: the masked lanes must not enter the mean or the variance
        x = torch.randn(6, d, generator=g).to(DEV, dt)
        p = torch.randn(parts, 6, d, generator=g).to(DEV, dt) if parts else None
        norm = torch.nn.LayerNorm(d).to(DEV, dt)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(d, generator=g) + 0.5)
            norm.bias.copy_(torch.randn(d, generator=g))
        want_x = (x.float() + (p.float().sum(0) if parts else 0)).to(dt)
        want_h = torch.nn.functional.layer_norm(want_x.float(), (d,), norm.weight.float(), norm.bias.float(),
                                                norm.eps)
        with torch.no_grad():
            h = fd.add_layernorm(x, p, norm)
        torch.testing.assert_close(x.float(), want_x.float(), atol=TOL[dt], rtol=TOL[dt])
        torch.testing.assert_close(h.float(), want_h, atol=TOL[dt] * 4, rtol=TOL[dt] * 4)


@needs_triton
def test_argmax_kernel_matches_torch_including_ties():
    for dt in DTYPES:
        g = torch.Generator().manual_seed(1)
        v = 5000   # several blocks of the kernel's loop plus a ragged tail
        x = torch.randn(7, v, generator=g).to(DEV, dt)
        x[1, 17] = x[1, 4000] = 100.0           # a tie across blocks: the first index wins
        x[2, 4999] = 50.0                       # the maximum in the ragged tail
        x[3] = float("-inf")                    # nothing finite: index 0, as torch
        x[4, 9] = x[4, 10] = 77.0               # a tie inside one block
        a, b = torch.empty(7, dtype=torch.long, device=DEV), torch.empty(7, dtype=torch.long, device=DEV)
        fd.argmax_into(x, a, b)
        assert torch.equal(a, x.argmax(-1)) and torch.equal(b, a)
        assert a[1].item() == 17 and a[2].item() == 4999 and a[4].item() == 9


@needs_triton
@pytest.mark.parametrize("share,indirect", [(1, False), (4, False), (1, True)])
def test_decode_attention_kernel_matches_torch(share, indirect):
    for dt in DTYPES:
        g = torch.Generator().manual_seed(2)
        # on a GPU enough rows that the launch is tuned (fd.TUNE_MIN_ROWS); the interpreter is slow
        m, h, kv_heads, dk, slots, live = (64 if DEV.type == "cuda" else 3), 4, 2, 16, 40, 37
        n = m * share
        q = torch.randn(n, h, dk, generator=g).to(DEV, dt)
        kv = torch.randn(slots, m if not indirect else n, kv_heads, 2 * dk, generator=g).to(DEV, dt)
        anc = torch.randint(0, n, (slots, n), generator=g, dtype=torch.int32).to(DEV) if indirect else None
        want = fd.decode_attention(q, kv, live, dk, share, dk ** -0.5, anc, True, use_triton=False)
        got = fd.decode_attention(q, kv, live, dk, share, dk ** -0.5, anc, True, use_triton=True)
        torch.testing.assert_close(got.float(), want.float(), atol=TOL[dt] * 2, rtol=TOL[dt] * 2)
        if DEV.type == "cuda":   # the launch was chosen by timing, and the choice is recorded
            assert any(k.startswith(f"attention rows={n} ") for k in fd.tuning_record())


@needs_triton
@pytest.mark.parametrize("config", [(16, 4, 2), (32, 4, 3)])
def test_decode_attention_every_live_length_of_a_block(config):
    """Live lengths inside the first block, at a block boundary and one past it, under a forced launch."""
    for dt in DTYPES:
        g = torch.Generator().manual_seed(3)
        m, h, kv_heads, dk, slots = 3, 4, 2, 16, 40
        q = torch.randn(m, h, dk, generator=g).to(DEV, dt)
        kv = torch.randn(slots, m, kv_heads, 2 * dk, generator=g).to(DEV, dt)
        for live in (1, 5, config[0], config[0] + 1, slots):
            want = fd.decode_attention(q, kv, live, dk, 1, dk ** -0.5, None, True, use_triton=False)
            got = fd.decode_attention(q, kv, live, dk, 1, dk ** -0.5, None, True, config=config)
            torch.testing.assert_close(got.float(), want.float(), atol=TOL[dt] * 2, rtol=TOL[dt] * 2)


@needs_triton
def test_argmax_kernel_every_launch_candidate():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 20000, generator=g).to(DEV, DTYPES[0])
    x[0, 3] = x[0, 19999] = 9.0
    for cfg in fd.ARGMAX_CANDIDATES:
        a, b = torch.empty(5, dtype=torch.long, device=DEV), torch.empty(5, dtype=torch.long, device=DEV)
        fd.argmax_into(x, a, b, config=cfg)
        assert torch.equal(a, x.argmax(-1)) and torch.equal(b, a), cfg


@needs_triton
def test_embed_layernorm_kernel_matches_torch():
    for dt in DTYPES:
        g = torch.Generator().manual_seed(5)
        vocab, d = 50, 96
        emb = torch.randn(vocab, d, generator=g).to(DEV, dt)
        pos = torch.randn(7, d, generator=g).to(DEV, dt)
        tok = torch.tensor([0, 49, 3, 3, 17], device=DEV)
        norm = torch.nn.LayerNorm(d).to(DEV, dt)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(d, generator=g) + 0.5)
            norm.bias.copy_(torch.randn(d, generator=g))
            x, h = fd.embed_layernorm(tok, emb, pos[4], 9.8, norm)
        want_x = torch.add(pos[4], emb[tok], alpha=9.8)
        want_h = torch.nn.functional.layer_norm(want_x.float(), (d,), norm.weight.float(), norm.bias.float(),
                                                norm.eps)
        torch.testing.assert_close(x.float(), want_x.float(), atol=TOL[dt] * 10, rtol=TOL[dt])
        torch.testing.assert_close(h.float(), want_h, atol=TOL[dt] * 4, rtol=TOL[dt] * 4)


def test_qkv_apart_writes_the_same_cache_and_queries_as_fused():
    """The two ways of computing the projections (plain torch, so checked everywhere)."""
    from mqa_repro.bench import build_model
    from mqa_repro.specfile import load_spec

    for name in ("multi_head", "multi_query"):
        model = build_model(load_spec(EXPERIMENTS / "tiny.yaml").variants[name], torch.device("cpu"), "fp32")
        fast = fd.FastDecoder(model, use_triton=False)
        hn = torch.randn(6, model.spec.d_model, generator=torch.Generator().manual_seed(6))
        w = fast.layers[0].w_qkv
        slots = [torch.full((6, fast.g, fast.c), float("nan")) for _ in range(2)]
        with torch.no_grad():
            q_fused = fast._qkv(hn, w, slots[0], "fused")
            q_apart = fast._qkv(hn, w, slots[1], "apart")
        torch.testing.assert_close(q_apart, q_fused)
        torch.testing.assert_close(slots[1], slots[0])
        assert not slots[0].isnan().any()


@needs_triton
@pytest.mark.parametrize("split", [0, 2])
def test_fast_decoder_on_the_kernels_computes_decode_step(split):
    from mqa_repro.bench import BenchConfig, build_model, check_fast_path
    from mqa_repro.specfile import load_spec

    v = load_spec(EXPERIMENTS / "tiny.yaml").variants["multi_query"]
    model = build_model(v, DEV, "fp32")
    assert fd.FastDecoder(model).fused
    cfg = BenchConfig(batch=2, src_len=6, tgt_len=10, beams=[1, 2], repeats=1, dtype="fp32", device=DEV.type)
    r = check_fast_path(v, model, cfg, DEV, beam=2, batch=2, split=split)
    assert r["logits_rel_err_max"] < 1e-4
    assert r["greedy_token_agreement_with_model"] == 1.0
    assert r["beam2_sentences_equal_reference"] == 1.0
    if DEV.type == "cuda":
        assert r["greedy_graph_equals_eager"] and r["beam2_graph_equals_eager"]


@pytest.mark.skipif(DEV is None or DEV.type != "cuda", reason="tuned choices are made on CUDA only")
@pytest.mark.parametrize("forced", [
    {"attention": (16, 4, 2), "qkv": "apart", "argmax": (2048, 4), "residual": 2, "ffn": "separate"},
    {"attention": (64, 4, 2), "qkv": "fused", "argmax": (16384, 16), "residual": 0, "ffn": "epilogue"}])
def test_fast_decoder_with_every_tunable_choice_forced(monkeypatch, forced):
    """What the tuner may pick at the benchmark's shape, forced at a small one: still decode_step's function."""
    from mqa_repro.bench import BenchConfig, build_model, check_fast_path
    from mqa_repro.specfile import load_spec

    monkeypatch.setattr(fd, "TUNE_MIN_ROWS", 1)
    monkeypatch.setattr(fd, "_chosen", lambda key, default, tune: forced[key[0]])
    for name in ("multi_head", "multi_query"):
        v = load_spec(EXPERIMENTS / "tiny.yaml").variants[name]
        model = build_model(v, DEV, "fp32")
        cfg = BenchConfig(batch=2, src_len=6, tgt_len=10, beams=[1, 2], repeats=1, dtype="fp32", device="cuda")
        r = check_fast_path(v, model, cfg, DEV, beam=2, batch=2)
        assert r["logits_rel_err_max"] < 1e-4
        assert r["greedy_token_agreement_with_model"] == 1.0 and r["beam2_sentences_equal_reference"] == 1.0
        assert r["greedy_graph_equals_eager"] and r["beam2_graph_equals_eager"]
