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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .errors import OutputError, UserError
from .model import BOS, EOS, PAD, Transformer, count_parameters
from .provenance import check_writable, describe_os_error, manifest, sha256_file, write_json_atomic
from .runtime import Progress, autocast, resolve_device
from .spec import TRAINING_SECTIONS, Variant, spec_hash, training_hash

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


@dataclass
class Batch:
    tgt_in_BT: torch.Tensor
    tgt_out_BT: torch.Tensor
    tgt_seg_BT: torch.Tensor
    src_BS: Optional[torch.Tensor] = None
    src_seg_BS: Optional[torch.Tensor] = None

    def to(self, device) -> "Batch":
        pin = device.type == "cuda"
        move = lambda x: None if x is None else (x.pin_memory() if pin else x).to(device, non_blocking=pin)  # noqa
        return Batch(*(move(x) for x in (self.tgt_in_BT, self.tgt_out_BT, self.tgt_seg_BT, self.src_BS,
                                         self.src_seg_BS)))


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


# --------------------------------------------------------------------------------------------------
# Loss, schedule, optimizer
# --------------------------------------------------------------------------------------------------
def token_losses(logits_BTV, targets_BT, vocab_size: int, label_smoothing: float = 0.0):
    """Per-token (smoothed loss, NLL, logsumexp) in float32 over the real vocabulary (no padded rows)."""
    logits = logits_BTV[..., :vocab_size].float()
    lse_BT = torch.logsumexp(logits, dim=-1)
    tgt_logit_BT = logits.gather(-1, targets_BT.clamp(min=0)[..., None])[..., 0]
    nll_BT = lse_BT - tgt_logit_BT
    if label_smoothing:
        smooth_BT = lse_BT - logits.mean(-1)
        loss_BT = (1.0 - label_smoothing) * nll_BT + label_smoothing * smooth_BT
    else:
        loss_BT = nll_BT
    return loss_BT, nll_BT, lse_BT


def lr_at(step: int, t) -> float:
    """Learning rate for optimizer step ``step`` (1-based) under ``t`` (a TrainingSpec).

    rsqrt_linear (the paper): lr / sqrt(max(step, warmup)) * (1 - step / steps), i.e. a constant
    lr / sqrt(warmup) during warm-up (mesh-tensorflow's rsqrt_decay), then 1/sqrt decay, times a linear
    decay to 0 at the last step. inverse_sqrt: linear warm-up to lr, then lr * sqrt(warmup / step).
    cosine: linear warm-up to lr, then half a cosine to 0. constant: linear warm-up, then lr.
    """
    s, w, n = max(step, 1), t.warmup_steps, t.steps
    warm = min(1.0, s / w) if w else 1.0
    if t.schedule == "rsqrt_linear":
        return t.lr / math.sqrt(max(s, w, 1)) * max(0.0, 1.0 - (s - 1) / n)
    if t.schedule == "inverse_sqrt":
        return t.lr * warm * (math.sqrt(w / s) if w and s > w else 1.0 if w else 1.0 / math.sqrt(s))
    if t.schedule == "cosine":
        if w and s <= w:
            return t.lr * warm
        frac = (s - w) / max(1, n - w)
        return t.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
    return t.lr * warm


def build_optimizer(model: torch.nn.Module, t) -> torch.optim.Optimizer:
    """AdamW (weight decay on matrices only) or Adafactor (factored second moments, update clipping by
    parameter scale as in torch.optim.Adafactor; the schedule sets its step size)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer == "adafactor":
        if not hasattr(torch.optim, "Adafactor"):
            raise UserError("training.optimizer adafactor needs torch >= 2.5 (torch.optim.Adafactor)")
        return torch.optim.Adafactor(groups, lr=lr_at(1, t))
    return torch.optim.AdamW(groups, lr=lr_at(1, t), betas=tuple(t.betas), eps=1e-9)


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
                  init: Optional[dict] = None) -> TrainResult:
    """Train one variant with one seed; returns where its results and checkpoint went.

    ``init`` starts a fresh run from given weights instead of random ones: ``{"model": state_dict,
    "provenance": dict}`` (``mqa-repro uptrain``); the provenance is kept in the checkpoint and manifest.

    ``stop_after`` ends the run (checkpoint written) after that step although the schedule still runs
    to ``training.steps``: what a preempted job looks like; ``resume=True`` continues it.
    Run under torchrun for DDP: every rank calls this; only rank 0 writes files.
    """
    t = variant.training
    seed = t.seed if seed is None else seed
    dev = resolve_device(device) if isinstance(device, str) else device
    dist_ = init_distributed(dev)
    try:
        with _own_run(run_dir(variant, seed, out_root), checkpoint_dir(variant, seed, checkpoint_root), dist_,
                      "uptrain" if init is not None else "train"):
            return _train(variant, seed, dev, dist_, resume, Path(out_root), Path(checkpoint_root), data,
                          stop_after, progress, init)
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
           init=None) -> TrainResult:
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
                "rng": states, "data": stream.position, "world_size": d.world,
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
    win = {"loss": 0.0, "nll": 0.0, "tokens": 0, "time": 0.0, "steps": 0}
    model.train()
    try:
        with _StopFlag() as stop:
            while step < end:
                t0 = time.perf_counter()
                rows = stream.next()
                n_global = target_tokens(train_ex, rows)
                mine = rows[d.rank::d.world]
                micro = split_rows(mine, train_ex, t.micro_batch_tokens)
                lr = lr_at(step + 1, t)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                # loss, nll, target tokens, grad norm, stop signal: one all-reduce and one sync per step
                sums = torch.zeros(5, dtype=torch.float64, device=dev)
                for k, mrows in enumerate(micro):
                    b = collate(train_ex, mrows).to(dev)
                    sync = k == len(micro) - 1
                    ctx = ddp_model.no_sync() if (d.on and not sync) else contextlib.nullcontext()
                    with ctx:
                        with autocast(dev):
                            logits = ddp_model(b.tgt_in_BT, b.src_BS, b.tgt_seg_BT, b.src_seg_BS)
                        loss_BT, nll_BT, lse_BT = token_losses(logits, b.tgt_out_BT, variant.model.vocab_size,
                                                               t.label_smoothing)
                        mask_BT = b.tgt_out_BT != PAD
                        if t.z_loss:
                            loss_BT = loss_BT + t.z_loss * lse_BT.square()
                        loss_sum = loss_BT.masked_fill(~mask_BT, 0.0).sum()
                        if nan_step and step + 1 == nan_step:
                            loss_sum = loss_sum * float("nan")
                        # Every rank divides by the GLOBAL token count; DDP averages over ranks: x world.
                        (loss_sum * (d.world / n_global)).backward()
                    sums[0] += loss_sum.detach()
                    sums[1] += nll_BT.detach().masked_fill(~mask_BT, 0.0).sum()
                    sums[2] += mask_BT.sum()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                if d.main:   # gradients are identical on every rank after DDP's all-reduce: count the norm once
                    sums[3] += grad_norm.detach()
                sums[4] += float(stop.signum != 0)
                loss_sum_g, nll_sum_g, _, gnorm, stop_votes = _all_sum(sums, d).tolist()
                loss, nll = loss_sum_g / n_global, nll_sum_g / n_global
                if not (math.isfinite(loss) and math.isfinite(gnorm)):
                    last = load_checkpoint(ckpt_path)["step"] if ckpt_path.is_file() else None
                    kept = (f"the last good checkpoint (step {last}) is kept at {ckpt_path}" if last is not None
                            else "no checkpoint had been written yet")
                    raise TrainingDiverged(f"training stopped at step {step + 1}: the loss is "
                                           f"{'NaN' if math.isnan(loss) else loss} (grad norm {gnorm}); {kept}")
                optimizer.step()
                step += 1
                dt = time.perf_counter() - t0
                losses.append((step, loss))
                win["loss"] += loss
                win["nll"] += nll
                win["tokens"] += n_global
                win["time"] += dt
                win["steps"] += 1
                rep.step(step, f"loss {loss:.3f} lr {lr:.2e}")
                if step % t.log_every == 0 or step == end:
                    rec = {"step": step, "loss": win["loss"] / win["steps"], "nll": win["nll"] / win["steps"],
                           "lr": lr, "grad_norm": gnorm, "tokens_per_s": win["tokens"] / max(win["time"], 1e-9),
                           "tgt_tokens": n_global, "epoch": stream.epoch}
                    _write(log, rec)
                    rep.line(f"step {step}  loss {rec['loss']:.4f}  lr {lr:.3g}  |g| {gnorm:.3g}  "
                             f"{rec['tokens_per_s']:.0f} tok/s")
                    win = {"loss": 0.0, "nll": 0.0, "tokens": 0, "time": 0.0, "steps": 0}
                if step % t.eval_every == 0 or step == t.steps:
                    dev_ln_ppl = dev_eval()
                    _write(log, {"step": step, "dev_ln_ppl": dev_ln_ppl})
                    rep.line(f"step {step}  dev ln(ppl) {dev_ln_ppl:.4f}")
                if step % t.checkpoint_every == 0 or step == end:
                    checkpoint(step)
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
