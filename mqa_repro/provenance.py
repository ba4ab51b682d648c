"""Provenance for every artifact: git sha, versions, device, time, hashes."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path


def git_sha(cwd=None) -> str:
    """The commit of the code that ran, with '-dirty' when the working tree has changes.

    ``$MQA_REPRO_GIT_SHA`` wins: set it where the code runs from a copy of the tree without its git
    history (a rented GPU machine, a container).
    """
    env = os.environ.get("MQA_REPRO_GIT_SHA", "").strip()
    if env:
        return env
    here = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not re.fullmatch(r"[0-9a-f]{40}", sha):
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict:
    import torch

    from . import __version__

    out = {"mqa_repro": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for mod in ("numpy", "sacrebleu", "sentencepiece"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional at import time
            out[mod] = None
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def device_info(device=None) -> dict:
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        return {"type": "cuda", "name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                "multiprocessors": props.multi_processor_count}
    return {"type": "cpu", "name": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def sha256_file(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def describe_os_error(e: OSError, path=None) -> str:
    """One sentence for a file-system error: "cannot write PATH: reason" for an output ``path``, else
    "FILE: reason" with the file the error names."""
    what = e.strerror or str(e) or type(e).__name__
    if path is not None:
        return f"cannot write {path}: {what}"
    return f"{e.filename}: {what}" if e.filename else f"file-system error: {what}"


def check_writable(path, kind: str = "dir", what: str = "") -> Path:
    """Fail early, before long work, when ``path`` cannot be written: a folder (``kind="dir"``, created later
    with its parents) or a file (``kind="file"``, its folder created later). Creates nothing.

    The nearest existing ancestor must be a folder in which a file can be created (probed with a
    temporary file, so read-only mounts and special file systems count as what they are, even for root);
    an existing ``path`` must be a folder (``dir``) or not a folder (``file``).
    Raises OutputError (a UserError) naming ``what`` (e.g. "--out") and the path. Returns ``Path(path)``.
    """
    from .errors import OutputError

    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    if path.exists() or path.is_symlink():
        if kind == "dir" and not path.is_dir():
            raise OutputError(f"{label}: a file is in the way where a folder should be written")
        if kind == "file" and path.is_dir():
            raise OutputError(f"{label} is a folder; give a file name")
    probe_dir = path if (kind == "dir" and path.is_dir()) else path.parent
    anc = probe_dir
    while not (anc.exists() or anc.is_symlink()):
        if anc.parent == anc:
            break
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"{label}: cannot create it because {anc} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".mqa-repro-write-check.", dir=anc)
    except OSError as e:
        raise OutputError(f"{label}: cannot write in {anc} ({e.strerror or type(e).__name__})") from None
    os.close(fd)
    os.unlink(tmp)
    return path


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` (UTF-8) to a temporary file beside ``path`` and rename it into place.

    The file ends with the mode an ordinary ``open(path, "w")`` would give (0666 less the umask), not
    ``mkstemp``'s private 0600. A file-system error (no space, read-only, a file in the way) raises
    OutputError (a UserError and an OSError) naming ``path`` and leaves neither a partial file nor the
    temporary one behind; missing parent folders are created.
    """
    from .errors import OutputError

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(describe_os_error(e, path)) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OutputError(describe_os_error(e, path)) from None
        raise


def write_json_atomic(path, obj) -> None:
    """``obj`` as indented JSON through :func:`write_text_atomic` (same mode, same errors)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def manifest(variant=None, seed=None, device=None, **extra) -> dict:
    """The common provenance block: git sha, versions, device, time, resolved spec and its hash."""
    out = {"git_sha": git_sha(), "created": now(), "versions": versions(), "device": device_info(device)}
    if seed is not None:
        out["seed"] = seed
    if variant is not None:
        out["spec"] = variant.to_dict()
        out["spec_hash"] = variant.hash
    out.update(extra)
    return out
