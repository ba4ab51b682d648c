"""One training step, shared by ``train`` (every step of a run) and ``decode-bench`` (the training row).

Shape legend (as in model.py): B rows of a micro-batch, T target positions, S source positions, D d_model.

A step over one rank's share of a global batch of ``n_global`` target tokens:

  * for each micro-batch: the model's forward under bf16 autocast on CUDA (fp32 on the CPU) up to the
    final hidden states; the loss of :func:`mqa_repro.loss.linear_cross_entropy` (label smoothing, z-loss,
    PAD targets masked) summed over the micro-batch's tokens; backward of ``loss_sum * world / n_global``
    (DDP averages over ranks, so the gradient is that of the global mean; DDP's all-reduce runs on the last
    micro-batch only);
  * gradient clipping to ``training.grad_clip`` (one multi-tensor norm, no per-parameter host loop);
  * the optimizer step at the learning rate the caller passes (:func:`mqa_repro.optim.lr_at`).

Nothing in the step waits for the device: the step's sums (loss, NLL, target tokens, gradient norm, the
stop-signal vote) are all-reduced as ONE tensor and copied to pinned host memory behind a CUDA event;
:meth:`StepStats.read` waits for that step only, so the caller reads step k while step k+1 runs
(the NaN check and the log read one step late).

Switches (:class:`StepOptions`, each ``None`` = auto for the device): ``torch.compile`` of the model's
forward, of the loss's per-chunk kernel and of the foreach Adafactor's matrix updates (CUDA only by
default), the fused / foreach optimizer (CUDA only by default: the CPU keeps torch's plain loop, so CPU runs
stay bitwise what they were), padding of the length dimensions to a multiple (when compiling) so that the
compiled graph sees few shapes.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from . import roofline as rl
from .loss import chunk_loss_and_grad, linear_cross_entropy
from .model import PAD, Transformer
from .optim import Adafactor, factored_updates, set_implementation


@dataclass(frozen=True)
class StepOptions:
    """How the step runs (not what it computes). ``None`` everywhere = :meth:`resolved` picks per device."""

    compile: Optional[bool] = None          # torch.compile the forward and the loss chunk (auto: CUDA only)
    compile_backend: object = "inductor"    # a torch.compile backend (name or callable; tests trace on the CPU)
    fused_optimizer: Optional[bool] = None  # fused AdamW / foreach Adafactor (auto: CUDA only)
    pad_multiple: Optional[int] = None      # pad T and S up to a multiple (auto: 64 when compiling, else 1)
    loss_chunk_rows: Optional[int] = None   # rows of logits per loss chunk (auto: loss.chunk_rows_for)
    pin_memory: Optional[bool] = None       # pinned host batches, non-blocking copies (auto: CUDA)

    def resolved(self, device: torch.device) -> "StepOptions":
        cuda = torch.device(device).type == "cuda"
        comp = cuda if self.compile is None else bool(self.compile)
        pad = (64 if comp else 1) if self.pad_multiple is None else max(1, int(self.pad_multiple))
        return replace(self, compile=comp, pad_multiple=pad,
                       fused_optimizer=cuda if self.fused_optimizer is None else bool(self.fused_optimizer),
                       pin_memory=cuda if self.pin_memory is None else bool(self.pin_memory) and cuda)


@dataclass
class Batch:
    """One (micro-)batch of token ids: decoder input / target ids and segment ids (0 = PAD), and for an
    encoder-decoder the source ids and segment ids. Made by ``batching.collate`` or by decode-bench."""

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

    @property
    def n_tokens(self) -> int:
        return int((self.tgt_out_BT != PAD).sum())


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing on the CPU (fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def pad_lengths(batch, multiple: int):
    """``batch`` (a Batch: tgt_in_BT, tgt_out_BT, tgt_seg_BT, src_BS, src_seg_BS) with T and S padded
    up to a multiple of ``multiple`` (PAD ids, segment 0). Padding never changes the loss: PAD targets are
    masked and segment ids keep real tokens from attending to padding."""
    if multiple <= 1:
        return batch

    def pad(x, value):
        if x is None:
            return None
        w = x.shape[1]
        extra = _round_up(w, multiple) - w
        return torch.nn.functional.pad(x, (0, extra), value=value) if extra else x

    return replace(batch, tgt_in_BT=pad(batch.tgt_in_BT, PAD), tgt_out_BT=pad(batch.tgt_out_BT, PAD),
                   tgt_seg_BT=pad(batch.tgt_seg_BT, 0), src_BS=pad(batch.src_BS, PAD),
                   src_seg_BS=pad(batch.src_seg_BS, 0))


def to_device(batch, device: torch.device, pin: bool):
    """Every tensor of ``batch`` on ``device``; from pinned memory with non-blocking copies when ``pin``."""
    def move(x):
        if x is None:
            return None
        if pin:
            x = x.pin_memory()
        return x.to(device, non_blocking=pin)

    return replace(batch, **{f: move(getattr(batch, f)) for f in
                             ("tgt_in_BT", "tgt_out_BT", "tgt_seg_BT", "src_BS", "src_seg_BS")})


class StepStats:
    """One step's global sums on their way to the host. ``read()`` waits for this step's work only."""

    FIELDS = ("loss_sum", "nll_sum", "tokens", "grad_norm", "stop_votes")

    def __init__(self, sums: torch.Tensor, n_global: int):
        self.n_global = n_global
        if sums.device.type == "cuda":
            self._host = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
            self._host.copy_(sums, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = sums, None
        self._values = None

    def read(self) -> dict:
        """{"loss", "nll"} (per global target token, nats), "tokens", "grad_norm", "stop" (any rank voted)."""
        if self._values is None:
            if self._event is not None:
                self._event.synchronize()
            loss_sum, nll_sum, tokens, gnorm, votes = self._host.tolist()
            n = max(self.n_global, 1)
            self._values = {"loss": loss_sum / n, "nll": nll_sum / n, "tokens": tokens, "grad_norm": gnorm,
                            "stop": votes > 0}
        return self._values

    @property
    def finite(self) -> bool:
        v = self.read()
        return math.isfinite(v["loss"]) and math.isfinite(v["grad_norm"])


def unembedding(model: Transformer) -> torch.Tensor:
    """[P, D] the matrix that maps final hidden states to logits (the tied embedding by default)."""
    return model.embed.weight if model.unembed is None else model.unembed.weight


class TrainStep:
    """The training step (see the module docstring). Build it after the optimizer state is loaded.

    ``model``: the Transformer; ``ddp_model``: the same model wrapped in DDP (or None); ``optimizer``: from
    :func:`mqa_repro.optim.build_optimizer`; ``t``: the TrainingSpec; ``rank`` / ``world``: this process
    in the DDP group (0 / 1 alone).
    """

    def __init__(self, model: Transformer, optimizer: torch.optim.Optimizer, t, device: torch.device,
                 ddp_model=None, rank: int = 0, world: int = 1, options: Optional[StepOptions] = None):
        self.model, self.optimizer, self.t, self.device = model, optimizer, t, torch.device(device)
        self.rank, self.world = rank, world
        self.opts = (options or StepOptions()).resolved(self.device)
        self.vocab = model.spec.vocab_size
        self.params = [p for p in model.parameters() if p.requires_grad]
        set_implementation(optimizer, self.opts.fused_optimizer)
        self.wrapped = ddp_model if ddp_model is not None else model
        self.forward = self.wrapped
        self.chunk_fn: Callable = chunk_loss_and_grad
        if self.opts.compile:
            self.forward = torch.compile(self.wrapped, backend=self.opts.compile_backend)
            self.chunk_fn = torch.compile(chunk_loss_and_grad, backend=self.opts.compile_backend)
            if self.opts.fused_optimizer and isinstance(optimizer, Adafactor):   # one graph, a pass per matrix
                optimizer.update_fn = torch.compile(factored_updates, backend=self.opts.compile_backend)
        self.compute_dtype = torch.bfloat16 if self.device.type == "cuda" else None

    # -- data ----------------------------------------------------------------------------------------
    def prepare(self, batch):
        """A collated host batch -> padded per the shape policy, on the device (non-blocking when pinned)."""
        return to_device(pad_lengths(batch, self.opts.pad_multiple), self.device, self.opts.pin_memory)

    def _mark_dynamic(self, b) -> None:
        if not self.opts.compile:
            return
        import torch._dynamo

        for x in (b.tgt_in_BT, b.tgt_seg_BT, b.src_BS, b.src_seg_BS):
            if x is not None:
                torch._dynamo.maybe_mark_dynamic(x, 0)
                torch._dynamo.maybe_mark_dynamic(x, 1)

    # -- the step -------------------------------------------------------------------------------------
    def __call__(self, micro_batches: list, n_global: int, lr: float, stop: bool = False,
                 poison: bool = False) -> StepStats:
        """One optimizer step over ``micro_batches`` (prepared batches of this rank); ``n_global``: target
        tokens of the whole global batch (all ranks); ``stop``: this rank's stop-signal vote; ``poison``:
        turn the loss into NaN (the divergence test hook). Returns the step's :class:`StepStats`."""
        t, dev = self.t, self.device
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(5, dtype=torch.float64, device=dev)
        w_PD = unembedding(self.model)
        for k, b in enumerate(micro_batches):
            last = k == len(micro_batches) - 1
            ctx = self.wrapped.no_sync() if (self.world > 1 and not last) else contextlib.nullcontext()
            with ctx:
                self._mark_dynamic(b)
                with autocast(dev):
                    h_BTD = self.forward(b.tgt_in_BT, b.src_BS, b.tgt_seg_BT, b.src_seg_BS, hidden=True)
                targets_N = b.tgt_out_BT.reshape(-1)
                mask_N = targets_N != PAD
                loss_sum, nll_sum = linear_cross_entropy(
                    h_BTD.reshape(-1, h_BTD.shape[-1]), w_PD, targets_N, mask_N, self.vocab, t.label_smoothing,
                    t.z_loss, self.opts.loss_chunk_rows, self.compute_dtype, self.chunk_fn)
                if poison:
                    loss_sum = loss_sum * float("nan")
                # Every rank divides by the GLOBAL token count; DDP averages over ranks: x world.
                (loss_sum * (self.world / n_global)).backward()
            sums[0] += loss_sum.detach()
            sums[1] += nll_sum
            sums[2] += mask_N.sum()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip,
                                                   foreach=True if dev.type == "cuda" else None)
        if self.rank == 0:   # gradients are identical on every rank after DDP's all-reduce: count the norm once
            sums[3] += grad_norm.detach()
        sums[4] += float(bool(stop))
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        self.optimizer.step()
        return StepStats(sums, n_global)


# --------------------------------------------------------------------------------------------------
# Speed: model FLOPs, MFU, projected wall time
# --------------------------------------------------------------------------------------------------
def model_flops(m, tokens: int, seq_len: int, n_params: int) -> float:
    """Model FLOPs (forward + backward) of training ``tokens`` target tokens in rows of ``seq_len``
    (and as many source tokens for an encoder-decoder): :func:`mqa_repro.roofline.training_cost`."""
    if tokens <= 0 or seq_len <= 0:
        return 0.0
    return rl.training_cost(m, 1, seq_len, n_params).flops * tokens / seq_len


def speed_record(tokens: int, seconds: float, flops: float, steps_done: int, total_steps: int,
                 peak_flops: Optional[float]) -> dict:
    """What ``train`` logs and decode-bench reports: target tokens/s, MFU against the measured peak (None
    without one, e.g. on the CPU), and the projected wall time of ``total_steps`` at this window's rate."""
    seconds = max(seconds, 1e-9)
    return {"tokens_per_s": tokens / seconds,
            "mfu": flops / seconds / peak_flops if peak_flops else None,
            "projected_total_s": seconds / max(steps_done, 1) * total_steps}


def measured_peak(device: torch.device) -> Optional[float]:
    """The device's measured bf16 matmul peak (FLOP/s, cached by roofline.ceilings) on CUDA; None on the
    CPU (measuring it there takes a minute of two shared cores and a CPU MFU means little)."""
    if torch.device(device).type != "cuda":
        return None
    return rl.ceilings(device, "bf16").peak_flops
