"""Perplexity per word of a language model covers the same text as its loss (issue 18, item 3): evaluation
text is never truncated, long lines are scored in pieces, and their count is in metrics.json. Real LM1B
lines with a tiny max length, so that nearly every line is longer than one piece."""
import pytest
import yaml

from mqa_repro.data import load_prepared
from mqa_repro.prepare import prepare
from mqa_repro.evaluate import evaluate_run
from mqa_repro.specfile import load_spec
from mqa_repro.train import train_variant

from .conftest import TINY

LM1B = {"train": ("news.en.heldout-00010-of-00050", 2000), "dev": ("news.en.heldout-00013-of-00050", 60),
        "test": ("news.en.heldout-00000-of-00050", 60)}


@pytest.mark.parametrize("too_long", ["truncate", "split"])
def test_per_word_perplexity_covers_the_scored_text(tmp_path, shared_data, too_long):
    corpus = tmp_path / "corpora" / "lm"
    corpus.mkdir(parents=True)
    for role, (name, n) in LM1B.items():
        lines = (shared_data / "lm1b" / name).read_text(encoding="utf-8").split("\n")[:n]
        (corpus / role).write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    raw = yaml.safe_load(TINY.read_text())
    raw.update(name="lm_pieces", variants={"multi_query": {"model": {"n_kv_heads": 1}}})
    raw["model"].update(kind="decoder-only", encoder_layers=0, vocab_size=500)
    raw["data"].update(corpus="lm", src_lang=None, tgt_lang=None, file_pattern="{stem}", hub=None, train=["train"],
                       dev="dev", test=["test"], max_len=12, too_long=too_long)
    raw["training"].update(steps=3, warmup_steps=1, eval_every=3, checkpoint_every=3, log_every=3)
    spec = tmp_path / "lm_pieces.yaml"
    spec.write_text(yaml.safe_dump(raw))
    data = tmp_path / "data"
    prepare(spec, data_dir=tmp_path / "corpora", out=data, progress=False)
    v = load_spec(spec).variants["multi_query"]
    run = train_variant(v, 0, device="cpu", out_root=tmp_path / "results", checkpoint_root=tmp_path / "ck",
                        data=data, progress=False).run_dir
    m = evaluate_run(run, device="cpu", progress=False)
    p = load_prepared(data)
    for stem in ("dev", "test"):
        ppl = m["perplexity"][stem]
        lines = p.text(stem, "text")
        ids = p.sp.encode(lines)
        assert ppl["sentences"] == len(lines) == 60
        # the loss covers every subword of every line (+ one EOS per line), the word count the same lines
        assert ppl["subword_tokens"] == sum(map(len, ids)) + len(lines)
        assert ppl["words"] == sum(len(x.split()) + 1 for x in lines) <= ppl["subword_tokens"]
        assert ppl["lines_scored_in_pieces"] == sum(len(x) > 11 for x in ids) > 40
        assert ppl["nll_nats"] == pytest.approx(ppl["ln_ppl_per_subword"] * ppl["subword_tokens"])
        assert ppl["nll_nats"] == pytest.approx(ppl["ln_ppl_per_word"] * ppl["words"])
        # more subwords than words: a per-word perplexity below the per-subword one is impossible
        assert ppl["ln_ppl_per_word"] >= ppl["ln_ppl_per_subword"]
