"""Line I/O for every text file the tool reads or writes: one line ends at '\\n' and nowhere else.

Corpora, prepared reference text, hypotheses and the references written beside them all go through
here, so that line i means the same sentence to ``prepare``, ``evaluate``, ``report`` and to
``sacrebleu REF -i HYP`` (whose CLI opens files with ``newline="\\n"``: sacrebleu/utils.py ``smart_open``).
Python's text mode (``newline=None``) would also end lines at '\\r' and '\\r\\n', and ``str.splitlines``
at '\\r', '\\x0b', '\\x0c', '\\x1c', '\\x1d', '\\x1e', '\\x85', '\\u2028' and '\\u2029': a reference line
holding one of them would become two lines and shift every later sentence. Those characters stay
inside their line here.

Files are UTF-8; every line, the last included, is written with a final '\\n'; a file read without a final
'\\n' gives the same lines as one with it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Union

from .errors import UserError

NEWLINE = "\n"


def split_lines(text: str) -> list:
    """The lines of ``text``, split at '\\n' only; a final '\\n' does not start an empty last line."""
    lines = text.split(NEWLINE)
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def decode_utf8(raw: bytes, path: Union[str, Path]) -> str:
    """``raw`` as UTF-8 (a leading byte-order mark dropped); a UserError naming the file and line if invalid."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}: line {line} is not valid UTF-8") from None
    return text[1:] if text.startswith("\ufeff") else text


def read_lines(path: Union[str, Path]) -> list:
    """All lines of a UTF-8 text file, without their '\\n' (see :func:`split_lines`)."""
    path = Path(path)
    return split_lines(decode_utf8(path.read_bytes(), path))


def join_lines(lines: Iterable[str]) -> str:
    """The text of ``lines``, each followed by '\\n'. ValueError if a line holds a '\\n' (it would become two)."""
    out = []
    for i, line in enumerate(lines):
        if NEWLINE in line:
            raise ValueError(f"line {i + 1} holds a '\\n' and would be read back as two lines: {line!r}")
        out.append(line)
        out.append(NEWLINE)
    return "".join(out)


def write_lines(path: Union[str, Path], lines: Iterable[str]) -> None:
    """Write ``lines`` as UTF-8, '\\n' after each, atomically (a temporary file beside ``path``, renamed)."""
    path = Path(path)
    data = join_lines(lines).encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def one_line(text: str) -> str:
    """``text`` made safe to store as one line: each '\\n' (a decoded hypothesis may hold one) becomes a space."""
    return text.replace(NEWLINE, " ")


def as_sacrebleu_cli_reads(lines: Iterable[str]) -> list:
    """The lines as sacrebleu's CLI sees them after reading a file: each one ``str.rstrip()``-ed
    (sacrebleu/sacrebleu.py strips trailing whitespace, which includes '\\r', '\\x0b', '\\x0c', '\\x1c'-'\\x1f',
    '\\x85', '\\u2028', '\\u2029'). Scoring these lists makes ``sacrebleu REF -i HYP`` reproduce the number
    whatever a line ends with."""
    return [line.rstrip() for line in lines]
