"""Nothing lost or clobbered (issue 18, items 5-9): one process per run folder and `run --jobs` children
die with their parent; evaluation merges into metrics.json and completeness follows the spec; unfinished
runs stay out of the tables; evaluation-only settings do not block resuming; a killed writer's partial
log line and temporary files do not stop the next start; the manifest records an interrupted run."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mqa_repro import train as train_mod
from mqa_repro.checkpoint import checkpoint_training_hash, load_checkpoint, run_dir
from mqa_repro.errors import UserError
from mqa_repro.evaluate import evaluate_run, missing_scores
from mqa_repro.pipeline import evaluation_done, training_done
from mqa_repro.report import report
from mqa_repro.runlock import own
from mqa_repro.specfile import apply_overrides, load_spec
from mqa_repro.train import NAN_ENV, TrainingDiverged, TrainingInterrupted, train_variant
from mqa_repro.trainlog import read_log

from .conftest import ROOT, TINY

SHORT = ["training.steps=4", "training.batch_tokens=512", "training.log_every=1", "training.eval_every=100",
         "training.checkpoint_every=100"]


def tiny(*overrides, variant="multi_head"):
    return apply_overrides(load_spec(TINY).variants[variant], list(overrides))


def cli(*args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, "-m", "mqa_repro", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def short_run(tmp_path, tiny_data, *extra, **kw):
    return train_variant(tiny(*SHORT, *extra), 0, device="cpu", data=tiny_data, progress=False,
                         out_root=tmp_path / "r", checkpoint_root=tmp_path / "c", **kw)


# -- 5. one process per run folder; `run --jobs` children die with their parent ------------------------
def test_a_run_folder_held_by_another_process_is_refused(tiny_data, tmp_path):
    v = tiny(*SHORT)
    rdir = run_dir(v, 0, tmp_path / "r")
    with own(rdir, command="test"):        # another process's train/evaluate, as far as flock(2) can tell
        r = cli("train", str(TINY), "--variant", "multi_head", "--device", "cpu", "--data", str(tiny_data),
                "--out", str(tmp_path / "r"), "--checkpoints", str(tmp_path / "c"), *sum([["--set", s] for s in SHORT], []))
        assert r.returncode == 2
        line = one_line(r.stderr)
        assert str(rdir) in line and "in use by another" in line, line
        assert not (rdir / "train_log.jsonl").exists()
    res = short_run(tmp_path, tiny_data)   # released: the folder is free again
    assert res.step == 4
    with own(res.run_dir, command="test"):
        with pytest.raises(UserError, match="in use by another"):
            evaluate_run(res.run_dir, device="cpu", progress=False)


def _children(pid: int) -> list:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(p.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_run_jobs_children_die_with_the_parent(tiny_data, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tiny").symlink_to(tiny_data)
    parent = subprocess.Popen([sys.executable, "-m", "mqa_repro", "run", str(TINY), "--stages", "train", "--jobs", "2",
                               "--variant", "multi_head", "--variant", "multi_query", "--device", "cpu",
                               "--results", str(tmp_path / "r"), "--checkpoints", str(tmp_path / "c")],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    kids = []
    deadline = time.time() + 120
    while time.time() < deadline and len(kids) < 2:
        kids = _children(parent.pid)
        time.sleep(0.2)
    assert len(kids) == 2, kids
    parent.kill()                                   # SIGKILL: no finally, no handler in the parent
    parent.wait()
    deadline = time.time() + 60
    while time.time() < deadline and any(_alive(k) for k in kids):
        time.sleep(0.2)
    survivors = [k for k in kids if _alive(k)]
    for k in survivors:                             # (today's code) stop what this test started
        os.kill(k, signal.SIGKILL)
    assert not survivors, "training children outlived `run`"


# -- 6. evaluation merges into metrics.json; completeness is judged against the spec --------------------
def test_evaluation_merges_and_completeness_follows_the_spec(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run, ignore=shutil.ignore_patterns("metrics.json", "hyp.*", "ref.*"))
    v = tiny()
    evaluate_run(run, splits=["test"], device="cpu", progress=False)
    assert not evaluation_done(run, v)
    assert missing_scores(json.loads((run / "metrics.json").read_text()), v) == [
        "valid perplexity", *[f"valid BLEU beam 1 {t}" for t in ("13a", "intl")]]
    test_scores = json.loads((run / "metrics.json").read_text())["bleu"]
    evaluate_run(run, splits=["dev"], device="cpu", progress=False)     # `evaluate --split dev`
    m = json.loads((run / "metrics.json").read_text())
    assert set(m["perplexity"]) == {"valid", "test2016"}
    assert {(b["split"], b["beam"], b["tokenizer"]) for b in m["bleu"]} == (
        {("valid", 1, t) for t in ("intl", "13a")} | {("test2016", k, t) for k in (1, 4) for t in ("intl", "13a")})
    assert [b for b in m["bleu"] if b["split"] == "test2016"] == test_scores     # kept as they were
    assert evaluation_done(run, v)
    # The spec asks for more (a beam, a tokenizer): not done, and says what is missing; a setting that
    # changes the numbers (max_sentences) makes the old scores unusable.
    assert missing_scores(m, tiny("evaluation.beams=[1,2,4]")) == [f"test2016 BLEU beam 2 {t}" for t in ("13a", "intl")]
    assert missing_scores(m, tiny("evaluation.bleu_tokenizers=[intl,char]"))
    assert missing_scores(m, tiny("evaluation.max_sentences=100")) is None
    assert training_done(run, tiny("evaluation.beams=[1,2,4]"))
    # Evaluating under the new beams merges the missing beam in.
    evaluate_run(run, splits=["test"], beams=[2], device="cpu", progress=False,
                 variant=tiny("evaluation.beams=[1,2,4]"))
    assert evaluation_done(run, tiny("evaluation.beams=[1,2,4]"))


# -- 7. unfinished runs are listed apart, never averaged in -------------------------------------------
def _fake_run(root, seed, score, *, status="finished", step=300, metrics_step=None, log_steps=None):
    v = tiny()
    d = root / "tiny" / "multi_head" / f"seed{seed}"
    d.mkdir(parents=True)
    man = {"spec": v.to_dict(), "spec_hash": v.hash, "seed": seed, "checkpoint_step": step, "git_sha": "abc",
           "created": f"2026-01-0{seed + 1}T00:00:00+00:00", "device": {"name": "cpu"}}
    if status is not None:
        man["status"] = status
    (d / "manifest.json").write_text(json.dumps(man))
    met = {"spec_hash": v.hash, "checkpoint_step": metrics_step or step, "perplexity": {"valid": {"ln_ppl_per_subword": 3.0}},
           "bleu": [{"split": s, "beam": k, "tokenizer": "intl", "score": score} for s, k in
                    [("valid", 1), ("test2016", 1), ("test2016", 4)]]}
    (d / "metrics.json").write_text(json.dumps(met))
    if log_steps:
        (d / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in log_steps))


def test_unfinished_runs_are_listed_apart(tmp_path):
    root = tmp_path / "results"
    _fake_run(root, 0, 10.0)
    _fake_run(root, 1, 1.0, status="stopped", step=50)                 # stopped at step 50
    _fake_run(root, 2, 2.0, status="interrupted", step=50)
    _fake_run(root, 3, 3.0, status=None, step=300, metrics_step=50)     # evaluated at step 50
    _fake_run(root, 4, 4.0, log_steps=[25, 50])                        # its log ends at step 50
    j = json.loads(report(root, "json", bootstrap_samples=0)[0])
    t1 = next(t for t in j["tables"] if t["key"] == "table1_tiny")
    row = next(r for r in t1["rows"] if r["variant"] == "multi_head")
    assert row["seeds"] == 1 and row["bleu_test2016_b4"]["mean"] == 10.0
    reasons = {Path(e["path"]).name: e["reason"] for e in j["excluded"]}
    assert set(reasons) == {"seed1", "seed2", "seed3", "seed4"}
    assert all(r.startswith("unfinished") and "50" in r for r in reasons.values()), reasons
    assert "'stopped'" in reasons["seed1"] and "'interrupted'" in reasons["seed2"]
    md = report(root, "md", bootstrap_samples=0)[0]
    assert "Runs not used" in md and "seed1`: unfinished" in md


# -- 8. evaluation-only settings do not block resuming; training settings do --------------------------
def test_evaluation_settings_do_not_block_resume(tiny_data, tmp_path):
    first = short_run(tmp_path, tiny_data, stop_after=2)
    assert load_checkpoint(first.checkpoint)["training_hash"] == tiny(*SHORT).training_hash
    changed = ["evaluation.beams=[1,2]", "evaluation.max_sentences=10", "benchmark.repeats=7"]
    res = short_run(tmp_path, tiny_data, *changed, resume=True)
    assert res.step == 4
    v = tiny(*SHORT, *changed)
    assert training_done(res.run_dir, v) and training_done(res.run_dir, tiny(*SHORT))
    assert not training_done(res.run_dir, tiny(*SHORT, "training.lr=0.01"))
    ck = load_checkpoint(res.checkpoint)
    assert ck["spec_hash"] == v.hash and ck["training_hash"] == v.training_hash
    # An older checkpoint without a training hash: recomputed from its spec.
    del ck["training_hash"]
    assert checkpoint_training_hash(ck) == v.training_hash
    # What training depends on still has to match.
    more = tiny(*SHORT[1:], "training.steps=6", "training.lr=0.01")
    with pytest.raises(UserError, match=r"different spec \(differs in training.lr, training.steps\)"):
        train_variant(more, 0, device="cpu", data=tiny_data, progress=False, out_root=tmp_path / "r",
                      checkpoint_root=tmp_path / "c", resume=True)


def test_a_fresh_train_never_replaces_a_finished_run_without_overwrite(tiny_data, tmp_path):
    """results/ is committed and checkpoints are not: a fresh `train` into a folder holding a run is refused
    (one sentence, nothing written) unless --overwrite; the pipeline's train stage replaces a stale run."""
    first = short_run(tmp_path, tiny_data)
    first.checkpoint.unlink()
    man = first.run_dir / "manifest.json"
    before = (man.read_bytes(), (first.run_dir / "train_log.jsonl").read_bytes())
    r = cli("train", str(TINY), "--variant", "multi_head", "--device", "cpu", "--data", str(tiny_data),
            "--out", str(tmp_path / "r"), "--checkpoints", str(tmp_path / "c"),
            *sum([["--set", s] for s in SHORT + ["training.lr=0.01"]], []))
    assert r.returncode == 2
    line = one_line("\n".join(x for x in r.stderr.splitlines() if not x.startswith("tiny/")))
    assert "already holds a run (finished, step 4" in line and "--overwrite" in line, line
    assert (man.read_bytes(), (first.run_dir / "train_log.jsonl").read_bytes()) == before
    both = cli("train", str(TINY), "--variant", "multi_head", "--resume", "--overwrite")
    assert both.returncode == 2 and "not both" in one_line(both.stderr)
    again = short_run(tmp_path, tiny_data, "training.lr=0.01", overwrite=True)
    assert json.loads(man.read_text())["spec_hash"] == tiny(*SHORT, "training.lr=0.01").hash
    assert again.step == 4


def test_run_after_a_spec_change_says_how_to_retrain_instead_of_pointing_at_resume(tiny_data, tmp_path):
    import yaml

    raw = yaml.safe_load(TINY.read_text())
    raw["training"].update(steps=4, batch_tokens=512, log_every=1, eval_every=100, checkpoint_every=100)
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(raw))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tiny").symlink_to(tiny_data)
    train_variant(load_spec(spec).variants["multi_head"], 0, device="cpu", data=tiny_data, progress=False,
                  out_root=tmp_path / "results", checkpoint_root=tmp_path / "ck", stop_after=2)
    raw["training"]["lr"] = raw["training"]["lr"] * 2
    spec.write_text(yaml.safe_dump(raw))
    r = cli("run", str(spec), "--stages", "train", "--variant", "multi_head", "--device", "cpu",
            "--results", "results", "--checkpoints", "ck", cwd=tmp_path)
    assert r.returncode == 2
    line = one_line("\n".join(x for x in r.stderr.splitlines() if "run:" not in x))
    assert "different spec (differs in training.lr)" in line and "to train this spec from scratch" in line, line
    assert "--resume" not in line and "--set" not in line


# -- 9. a killed writer's partial log line and temporaries; the manifest after a signal ----------------
def test_resume_after_a_kill_mid_write(tiny_data, tmp_path, capsys):
    first = short_run(tmp_path, tiny_data, stop_after=2)
    log = first.run_dir / "train_log.jsonl"
    whole = log.read_text()
    with open(log, "a", encoding="utf-8") as f:       # SIGKILL in the middle of writing step 3's line
        f.write('{"step": 3, "loss": 6.1')
    stale = [first.checkpoint.parent / ".last.pt.4242424.tmp",          # the old per-pid name
             first.checkpoint.parent / ".last.pt.tmp",
             first.run_dir / ".manifest.json.k2j3h4.tmp", first.run_dir / ".train_log.jsonl.tmp"]
    for p in stale:
        p.write_bytes(b"\0" * 4096)
    assert read_log(log) == [json.loads(x) for x in whole.splitlines()]   # readers skip the partial line
    res = short_run(tmp_path, tiny_data, resume=True)
    assert res.step == 4
    err = capsys.readouterr().err
    assert "partial last line" in err and "temporary file" in err
    assert not [p for p in stale if p.exists()]
    assert [r["step"] for r in read_log(log) if "loss" in r] == [1, 2, 3, 4]
    assert not list(res.checkpoint.parent.glob(".*.tmp")) and not list(res.run_dir.glob(".*.tmp"))
    # A damaged line before the last one is not silently dropped.
    log.write_text('{"step": 1}\n{"ste\n{"step": 2}\n')
    with pytest.raises(UserError, match="line 2"):
        read_log(log)


class _SignalledAtOnce(train_mod._StopFlag):
    """A SIGTERM that arrives during the first step."""

    def __enter__(self):
        super().__enter__()
        self.signum = signal.SIGTERM
        return self


def test_the_manifest_records_an_interrupted_or_diverged_run(tiny_data, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(train_mod, "_StopFlag", _SignalledAtOnce)
        with pytest.raises(TrainingInterrupted):
            short_run(tmp_path, tiny_data)
    man = json.loads((run_dir(tiny(*SHORT), 0, tmp_path / "r") / "manifest.json").read_text())
    assert man["status"] == "interrupted" and man["checkpoint_step"] == 1 and man["stopped_at_step"] == 1
    assert "stopped by signal" in man["reason"]
    assert not training_done(run_dir(tiny(*SHORT), 0, tmp_path / "r"), tiny(*SHORT))
    monkeypatch.setenv(NAN_ENV, "3")
    with pytest.raises(TrainingDiverged):
        short_run(tmp_path, tiny_data, resume=True)
    man = json.loads((run_dir(tiny(*SHORT), 0, tmp_path / "r") / "manifest.json").read_text())
    assert man["status"] == "diverged" and man["checkpoint_step"] == 1 and man["stopped_at_step"] == 2
