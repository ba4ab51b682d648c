"""Where and how things run: the torch device, bf16 autocast, timing on the device, progress on the terminal.

Every command that touches a device goes through :func:`resolve_device` (``--device auto|cpu|cuda``; under
``torchrun`` the CUDA device is the process's ``LOCAL_RANK``), mixed precision through :func:`autocast`
(bf16 on CUDA, full precision on the CPU unless asked), device timings through :func:`time_runs` and
:func:`median`, and progress through :class:`Progress` (rich bars on a terminal, plain lines when piped).

torch is imported inside the functions that need it, so that ``prepare`` (which only shows progress) does
not load it.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from .errors import UserError


# --------------------------------------------------------------------------------------------------
# Device and precision
# --------------------------------------------------------------------------------------------------
def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` (CUDA when torch sees one, else the CPU), ``cpu`` or ``cuda`` (this process's LOCAL_RANK).

    Raises UserError for any other name, or for ``cuda`` on a machine where torch sees no CUDA device.
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def autocast(device: torch.device, enabled: Optional[bool] = None):
    """bf16 autocast on ``device``; ``enabled`` None: on CUDA only (CPUs have no fast bf16 matmul)."""
    if enabled is None:
        enabled = device.type == "cuda"
    if not enabled:
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
def time_runs(fn, device: torch.device, repeats: int, before=None, warmup: int = 1) -> list:
    """Seconds of ``fn()`` for each of ``repeats`` runs after ``warmup`` runs; ``before()`` runs untimed.

    CUDA events on a GPU (the device is synchronised first), ``time.perf_counter`` on the CPU.
    """
    import torch

    out = []
    for i in range(warmup + repeats):
        if before is not None:
            before()
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            sec = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            sec = time.perf_counter() - t0
        if i >= warmup:
            out.append(sec)
    return out


def median(xs) -> float:
    """The median (the mean of the two middle values for an even count). Raises ValueError when empty."""
    s = sorted(xs)
    if not s:
        raise ValueError("median of no values")
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])


# --------------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------------
class Progress:
    """Progress on stderr: rich bars on a terminal, plain lines when piped, nothing when disabled.

    Two ways to use it. A run with one bar (training, evaluation): ``Progress(title, total, start)``
    shows the bar at once; ``step(n, info)`` moves it to n, ``advance(k)`` by k, ``line(text)`` prints a
    line (piped: prefixed with the title), ``close()`` ends it. A sequence of steps (prepare): ``with
    Progress(title) as p:`` and ``with p.task(description, total) as advance:`` per step; piped, each
    step ends with one line ``<title>: <description> (<seconds> s)``.
    """

    def __init__(self, title: str = "", total: Optional[int] = None, start: int = 0, enabled: bool = True):
        self.enabled, self.title = enabled, title
        self.bar = None
        self.main = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            from rich.progress import Progress as Bars

            self.bar = Bars(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                            MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                            TimeRemainingColumn(), console=Console(stderr=True))
            self.bar.start()
            if total is not None:
                self.main = self.bar.add_task(title, total=total, completed=start, info="")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def step(self, step: int, info: str = "") -> None:
        """Move the run's bar to ``step`` (with a short status text beside it)."""
        if self.bar is not None and self.main is not None:
            self.bar.update(self.main, completed=step, info=info)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None and self.main is not None:
            self.bar.advance(self.main, n)

    def line(self, text: str) -> None:
        """One line of log: above the bars on a terminal, ``<title> <text>`` when piped."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text, highlight=False)
        else:
            print(f"{self.title} {text}" if self.title else text, file=sys.stderr, flush=True)

    log = line

    @contextmanager
    def task(self, description: str, total: Optional[int] = None) -> Iterator[Callable[[int], None]]:
        """A bar for one step of a sequence; yields ``advance(n=1)``."""
        start = time.perf_counter()
        if self.bar is not None:
            tid = self.bar.add_task(description, total=total, info="")
            yield lambda n=1: self.bar.advance(tid, n)
            self.bar.update(tid, completed=total if total is not None else 1, total=total or 1)
        else:
            yield lambda n=1: None
            if self.enabled:
                print(f"{self.title}: {description} ({time.perf_counter() - start:.1f} s)", file=sys.stderr,
                      flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
