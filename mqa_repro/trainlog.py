"""The training log: ``train_log.jsonl`` in a run folder, one JSON record per line, lines ending in ``\\n``.

Training appends a record every ``training.log_every`` steps (loss, learning rate, speed, ...) and one per
dev evaluation (``dev_ln_ppl``), flushed at once (:func:`write_record`). A process killed mid-write leaves
at most a partial last line: :func:`read_log` leaves it out, and a resumed run drops it and every record
after its checkpoint (:func:`trim_log`). The report reads logs through :func:`read_log`.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .errors import UserError

LOG_NAME = "train_log.jsonl"


def write_record(f, rec: dict) -> None:
    """One record as a line of the open log ``f`` (None: not the writing rank, nothing), flushed."""
    if f is not None:
        f.write(_json_line(rec))
        f.flush()


def trim_log(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint (they will be written again), and a partial
    last line (a process killed mid-write), saying so on stderr."""
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    records, partial = _parse_log(path)
    if partial is not None:
        print(f"{path}: dropped a partial last line (the process writing it was killed): {partial[:60]!r}",
              file=sys.stderr, flush=True)
    keep = [r for r in records if r.get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(_json_line(r) for r in keep), encoding="utf-8")
    os.replace(tmp, path)


def _json_line(rec: dict) -> str:
    return json.dumps(rec) + "\n"


def _parse_log(path: Path) -> tuple:
    """(records, partial last line or None) of a JSON-lines log; lines end with ``\\n`` alone.

    Only the last line may be cut short (a write interrupted by SIGKILL); a bad line before it is a
    UserError naming the file and the line."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    records, partial = [], None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError:
            if i == len(lines) - 1 or all(not x.strip() for x in lines[i + 1:]):
                partial = line
                break
            raise UserError(f"{path}: line {i + 1} is not a JSON record; the training log is damaged") from None
        records.append(rec)
    return records, partial


def read_log(path) -> list:
    """The records of a training log (train_log.jsonl); a partial last line (a killed writer) is left out."""
    return _parse_log(Path(path))[0]
