"""Evaluation of a trained tiny model on real Multi30k: BLEU equals sacrebleu's own score recomputed from
the saved hypothesis and reference files, perplexity and provenance are recorded, LMs get per-word
perplexity, and bad run directories are one line."""
import json
import math
import shutil
import subprocess
import sys

import pytest

from mqa_repro.errors import UserError
from mqa_repro.evaluate import evaluate_run

from .conftest import ROOT, write_tiny_lm_spec


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mqa_repro", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


@pytest.fixture(scope="session")
def tiny_eval(tiny_run):
    r = cli("evaluate", str(tiny_run.run_dir), "--device", "cpu", "--format", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_bleu_equals_sacrebleu_on_the_saved_files(tiny_eval, tiny_run):
    rows = {(b["split"], b["beam"], b["tokenizer"]): b for b in tiny_eval["bleu"]}
    # dev greedy, each test set with beam 1 and 4, each with intl and 13a.
    assert set(rows) == {(s, k, t) for s, k in [("valid", 1), ("test2016", 1), ("test2016", 4)]
                         for t in ("intl", "13a")}
    for (split, beam, tok), b in rows.items():
        hyp, ref = tiny_run.run_dir / b["hyp_file"], tiny_run.run_dir / b["ref_file"]
        assert hyp.name == f"hyp.{split}.beam{beam}.txt"
        assert len(hyp.read_text(encoding="utf-8").splitlines()) == b["sentences"] == 200  # max_sentences
        assert f"tok:{tok}" in b["signature"] and "version:" in b["signature"]
        r = subprocess.run([sys.executable, "-m", "sacrebleu", str(ref), "-i", str(hyp), "-tok", tok, "-b", "-w", "6"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert float(r.stdout.strip()) == pytest.approx(b["score"], abs=1e-5)
    # The model learned something: BLEU clearly above zero.
    assert rows[("test2016", 4, "intl")]["score"] > 2.0


def test_metrics_and_manifest(tiny_eval, tiny_run):
    m = json.loads((tiny_run.run_dir / "metrics.json").read_text())
    assert m["checkpoint_step"] == 300 and m["seed"] == 0
    dev = m["perplexity"]["valid"]
    assert dev["role"] == "dev" and 0 < dev["ln_ppl_per_subword"] < 5
    assert math.isclose(dev["ppl_per_subword"], math.exp(dev["ln_ppl_per_subword"]))
    man = json.loads((tiny_run.run_dir / "manifest.json").read_text())
    assert man["evaluation"]["checkpoint_step"] == 300
    for k in ("git_sha", "spec_hash", "versions", "device", "seed", "data_manifest_hash"):
        assert k in man["evaluation"], k
    assert man["spec"]["variant"] == "multi_head" and man["spec_hash"] == m["spec_hash"]


def test_beam_and_split_options(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run)
    m = evaluate_run(run, splits=["test"], beams=[1], batch_size=64, device="cpu", progress=False)
    assert list(m["perplexity"]) == ["test2016"]
    assert {(b["split"], b["beam"]) for b in m["bleu"]} == {("test2016", 1)}
    # Batching does not change greedy hypotheses.
    assert (run / "hyp.test2016.beam1.txt").read_text() == (tiny_run.run_dir / "hyp.test2016.beam1.txt").read_text()


def test_bad_run_directories(tiny_run, tmp_path):
    with pytest.raises(UserError, match="no manifest.json"):
        evaluate_run(tmp_path, device="cpu")
    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run)
    man = json.loads((run / "manifest.json").read_text())
    # A checkpoint that is not there.
    (run / "manifest.json").write_text(json.dumps({**man, "checkpoint": str(tmp_path / "gone.pt")}))
    r = cli("evaluate", str(run), "--device", "cpu")
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "checkpoint" in lines[0] and "missing" in lines[0], r.stderr
    # --checkpoint naming a file that is not there: said of --checkpoint, not of the run
    (run / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(UserError, match=r"--checkpoint .*gone2.pt: no such file"):
        evaluate_run(run, device="cpu", checkpoint=tmp_path / "gone2.pt")
    # a beam the vocabulary cannot feed: refused before any perplexity is computed
    with pytest.raises(UserError, match="too large for this model"):
        evaluate_run(run, splits=["test"], beams=[1, 10_000], device="cpu", progress=False)
    # A spec that does not match the checkpoint.
    (run / "manifest.json").write_text(json.dumps({**man, "spec_hash": "0" * 64}))
    with pytest.raises(UserError, match="does not match the checkpoint"):
        evaluate_run(run, device="cpu")
    # JSON that is not an object: one sentence from evaluate and from uptrain alike (was an AttributeError)
    from mqa_repro.uptrain import uptrain_run

    (run / "manifest.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="holds a JSON list, not a run's manifest"):
        evaluate_run(run, device="cpu")
    with pytest.raises(UserError, match="holds a JSON list, not a run's manifest"):
        uptrain_run(run, 1, steps=2, device="cpu")


def test_language_model_perplexity_per_subword_and_per_word(shared_data, tmp_path):
    """A tiny decoder-only model on the German side of Multi30k: per-word perplexity is the same total
    log-likelihood spread over whitespace words (+ EOS per sentence)."""
    spec = write_tiny_lm_spec(tmp_path, 20)
    data = tmp_path / "data"
    r = cli("prepare", str(spec), "--data-dir", str(shared_data), "--out", str(data))
    assert r.returncode == 0, r.stderr
    r = cli("train", str(spec), "--device", "cpu", "--data", str(data), "--out", str(tmp_path / "results"),
            "--checkpoints", str(tmp_path / "ck"))
    assert r.returncode == 0, r.stderr
    m = evaluate_run(tmp_path / "results" / "tiny_lm" / "multi_query" / "seed0", device="cpu", progress=False)
    assert m["bleu"] == []
    for stem in ("valid", "test2016"):
        p = m["perplexity"][stem]
        assert p["words"] < p["subword_tokens"]
        assert p["ln_ppl_per_word"] * p["words"] == pytest.approx(p["ln_ppl_per_subword"] * p["subword_tokens"])
        assert p["ppl_per_word"] > p["ppl_per_subword"]


def check_engine_equals_reference_path(checkpoint, data, n=40) -> None:
    """evaluate's decoding (the engine) against the eager reference path on a trained checkpoint."""
    import torch

    from mqa_repro.evaluate import translate
    from mqa_repro.model import EOS, PAD
    from mqa_repro.batching import load_examples, open_prepared
    from mqa_repro.checkpoint import load_checkpoint, model_from_checkpoint

    from .oracle import beam_search, greedy, strip

    variant, model = model_from_checkpoint(load_checkpoint(checkpoint), "cpu")
    ev = variant.evaluation
    ex = load_examples(open_prepared(variant, data), variant, variant.data.test[0], n)
    src = torch.full((len(ex), max(map(len, ex.src)) + 1), PAD)
    for i, s in enumerate(ex.src):
        src[i, : len(s)] = torch.as_tensor(s)
        src[i, len(s)] = EOS
    from mqa_repro.decode import max_lengths

    lim = max_lengths((src != PAD).sum(1), ev.max_len_a, ev.max_len_b, min(ev.max_len_cap, variant.model.max_positions))
    for beam in (1, 4):
        got = translate(model, ex, ev, beam, 16, "cpu")
        if beam == 1:
            want = strip(*greedy(model, src, max_len_B=lim))
        else:
            tokens, lengths, _ = beam_search(model, src, beam=beam, alpha=ev.length_penalty, max_len_B=lim)
            want = strip(tokens, lengths)
        assert got == want, beam


def test_evaluate_decodes_what_the_reference_path_decodes(tiny_run, tiny_data):
    """On the trained tiny model and real test sentences: the engine's greedy and beam-4 hypotheses equal the
    eager reference path's (model.decode_step + the former decode.py search) token for token."""
    check_engine_equals_reference_path(tiny_run.checkpoint, tiny_data)


def test_the_evaluate_table_says_when_splits_were_cut_and_when_training_is_unfinished(capsys):
    from mqa_repro.console import show_metrics

    m = {"spec": "tiny", "variant": "multi_head", "seed": 0, "checkpoint_step": 30, "bleu": [],
         "perplexity": {"valid": {"ln_ppl_per_subword": 5.85, "subword_tokens": 2900, "sentences": 200}},
         "evaluation_settings": {"max_sentences": 200}}
    show_metrics(m)
    text = " ".join(capsys.readouterr().out.split())
    assert "200 sentences" in text and "evaluation.max_sentences 200: each split's first 200 sentences" in text
    show_metrics({**m, "evaluation_settings": {"max_sentences": None}, "training_steps": 400})
    text = " ".join(capsys.readouterr().out.split())
    assert "max_sentences" not in text and "checkpoint step 30 of 400 (training unfinished" in text
