"""prepare: real corpora -> SentencePiece + token arrays + manifest; no-op re-runs; one-sentence errors;
the datasets-hub path with ``datasets.load_dataset`` replaced by a local stand-in of the same shape."""
import dataclasses
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from mqa_repro.corpora import moses_detokenize
from mqa_repro.data import load_prepared
from mqa_repro.prepare import prepare
from mqa_repro.errors import UserError
from mqa_repro.specfile import load_spec

from .conftest import EXPERIMENTS, ROOT

TINY = EXPERIMENTS / "tiny.yaml"
MULTI30K_SHA = {"train.en": "460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6",
                "valid.de": "660e09eb7e1da2f856ea13ee5ad3cf6d36b3d5b0b733c857e94c5747a3dfc660"}
LM1B_SHARDS = {"news.en.heldout-00000-of-00050": 6075, "news.en.heldout-00010-of-00050": 6111,
               "news.en.heldout-00011-of-00050": 6105, "news.en.heldout-00012-of-00050": 5986,
               "news.en.heldout-00013-of-00050": 6119}


def _spec_file(tmp_path: Path, base: Path, name: str, **data) -> Path:
    """A copy of a shipped spec with a small BPE vocabulary (fast on 2 cores) and data overrides."""
    raw = yaml.safe_load(base.read_text())
    raw["name"] = name
    raw["model"]["vocab_size"] = data.pop("vocab_size", 600)
    raw["data"].update({"spm_model_type": "bpe", **data})
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def _small_multi30k(shared: Path, root: Path, n_train: int = 1500, n_eval: int = 200, gz: bool = False) -> Path:
    """A data directory holding a folder 'm30k': the first lines of the real Multi30k files."""
    d = root / "m30k"
    d.mkdir(parents=True)
    for stem, n in (("train", n_train), ("valid", n_eval), ("test2016", n_eval)):
        for lang in ("en", "de"):
            text = "".join((shared / "multi30k" / f"{stem}.{lang}").read_text(encoding="utf-8")
                           .splitlines(keepends=True)[:n])
            if gz and stem == "train":
                (d / f"{stem}.{lang}.gz").write_bytes(gzip.compress(text.encode()))
            else:
                (d / f"{stem}.{lang}").write_text(text, encoding="utf-8")
    return root


def _no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# --------------------------------------------------------------------------------------------------
# Real corpora end to end
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("prepared") / "tiny"
    return prepare(TINY, data_dir=shared_data, out=out, progress=False)


def test_multi30k_end_to_end(tiny, shared_data):
    assert not tiny.up_to_date
    m = json.loads((tiny.path / "manifest.json").read_text())
    assert {s: v["lines"] for s, v in m["splits"].items()} == {"train": 29000, "valid": 1014, "test2016": 1000}
    assert {s: v["examples"] for s, v in m["splits"].items()} == {"train": 29000, "valid": 1014, "test2016": 1000}
    shas = {Path(r["path"]).name: r["sha256"] for r in m["sources"]}
    assert {k: shas[k] for k in MULTI30K_SHA} == MULTI30K_SHA
    assert m["vocab_size"] == 1000 and m["spm"]["pieces"] == 1000 and m["dtype"] == "uint16"
    assert m["spec"]["data"] == dataclasses.asdict(load_spec(TINY).variants["multi_head"].data)
    assert set(m["versions"]) >= {"python", "torch", "numpy", "sentencepiece"} and m["git_sha"]

    p = load_prepared(tiny.path, variant=load_spec(TINY).variants["multi_query"])
    assert (p.sp.pad_id(), p.sp.unk_id(), p.sp.bos_id(), p.sp.eos_id()) == (0, 1, 2, 3)
    train_en = p.split("train", "en")
    assert len(train_en) == 29000 and train_en.tokens.dtype == np.uint16
    assert train_en.lengths.max() <= m["max_ids"] == 47
    assert not np.isin(np.asarray(train_en.tokens), [0, 2, 3]).any()   # no PAD/BOS/EOS inside examples
    assert m["splits"]["train"]["truncated"] == m["splits"]["train"]["over_max"] > 0
    # raw reference text is the file itself; short lines round-trip through the ids
    ref = (shared_data / "multi30k" / "valid.de").read_text(encoding="utf-8").split("\n")[:-1]
    assert p.text("dev", "de") == p.text("valid", "de") == ref
    short = next(i for i in range(len(ref)) if len(p.split("valid", "de")[i]) < 40)
    assert p.sp.decode(p.split("dev", "de")[short].tolist()) == ref[short]


def test_second_run_is_a_noop_and_says_so(tiny, shared_data):
    before = (tiny.path / "manifest.json").stat().st_mtime_ns
    t = time.perf_counter()
    again = prepare(TINY, data_dir=shared_data, out=tiny.path, progress=False)
    assert again.up_to_date and time.perf_counter() - t < 2.0
    assert (tiny.path / "manifest.json").stat().st_mtime_ns == before
    r = subprocess.run([sys.executable, "-m", "mqa_repro", "prepare", str(TINY), "--data-dir", str(shared_data),
                        "--out", str(tiny.path)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "up to date" in r.stdout and "nothing to do" in r.stdout


def test_lm1b_end_to_end(tmp_path, shared_data):
    spec = _spec_file(tmp_path, EXPERIMENTS / "lm1b_mini.yaml", "lm1b_small", vocab_size=2000)
    r = prepare(spec, data_dir=shared_data, out=tmp_path / "out", progress=False)
    m = r.manifest
    assert m["task"] == "lm" and m["sides"] == ["text"]
    assert {s: v["lines"] for s, v in m["splits"].items()} == LM1B_SHARDS
    assert m["roles"]["dev"] == "news.en.heldout-00013-of-00050"
    assert m["roles"]["test"] == ["news.en.heldout-00000-of-00050"]
    p = load_prepared(r.path)
    assert len(p.split("train", "text")) == 6111 + 6105 + 5986
    assert len(p.text("news.en.heldout-00000-of-00050", "text")) == 6075
    assert prepare(spec, data_dir=shared_data, out=tmp_path / "out", progress=False).up_to_date


def test_wikitext103_splits_long_paragraphs(tmp_path, shared_data):
    spec = _spec_file(tmp_path, EXPERIMENTS / "lm1b_mini.yaml", "wikitext_small", vocab_size=1000,
                      corpus="wikitext103", train=["wiki.train.prefix.tokens"], dev="wiki.valid.tokens",
                      test=["wiki.test.tokens"], too_long="split")
    m = prepare(spec, data_dir=shared_data, out=tmp_path / "out", progress=False).manifest
    train = m["splits"]["wiki.train.prefix.tokens"]
    assert train["lines"] == 9742 and train["blank_dropped"] > 0 and train["split"] > 0
    assert train["examples"] > train["lines"] - train["blank_dropped"]
    assert m["splits"]["wiki.valid.tokens"]["lines"] == 3760 and m["splits"]["wiki.test.tokens"]["lines"] == 4358
    assert train["sides"]["text"]["longest"] <= m["max_ids"]
    for stem in ("wiki.valid.tokens", "wiki.test.tokens"):   # evaluation text is kept whole, one example a line
        s = m["splits"][stem]
        assert s["policy"] == "keep" and s["examples"] == s["lines"] - s["blank_dropped"] and s["over_max"] > 0
        assert s["sides"]["text"]["longest"] > m["max_ids"]


def test_changed_input_prepares_again_and_is_deterministic(tmp_path, shared_data):
    data = _small_multi30k(shared_data, tmp_path / "d", gz=True)   # .gz training files are read too
    spec = _spec_file(tmp_path, TINY, "small", corpus="m30k")
    out = tmp_path / "out"
    first = prepare(spec, data_dir=data, out=out, progress=False).manifest
    assert first["splits"]["train"]["lines"] == 1500
    assert any(r["path"].endswith("train.en.gz") for r in first["sources"])
    again = prepare(spec, data_dir=data, out=out, force=True, progress=False).manifest
    assert again["spm"]["sha256"] == first["spm"]["sha256"]   # same text and seed: same vocabulary
    # a changed source file is noticed
    f = data / "m30k" / "valid.en"
    f.write_text(f.read_text().replace("A ", "One ", 1))
    r = prepare(spec, data_dir=data, out=out, progress=False)
    assert not r.up_to_date and r.manifest["splits"]["valid"]["lines"] == 200
    # so is a changed data section
    spec2 = _spec_file(tmp_path, TINY, "small", corpus="m30k", max_len=32)
    r = prepare(spec2, data_dir=data, out=out, progress=False)
    assert not r.up_to_date and r.manifest["max_ids"] == 31
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]   # no temp folders left


def test_moses_detokenizer_on_the_wmt14_sample(shared_data):
    en = gzip.open(shared_data / "wmt14" / "train.en.gz", "rt", encoding="utf-8").read().split("\n")
    assert moses_detokenize(en[0]).startswith("It is not acceptable that, with the help of the national "
                                              "bureaucracies, Parliament's legislative prerogative")
    assert moses_detokenize(en[2]).startswith('"Two soldiers came up to me')
    assert moses_detokenize("he said ( &quot; no &quot; ) : 10 % , isn &apos;t it ?") == \
        'he said ("no"): 10%, isn\'t it?'
    for line in en[:2000]:
        out = moses_detokenize(line)
        assert "&apos;" not in out and "&quot;" not in out and " ," not in out


# --------------------------------------------------------------------------------------------------
# Bad input: one sentence, nothing half-written
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def small(tmp_path, shared_data):
    data = _small_multi30k(shared_data, tmp_path / "d", n_train=300, n_eval=50)
    return data, data / "m30k", tmp_path / "prepared" / "small"


def _fails(spec, data, out, match: str) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    with pytest.raises(UserError, match=match) as e:
        prepare(spec, data_dir=data, out=out, source="local", progress=False)
    msg = str(e.value)
    assert "\n" not in msg
    _no_leftovers(out)
    return msg


def test_missing_file(tmp_path, small):
    data, corpus, out = small
    (corpus / "test2016.de").unlink()
    msg = _fails(_spec_file(tmp_path, TINY, "s", corpus="m30k"), data, out, "missing corpus file")
    assert str(corpus / "test2016.de") in msg and "data.test" in msg


def test_parallel_files_of_different_length(tmp_path, small):
    data, corpus, out = small
    de = corpus / "valid.de"
    de.write_text("".join(de.read_text().splitlines(keepends=True)[:-1]))
    msg = _fails(_spec_file(tmp_path, TINY, "s", corpus="m30k"), data, out, "differ in length")
    assert f"{corpus / 'valid.en'} has 50 lines but {de} has 49" in msg


def test_invalid_utf8_names_file_and_line(tmp_path, small):
    data, corpus, out = small
    en = corpus / "train.en"
    lines = en.read_bytes().split(b"\n")
    lines[6] = lines[6][:5] + b"\xff\xfe" + lines[6][5:]
    en.write_bytes(b"\n".join(lines))
    _fails(_spec_file(tmp_path, TINY, "s", corpus="m30k"), data, out, f"{en}: line 7 is not valid UTF-8")


def test_empty_split(tmp_path, small):
    data, corpus, out = small
    (corpus / "valid.en").write_text("")
    (corpus / "valid.de").write_text("")
    _fails(_spec_file(tmp_path, TINY, "s", corpus="m30k"), data, out, "dev split 'valid' .* has no usable lines")


def test_a_vocabulary_smaller_than_the_alphabet_is_one_sentence(tmp_path, small):
    """Issue 18.14: SentencePiece's "INTERNAL: trainer_interface.cc" becomes a sentence naming the key."""
    data, _, out = small
    spec = _spec_file(tmp_path, TINY, "s", corpus="m30k", vocab_size=10)
    msg = _fails(spec, data, out, r"model.vocab_size \(10\) is below the \d+ pieces the training text needs")
    assert "INTERNAL" not in msg and "data.spm_character_coverage" in msg


def test_unknown_corpus(tmp_path, small):
    data, _, out = small
    spec = _spec_file(tmp_path, TINY, "s", corpus="multi31k")
    _fails(spec, data, out, "unknown corpus 'multi31k': .* has no folder of that name .*m30k")
    r = subprocess.run([sys.executable, "-m", "mqa_repro", "prepare", str(spec), "--data-dir", str(data),
                        "--out", str(out), "--source", "local"], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "unknown corpus" in lines[0], r.stderr


def test_a_failed_prepare_keeps_the_previous_output(tmp_path, small):
    data, corpus, out = small
    spec = _spec_file(tmp_path, TINY, "s", corpus="m30k")
    prepare(spec, data_dir=data, out=out, progress=False)
    before = (out / "manifest.json").read_text()
    (corpus / "train.de").write_text("")
    with pytest.raises(UserError, match="differ in length"):
        prepare(spec, data_dir=data, out=out, progress=False)
    assert (out / "manifest.json").read_text() == before
    assert not [p for p in out.parent.iterdir() if p.name != out.name]


def test_variants_must_share_the_data_section(tmp_path, small):
    data, _, out = small
    raw = yaml.safe_load(TINY.read_text())
    raw["variants"]["gqa2"] = {"model": {"n_kv_heads": 2, "d_ff": "match", "vocab_size": 2000}}
    spec = tmp_path / "mixed.yaml"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    _fails(spec, data, out, "variants 'multi_head' and 'gqa2' differ in model.vocab_size")


# --------------------------------------------------------------------------------------------------
# The datasets hub, with load_dataset replaced by a local stand-in of the hub's structure
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_hub(monkeypatch, shared_data):
    import datasets

    calls = []

    def lines(path, n):
        return path.read_text(encoding="utf-8").split("\n")[:n]

    def load_dataset(path, name=None, **kw):
        calls.append((path, name))
        m = shared_data / "multi30k"
        if path == "bentrevett/multi30k":      # flat records {"en": ..., "de": ...}
            return datasets.DatasetDict({hub: datasets.Dataset.from_dict(
                {"en": lines(m / f"{stem}.en", n), "de": lines(m / f"{stem}.de", n)})
                for hub, stem, n in (("train", "train", 1500), ("validation", "valid", 200),
                                     ("test", "test2016", 200))})
        if path == "wmt14":                    # {"translation": {"de": ..., "en": ...}}
            w = shared_data / "wmt14"
            def pairs(en, de):
                return datasets.Dataset.from_dict({"translation": [{"de": d, "en": e} for e, d in zip(en, de)]})
            train_en = gzip.open(w / "train.en.gz", "rt", encoding="utf-8").read().split("\n")[:1000]
            train_de = gzip.open(w / "train.de.gz", "rt", encoding="utf-8").read().split("\n")[:1000]
            return datasets.DatasetDict({
                "train": pairs(train_en, train_de),
                "validation": pairs(lines(w / "newstest2013.en", 300), lines(w / "newstest2013.de", 300)),
                "test": pairs(lines(w / "newstest2014.en", 300), lines(w / "newstest2014.de", 300))})
        if path == "lm1b":                     # {"text": ...}
            lm = shared_data / "lm1b"
            return datasets.DatasetDict({
                "train": datasets.Dataset.from_dict({"text": lines(lm / "news.en.heldout-00010-of-00050", 3000)}),
                "test": datasets.Dataset.from_dict({"text": lines(lm / "news.en.heldout-00000-of-00050", 500)})})
        raise FileNotFoundError(f"Dataset '{path}' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_multi30k_matches_the_local_copy(tmp_path, shared_data, fake_hub):
    data = _small_multi30k(shared_data, tmp_path / "d")
    spec = _spec_file(tmp_path, TINY, "small", corpus="m30k")
    local = prepare(spec, data_dir=data, out=tmp_path / "local", progress=False)
    hub = prepare(spec, out=tmp_path / "hub", source="hub", progress=False)
    assert fake_hub == [("bentrevett/multi30k", None)]
    assert hub.manifest["source"]["kind"] == "hub" and local.manifest["source"]["kind"] == "local"
    assert {s: v["lines"] for s, v in hub.manifest["splits"].items()} == {"train": 1500, "valid": 200,
                                                                          "test2016": 200}
    assert hub.manifest["spm"]["sha256"] == local.manifest["spm"]["sha256"]
    a, b = load_prepared(local.path), load_prepared(hub.path)
    assert np.array_equal(a.split("train", "de").tokens, b.split("train", "de").tokens)
    assert a.text("valid", "en") == b.text("valid", "en")
    assert prepare(spec, out=tmp_path / "hub", source="hub", progress=False).up_to_date


def test_auto_uses_the_hub_only_when_no_local_folder_exists(tmp_path, fake_hub, monkeypatch):
    """Issue 18.13: a configured data folder without the corpus is an error naming it (no silent download);
    with no local folder at all (the default ../shared/data missing) the hub is used and a note says why;
    a failed hub attempt leaves no empty data/ behind."""
    spec = _spec_file(tmp_path, EXPERIMENTS / "wmt14_ende.yaml", "wmt_small", vocab_size=1000, max_len=128)
    empty = tmp_path / "no_corpora"
    empty.mkdir()
    with pytest.raises(UserError, match=f"unknown corpus 'wmt14': the data folder {empty} \\(from --data-dir\\) "
                                        f"has no folder .*pass --source hub"):
        prepare(spec, data_dir=empty, out=tmp_path / "out", progress=False)
    monkeypatch.setenv("MQA_REPRO_DATA", str(empty))
    with pytest.raises(UserError, match=r"\(from \$MQA_REPRO_DATA\)"):
        prepare(spec, out=tmp_path / "out", progress=False)
    monkeypatch.setenv("MQA_REPRO_DATA", str(tmp_path / "gone"))
    with pytest.raises(UserError, match=f"data directory {tmp_path / 'gone'} \\(from \\$MQA_REPRO_DATA\\) does not"):
        prepare(spec, out=tmp_path / "out", progress=False)
    assert fake_hub == [] and not (tmp_path / "out").exists()
    # nothing configured and no ../shared/data beside the current folder: the hub, said in one note
    monkeypatch.delenv("MQA_REPRO_DATA")
    cwd = tmp_path / "elsewhere" / "deeper"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    r = prepare(spec, out=tmp_path / "out", progress=False)
    assert fake_hub == [("wmt14", "de-en")]
    assert len(r.notes) == 1 and "../shared/data" in r.notes[0] and "datasets hub (wmt14)" in r.notes[0]
    m = r.manifest
    assert {s: v["lines"] for s, v in m["splits"].items()} == {"train": 1000, "newstest2013": 300,
                                                               "newstest2014": 300}
    assert m["roles"] == {"train": ["train"], "dev": "newstest2013", "test": ["newstest2014"]}
    # the hub failing: one sentence that says why the hub was tried, and no empty data/ folder left
    raw = yaml.safe_load(spec.read_text())
    raw["data"]["hub"]["path"] = "nobody/nothing"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(UserError, match="the hub was tried because there is no local data folder"):
        prepare(spec, progress=False)    # default output: data/<spec name> under the current folder
    assert list(cwd.iterdir()) == []


def test_hub_lm1b_uses_the_hub_stems(tmp_path, fake_hub):
    spec = _spec_file(tmp_path, EXPERIMENTS / "lm1b_mini.yaml", "lm_small", vocab_size=800)
    m = prepare(spec, out=tmp_path / "out", source="hub", progress=False).manifest
    assert fake_hub == [("lm1b", None)]
    assert m["roles"] == {"train": ["train"], "dev": "test", "test": ["test"]}
    assert m["splits"]["train"]["lines"] == 3000 and m["splits"]["test"]["lines"] == 500
    p = load_prepared(tmp_path / "out")
    assert len(p.split("train", "text")) == 3000 and len(p.split("dev", "text")) == 500


def test_hub_errors_are_one_sentence(tmp_path, fake_hub):
    raw = yaml.safe_load(TINY.read_text())
    raw["data"]["hub"]["path"] = "nobody/nothing"
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(UserError, match="could not load 'nobody/nothing' from the datasets hub: Dataset"):
        prepare(spec, out=tmp_path / "out", source="hub", progress=False)
    raw["data"]["hub"] = None
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(UserError, match="--source hub needs a data.hub section"):
        prepare(spec, out=tmp_path / "out", source="hub", progress=False)
