"""The decoder's Triton kernels against torch: fused residual-add + layer norm, embedding + layer norm
(one position or per-row positions), argmax (PAD, BOS and ids past the vocabulary limit excluded), decode
attention with tuned launches and per-row lengths, and the engine built on them. They run on a GPU, or
on the CPU under Triton's interpreter (``TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py``,
fp32 only); without either they are skipped. The split-K products and the two ways of computing the
projections are plain torch and are checked everywhere."""
import os

import pytest
import torch

from mqa_repro.decode import kernels as fd
from mqa_repro.decode import step as step_mod
from mqa_repro.decode import tuning

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
        # on a GPU enough rows that the launch is tuned (tuning.TUNE_MIN_ROWS); the interpreter is slow
        m, h, kv_heads, dk, slots, live = (64 if DEV.type == "cuda" else 3), 4, 2, 16, 40, 37
        n = m * share
        q = torch.randn(n, h, dk, generator=g).to(DEV, dt)
        kv = torch.randn(slots, m if not indirect else n, kv_heads, 2 * dk, generator=g).to(DEV, dt)
        anc = torch.randint(0, n, (slots, n), generator=g, dtype=torch.int32).to(DEV) if indirect else None
        want = fd.decode_attention(q, kv, live, dk, share, dk ** -0.5, anc, True, use_triton=False)
        got = fd.decode_attention(q, kv, live, dk, share, dk ** -0.5, anc, True, use_triton=True)
        torch.testing.assert_close(got.float(), want.float(), atol=TOL[dt] * 2, rtol=TOL[dt] * 2)
        if DEV.type == "cuda":   # the launch was chosen by timing, and the choice is recorded
            assert any(k.startswith(f"attention rows={n} ") for k in tuning.tuning_record())


@needs_triton
def test_fp32_decode_attention_with_tf32_allowed_matches_torch_with_tf32_allowed(monkeypatch):
    """`evaluate` lets fp32 products use TF32 on CUDA; the kernel then multiplies in TF32 as torch.matmul does,
    and its default block follows the cache's slots (here fewer than one default block), per-row lengths too."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    g = torch.Generator().manual_seed(4)
    m, h, kv_heads, dk, slots = 48, 8, 8, 32, 24
    q = torch.randn(m, h, dk, generator=g).to(DEV)
    kv = torch.randn(m, slots, kv_heads, 2 * dk, generator=g).to(DEV)
    lens = torch.randint(1, slots + 1, (m,), generator=g).to(DEV, torch.int32)
    want = fd.decode_attention(q, kv, slots, dk, 1, dk ** -0.5, None, False, use_triton=False, lens_M=lens)
    got = fd.decode_attention(q, kv, slots, dk, 1, dk ** -0.5, None, False, use_triton=True, tune=False,
                              lens_M=lens)
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)   # TF32: 10-bit mantissas in the products


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


def _embed_inputs(seed: int, dt):
    """Generator, width, embedding (50 x 96), 7 positions, 5 token ids and a LayerNorm, on DEV in ``dt``."""
    g = torch.Generator().manual_seed(seed)
    vocab, d = 50, 96
    emb = torch.randn(vocab, d, generator=g).to(DEV, dt)
    pos = torch.randn(7, d, generator=g).to(DEV, dt)
    tok = torch.tensor([0, 49, 3, 3, 17], device=DEV)
    return g, d, emb, pos, tok, torch.nn.LayerNorm(d).to(DEV, dt)


@needs_triton
def test_embed_layernorm_kernel_matches_torch():
    for dt in DTYPES:
        g, d, emb, pos, tok, norm = _embed_inputs(5, dt)
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
        fast = step_mod.DecoderStep(model, use_triton=False)
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
    assert step_mod.DecoderStep(model).fused
    cfg = BenchConfig(batch=2, src_len=6, tgt_len=10, beams=[1, 2], repeats=1, dtype="fp32", device=DEV.type)
    r = check_fast_path(v, model, cfg, DEV, beam=2, batch=2, split=split)
    assert r["logits_rel_err_max"] < 1e-4
    assert r["greedy_token_agreement_with_model"] == 1.0
    assert r["greedy_sentences_equal_real_input_path"] == 1.0 and r["beam2_sentences_equal_real_input_path"] == 1.0
    if DEV.type == "cuda":
        assert r["greedy_graph_equals_eager"] and r["beam2_graph_equals_eager"]
        assert r["greedy_real_input_graph_equals_eager"] and r["beam2_real_input_graph_equals_eager"]


@pytest.mark.skipif(DEV is None or DEV.type != "cuda", reason="tuned choices are made on CUDA only")
@pytest.mark.parametrize("forced", [
    {"attention": (16, 4, 2), "qkv": "apart", "argmax": (2048, 4), "residual": 2, "ffn": "separate"},
    {"attention": (64, 4, 2), "qkv": "fused", "argmax": (16384, 16), "residual": 0, "ffn": "epilogue"}])
def test_fast_decoder_with_every_tunable_choice_forced(monkeypatch, forced):
    """What the tuner may pick at the benchmark's shape, forced at a small one: still decode_step's function."""
    from mqa_repro.bench import BenchConfig, build_model, check_fast_path
    from mqa_repro.specfile import load_spec

    monkeypatch.setattr(tuning, "TUNE_MIN_ROWS", 1)
    for mod in (fd, step_mod):
        monkeypatch.setattr(mod, "chosen", lambda key, default, tune: forced[key[0]])
    for name in ("multi_head", "multi_query"):
        v = load_spec(EXPERIMENTS / "tiny.yaml").variants[name]
        model = build_model(v, DEV, "fp32")
        cfg = BenchConfig(batch=2, src_len=6, tgt_len=10, beams=[1, 2], repeats=1, dtype="fp32", device="cuda")
        r = check_fast_path(v, model, cfg, DEV, beam=2, batch=2)
        assert r["logits_rel_err_max"] < 1e-4
        assert r["greedy_token_agreement_with_model"] == 1.0 and r["beam2_sentences_equal_real_input_path"] == 1.0
        assert r["greedy_graph_equals_eager"] and r["beam2_graph_equals_eager"]


@needs_triton
@pytest.mark.parametrize("share,indirect,time_major", [(1, False, True), (1, True, True), (4, False, False)])
def test_decode_attention_reads_only_each_rows_own_length(share, indirect, time_major):
    """Per-row lengths (padded sources; rows at different positions): the kernel equals the torch fallback, and
    both equal attention over each row's own positions alone; what lies past a row's length (huge keys and
    values here, which would dominate if read) is never read."""
    for dt in DTYPES:
        g = torch.Generator().manual_seed(7)
        m, h, kv_heads, dk, slots = 3, 4, 2, 16, 40
        n = m * share
        lens = torch.tensor([1, 17, 40], dtype=torch.int32)
        q = torch.randn(n, h, dk, generator=g).to(DEV, dt)
        rows = n if indirect else m
        kv = torch.randn(slots, rows, kv_heads, 2 * dk, generator=g)
        if not indirect:   # garbage past each row's length
            for r in range(m):
                kv[int(lens[r]):, r] = 1e4
        kv = kv.to(DEV, dt)
        anc = torch.randint(0, n, (slots, n), generator=g, dtype=torch.int32).to(DEV) if indirect else None
        kv_in = kv if time_major else kv.transpose(0, 1).contiguous()
        want = fd.decode_attention(q, kv_in, slots, dk, share, dk ** -0.5, anc, time_major, use_triton=False,
                                   lens_M=lens.to(DEV))
        got = fd.decode_attention(q, kv_in, slots, dk, share, dk ** -0.5, anc, time_major, use_triton=True,
                                  lens_M=lens.to(DEV))
        torch.testing.assert_close(got.float(), want.float(), atol=TOL[dt] * 2, rtol=TOL[dt] * 2)
        for r in range(m):   # each row alone at its own static length
            sl = slice(r * share, (r + 1) * share)
            L = int(lens[r])
            one = fd.decode_attention(q[sl], (kv_in[:, r: r + 1] if time_major else kv_in[r: r + 1]) if not indirect
                                      else kv_in, L, dk, share, dk ** -0.5,
                                      anc[:, sl] if indirect else None, time_major, use_triton=False)
            torch.testing.assert_close(want[sl].float(), one.float(), atol=TOL[dt] * 2, rtol=TOL[dt] * 2)


@needs_triton
def test_embed_layernorm_per_row_positions_and_argmax_limits():
    for dt in DTYPES:
        g, d, emb, pos, tok, norm = _embed_inputs(8, dt)
        at = torch.tensor([0, 6, 2, 2, 5], device=DEV)
        with torch.no_grad():
            x, h = fd.embed_layernorm(tok, emb, pos, 9.8, norm, pos_N=at)
            want_x = torch.add(pos[at], emb[tok], alpha=9.8)
        torch.testing.assert_close(x.float(), want_x.float(), atol=TOL[dt] * 10, rtol=TOL[dt])
        torch.testing.assert_close(h.float(), norm(want_x).float(), atol=TOL[dt] * 4, rtol=TOL[dt] * 4)
        logits = torch.randn(4, 64, generator=g).to(DEV, dt)
        logits[0, 0] = logits[1, 2] = logits[2, 60] = 100.0    # PAD, BOS, past the limit of 50
        a, b = torch.empty(4, dtype=torch.long, device=DEV), torch.empty(4, dtype=torch.long, device=DEV)
        fd.argmax_into(logits, a, b, limit=50)
        want = fd.forbid_specials(logits.clone(), 50).argmax(-1)
        assert torch.equal(a, want) and torch.equal(b, want) and int(a.max()) < 50
        assert not ({int(a[0]), int(a[1])} & {0, 2})


@needs_triton
def test_beam_candidates_kernel_matches_log_softmax_topk():
    """Each row's best continuations: the kernel's ids and log-probabilities are torch's (fp32: the same ids;
    bf16, where rounded log-probabilities tie often: the same values, at ids of the same logits), PAD, BOS
    and ids past the limit excluded, rows of several blocks, the best in the ragged tail."""
    for dt in DTYPES:
        g = torch.Generator().manual_seed(13)
        for n, v, w, limit in ((5, 300, 8, 290), (4, 9000, 6, 8500), (3, 5000, 2, None)):
            x = (torch.randn(n, v, generator=g) * 3).to(DEV, dt)
            x[0, 0] = x[1, 2] = 100.0                     # PAD and BOS: never
            x[2, v - 1] = 90.0                            # past the limit (where there is one), or in the tail
            lp, tok = fd.beam_candidates(x.clone(), w, limit)
            want_lp, want_tok = fd.beam_candidates(x.clone(), w, limit, use_triton=False)
            assert lp.dtype == torch.float32 and tok.shape == (n, w)
            torch.testing.assert_close(lp, want_lp, atol=TOL[dt] * 2, rtol=TOL[dt])
            if dt == torch.float32:
                assert torch.equal(tok, want_tok)
            else:
                assert torch.equal(x.gather(1, tok), x.gather(1, want_tok))
            assert not bool(((tok == 0) | (tok == 2)).any())
            assert bool((tok < (limit or v)).all()) and (limit is not None or int(tok[2, 0]) == v - 1)


@needs_triton
@pytest.mark.parametrize("eos", [True, False])
def test_beam_selection_kernel_steps_as_torch_does(eos):
    """Whole beam-search steps, the two kernels against the torch path from the same logits: the same next
    tokens, parents, history and finished hypotheses at every step (EOS frequent, sentences at their length
    limits at different steps), with the step on the device and static (the fixed-length protocol)."""
    from mqa_repro.decode.search import Beam

    for k in (1, 3, 4):
        b, steps = 5, 12
        g = torch.Generator().manual_seed(k)
        limit = torch.randint(2, steps + 1, (b,), generator=g).to(DEV)
        pair = [Beam(b, k, steps, DEV, limit_B=limit.clone() if eos else None, eos=eos, vocab_limit=55,
                     use_triton=use) for use in (True, False)]
        for s in pair:
            s.reset(torch.full((b * k,), 2, device=DEV))
        for t in range(steps):
            logits = torch.randn(b * k, 64, generator=g).to(DEV) * 2
            logits[:, 3] += 1.5   # EOS (id 3) often among the best
            for s in pair:
                s.step(logits.clone(), torch.tensor([t], device=DEV) if eos else t)
            got, want = pair
            for name in ("tok_N", "parent_N", "hist_TN", "parent_TN", "fin_count_B", "done_B"):
                assert torch.equal(getattr(got, name), getattr(want, name)), (k, t, name)
            torch.testing.assert_close(got.scores_BK, want.scores_BK)
            torch.testing.assert_close(got.fin_scores_BK, want.fin_scores_BK)
            fin = torch.isfinite(want.fin_scores_BK)   # unfilled slots' fields are never read
            for name in ("fin_step_BK", "fin_row_BK", "fin_tok_BK"):
                assert torch.equal(getattr(got, name)[fin], getattr(want, name)[fin]), (k, t, name)
        assert pair[0].results() == pair[1].results()


# --------------------------------------------------------------------------------------------------
# GPU only (the lead runs these on an H200): CUDA graphs of real, padded input
# --------------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or fd.triton is None, reason="needs a GPU")


@needs_cuda
@pytest.mark.parametrize("name", ["multi_head", "multi_query", "multi_query_local", "gqa2"])
def test_cuda_graphs_translate_what_eager_translates(name):
    """Padded batches of different source lengths, bucketed rows and lengths, EOS per row, early stop: the
    engine's CUDA graphs (one per shape) decode exactly what the same engine decodes eagerly, greedy and
    beam 4, and the shapes captured stay few."""
    from mqa_repro.bench import build_model
    from mqa_repro.decode import Engine
    from mqa_repro.specfile import load_spec

    v = load_spec(EXPERIMENTS / "tiny.yaml").variants[name]
    model = build_model(v, torch.device("cuda"), "fp32")
    g = torch.Generator().manual_seed(9)
    srcs = [torch.randint(4, 1000, (int(n),), generator=g).tolist() for n in torch.randint(1, 40, (37,), generator=g)]
    eager, graphs = Engine(model, graphs=False), Engine(model, graphs=True)
    assert graphs.graphs
    for beam in (1, 4):
        for forced in (None, [1 + i % 30 for i in range(len(srcs))]):
            want = eager.translate(srcs, beam=beam, batch_tokens=300, forced_lengths=forced)
            got = graphs.translate(srcs, beam=beam, batch_tokens=300, forced_lengths=forced)
            assert got == want, (beam, forced is not None)
    # few shapes: 4 decodes (greedy and beam 4, EOS and forced lengths) of 37 sentences in batches of 300
    # tokens; 12 were captured on an H200 (the bound was 8 while the engine kept at most 8 workspaces)
    assert len(graphs._work) <= 16
    assert graphs.cold_captures > 0   # shapes after the first of a kind were captured without a warm-up step


@needs_cuda
@pytest.mark.parametrize("name", ["multi_head", "multi_query_local"])
def test_cuda_graphs_of_compacted_batches_decode_what_eager_decodes(name, monkeypatch):
    """Batches moved mid-decode to their unfinished sentences (graphs captured mid-decode over the first rows
    of the batch's memory, kept for the next batch) decode exactly what the eager engine decodes."""
    from mqa_repro.bench import build_model
    from mqa_repro.decode import Engine
    from mqa_repro.decode import engine as engine_mod
    from mqa_repro.specfile import load_spec

    monkeypatch.setattr(engine_mod, "COMPACT_MIN_ROWS", 4)
    monkeypatch.setattr(engine_mod, "compaction_pays", lambda *a: True)   # this tiny model's never would
    moves = []
    compact = engine_mod.Engine._compact
    monkeypatch.setattr(engine_mod.Engine, "_compact", lambda self, w, *a: moves.append(1) or compact(self, w, *a))
    v = load_spec(EXPERIMENTS / "tiny.yaml").variants[name]
    model = build_model(v, torch.device("cuda"), "fp32")
    g = torch.Generator().manual_seed(12)
    srcs = [torch.randint(4, 1000, (int(n),), generator=g).tolist() for n in torch.randint(1, 40, (70,), generator=g)]
    eager, graphs = Engine(model, graphs=False), Engine(model, graphs=True)
    for beam in (1, 4):
        forced = [1 + (7 * i) % 40 for i in range(len(srcs))]
        want = eager.translate(srcs, beam=beam, batch_tokens=2000, forced_lengths=forced)
        for _ in range(2):   # the second pass replays the kept graphs
            assert graphs.translate(srcs, beam=beam, batch_tokens=2000, forced_lengths=forced) == want, beam
    assert moves and graphs.cold_captures > 0   # mid-decode captures without a warm-up step among them


@needs_cuda
def test_cuda_graphs_generate_what_eager_generates():
    from mqa_repro.bench import build_model
    from mqa_repro.decode import Engine
    from mqa_repro.specfile import load_spec

    v = load_spec(EXPERIMENTS / "tiny.yaml").variants["multi_query_local"]
    v = v.__class__.from_dict({**v.to_dict(), "model": {**v.to_dict()["model"], "kind": "decoder-only",
                                                         "encoder_layers": 0}})
    model = build_model(v, torch.device("cuda"), "fp32")
    g = torch.Generator().manual_seed(10)
    prompts = [torch.randint(4, 1000, (int(n),), generator=g).tolist() for n in torch.randint(0, 30, (19,), generator=g)]
    for beam in (1, 4):
        want = Engine(model, graphs=False).generate(prompts, beam=beam, max_new_tokens=20)
        assert Engine(model, graphs=True).generate(prompts, beam=beam, max_new_tokens=20) == want


@needs_cuda
def test_kernels_at_bucketed_padded_lengths_in_bf16():
    """The shapes graphs use: rows and lengths rounded up to buckets, per-row lengths far below the bucket."""
    g = torch.Generator().manual_seed(11)
    for n, slots in ((8, 16), (64, 128), (256, 320)):
        q = torch.randn(n, 8, 128, generator=g).to("cuda", torch.bfloat16)
        kv = torch.randn(slots, n, 1, 256, generator=g).to("cuda", torch.bfloat16)
        lens = torch.randint(1, slots + 1, (n,), generator=g, dtype=torch.int32).cuda()
        want = fd.decode_attention(q, kv, slots, 128, 1, 128 ** -0.5, None, True, use_triton=False, lens_M=lens)
        got = fd.decode_attention(q, kv, slots, 128, 1, 128 ** -0.5, None, True, use_triton=True, tune=True,
                                  lens_M=lens)
        torch.testing.assert_close(got.float(), want.float(), atol=4e-2, rtol=4e-2)
