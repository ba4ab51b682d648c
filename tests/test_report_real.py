"""The report's table of translation throughput on real sentences, from a real `decode-bench --real --peer ct2`
document (tiny spec, CPU, 40 Multi30k sentences): its cells are the document's numbers, the ratio is ours over
CTranslate2's fastest form, CTranslate2's forms land in their labelled columns, and a damaged file is listed
as not used with the reason."""
import json
import subprocess
import sys

import pytest

from mqa_repro.report import report
from mqa_repro.tables import MISSING, format_number

from .conftest import ROOT, TINY


@pytest.fixture(scope="module")
def real_doc(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("real_report") / "results"
    out = root / "bench" / "cpu_real.json"
    r = subprocess.run([sys.executable, "-m", "mqa_repro", "decode-bench", str(TINY), "--real", "--variant",
                        "multi_head", "--variant", "multi_query", "--device", "cpu", "--data", str(tiny_data),
                        "--max-sentences", "40", "--sentences-per-batch", "16", "--beam", "1", "--repeats", "1",
                        "--peer", "ct2", "--peer-threads", "1", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return root, out, json.loads(out.read_text())


def _tables(root, fmt="json"):
    text, _ = report(root, fmt, None, 0)
    return json.loads(text) if fmt == "json" else text


def test_real_table_cells_are_the_documents_numbers(real_doc):
    root, path, doc = real_doc
    j = _tables(root)
    (t,) = [t for t in j["tables"] if t["key"].startswith("real_")]
    assert t["title"].startswith("Translation throughput on real sentences")
    headers = {c["key"]: c["header"] for c in t["columns"]}
    assert "multi-head" in headers["ct2_mh"]
    assert "num_heads_kv=1 (K/V copied per head)" in headers["ct2_replicated"]
    assert "one K/V head (multi_query flag)" in headers["ct2_one_head"]
    assert len(t["rows"]) == len(doc["rows"]) == 2
    forms = {"multi_head": {"ct2_mh": None}, "multi_query": {"ct2_replicated": "replicated", "ct2_one_head": "one_head"}}
    for ours in doc["rows"]:
        (row,) = [r for r in t["rows"] if r["variant"] == ours["variant"]]
        assert row["batch_sentences"] == ours["batch_sentences"] == 16 and row["search"] == "greedy"
        assert row["tokens_per_s"] == ours["target_tokens_per_s"]
        assert row["us_per_token"] == ours["us_per_token"]
        assert row["encoder_us"] == ours["encoder_us_per_token"] and row["decoder_us"] == ours["decoder_us_per_token"]
        assert row["frac_bound"] == pytest.approx(ours["bound_us_per_token"] / ours["us_per_token"], rel=1e-9)
        theirs = {p["mqa_form"]: p for p in doc["peers"] if p["variant"] == ours["variant"]}
        want = forms[ours["variant"]]
        assert set(theirs) == set(want.values())
        for key in ("ct2_mh", "ct2_replicated", "ct2_one_head"):
            assert row[key] == (theirs[want[key]]["target_tokens_per_s"] if key in want else None), key
        best = max(theirs.values(), key=lambda p: p["target_tokens_per_s"])
        assert row["ours_over_ct2"] == pytest.approx(ours["target_tokens_per_s"] / best["target_tokens_per_s"])
        assert row["ours_over_ct2"] == pytest.approx(best["ours_over_ct2_tokens_per_s"])
    cap = t["caption"]
    for part in (doc["provenance"]["device"]["name"], "fp32", "test2016", "40 sentences", "forced",
                 "median of 1 repeats", doc["provenance"]["git_sha"][:12], doc["peers"][0]["method"],
                 doc["peers"][0]["ctranslate2"]):
        assert part in cap, part
    md = _tables(root, "md")
    line = next(l for l in md.splitlines() if l.startswith("| multi-head | greedy | 16 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    mh = next(r for r in doc["rows"] if r["variant"] == "multi_head")
    assert cells[3] == format_number(mh["target_tokens_per_s"]) and cells[4] == format_number(mh["us_per_token"])
    assert cells[9] == cells[10] == MISSING      # a multi-head model has no multi-query forms


@pytest.mark.parametrize("damage,reason", [
    ("truncate", "unreadable JSON"),
    ("row as text", "decode-bench-real row 1 is not an object"),
    ("rate as text", "decode-bench-real peer row 1 has target_tokens_per_s that is not a number"),
])
def test_a_damaged_real_document_is_listed_as_not_used(real_doc, tmp_path, damage, reason):
    root, path, doc = real_doc
    bad = tmp_path / "results" / "bench" / "broken.json"
    bad.parent.mkdir(parents=True)
    text = path.read_text()
    if damage == "truncate":
        bad.write_text(text[: len(text) // 2])
    else:
        d = json.loads(text)
        if damage == "row as text":
            d["rows"][0] = "oops"
        else:
            d["peers"][0]["target_tokens_per_s"] = "fast"
        bad.write_text(json.dumps(d))
    (tmp_path / "results" / "bench" / "good.json").write_text(text)
    j = _tables(tmp_path / "results")
    assert any(reason in e["reason"] for e in j["excluded"] if "broken.json" in e["path"]), j["excluded"]
    assert [t["key"] for t in j["tables"]] == ["real_bench_good"]
