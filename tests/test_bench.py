"""decode-bench: the roofline arithmetic against hand-counted bytes and FLOPs, the fast decoder against the
model's own decode_step, and the command's JSON / CSV / table output at a tiny shape (no timing asserted)."""
import csv
import io
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from mqa_repro import roofline as rl
from mqa_repro.bench import BenchConfig, check_fast_path
from mqa_repro.spec import ModelSpec
from mqa_repro.specfile import load_spec

from .conftest import EXPERIMENTS, ROOT

# A model small enough to count by hand: d 8, 2 query heads of 4, one K/V head (multi-query), d_ff 16,
# 1 + 1 layers, 16 vocabulary rows.
M = ModelSpec(kind="encoder-decoder", encoder_layers=1, decoder_layers=1, d_model=8, d_ff=16, n_heads=2,
              n_kv_heads=1, d_k=4, d_v=4, vocab_size=16, vocab_multiple=8, max_positions=16)


def test_decoder_step_roofline_by_hand():
    # weights read per step: self Q 64 + K,V 64 + O 64; cross Q 64 + O 64; FFN 256; 3 norms x 16;
    # final norm 16; softmax matrix 128  -> 768 values. Multiplied per row: 768 - 48 - 16 = 704.
    assert rl.decoder_step_weights(M) == 768
    assert rl.decoder_step_matmul_params(M) == 704
    # greedy, batch 3, source 5, target 6, position t = 2, fp32: 8 K/V values per position per row;
    # self: 3 rows x (3 live + 1 written) x 8 x 4 B = 384; cross: 3 sentences x 5 x 8 x 4 = 480
    c = rl.decoder_step_cost(M, batch=3, t=2, src_len=5, tgt_len=6, beam=1, dtype="fp32")
    assert c.kv_bytes == 384 + 480
    assert c.bytes == 768 * 4 + 384 + 480
    # FLOPs per row: 2 x 704 + attention 2 x 2 heads x 8 x (3 self + 5 source) = 1408 + 256
    assert c.flops == 3 * (1408 + 256)
    # beam 2: 6 rows; cross K/V once per sentence; copying the reorder moves 2 x 6 rows x 2 positions x 32 B
    b = rl.decoder_step_cost(M, batch=3, t=2, src_len=5, tgt_len=6, beam=2, dtype="fp32", reorder="copy")
    assert b.kv_bytes == 6 * 4 * 32 + 480 + 768
    assert b.flops == 6 * (1408 + 256)
    # through the ancestor table only int32 indices move: 2 x 6 x 2 x 4 B
    i = rl.decoder_step_cost(M, batch=3, t=2, src_len=5, tgt_len=6, beam=2, dtype="fp32", reorder="indirect")
    assert i.kv_bytes == 6 * 4 * 32 + 480 + 96
    # local attention, window 2, at t = 4: two live positions, not five, and not the padding
    loc = ModelSpec(**{**M.__dict__, "window": 2})
    lc = rl.decoder_step_cost(loc, batch=3, t=4, src_len=5, tgt_len=6, dtype="fp32")
    assert lc.kv_bytes == 3 * 3 * 32 + 480
    assert lc.flops == 3 * (1408 + 2 * 2 * 8 * (2 + 5))
    # bf16 halves every byte; a whole decode sums its steps
    assert rl.decoder_step_cost(M, 3, 2, 5, 6, dtype="bf16").bytes == (768 * 4 + 864) / 2
    assert len(rl.decode_costs(M, 3, 5, 6)) == 6


def test_encoder_and_multi_head_roofline_by_hand():
    # encoder layer: Q 64 + K,V 64 + O 64 + FFN 256 = 448 weights; + decoder cross K/V projection 64
    c = rl.encoder_cost(M, batch=3, src_len=5, dtype="fp32")
    assert c.flops == 2 * 15 * (448 + 64) + 3 * 2 * 2 * 8 * 25
    assert c.bytes == (448 + 2 * 16 + 16 + 64) * 4 + 15 * 8 * 4
    # multi-head (2 K/V heads): the cache per position doubles, the FLOPs do not change
    mh = ModelSpec(**{**M.__dict__, "n_kv_heads": 2})
    a = rl.decoder_step_cost(mh, 3, 2, 5, 6, dtype="fp32")
    assert a.kv_bytes == 2 * (384 + 480)
    assert a.flops - 3 * 2 * 64 == 3 * (1408 + 256)   # + the extra K/V projection weights


def test_bound_and_utilization():
    ceil = rl.Ceilings("test", "bf16", bandwidth_Bps=1e3, peak_flops=1e4)
    costs = [rl.Cost(bytes=2e3, flops=1e4), rl.Cost(bytes=1e3, flops=3e4)]   # 2 s (bytes) + 3 s (FLOPs)
    assert rl.bound_seconds(costs, ceil) == pytest.approx(5.0)
    u = rl.utilization(costs, 10.0, ceil)
    assert u["mbu"] == pytest.approx(0.3) and u["mfu"] == pytest.approx(0.4)


@pytest.mark.parametrize("name,split", [("multi_head", 0), ("multi_query_local", 2), ("gqa2", 1),
                                        ("multi_query", 4)])
def test_fast_decoder_computes_the_models_decode_step(name, split):
    """Every way of computing the residual products (addmm_ into the residual, or 1, 2, 4 K-slices summed
    into it) gives the model's decode_step; the fixed-length protocol decodes what the real-input path does."""
    v = load_spec(EXPERIMENTS / "tiny.yaml").variants[name]
    from mqa_repro.bench import build_model

    model = build_model(v, torch.device("cpu"), "fp32")
    cfg = BenchConfig(batch=2, src_len=6, tgt_len=12, beams=[1, 3], repeats=1, dtype="fp32", device="cpu")
    r = check_fast_path(v, model, cfg, torch.device("cpu"), beam=3, batch=3, split=split)
    assert r["logits_rel_err_max"] < 1e-5
    assert r["greedy_token_agreement_with_model"] == 1.0
    assert r["greedy_sentences_equal_real_input_path"] == 1.0
    assert r["beam3_sentences_equal_real_input_path"] == 1.0


def bench(tmp_path, fmt, out=None, *extra):
    args = [sys.executable, "-m", "mqa_repro", "decode-bench", str(EXPERIMENTS / "tiny.yaml"), "--variant",
            "multi_query", "--device", "cpu", "--dtype", "fp32", "--batch-size", "2", "--src-len", "6",
            "--tgt-len", "5", "--beam", "1", "--beam", "2", "--repeats", "1", "--format", fmt]
    if out:
        args += ["--out", str(out)]
    args += list(extra)
    env = {**os.environ, "MQA_REPRO_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_decode_bench_writes_every_field_and_formats_agree(tmp_path):
    out = tmp_path / "bench.json"
    stdout_json = json.loads(bench(tmp_path, "json", out))
    res = json.loads(out.read_text())
    prov = res["provenance"]
    assert {"git_sha", "versions", "device", "created"} <= set(prov)
    assert res["ceilings"]["bandwidth_Bps"] > 0 and res["ceilings"]["peak_flops"] > 0
    assert res["spec_hashes"]["multi_query"] and res["variants"]["multi_query"]["model"]["n_kv_heads"] == 1
    kinds = [(r["measure"], r["beam"]) for r in res["rows"]]
    assert kinds == [("train", 0), ("encoder", 0), ("decoder", 1), ("decoder", 2)]
    for r in res["rows"]:
        for key in ("us_per_token", "us_per_token_min", "us_per_token_max", "bound_us_per_token", "x_bound",
                    "mbu", "mfu", "bytes", "flops", "median_s", "repeats", "dtype", "batch", "src_len", "tgt_len"):
            assert r[key] is not None, key
        assert r["us_per_token_min"] <= r["us_per_token"] <= r["us_per_token_max"]
    tr = res["rows"][0]   # the step train runs (mqa_repro.step.TrainStep), with its speed and projected wall time
    assert tr["tokens_per_s"] == pytest.approx(tr["tokens"] / tr["median_s"])
    assert tr["projected_train_s"] > 0 and tr["compiled"] is False and tr["label_smoothing"] == 0.1
    dec = {r["beam"]: r for r in res["rows"] if r["measure"] == "decoder"}
    assert dec[1]["kv_cache_bytes"] > 0 and dec[1]["impl"]["cuda_graphs"] is False
    assert dec[2]["us_per_hyp_token"] == pytest.approx(dec[2]["us_per_token"] / 2)
    assert res["checks"]["multi_query"]["logits_rel_err_max"] < 1e-5
    assert stdout_json["rows"][0].keys() == res["rows"][0].keys()
    # the same rows in CSV and in the table (timings differ between runs; the shapes and bounds do not)
    rows = list(csv.DictReader(io.StringIO(bench(tmp_path, "csv", None, "--no-check", "--no-train"))))
    assert [(r["measure"], int(r["beam"])) for r in rows] == kinds[1:]   # --no-train: no training row
    for a, b in zip(rows, res["rows"][1:]):
        assert float(a["bound_us_per_token"]) == pytest.approx(b["bound_us_per_token"])
        assert float(a["flops"]) == b["flops"] and int(a["kv_cache_bytes"] or 0) == (b.get("kv_cache_bytes") or 0)
    table = bench(tmp_path, "table", None, "--no-check", "--no-train")
    for r in res["rows"][1:]:
        assert f"{r['bound_us_per_token']:.4g}" in table
    assert "beam 2" in table and "greedy" in table and "encoder" in table


def test_peer_hf_without_transformers_says_so(tmp_path):
    try:
        import transformers  # noqa: F401
        pytest.skip("transformers is installed here")
    except ImportError:
        pass
    r = subprocess.run([sys.executable, "-m", "mqa_repro", "decode-bench", str(EXPERIMENTS / "tiny.yaml"),
                        "--device", "cpu", "--peer", "hf"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "transformers" in r.stderr and "Traceback" not in r.stderr


def test_peer_hf_compares_only_what_marian_can_be():
    """The peer is a full-attention multi-head Marian model: multi-query and local rows are skipped, saying
    why, before transformers is even needed."""
    from mqa_repro.peers import hf_peer

    spec = load_spec(EXPERIMENTS / "tiny.yaml")
    cfg = BenchConfig(batch=2, src_len=6, tgt_len=5, beams=[1], repeats=1, dtype="fp32", device="cpu")
    mq = hf_peer(spec.variants["multi_query"], cfg, torch.device("cpu"), None)
    mh = spec.variants["multi_head"]
    local = hf_peer(replace(mh, name="multi_head_local", model=replace(mh.model, window=8)), cfg,
                    torch.device("cpu"), None)
    assert "multi-head" in mq["skipped"] and "multi_query is not" in mq["skipped"]
    assert "local" in local["skipped"] and "window" in local["skipped"]


# --------------------------------------------------------------------------------------------------
# Issue 18.12: every number at the door; a file that is not a checkpoint is one sentence, as in evaluate
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes,match", [
    ({"sweep": "length", "sweep_values": [-3]}, r"--sweep-value must be a positive integer \(length\), got -3"),
    ({"sweep": "batch", "sweep_values": [4, 0]}, r"--sweep-value must be a positive integer \(batch\), got 0"),
    ({"sweep_values": [4]}, "--sweep-value needs --sweep"),
    ({"sweep": "length", "sweep_values": [32, 65]}, r"--sweep-value 65 exceeds model.max_positions \(64\)"),
    ({"tgt_len": 65}, r"exceed model.max_positions \(64\)"),
    ({"batch": 0}, "--batch-size must be a positive integer, got 0"),
    ({"repeats": -1}, "--repeats must be a positive integer"),
    ({"beams": [1, 0]}, "--beam must be positive integers"),
])
def test_bench_numbers_are_checked_at_the_door(changes, match):
    from mqa_repro.bench import check_config, default_config, run_bench
    from mqa_repro.errors import UserError

    v = load_spec(EXPERIMENTS / "tiny.yaml").variants["multi_query"]
    cfg = replace(default_config(v, torch.device("cpu")), **changes)
    with pytest.raises(UserError, match=match):
        check_config(cfg, [v])
    with pytest.raises(UserError, match=match):   # the library entry point checks before measuring anything
        run_bench([v], cfg, log=lambda m: pytest.fail(f"work started: {m}"))


def test_sweep_batch_zero_and_negative_lengths_are_one_line():
    for args in (["--sweep", "batch", "--sweep-value", "0"], ["--sweep", "length", "--sweep-value", "-3"]):
        r = subprocess.run([sys.executable, "-m", "mqa_repro", "decode-bench", str(EXPERIMENTS / "tiny.yaml"),
                            "--device", "cpu", "--variant", "multi_query", *args], capture_output=True, text=True,
                           cwd=ROOT, timeout=120)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 2 and len(lines) == 1 and "--sweep-value" in lines[0], r.stderr
        assert "ceilings" not in r.stderr and r.stdout == ""


def test_set_overrides_the_variants_timed_and_options_of_the_other_mode_are_refused(tmp_path):
    out = tmp_path / "bench.json"
    bench(tmp_path, "json", out, "--no-check", "--set", "training.label_smoothing=0.2")
    res = json.loads(out.read_text())
    assert res["variants"]["multi_query"]["training"]["label_smoothing"] == 0.2
    assert res["rows"][0]["measure"] == "train" and res["rows"][0]["label_smoothing"] == 0.2
    for args, word in ((["--set", "training.nope=1"], "training.nope"), (["--real", "--no-compile"], "--compile"),
                       (["--max-sentences", "5"], "--max-sentences goes with --real"),     # nothing silently ignored
                       (["--real", "--tgt-len", "4"], "--tgt-len sets the fixed-shape rows")):
        r = subprocess.run([sys.executable, "-m", "mqa_repro", "decode-bench", str(EXPERIMENTS / "tiny.yaml"),
                            "--device", "cpu", "--variant", "multi_query", *args], capture_output=True, text=True,
                           cwd=ROOT, timeout=120)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 2 and len(lines) == 1 and word in lines[0], r.stderr
        assert r.stdout == ""


def test_checkpoint_that_is_not_one_is_one_sentence(tmp_path):
    from mqa_repro.bench import load_checkpoint
    from mqa_repro.errors import UserError
    from mqa_repro.model import Transformer

    spec = load_spec(EXPERIMENTS / "tiny.yaml")
    one = spec.select(["multi_query"])
    p = tmp_path / "not_a_checkpoint.pt"
    p.write_text("these are not weights\n")
    with pytest.raises(UserError, match=f"{p} is not a readable checkpoint"):
        load_checkpoint(p, one)
    torch.save({"step": 3}, p)
    with pytest.raises(UserError, match="is not a checkpoint written by mqa-repro train"):
        load_checkpoint(p, one)
    torch.save(Transformer(spec.variants["multi_head"].model).state_dict(), p)   # the wrong variant's weights
    with pytest.raises(UserError, match="the weights do not fit the model of variant 'multi_query'"):
        load_checkpoint(p, one)
    with pytest.raises(UserError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt", one)
    torch.save(Transformer(spec.variants["multi_query"].model).state_dict(), p)
    v, state = load_checkpoint(p, one)
    assert v.name == "multi_query" and all(isinstance(t, torch.Tensor) for t in state.values())
    p.write_text("garbage")
    r = subprocess.run([sys.executable, "-m", "mqa_repro", "decode-bench", str(EXPERIMENTS / "tiny.yaml"),
                        "--device", "cpu", "--variant", "multi_query", "--checkpoint", str(p)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "is not a readable checkpoint" in lines[0], r.stderr


def test_kv_cache_mib_of_a_tiny_model_is_not_printed_as_zero():
    from mqa_repro.console import _kv_mib

    assert _kv_mib(0.0625 * 2**20) == "0.0625" and _kv_mib(3.5 * 2**20) == "3.5"
    assert _kv_mib(1536 * 2**20) == "1536" and _kv_mib(None) == "-"
