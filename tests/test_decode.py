"""The decoding engine (mqa_repro.decode.Engine) against its oracle, the eager reference path
(``Transformer.decode_step`` + the search of tests/oracle.py), token for token in fp32 on the CPU, on real
Multi30k sentences in padded batches: multi-head, multi-query, grouped-query and local attention,
encoder-decoder and decoder-only, greedy and beam 4. And the engine's own invariants: beam 1 is greedy,
early stopping, bucketing and batch size change nothing, forced lengths are honoured, the vocabulary limit,
PAD and BOS are never emitted.

Models have random weights with EOS made likely (rows stop at different steps); sentences are real Multi30k
lines whose words are mapped to ids by a hash (their real lengths and repetitions, no tokenizer needed)."""
import zlib

import pytest
import torch

from mqa_repro.decode import Engine, max_lengths
from mqa_repro.errors import UserError
from mqa_repro.model import BOS, EOS, PAD, Transformer
from mqa_repro.spec import ModelSpec

from .oracle import beam_search, greedy, strip

VOCAB = 60
ROWS = {
    "multi_head": dict(n_heads=4, n_kv_heads=4),
    "multi_query": dict(n_heads=4, n_kv_heads=1),
    "grouped": dict(n_heads=4, n_kv_heads=2),
    "local": dict(n_heads=4, n_kv_heads=1, window=4),
}
LIMITS = dict(max_len_a=1.0, max_len_b=3, max_len_cap=16)


def make(row: str, kind: str = "encoder-decoder", seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    spec = ModelSpec(kind=kind, encoder_layers=1 if kind == "encoder-decoder" else 0, decoder_layers=2, d_model=32,
                     d_ff=48, vocab_size=VOCAB, vocab_multiple=8, max_positions=40, d_k=16, d_v=16, **ROWS[row])
    m = Transformer(spec).eval()
    with torch.no_grad():  # make EOS likely so rows stop at different steps
        m.embed.weight[EOS] *= 2.5
    return m


@pytest.fixture(scope="module")
def sentences(shared_data) -> list:
    """12 real English Multi30k lines (3 to 20 words), words hashed to ids 4 .. VOCAB-1."""
    lines = (shared_data / "multi30k" / "valid.en").read_text(encoding="utf-8").splitlines()
    out = []
    for line in lines:
        words = line.split()
        if 3 <= len(words) <= 20:
            out.append([4 + zlib.crc32(w.lower().encode()) % (VOCAB - 4) for w in words])
        if len(out) == 12:
            break
    return out


def oracle_translate(m, srcs, beam):
    src = torch.full((len(srcs), max(map(len, srcs)) + 1), PAD)
    for i, s in enumerate(srcs):
        src[i, : len(s)] = torch.tensor(s)
        src[i, len(s)] = EOS
    lim = max_lengths((src != PAD).sum(1), LIMITS["max_len_a"], LIMITS["max_len_b"], LIMITS["max_len_cap"])
    if beam == 1:
        return strip(*greedy(m, src, max_len_B=lim))
    tokens, lengths, _ = beam_search(m, src, beam=beam, alpha=0.6, max_len_B=lim)
    return strip(tokens, lengths)


def oracle_generate(m, prompts, beam, max_new):
    out = []
    for p in prompts:   # one prompt at a time: no padding in the oracle at all
        lim = torch.tensor([min(max_new, m.spec.max_positions - len(p))])
        if beam == 1:
            out += strip(*greedy(m, None, batch=1, max_len_B=lim, prompt=p))
        else:
            tokens, lengths, _ = beam_search(m, None, batch=1, beam=beam, max_len_B=lim, prompt=p)
            out += strip(tokens, lengths)
    return out


@pytest.mark.parametrize("row", ROWS)
def test_translate_equals_the_reference_path(row, sentences):
    m = make(row)
    eng = Engine(m)
    for beam in (1, 4):
        got = eng.translate(sentences, beam=beam, batch_tokens=80, **LIMITS)   # several padded batches
        assert got == oracle_translate(m, sentences, beam), beam
        assert len({len(x) for x in got}) > 1   # rows really stopped at different steps


@pytest.mark.parametrize("row", ROWS)
def test_generate_equals_the_reference_path(row, sentences):
    m = make(row, "decoder-only")
    eng = Engine(m)
    prompts = [s[: len(s) // 2] for s in sentences[:6]] + [[]]   # prompts of different lengths, one empty
    for beam in (1, 4):
        got = eng.generate(prompts, beam=beam, max_new_tokens=10, batch_tokens=40)
        assert got == oracle_generate(m, prompts, beam, 10), beam


@pytest.mark.parametrize("row", ROWS)
def test_compacting_a_batch_to_its_unfinished_sentences_changes_nothing(row, sentences, monkeypatch):
    """Checked every step and compacting batches of any size: the unfinished sentences move into smaller
    workspaces mid-decode (cache, ancestor table, encoder-decoder K/V, search state), and every output is
    still the oracle's; forced lengths too."""
    from mqa_repro.decode import engine as engine_mod

    monkeypatch.setattr(engine_mod, "CHECK_EVERY", 1)
    monkeypatch.setattr(engine_mod, "COMPACT_MIN_ROWS", 2)
    m, lm = make(row), make(row, "decoder-only")
    prompts = [s[: len(s) // 2] for s in sentences[:6]] + [[]]
    n_translate = n_generate = 0
    for beam in (1, 4):
        e, g = Engine(m), Engine(lm)
        assert e.translate(sentences, beam=beam, **LIMITS) == oracle_translate(m, sentences, beam), beam
        assert g.generate(prompts, beam=beam, max_new_tokens=10) == oracle_generate(lm, prompts, beam, 10)
        n_translate += e.compactions
        n_generate += g.compactions
    forced = [1 + i % 7 for i in range(len(sentences))]
    for beam in (1, 4):
        got = Engine(m).translate(sentences, beam=beam, forced_lengths=forced, **LIMITS)
        assert [len(x) for x in got] == forced
        g = Engine(lm)
        got = g.generate(prompts, beam=beam, forced_lengths=forced[:len(prompts)])
        assert [len(x) for x in got] == forced[:len(prompts)]
        n_generate += g.compactions
    assert n_translate and n_generate      # both paths really moved sentences


@pytest.mark.parametrize("row", ["multi_head", "local"])
def test_graph_mode_bookkeeping_with_compaction_equals_the_oracle(row, sentences, monkeypatch):
    """What the GPU path adds around its CUDA graphs, run eagerly on the CPU: rows and lengths rounded up to
    buckets (spare rows done at once), workspaces kept per shape and reused by the next batch and the next
    call, compacted workspaces kept with their batch's and reused: still the oracle's output."""
    from mqa_repro.decode import engine as engine_mod

    monkeypatch.setattr(engine_mod, "CHECK_EVERY", 1)
    monkeypatch.setattr(engine_mod, "COMPACT_MIN_ROWS", 2)
    monkeypatch.setattr(engine_mod.Engine, "_capture", lambda self, w: None)   # a step then runs eagerly
    monkeypatch.setattr(engine_mod, "compaction_pays", lambda *a: True)      # no capture is timed here
    monkeypatch.setattr(engine_mod.Engine, "_evict", lambda self, positions: None)
    m = make(row)
    eng = Engine(m)
    eng.graphs = True
    for beam in (1, 4):
        want = oracle_translate(m, sentences, beam)
        for _ in range(2):
            assert eng.translate(sentences, beam=beam, batch_tokens=80, **LIMITS) == want, beam
    assert any(w.children for w in eng._work.values())


def test_a_gpu_batch_compacts_only_where_the_step_time_saved_beats_a_graph_capture():
    from mqa_repro.decode.engine import compaction_pays

    assert not compaction_pays(40, 2e-4, 0.015)     # a host-bound small model: at most 4 ms saved, 15 ms spent
    assert compaction_pays(100, 3e-3, 0.03)          # the paper-size model: 150 ms saved at most, 30 ms spent
    assert not compaction_pays(100, None, 0.03) and not compaction_pays(100, 3e-3, None)   # not yet timed


def test_beam_one_is_greedy_and_batching_and_early_stop_change_nothing(sentences, monkeypatch):
    from mqa_repro.decode import engine as engine_mod
    from mqa_repro.decode.search import Beam

    m = make("multi_head")   # (this one stops some sentences early, some at their limit)
    ref = Engine(m).translate(sentences, beam=1, **LIMITS)
    assert Engine(m).translate(sentences, beam=1, batch_tokens=1, **LIMITS) == ref      # one sentence per batch
    # beam search with k = 1 (2 candidates, finishing rules) where greedy would run
    monkeypatch.setattr(engine_mod, "Greedy", lambda rows, steps, dev, limit_N, eos, vocab_limit, tune:
                        Beam(rows, 1, steps, dev, limit_B=limit_N, eos=eos, vocab_limit=vocab_limit))
    assert Engine(m).translate(sentences, beam=1, batch_tokens=40, **LIMITS) == ref
    monkeypatch.undo()
    monkeypatch.setattr(engine_mod, "CHECK_EVERY", 10 ** 6)    # never stop early: every batch runs to its limit
    late = Engine(m)
    assert late.translate(sentences, beam=1, batch_tokens=1, **LIMITS) == ref
    late_steps = late.steps_run
    beams = late.translate(sentences, beam=4, **LIMITS)
    monkeypatch.setattr(engine_mod, "CHECK_EVERY", 1)
    early = Engine(m)
    assert early.translate(sentences, beam=1, batch_tokens=1, **LIMITS) == ref
    # one sentence per batch, checked every step: each batch ran exactly until its EOS (or its limit)
    limits = max_lengths(torch.tensor([len(s) + 1 for s in sentences]), LIMITS["max_len_a"], LIMITS["max_len_b"],
                         LIMITS["max_len_cap"]).tolist()
    assert early.steps_run == sum(min(len(x) + 1, n) for x, n in zip(ref, limits)) < late_steps == sum(limits)
    assert early.translate(sentences, beam=4, **LIMITS) == beams


def test_forced_lengths_vocab_limit_and_specials(sentences):
    m = make("grouped")
    with torch.no_grad():   # PAD, BOS and the padded vocabulary rows would win if they were allowed
        m.embed.weight[PAD] *= 4
        m.embed.weight[BOS] *= 4
        m.embed.weight[VOCAB:] = m.embed.weight[EOS] * 3
    forced = [3 + i % 5 for i in range(len(sentences))]
    for beam in (1, 4):
        got = Engine(m).translate(sentences, beam=beam, forced_lengths=forced)
        assert [len(x) for x in got] == forced                  # EOS ignored: exactly the forced length
        assert all(t not in (PAD, BOS) and t < VOCAB for x in got for t in x)
        limited = Engine(m, vocab_limit=20).translate(sentences, beam=beam, **LIMITS)
        assert all(t < 20 and t not in (PAD, BOS) for x in limited for t in x)
    with pytest.raises(ValueError, match="vocab_limit"):
        Engine(m, vocab_limit=10 ** 6)


def test_user_mistakes_are_one_sentence(sentences):
    m = make("multi_head")
    with pytest.raises(UserError, match="max_positions"):
        Engine(m).translate([list(range(4, 44))])
    with pytest.raises(UserError, match="generate"):
        Engine(m).generate([[5, 6]])
    with pytest.raises(UserError, match="forced_lengths"):
        Engine(m).translate(sentences[:2], forced_lengths=[3])
    lm = make("multi_head", "decoder-only")
    with pytest.raises(UserError, match="translate"):
        Engine(lm).translate([[5, 6]])
    with pytest.raises(UserError, match="beam size"):
        Engine(m).translate(sentences[:2], beam=0)
    assert Engine(m).translate([]) == []
