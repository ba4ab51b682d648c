"""Training: the paper's recipe, token-budget batches with packing, checkpoints that resume exactly.

Shape legend (as in model.py): B rows of a batch, T target positions, S source positions, V vocabulary.

One step:
  * the *global* batch (``training.batch_tokens`` target tokens, padding included) is planned identically on
    every rank from ``(seed, epoch)``; rank r trains on rows r, r + world, ...; every rank divides its summed
    loss by the global number of target tokens, so DDP's gradient average equals one process's gradient;
  * with ``training.pack`` short examples share a row of ``data.max_len`` positions (segment ids keep
    them apart; ``model.py`` restarts positions and masks attention per segment);
  * loss = (1 - eps) * NLL + eps * mean(-log p) over the real vocabulary (label smoothing)
    + z_loss * logsumexp(logits)^2, summed over target tokens, divided by the global token count;
  * gradients clipped to ``training.grad_clip``; the learning rate is a function of the step only.

Checkpoints (``last.pt``, written to a temporary file and renamed) hold the model, the optimizer, the
schedule, every rank's RNG states, the data position (epoch, batch) and the resolved spec. Resuming
restores all of them: on the CPU N steps + resume N steps gives bitwise the parameters of 2N steps.

Test hook: the environment variable ``MQA_REPRO_INJECT_NAN_AT_STEP=K`` turns the loss of step K into NaN
(to check that a diverging run stops cleanly and keeps its last good checkpoint).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .errors import OutputError, UserError
from .loss import token_losses  # moved to mqa_repro.loss (corpus_nll uses it; still importable from here)
from .model import BOS, EOS, PAD, Transformer, count_parameters
from .optim import build_optimizer, lr_at  # moved to mqa_repro.optim (still importable from here)
from .provenance import check_writable, describe_os_error, manifest, write_json_atomic
from .runtime import Progress, autocast, resolve_device
from .spec import TRAINING_SECTIONS, Variant, spec_hash, training_hash
from .step import Batch, StepOptions, TrainStep, measured_peak, model_flops, speed_record  # Batch: moved there

CHECKPOINT_FORMAT = 1
CHECKPOINT_NAME = "last.pt"
NAN_ENV = "MQA_REPRO_INJECT_NAN_AT_STEP"


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(UserError):
    """SIGINT / SIGTERM: a checkpoint was saved, ``--resume`` continues."""


# --------------------------------------------------------------------------------------------------
# Where things go
# --------------------------------------------------------------------------------------------------
def run_dir(variant: Variant, seed: int, root="results") -> Path:
    return Path(root) / variant.spec_name / variant.name / f"seed{seed}"


def checkpoint_dir(variant: Variant, seed: int, root="checkpoints") -> Path:
    return Path(root) / variant.spec_name / variant.name / f"seed{seed}"


# --------------------------------------------------------------------------------------------------
# Examples: token arrays from the prepared data, BOS/EOS added here
# --------------------------------------------------------------------------------------------------
@dataclass
class Examples:
    """One split as lists of id arrays (no BOS/EOS). ``src`` is None for language models."""

    tgt: list
    src: Optional[list] = None

    def __len__(self):
        return len(self.tgt)

    @property
    def tgt_lens(self) -> np.ndarray:   # target tokens the model predicts: ids + EOS
        return np.fromiter((len(t) + 1 for t in self.tgt), dtype=np.int64, count=len(self.tgt))

    @property
    def src_lens(self) -> np.ndarray:
        if self.src is None:
            return np.zeros(len(self.tgt), dtype=np.int64)
        return np.fromiter((len(s) + 1 for s in self.src), dtype=np.int64, count=len(self.src))


def _read_side(arr, limit: Optional[int], max_tokens: int) -> list:
    n = len(arr) if limit is None else min(limit, len(arr))
    return [np.asarray(arr[i], dtype=np.int64)[:max_tokens] for i in range(n)]


def load_examples(prepared, variant: Variant, stem: str, limit: Optional[int] = None) -> Examples:
    """Split ``stem`` as Examples; each side is cut to data.max_len - 1 ids so that ids + BOS/EOS fit."""
    d = variant.data
    keep = d.max_len - 1
    try:
        if variant.model.is_seq2seq:
            return Examples(tgt=_read_side(prepared.split(stem, d.tgt_lang), limit, keep),
                            src=_read_side(prepared.split(stem, d.src_lang), limit, keep))
        return Examples(tgt=_read_side(prepared.split(stem, "text"), limit, keep))
    except (FileNotFoundError, KeyError) as e:
        raise UserError(f"the prepared data in {prepared.path} has no split {stem!r} ({e}); "
                        f"run `mqa-repro prepare` for this spec again") from None


def open_prepared(variant: Variant, data: Optional[Path] = None):
    """``load_prepared`` with a clear sentence when the data is missing or does not fit the model."""
    from .data import load_prepared, prepared_dir

    path = Path(data) if data is not None else prepared_dir(variant)
    if not (path / "manifest.json").is_file():
        spec_hint = variant.source if variant.source.endswith((".yaml", ".yml")) else f"experiments/{variant.spec_name}.yaml"
        raise UserError(f"no prepared data at {path}; run `mqa-repro prepare {spec_hint}` first (or pass --data DIR)")
    prepared = load_prepared(path, variant)
    n_pieces = prepared.sp.get_piece_size()
    if n_pieces > variant.model.vocab_size:
        raise UserError(f"the prepared data in {path} has {n_pieces} subwords but model.vocab_size is "
                        f"{variant.model.vocab_size}; prepare the data for this spec")
    return prepared


def data_fingerprint(prepared) -> Optional[str]:
    """A hash of what the prepared data IS, not of where or when it was made: the data section, the
    SentencePiece model, the source files' content and every split's counts and text hashes. Two prepares
    of the same inputs, in different folders or at different times, have the same fingerprint."""
    m = getattr(prepared, "manifest", None)
    if not m:
        return None
    content = {"data_hash": m.get("data_hash"), "spm": (m.get("spm") or {}).get("sha256"),
               "sources": sorted(s.get("sha256") or "" for s in m.get("sources", []) if isinstance(s, dict)),
               "splits": m.get("splits")}
    return spec_hash(content)


# --------------------------------------------------------------------------------------------------
# Batches: a plan of rows (lists of example indices) per global step, deterministic from (seed, epoch)
# --------------------------------------------------------------------------------------------------
def _pack_rows(order: np.ndarray, src_lens, tgt_lens, row_len: int, open_rows: int = 32) -> list:
    """First-fit packing of examples (in ``order``) into rows of ``row_len`` source and target slots."""
    rows, rows_free = [], []            # open rows and their free (source, target) slots
    done = []
    for i in order:
        s, t = int(src_lens[i]), int(tgt_lens[i])
        for r, (fs, ft) in enumerate(rows_free):
            if s <= fs and t <= ft:
                rows[r].append(int(i))
                rows_free[r] = (fs - s, ft - t)
                break
        else:
            if len(rows) == open_rows:      # close the oldest open row
                done.append(rows.pop(0))
                rows_free.pop(0)
            rows.append([int(i)])
            rows_free.append((row_len - s, row_len - t))
    return done + rows


def plan_epoch(ex: Examples, seed: int, epoch: int, batch_tokens: int, row_len: int, pack: bool) -> list:
    """Global batches of one epoch: a list of batches, each a list of rows, each a list of example indices.

    Packed: rows of ``row_len`` slots, ``batch_tokens // row_len`` rows a batch. Unpacked: examples of
    similar length share a batch while rows * longest target <= ``batch_tokens``.
    """
    rng = np.random.default_rng([seed, epoch])
    src_lens, tgt_lens = ex.src_lens, ex.tgt_lens
    order = rng.permutation(len(ex))
    if pack:
        rows = _pack_rows(order, src_lens, tgt_lens, row_len)
        per_batch = max(1, batch_tokens // row_len)
        batches = [rows[i:i + per_batch] for i in range(0, len(rows), per_batch)]
    else:
        batches = []
        pool = max(1, 100 * batch_tokens // max(1, int(tgt_lens.mean())))
        for start in range(0, len(order), pool):
            chunk = order[start:start + pool]
            chunk = chunk[np.lexsort((src_lens[chunk], tgt_lens[chunk]))]
            rows, width = [], 0
            for i in chunk:
                w = max(width, int(tgt_lens[i]))
                if rows and (len(rows) + 1) * w > batch_tokens:
                    batches.append(rows)
                    rows, w = [], int(tgt_lens[i])
                rows.append([int(i)])
                width = w
            if rows:
                batches.append(rows)
        batches = [batches[j] for j in rng.permutation(len(batches))]
    return batches


def target_tokens(ex: Examples, rows: list) -> int:
    lens = ex.tgt_lens
    return int(sum(lens[i] for row in rows for i in row))


def collate(ex: Examples, rows: list) -> Batch:
    """Rows of example indices -> padded id tensors with segment ids (1, 2, ... per example; 0 = PAD)."""
    n = max(1, len(rows))
    t_width = max([sum(len(ex.tgt[i]) + 1 for i in row) for row in rows] + [1])
    tgt_in = np.full((n, t_width), PAD, dtype=np.int64)
    tgt_out = np.full((n, t_width), PAD, dtype=np.int64)
    tgt_seg = np.zeros((n, t_width), dtype=np.int64)
    src = src_seg = None
    if ex.src is not None:
        s_width = max([sum(len(ex.src[i]) + 1 for i in row) for row in rows] + [1])
        src = np.full((n, s_width), PAD, dtype=np.int64)
        src_seg = np.zeros((n, s_width), dtype=np.int64)
    for r, row in enumerate(rows):
        tp = sp = 0
        for k, i in enumerate(row, start=1):
            t = ex.tgt[i]
            tgt_in[r, tp] = BOS
            tgt_in[r, tp + 1: tp + 1 + len(t)] = t
            tgt_out[r, tp: tp + len(t)] = t
            tgt_out[r, tp + len(t)] = EOS
            tgt_seg[r, tp: tp + len(t) + 1] = k
            tp += len(t) + 1
            if src is not None:
                s = ex.src[i]
                src[r, sp: sp + len(s)] = s
                src[r, sp + len(s)] = EOS
                src_seg[r, sp: sp + len(s) + 1] = k
                sp += len(s) + 1
    as_t = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    return Batch(as_t(tgt_in), as_t(tgt_out), as_t(tgt_seg), as_t(src), as_t(src_seg))


def split_rows(rows: list, ex: Examples, max_tokens: Optional[int]) -> list:
    """Micro-batches of consecutive rows with rows * widest target <= max_tokens (None: one)."""
    if not max_tokens or not rows:
        return [rows]
    out, cur, width = [], [], 0
    for row in rows:
        w = max(width, sum(len(ex.tgt[i]) + 1 for i in row))
        if cur and (len(cur) + 1) * w > max_tokens:
            out.append(cur)
            cur, w = [], sum(len(ex.tgt[i]) + 1 for i in row)
        cur.append(row)
        width = w
    out.append(cur)
    return out


class BatchStream:
    """Global batches forever (epoch after epoch); ``position`` = (epoch, next batch) resumes exactly."""

    def __init__(self, ex: Examples, seed: int, batch_tokens: int, row_len: int, pack: bool,
                 epoch: int = 0, index: int = 0):
        self.ex, self.seed, self.batch_tokens, self.row_len, self.pack = ex, seed, batch_tokens, row_len, pack
        self.epoch, self.index = epoch, index
        self._plan = None

    def _batches(self):
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, plan_epoch(self.ex, self.seed, self.epoch, self.batch_tokens,
                                                 self.row_len, self.pack))
        return self._plan[1]

    def next(self) -> list:
        batches = self._batches()
        if self.index >= len(batches):
            self.epoch, self.index = self.epoch + 1, 0
            batches = self._batches()
        rows = batches[self.index]
        self.index += 1
        return rows

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}


class Prefetcher:
    """A BatchStream's global batches as this rank's micro-batches, collated and on the device.

    ``prefetch()`` (called right after a step is queued on the GPU) collates the next batch and starts its
    non-blocking copies from pinned memory while the step runs; ``next()`` hands it out. ``position`` is the
    stream position after the batch last handed out (what a checkpoint saves), not after the prefetched one.
    """

    @dataclass
    class Item:
        n_global: int                 # target tokens of the global batch (all ranks)
        micro: list                   # this rank's micro-batches, prepared (padded, on the device)
        shapes: list                  # (target tokens, target width) of each micro-batch, host numbers

    def __init__(self, stream: BatchStream, ex: Examples, rank: int, world: int, micro_tokens, prepare):
        self.stream, self.ex, self.rank, self.world = stream, ex, rank, world
        self.micro_tokens, self.prepare = micro_tokens, prepare
        self.position = stream.position
        self._next = None

    def _load(self):
        rows = self.stream.next()
        after = self.stream.position
        mine = rows[self.rank::self.world]
        micro, shapes = [], []
        for mrows in split_rows(mine, self.ex, self.micro_tokens):
            b = collate(self.ex, mrows)
            shapes.append((target_tokens(self.ex, mrows), int(b.tgt_in_BT.shape[1])))
            micro.append(self.prepare(b))
        return after, self.Item(target_tokens(self.ex, rows), micro, shapes)

    def prefetch(self) -> None:
        if self._next is None:
            self._next = self._load()

    def next(self) -> "Prefetcher.Item":
        after, item = self._next if self._next is not None else self._load()
        self._next = None
        self.position = after
        return item


# --------------------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    group_started_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def init_distributed(device: torch.device) -> Dist:
    """torchrun sets WORLD_SIZE/RANK: start a process group (NCCL on GPUs, gloo on the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    started = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        started = True
    return Dist(dist.get_rank(), dist.get_world_size(), started)


def _all_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.on:
        import torch.distributed as dist

        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


# --------------------------------------------------------------------------------------------------
# RNG and checkpoints
# --------------------------------------------------------------------------------------------------
def rng_state(device: torch.device) -> dict:
    """Python, NumPy, torch CPU and (this rank's device only) CUDA generator states."""
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
# Perplexity (shared with evaluate)
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def corpus_nll(model: Transformer, ex: Examples, device, batch_tokens: int = 8192, progress=None,
               eos_scored: Optional[np.ndarray] = None) -> tuple:
    """(summed NLL in nats, target tokens incl. EOS, per-example NLL) over ``ex``, unpacked, by length.

    ``eos_scored`` (bool [len(ex)], default all true): where false, the example's EOS is neither scored nor
    counted (a piece of a long line that the next piece continues: its line has not ended there)."""
    was_training = model.training
    model.eval()
    vocab = model.spec.vocab_size
    order = np.argsort(ex.tgt_lens, kind="stable")
    per_example = np.zeros(len(ex), dtype=np.float64)
    total, count = 0.0, 0
    i = 0
    lens = ex.tgt_lens
    while i < len(order):
        j = i + 1
        while j < len(order) and (j - i + 1) * lens[order[j]] <= batch_tokens:
            j += 1
        idx = order[i:j]
        b = collate(ex, [[int(k)] for k in idx]).to(device)
        with autocast(device):
            logits = model(b.tgt_in_BT, b.src_BS, b.tgt_seg_BT, b.src_seg_BS)
        _, nll_BT, _ = token_losses(logits, b.tgt_out_BT, vocab)
        scored_BT = b.tgt_out_BT != PAD
        if eos_scored is not None:
            for r, k in enumerate(idx):
                if not eos_scored[k]:
                    scored_BT[r, len(ex.tgt[k])] = False
        nll_BT = nll_BT.masked_fill(~scored_BT, 0.0).double()
        per_row = nll_BT.sum(1).cpu().numpy()
        per_example[idx] = per_row
        total += float(per_row.sum())
        count += int(scored_BT.sum())
        if progress is not None:
            progress(len(idx))
        i = j
    model.train(was_training)
    return total, count, per_example


# --------------------------------------------------------------------------------------------------
# Stopping on a signal
# --------------------------------------------------------------------------------------------------
class _StopFlag:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint at the end of the step and exits."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum:            # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    step: int
    dev_ln_ppl: Optional[float]
    losses: list = field(default_factory=list)   # (step, loss) of the logged steps


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_variant(variant: Variant, seed: Optional[int] = None, *, device="auto", resume: bool = False,
                  out_root="results", checkpoint_root="checkpoints", data: Optional[Path] = None,
                  stop_after: Optional[int] = None, progress: bool = True,
                  init: Optional[dict] = None, step_options: Optional[StepOptions] = None) -> TrainResult:
    """Train one variant with one seed; returns where its results and checkpoint went.

    ``init`` starts a fresh run from given weights instead of random ones: ``{"model": state_dict,
    "provenance": dict}`` (``mqa-repro uptrain``); the provenance is kept in the checkpoint and manifest.

    ``stop_after`` ends the run (checkpoint written) after that step although the schedule still runs
    to ``training.steps``: what a preempted job looks like; ``resume=True`` continues it.
    Run under torchrun for DDP: every rank calls this; only rank 0 writes files.
    ``step_options``: how the step runs (torch.compile, fused optimizer, padding; mqa_repro.step.StepOptions;
    default: auto per device) -- never what it computes.
    """
    t = variant.training
    seed = t.seed if seed is None else seed
    dev = resolve_device(device) if isinstance(device, str) else device
    dist_ = init_distributed(dev)
    try:
        with _own_run(run_dir(variant, seed, out_root), checkpoint_dir(variant, seed, checkpoint_root), dist_,
                      "uptrain" if init is not None else "train"):
            return _train(variant, seed, dev, dist_, resume, Path(out_root), Path(checkpoint_root), data,
                          stop_after, progress, init, step_options)
    finally:
        if dist_.group_started_here:
            import torch.distributed as dist

            dist.destroy_process_group()


@contextlib.contextmanager
def _own_run(rdir: Path, cdir: Path, d: "Dist", command: str):
    """Rank 0 holds the run and checkpoint folders (runlock.own) and removes stale temporaries there; every
    rank learns whether it could, so that a refused torchrun stops on all ranks instead of hanging."""
    from .runlock import clean_temporaries, own, stderr_line

    with contextlib.ExitStack() as stack:
        refused = None
        if d.main:
            try:
                stack.enter_context(own(rdir, cdir, command=f"mqa-repro {command}"))
            except UserError as e:
                refused = e
        if d.on:
            flag = torch.tensor([1.0 if refused else 0.0], device=_collective_device(d))
            if _all_sum(flag, d).item() and refused is None:
                raise UserError(f"rank 0 could not take {rdir} (another process holds it)")
        if refused is not None:
            raise refused
        if d.main:
            for folder in (rdir, cdir):
                clean_temporaries(folder, stderr_line)
        yield


def _collective_device(d: "Dist") -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


def _train(variant, seed, dev, d: Dist, resume, out_root, ckpt_root, data, stop_after, progress,
           init=None, step_options=None) -> TrainResult:
    t = variant.training
    rdir, cdir = run_dir(variant, seed, out_root), checkpoint_dir(variant, seed, ckpt_root)
    ckpt_path = cdir / CHECKPOINT_NAME
    log_path = rdir / "train_log.jsonl"
    if d.main:   # before any work: an unwritable results or checkpoint folder is one sentence now
        check_writable(rdir, "dir", "run folder")
        check_writable(cdir, "dir", "checkpoint folder")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    prepared = open_prepared(variant, data)
    train_ex = _concat([load_examples(prepared, variant, stem) for stem in variant.data.train])
    dev_ex = load_examples(prepared, variant, variant.data.dev)

    ck = None
    if resume:
        if not ckpt_path.is_file():
            raise UserError(f"--resume: no checkpoint at {ckpt_path} (train without --resume to start)")
        ck = load_checkpoint(ckpt_path)
        if checkpoint_training_hash(ck) != variant.training_hash:   # evaluation/benchmark may differ
            diff = [k for k in _spec_diff(ck["spec"], variant.to_dict())
                    if k.split(".")[0] in TRAINING_SECTIONS + ("schema_version",)]
            raise UserError(f"--resume: the checkpoint at {ckpt_path} was trained with a different spec "
                            f"(differs in {', '.join(diff) or 'its hash'}); use the same spec and --set values")
        if ck["seed"] != seed:
            raise UserError(f"--resume: the checkpoint at {ckpt_path} is for seed {ck['seed']}, not {seed}")
        if ck.get("data_manifest_hash") and ck["data_manifest_hash"] != data_fingerprint(prepared):
            raise UserError(f"--resume: the prepared data at {prepared.path} is not the data the checkpoint at "
                            f"{ckpt_path} was trained on (its fingerprint differs); pass the right --data")
        if ck["step"] >= t.steps:
            raise UserError(f"--resume: the checkpoint at {ckpt_path} has already finished all {t.steps} steps")
    elif ckpt_path.is_file():
        raise UserError(f"a checkpoint already exists at {ckpt_path}; pass --resume to continue it, "
                        f"or delete it to start over")

    _seed_everything(seed)          # same initial weights on every rank
    model = Transformer(variant.model).to(dev)
    optimizer = build_optimizer(model, t)
    stream = BatchStream(train_ex, seed, t.batch_tokens, variant.data.max_len, t.pack)
    step, dev_ln_ppl = 0, None
    init_info = (init or {}).get("provenance")
    if init is not None and ck is None:
        model.load_state_dict(init["model"])
    if ck is not None:
        init_info = ck.get("init")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        step = ck["step"]
        stream.epoch, stream.index = ck["data"]["epoch"], ck["data"]["index"]
        dev_ln_ppl = ck.get("dev_ln_ppl")
        states = ck["rng"]
        if len(states) == d.world:
            set_rng_state(states[d.rank], dev)
        else:
            _seed_everything(seed * 1000 + d.rank + 1 + step)
    else:
        _seed_everything(seed * 1000 + d.rank + 1)   # dropout differs per rank
    ddp_model = model
    if d.on:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    data_hash = data_fingerprint(prepared)
    n_params = count_parameters(model)
    if d.main:
        rdir.mkdir(parents=True, exist_ok=True)
        _trim_log(log_path, step)
        write_json_atomic(rdir / "manifest.json", manifest(
            variant, seed, dev, checkpoint=str(ckpt_path.resolve()), checkpoint_step=step,
            data_dir=str(Path(prepared.path).resolve()), data_manifest_hash=data_hash,
            tokenizer=prepared.tokenizer(), world_size=d.world, parameters=n_params, status="training",
            training_hash=variant.training_hash,
            **_init_field(init_info)))

    saved = {"step": step if ck is not None else None}   # the step of the checkpoint on disk

    def checkpoint(at_step):
        states = _gather_rng(d, dev)
        if d.main:
            save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "step": at_step, "seed": seed,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": {"name": t.schedule, "step": at_step, "lr": lr_at(at_step, t)},
                "rng": states, "data": batches.position, "world_size": d.world,
                "spec": variant.to_dict(), "spec_hash": variant.hash, "training_hash": variant.training_hash,
                "data_manifest_hash": data_hash,
                "dev_ln_ppl": dev_ln_ppl, "init": init_info})
        saved["step"] = at_step

    def dev_eval():
        total, count, _ = corpus_nll(model, dev_ex, dev, batch_tokens=max(t.batch_tokens, 4096))
        return total / max(count, 1)

    nan_step = int(os.environ.get(NAN_ENV, "0") or 0)
    end = t.steps if stop_after is None else min(t.steps, stop_after)
    title = f"{variant.spec_name}/{variant.name}/seed{seed}"
    rep = Progress(title, t.steps, step, enabled=progress and d.main)
    log = open(log_path, "a", encoding="utf-8") if d.main else None
    losses = []
    # The step (mqa_repro.step): its numbers are read one step late, so the host never waits inside a step.
    train_step = TrainStep(model, optimizer, t, dev, ddp_model=ddp_model if d.on else None, rank=d.rank,
                           world=d.world, options=step_options)
    batches = Prefetcher(stream, train_ex, d.rank, d.world, t.micro_batch_tokens, train_step.prepare)
    peak = measured_peak(dev) if d.main else None   # only rank 0 logs

    def new_window():
        return {"loss": 0.0, "nll": 0.0, "tokens": 0, "flops": 0.0, "steps": 0, "start": time.perf_counter(),
                "paused": 0.0}

    win = new_window()

    def finish(pending) -> bool:
        """Read a queued step's numbers (waits for that step only): NaN check, log. Returns its stop vote."""
        nonlocal win
        at, lr_at_step, n_global, flops, epoch, stats = pending
        v = stats.read()
        loss, nll, gnorm = v["loss"], v["nll"], v["grad_norm"]
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            last = load_checkpoint(ckpt_path)["step"] if ckpt_path.is_file() else None
            kept = (f"the last good checkpoint (step {last}) is kept at {ckpt_path}" if last is not None
                    else "no checkpoint had been written yet")
            raise TrainingDiverged(f"training stopped at step {at}: the loss is "
                                   f"{'NaN' if math.isnan(loss) else loss} (grad norm {gnorm}); {kept}")
        losses.append((at, loss))
        win["loss"] += loss
        win["nll"] += nll
        win["tokens"] += n_global
        win["flops"] += flops
        win["steps"] += 1
        rep.step(at, f"loss {loss:.3f} lr {lr_at_step:.2e}")
        if at % t.log_every == 0 or at == end:
            seconds = time.perf_counter() - win["start"] - win["paused"]
            speed = speed_record(win["tokens"], seconds, win["flops"], win["steps"], t.steps, peak)
            rec = {"step": at, "loss": win["loss"] / win["steps"], "nll": win["nll"] / win["steps"],
                   "lr": lr_at_step, "grad_norm": gnorm, **speed, "tgt_tokens": n_global, "epoch": epoch}
            _write(log, rec)
            mfu = f"  MFU {speed['mfu']:.1%}" if speed["mfu"] is not None else ""
            rep.line(f"step {at}  loss {rec['loss']:.4f}  lr {lr_at_step:.3g}  |g| {gnorm:.3g}  "
                     f"{rec['tokens_per_s']:.0f} tok/s{mfu}  all {t.steps} steps: "
                     f"{speed['projected_total_s'] / 3600:.2f} h")
            win = new_window()
        return v["stop"]

    model.train()
    pending = None
    try:
        with _StopFlag() as stop:
            while step < end:
                item = batches.next()
                lr = lr_at(step + 1, t)
                stats = train_step(item.micro, item.n_global, lr, stop=stop.signum != 0,
                                   poison=bool(nan_step) and step + 1 == nan_step)
                step += 1
                flops = sum(model_flops(variant.model, n, w, n_params) for n, w in item.shapes)
                if step < end:
                    batches.prefetch()        # collate and copy the next batch while this step runs
                stop_votes = finish(pending) if pending is not None else False
                pending = (step, lr, item.n_global, flops, batches.position["epoch"], stats)
                evaluating = step % t.eval_every == 0 or step == t.steps
                saving = step % t.checkpoint_every == 0 or step == end
                if evaluating or saving or stop_votes or step == end:
                    stop_votes = finish(pending) or stop_votes      # never save or evaluate an unread step
                    pending = None
                paused = time.perf_counter()
                if evaluating:
                    dev_ln_ppl = dev_eval()
                    _write(log, {"step": step, "dev_ln_ppl": dev_ln_ppl})
                    rep.line(f"step {step}  dev ln(ppl) {dev_ln_ppl:.4f}")
                if saving:
                    checkpoint(step)
                win["paused"] += time.perf_counter() - paused
                if stop_votes:
                    if step % t.checkpoint_every and step != end:
                        checkpoint(step)
                    raise TrainingInterrupted(f"stopped by signal at step {step}; checkpoint saved to {ckpt_path}; "
                                              f"continue with --resume")
    except BaseException as e:
        # The manifest never keeps saying "training" after the process stopped (SIGKILL aside): record why.
        if d.main:
            status = ("interrupted" if isinstance(e, (TrainingInterrupted, KeyboardInterrupt))
                      else "diverged" if isinstance(e, TrainingDiverged) else "failed")
            with contextlib.suppress(Exception):
                write_json_atomic(rdir / "manifest.json", manifest(
                    variant, seed, dev, checkpoint=str(ckpt_path.resolve()), checkpoint_step=saved["step"],
                    data_dir=str(Path(prepared.path).resolve()), data_manifest_hash=data_hash,
                    world_size=d.world, parameters=n_params, status=status, stopped_at_step=step,
                    reason=str(e) or type(e).__name__, dev_ln_ppl=dev_ln_ppl,
                    training_hash=variant.training_hash, **_init_field(init_info)))
        raise
    finally:
        rep.close()
        if log is not None:
            log.close()

    if d.main:
        status = "finished" if step >= t.steps else "stopped"
        write_json_atomic(rdir / "manifest.json", manifest(
            variant, seed, dev, checkpoint=str(ckpt_path.resolve()), checkpoint_step=step,
            data_dir=str(Path(prepared.path).resolve()), data_manifest_hash=data_hash,
            tokenizer=prepared.tokenizer(), world_size=d.world, parameters=n_params, status=status, dev_ln_ppl=dev_ln_ppl,
            training_hash=variant.training_hash, **_init_field(init_info)))
    return TrainResult(rdir, ckpt_path, step, dev_ln_ppl, losses)


def _init_field(info: Optional[dict]) -> dict:
    return {"init": info} if info else {}


def _concat(parts: list) -> Examples:
    if len(parts) == 1:
        return parts[0]
    src = None if parts[0].src is None else [s for p in parts for s in p.src]
    return Examples(tgt=[x for p in parts for x in p.tgt], src=src)


def _gather_rng(d: Dist, device) -> list:
    mine = rng_state(device)
    if not d.on:
        return [mine]
    import torch.distributed as dist

    out = [None] * d.world
    dist.all_gather_object(out, mine)
    return out


def _write(f, rec: dict) -> None:
    if f is not None:
        import json

        f.write(json.dumps(rec) + "\n")
        f.flush()


def _trim_log(path: Path, step: int) -> None:
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
    import json

    return json.dumps(rec) + "\n"


def _parse_log(path: Path) -> tuple:
    """(records, partial last line or None) of a JSON-lines log; lines end with ``\\n`` alone.

    Only the last line may be cut short (a write interrupted by SIGKILL); a bad line before it is a
    UserError naming the file and the line."""
    import json

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
