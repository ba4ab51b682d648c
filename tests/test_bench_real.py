"""decode-bench --real on real Multi30k sentences (CPU, fp32, tiny models): forced reference lengths with
random weights, EOS with a trained checkpoint, rates that add up, the roofline of the work done reducing
to Table 2's at equal lengths, CTranslate2 beside it, and the CLI's JSON with provenance."""
import json
import subprocess
import sys

import numpy as np
import pytest

from mqa_repro import roofline as rl
from mqa_repro.bench import load_checkpoint as bench_checkpoint
from mqa_repro.bench_real import RealConfig, batches_by_source, load_sentences, run_real_bench, sentence_bound
from mqa_repro.specfile import load_spec

from .conftest import ROOT, TINY

CEIL = rl.Ceilings(device="test", dtype="bf16", bandwidth_Bps=3e12, peak_flops=500e12)


def test_bound_of_equal_lengths_is_table_2s():
    m = load_spec(ROOT / "experiments" / "wmt14_ende.yaml").variants["multi_query"].model
    b, s, t = 16, 40, 30
    for beam in (1, 4):
        got = sentence_bound(m, [list(range(b))], np.full(b, s), np.full(b, t), beam, "bf16", CEIL)
        assert got["encoder_s"] == pytest.approx(rl.bound_seconds(rl.encoder_cost(m, b, s, "bf16"), CEIL))
        assert got["decoder_s"] == pytest.approx(rl.bound_seconds(rl.decode_costs(m, b, s, t, beam, "bf16"), CEIL))
    # A row that finishes early costs less than one that runs to the end.
    steps = np.full(b, t)
    steps[:8] = 5
    short = sentence_bound(m, [list(range(b))], np.full(b, s), steps, 1, "bf16", CEIL)
    assert short["decoder_s"] < got["decoder_s"]


def test_batches_cover_every_sentence_once_sorted_by_length():
    src = [[1] * n for n in (5, 3, 9, 3, 1, 7, 2)]
    runs = batches_by_source(src, 3)
    assert [len(r) for r in runs] == [3, 3, 1]
    assert sorted(i for r in runs for i in r) == list(range(7))
    lens = [len(src[i]) for r in runs for i in r]
    assert lens == sorted(lens)


def _check_rows(res, n):
    for r in res["rows"]:
        assert r["sentences"] == n
        assert r["sentences_per_s"] * r["median_s"] == pytest.approx(n)
        assert r["us_per_token"] == pytest.approx(r["median_s"] * 1e6 / r["target_tokens"])
        assert r["encoder_us_per_token"] + r["decoder_us_per_token"] == pytest.approx(r["us_per_token"], rel=1e-6)
        assert r["bound_us_per_token"] > 0 and r["x_bound"] > 0


def test_random_weights_force_reference_lengths_with_ct2(tiny_data):
    v = load_spec(TINY).variants["multi_query"]
    cfg = RealConfig(device="cpu", dtype="fp32", beams=[1, 2], batches=[8], repeats=1, max_sentences=20,
                     peer_threads=1)
    res = run_real_bench([v], cfg, None, "ct2", data=tiny_data, spec_path=str(TINY), log=lambda msg: None)
    sents = load_sentences(v, tiny_data, None, 20)
    assert res["test_set"]["stem"] == "test2016" and res["test_set"]["sentences"] == 20
    assert {(r["beam"], r["batch_sentences"]) for r in res["rows"]} == {(1, 8), (2, 8)}
    for r in res["rows"]:
        assert r["forced_lengths"] and r["forced_equals_reference"]
        assert r["target_tokens"] == int((sents.ref_len + 1).sum())
    _check_rows(res, 20)
    peers = res["peers"]
    assert {(p["mqa_form"], p["beam"]) for p in peers} == {(f, b) for f in ("one_head", "replicated") for b in (1, 2)}
    for p in peers:
        assert p["target_tokens"] == res["rows"][0]["target_tokens"] and p["ours_over_ct2_tokens_per_s"] > 0
        assert "forced" in p["method"] and p["device"] == "cpu" and p["compute_type"] == "float32"
    assert res["provenance"]["git_sha"] and res["ceilings"]["device"]


def test_trained_checkpoint_decodes_to_eos_like_ct2(tiny_run, tiny_data):
    spec = load_spec(TINY)
    v, state = bench_checkpoint(tiny_run.checkpoint, [spec.variants["multi_head"]])
    cfg = RealConfig(device="cpu", dtype="fp32", beams=[1], batches=[16], repeats=1, max_sentences=32,
                     peer_threads=1)
    res = run_real_bench([v], cfg, state, "ct2", data=tiny_data, spec_path=str(TINY), log=lambda msg: None)
    (row,) = res["rows"]
    assert not row["forced_lengths"] and res["weights"] == "trained checkpoint"
    _check_rows(res, 32)
    (peer,) = res["peers"]
    assert peer["mqa_form"] is None and peer["identical_translations"] >= 0.9


def test_cli_real_json(tiny_data, tmp_path):
    out = tmp_path / "real.json"
    r = subprocess.run([sys.executable, "-m", "mqa_repro", "decode-bench", str(TINY), "--real", "--variant",
                        "multi_head", "--device", "cpu", "--data", str(tiny_data), "--max-sentences", "12",
                        "--sentences-per-batch", "6", "--beam", "1", "--repeats", "1", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "tgt tok/s" in r.stdout
    doc = json.loads(out.read_text())
    assert doc["kind"] == "decode-bench-real" and doc["schema_version"] == 1 and doc["complete"] is True
    assert doc["spec_hashes"]["multi_head"] and doc["config"]["batches"] == [6]
    bad = subprocess.run([sys.executable, "-m", "mqa_repro", "decode-bench", str(TINY), "--real", "--device", "cpu",
                          "--data", str(tmp_path / "none")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "no prepared data" in bad.stderr and "Traceback" not in bad.stderr


def test_finished_rows_are_on_disk_when_a_later_row_fails(tiny_data, tmp_path, monkeypatch):
    """The document is written after every finished row (ours and the peer's): a run stopped by a later row
    keeps the earlier ones, with provenance; each row is logged with its wall seconds as it finishes."""
    import re

    from mqa_repro import bench_real

    out = tmp_path / "real.json"
    calls = []
    real_time_ours = bench_real.time_ours

    def second_row_fails(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            assert out.exists(), "the first row must be on disk before the second starts"
            raise RuntimeError("stopped by a time limit")
        return real_time_ours(*a, **k)

    monkeypatch.setattr(bench_real, "time_ours", second_row_fails)
    v = load_spec(TINY).variants["multi_head"]
    cfg = RealConfig(device="cpu", dtype="fp32", beams=[1], batches=[6, 3], repeats=1, max_sentences=6,
                     peer_threads=1)
    lines = []
    with pytest.raises(RuntimeError, match="time limit"):
        run_real_bench([v], cfg, None, "ct2", data=tiny_data, spec_path=str(TINY), log=lines.append, out_file=out)
    doc = json.loads(out.read_text())
    assert doc["kind"] == "decode-bench-real" and doc["schema_version"] == 1 and doc["complete"] is False
    assert doc["provenance"]["git_sha"] and doc["spec_hashes"]["multi_head"]
    assert [(r["beam"], r["batch_sentences"]) for r in doc["rows"]] == [(1, 6)]
    assert [(p["beam"], p["batch_sentences"]) for p in doc["peers"]] == [(1, 6)]
    (row,), (peer,) = doc["rows"], doc["peers"]
    assert 0 < row["first_pass_wall_s"] and 0 < row["repeats_wall_s"] <= row["row_wall_s"]
    assert peer["convert_load_wall_s"] > 0 and peer["runs_wall_s"] > 0
    done = [s for s in lines if " done in " in s]
    assert len(done) == 2 and all(re.search(r"done in \d+\.\d s wall", s) for s in done)
    assert any(re.search(r"first pass with graph captures \d+\.\d s", s) for s in done)
    assert any(re.search(r"converted and loaded in \d+\.\d s", s) for s in lines)
