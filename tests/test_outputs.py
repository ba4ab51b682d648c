"""Issue 18.10 and 18.15 (file modes): every output path that cannot be written is one sentence naming it and
a non-zero exit, found before any long work; atomic writes leave no partial file and end with the mode an
ordinary file gets."""
import errno
import json
import os
import stat
import subprocess
import sys
import time

import pytest

from mqa_repro.errors import OutputError, UserError
from mqa_repro.provenance import check_writable, write_json_atomic, write_text_atomic

from .conftest import EXPERIMENTS, ROOT


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "mqa_repro", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def one_line_error(r, *words):
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and all(w in lines[0] for w in words), lines
    return lines[0]


# --------------------------------------------------------------------------------------------------
# The shared check: tests run as root, so read-only folders are stood in for by /proc and by files in the way
# --------------------------------------------------------------------------------------------------
def test_check_writable_refuses_every_kind_of_unwritable_path(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="--out .*a_file: a file is in the way"):
        check_writable(blocker, "dir", "--out")
    with pytest.raises(OutputError, match=f"cannot create it because {blocker} is a file"):
        check_writable(blocker / "sub" / "report.md", "file")
    with pytest.raises(OutputError, match=f"cannot create it because {blocker} is a file"):
        check_writable(blocker / "runs", "dir")
    with pytest.raises(OutputError, match="is a folder; give a file name"):
        check_writable(tmp_path, "file")
    with pytest.raises(OutputError, match="cannot write in /proc"):   # not writable, even for root
        check_writable("/proc/mqa_repro_results", "dir")
    with pytest.raises(OutputError, match="cannot write in /proc/self"):
        check_writable("/proc/self/x.json", "file")
    assert isinstance(OutputError("x"), UserError) and isinstance(OutputError("x"), OSError)


def test_check_writable_accepts_missing_parents_and_creates_nothing(tmp_path):
    before = sorted(tmp_path.rglob("*"))
    check_writable(tmp_path / "new" / "deeper" / "out.json", "file")
    check_writable(tmp_path / "new" / "runs", "dir")
    check_writable(tmp_path, "dir")
    assert sorted(tmp_path.rglob("*")) == before


def test_atomic_write_on_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    p = tmp_path / "metrics.json"
    write_json_atomic(p, {"old": 1})

    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[:3])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: Full(real_fdopen(*a, **k)))
    with pytest.raises(UserError, match=f"cannot write {p}: No space left on device"):
        write_json_atomic(p, {"new": 2})
    with pytest.raises(OutputError, match="No space left on device"):
        write_text_atomic(p, "a long text that does not fit")
    monkeypatch.undo()
    assert json.loads(p.read_text()) == {"old": 1}
    assert [x.name for x in tmp_path.iterdir()] == ["metrics.json"]
    with pytest.raises(OutputError, match=f"cannot write {tmp_path}"):   # a folder in the way of a file
        write_text_atomic(tmp_path, "x")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_get_the_mode_of_an_ordinary_file(tmp_path, umask):
    old = os.umask(umask)
    try:
        ordinary = tmp_path / "ordinary.txt"
        ordinary.write_text("x")
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        write_text_atomic(tmp_path / "b.md", "x\n")
    finally:
        os.umask(old)
    want = stat.S_IMODE(ordinary.stat().st_mode)
    assert want == 0o666 & ~umask
    for name in ("a.json", "b.md"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name


# --------------------------------------------------------------------------------------------------
# Every command: one line, non-zero, before long work, nothing written
# --------------------------------------------------------------------------------------------------
def test_commands_refuse_unwritable_outputs_at_once(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    tiny = str(EXPERIMENTS / "tiny.yaml")
    t0 = time.perf_counter()
    one_line_error(run("train", tiny, "--variant", "multi_head", "--checkpoints", str(blocker),
                       "--out", str(tmp_path / "results"), "--device", "cpu"), "--checkpoints", "blocker")
    assert not (tmp_path / "results").exists()
    one_line_error(run("train", tiny, "--variant", "multi_head", "--out", str(blocker / "r")), "--out",
                   "is a file")
    one_line_error(run("prepare", tiny, "--out", str(blocker / "data")), "--out", "is a file")
    one_line_error(run("decode-bench", tiny, "--device", "cpu", "--out", "/proc/bench.json"), "--out",
                   "/proc/bench.json")
    one_line_error(run("cost-model", tiny, "--out", str(tmp_path)), "--out", "is a folder")
    one_line_error(run("report", str(ROOT / "results"), "--out", str(blocker / "report.md")), "--out")
    one_line_error(run("report", str(ROOT / "results"), "--plots", str(blocker)), "--plots")
    one_line_error(run("run", tiny, "--results", str(blocker)), "--results")
    assert time.perf_counter() - t0 < 100   # no command trained, prepared or benchmarked first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"] and blocker.read_text() == "x"


def test_evaluate_into_an_unwritable_run_folder():
    line = one_line_error(run("evaluate", "/proc/self"), "run folder /proc/self")   # read-only even for root
    assert "cannot write" in line


def test_negative_seed_is_one_line_before_any_work(tmp_path):
    one_line_error(run("train", str(EXPERIMENTS / "tiny.yaml"), "--variant", "multi_head", "--seed", "-1",
                       "--out", str(tmp_path / "r"), "--checkpoints", str(tmp_path / "c")), "--seed")
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_on_a_full_disk_is_one_sentence_and_leaves_nothing(tmp_path, monkeypatch):
    """The checkpoint's temporary file is /dev/full (a real ENOSPC from the kernel)."""
    import builtins

    import torch

    from mqa_repro.checkpoint import save_checkpoint

    real_open = builtins.open

    def full_disk(path, *a, **k):
        return real_open("/dev/full", "wb") if str(path).endswith(".tmp") else real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", full_disk)
    with pytest.raises(OutputError, match=f"cannot write {tmp_path / 'last.pt'}: .*(No space|write)"):
        save_checkpoint(tmp_path / "last.pt", {"w": torch.zeros(256, 256)})
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
