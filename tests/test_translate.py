"""``translate`` and ``generate`` on real Multi30k text: translating a test set's source file reproduces the
hypotheses ``evaluate`` wrote (greedy and beam 4); one output line per input line, in order; empty lines;
over-long lines truncated with a count; stdin/stdout; two gloo processes write what one writes; mistakes
are one sentence and exit 2, and leave no output file."""
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch

from mqa_repro.errors import UserError
from mqa_repro.evaluate import evaluate_run
from mqa_repro.translate import load_for_inference, run, split_lines

from .conftest import ROOT, write_tiny_lm_spec


def cli(*args, input=None, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "mqa_repro", *args], capture_output=True, text=True, cwd=ROOT,
                          input=input, timeout=timeout, env={**os.environ, **(env or {})})


def one_line_error(r):
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def evaluated(tiny_run, tmp_path_factory):
    """A copy of the trained tiny run, evaluated on its test set with beams 1 and 4 (200 sentences)."""
    run_dir = tmp_path_factory.mktemp("translate") / "run"
    shutil.copytree(tiny_run.run_dir, run_dir)
    evaluate_run(run_dir, splits=["test"], beams=[1, 4], device="cpu", progress=False)
    return run_dir


@pytest.fixture(scope="module")
def source(evaluated, tiny_data, tmp_path_factory):
    """The test set's raw English side (as many lines as evaluate decoded) in a file."""
    n = len(split_lines((evaluated / "hyp.test2016.beam1.txt").read_text(encoding="utf-8")))
    lines = split_lines((tiny_data / "test2016.en.txt").read_text(encoding="utf-8"))[:n]
    path = tmp_path_factory.mktemp("src") / "test2016.en"
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return path, lines


def hyps(run_dir, beam):
    return split_lines((run_dir / f"hyp.test2016.beam{beam}.txt").read_text(encoding="utf-8"))


@pytest.mark.parametrize("beam", [1, 4])
def test_translate_equals_the_hypotheses_evaluate_wrote(evaluated, source, tmp_path, beam):
    out = tmp_path / "out.de"
    if beam == 1:   # the command line end to end
        r = cli("translate", str(evaluated), "--input", str(source[0]), "--output", str(out), "--device", "cpu",
                "--batch-tokens", "2000")
        assert r.returncode == 0, r.stderr
    else:
        run(evaluated, str(source[0]), str(out), beam=beam, batch_tokens=2000, device="cpu", progress=False)
    got = split_lines(out.read_text(encoding="utf-8"))
    want = hyps(evaluated, beam)
    assert len(got) == len(want) == len(source[1]) == 200
    assert got == want


def test_empty_lines_order_and_a_checkpoint_file(evaluated, source, tiny_data, tmp_path):
    """Input order is kept (the engine sorts by length inside); an empty line gives an empty line; a
    checkpoint file works like its run directory (prepared data from --data)."""
    lines = source[1]
    want = hyps(evaluated, 1)
    pick = [17, 3, 150, 3, 99]
    text = [lines[pick[0]], "", lines[pick[1]], lines[pick[2]], "", lines[pick[3]], lines[pick[4]]]
    inp = tmp_path / "in.txt"
    inp.write_text("".join(x + "\n" for x in text), encoding="utf-8")
    out = tmp_path / "out.txt"
    ckpt = load_for_inference(evaluated, "cpu").checkpoint
    res = run(ckpt, str(inp), str(out), device="cpu", data=tiny_data, progress=False)
    assert res.decoded == 5 and res.truncated == 0
    got = split_lines(out.read_text(encoding="utf-8"))
    assert got == [want[pick[0]], "", want[pick[1]], want[pick[2]], "", want[pick[3]], want[pick[4]]]


def test_stdin_stdout_and_an_over_long_line(evaluated, source):
    loaded = load_for_inference(evaluated, "cpu")
    limit = loaded.max_source_ids
    long_line = " ".join(source[1][:12])          # far more subwords than the model was trained on
    assert len(loaded.sp.encode(long_line)) > limit
    r = cli("translate", str(evaluated), "--device", "cpu", input=f"{source[1][0]}\n{long_line}\n{source[1][1]}\n")
    assert r.returncode == 0, r.stderr
    out = r.stdout.split("\n")
    assert out[-1] == "" and len(out) == 4
    want = hyps(evaluated, 1)
    assert out[0] == want[0] and out[2] == want[1] and out[1]
    assert f"1 of 3 lines had more than {limit} subwords" in r.stderr


def test_output_through_a_link_into_a_fifo_and_with_an_ordinary_mode(tmp_path):
    """--output follows a symbolic link (the file it names is replaced, the link kept), writes a FIFO in place
    (a reader gets the lines), and a new file gets the mode open(path, "w") would give, not mkstemp's 0600."""
    import threading

    from mqa_repro.translate import write_output

    real, link = tmp_path / "real.txt", tmp_path / "link.txt"
    real.write_text("old\n", encoding="utf-8")
    link.symlink_to(real)
    write_output(str(link), ["a", "b"])
    assert link.is_symlink() and real.read_text(encoding="utf-8") == "a\nb\n"
    fifo, got = tmp_path / "fifo", []
    os.mkfifo(fifo)
    reader = threading.Thread(target=lambda: got.append(fifo.read_text(encoding="utf-8")))
    reader.start()
    write_output(str(fifo), ["x", "y"])
    reader.join(timeout=30)
    assert got == ["x\ny\n"] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    write_output(str(tmp_path / "new.txt"), ["z"])
    assert stat.S_IMODE(os.stat(tmp_path / "new.txt").st_mode) == 0o666 & ~umask


def test_two_gloo_processes_write_what_one_writes(evaluated, source, tmp_path):
    out = tmp_path / "two.de"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "mqa_repro", "translate", str(evaluated), "--input", str(source[0]), "--output",
                        str(out), "--device", "cpu", "--beam", "4"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert split_lines(out.read_text(encoding="utf-8")) == hyps(evaluated, 4)


def test_mistakes_are_one_sentence_and_leave_no_output(evaluated, tiny_data, tmp_path):
    out = tmp_path / "never.txt"
    inp = tmp_path / "in.txt"
    inp.write_text("A man.\n", encoding="utf-8")

    def fails(target, match, command="translate", **kw):
        with pytest.raises(UserError, match=match):
            run(target, str(kw.pop("input", inp)), str(kw.pop("output", out)), command=command, device="cpu",
                progress=False, **kw)

    # not a run directory, not a checkpoint, nothing there (the command line: one sentence, exit 2)
    assert "not a run directory" in one_line_error(cli("translate", str(tmp_path), "-i", str(inp), "-o", str(out)))
    assert "holds prepared data, not a run" in one_line_error(cli("translate", str(tiny_data), "-i", str(inp),
                                                                   "-o", str(out)))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    fails(junk, "not a readable checkpoint")
    fails(tmp_path / "gone", "does not exist")
    # the wrong kind of model for the command
    fails(evaluated, "needs a decoder-only model .*mqa-repro translate", command="generate")
    # a prepared-data folder without its SentencePiece model
    broken = tmp_path / "data"
    shutil.copytree(tiny_data, broken)
    (broken / "spm.model").unlink()
    fails(evaluated, "spm.model is missing", data=broken)
    # a beam the vocabulary cannot feed (each step keeps 2 x beam continuations): a sentence, not topk's error
    fails(evaluated, "beam 600 is too large for this model", beam=600)
    # missing input; an output folder that does not exist
    fails(evaluated, "no input file", input=tmp_path / "x.txt")
    fails(evaluated, "does not exist", output=tmp_path / "no" / "out.txt")
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# generate: a tiny decoder-only model
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm_run(shared_data, tmp_path_factory):
    from mqa_repro.prepare import prepare
    from mqa_repro.specfile import load_spec
    from mqa_repro.train import train_variant

    root = tmp_path_factory.mktemp("lm")
    spec = write_tiny_lm_spec(root, 30)
    s = load_spec(spec)
    data = root / "data"
    prepare(s, data_dir=shared_data, out=data, progress=False)
    r = train_variant(s.variants["multi_query"], 0, device="cpu", out_root=root / "results",
                      checkpoint_root=root / "ck", data=data, progress=False)
    return r.run_dir, data


@torch.no_grad()
def _greedy_by_forward(model, prompt, n, vocab):
    """Greedy continuation by re-running the whole (uncached) forward pass for every new token."""
    from mqa_repro.model import BOS, EOS

    seq = [BOS] + list(prompt)
    out = []
    for _ in range(n):
        logits = model(torch.tensor([seq]))[0, -1].float()
        logits[0] = logits[BOS] = float("-inf")   # PAD and BOS are never generated
        logits[vocab:] = float("-inf")
        tok = int(logits.argmax())
        if tok == EOS:
            break
        out.append(tok)
        seq.append(tok)
    return out


def test_generate_continues_prompts_greedy_and_beam(lm_run, tmp_path):
    run_dir, data = lm_run
    prompts = ["Ein Mann", "", "Zwei Hunde spielen im", "Eine Frau mit einem roten"]
    inp = tmp_path / "prompts.txt"
    inp.write_text("".join(x + "\n" for x in prompts), encoding="utf-8")
    loaded = load_for_inference(run_dir, "cpu", kind="decoder-only", command="generate")
    for beam in (1, 4):
        out = tmp_path / f"out{beam}.txt"
        r = cli("generate", str(run_dir), "-i", str(inp), "-o", str(out), "--beam", str(beam), "--device", "cpu",
                "--max-new-tokens", "12")
        assert r.returncode == 0, r.stderr
        got = split_lines(out.read_text(encoding="utf-8"))
        assert len(got) == len(prompts) and got[1] == ""
        if beam == 1:
            assert got[0], "a continuation of 'Ein Mann' (an empty one is possible, but not from this model)"
            for i in (0, 2, 3):
                ids = _greedy_by_forward(loaded.model, loaded.sp.encode(prompts[i]), 12, loaded.variant.model.vocab_size)
                assert got[i] == loaded.sp.decode(ids)
    with pytest.raises(UserError, match="needs an encoder-decoder model .*mqa-repro generate"):
        run(run_dir, str(inp), str(tmp_path / "x"), command="translate", device="cpu", progress=False)


def test_generate_leaves_room_for_the_continuation_and_says_when_it_cannot(lm_run):
    run_dir, _ = lm_run
    loaded = load_for_inference(run_dir, "cpu", kind="decoder-only", command="generate")
    positions, n = loaded.variant.model.max_positions, 12
    prompt = " ".join(["Ein Mann mit einem roten Hut spielt im Park"] * 40)   # far more subwords than positions
    keep = min(loaded.max_source_ids, max(positions - n, positions // 2))
    r = cli("generate", str(run_dir), "--device", "cpu", "--max-new-tokens", str(n), input=prompt + "\n")
    assert r.returncode == 0, r.stderr
    assert f"1 of 1 prompts had more than {keep} subwords and were cut to their last {keep}" in r.stderr, r.stderr
    assert "stop before" not in r.stderr
    ids = _greedy_by_forward(loaded.model, loaded.sp.encode(prompt)[-keep:], n, loaded.variant.model.vocab_size)
    assert r.stdout == loaded.sp.decode(ids) + "\n"
    r = cli("generate", str(run_dir), "--device", "cpu", "--max-new-tokens", str(positions), input=prompt + "\n")
    assert r.returncode == 0 and "1 of 1 continuations stop before --max-new-tokens" in r.stderr, r.stderr


def test_split_lines_is_newline_only():
    assert split_lines("a\rb\u2028c\n\nd\n") == ["a\rb\u2028c", "", "d"]
    assert split_lines("a") == ["a"] and split_lines("") == []
    with pytest.raises(UserError):
        load_for_inference(ROOT / "no-such-run", "cpu")
