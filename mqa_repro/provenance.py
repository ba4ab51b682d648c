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


def write_json_atomic(path, obj) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
