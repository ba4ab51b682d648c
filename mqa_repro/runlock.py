"""One process at a time in a run folder (and its checkpoint folder), and no temporary files left behind.

``train``, ``uptrain`` and ``evaluate`` write into a run folder; two of them at once would interleave the
training log and let the last one to finish silently win. :func:`own` takes an exclusive, non-blocking
lock (``filelock``: ``flock(2)`` on Linux, released by the kernel when the process dies, even by
SIGKILL) on ``<folder>/.mqa-repro.lock`` for each folder; a second process gets a :class:`UserError`
naming the folder. The holder's pid and command go into ``.mqa-repro.owner`` beside it (for that message
only; the lock itself is the flock).

While the lock is held no other mqa-repro process writes into the folder, so every temporary file there
(``.*.tmp``: a checkpoint, log or JSON write cut short by SIGKILL) is stale: :func:`clean_temporaries`
removes them.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from .errors import UserError

LOCK_NAME = ".mqa-repro.lock"
OWNER_NAME = ".mqa-repro.owner"


def _owner(folder: Path) -> str:
    try:
        text = (folder / OWNER_NAME).read_text(encoding="utf-8").strip()
    except OSError:
        return ""
    return f" ({text})" if text else ""


@contextlib.contextmanager
def own(*folders, command: str = "mqa-repro"):
    """Hold the lock of every folder (created when missing) for the ``with`` block.

    Raises UserError when another process holds one of them, or when a folder cannot be written."""
    from filelock import FileLock, Timeout

    with contextlib.ExitStack() as stack:
        for folder in dict.fromkeys(Path(f) for f in folders):   # each folder once, in order
            try:
                folder.mkdir(parents=True, exist_ok=True)
                lock = FileLock(str(folder / LOCK_NAME))
                lock.acquire(blocking=False)
            except Timeout:
                raise UserError(f"{folder} is in use by another mqa-repro process{_owner(folder)}; wait for it "
                                f"to finish or stop it (one train, uptrain or evaluate per run folder)") from None
            except OSError as e:
                raise UserError(f"cannot write to {folder} ({e.strerror or e})") from None
            stack.callback(lock.release)
            with contextlib.suppress(OSError):
                (folder / OWNER_NAME).write_text(f"pid {os.getpid()}, {command}\n", encoding="utf-8")
        yield


def clean_temporaries(folder, say=None) -> list:
    """Delete the temporary files (``.*.tmp``) in ``folder``; call it only while :func:`own` holds it.

    Returns the removed paths; ``say`` (a function of one string) hears about them."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in sorted(folder.glob(".*.tmp")):
        if p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    if removed and say is not None:
        say(f"removed {len(removed)} temporary file(s) left in {folder} by a process that was killed: "
            f"{', '.join(p.name for p in removed)}")
    return removed


def stderr_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
