"""Numbers that must not go wrong silently (issue 18, items 1, 2 and 4), on real Multi30k:

1. a line ends at '\\n' and nowhere else, for every reader and writer (prepare, evaluate, report, sacrebleu's CLI);
2. with data.spm_hard_vocab_limit: false the vocabulary may be short, and no id without a piece is emitted;
4. the SentencePiece model does not depend on the CPU count, every manifest names it, the report never compares
   runs of different prepared data, and ln(PPL) per word sits beside ln(PPL) per subword.
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mqa_repro import textio
from mqa_repro.batching import load_examples
from mqa_repro.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from mqa_repro.data import load_prepared
from mqa_repro.prepare import prepare
from mqa_repro.evaluate import bleu_scores, evaluate_run, translate
from mqa_repro.report import build_tables, collect
from mqa_repro.tables import MISSING
from mqa_repro.specfile import load_spec

from .conftest import ROOT, TINY

# Every character str.splitlines breaks a line at, '\n' aside (and '\r\n', which holds one).
SEPARATORS = ["\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
N_EVAL = 20


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mqa_repro", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def test_splitlines_knows_no_other_separators():
    """The list above is complete: any other character keeps a line whole under str.splitlines."""
    breaks = {chr(c) for c in range(0x110000) if len(f"a{chr(c)}b".splitlines()) > 1}
    assert breaks == set(SEPARATORS) | {"\n"}


@pytest.mark.parametrize("sep", SEPARATORS)
def test_textio_keeps_every_separator_inside_its_line(tmp_path, sep):
    lines = [f"vor{sep}nach", f"ende{sep}", sep, "", "letzte"]
    f = tmp_path / "x.txt"
    textio.write_lines(f, lines)
    assert f.read_bytes() == "".join(x + "\n" for x in lines).encode()
    assert textio.read_lines(f) == lines
    f.write_bytes(f.read_bytes()[:-1])     # no final '\n': the same lines
    assert textio.read_lines(f) == lines
    with pytest.raises(ValueError, match="two lines"):
        textio.write_lines(f, ["a\nb"])


# --------------------------------------------------------------------------------------------------
# One small corpus, two barely trained rows: a reference with every separator, a vocabulary too large
# --------------------------------------------------------------------------------------------------
def _corpus(shared: Path, root: Path) -> tuple:
    """300 real training pairs; dev and test of N_EVAL real pairs, where the German test references (and a few
    English sources) hold every separator of SEPARATORS, inside a line and at its end."""
    d = root / "m30k"
    d.mkdir(parents=True)
    for stem, n in (("train", 300), ("valid", N_EVAL), ("test2016", N_EVAL)):
        for lang in ("en", "de"):
            lines = (shared / "multi30k" / f"{stem}.{lang}").read_text(encoding="utf-8").split("\n")[:n]
            if stem == "test2016":
                for i, sep in enumerate(SEPARATORS):
                    if lang == "de" or i % 3 == 0:
                        w = lines[i].split(" ")
                        lines[i] = " ".join(w[:2]) + sep + " ".join(w[2:])
                        lines[i + len(SEPARATORS)] += sep
            (d / f"{stem}.{lang}").write_bytes("".join(x + "\n" for x in lines).encode())
    # what the references are: the file's '\n'-separated lines; a '\r' right before '\n' is a Windows line end
    refs = [r.removesuffix("\r") for r in (d / "test2016.de").read_bytes().decode().split("\n")[:-1]]
    return root, refs


@pytest.fixture(scope="module")
def small(tmp_path_factory, shared_data):
    tmp = tmp_path_factory.mktemp("sep")
    data_dir, refs = _corpus(shared_data, tmp / "corpora")
    raw = yaml.safe_load(TINY.read_text())
    raw["name"] = "sep"
    raw["model"]["vocab_size"] = 8000      # far more than 300 pairs support
    raw["data"].update(corpus="m30k", spm_model_type="unigram", spm_hard_vocab_limit=False, hub=None)
    raw["training"].update(steps=6, warmup_steps=2, eval_every=6, checkpoint_every=6, log_every=3)
    raw["evaluation"].update(beams=[1, 2], max_len_a=1.0, max_len_b=4, max_sentences=N_EVAL)   # short hypotheses: fast
    raw["variants"] = {"multi_head": {}, "multi_query": {"model": {"n_kv_heads": 1, "d_ff": "match"}}}
    spec = tmp / "sep.yaml"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    data = tmp / "data"
    prep = cli("prepare", str(spec), "--data-dir", str(data_dir), "--out", str(data))
    assert prep.returncode == 0, prep.stderr
    results = tmp / "results"
    r = cli("train", str(spec), "--all", "--device", "cpu", "--data", str(data), "--out", str(results),
            "--checkpoints", str(tmp / "ck"))
    assert r.returncode == 0, r.stderr
    evals = {}
    for v in ("multi_head", "multi_query"):
        r = cli("evaluate", str(results / "sep" / v / "seed0"), "--device", "cpu", "--format", "json")
        assert r.returncode == 0, r.stderr   # before: IndexError: piece id is out of range, no metrics
        evals[v] = json.loads(r.stdout)
    return {"spec": spec, "data": data, "results": results, "refs": refs, "prepare_stderr": prep.stderr,
            "evals": evals}


def test_every_separator_stays_inside_its_reference_line(small):
    refs = small["refs"]
    assert len(refs) == N_EVAL and sum(any(s in r for s in SEPARATORS) for r in refs) == 2 * len(SEPARATORS) - 1
    p = load_prepared(small["data"])
    assert p.text("test2016", "de") == refs                        # prepare -> prepared text
    run = small["results"] / "sep" / "multi_head" / "seed0"
    assert textio.read_lines(run / "ref.test2016.txt") == refs     # -> the reference file evaluate wrote
    for b in small["evals"]["multi_head"]["bleu"]:
        hyp, ref = run / b["hyp_file"], run / b["ref_file"]
        assert len(textio.read_lines(hyp)) == b["sentences"] == N_EVAL
        # the command the tool documents for reproduction gives the same number
        r = subprocess.run([sys.executable, "-m", "sacrebleu", str(ref), "-i", str(hyp), "-tok", b["tokenizer"],
                            "-b", "-w", "6"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and float(r.stdout) == pytest.approx(b["score"], abs=1e-5), r.stderr


@pytest.mark.parametrize("tok", ["intl", "13a"])
def test_bleu_of_lines_with_separators_equals_sacrebleu_cli(small, tmp_path, tok):
    """A non-trivial score (the barely trained models score ~0): the references against themselves with
    words dropped, scored by evaluate's function on the lists and by sacrebleu's CLI on the written files."""
    refs = small["refs"]
    hyps = [" ".join(r.split(" ")[: max(1, len(r.split(" ")) * 2 // 3)]) for r in refs]
    ours = bleu_scores(hyps, refs, [tok])[tok]["score"]
    textio.write_lines(tmp_path / "ref.txt", refs)
    textio.write_lines(tmp_path / "hyp.txt", hyps)
    r = subprocess.run([sys.executable, "-m", "sacrebleu", str(tmp_path / "ref.txt"), "-i", str(tmp_path / "hyp.txt"),
                        "-tok", tok, "-b", "-w", "6"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert 20 < ours < 100 and float(r.stdout) == pytest.approx(ours, abs=1e-5)


def test_report_p_value_is_computed_with_separators(small):
    t1 = next(t for t in build_tables(collect(small["results"]), bootstrap_samples=50) if t.key == "table1_sep")
    row = next(r for r in t1.rows if r["variant"] == "multi_query")
    p = row["p_test2016_b2"]
    assert p is not None and p != MISSING and 0 <= p <= 1       # before: '–' (references split at separators)


def test_short_vocabulary_is_reported_and_never_decoded_beyond(small, tmp_path):
    m = json.loads((small["data"] / "manifest.json").read_text())
    pieces = m["spm"]["pieces"]
    assert pieces < 8000 and m["spm"]["vocab_short_by"] == 8000 - pieces
    assert any(f"{pieces} pieces" in w for w in m["warnings"])
    assert f"warning: SentencePiece learned {pieces} pieces, fewer than model.vocab_size 8000" in small["prepare_stderr"]
    # evaluate wrote its metrics (before: IndexError after perplexity) and no search emits an id without a piece
    for v in ("multi_head", "multi_query"):
        run = small["results"] / "sep" / v / "seed0"
        assert len(json.loads((run / "metrics.json").read_text())["bleu"]) == 2 * 3
    # An untrained row (an id without a piece) that outscores every real one, as happens with a model
    # trained longer on a short vocabulary: copy the output row of the id greedy decoding picks most and
    # scale it by 3. Decoding must still never emit that id, and evaluate must write its metrics.
    run = tmp_path / "run"
    shutil.copytree(small["results"] / "sep" / "multi_head" / "seed0", run)
    ck = load_checkpoint(json.loads((run / "manifest.json").read_text())["checkpoint"])
    variant, model = model_from_checkpoint(ck, "cpu")
    p = load_prepared(small["data"])
    assert p.piece_count == pieces
    ex = load_examples(p, variant, "test2016")
    dev = model.embed.weight.device
    common = np.bincount(np.concatenate([x for x in translate(model, ex, variant.evaluation, 1, 16, dev)])).argmax()
    rogue = pieces + 5
    w = model.embed.weight if model.unembed is None else model.unembed.weight
    with torch.no_grad():
        w[rogue] = 3 * w[int(common)]
    unlimited = translate(model, ex, variant.evaluation, 1, 16, dev)
    assert rogue in {i for x in unlimited for i in x}            # the row would be emitted without the limit
    ids = translate(model, ex, variant.evaluation, 1, 16, dev, vocab_limit=pieces)
    assert max(max(x, default=0) for x in ids) < pieces
    ck["model"] = model.state_dict()
    save_checkpoint(tmp_path / "rogue.pt", ck)
    # greedy and beam 2 through evaluate: an id without a piece would stop it (IndexError) before metrics
    met = evaluate_run(run, splits=["test"], checkpoint=tmp_path / "rogue.pt", device="cpu", progress=False)
    assert len(met["bleu"]) == 2 * 2 and (run / "metrics.json").is_file()


def test_spm_model_does_not_depend_on_the_cpu_count(tmp_path, shared_data, monkeypatch):
    raw = yaml.safe_load(TINY.read_text())
    raw["name"] = "threads"
    raw["model"]["vocab_size"] = 1000
    raw["data"].update(corpus="m30k", train=["train"], dev="valid", test=["test2016"], hub=None)
    spec = tmp_path / "threads.yaml"
    spec.write_text(yaml.safe_dump(raw))
    data_dir, _ = _corpus(shared_data, tmp_path / "corpora")
    for f in ("train.en", "train.de"):   # 3000 lines: enough text for the thread count to change the pieces
        lines = (shared_data / "multi30k" / f).read_text(encoding="utf-8").split("\n")[:3000]
        (data_dir / "m30k" / f).write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    models, manifests = [], []
    for cpus in (1, 8):
        monkeypatch.setattr(os, "cpu_count", lambda cpus=cpus: cpus)
        r = prepare(spec, data_dir=data_dir, out=tmp_path / f"out{cpus}", progress=False)
        models.append((r.path / "spm.model").read_bytes())
        manifests.append(r.manifest)
    assert models[0] == models[1]      # before: SentencePiece trained on os.cpu_count() threads, other pieces
    for man in manifests:
        assert man["spm"]["sentencepiece_version"] == __import__("sentencepiece").__version__
        assert man["spm"]["sha256"] == __import__("hashlib").sha256(models[0]).hexdigest()


def test_manifests_name_the_tokenizer_and_report_keeps_prepared_data_apart(small, tmp_path):
    m = json.loads((small["data"] / "manifest.json").read_text())
    sha, ver = m["spm"]["sha256"], m["spm"]["sentencepiece_version"]
    root = tmp_path / "results"
    shutil.copytree(small["results"], root)
    for v in ("multi_head", "multi_query"):
        man = json.loads((root / "sep" / v / "seed0" / "manifest.json").read_text())
        for rec in (man["tokenizer"], man["evaluation"]["tokenizer"]):     # train's and evaluate's record
            assert rec["spm_sha256"] == sha and rec["sentencepiece_version"] == ver
    col = collect(root)
    t1 = next(t for t in build_tables(col, bootstrap_samples=0) if t.key == "table1_sep")
    assert f"SentencePiece {ver}, model sha256 {sha[:12]}" in t1.caption
    # The new column: ln(PPL) per target word = summed NLL / words, beside ln(PPL) per subword.
    assert ("ln_ppl_word_dev", "ln(PPL) dev per word") in t1.columns
    for row in t1.rows:
        met = json.loads((root / "sep" / row["variant"] / "seed0" / "metrics.json").read_text())
        dev = met["perplexity"]["valid"]
        refs = load_prepared(small["data"]).text("valid", "de")
        words = sum(len(r.split()) + 1 for r in refs)     # less where prepare cut a target: only what is scored
        assert dev["words"] == words if m["splits"]["valid"]["truncated"] == 0 else dev["words"] < words
        assert row["ln_ppl_word_dev"][0] == pytest.approx(dev["nll_nats"] / dev["words"])
        assert dev["nll_nats"] == pytest.approx(dev["ln_ppl_per_subword"] * dev["subword_tokens"])
        assert row["ln_ppl_word_dev"][0] > row["ln_ppl_dev"][0]          # more subwords than words
    # One run re-made from other prepared data (another SentencePiece model): listed apart, never compared.
    mq = root / "sep" / "multi_query" / "seed0" / "manifest.json"
    man = json.loads(mq.read_text())
    man["data_manifest_hash"] = "f" * 64
    man["tokenizer"] = {**man["tokenizer"], "spm_sha256": "e" * 64}
    man["created"] = "2000-01-01T00:00:00+00:00"          # older than the multi-head run
    mq.write_text(json.dumps(man))
    col = collect(root)
    assert list(col.runs["sep"]) == ["multi_head"]
    why = dict(col.excluded)[str(mq.parent)]
    assert "prepared data" in why and "eeeeeeeeeeee" in why and sha[:12] in why
