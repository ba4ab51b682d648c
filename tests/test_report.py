"""The whole tiny pipeline on the CPU, and the report built from what it wrote."""
import csv
import io
import json
import shutil
import subprocess
import sys

import pytest

from mqa_repro.paper import ROW_LABELS
from mqa_repro.spec import load_spec

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
    assert sum(k.startswith("table2_") for k in keys) == 1 and "multigpu_pair" in keys
    t1 = next(t for t in j["tables"] if t["key"] == "table1_tiny")
    assert next(row for row in t1["rows"] if row["variant"] == "multi_head")["seeds"] == 1
    mgt = next(t for t in j["tables"] if t["key"] == "multigpu_pair")
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
    from mqa_repro.report import _label, _order

    names = ["multi_head_to_kv2_mean_5pct", "multi_head_to_kv1_random_5pct", "multi_head_to_kv1_mean_10pct",
             "multi_query", "multi_head_to_kv1_mean_5pct", "multi_head"]
    assert _order(names) == ["multi_head", "multi_query", "multi_head_to_kv1_mean_5pct",
                             "multi_head_to_kv1_mean_10pct", "multi_head_to_kv1_random_5pct",
                             "multi_head_to_kv2_mean_5pct"]
    assert _label("multi_head_to_kv1_mean_5pct") == "multi-head → multi-query, uptrained 5% (mean init.)"
    assert _label("multi_head_to_kv2_first_200steps") == "multi-head → 2 K/V heads, uptrained 200 steps (first init.)"
