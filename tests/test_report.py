"""The whole tiny pipeline on the CPU, and the report built from what it wrote."""
import csv
import io
import json
import shutil
import subprocess
import sys

import pytest

from mqa_repro.paper import ROW_LABELS
from mqa_repro.specfile import load_spec

from .conftest import EXPERIMENTS, ROOT

TINY = EXPERIMENTS / "tiny.yaml"


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mqa_repro", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=1200)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_run, shared_data):
    """`mqa-repro run experiments/tiny.yaml` into a fresh folder (the session's multi_head run is reused, so
    the pipeline trains the other rows and skips that one, as it would after an interruption)."""
    work = tmp_path_factory.mktemp("pipeline")
    results, ckpts = work / "results", work / "checkpoints"
    shutil.copytree(tiny_run.run_dir, results / "tiny" / "multi_head" / "seed0")
    shutil.copytree(tiny_run.checkpoint.parent, ckpts / "tiny" / "multi_head" / "seed0")
    r = cli("run", str(TINY), "--results", str(results), "--checkpoints", str(ckpts), "--device", "cpu",
            "--data-dir", str(shared_data), cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    return work, results, r


def test_pipeline_reports_every_variant(pipeline):
    work, results, r = pipeline
    assert "train multi_head seed 0: up to date, skipped" in r.stderr
    variants = list(load_spec(TINY).variants)
    assert "Table 1" in r.stdout and "Table 2" in r.stdout
    for name in variants:
        assert (results / "tiny" / name / "seed0" / "metrics.json").exists()
        # each variant is a row of Table 1 and of Table 2, and of the cost-model table once per beam
        sections = {sec.split("\n", 1)[0]: sec for sec in r.stdout.split("### ")[1:]}
        for title, sec in sections.items():
            want = 2 if title.startswith("Cost model") else 1
            assert sec.count(f"| {ROW_LABELS[name]} |") == want, (name, title)
    bench = json.loads((results / "tiny" / "bench" / "cpu.json").read_text())
    assert set(bench["spec_hashes"]) == set(variants)
    assert "–" not in r.stdout.split("### Table 2")[0].split("| multi-query |")[1].split("\n")[0].replace(
        "| – |", "")  # multi-query has all of its own numbers; paper-only columns may be missing


def test_second_run_skips_everything(pipeline, shared_data):
    work, results, _ = pipeline
    r = cli("run", str(TINY), "--results", str(results), "--checkpoints", str(work / "checkpoints"),
            "--device", "cpu", "--stages", "prepare,train,evaluate,bench", "--data-dir", str(shared_data), cwd=work)
    assert r.returncode == 0, r.stderr
    stage_lines = [l for l in r.stderr.splitlines() if l.startswith(("run: train", "run: evaluate"))]
    assert len(stage_lines) == 2 * len(load_spec(TINY).variants)
    assert all(l.endswith("up to date, skipped") for l in stage_lines), stage_lines
    assert "bench: up to date" in r.stderr


def test_formats_agree(pipeline):
    work, results, _ = pipeline
    j = json.loads(cli("report", str(results / "tiny"), "--format", "json", "--bootstrap", "0", cwd=work).stdout)
    c = list(csv.DictReader(io.StringIO(cli("report", str(results / "tiny"), "--format", "csv", "--bootstrap", "0",
                                            cwd=work).stdout)))
    md = cli("report", str(results / "tiny"), "--format", "md", "--bootstrap", "0", cwd=work).stdout
    t1 = next(t for t in j["tables"] if t["key"] == "table1_tiny")
    for row in t1["rows"]:
        b4 = row["bleu_test2016_b4"]["mean"]
        cell = next(x for x in c if x["table"] == "table1_tiny" and x["row"] == row["variant"]
                    and x["column"] == "bleu_test2016_b4")
        assert float(cell["value"]) == pytest.approx(b4)
        line = next(l for l in md.splitlines() if l.startswith(f"| {ROW_LABELS[row['variant']]} |"))
        assert f"| {b4:.2f} |" in line
        # the numbers come from the run's own metrics.json
        m = json.loads((results / "tiny" / row["variant"] / "seed0" / "metrics.json").read_text())
        ours = next(b["score"] for b in m["bleu"] if b["split"] == "test2016" and b["beam"] == 4
                    and b["tokenizer"] == "intl")
        assert b4 == pytest.approx(ours)
    latex = cli("report", str(results / "tiny"), "--format", "latex", "--bootstrap", "0", cwd=work)
    assert latex.returncode == 0 and "\\begin{tabular}" in latex.stdout


def test_plots_are_drawn(pipeline, tmp_path):
    work, results, _ = pipeline
    r = cli("report", str(results / "tiny"), "--plots", str(tmp_path), "--bootstrap", "0", cwd=work)
    assert r.returncode == 0, r.stderr
    pngs = list(tmp_path.glob("*.png"))
    assert any(p.name.startswith("quality_vs_kv") for p in pngs)
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_and_mismatched_runs_are_reported(pipeline, tmp_path):
    work, results, _ = pipeline
    copy = tmp_path / "results"
    shutil.copytree(results / "tiny", copy / "tiny")
    (copy / "tiny" / "gqa2" / "seed0" / "metrics.json").unlink()   # a run that was never evaluated
    # a run of the same variant made from a different (older) spec
    odd = copy / "tiny" / "multi_query" / "seed1"
    shutil.copytree(copy / "tiny" / "multi_query" / "seed0", odd)
    man = json.loads((odd / "manifest.json").read_text())
    man["spec"]["training"]["steps"] = 7
    man["spec_hash"] = "0" * 64
    man["created"] = "2000-01-01T00:00:00+00:00"
    (odd / "manifest.json").write_text(json.dumps(man))
    r = cli("report", str(copy), "--format", "json", "--bootstrap", "0", cwd=work)
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    t1 = next(t for t in j["tables"] if t["key"] == "table1_tiny")
    gqa = next(row for row in t1["rows"] if row["variant"] == "gqa2")
    assert gqa["bleu_test2016_b4"]["mean"] is None and gqa["seeds"] == 0   # missing, not zero
    mq = next(row for row in t1["rows"] if row["variant"] == "multi_query")
    assert mq["bleu_test2016_b4"]["n"] == 1                               # the odd run is not averaged in
    assert any("multi_query/seed1" in e["path"] and "spec hash" in e["reason"] for e in j["excluded"])
    md = cli("report", str(copy), "--bootstrap", "0", cwd=work).stdout
    assert "Runs not used" in md and "multi_query/seed1" in md


def test_report_of_nothing_is_one_line(tmp_path):
    r = cli("report", str(tmp_path), cwd=ROOT)
    assert r.returncode == 2 and "no evaluated runs" in r.stderr and "Traceback" not in r.stderr
    r = cli("run", str(TINY), "--stages", "prepare,fly", cwd=tmp_path)
    assert r.returncode == 2 and "unknown stage 'fly'" in r.stderr


def test_cost_model_multi_gpu_and_notes(pipeline, tmp_path):
    work, results, _ = pipeline
    copy = tmp_path / "results"
    shutil.copytree(results / "tiny", copy / "tiny")
    # A multi-GPU summary with its inputs beside it: a decode-bench file and runs nested deeper than
    # <spec>/<variant>/seed<N>; neither may turn into another Table 2 or into Table 1 rows.
    mg = copy / "multi_gpu" / "pair"
    shutil.copytree(results / "tiny" / "multi_head" / "seed0", mg / "runs" / "one" / "tiny" / "multi_head" / "seed0")
    shutil.copy(results / "tiny" / "bench" / "cpu.json", mg / "decode_1gpu_b16.json")
    summary = {"kind": "multi-gpu", "provenance": {"git_sha": "abc"}, "decode_device": {"name": "TestGPU"},
               "training": {"multi_head": {"tokens_per_s_1gpu_per_gpu_batch_16k": 100.0,
                                           "tokens_per_s_2gpu_per_gpu_batch_16k": 190.0,
                                           "scaling_2gpu_over_1gpu": 1.9}},
               "decoding": {"multi_query": {"batch": 8, "us_per_token_1gpu": 2.0, "speedup_2gpu": 1.5}}}
    (mg / "summary.json").write_text(json.dumps(summary))
    notes = tmp_path / "notes.md"
    notes.write_text("## What it shows\n\nPlain words.\n")
    r = cli("report", str(copy), "--format", "json", "--bootstrap", "0", cwd=work)
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    keys = [t["key"] for t in j["tables"]]
    assert sum(k.startswith("table2_") for k in keys) == 1 and "multigpu_pair_summary" in keys
    t1 = next(t for t in j["tables"] if t["key"] == "table1_tiny")
    assert next(row for row in t1["rows"] if row["variant"] == "multi_head")["seeds"] == 1
    mgt = next(t for t in j["tables"] if t["key"] == "multigpu_pair_summary")
    assert {row["variant"] for row in mgt["rows"]} == {"multi_head", "multi_query"}
    # the cost model's prediction with the measured ceilings is decode-bench's own roofline bound
    bench = json.loads((results / "tiny" / "bench" / "cpu.json").read_text())
    cm = next(t for t in j["tables"] if t["key"].startswith("costmodel_"))
    for row in cm["rows"]:
        b = next(x for x in bench["rows"] if x["measure"] == "decoder" and x["variant"] == row["variant"]
                 and x["beam"] == row["beam"] and not x.get("sweep"))
        assert row["model_measured"] == pytest.approx(b["bound_us_per_token"], rel=1e-9)
        assert row["x_measured"] == pytest.approx(b["us_per_token"] / b["bound_us_per_token"], rel=1e-9)
    md = cli("report", str(copy), "--bootstrap", "0", "--notes", str(notes), cwd=work)
    assert md.returncode == 0 and md.stdout.rstrip().endswith("Plain words.")
    bad = cli("report", str(copy), "--format", "csv", "--notes", str(notes), cwd=work)
    assert bad.returncode == 2 and "--notes" in bad.stderr


def test_uptrained_rows_are_labelled_and_ordered():
    from mqa_repro.tables import row_label as _label, row_order as _order

    names = ["multi_head_to_kv2_mean_5pct", "multi_head_to_kv1_random_5pct", "multi_head_to_kv1_mean_10pct",
             "multi_query", "multi_head_to_kv1_mean_5pct", "multi_head"]
    assert _order(names) == ["multi_head", "multi_query", "multi_head_to_kv1_mean_5pct",
                             "multi_head_to_kv1_mean_10pct", "multi_head_to_kv1_random_5pct",
                             "multi_head_to_kv2_mean_5pct"]
    assert _label("multi_head_to_kv1_mean_5pct") == "multi-head → multi-query, uptrained 5% (mean init.)"
    assert _label("multi_head_to_kv2_first_200steps") == "multi-head → 2 K/V heads, uptrained 200 steps (first init.)"


# --------------------------------------------------------------------------------------------------
# Issue 18.11 and 18.15, on copies of the shipped results (no training): malformed inputs are listed as not
# used with the reason, never a traceback; --bootstrap 0 computes no p; noisy benchmark rows are flagged;
# small ceilings keep their digits
# --------------------------------------------------------------------------------------------------
SHIPPED = ROOT / "results"


@pytest.fixture
def small_results(tmp_path):
    root = tmp_path / "results"
    for v in ("multi_head", "multi_query"):
        shutil.copytree(SHIPPED / "multi30k_ende" / v / "seed0", root / "multi30k_ende" / v / "seed0")
    (root / "bench").mkdir()
    shutil.copy(SHIPPED / "bench" / "h200" / "table2.json", root / "bench" / "table2.json")
    return root


def _report_json(root, bootstrap=0):
    from mqa_repro.report import report

    text, _ = report(root, "json", None, bootstrap)
    return json.loads(text)


def _excluded(j, part):
    return [e["reason"] for e in j["excluded"] if part in e["path"]]


@pytest.mark.parametrize("metrics,reason", [
    ([], "metrics.json holds a JSON list, not an object"),
    ("drop score", "metrics.json: BLEU entry 1 lacks score"),
    ("drop split", "metrics.json: BLEU entry 1 lacks split"),
    ({"bleu": {"score": 1}}, "'bleu' is not a list"),
    ({"bleu": [], "perplexity": {"valid": 1.7}}, "perplexity of 'valid' is not an object"),
    ("truncate", "unreadable metrics.json"),
], ids=["list", "no-score", "no-split", "bleu-dict", "ppl-number", "truncated"])
def test_malformed_metrics_are_listed_not_a_traceback(small_results, metrics, reason):
    p = small_results / "multi30k_ende" / "multi_query" / "seed0" / "metrics.json"
    m = json.loads(p.read_text())
    if metrics == "truncate":
        p.write_text(p.read_text()[: len(p.read_text()) // 2])
    else:
        if isinstance(metrics, str):
            del m["bleu"][0][metrics.split()[1]]
            metrics = m
        p.write_text(json.dumps(metrics))
    j = _report_json(small_results)
    assert any(reason in r for r in _excluded(j, "multi_query/seed0")), j["excluded"]
    t1 = next(t for t in j["tables"] if t["key"] == "table1_multi30k_ende")
    mq = next(r for r in t1["rows"] if r["variant"] == "multi_query")
    assert mq["seeds"] == 0 and mq["bleu_dev"]["mean"] is None        # shown as missing, never half-read
    assert next(t for t in j["tables"] if t["key"].startswith("table2_"))  # the rest of the report is there


@pytest.mark.parametrize("damage,reason", [
    ("truncate", "unreadable JSON"),
    ("row without us_per_token", "decode-bench row 1 lacks us_per_token"),
    ("row as text", "decode-bench row 1 is not an object"),
    ("rows missing", "without a list of rows"),
    ("bad spec", "spec of 'multi_head' does not load"),
])
def test_a_malformed_bench_is_listed_with_the_reason(small_results, damage, reason):
    p = small_results / "bench" / "table2.json"
    d = json.loads(p.read_text())
    if damage == "truncate":
        p.write_text(p.read_text()[:5000])
    else:
        if damage == "row without us_per_token":
            del d["rows"][0]["us_per_token"]
        elif damage == "row as text":
            d["rows"][0] = "oops"
        elif damage == "rows missing":
            del d["rows"]
        else:
            d["variants"]["multi_head"]["model"]["n_heads"] = "eight"
        p.write_text(json.dumps(d))
    j = _report_json(small_results)
    assert any(reason in r for r in _excluded(j, "table2.json")), j["excluded"]
    assert not [t for t in j["tables"] if t["key"].startswith(("table2_", "costmodel_"))]
    if damage == "truncate":   # the CLI once: the tables and the reason, no traceback
        r = cli("report", str(small_results), "--bootstrap", "0", cwd=ROOT)
        assert r.returncode == 0 and "Traceback" not in r.stderr and "table2.json`: unreadable JSON" in r.stdout


def test_bootstrap_zero_computes_no_p(small_results, monkeypatch):
    from mqa_repro import tables as rp

    monkeypatch.setattr(rp, "_paired_p", lambda *a, **k: pytest.fail("a p-value was computed"))
    j = _report_json(small_results, bootstrap=0)
    t1 = next(t for t in j["tables"] if t["key"] == "table1_multi30k_ende")
    mq = next(r for r in t1["rows"] if r["variant"] == "multi_query")
    p_keys = [k for k in mq if k.startswith("p_")]
    assert p_keys and all(mq[k] == rp.NOT_COMPUTED for k in p_keys)
    assert "p: not computed (--bootstrap 0)" in t1["caption"] and "0 samples" not in t1["caption"]
    monkeypatch.undo()
    j = _report_json(small_results, bootstrap=20)    # with samples, a number
    t1 = next(t for t in j["tables"] if t["key"] == "table1_multi30k_ende")
    mq = next(r for r in t1["rows"] if r["variant"] == "multi_query")
    assert all(isinstance(mq[k], float) and 0 <= mq[k] <= 1 for k in p_keys)


def test_noisy_rows_are_flagged_by_one_rule(small_results):
    from mqa_repro import bench
    from mqa_repro.console import bench_table_rows

    def row(lo, mid, hi, **kw):
        return {"variant": "multi_query", "measure": "decoder", "beam": 1, "batch": 8, "tgt_len": 32, "src_len": 32,
                "us_per_token": mid, "us_per_token_min": lo, "us_per_token_max": hi, "repeats": 5,
                "us_per_hyp_token": None, "bound_us_per_token": 1.0, "x_bound": mid, "mbu": 0.5, "mfu": 0.1, **kw}

    quiet, edge, loud = row(9.5, 10, 11), row(9, 10, 11), row(8, 10, 14)
    assert [bench.is_noisy(r) for r in (quiet, edge, loud)] == [False, False, True]
    assert bench.spread(loud) == pytest.approx(0.6) and bench.spread(row(9, 10, 11, repeats=1)) is None
    assert [c[4].endswith("noisy") for c in bench_table_rows({"rows": [quiet, loud]})] == [False, True]
    assert len(bench.summarize([quiet, loud])["noisy_rows"]) == 1
    pair = bench.summarize([dict(quiet, variant="multi_head"), loud])
    assert pair["multi_head_over_multi_query_decoder_noisy"] is True
    calm = bench.summarize([dict(quiet, variant="multi_head"), quiet])
    assert calm["multi_head_over_multi_query_decoder_noisy"] is False
    # the report applies the same rule to a stored benchmark (also to files written before the flag existed)
    p = small_results / "bench" / "table2.json"
    d = json.loads(p.read_text())
    for r in d["rows"]:
        r.pop("noisy", None)
        r["us_per_token_min"] = r["us_per_token_max"] = r["us_per_token"]
    g = next(r for r in d["rows"] if r["variant"] == "multi_query" and r["measure"] == "decoder" and r["beam"] == 1)
    g["us_per_token_max"] = g["us_per_token"] * 1.35
    p.write_text(json.dumps(d))
    t2 = next(t for t in _report_json(small_results)["tables"] if t["key"].startswith("table2_"))
    flags = {r["variant"]: r["noisy"] for r in t2["rows"]}
    assert flags.pop("multi_query") == "dec. greedy (35%)" and set(flags.values()) == {None}
    assert f"above {bench.NOISY_SPREAD:.0%}" in t2["caption"]


def test_small_ceilings_keep_their_digits(small_results):
    from mqa_repro.bench import significant

    assert [significant(x) for x in (0.0734, 3.354, 989.4, 1979.0, 0.0)] == ["0.0734", "3.35", "989", "1,979", "0"]
    p = small_results / "bench" / "table2.json"
    d = json.loads(p.read_text())
    d["ceilings"].update(bandwidth_Bps=1.93e10, peak_flops=7.3e10)     # a CPU's
    p.write_text(json.dumps(d))
    cm = next(t for t in _report_json(small_results)["tables"] if t["key"].startswith("costmodel_"))
    assert "0.0193 TB/s copy, 0.0730 TFLOP/s matmul" in cm["caption"] and " 0 TFLOP/s" not in cm["caption"]
