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


def _on_device(values: list, device: torch.device) -> torch.Tensor:
    """Host numbers as a float32 vector on ``device`` without waiting for it: from pinned memory with a
    non-blocking copy on CUDA (``torch.tensor(values, device=...)`` copies from pageable memory, which
    synchronises the stream)."""
    t = torch.tensor(values, dtype=torch.float32)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def factored_update(g, row_var, col_var, eps1: float):
    """Adafactor's update of one matrix (or stack of matrices) before clipping, and its L2 norm (float32).

    ``g``: [..., R, C] the gradient; ``row_var`` [..., R, 1] and ``col_var`` [..., 1, C]: the factored second
    moments (already updated this step); ``eps1``: the floor of the row means and (squared) of the
    estimate. update = g / sqrt(max(row_var * col_var / mean(row_var), eps1^2)), as torch.optim.Adafactor
    computes it (Shazeer and Stern 2018, algorithm 4), written as one broadcast expression so that
    ``torch.compile`` makes it one pass over the gradient (torch's step materialises the estimate, then
    divides, clamps, takes the root and multiplies: five passes).
    """
    row_mean = row_var.mean(dim=-2, keepdim=True).clamp_min(eps1)
    u = g * (row_var * col_var / row_mean).clamp_min(eps1 * eps1).rsqrt()
    return u, torch.linalg.vector_norm(u)


def factored_updates(grads: list, row_vars: list, col_vars: list, eps1: float) -> tuple:
    """:func:`factored_update` of every matrix: (updates, norms). One call for all of them, so that the
    ``torch.compile``-d version is one graph (one guard check a step, not one per matrix)."""
    out = [factored_update(g, r, c, eps1) for g, r, c in zip(grads, row_vars, col_vars)]
    return [u for u, _ in out], [n for _, n in out]


class Adafactor(torch.optim.Adafactor):
    """``torch.optim.Adafactor`` (same hyper-parameters, state and update) whose ``foreach=True`` step never
    waits for the device.

    torch's multi-tensor step reads two norms per parameter to the host (``.item()``: the parameter's RMS
    for the relative step size and the update's RMS for update clipping), so the host stops twice per
    parameter and the device idles while it launches the next kernels; on an H200 at the paper's shape
    that made the optimizer about 25 ms of a 150 ms step (notes/training-speed.md). Here those scalars stay
    on the device: the norms of all parameters (and of all updates) are one multi-tensor norm, the step
    sizes a vector, applied by a multi-tensor multiply. The step counts are the CPU scalars torch keeps,
    so the decay rate and the relative step cap are host numbers as in torch. ``foreach=False`` is torch's
    own per-parameter loop. Equal to torch's update within float32 rounding (tests/test_step.py).
    Raises RuntimeError for sparse or complex gradients, as torch's does.

    ``update_fn``: :func:`factored_updates`, the matrices' updates (the training step sets a
    ``torch.compile``-d one on CUDA: one fused pass per matrix instead of five).
    """

    update_fn = staticmethod(factored_updates)

    @torch.no_grad()
    def step(self, closure=None):
        if not all(g.get("foreach") for g in self.param_groups):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._group_step(group, params)
        return loss

    def _state(self, p: torch.Tensor) -> dict:
        if p.grad.is_sparse or torch.is_complex(p):
            raise RuntimeError("Adafactor does not support sparse gradients or complex parameters")
        state = self.state[p]
        if not state:   # as torch.optim.Adafactor: a CPU step count, factored moments for matrices
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            if p.grad.dim() > 1:
                state["row_var"] = p.grad.new_zeros((*p.grad.shape[:-1], 1))
                state["col_var"] = p.grad.new_zeros((*p.grad.shape[:-2], 1, p.grad.shape[-1]))
            else:
                state["variance"] = torch.zeros_like(p.grad)
        return state

    def _group_step(self, group: dict, params: list) -> None:
        lr, wd, d = float(group["lr"]), group["weight_decay"], group["d"]
        eps1, eps2 = group["eps"]
        states = [self._state(p) for p in params]
        grads = [(-p.grad if group["maximize"] else p.grad) for p in params]
        steps = []
        for st in states:
            st["step"] += 1
            steps.append(float(st["step"]))
        dev = params[0].device
        decay = [s ** group["beta2_decay"] for s in steps]                        # 1 - beta2_t
        host = _on_device([min(lr, s ** -0.5) for s in steps] + [p.numel() ** 0.5 for p in params], dev)
        rho, root_n = host[:len(params)], host[len(params):]                     # one copy a step
        # relative step size: max(eps2, RMS(p)) * rho, from the parameters before weight decay
        alpha = (torch.stack(torch._foreach_norm(params)).float() / root_n).clamp_min(eps2) * rho
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        updates, norms = [None] * len(params), [None] * len(params)
        e1 = eps1 if eps1 is not None else torch.finfo(params[0].dtype).eps
        mats = [i for i, p in enumerate(params) if p.dim() > 1]
        vecs = [i for i, p in enumerate(params) if p.dim() <= 1]
        if mats:
            g = [grads[i] for i in mats]
            rows = [states[i]["row_var"] for i in mats]
            cols = [states[i]["col_var"] for i in mats]
            row_sq = [torch.linalg.vector_norm(x, dim=-1, keepdim=True) for x in g]
            torch._foreach_mul_(row_sq, row_sq)
            torch._foreach_div_(row_sq, [x.size(-1) for x in g])
            torch._foreach_lerp_(rows, row_sq, [decay[i] for i in mats])
            col_sq = [torch.linalg.vector_norm(x, dim=-2, keepdim=True) for x in g]
            torch._foreach_mul_(col_sq, col_sq)
            torch._foreach_div_(col_sq, [x.size(-2) for x in g])
            torch._foreach_lerp_(cols, col_sq, [decay[i] for i in mats])
            for i, u, n in zip(mats, *self.update_fn(g, rows, cols, e1)):
                updates[i], norms[i] = u, n
        if vecs:
            g = [grads[i] for i in vecs]
            var = [states[i]["variance"] for i in vecs]
            torch._foreach_lerp_(var, torch._foreach_mul(g, g), [decay[i] for i in vecs])
            u = torch._foreach_clamp_min(var, e1 * e1)
            torch._foreach_rsqrt_(u)
            torch._foreach_mul_(u, g)
            for i, ui, n in zip(vecs, u, torch._foreach_norm(u)):
                updates[i], norms[i] = ui, n
        # update clipping: divide by max(1, RMS(update) / d)
        clip = (torch.stack(norms).float() / (root_n * d)).clamp_min(1.0)
        torch._foreach_mul_(updates, list((-alpha / clip).unbind(0)))
        torch._foreach_add_(params, updates)


def implementation_for(device: torch.device, optimizer: str, fast: Optional[bool] = None) -> dict:
    """Keyword arguments for the optimizer's constructor choosing its implementation on ``device``.

    ``fast``: AdamW fused (one kernel for all parameters), Adafactor foreach (multi-tensor kernels with no
    host synchronisation: :class:`Adafactor`). None: fast on CUDA, torch's plain per-parameter loop on the
    CPU."""
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
        return Adafactor(groups, lr=lr_at(1, t), **impl)
    return torch.optim.AdamW(groups, lr=lr_at(1, t), betas=tuple(t.betas), eps=1e-9, **impl)


def set_implementation(optimizer: torch.optim.Optimizer, fast: Optional[bool] = None) -> None:
    """Re-apply the implementation after ``load_state_dict`` (which restores the saved run's flags, e.g. a
    CPU checkpoint's plain loop on a GPU). The update's math and state are the same either way."""
    name = "adafactor" if type(optimizer).__name__ == "Adafactor" else "adamw"
    impl = implementation_for(optimizer.param_groups[0]["params"][0].device, name, fast)
    for g in optimizer.param_groups:
        g.update(impl)
