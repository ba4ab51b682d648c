"""The command line: describe prints tables and JSON; mistakes are one line and exit 2, no traceback."""
import json
import subprocess
import sys

from .conftest import EXPERIMENTS, ROOT


def run(*args):
    return subprocess.run([sys.executable, "-m", "mqa_repro", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_describe_json_lists_every_variant():
    r = run("describe", str(EXPERIMENTS / "wmt14_ende.yaml"), "--format", "json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [x["variant"] for x in rows] == ["multi_head", "multi_query", "multi_head_local", "multi_query_local",
                                            "h1_dk128", "h2_dk64", "h4_dk32", "h8_dk16", "gqa2", "gqa4"]
    for x in rows:
        assert {"n_heads", "n_kv_heads", "d_k", "d_v", "d_ff", "window", "params",
                "kv_self_bytes_per_token", "kv_cross_bytes_per_source_token"} <= set(x)
        assert round(x["params"] / 1e6) == 211


def test_describe_table():
    r = run("describe", str(EXPERIMENTS / "lm1b.yaml"))
    assert r.returncode == 0, r.stderr
    for word in ("multi_query", "9088", "9984", "191.65M"):
        assert word in r.stdout


def test_bad_spec_is_one_line_and_exit_2(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  n_heads: 8\n  n_kv_heads: 3\n")
    r = run("describe", str(p))
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert "bad.yaml: model.n_heads" in lines[0] and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_missing_spec(tmp_path):
    r = run("describe", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "no such spec file" in r.stderr


def test_help_lists_only_built_commands():
    r = run("--help")
    assert r.returncode == 0
    assert "describe" in r.stdout
