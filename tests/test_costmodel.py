"""cost-model: the analytic decode costs against hand-computed cases, the same bound as roofline.py and
decode-bench, the sharding comparison of Pope et al., the paper's ratios, and the command end to end."""
import json
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest

from mqa_repro import costmodel as cm
from mqa_repro import roofline as rl
from mqa_repro.errors import UserError
from mqa_repro.spec import ModelSpec
from mqa_repro.specfile import load_spec

from .conftest import EXPERIMENTS, ROOT

# The hand-countable model of tests/test_bench.py: d 8, 2 query heads of 4, one K/V head (multi-query),
# d_ff 16, 1 + 1 layers, 16 vocabulary rows. Per step it reads 768 decoder weights and multiplies 704 per
# row; one position's K/V is 8 values per row (16 bytes in bf16). 1,584 parameters in all:
# 3 attention layers x 192 + 2 FFNs x 256 + 7 norms x 16 + embedding 128 + positions 2 x 16 x 8.
M = ModelSpec(kind="encoder-decoder", encoder_layers=1, decoder_layers=1, d_model=8, d_ff=16, n_heads=2,
              n_kv_heads=1, d_k=4, d_v=4, vocab_size=16, vocab_multiple=8, max_positions=16)
MH = replace(M, n_kv_heads=2)
DEV = rl.Ceilings("test", "bf16", bandwidth_Bps=1000.0, peak_flops=10000.0, memory_bytes=4000.0, source="by hand")


def variant(name, m):
    return SimpleNamespace(name=name, model=m)


def test_decode_step_by_hand():
    # batch 3, context 3 (step t = 2), source 5, bf16. Bytes: weights 768 x 2 = 1536; self K/V 3 rows x
    # (3 read + 1 written) x 16 = 192; cross K/V 3 sentences x 5 x 16 = 240 -> 1968.
    # FLOPs: 3 rows x (2 x 704 + attention 2 x 2 heads x 8 x (3 + 5)) = 3 x 1664 = 4992.
    p = cm.predict_decode_step(M, batch=3, context=3, src_len=5, bandwidth_Bps=1000, flops_per_s=10000)
    assert p.bytes == 1968 and p.kv_bytes == 432 and p.flops == 4992
    assert p.memory_s == pytest.approx(1.968) and p.compute_s == pytest.approx(0.4992)
    assert p.seconds == pytest.approx(1.968) and p.bound == "memory"
    assert p.us_per_token == pytest.approx(1.968 / 3 * 1e6)
    # a faster memory makes the same step compute-bound
    assert cm.predict_decode_step(M, 3, 3, 5, 1e6, 10000).bound == "compute"


def test_critical_batch_by_hand():
    # bytes = 1536 + 144 b (per sentence: self 4 x 16 = 64, cross 5 x 16 = 80), FLOPs = 1664 b.
    # 1536 / 1000 = b (1664 / 10000 - 144 / 1000) = 0.0224 b  ->  b* = 1.536 / 0.0224 = 68.57
    b = cm.critical_batch(M, context=3, src_len=5, bandwidth_Bps=1000, flops_per_s=10000)
    assert b == pytest.approx(1.536 / 0.0224)
    p = cm.predict_decode_step(M, b, 3, 5, 1000, 10000)
    assert p.memory_s == pytest.approx(p.compute_s)
    # a long context: one sentence's K/V (32 values x 2 B per position) outlasts its arithmetic -> never
    assert cm.critical_batch(M, context=1000, src_len=1000, bandwidth_Bps=1000, flops_per_s=10000) is None


def test_memory_by_hand():
    assert cm.weight_bytes(M) == 1584 * 2
    # resident at batch 3, context 3, source 5: per sentence 3 x 16 (self) + 5 x 16 (cross) = 128
    assert cm.kv_cache_resident_bytes(M, 3, 3, 5) == 384
    assert cm.kv_cache_resident_bytes(M, 3, 3, 5, beam=2) == 3 * (2 * 48 + 80)  # cross shared by beams
    # 4000 B leave 4000 - 3168 = 832 for the cache: floor(832 / 128) = 6 sentences
    assert cm.max_batch(M, 3, 5, 4000) == 6
    assert cm.max_batch(M, 3, 5, 3000) == 0                       # the weights alone do not fit
    # largest context at batch 3: the source grows with it, 3 x 32 n <= 832 -> 8; fixed source 5:
    # 3 x (16 n + 80) <= 832 -> 12
    assert cm.max_context(M, 3, 832) == 8
    assert cm.max_context(M, 3, 832, src_len=5) == 12
    # window 2: the self cache stops at 2 slots; with a fixed source nothing grows -> no limit; with the
    # source growing: 3 x (2 x 16 + 16 n) <= 832 -> 15
    loc = replace(M, window=2)
    assert cm.kv_cache_resident_bytes(loc, 3, 100, 5) == 3 * (2 * 16 + 80)
    assert cm.max_context(loc, 3, 832, src_len=5) is None
    assert cm.max_context(loc, 3, 832) == 15


def test_decode_row_and_fit():
    r = cm.decode_row("mq", M, 3, 3, 5, DEV)
    assert (r.bytes, r.flops, r.step_s, r.bound) == (1968, 4992, pytest.approx(1.968), "memory")
    assert r.weight_bytes_step == 1536 and r.kv_bytes_step == 432
    assert r.kv_cache_bytes == 384 and r.weights_bytes == 3168 and r.fits is True
    assert r.max_batch == 6 and r.max_context == 12
    assert r.ratio_exact == pytest.approx(984 / 2496)               # values moved per multiply-add
    assert cm.decode_row("mq", M, 7, 3, 5, DEV).fits is False       # 3168 + 7 x 128 > 4000
    res = cm.cost_model([variant("mq", M)], DEV, [3, 7], [3], src_len=5)
    assert [r.fits for r in res.rows] == [True, False]              # a partly fitting grid is no error
    with pytest.raises(UserError, match="--batch 7 does not fit"):
        cm.cost_model([variant("mq", M), variant("mh", MH)], DEV, [7], [3], src_len=5)


def test_paper_ratios():
    # d 8, h 2, n 3, b 3: multi-query 1/8 + 3/16 + 1/3; multi-head 3/8 + 1/3
    assert cm.paper_ratio(M, 3, 3) == ("1/d + n/(dh) + 1/b", pytest.approx(1 / 8 + 3 / 16 + 1 / 3))
    assert cm.paper_ratio(MH, 3, 3) == ("n/d + 1/b", pytest.approx(3 / 8 + 1 / 3))
    # grouped: h 4 heads of 2, g 2 -> 1/8 + 3 x 2 / (8 x 4) + 1/3
    gqa = replace(M, n_heads=4, n_kv_heads=2, d_k=2, d_v=2)
    f, v = cm.paper_ratio(gqa, 3, 3)
    assert "GQA" in f and v == pytest.approx(1 / 8 + 6 / 32 + 1 / 3)
    # head size not d/h (the h8_dk16 rows): 1/d + n g k / d^2 + 1/b with k 2, g 2
    small = replace(M, n_kv_heads=2, d_k=2, d_v=2)
    assert cm.paper_ratio(small, 3, 3)[1] == pytest.approx(1 / 8 + 3 * 2 * 2 / 64 + 1 / 3)
    # the window caps n in the rows
    assert cm.decode_row("l", replace(M, window=2), 3, 3, 5, DEV).attended == 2


def test_sharding_by_hand():
    # multi-query (1 K/V head) on 2 chips, batch 4, context 3, source 5: cache 4 x 128 = 512 B
    heads, batch = cm.shard_rows("mq", M, 4, 3, 5, DEV, chips=2)
    assert heads.layout == "heads" and batch.layout == "batch"
    assert heads.kv_bytes_per_chip == 512 and heads.kv_replication == 2     # the one head on both chips
    assert batch.kv_bytes_per_chip == 256 and batch.kv_replication == 1
    assert heads.weights_bytes_per_chip == batch.weights_bytes_per_chip == 1584
    # all-reduces: 1 layer x 3 (self, cross, FFN) x 2 (N-1)/N x 4 rows x 8 x 2 B = 192 B sent per chip
    assert heads.comm_bytes_per_chip == 192
    # batch adds all-to-alls of q and output, 2 sublayers x 4 rows x 2 heads x (4 + 4) = 128 values
    # (no new K/V: one head < 2 chips, the projection is replicated) x 2 B x (N-1)/N^2 = 64
    assert batch.comm_bytes_per_chip == 192 + 64
    # per-chip step (communication excluded): weights 1536 / 2 + K/V traffic 576 x share; FLOPs / 2
    assert heads.step_s_per_chip == pytest.approx((768 + 576) / 1000)
    assert batch.step_s_per_chip == pytest.approx((768 + 288) / 1000)
    # per-chip memory 4000 - 1584 = 2416 for the cache, source fixed at 5: heads 4 x (16 n + 80) -> n 32;
    # batch holds half of it, 2 x (16 n + 80) -> n 70 (Pope's longer context on the same chips)
    assert heads.max_context == 32 and batch.max_context == 70
    # multi-head (2 K/V heads) on 2 chips: heads split evenly; batch also sends the new K/V,
    # 4 rows x 2 x 8 = 64 more values
    mh_heads, mh_batch = cm.shard_rows("mh", MH, 4, 3, 5, DEV, chips=2)
    assert mh_heads.kv_bytes_per_chip == mh_batch.kv_bytes_per_chip == 512 and mh_heads.kv_replication == 1
    assert mh_batch.comm_bytes_per_chip == 192 + (128 + 64) * 2 / 4
    # an uneven batch: the busiest chip holds ceil(5 / 2) = 3 of 5 sentences
    assert cm.kv_share(M, 5, 2, "batch") == pytest.approx(3 / 5)
    assert cm.comm_bytes_per_chip(M, 4, 1, "batch") == 0


@pytest.mark.parametrize("name", ["multi_head", "multi_query_local", "gqa2"])
@pytest.mark.parametrize("beam", [1, 4])
def test_decoder_bound_equals_roofline(name, beam):
    """report.py puts predict_decoder_us_per_token beside decode-bench's bound_us_per_token: the same number."""
    m = load_spec(EXPERIMENTS / "wmt14_ende.yaml").variants[name].model
    ceil = rl.Ceilings("test", "bf16", bandwidth_Bps=3.35e12, peak_flops=989e12)
    bench_bound = rl.bound_seconds(rl.decode_costs(m, 64, 40, 48, beam, "bf16", "indirect"), ceil) * 1e6 / (64 * 48)
    ours = cm.predict_decoder_us_per_token(m, 64, 40, 48, beam, 3.35e12, 989e12)
    assert ours == pytest.approx(bench_bound, rel=1e-12)


def test_devices(tmp_path, monkeypatch):
    assert cm.device_preset("h200").bandwidth_Bps == 4.8e12 and cm.device_preset().device == "h100"
    tpu = cm.device_preset("tpuv2")
    assert (tpu.bandwidth_Bps, tpu.peak_flops) == (350e9, 22.5e12)      # one core = half a chip
    d = cm.device_preset("a100", bandwidth_GBps=1000, tflops=100, memory_gb=40)
    assert (d.bandwidth_Bps, d.peak_flops, d.memory_bytes) == (1e12, 1e14, 40e9)
    assert cm.device_preset(None, 500, 50).memory_bytes is None
    for kwargs, word in (({"name": "v100"}, "--device"), ({"bandwidth_GBps": 100}, "--flops"),
                         ({"tflops": 1}, "--bandwidth"), ({"name": "h100", "memory_gb": 0}, "--memory-gb")):
        with pytest.raises(UserError, match=word):
            cm.device_preset(**kwargs)
    monkeypatch.setenv("MQA_REPRO_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="--device measured"):
        cm.device_preset("measured")
    old = rl.Ceilings("GPU A", "bf16", 1e12, 1e14, "2.0", "2025-01-01T00:00:00+00:00").to_dict()
    new = rl.Ceilings("GPU B", "bf16", 2e12, 2e14, "2.0", "2026-01-01T00:00:00+00:00").to_dict()
    (tmp_path / "ceilings.json").write_text(json.dumps({"a": old, "b": new}))
    m = cm.device_preset("measured")
    assert m.device == "measured: GPU B" and m.bandwidth_Bps == 2e12 and m.peak_flops == 2e14


def invoke(*args):
    """In-process (fast); the one-line error handling of main() is checked through a real process below."""
    from typer.testing import CliRunner

    from mqa_repro.cli import app

    return CliRunner().invoke(app, ["cost-model", *args])


def test_cli_json_and_out(tmp_path):
    out = tmp_path / "cost.json"
    r = invoke(str(EXPERIMENTS / "tiny.yaml"), "--device", "h100", "--batch", "4", "--batch", "16", "--context", "8",
               "--chips", "2", "--format", "json", "--out", str(out))
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["kind"] == "cost-model" and doc["device_model"]["device"] == "h100"
    assert {"git_sha", "versions", "created"} <= set(doc["provenance"])
    assert len(doc["rows"]) == 4 * 2 and len(doc["sharding"]) == 4 * 2 * 2
    assert {"step_s", "us_per_token", "bound", "critical_batch", "max_batch", "ratio_paper"} <= set(doc["rows"][0])
    saved = json.loads(out.read_text())
    assert saved["kind"] == "cost-model" and saved["rows"] == doc["rows"]
    mq = next(x for x in doc["rows"] if x["variant"] == "multi_query" and x["batch"] == 4)
    tiny = load_spec(EXPERIMENTS / "tiny.yaml").variants["multi_query"].model
    expect = cm.predict_decode_step(tiny, 4, 8, 8, 3.35e12, 989e12)
    assert mq["step_s"] == pytest.approx(expect.seconds) and mq["src_len"] == 8


def test_cli_table_and_csv():
    r = invoke(str(EXPERIMENTS / "wmt14_ende.yaml"), "--device", "h200", "--batch", "1024", "--context", "128",
               "--variant", "multi_head", "--variant", "multi_query", "--chips", "8")
    assert r.exit_code == 0, r.output
    for word in ("critical batch", "multi_query", "n/d + 1/b", "1/d + n/(dh) + 1/b", "141 GB", "Pope"):
        assert word in r.stdout, word
    r = invoke(str(EXPERIMENTS / "tiny.yaml"), "--bandwidth", "100", "--flops", "1", "--format", "csv", "--batch", "2")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0].startswith("variant,batch,context,src_len")
    r = invoke(str(EXPERIMENTS / "tiny.yaml"), "--batch", "100000000", "--memory-gb", "1")
    assert isinstance(r.exception, UserError) and "--batch 100000000 does not fit" in str(r.exception)


def test_cli_mistake_is_one_line():
    r = subprocess.run([sys.executable, "-m", "mqa_repro", "cost-model", str(EXPERIMENTS / "tiny.yaml"),
                        "--bandwidth", "100"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "--flops" in lines[0] and "Traceback" not in r.stderr


def test_cached_ceilings_are_named_and_can_be_measured_again(tmp_path, monkeypatch):
    """A cached measurement is used with one line naming the file, device and date; refresh measures anew."""
    import torch

    path = tmp_path / "ceilings.json"
    cpu = torch.device("cpu")
    key = rl.ceilings_key(cpu, "fp32")
    assert f"|threads {torch.get_num_threads()}" in key     # a CPU's ceilings follow torch's thread count
    cached = rl.Ceilings("CPU X", "fp32", 1e10, 1e11, torch.__version__, "2025-03-04T05:06:07+00:00")
    path.write_text(json.dumps({key: cached.to_dict()}))
    fresh = rl.Ceilings("CPU X", "fp32", 2e10, 2e11, torch.__version__, "2026-01-01T00:00:00+00:00")
    calls = []
    monkeypatch.setattr(rl, "measure_ceilings", lambda device, dtype: calls.append(dtype) or fresh)
    lines = []
    assert rl.ceilings(cpu, "fp32", path, log=lines.append) == cached and not calls
    assert len(lines) == 1 and str(path) in lines[0] and "2025-03-04" in lines[0] and "CPU X" in lines[0]
    assert "--refresh-ceilings" in lines[0]
    lines.clear()
    assert rl.ceilings(cpu, "fp32", path, refresh=True, log=lines.append) == fresh and calls == ["fp32"]
    assert not lines and rl.cached_ceilings(path)[key] == fresh          # the new measurement is cached
    # cost-model --device measured names the file it reads
    monkeypatch.setenv("MQA_REPRO_CACHE", str(tmp_path))
    dev = cm.device_preset("measured", log=lines.append)
    assert dev.bandwidth_Bps == 2e10 and len(lines) == 1 and str(path) in lines[0] and "2026-01-01" in lines[0]
    with pytest.raises(UserError, match="--refresh-ceilings"):
        cm.device_preset("h100", refresh=True)
