"""Checkpoints: where a run's files go, what a checkpoint holds, and whether one may be resumed.

A training checkpoint (``last.pt``, format :data:`CHECKPOINT_FORMAT`) is a dict holding the model, the
optimizer, the schedule, every rank's RNG states (:func:`rng_state`), the data position (epoch, batch),
the resolved spec with its hash and training hash, and the prepared data's fingerprint. It is written to a
temporary file and renamed (:func:`save_checkpoint`), so a reader never sees half a file.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .errors import OutputError, ResumeError, UserError
from .model import Transformer
from .provenance import describe_os_error
from .spec import TRAINING_SECTIONS, Variant, training_hash

CHECKPOINT_FORMAT = 1
CHECKPOINT_NAME = "last.pt"


# --------------------------------------------------------------------------------------------------
# Where things go
# --------------------------------------------------------------------------------------------------
def run_dir(variant: Variant, seed: int, root="results") -> Path:
    return Path(root) / variant.spec_name / variant.name / f"seed{seed}"


def checkpoint_dir(variant: Variant, seed: int, root="checkpoints") -> Path:
    return Path(root) / variant.spec_name / variant.name / f"seed{seed}"


# --------------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------------
def rng_state(device: torch.device) -> dict:
    """Python, NumPy, torch CPU and (this rank's device only) CUDA generator states; every rank's go into
    the checkpoint and :func:`set_rng_state` restores them, so a resumed run draws the same dropout masks."""
    out = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(s: dict, device: torch.device) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], device)


# --------------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, obj: dict) -> None:
    """torch.save to a temporary file beside ``path``, fsync, then rename over it (never a half file).

    The temporary's name is fixed (``.last.pt.tmp``; one writer per folder, see runlock.py): a write cut
    short by SIGKILL leaves at most one, which the next write replaces and the next start removes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:   # disk full, read-only: one sentence naming the checkpoint
        raise OutputError(describe_os_error(e, path)) from None
    except RuntimeError as e:   # torch's zip writer reports a failed write as a RuntimeError
        if "write" not in str(e):
            raise
        raise OutputError(f"cannot write {path}: {str(e).splitlines()[0]}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def read_checkpoint_file(path, map_location="cpu"):
    """``torch.load`` of a checkpoint file, whatever it holds; a missing, truncated or foreign file is a
    UserError naming it (shared by evaluate, decode-bench and uptrain)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    ck = read_checkpoint_file(path, map_location)
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT or "spec" not in ck:
        raise UserError(f"{path} is not a checkpoint written by mqa-repro train")
    return ck


def model_from_checkpoint(ck: dict, device="cpu") -> tuple:
    """(Variant, Transformer in eval mode) from a loaded checkpoint."""
    variant = Variant.from_dict(ck["spec"], source="<checkpoint>")
    if variant.hash != ck.get("spec_hash"):
        raise UserError("the checkpoint's spec does not match its recorded spec hash (written by another version?)")
    model = Transformer(variant.model)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError:
        raise UserError("the checkpoint's weights do not fit the model its spec describes") from None
    return variant, model.to(device).eval()


def _spec_diff(a: dict, b: dict, prefix="") -> list:
    keys = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += _spec_diff(x, y, f"{prefix}{k}.")
        elif x != y:
            keys.append(f"{prefix}{k}")
    return keys


# --------------------------------------------------------------------------------------------------
# Training hashes and resuming
# --------------------------------------------------------------------------------------------------
def checkpoint_training_hash(ck: dict) -> Optional[str]:
    """The training hash a checkpoint was written for: stored since it exists; for older checkpoints
    recomputed from the resolved spec they hold."""
    if ck.get("training_hash"):
        return ck["training_hash"]
    try:
        return Variant.from_dict(ck["spec"]).training_hash
    except Exception:  # noqa: BLE001 - a spec of an older schema: hash it as stored
        return training_hash(ck.get("spec") or {})


def manifest_training_hash(man: dict) -> Optional[str]:
    """The training hash of a run's manifest.json (recomputed from its spec for older manifests)."""
    if man.get("training_hash"):
        return man["training_hash"]
    return checkpoint_training_hash({"spec": man["spec"]}) if isinstance(man.get("spec"), dict) else None



def check_resumable(ck: dict, path: Path, variant: Variant, seed: int, data_hash: Optional[str],
                    data_path) -> None:
    """Raises ResumeError (a UserError naming ``path``) unless the checkpoint ``ck`` read from ``path``
    continues this run: the same training sections of the spec, the same seed, the same prepared data
    (fingerprint ``data_hash`` of the data at ``data_path``) and steps left to train."""
    if checkpoint_training_hash(ck) != variant.training_hash:   # evaluation/benchmark may differ
        diff = [k for k in _spec_diff(ck["spec"], variant.to_dict())
                if k.split(".")[0] in TRAINING_SECTIONS + ("schema_version",)]
        raise ResumeError(f"the checkpoint at {path} was trained with a different spec "
                          f"(differs in {', '.join(diff) or 'its hash'})", "use the same spec and --set values")
    if ck["seed"] != seed:
        raise ResumeError(f"the checkpoint at {path} is for seed {ck['seed']}, not {seed}")
    if ck.get("data_manifest_hash") and ck["data_manifest_hash"] != data_hash:
        raise ResumeError(f"the prepared data at {data_path} is not the data the checkpoint at {path} was "
                          f"trained on (its fingerprint differs)", "pass the right --data")
    if ck["step"] >= variant.training.steps:
        raise ResumeError(f"the checkpoint at {path} has already finished all {variant.training.steps} steps")
