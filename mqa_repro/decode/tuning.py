"""Tuned choices of the decoder: which kernel launch or product variant runs is chosen by timing the
candidates on the device at first use, once per shape, and remembered for the process.

:func:`time_us` times a callable as a CUDA graph from a cold L2 cache; :func:`pick` times every candidate
and records the times (:func:`tuning_record`, written into decode-bench's JSON); :func:`chosen` is the one
lookup every tuned choice goes through.
"""
from __future__ import annotations

import torch

# Every choice made on this device by timing, with the candidates' times (recorded in decode-bench's JSON).
TUNING: dict = {}
_CHOSEN: dict = {}   # (what, shape..., device) -> the choice
_FLUSH: dict = {}

TUNE_MIN_ROWS = 64   # smaller batches keep the fixed choices (their steps are launch-bound either way)


def chosen(key: tuple, default, tune):
    """The choice stored under ``key``; else ``tune()``'s, stored. Never tuned inside a graph capture (the
    warm-up before capture tunes first): there the ``default`` is used."""
    if key not in _CHOSEN:
        if torch.cuda.is_current_stream_capturing():
            return default
        _CHOSEN[key] = tune()
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
