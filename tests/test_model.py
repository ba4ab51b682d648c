"""Invariants of the one attention module and of incremental decoding, for every kind of row."""
import dataclasses

import pytest
import torch

from mqa_repro.decode import forbid_specials, max_lengths
from mqa_repro.model import BOS, EOS, PAD, Attention, Transformer, self_mask
from mqa_repro.spec import ModelSpec

from .oracle import beam_search, greedy

ROWS = {  # every kind of row of the tables, at toy size
    "multi_head": dict(n_heads=4, n_kv_heads=4, d_k=8, d_v=8),
    "multi_query": dict(n_heads=4, n_kv_heads=1, d_k=8, d_v=8),
    "grouped": dict(n_heads=4, n_kv_heads=2, d_k=8, d_v=8),
    "fewer_heads": dict(n_heads=1, n_kv_heads=1, d_k=8, d_v=8),
    "small_dk": dict(n_heads=4, n_kv_heads=4, d_k=2, d_v=2),
    "d_k_ne_d_v": dict(n_heads=4, n_kv_heads=2, d_k=6, d_v=10),
    "local": dict(n_heads=4, n_kv_heads=4, d_k=8, d_v=8, window=3),
    "multi_query_local": dict(n_heads=4, n_kv_heads=1, d_k=8, d_v=8, window=3),
}
KINDS = ["encoder-decoder", "decoder-only"]


def limits_for(src, batch=4):
    """min(30, 1.5 * source length + 3) per sentence (30 without a source)."""
    if src is None:
        return torch.full((batch,), 30, dtype=torch.long)
    return max_lengths((src != PAD).sum(1), 1.5, 3, 30)


def make(row, kind="encoder-decoder", seed=0):
    torch.manual_seed(seed)
    spec = ModelSpec(kind=kind, encoder_layers=2 if kind == "encoder-decoder" else 0, decoder_layers=2,
                     d_model=32, d_ff=48, vocab_size=60, vocab_multiple=8, max_positions=40, **ROWS[row])
    m = Transformer(spec).double().eval()
    with torch.no_grad():  # make EOS likely so rows stop at different steps
        m.embed.weight[EOS] *= 2.5
    return m


def source(batch=4, length=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 60, (batch, length), generator=g)
    src[1, 4:] = PAD
    src[3, 2:] = PAD
    return src


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("row", ROWS)
def test_cached_decoding_equals_recomputing_the_prefix(row, kind):
    m = make(row, kind)
    src = source() if kind == "encoder-decoder" else None
    b, steps = 4, 12
    state = m.start_decoding(b, steps, src_BS=src)
    tokens = torch.full((b, 1), BOS)
    worst = 0.0
    for t in range(steps):
        cached = m.decode_step(tokens[:, -1], t, state)
        full = m(tokens, src)[:, -1]
        worst = max(worst, (cached - full).abs().max().item())
        nxt = forbid_specials(cached.clone()).argmax(-1, keepdim=True)
        assert torch.equal(nxt, forbid_specials(full.clone()).argmax(-1, keepdim=True))
        tokens = torch.cat([tokens, nxt], 1)
    assert worst < 1e-5
    # and in float32, the tolerance the issue names
    m32 = m.float()
    state = m32.start_decoding(b, steps, src_BS=src)
    for t in range(steps):
        cached = m32.decode_step(tokens[:, t], t, state)
        full = m32(tokens[:, : t + 1], src)[:, -1]
        assert (cached - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("row", ROWS)
def test_greedy_search_equals_uncached_greedy(row):
    m = make(row)
    src = source()
    limits = limits_for(src)
    out, lengths = greedy(m, src, max_len_B=limits)
    for i in range(4):  # one sentence at a time, recomputing everything each step
        toks = torch.tensor([[BOS]])
        for _ in range(int(limits[i])):
            logits = m(toks, src[i: i + 1, : int((src[i] != PAD).sum())])[:, -1]
            nxt = forbid_specials(logits, 60).argmax(-1, keepdim=True)
            toks = torch.cat([toks, nxt], 1)
            if nxt.item() == EOS:
                break
        ref = toks[0, 1:]
        assert int(lengths[i]) == len(ref)
        assert torch.equal(out[i, : len(ref)], ref)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("row", ROWS)
def test_beam_size_one_is_greedy(row, kind):
    m = make(row, kind)
    src = source() if kind == "encoder-decoder" else None
    limits = limits_for(src)
    g, gl = greedy(m, src, batch=4, max_len_B=limits)
    b, bl, _ = beam_search(m, src, batch=4, beam=1, max_len_B=limits)
    assert torch.equal(gl, bl) and torch.equal(g, b)


def sequence_logprob(m, src_row, hyp):
    toks = torch.cat([torch.tensor([BOS]), hyp])[None]
    logits = m(toks[:, :-1], src_row[None])[0]
    logp = torch.log_softmax(forbid_specials(logits, 60), -1)
    return logp.gather(1, hyp[:, None]).sum().item()


@pytest.mark.parametrize("row", ["multi_head", "multi_query", "multi_query_local"])
def test_beam_search_scores_are_the_model_scores(row):
    """Beam 4's reported score is the length-normalised log-probability of the sequence it returns,
    and no worse than greedy's under the same normalisation."""
    m = make(row)
    src = source()
    limits = limits_for(src)
    toks, lengths, scores = beam_search(m, src, beam=4, alpha=0.6, max_len_B=limits)
    g, gl = greedy(m, src, max_len_B=limits)
    for i in range(4):
        real = src[i, : int((src[i] != PAD).sum())]
        hyp = toks[i, : int(lengths[i])]
        lp = ((5 + len(hyp)) / 6) ** 0.6
        assert abs(sequence_logprob(m, real, hyp) / lp - scores[i].item()) < 1e-5  # search scores in fp32
        gh = g[i, : int(gl[i])]
        g_score = sequence_logprob(m, real, gh) / (((5 + len(gh)) / 6) ** 0.6)
        assert scores[i].item() >= g_score - 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_padded_vocabulary_rows_are_never_generated(kind):
    """The vocabulary is padded to a multiple of 8 (60 -> 64 rows); training never targets the padding,
    so decoding must not emit it even when its (untrained) logits are the largest."""
    m = make("multi_head", kind)
    assert m.spec.padded_vocab == 64
    step = m.decode_step

    def padding_wins(*args, **kw):   # the padded rows' logits far above every real token's
        logits = step(*args, **kw).clone()
        logits[:, 60:] += 1e4
        return logits

    m.decode_step = padding_wins
    src = source() if kind == "encoder-decoder" else None
    limits = limits_for(src)
    g, gl = greedy(m, src, batch=4, max_len_B=limits)
    b, bl, _ = beam_search(m, src, batch=4, beam=4, max_len_B=limits)
    assert int(g.max()) < 60 and int(b.max()) < 60 and int(gl.min()) > 0


def test_beams_share_the_encoder_decoder_cache():
    m = make("multi_query")
    src = source()
    state = m.start_decoding(4, 10, beam=4, src_BS=src)
    assert state.cross_BSGC[0].shape[0] == 4              # one per sentence, not per beam
    assert state.self_TNGC[0].shape[1:3] == (16, 1)       # [slots, batch * beam, n_kv_heads, d_k + d_v]
    assert state.src_len_B.tolist() == (src != PAD).sum(1).tolist()


def test_local_cache_is_a_ring_buffer_of_window_slots():
    m = make("local", "decoder-only")
    state = m.start_decoding(2, 30)
    assert state.slots == 3 and state.self_TNGC[0].shape[0] == 3


def test_cache_refuses_positions_beyond_its_length():
    m = make("multi_head", "decoder-only")
    state = m.start_decoding(1, 2)
    m.decode_step(torch.tensor([BOS]), 0, state)
    m.decode_step(torch.tensor([BOS]), 1, state)
    with pytest.raises(IndexError, match="beyond the cache"):
        m.decode_step(torch.tensor([BOS]), 2, state)


@pytest.mark.parametrize("g", [1, 2, 4])
def test_local_attention_equals_full_attention_with_a_band_mask(g):
    torch.manual_seed(0)
    attn = Attention(16, 4, g, 4, 4, window=3).double().eval()
    x = torch.randn(2, 9, 16, dtype=torch.double)
    seg = torch.ones(2, 9, dtype=torch.long)
    banded = attn(x, mask_B1TS=self_mask(seg, causal=True, window=3))
    # explicit band: position i sees i-2 .. i
    i = torch.arange(9)
    band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 3)
    explicit = attn(x, mask_B1TS=band[None, None].expand(2, 1, 9, 9))
    assert torch.allclose(banded, explicit, atol=1e-12)
    # and it differs from full causal attention once the window matters
    full = attn(x, mask_B1TS=self_mask(seg, causal=True))
    assert torch.allclose(banded[:, :3], full[:, :3], atol=1e-12)
    assert not torch.allclose(banded[:, 3:], full[:, 3:])


def test_grouped_attention_equals_repeated_kv_reference():
    """The module's attention equals textbook attention with K/V heads repeated to every query head."""
    torch.manual_seed(0)
    attn = Attention(16, 4, 2, 4, 6).double().eval()
    x = torch.randn(2, 5, 16, dtype=torch.double)
    q = attn.q_proj(x).view(2, 5, 4, 4).transpose(1, 2)
    k = attn.k_proj(x).view(2, 5, 2, 4).transpose(1, 2).repeat_interleave(2, dim=1)
    v = attn.v_proj(x).view(2, 5, 2, 6).transpose(1, 2).repeat_interleave(2, dim=1)
    ref = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v
    ref = attn.o_proj(ref.transpose(1, 2).reshape(2, 5, 24))
    assert torch.allclose(attn(x), ref, atol=1e-12)


def test_packed_examples_do_not_see_each_other():
    m = make("multi_query", "decoder-only")
    a = torch.tensor([BOS, 10, 11, 12])
    b = torch.tensor([BOS, 20, 21])
    packed = torch.cat([a, b])[None]
    seg = torch.tensor([[1, 1, 1, 1, 2, 2, 2]])
    out = m(packed, tgt_seg_BT=seg)
    assert torch.allclose(out[0, :4], m(a[None])[0], atol=1e-10)
    assert torch.allclose(out[0, 4:], m(b[None])[0], atol=1e-10)


@pytest.mark.parametrize("row", list(ROWS))
@pytest.mark.parametrize("kind", KINDS)
def test_derived_quantities_of_the_spec_are_what_the_model_holds(row, kind):
    """ModelSpec's derived quantities (one definition each) match the modules and the caches they build."""
    m = make(row, kind)
    spec = m.spec
    assert spec.is_seq2seq == (kind == "encoder-decoder") == hasattr(m, "encoder")
    assert spec.n_params == sum(p.numel() for p in m.parameters())
    a = m.decoder[0].self_attn
    assert spec.attention_weights == {"q": a.q_proj.weight.numel(),
                                      "kv": a.k_proj.weight.numel() + a.v_proj.weight.numel(),
                                      "o": a.o_proj.weight.numel()}
    assert spec.group_size == a.group_size == spec.n_heads // spec.n_kv_heads
    for length in (1, 2, 3, 5, 40):
        cache = m.start_decoding(4, length, beam=1, src_BS=source() if spec.is_seq2seq else None)
        assert cache.slots == spec.cache_slots(length) <= length
        assert cache.self_TNGC[0][0, 0].numel() == spec.kv_values_per_position     # one slot of one row
        assert (cache.cross_BSGC is not None) == spec.is_seq2seq
        if cache.cross_BSGC is not None:
            assert cache.cross_BSGC[0][0, 0].numel() == spec.kv_values_per_position
    if spec.window:
        assert spec.cache_slots(40) == spec.window
