"""Optimizer and learning-rate schedule of the training recipe (``training.optimizer``, ``training.schedule``).

``build_optimizer`` picks the optimizer's implementation separately from its math (``fast``: a fused AdamW,
one kernel for all parameters; a foreach Adafactor, multi-tensor kernels). Both compute the update of the
per-parameter loop up to floating-point rounding (tests/test_step.py); ``None`` lets
:func:`implementation_for` choose per device (fast on CUDA; the plain loop on the CPU, which keeps CPU runs
bitwise what they were).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .errors import UserError


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


def implementation_for(device: torch.device, optimizer: str, fast: Optional[bool] = None) -> dict:
    """Keyword arguments for the optimizer's constructor choosing its implementation on ``device``.

    ``fast``: AdamW fused (one kernel for all parameters), Adafactor foreach (multi-tensor kernels; torch
    has no fused Adafactor). None: fast on CUDA, torch's plain per-parameter loop on the CPU."""
    fast = torch.device(device).type == "cuda" if fast is None else bool(fast)
    if optimizer == "adafactor":
        return {"foreach": fast}
    return {"fused": fast, "foreach": False}


def build_optimizer(model: torch.nn.Module, t, fast: Optional[bool] = None) -> torch.optim.Optimizer:
    """AdamW (weight decay on matrices only) or Adafactor (factored second moments, update clipping by
    parameter scale as in torch.optim.Adafactor; the schedule sets its step size).

    ``fast``: the implementation (:func:`implementation_for`; None: auto for the device of the model's
    parameters). Raises UserError for Adafactor on torch < 2.5."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    impl = implementation_for(next(model.parameters()).device, t.optimizer, fast)
    if t.optimizer == "adafactor":
        if not hasattr(torch.optim, "Adafactor"):
            raise UserError("training.optimizer adafactor needs torch >= 2.5 (torch.optim.Adafactor)")
        return torch.optim.Adafactor(groups, lr=lr_at(1, t), **impl)
    return torch.optim.AdamW(groups, lr=lr_at(1, t), betas=tuple(t.betas), eps=1e-9, **impl)


def set_implementation(optimizer: torch.optim.Optimizer, fast: Optional[bool] = None) -> None:
    """Re-apply the implementation after ``load_state_dict`` (which restores the saved run's flags, e.g. a
    CPU checkpoint's plain loop on a GPU). The update's math and state are the same either way."""
    name = "adafactor" if type(optimizer).__name__ == "Adafactor" else "adamw"
    impl = implementation_for(optimizer.param_groups[0]["params"][0].device, name, fast)
    for g in optimizer.param_groups:
        g.update(impl)
