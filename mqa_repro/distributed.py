"""Data-parallel processes: the process group ``torchrun`` asks for, and the few collectives training needs.

``torchrun`` sets ``WORLD_SIZE`` and ``RANK`` for every process; :func:`init_distributed` starts the group
(NCCL on GPUs, gloo on the CPU) and returns a :class:`Dist` (rank 0 is the one that writes files). With one
process every helper here is a no-op, so the training loop reads the same on one process and on many.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


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


def end_distributed(d: Dist) -> None:
    """Destroy the process group if :func:`init_distributed` started it (not one the caller made)."""
    if d.group_started_here:
        import torch.distributed as dist

        dist.destroy_process_group()


def all_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """``x`` summed over all ranks, in place (unchanged with one process)."""
    if d.on:
        import torch.distributed as dist

        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def any_rank(flag: bool, d: Dist) -> bool:
    """Whether ``flag`` is true on any rank (every rank must call this)."""
    if not d.on:
        return flag
    x = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    return bool(all_sum(x, d).item())


def gather_objects(obj, d: Dist) -> list:
    """Every rank's ``obj`` (picklable), in rank order: ``[obj]`` with one process."""
    if not d.on:
        return [obj]
    import torch.distributed as dist

    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
