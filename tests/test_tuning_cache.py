"""The decoder's tuned choices are kept between processes (mqa_repro.decode.tuning): a choice timed once is
read back instead of timed again, with its record; ``MQA_REPRO_TUNING_CACHE=off`` times afresh; a file that
is not a tuning cache is replaced, not trusted. The lookup is plain Python, so it is checked on the CPU with
a stand-in timing function."""
import json

import pytest

from mqa_repro.decode import tuning


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty cache folder and a process that has chosen nothing yet."""
    monkeypatch.setenv("MQA_REPRO_CACHE", str(tmp_path))
    monkeypatch.delenv("MQA_REPRO_TUNING_CACHE", raising=False)
    monkeypatch.setattr(tuning, "TUNING", {})
    monkeypatch.setattr(tuning, "_CHOSEN", {})
    monkeypatch.setattr(tuning, "_DISK", None)
    monkeypatch.setattr(tuning, "_UNWRITABLE", [])

    def new_process():
        monkeypatch.setattr(tuning, "TUNING", {})
        monkeypatch.setattr(tuning, "_CHOSEN", {})
        monkeypatch.setattr(tuning, "_DISK", None)

    return new_process


def timer(calls, choice=(64, 4, 2)):
    """A tune() that records a pick as tuning.pick does and counts its calls."""
    def tune():
        calls.append(1)
        tuning.TUNING["attention rows=128 test"] = {"choice": list(choice) if isinstance(choice, tuple) else choice, "us": {"[64, 4, 2]": 5.0, "[32, 4, 3]": 7.5}}
        return choice
    return tune


def test_a_tuned_choice_is_read_back_in_a_new_process_with_its_record(fresh):
    key = ("attention", 128, 8, 1, 64, "NVIDIA H200")
    calls = []
    assert tuning.chosen(key, (16, 4, 4), timer(calls)) == (64, 4, 2)
    assert tuning.chosen(key, (16, 4, 4), timer(calls)) == (64, 4, 2) and len(calls) == 1   # this process
    fresh()
    got = tuning.chosen(key, (16, 4, 4), timer(calls))
    assert got == (64, 4, 2) and isinstance(got, tuple) and len(calls) == 1                 # from the file
    rec = tuning.tuning_record()["attention rows=128 test"]
    assert rec["cached"] is True and rec["us"] == {"[64, 4, 2]": 5.0, "[32, 4, 3]": 7.5}
    # another shape is timed, and both stay in the file
    assert tuning.chosen(("qkv", 64, 256, 512, "NVIDIA H200"), "fused", lambda: "apart") == "apart"
    assert len(json.loads(tuning.cache_file().read_text())) == 2


def test_off_times_in_every_process(fresh, monkeypatch):
    monkeypatch.setenv("MQA_REPRO_TUNING_CACHE", "off")
    key, calls = ("residual", 64, 256, 256, "NVIDIA H200"), []
    assert tuning.cache_file() is None
    tuning.chosen(key, 0, timer(calls, 2))
    fresh()
    assert tuning.chosen(key, 0, timer(calls, 2)) == 2 and len(calls) == 2


def test_a_file_that_is_not_a_tuning_cache_is_replaced(fresh, capsys):
    path = tuning.cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not json")
    calls = []
    assert tuning.chosen(("ffn", 64, 256, 1024, "x"), "epilogue", lambda: calls.append(1) or "separate") == "separate"
    assert calls and "is not a tuning cache" in capsys.readouterr().err
    assert list(json.loads(path.read_text()).values())[0]["choice"] == "separate"


def test_the_file_is_per_torch_and_triton_version(fresh, monkeypatch):
    a = tuning.cache_file()
    monkeypatch.setattr(tuning.torch, "__version__", "0.0.0")
    assert tuning.cache_file() != a and tuning.cache_file().parent == a.parent
