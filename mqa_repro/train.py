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

The loop is thin; its components live in their own modules: ``batching`` (examples, the plan of global
batches, the prefetcher), ``step`` (one optimizer step, read one step late), ``checkpoint`` (files, RNG
states, resume checks), ``distributed`` (the torchrun process group), ``trainlog`` (train_log.jsonl) and
``perplexity`` (the dev evaluation). ``_train`` is the run's named steps on a ``_Run``.

Test hook: the environment variable ``MQA_REPRO_INJECT_NAN_AT_STEP=K`` turns the loss of step K into NaN
(to check that a diverging run stops cleanly and keeps its last good checkpoint).
"""
from __future__ import annotations

import contextlib
import json
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

from .batching import BatchStream, Prefetcher, concat_examples, data_fingerprint, load_examples, open_prepared
from .checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_NAME, check_resumable, checkpoint_dir, load_checkpoint,
                         rng_state, run_dir, save_checkpoint, set_rng_state)
from .distributed import Dist, any_rank, end_distributed, gather_objects, init_distributed
from .errors import UserError
from .model import Transformer, count_parameters
from .optim import build_optimizer, lr_at
from .perplexity import corpus_nll
from .provenance import check_writable, manifest, write_json_atomic
from .runtime import Progress, resolve_device
from .spec import Variant
from .step import StepOptions, TrainStep, measured_peak, model_flops, speed_record
from .trainlog import LOG_NAME, trim_log, write_record

NAN_ENV = "MQA_REPRO_INJECT_NAN_AT_STEP"


class TrainingDiverged(UserError):
    """The loss became NaN or infinite at ``step``; the last good checkpoint is kept."""

    def __init__(self, message: str, step: Optional[int] = None):
        super().__init__(message)
        self.step = step


class TrainingInterrupted(UserError):
    """SIGINT / SIGTERM: a checkpoint was saved, ``--resume`` continues."""


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
                  init: Optional[dict] = None, step_options: Optional[StepOptions] = None,
                  overwrite: bool = False) -> TrainResult:
    """Train one variant with one seed; returns where its results and checkpoint went.

    ``init`` starts a fresh run from given weights instead of random ones: ``{"model": state_dict,
    "provenance": dict}`` (``mqa-repro uptrain``); the provenance is kept in the checkpoint and manifest.

    ``stop_after`` ends the run (checkpoint written) after that step although the schedule still runs
    to ``training.steps``: what a preempted job looks like; ``resume=True`` continues it.
    Run under torchrun for DDP: every rank calls this; only rank 0 writes files.
    ``step_options``: how the step runs (torch.compile, fused optimizer, padding; mqa_repro.step.StepOptions;
    default: auto per device) -- never what it computes.
    A fresh start (no ``resume``) refuses a run folder that already holds a run (its manifest.json) unless
    ``overwrite``, and never overwrites a checkpoint: UserError.
    """
    t = variant.training
    seed = t.seed if seed is None else seed
    dev = resolve_device(device) if isinstance(device, str) else device
    dist_ = init_distributed(dev)
    try:
        with _own_run(run_dir(variant, seed, out_root), checkpoint_dir(variant, seed, checkpoint_root), dist_,
                      "uptrain" if init is not None else "train"):
            return _train(variant, seed, dev, dist_, resume, Path(out_root), Path(checkpoint_root), data,
                          stop_after, progress, init, step_options, overwrite)
    finally:
        end_distributed(dist_)


@contextlib.contextmanager
def _own_run(rdir: Path, cdir: Path, d: Dist, command: str):
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
        if any_rank(refused is not None, d) and refused is None:
            raise UserError(f"rank 0 could not take {rdir} (another process holds it)")
        if refused is not None:
            raise refused
        if d.main:
            for folder in (rdir, cdir):
                clean_temporaries(folder, stderr_line)
        yield


def _train(variant, seed, dev, d: Dist, resume, out_root, ckpt_root, data, stop_after, progress,
           init=None, step_options=None, overwrite=False) -> TrainResult:
    """One run on this rank as named steps: check the folders, read the data, start or restore the state,
    record the start in the manifest, train, record the end."""
    run = _Run(variant, seed, dev, d, run_dir(variant, seed, out_root), checkpoint_dir(variant, seed, ckpt_root))
    run.check_folders()
    run.read_data(data)
    run.build(run.checkpoint_to_resume() if resume else run.no_checkpoint(overwrite), init)
    run.record_start()
    t = variant.training
    run.train(t.steps if stop_after is None else min(t.steps, stop_after), progress, step_options)
    run.record_end()
    return TrainResult(run.rdir, run.ckpt_path, run.step, run.dev_ln_ppl, run.losses)


class _Run:
    """One training run on this rank: its folders, data, model, optimizer and position, and the steps that
    make up ``_train``. Every rank holds one; only rank 0 (``d.main``) writes files."""

    def __init__(self, variant: Variant, seed: int, dev: torch.device, d: Dist, rdir: Path, cdir: Path):
        self.variant, self.t, self.seed, self.dev, self.d = variant, variant.training, seed, dev, d
        self.rdir, self.cdir = rdir, cdir
        self.ckpt_path = cdir / CHECKPOINT_NAME
        self.log_path = rdir / LOG_NAME
        self.step, self.dev_ln_ppl = 0, None
        self.saved_step = None          # the step of the checkpoint on disk
        self.losses = []                # (step, loss) of every step read

    def check_folders(self) -> None:
        if self.d.main:   # before any work: an unwritable results or checkpoint folder is one sentence now
            check_writable(self.rdir, "dir", "run folder")
            check_writable(self.cdir, "dir", "checkpoint folder")
        if self.dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def read_data(self, data: Optional[Path]) -> None:
        v = self.variant
        self.prepared = open_prepared(v, data)
        self.train_ex = concat_examples([load_examples(self.prepared, v, stem) for stem in v.data.train])
        self.dev_ex = load_examples(self.prepared, v, v.data.dev)
        self.data_hash = data_fingerprint(self.prepared)

    def checkpoint_to_resume(self) -> dict:
        """``--resume``: the checkpoint on disk, checked to continue this very run (checkpoint.check_resumable)."""
        if not self.ckpt_path.is_file():
            raise UserError(f"--resume: no checkpoint at {self.ckpt_path} (train without --resume to start)")
        ck = load_checkpoint(self.ckpt_path)
        check_resumable(ck, self.ckpt_path, self.variant, self.seed, self.data_hash, self.prepared.path)
        return ck

    def no_checkpoint(self, overwrite: bool = False) -> None:
        """A fresh start never overwrites a checkpoint, nor (unless ``overwrite``) a run already in the folder."""
        if self.ckpt_path.is_file():
            if overwrite:
                raise UserError(f"a checkpoint already exists at {self.ckpt_path}; --overwrite replaces a run "
                                f"folder's files but never a checkpoint: delete it to start over")
            raise UserError(f"a checkpoint already exists at {self.ckpt_path}; pass --resume to continue it (an "
                            f"unfinished run), or delete it to start over")
        man_path = self.rdir / "manifest.json"
        try:
            man = json.loads(man_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if (not overwrite and isinstance(man, dict) and isinstance(man.get("spec"), dict)
                and man.get("kind") != "prepared_data"):
            raise UserError(f"{man_path} already holds a run ({man.get('status', 'started')}, step "
                            f"{man.get('checkpoint_step', '?')}, spec hash {str(man.get('spec_hash', '?'))[:12]}) "
                            f"and there is no checkpoint to resume; pass --overwrite to replace it, or --out DIR "
                            f"to train elsewhere")

    def build(self, ck: Optional[dict], init: Optional[dict]) -> None:
        """Model, optimizer and data stream: fresh (from ``init``'s weights if given) or restored from ``ck``."""
        t, d = self.t, self.d
        _seed_everything(self.seed)          # same initial weights on every rank
        self.model = Transformer(self.variant.model).to(self.dev)
        self.optimizer = build_optimizer(self.model, t)
        self.stream = BatchStream(self.train_ex, self.seed, t.batch_tokens, self.variant.data.max_len, t.pack)
        self.init_info = (init or {}).get("provenance")
        if init is not None and ck is None:
            self.model.load_state_dict(init["model"])
        if ck is not None:
            self._restore(ck)
        else:
            _seed_everything(self.seed * 1000 + d.rank + 1)   # dropout differs per rank
        self.ddp_model = self.model
        if d.on:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # gradients live in DDP's all-reduce buckets (no copy into them each step): 2 H200s at 2 x 16k tokens
            # of the paper's model, 321k -> 350-365k target tokens/s (notes/training-speed.md)
            self.ddp_model = DDP(self.model, device_ids=[self.dev.index] if self.dev.type == "cuda" else None,
                                 gradient_as_bucket_view=True)
        self.n_params = count_parameters(self.model)

    def _restore(self, ck: dict) -> None:
        self.init_info = ck.get("init")
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.step = self.saved_step = ck["step"]
        self.stream.epoch, self.stream.index = ck["data"]["epoch"], ck["data"]["index"]
        self.dev_ln_ppl = ck.get("dev_ln_ppl")
        states = ck["rng"]
        if len(states) == self.d.world:
            set_rng_state(states[self.d.rank], self.dev)
        else:
            _seed_everything(self.seed * 1000 + self.d.rank + 1 + self.step)

    # -- the manifest ------------------------------------------------------------------------------
    def write_manifest(self, status: str, checkpoint_step: Optional[int], **extra) -> None:
        write_json_atomic(self.rdir / "manifest.json", manifest(
            self.variant, self.seed, self.dev, checkpoint=str(self.ckpt_path.resolve()),
            checkpoint_step=checkpoint_step, data_dir=str(Path(self.prepared.path).resolve()),
            data_manifest_hash=self.data_hash, world_size=self.d.world, parameters=self.n_params, status=status,
            **extra, training_hash=self.variant.training_hash, **_init_field(self.init_info)))

    def record_start(self) -> None:
        """Rank 0: the run folder, the log cut back to the checkpoint, the manifest saying "training"."""
        if self.d.main:
            self.rdir.mkdir(parents=True, exist_ok=True)
            trim_log(self.log_path, self.step)
            self.write_manifest("training", self.step, tokenizer=self.prepared.tokenizer())

    def record_stop(self, e: BaseException) -> None:
        """The manifest never keeps saying "training" after the process stopped (SIGKILL aside): record why."""
        if not self.d.main:
            return
        status = ("interrupted" if isinstance(e, (TrainingInterrupted, KeyboardInterrupt))
                  else "diverged" if isinstance(e, TrainingDiverged) else "failed")
        with contextlib.suppress(Exception):
            # a diverged run's last good step is the one before the step whose loss was not finite (the steps
            # queued after it, read one step late, do not count)
            last_good = e.step - 1 if isinstance(e, TrainingDiverged) and e.step is not None else self.step
            self.write_manifest(status, self.saved_step, stopped_at_step=last_good,
                                reason=str(e) or type(e).__name__, dev_ln_ppl=self.dev_ln_ppl)

    def record_end(self) -> None:
        if self.d.main:
            status = "finished" if self.step >= self.t.steps else "stopped"
            self.write_manifest(status, self.step, tokenizer=self.prepared.tokenizer(), dev_ln_ppl=self.dev_ln_ppl)

    # -- training ----------------------------------------------------------------------------------
    def train(self, end: int, progress: bool, step_options: Optional[StepOptions]) -> None:
        """Steps up to ``end`` (checkpoint written there); the manifest records why if anything stops it."""
        t, d = self.t, self.d
        nan_step = int(os.environ.get(NAN_ENV, "0") or 0)
        title = f"{self.variant.spec_name}/{self.variant.name}/seed{self.seed}"
        rep = Progress(title, t.steps, self.step, enabled=progress and d.main)
        log = open(self.log_path, "a", encoding="utf-8") if d.main else None
        # The step (mqa_repro.step): its numbers are read one step late, so the host never waits inside a step.
        train_step = TrainStep(self.model, self.optimizer, t, self.dev, ddp_model=self.ddp_model if d.on else None,
                               rank=d.rank, world=d.world, options=step_options)
        self.batches = Prefetcher(self.stream, self.train_ex, d.rank, d.world, t.micro_batch_tokens,
                                  train_step.prepare)
        self.metrics = _Metrics(t, end, rep, log, measured_peak(self.dev) if d.main else None)  # rank 0 logs
        self.model.train()
        try:
            with _StopFlag() as stop:
                self._steps(train_step, end, stop, nan_step)
        except BaseException as e:
            self.record_stop(e)
            raise
        finally:
            rep.close()
            if log is not None:
                log.close()

    def _steps(self, train_step: TrainStep, end: int, stop: _StopFlag, nan_step: int) -> None:
        t, batches = self.t, self.batches
        pending = None
        while self.step < end:
            item = batches.next()
            lr = lr_at(self.step + 1, t)
            stats = train_step(item.micro, item.n_global, lr, stop=stop.signum != 0,
                               poison=bool(nan_step) and self.step + 1 == nan_step)
            self.step += 1
            step = self.step
            flops = sum(model_flops(self.variant.model, n, w, self.n_params) for n, w in item.shapes)
            if step < end:
                batches.prefetch()        # collate and copy the next batch while this step runs
            stop_votes = self._read(pending) if pending is not None else False
            pending = (step, lr, item.n_global, flops, batches.position["epoch"], stats)
            evaluating = step % t.eval_every == 0 or step == t.steps
            saving = step % t.checkpoint_every == 0 or step == end
            # one process needs no vote: its own signal flag stops it at once (under DDP the ranks agree
            # through the vote in the step's all-reduced numbers, read one step late)
            signalled = not self.d.on and stop.signum != 0
            # on the CPU a step is done when its call returns: reading it at once costs nothing and keeps each
            # log record's time on its own steps
            if evaluating or saving or stop_votes or signalled or step == end or self.dev.type == "cpu":
                stop_votes = self._read(pending) or stop_votes or signalled  # never save an unread step
                pending = None
            paused = time.perf_counter()
            if evaluating:
                self._evaluate(step)
            if saving:
                self.save(step)
            self.metrics.exclude(time.perf_counter() - paused)
            if stop_votes:
                if step % t.checkpoint_every and step != end:
                    self.save(step)
                raise TrainingInterrupted(f"stopped by signal at step {step}; checkpoint saved to {self.ckpt_path}; "
                                          f"continue with --resume")

    def _read(self, pending: tuple) -> bool:
        """Read a queued step's numbers (waits for that step only): NaN check, log. Returns its stop vote."""
        at, lr, n_global, flops, epoch, stats = pending
        v = stats.read()
        loss, gnorm = v["loss"], v["grad_norm"]
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            last = load_checkpoint(self.ckpt_path)["step"] if self.ckpt_path.is_file() else None
            kept = (f"the last good checkpoint (step {last}) is kept at {self.ckpt_path}" if last is not None
                    else "no checkpoint had been written yet")
            raise TrainingDiverged(f"training stopped at step {at}: the loss is "
                                   f"{'NaN' if math.isnan(loss) else loss} (grad norm {gnorm}); {kept}", step=at)
        self.losses.append((at, loss))
        self.metrics.add(at, lr, n_global, flops, epoch, v)
        return v["stop"]

    def _evaluate(self, step: int) -> None:
        total, count, _ = corpus_nll(self.model, self.dev_ex, self.dev, batch_tokens=max(self.t.batch_tokens, 4096))
        self.dev_ln_ppl = total / max(count, 1)
        self.metrics.dev(step, self.dev_ln_ppl)

    def save(self, at_step: int) -> None:
        """The checkpoint after ``at_step`` (every rank's RNG states gathered; rank 0 writes)."""
        states = gather_objects(rng_state(self.dev), self.d)
        if self.d.main:
            t, v = self.t, self.variant
            save_checkpoint(self.ckpt_path, {
                "format": CHECKPOINT_FORMAT, "step": at_step, "seed": self.seed,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": {"name": t.schedule, "step": at_step, "lr": lr_at(at_step, t)},
                "rng": states, "data": self.batches.position, "world_size": self.d.world,
                "spec": v.to_dict(), "spec_hash": v.hash, "training_hash": v.training_hash,
                "data_manifest_hash": self.data_hash,
                "dev_ln_ppl": self.dev_ln_ppl, "init": self.init_info})
        self.saved_step = at_step


class _Metrics:
    """The numbers of the steps read, summed over a window (the steps since the last record): one log
    record and one progress line every ``training.log_every`` steps and at the last step. Time spent
    outside the steps (evaluation, checkpoints) does not count in the speed."""

    def __init__(self, t, end: int, rep: Progress, log, peak):
        self.t, self.end, self.rep, self.log, self.peak = t, end, rep, log, peak
        self.win = self._new_window()

    @staticmethod
    def _new_window() -> dict:
        return {"loss": 0.0, "nll": 0.0, "tokens": 0, "flops": 0.0, "steps": 0, "start": time.perf_counter(),
                "paused": 0.0}

    def exclude(self, seconds: float) -> None:
        self.win["paused"] += seconds

    def add(self, at: int, lr: float, n_global: int, flops: float, epoch: int, v: dict) -> None:
        win = self.win
        win["loss"] += v["loss"]
        win["nll"] += v["nll"]
        win["tokens"] += n_global
        win["flops"] += flops
        win["steps"] += 1
        self.rep.step(at, f"loss {v['loss']:.3f} lr {lr:.2e}")
        if at % self.t.log_every == 0 or at == self.end:
            self._record(at, lr, v["grad_norm"], n_global, epoch)

    def _record(self, at: int, lr: float, gnorm: float, n_global: int, epoch: int) -> None:
        t, win = self.t, self.win
        seconds = time.perf_counter() - win["start"] - win["paused"]
        speed = speed_record(win["tokens"], seconds, win["flops"], win["steps"], t.steps, self.peak)
        rec = {"step": at, "loss": win["loss"] / win["steps"], "nll": win["nll"] / win["steps"],
               "lr": lr, "grad_norm": gnorm, **speed, "tgt_tokens": n_global, "epoch": epoch}
        write_record(self.log, rec)
        mfu = f"  MFU {speed['mfu']:.1%}" if speed["mfu"] is not None else ""
        self.rep.line(f"step {at}  loss {rec['loss']:.4f}  lr {lr:.3g}  |g| {gnorm:.3g}  "
                      f"{rec['tokens_per_s']:.0f} tok/s{mfu}  all {t.steps} steps: "
                      f"{speed['projected_total_s'] / 3600:.2f} h")
        self.win = self._new_window()

    def dev(self, step: int, dev_ln_ppl: float) -> None:
        write_record(self.log, {"step": step, "dev_ln_ppl": dev_ln_ppl})
        self.rep.line(f"step {step}  dev ln(ppl) {dev_ln_ppl:.4f}")


def _init_field(info: Optional[dict]) -> dict:
    return {"init": info} if info else {}
