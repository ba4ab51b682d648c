"""Tuned choices of the decoder: which kernel launch or product variant runs is chosen by timing the
candidates on the device at first use, once per shape, and remembered for the process and on disk.

:func:`time_us` times a callable as a CUDA graph from a cold L2 cache; :func:`pick` times every candidate
and records the times (:func:`tuning_record`, written into decode-bench's JSON); :func:`chosen` is the one
lookup every tuned choice goes through.

Timing a shape's candidates costs tens of milliseconds per kernel (each candidate launch is a kernel of its
own to load and two graphs to capture), which a fresh process such as `evaluate` or `translate` would pay
for every new shape. So each choice, with its candidates' times, is also kept in
``$MQA_REPRO_CACHE/tuning-<torch>-<triton>.json`` (see :func:`mqa_repro.runtime.cache_dir`), keyed by the
shape and the device's name, as Triton keeps its compiled kernels; ``MQA_REPRO_TUNING_CACHE=off`` times
afresh in every process. A choice read from the file shows ``"cached": true`` in :func:`tuning_record`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

# Every choice made on this device by timing, with the candidates' times (recorded in decode-bench's JSON).
TUNING: dict = {}
_CHOSEN: dict = {}   # (what, shape..., device) -> the choice
_FLUSH: dict = {}
_DISK: Optional[dict] = None   # the cache file's entries, read at the first lookup: repr(key) -> entry
SECONDS = [0.0]      # wall seconds spent timing candidates in this process (first-use costs)
_UNWRITABLE: list = []   # the cache file could not be written: choices last this process

TUNE_MIN_ROWS = 64   # smaller batches keep the fixed choices (their steps are launch-bound either way)


def cache_file() -> Optional[Path]:
    """The file keeping tuned choices between processes; None when ``MQA_REPRO_TUNING_CACHE=off``."""
    if _UNWRITABLE or os.environ.get("MQA_REPRO_TUNING_CACHE", "").lower() in ("off", "0", "false", "no"):
        return None
    from ..runtime import cache_dir

    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    return Path(cache_dir()) / f"tuning-torch{torch.__version__}-triton{tv}.json".replace("+", "_")


def _as_choice(x):
    """A choice as the tuning code made it (JSON keeps tuples as lists)."""
    return tuple(x) if isinstance(x, list) else x


def _disk() -> dict:
    global _DISK
    if _DISK is None:
        _DISK, path = {}, cache_file()
        if path is not None and path.is_file():
            try:
                _DISK = {k: e for k, e in json.loads(path.read_text()).items() if isinstance(e, dict) and "choice" in e}
            except (OSError, ValueError, AttributeError):
                print(f"warning: {path} is not a tuning cache; timing afresh and rewriting it", file=sys.stderr)
    return _DISK


def _save(entries: dict) -> None:
    """Merge ``entries`` into the cache file under a lock (processes of one torchrun may tune at once)."""
    path = cache_file()
    if path is None:
        return
    from filelock import FileLock

    from ..provenance import write_json_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=30):
            table = {}
            if path.is_file():
                try:
                    table = json.loads(path.read_text())
                except ValueError:
                    table = {}
            table.update(entries)
            write_json_atomic(path, table)
    except OSError as e:   # a read-only home or a lock never released: keep the choices for this process
        print(f"warning: could not keep tuned choices in {path} ({e}); they last this process", file=sys.stderr)
        _UNWRITABLE.append(path)


def chosen(key: tuple, default, tune):
    """The choice stored under ``key`` (in this process, else in the cache file); else ``tune()``'s, stored in
    both. Never tuned inside a graph capture (the warm-up before capture tunes first): there the ``default``
    is used."""
    if key not in _CHOSEN:
        entry = _disk().get(repr(key)) if cache_file() is not None else None
        if entry is not None:
            _CHOSEN[key] = _as_choice(entry["choice"])
            if entry.get("name"):
                TUNING[entry["name"]] = {"choice": entry["choice"], "us": entry.get("us", {}), "cached": True}
            return _CHOSEN[key]
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return default
        before, t0 = set(TUNING), time.perf_counter()
        _CHOSEN[key] = tune()
        SECONDS[0] += time.perf_counter() - t0
        names = [n for n in TUNING if n not in before]
        entry = {"choice": list(_CHOSEN[key]) if isinstance(_CHOSEN[key], tuple) else _CHOSEN[key]}
        if names:
            entry.update(name=names[-1], us=TUNING[names[-1]]["us"])
        _disk()[repr(key)] = entry
        _save({repr(key): entry})
    return _CHOSEN[key]


def tuning_record() -> dict:
    return {k: dict(v) for k, v in sorted(TUNING.items())}


def _graph_us(fn, reps: int) -> float:
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(3):
        g.replay()
    b.record()
    b.synchronize()
    del g
    return a.elapsed_time(b) * 1e3 / (3 * reps)


def time_us(fn, reps: int = 20) -> float:
    """GPU microseconds per call of ``fn`` from a cold L2 cache (tuning only, not a reported time).

    ``reps`` calls, each after overwriting a buffer twice the L2 cache, captured in one CUDA graph; minus the
    same graph without the calls. A graph, because timing eager calls would time the CPU launching them
    (a decode step's kernels take a few microseconds each); a cold cache, because inside a decode step the
    caches and weights a kernel reads were not just read by the same kernel.
    """
    fn()                       # compile, pick cuBLAS kernels, allocate: outside the capture
    dev = torch.cuda.current_device()
    if dev not in _FLUSH:
        l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 * 2**20)
        _FLUSH[dev] = torch.empty(max(2 * l2, 2**20) // 4, dtype=torch.float32, device="cuda")
    buf = _FLUSH[dev]
    torch.cuda.synchronize()

    def flushed():
        buf.zero_()
        fn()

    return max(0.0, _graph_us(flushed, reps) - _graph_us(buf.zero_, reps))


def tunable(tune: bool, x: torch.Tensor) -> bool:
    """Whether a choice for an operation on ``x`` ([rows, ...]) is made by timing: asked for, on CUDA, and
    enough rows for the choice to matter."""
    return tune and x.is_cuda and x.shape[0] >= TUNE_MIN_ROWS


def pick(name: str, candidates: list, make_fn) -> object:
    """The fastest of ``candidates`` (``make_fn(c)`` gives a callable running c); failures are skipped.

    Raises RuntimeError when every candidate fails."""
    times = {}
    for c in candidates:
        try:
            times[c] = time_us(make_fn(c))
        except Exception as e:  # e.g. a launch configuration needing more shared memory than the device has
            times[c] = f"{type(e).__name__}"
    ok = {c: t for c, t in times.items() if isinstance(t, float)}
    if not ok:
        raise RuntimeError(f"tuning {name}: every candidate failed: {times}")
    best = min(ok, key=ok.get)
    TUNING[name] = {"choice": list(best) if isinstance(best, tuple) else best,
                    "us": {str(list(c) if isinstance(c, tuple) else c): (round(t, 2) if isinstance(t, float) else t)
                           for c, t in times.items()}}
    return best
